"""Hypothesis properties of the pure data transforms in jaxtrain/data.py.

Shapes are drawn from small fixed sets: every new shape compiles a new XLA
program, and the properties do not depend on size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxtrain import data as data_lib

SETTINGS = settings(max_examples=25, deadline=None)
SEEDS = st.integers(0, 2**32 - 1)
ORDER_SIZES = st.sampled_from([1, 2, 7, 16, 33])  # epoch_order compiles once per size
IMAGE_SHAPES = st.sampled_from([(1, 4, 4, 1), (3, 5, 6, 2), (2, 3, 3, 3)])


def _split(n: int, shape=(2, 2, 1)) -> data_lib.Split:
    """Rows that name themselves: label i, every pixel of image i equal to i / max(n, 1)."""
    label = np.arange(n, dtype=np.int32)
    image = np.broadcast_to(_code(label, n)[:, None, None, None], (n, *shape)).copy()
    return {"image": image, "label": label}


def _code(label: np.ndarray, n: int) -> np.ndarray:
    return (label / max(n, 1)).astype(np.float32)


def _images(shape, seed) -> np.ndarray:
    """Values in (0.01, 1]: a zero in the output can only come from padding."""
    return np.random.default_rng(seed).uniform(0.01, 1.0, shape).astype(np.float32)


# ----------------------------------------------------------------------------- splits


@SETTINGS
@given(n=st.integers(0, 300), fraction=st.floats(0.0, 0.99))
def test_holdout_partitions_rows_deterministically(n, fraction):
    split = _split(n)
    keep, out = data_lib._holdout(split, fraction)
    n_out = round(n * fraction)
    assert (len(keep["label"]), len(out["label"])) == (n - n_out, n_out)
    both = np.concatenate([keep["label"], out["label"]])
    assert np.array_equal(np.sort(both), np.arange(n))  # disjoint, nothing lost
    for part in (keep, out):
        assert np.all(np.diff(part["label"]) > 0)  # original order kept
        assert np.array_equal(part["image"][:, 0, 0, 0], _code(part["label"], n))
    again = data_lib._holdout(split, fraction)
    assert np.array_equal(again[1]["label"], out["label"])


@SETTINGS
@given(
    shape=st.tuples(st.integers(1, 6), st.integers(1, 5), st.integers(1, 5), st.integers(1, 4)),
    seed=SEEDS,
    constant=st.booleans(),
)
def test_channel_stats_match_numpy_per_channel(shape, seed, constant):
    images = _images(shape, seed)
    if constant:
        images[..., 0] = 0.25
    mean, std = data_lib.channel_stats(images)
    assert len(mean) == len(std) == shape[-1]
    flat = images.reshape(-1, shape[-1]).astype(np.float64)
    np.testing.assert_allclose(mean, flat.mean(0), rtol=1e-9)
    np.testing.assert_allclose(std, np.maximum(flat.std(0), 1e-3), rtol=1e-9)
    assert all(flat.min(0)[c] - 1e-9 <= mean[c] <= flat.max(0)[c] + 1e-9 for c in range(shape[-1]))
    assert min(std) >= 1e-3
    if constant:
        assert std[0] == 1e-3 and abs(mean[0] - 0.25) < 1e-7


# ----------------------------------------------------------------------------- order


@SETTINGS
@given(seed=SEEDS, epoch=st.integers(0, 10_000), n=ORDER_SIZES)
def test_epoch_order_is_a_keyed_permutation(seed, epoch, n):
    order = data_lib.epoch_order(seed, epoch, n)
    assert order.dtype == np.int32 and order.shape == (n,)
    assert np.array_equal(np.sort(order), np.arange(n))
    assert not order.flags.writeable
    fresh = data_lib.epoch_order.__wrapped__(seed, epoch, n)  # recomputed, not cached
    assert np.array_equal(fresh, order)
    if n >= 16:  # 1/16! chance of a collision
        assert not np.array_equal(data_lib.epoch_order(seed, epoch + 1, n), order)
        assert not np.array_equal(data_lib.epoch_order((seed + 1) % 2**32, epoch, n), order)


@SETTINGS
@given(seed=SEEDS, n=ORDER_SIZES, data=st.data())
def test_batch_indices_walk_each_epoch_in_full_disjoint_batches(seed, n, data):
    batch = data.draw(st.integers(1, n), label="batch")
    per_epoch = data_lib.steps_per_epoch(n, batch)
    epoch = data.draw(st.integers(0, 3), label="epoch")
    steps = range(epoch * per_epoch, (epoch + 1) * per_epoch)
    batches = [data_lib.batch_indices(seed, s, n, batch) for s in steps]
    for idx in batches:
        assert idx.shape == (batch,) and idx.dtype == np.int32
        assert 0 <= idx.min() and idx.max() < n
    walked = np.concatenate(batches)
    assert len(np.unique(walked)) == len(walked) == per_epoch * batch  # disjoint batches
    assert np.array_equal(walked, data_lib.epoch_order(seed, epoch, n)[: per_epoch * batch])


# ----------------------------------------------------------------------------- evaluation


@SETTINGS
@given(n=st.integers(0, 60), batch=st.integers(1, 24))
def test_eval_batches_cover_every_example_once_with_a_mask(n, batch):
    split = _split(n)
    batches = list(data_lib.eval_batches(split, batch))
    assert len(batches) == data_lib.num_eval_batches(n, batch)
    for i, b in enumerate(batches):
        assert set(b) == {"image", "label", "mask"}
        assert all(len(v) == batch for v in b.values())  # one shape: one compile
        assert b["mask"].dtype == np.float32 and set(np.unique(b["mask"])) <= {0.0, 1.0}
        assert np.all(np.diff(b["mask"]) <= 0)  # real rows first, padding after
        if i < len(batches) - 1:
            assert b["mask"].all()
        padding = b["mask"] == 0
        assert np.all(b["label"][padding] == 0)  # padding repeats example 0
        assert np.array_equal(b["image"][:, 0, 0, 0], _code(b["label"], n))
    if batches:
        labels = np.concatenate([b["label"] for b in batches])
        mask = np.concatenate([b["mask"] for b in batches]).astype(bool)
        assert np.array_equal(labels[mask], np.arange(n))  # each example exactly once, in order
        assert mask.sum() == n


# ----------------------------------------------------------------------------- augmentation


@SETTINGS
@given(shape=IMAGE_SHAPES, padding=st.sampled_from([0, 1, 2, 4]), seed=SEEDS,
       key_seed=st.integers(0, 2**31 - 1))
def test_random_crop_is_a_keyed_window_of_the_padded_image(shape, padding, seed, key_seed):
    images = _images(shape, seed)
    key = jax.random.key(key_seed)
    out = np.asarray(data_lib.random_crop(key, jnp.asarray(images), padding))
    assert out.shape == images.shape and out.dtype == images.dtype
    assert 0.0 <= out.min() and out.max() <= 1.0
    assert np.array_equal(out, np.asarray(data_lib.random_crop(key, jnp.asarray(images), padding)))
    if padding == 0:
        assert np.array_equal(out, images)
    _, h, w, _ = shape
    padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    for img, crop in zip(padded, out, strict=True):
        windows = [img[y : y + h, x : x + w] for y in range(2 * padding + 1)
                   for x in range(2 * padding + 1)]
        assert any(np.array_equal(crop, win) for win in windows)


@SETTINGS
@given(shape=IMAGE_SHAPES, seed=SEEDS, key_seed=st.integers(0, 2**31 - 1))
def test_random_flip_mirrors_or_keeps_each_image(shape, seed, key_seed):
    images = _images(shape, seed)
    key = jax.random.key(key_seed)
    out = np.asarray(data_lib.random_flip(key, jnp.asarray(images)))
    assert out.shape == images.shape and out.dtype == images.dtype
    for img, res in zip(images, out, strict=True):
        assert np.array_equal(res, img) or np.array_equal(res, img[:, ::-1])
    assert np.array_equal(out, np.asarray(data_lib.random_flip(key, jnp.asarray(images))))


@SETTINGS
@given(shape=IMAGE_SHAPES, seed=SEEDS, key_seed=st.integers(0, 2**31 - 1),
       padding=st.sampled_from([0, 2]), flip=st.booleans())
def test_augment_is_a_function_of_its_key(shape, seed, key_seed, padding, flip):
    images = jnp.asarray(_images(shape, seed))
    key = jax.random.key(key_seed)
    out = data_lib.augment(key, images, crop_padding=padding, flip=flip)
    assert out.shape == images.shape and out.dtype == images.dtype
    assert np.array_equal(out, data_lib.augment(key, images, crop_padding=padding, flip=flip))
    if not padding and not flip:
        assert np.array_equal(out, images)
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
