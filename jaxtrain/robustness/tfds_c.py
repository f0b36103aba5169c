"""The benchmark of record: TFDS ``cifar10_corrupted`` (CIFAR-10-C), read with
``tfds.data_source`` (array_record files, no TensorFlow), never downloaded.

Each TFDS config ``cifar10_corrupted/<name>_<severity>`` holds the 10,000 CIFAR-10
test images with that corruption. The five severities of a corruption are stacked
``u8[N, V, 32, 32, 3]`` and evaluated by one compiled program
(``suite.image_sets_program``), chunked over the examples and sharded over devices
like the in-memory suite; results are calibration sums ``[S, V]`` per corruption.

TFDS is imported lazily: without it, or without the prepared data, a
``RobustnessError`` says in one line what to install or build.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from jaxtrain.robustness.evaluator import Evaluator, RobustnessError
from jaxtrain.robustness.suite import ApplyFn, image_sets_program

DATASET = "cifar10_corrupted"
# The 19 corruptions of TFDS cifar10_corrupted (frosted_glass_blur is the paper's glass blur,
# elastic its elastic transform).
CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise",
    "defocus_blur", "frosted_glass_blur", "motion_blur", "zoom_blur", "gaussian_blur",
    "snow", "frost", "fog", "brightness", "spatter",
    "contrast", "elastic", "pixelate", "jpeg_compression", "saturate",
)
# The 15 corruptions of mCE (ROBUSTNESS.md); the other 4 are the extra ones.
MCE_CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "frosted_glass_blur",
    "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic",
    "pixelate", "jpeg_compression",
)
IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 10


def config_name(name: str, severity: int) -> str:
    """``cifar10_corrupted/<name>_<severity>``, the TFDS config of one condition."""
    return f"{DATASET}/{name}_{severity}"


def check_corruptions(names: Sequence[str]) -> tuple[str, ...]:
    bad = [n for n in names if n not in CORRUPTIONS]
    if bad:
        raise RobustnessError(f"unknown {DATASET} corruption {bad[0]!r}; choose from "
                              f"{', '.join(CORRUPTIONS)}")
    return tuple(names)


def _tfds() -> Any:
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise RobustnessError(f"{DATASET} needs tensorflow-datasets: pip install "
                              "tensorflow-datasets (and the prepared dataset)") from None
    return tfds


def _source(tfds: Any, name: str, data_dir: str | None) -> Any:
    absl_logger = logging.getLogger("absl")  # TFDS warns about missing folders on stderr
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        return tfds.data_source(name, split="test", data_dir=data_dir, download=False)
    except Exception as e:  # noqa: BLE001 (TFDS raises several types for "not prepared")
        where = data_dir or "the default TFDS data dir (~/tensorflow_datasets)"
        raise RobustnessError(
            f"{name} is not prepared in {where} and this machine cannot download it; run "
            f"`tfds build {DATASET} --file_format=array_record --data_dir DIR` on a machine "
            f"with network and pass that DIR with --data-dir ({type(e).__name__})"
        ) from None
    finally:
        absl_logger.setLevel(level)


def check_prepared(corruptions: Sequence[str] = CORRUPTIONS,
                   severities: Sequence[int] = (1, 2, 3, 4, 5), *,
                   data_dir: str | None = None) -> None:
    """Raises ``RobustnessError`` (one line) unless every config is prepared: opens each
    source (no examples read), so a missing one is reported before hours of evaluation."""
    tfds = _tfds()
    for name in check_corruptions(corruptions):
        for s in severities:
            _source(tfds, config_name(name, s), data_dir)


def _read(source: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        records = source.__getitems__(list(range(n)))  # batched read: fast on array_record
    except TypeError:  # tfds.testing.mock_data installs __getitems__ unbound
        records = [source[i] for i in range(n)]
    images = np.stack([np.asarray(r["image"], np.uint8) for r in records])
    labels = np.asarray([r["label"] for r in records], np.int32)
    return images, labels


def load_cifar10_corrupted(
    name: str, severities: Sequence[int] = (1, 2, 3, 4, 5), *, data_dir: str | None = None,
    max_examples: int = 0,
) -> dict[str, np.ndarray]:
    """The test images of ``name`` at ``severities``, stacked on axis 1:
    ``{"image": u8[N, V, 32, 32, 3], "label": i32[N, V]}`` (the first ``max_examples``
    when > 0)."""
    check_corruptions([name])
    tfds = _tfds()
    images, labels = [], []
    for s in severities:
        src = _source(tfds, config_name(name, s), data_dir)
        n = len(src) if not max_examples else min(len(src), max_examples)
        if n == 0:
            raise RobustnessError(f"{config_name(name, s)} has an empty test split")
        x, y = _read(src, n)
        if x.shape[1:] != IMAGE_SHAPE:
            raise RobustnessError(f"{config_name(name, s)}: images are {x.shape[1:]}, "
                                  f"expected {IMAGE_SHAPE}")
        images.append(x)
        labels.append(y)
    if len({len(y) for y in labels}) != 1:
        raise RobustnessError(f"{DATASET}/{name}: severities hold different numbers of examples "
                              f"{[len(y) for y in labels]}")
    return {"image": np.stack(images, axis=1), "label": np.stack(labels, axis=1)}


def evaluate_cifar10_corrupted(
    apply_fn: ApplyFn,
    variables_S: Any,
    *,
    corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    data_dir: str | None = None,
    max_examples: int = 0,
    strategy: Any = None,
    chunk_size: int = 0,
    memory_budget_bytes: int = 0,
    fast_compile: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Mapping[str, np.ndarray]]:
    """Calibration sums ``{name: {stat: [S, V, ...]}}`` of a model (``variables_S`` with a
    leading seed axis) on the published CIFAR-10-C images. One program for all
    corruptions, compiled once (``fast_compile``: with ``FAST_COMPILE``; default off);
    loads one corruption (its severities) at a time."""
    corruptions = check_corruptions(corruptions)
    _tfds()  # fail before anything is placed
    # Optimized unless asked: its one program compiles in about a second either way, and
    # FAST_COMPILE ran it 1.1-5.3x slower (``python -m benchmarks.suite_compile --cases
    # sets:...``, 2 cores, 3 corruptions x 5 severities, total s: a CNN on 100 images 1.34
    # against 0.96, on 2000 images 15.2 against 3.65; ResNet-18 on 100: 11.5 against 10.3).
    ev = Evaluator(variables_S, strategy=strategy, chunk_size=chunk_size,
                   memory_budget_bytes=memory_budget_bytes, log=log,
                   fast_compile=bool(fast_compile))
    program = image_sets_program(apply_fn)
    out = {}
    for name in corruptions:
        arrays = load_cifar10_corrupted(name, severities, data_dir=data_dir,
                                        max_examples=max_examples)
        if log is not None:
            log(f"robustness: {DATASET}/{name} ({len(arrays['label'])} examples x "
                f"{len(severities)} severities) ...")
        out[name] = ev.run(f"{DATASET}/{name}", program, arrays).sums
    return out
