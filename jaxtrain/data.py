"""Data sources (host arrays) and pure transforms (split, order, batch, augment).

A split is ``{"image": float32[N, H, W, C] in [0, 1], "label": int32[N]}``.
Standardization lives in the model (``models.Standardize``) with statistics
computed here on the train split only, so every image the library passes
around stays in [0, 1] (what the robustness suite perturbs).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

Split = dict[str, np.ndarray]

# Fixed key for the held-out splits: they must not move with the run's seed.
_SPLIT_SEED = 0
TFDS_DATASETS = ("mnist", "fashion_mnist", "cifar10", "cifar100", "svhn_cropped")


class DataError(ValueError):
    """A dataset that cannot be loaded as asked (message is one line)."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Train / val / test splits plus what models need to know about them."""

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    mean: tuple[float, ...]  # per channel, train split only
    std: tuple[float, ...]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train["image"].shape[1:])  # type: ignore[return-value]


# ----------------------------------------------------------------------------- sources


def load_digits() -> tuple[Split, Split]:
    """scikit-learn's bundled 8x8 digits (1797 images), 20% held out as test."""
    from sklearn.datasets import load_digits as _load

    bunch = _load()
    images = (bunch.images.astype(np.float32) / 16.0)[..., None]
    labels = bunch.target.astype(np.int32)
    return _holdout({"image": images, "label": labels}, 0.2)


