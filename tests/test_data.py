"""Data sources and pure transforms: shapes, determinism, coverage, keyed augmentation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtrain import data


@pytest.fixture(scope="module")
def digits():
    return data.load_dataset("digits", val_fraction=0.1)


# ----------------------------------------------------------------------------- sources


def test_digits_shapes_range_and_split_sizes(digits):
    sizes = {s: len(getattr(digits, s)["label"]) for s in ("train", "val", "test")}
    assert sum(sizes.values()) == 1797
    assert sizes["test"] == round(1797 * 0.2)
    assert sizes["val"] == round((1797 - sizes["test"]) * 0.1)
    assert digits.image_shape == (8, 8, 1)
    assert digits.num_classes == 10
    for split in (digits.train, digits.val, digits.test):
        assert split["image"].dtype == np.float32 and split["label"].dtype == np.int32
        assert split["image"].shape[1:] == (8, 8, 1)
        assert split["image"].min() >= 0.0 and split["image"].max() <= 1.0
    assert set(np.unique(digits.train["label"])) == set(range(10))
    # Images really use the range (digits pixels are 0..16 scaled by 1/16).
    assert digits.train["image"].max() == 1.0


def test_digits_splits_are_deterministic_and_disjoint(digits):
    again = data.load_dataset("digits", val_fraction=0.1)
    for s in ("train", "val", "test"):
        np.testing.assert_array_equal(getattr(digits, s)["image"], getattr(again, s)["image"])
        np.testing.assert_array_equal(getattr(digits, s)["label"], getattr(again, s)["label"])
    # Every image of the bundled set lands in exactly one split.
    from sklearn.datasets import load_digits

    raw = (load_digits().images.astype(np.float32) / 16.0).reshape(1797, -1)
    rows = {r.tobytes(): i for i, r in enumerate(raw)}  # digits has a few duplicate images
    found = np.concatenate([
        [rows[x.tobytes()] for x in getattr(digits, s)["image"].reshape(-1, 64)]
        for s in ("train", "val", "test")
    ])
    assert len(found) == 1797


def test_synthetic_shapes_and_configurable():
    train, test = data.load_synthetic(100, (12, 10, 3), 5, seed=1)
    assert train["image"].shape == (80, 12, 10, 3) and test["image"].shape == (20, 12, 10, 3)
    assert train["image"].dtype == np.float32 and train["label"].dtype == np.int32
    assert 0.0 <= train["image"].min() and train["image"].max() <= 1.0
    assert set(np.unique(np.concatenate([train["label"], test["label"]]))) <= set(range(5))
    again, _ = data.load_synthetic(100, (12, 10, 3), 5, seed=1)
    np.testing.assert_array_equal(train["image"], again["image"])
    other, _ = data.load_synthetic(100, (12, 10, 3), 5, seed=2)
    assert not np.array_equal(train["image"], other["image"])
    ds = data.load_dataset("synthetic", synthetic_size=50, synthetic_shape=(6, 6, 2),
                           synthetic_classes=3, val_fraction=0.2)
    assert ds.image_shape == (6, 6, 2) and ds.num_classes == 3
    assert len(ds.train["label"]) + len(ds.val["label"]) + len(ds.test["label"]) == 50


def test_synthetic_is_learnable():
    """Nearest class mean on the train split classifies the test split well above chance."""
    train, test = data.load_synthetic(1000, (16, 16, 1), 10)
    x_tr, x_te = train["image"].reshape(len(train["label"]), -1), test["image"].reshape(200, -1)
    means = np.stack([x_tr[train["label"] == k].mean(0) for k in range(10)])
    pred = np.argmin(((x_te[:, None] - means[None]) ** 2).sum(-1), axis=1)
    assert np.mean(pred == test["label"]) > 0.9


def test_unknown_dataset_is_a_data_error():
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(data.DataError) as e:
        data.load_dataset("no_such_dataset_xyz", data_dir="/nonexistent/tfds")
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- transforms


def test_holdout_deterministic_disjoint_and_sized():
    split = {"image": np.arange(50, dtype=np.float32).reshape(50, 1, 1, 1),
             "label": np.arange(50, dtype=np.int32)}
    keep, out = data._holdout(split, 0.3)
    keep2, out2 = data._holdout(split, 0.3)
    np.testing.assert_array_equal(keep["label"], keep2["label"])
    np.testing.assert_array_equal(out["label"], out2["label"])
    assert len(out["label"]) == 15 and len(keep["label"]) == 35
    assert not set(keep["label"]) & set(out["label"])
    assert set(keep["label"]) | set(out["label"]) == set(range(50))
    # Rows stay aligned across keys, and it is not simply the first/last rows.
    np.testing.assert_array_equal(keep["image"].ravel(), keep["label"])
    assert sorted(out["label"]) != list(range(35, 50)) and sorted(out["label"]) != list(range(15))
    _, none = data._holdout(split, 0.0)
    assert len(none["label"]) == 0


def test_channel_stats_are_from_the_train_split_only():
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (40, 4, 4, 2)).astype(np.float32)
    images[..., 1] *= 0.5
    mean, std = data.channel_stats(images)
    np.testing.assert_allclose(mean, images.mean((0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(std, images.std((0, 1, 2)), rtol=1e-5)
    assert data.channel_stats(np.zeros((3, 2, 2, 1), np.float32))[1] == (1e-3,)

    ds = data.load_dataset("digits", val_fraction=0.1)
    mean, std = data.channel_stats(ds.train["image"])
    assert ds.mean == mean and ds.std == std
    everything = np.concatenate([ds.train["image"], ds.val["image"], ds.test["image"]])
    assert data.channel_stats(everything)[0] != ds.mean


def test_epoch_order_is_a_permutation_and_a_function_of_seed_and_epoch():
    n = 101
    a = data.epoch_order(3, 0, n)
    assert a.dtype == np.int32
    np.testing.assert_array_equal(np.sort(a), np.arange(n))
    data.epoch_order.cache_clear()
    np.testing.assert_array_equal(a, data.epoch_order(3, 0, n))  # recomputed, not cached
    assert not np.array_equal(a, data.epoch_order(3, 1, n))
    assert not np.array_equal(a, data.epoch_order(4, 0, n))
    assert not np.array_equal(a, np.arange(n))
    with pytest.raises(ValueError):
        a[0] = 1  # the cached order is read-only


def test_epoch_order_compiled_without_optimization_matches_the_plain_jit():
    import jax

    n = 257
    plain = jax.jit(data._permutation_fn, static_argnums=2)  # default optimization level
    for seed in (0, 1, 2**32 - 1):
        np.testing.assert_array_equal(data.epoch_order.__wrapped__(seed, 2, n),
                                      plain(np.uint32(seed), np.uint32(2), n))


def test_batch_indices_walk_each_epoch_order_in_full_batches():
    n, b = 23, 5  # 4 full batches per epoch; 3 examples reshuffle into the next epoch
    assert data.steps_per_epoch(n, b) == 4
    epoch0 = np.concatenate([data.batch_indices(7, s, n, b) for s in range(4)])
    np.testing.assert_array_equal(epoch0, data.epoch_order(7, 0, n)[:20])
    assert len(set(epoch0)) == 20
    np.testing.assert_array_equal(data.batch_indices(7, 4, n, b), data.epoch_order(7, 1, n)[:5])
    np.testing.assert_array_equal(data.batch_indices(7, 9, n, b), data.epoch_order(7, 2, n)[5:10])
    assert all(len(data.batch_indices(7, s, n, b)) == b for s in range(12))


@pytest.mark.parametrize("n,batch", [(10, 4), (12, 4), (3, 8), (1, 1)])
def test_eval_batches_cover_every_example_exactly_once(n, batch):
    split = {"image": np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1) + 1,
             "label": np.arange(n, dtype=np.int32)}
    batches = list(data.eval_batches(split, batch))
    assert len(batches) == data.num_eval_batches(n, batch) == -(-n // batch)
    counted = []
    for bt in batches:
        assert bt["image"].shape == (batch, 1, 1, 1) and bt["mask"].shape == (batch,)
        assert bt["mask"].dtype == np.float32
        counted += list(bt["label"][bt["mask"] == 1])
        np.testing.assert_array_equal(bt["image"].ravel(), bt["label"] + 1)
    assert sorted(counted) == list(range(n))
    assert sum(bt["mask"].sum() for bt in batches) == n


# ----------------------------------------------------------------------------- augmentation


def _images(b=6, h=5, w=7, c=2):
    return np.random.default_rng(b).uniform(0, 1, (b, h, w, c)).astype(np.float32)


def test_random_crop_is_a_keyed_shift_of_the_zero_padded_image():
    x = _images()
    pad = 2
    crop = jax.jit(data.random_crop, static_argnums=2)
    out = np.asarray(crop(jax.random.key(1), x, pad))
    assert out.shape == x.shape and 0.0 <= out.min() and out.max() <= 1.0
    padded = np.pad(np.asarray(x), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = []
    for i in range(x.shape[0]):  # each output is some window of its own padded image
        hits = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                if np.array_equal(padded[i, dy:dy + 5, dx:dx + 7], out[i])]
        assert hits, f"image {i} is not a crop of its padded input"
        offsets.append(hits[0])
    assert len(set(offsets)) > 1  # offsets differ across the batch
    np.testing.assert_array_equal(out, crop(jax.random.key(1), x, pad))
    assert not np.array_equal(out, crop(jax.random.key(2), x, pad))


def test_random_flip_flips_width_about_half_the_time():
    x = _images(b=200, h=3, w=4, c=1)
    flip = jax.jit(data.random_flip)
    out = np.asarray(flip(jax.random.key(3), x))
    flipped = np.all(out == np.asarray(x)[:, :, ::-1], axis=(1, 2, 3))
    kept = np.all(out == np.asarray(x), axis=(1, 2, 3))
    assert np.all(flipped ^ kept)
    assert 60 < flipped.sum() < 140
    np.testing.assert_array_equal(out, flip(jax.random.key(3), x))


def test_augment_identity_when_off_and_jittable():
    x = _images()
    np.testing.assert_array_equal(data.augment(jax.random.key(0), x), x)
    f = jax.jit(lambda k, im: data.augment(k, im, crop_padding=1, flip=True))
    out = f(jax.random.key(5), x)
    assert out.shape == x.shape and out.dtype == x.dtype
    np.testing.assert_array_equal(out, f(jax.random.key(5), x))
    assert not np.array_equal(out, f(jax.random.key(6), x))
    assert float(jnp.min(out)) >= 0.0 and float(jnp.max(out)) <= 1.0


@pytest.mark.parametrize("n_dev", [2, 4])
def test_augment_under_pmap_is_one_devices_augment_of_the_global_batch(n_dev):
    """Each device takes its rows of the global batch's crop offsets and flips, so the
    images (and a run's result) do not depend on the device count."""
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(8, 6, 6, 3)), jnp.float32)
    key = jax.random.key(9)
    one = data.augment(key, x, crop_padding=2, flip=True)
    per_device = jax.pmap(
        lambda im: data.augment(key, im, crop_padding=2, flip=True, axis_name="d"),
        axis_name="d", devices=jax.devices()[:n_dev])(x.reshape(n_dev, -1, 6, 6, 3))
    np.testing.assert_array_equal(np.asarray(per_device).reshape(x.shape), one)


@pytest.mark.parametrize("kwargs, message", [
    ({"val_fraction": -0.1}, r"val_fraction must be in \[0, 1\), got -0.1"),
    ({"val_fraction": 1.0}, r"val_fraction must be in \[0, 1\), got 1.0"),
    ({"val_fraction": 0.9999}, "has no train examples"),
])
def test_load_dataset_refuses_splits_it_cannot_make(kwargs, message):
    with pytest.raises(data.DataError, match=message):
        data.load_dataset("digits", **kwargs)


@pytest.mark.parametrize("batch_size", [0, -1, 6])
def test_no_full_batch_is_a_data_error_not_a_zero_division(batch_size):
    with pytest.raises(data.DataError, match=f"a batch of {batch_size} needs"):
        data.steps_per_epoch(5, batch_size)
    with pytest.raises(data.DataError):
        data.batch_indices(0, 0, 5, batch_size)