def load_synthetic(
    num_examples: int = 4096,
    image_shape: tuple[int, int, int] = (28, 28, 1),
    num_classes: int = 10,
    seed: int = 0,
) -> tuple[Split, Split]:
    """Learnable synthetic images: per-class smooth prototypes plus noise, in [0, 1].

    Built in float32 and in place: ``load_dataset("synthetic", synthetic_size=60000)``
    takes ~1.3 s in a fresh process where float64 temporaries took ~5.3 s (2-core CPU;
    py-spy put ~5 s of a 33 s 1-epoch MNIST-size run there)."""
    rng = np.random.default_rng(seed)
    h, w, c = image_shape
    coarse = rng.uniform(0, 1, (num_classes, max(h // 4, 1), max(w // 4, 1), c))
    protos = np.stack(
        [np.kron(p, np.ones((4, 4, 1)))[:h, :w] for p in coarse]
    )  # [K, h', w', C] -> padded below when h, w are not multiples of 4
    protos = np.pad(protos, ((0, 0), (0, h - protos.shape[1]), (0, w - protos.shape[2]), (0, 0)))
    labels = rng.integers(0, num_classes, num_examples).astype(np.int32)
    images = rng.standard_normal((num_examples, h, w, c), dtype=np.float32)
    images *= 0.25  # noise of std 0.25 around the class prototype
    images += protos.astype(np.float32)[labels]
    np.clip(images, 0, 1, out=images)
    return _holdout({"image": images, "label": labels}, 0.2)


def load_tfds(name: str, data_dir: str | None = None) -> tuple[Split, Split, int]:
    """A TFDS dataset's train and test splits and its class count via ``tfds.data_source``
    (array_record files, no TensorFlow).

    Never downloads: a dataset that is not prepared under ``data_dir`` raises
    ``DataError`` saying how to provide it.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:  # the GPU image has no TFDS
        raise DataError(
            f"dataset {name!r} needs tensorflow-datasets: pip install tensorflow-datasets"
        ) from e
    absl_logger = logging.getLogger("absl")  # TFDS warns about the missing folder on stderr
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        sources = tfds.data_source(name, split=["train", "test"], data_dir=data_dir, download=False)
    except Exception as e:  # noqa: BLE001  (TFDS raises several types for "not prepared")
        if type(e).__name__ == "DatasetNotFoundError":  # not a registered TFDS name
            raise DataError(
                f"unknown --dataset {name!r}: TFDS has no such dataset; choose digits, "
                f"synthetic or a TFDS name such as {', '.join(TFDS_DATASETS)}"
            ) from None
        where = data_dir or "the default TFDS data dir (~/tensorflow_datasets)"
        # files there (not just an empty folder, e.g. from a build that was interrupted)
        folder = os.path.join(data_dir or "", name)
        wrong_format = isinstance(e, NotImplementedError) and any(
            files for _, _, files in os.walk(folder))
        what = (
            "is prepared in a format tfds.data_source cannot read (it needs array_record)"
            if wrong_format
            else "is not prepared"
        )
        raise DataError(
            f"dataset {name!r} {what} in {where} and this machine cannot download it; run "
            f"`tfds build {name} --file_format=array_record --data_dir DIR` on a machine with "
            f"network and pass that DIR with --data-dir ({type(e).__name__})"
        ) from None
    finally:
        absl_logger.setLevel(level)
    train, test = (_records_to_split(name, src) for src in sources)
    try:
        num_classes = int(sources[0].dataset_info.features["label"].num_classes)
    except (AttributeError, KeyError, TypeError):  # no ClassLabel metadata
        num_classes = int(max(train["label"].max(), test["label"].max())) + 1
    return train, test, num_classes


def _records_to_split(name: str, source) -> Split:
    n = len(source)
    if n == 0:
        raise DataError(f"dataset {name!r} has an empty split {getattr(source, 'split', '')!r}")
    try:
        records = source.__getitems__(list(range(n)))  # batched read: fast on array_record
    except TypeError:
        # tfds.testing.mock_data (tfds 4.9) installs __getitems__ unbound; read one by one.
        records = [source[i] for i in range(n)]
    images = np.stack([np.asarray(r["image"]) for r in records])
    if images.ndim == 3:
        images = images[..., None]
    labels = np.asarray([r["label"] for r in records], np.int32)
    return {"image": (images.astype(np.float32) / 255.0), "label": labels}


def load_dataset(
    name: str,
    *,
    val_fraction: float = 0.1,
    data_dir: str | None = None,
    synthetic_size: int = 4096,
    synthetic_shape: tuple[int, int, int] = (28, 28, 1),
    synthetic_classes: int = 10,
) -> Dataset:
    """Loads ``name`` (``digits``, ``synthetic`` or a TFDS name) into a ``Dataset``.

    Raises ``DataError`` (one line) for a ``val_fraction`` outside [0, 1), and when the
    train or test split is empty (e.g. a synthetic size of 2, whose test split holds
    ``round(2 * 0.2) = 0`` examples)."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if name == "digits":
        train, test = load_digits()
        num_classes = 10
    elif name == "synthetic":
        train, test = load_synthetic(synthetic_size, tuple(synthetic_shape), synthetic_classes)
        num_classes = synthetic_classes
    else:
        train, test, num_classes = load_tfds(name, data_dir)
    for split_name, split in (("train", train), ("test", test)):
        check_split(split, num_classes, f"dataset {name!r} {split_name} split")
    if train["image"].shape[1:] != test["image"].shape[1:]:
        raise DataError(
            f"dataset {name!r}: train images are {train['image'].shape[1:]} but test images "
            f"are {test['image'].shape[1:]}"
        )
    train, val = _holdout(train, val_fraction)
    for split_name, split in (("train", train), ("test", test)):
        if len(split["label"]) == 0:
            raise DataError(f"dataset {name!r} has no {split_name} examples"
                            + (f" (--val-fraction {val_fraction} holds out all of them)"
                               if split_name == "train" else "")
                            + (" (--synthetic-size is too small)" if name == "synthetic" else ""))
    mean, std = channel_stats(train["image"])
    return Dataset(name, train, val, test, num_classes, mean, std)


def check_split(split: Split, num_classes: int, what: str = "split") -> None:
    """Raises ``DataError`` unless ``split`` holds float images ``[N, H, W, C]``, finite
    and in [0, 1], and integer labels ``[N]`` in ``[0, num_classes)``."""
    images, labels = np.asarray(split["image"]), np.asarray(split["label"])
    if images.ndim != 4 or min(images.shape[1:], default=0) < 1:
        raise DataError(f"{what}: images have shape {images.shape}, expected [N, H, W, C]")
    if labels.shape != images.shape[:1]:
        raise DataError(f"{what}: labels have shape {labels.shape}, expected [{len(images)}]")
    if not np.issubdtype(images.dtype, np.floating) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{what}: needs float images and integer labels, got {images.dtype} and {labels.dtype}"
        )
    if len(labels) and not (0 <= labels.min() and labels.max() < num_classes):
        raise DataError(
            f"{what}: labels must be in [0, {num_classes}), found {labels.min()}..{labels.max()}"
        )
    if images.size and not np.isfinite(images).all():
        raise DataError(f"{what}: {np.count_nonzero(~np.isfinite(images))} non-finite pixel values")
    if images.size and not (images.min() >= 0 and images.max() <= 1):
        raise DataError(
            f"{what}: pixel values must be in [0, 1], found {images.min():.4g}..{images.max():.4g}"
        )


# ----------------------------------------------------------------------------- transforms


def holdout_count(n: int, fraction: float) -> int:
    """Examples of ``n`` that ``fraction`` holds out (validation, or a synthetic test split)."""
    return round(n * fraction)


def _holdout(split: Split, fraction: float) -> tuple[Split, Split]:
    """Deterministic (seed-independent) split into ``1 - fraction`` and ``fraction``."""
    n = len(split["label"])
    n_out = holdout_count(n, fraction)
    perm = np.random.default_rng(_SPLIT_SEED).permutation(n)
    keep, out = np.sort(perm[n_out:]), np.sort(perm[:n_out])
    return take(split, keep), take(split, out)


def take(split: Split, idx: np.ndarray) -> Split:
    """Rows ``idx`` of every array in ``split``."""
    return {k: v[idx] for k, v in split.items()}


def channel_stats(images_NHWC: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std ``[C]`` (std floored at 1e-3 for constant channels)."""
    mean = images_NHWC.mean(axis=(0, 1, 2), dtype=np.float64)
    std = np.maximum(images_NHWC.std(axis=(0, 1, 2), dtype=np.float64), 1e-3)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


@functools.lru_cache(maxsize=256)  # called every step (per seed); one permutation per epoch
def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The permutation ``int32[n]`` of training examples for ``epoch``: a function of (seed, epoch).

    Read-only (cached): copy before modifying."""
    # uint32: seeds up to 2**32 - 1 are valid and would overflow a traced int32.
    order = np.asarray(_permutation(n)(np.uint32(seed), np.uint32(epoch))).astype(np.int32)
    order.setflags(write=False)
    return order


def _permutation_fn(seed, epoch, n: int) -> jax.Array:
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 0x0DA7A), epoch)
    return jax.random.permutation(key, n)


@functools.lru_cache(maxsize=64)
def _permutation(n: int):
    """``f(seed_u32, epoch_u32) -> int32[n]``, compiled once per ``n``.

    One compiled call (seed and epoch traced: no recompiling per epoch) instead of a
    few eager ops; the loop pays this once per epoch, ~30x cheaper, same values. On
    CPU it compiles without LLVM optimization (as ``program.run_once``): integer hashing
    and a sort give the same values either way, the compile is ~0.3 s shorter (the
    loop's first batch waits for it), and a call takes the same time (~1 ms for 1k
    examples, ~45 ms for 60k: the sort)."""
    lowered = jax.jit(_permutation_fn, static_argnums=2).lower(np.uint32(0), np.uint32(0), n)
    fast = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    return lowered.compile(fast)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Full training batches per epoch (the remainder reshuffles into the next epoch's order).
    Raises ``DataError`` when there is not one (``batch_size`` < 1 or > ``n``)."""
    if not 1 <= batch_size <= n:
        raise DataError(f"a batch of {batch_size} needs 1 <= batch size <= the {n} examples")
    return n // batch_size


def batch_indices(seed: int, step: int, n: int, batch_size: int) -> np.ndarray:
    """Example indices ``int32[B]`` of global training step ``step``: a pure function."""
    per_epoch = steps_per_epoch(n, batch_size)
    epoch, i = divmod(step, per_epoch)
    return epoch_order(seed, epoch, n)[i * batch_size : (i + 1) * batch_size]


def process_rows(batch_size: int, whole: bool = False) -> slice:
    """The rows of each global batch ``[B]`` this process feeds: its contiguous share
    ``[B / processes]`` (its devices hold their share of the batch), or all ``B`` with
    ``whole`` (seed-parallel: its devices hold whole models, which need whole batches)."""
    if whole:
        return slice(None)
    pid, nproc = jax.process_index(), jax.process_count()
    return slice(pid * batch_size // nproc, (pid + 1) * batch_size // nproc)


def eval_batches(split: Split, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Batches of ``batch_size`` covering every example once; the last one is
    padded (repeating example 0) with ``mask`` 0 on the padding."""
    n = len(split["label"])
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))
        mask = np.ones(batch_size, np.float32)
        if len(idx) < batch_size:
            mask[len(idx) :] = 0
            idx = np.concatenate([idx, np.zeros(batch_size - len(idx), idx.dtype)])
        yield {**take(split, idx), "mask": mask}


def num_eval_batches(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)


# ----------------------------------------------------------------------------- augmentation


def global_batch_rows(draw: Callable[[int], jnp.ndarray], b: int,
                          axis_name: str | None) -> jnp.ndarray:
    """``draw(b)``; under ``pmap`` (``axis_name``) this device's ``b`` rows of
    ``draw(devices * b)``, the draws one device would make for the global batch."""
    if axis_name is None:
        return draw(b)
    whole = draw(jax.lax.axis_size(axis_name) * b)
    return jax.lax.dynamic_slice_in_dim(whole, jax.lax.axis_index(axis_name) * b, b)


def random_crop(key: jax.Array, images_BHWC: jnp.ndarray, padding: int, *,
                axis_name: str | None = None) -> jnp.ndarray:
    """Pads each image by ``padding`` zeros and crops back at a keyed random offset
    (under ``pmap``, ``axis_name``: this device's rows of the global batch's offsets)."""
    b, h, w, c = images_BHWC.shape
    padded = jnp.pad(images_BHWC, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    offsets = global_batch_rows(
        lambda n: jax.random.randint(key, (n, 2), 0, 2 * padding + 1), b, axis_name)

    def crop(img, off):
        return jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, c))

    return jax.vmap(crop)(padded, offsets)


def random_flip(key: jax.Array, images_BHWC: jnp.ndarray, *,
                axis_name: str | None = None) -> jnp.ndarray:
    """Flips each image left-right with probability 1/2 (``axis_name``: as ``random_crop``)."""
    flip = global_batch_rows(lambda n: jax.random.bernoulli(key, 0.5, (n, 1, 1, 1)),
                                 images_BHWC.shape[0], axis_name)
    return jnp.where(flip, images_BHWC[:, :, ::-1], images_BHWC)


def augment(
    key: jax.Array, images_BHWC: jnp.ndarray, *, crop_padding: int = 0, flip: bool = False,
    axis_name: str | None = None,
) -> jnp.ndarray:
    """Keyed crop and/or flip; identity when both are off. Under ``pmap`` pass the
    device axis: each device takes its rows of the draws for the global batch, so the
    images are those one device would make, whatever the device count."""
    k_crop, k_flip = jax.random.split(key)
    if crop_padding:
        images_BHWC = random_crop(k_crop, images_BHWC, crop_padding, axis_name=axis_name)
    if flip:
        images_BHWC = random_flip(k_flip, images_BHWC, axis_name=axis_name)
    return images_BHWC
