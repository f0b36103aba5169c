"""The robustness suite as a few compiled programs: corruptions, attacks, stability.

A model is ``apply_fn(variables, images_BHWC) -> logits_BK`` and its variables
carry a leading seed axis ``[S, ...]`` (``S = 1`` for a single run). Every
program below is pure and vmapped over that axis, so all seeds are evaluated in
one program and every result is shaped ``[S, ...]``.

Programs (each compiled once, then run over fixed-size chunks of the test set):

- one per corruption group (``CORRUPTION_GROUPS``): for each corruption in the
  group, all selected severities x noise keys are ``jax.vmap``-ed
  (``perturb_by_param`` over stacked severity parameters); results are the
  additive ``metrics.calibration_stats`` sums per ``[seed, severity]``, summed
  over keys;
- ``host``: one per corruption with no JAX form (``HOST_CORRUPTIONS``: JPEG), applied
  to each chunk on the host before it is placed, then evaluated as image sets;
- ``clean``: calibration sums of the clean images, and the noise-sequence flip
  counts (frame ``t`` of ``flip_frames`` adds noise of ``t / (T-1)`` times the
  preset's severity-5 level; frame 0 is clean; each frame is compared with the
  first, ImageNet-P style);
- one per attack method: FGSM / PGD-Linf / PGD-L2 vmapped over the epsilon list;
  robustly correct counts per ``[seed, eps]``.

Randomness is a function of keys only, never of the chunking or device count.
With ``key = PRNGKey(spec.seed)``, ``id(name) = crc32(name) & 0x7FFFFFFF`` and
``i`` an example's index in the test split, example ``i`` draws

- corruption ``c``, noise key ``k``: ``fold_in(fold_in(fold_in(key, id(c)), k), i)``;
- flip frame ``t`` of noise ``c``: ``fold_in(fold_in(fold_in(fold_in(key, 0xF11B), id(c)), t), i)``;
- attack random start: ``fold_in(fold_in(fold_in(key, 0xA77A), id(method)), i)``.

The same draw is used at every
severity and every epsilon (common random numbers: differences between
severities come from the severity, not from a new draw) and for every seed
(seeds are paired). Deterministic corruptions (gaussian, defocus and zoom
blur, colour, pixelate) ignore keys and are evaluated once per severity whatever
``num_keys``; glass and motion blur draw offsets and angles, so they are random.

Chunks: the test set is cut into chunks of ``chunk_size`` examples (the last
one padded and masked), sized from a memory budget when not given
(``evaluator.auto_chunk_size``), a multiple of the number of devices; each chunk's batch is
sharded over the devices on its example axis like a training batch
(``jaxtrain.parallel``), and the sums are added on the host in float64 / int64.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxtrain.robustness import jpeg
from jaxtrain.robustness.attacks import ATTACK_DEFAULTS, AttackSpec, robust_correct, run_attack
from jaxtrain.robustness.evaluator import Evaluator, ProgramRun, RobustnessError
from jaxtrain.robustness.metrics import DEFAULT_NUM_BINS, calibration_stats
from jaxtrain.robustness.perturbations import (
    CORRUPTIONS,
    SEVERITIES,
    corruption_params,
    param_array,
    perturb_by_param,
)

PyTree = Any
ApplyFn = Callable[[PyTree, jax.Array], jax.Array]

# Corruptions whose output depends on the key; the others are evaluated once per severity.
RANDOM_CORRUPTIONS = frozenset({
    "gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "glass_blur",
    "motion_blur", "fog", "snow", "elastic_transform", "rotation", "translation", "occlusion",
})
# One compiled program per group (a log line each); grouped by family.
CORRUPTION_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("noise", ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise")),
    ("blur", ("gaussian_blur", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur")),
    ("digital", ("brightness", "contrast", "saturate", "pixelate", "fog", "snow")),
    ("geometric", ("elastic_transform", "rotation", "translation", "occlusion")),
    ("host", ("jpeg_compression",)),
)
# Corruptions computed on the host (no JAX form): each chunk's images are corrupted at
# every selected severity before they go to the devices, then evaluated as image sets
# (``image_sets_program``), as the published CIFAR-10-C images are. One program each.
HOST_CORRUPTIONS: Mapping[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "jpeg_compression": lambda images, params_VP: jpeg.image_sets(images, params_VP[:, 0]),
}
assert sorted(n for _, g in CORRUPTION_GROUPS for n in g) == sorted(CORRUPTIONS)
# Noise sequences: parameter 0 is the clean image and grows with the noise.
FLIP_NOISES = ("gaussian_noise", "speckle_noise", "impulse_noise")
ATTACK_METHODS = ("fgsm", "pgd_linf", "pgd_l2")
ATTACK_NORMS = {"fgsm": "linf", "pgd_linf": "linf", "pgd_l2": "l2"}
_FLIP_TAG, _ATTACK_TAG = 0xF11B, 0xA77A


# ----------------------------------------------------------------------------- attack presets


@dataclasses.dataclass(frozen=True)
class AttackPreset:
    """Epsilon lists, step counts and step sizes (``alpha = ratio * eps``) per norm."""

    linf_eps: tuple[float, ...]
    l2_eps: tuple[float, ...]
    linf_steps: int
    l2_steps: int
    linf_alpha_ratio: float
    l2_alpha_ratio: float


def _ratio(spec: AttackSpec) -> float:
    return spec.alpha / spec.eps


_MNIST, _CIFAR = ATTACK_DEFAULTS["mnist"]["linf"], ATTACK_DEFAULTS["cifar"]
# mnist / cifar: the eps lists bracket ATTACK_DEFAULTS' budgets (MNIST Linf 0.3; CIFAR Linf
# 8/255, L2 0.5), whose steps and alpha/eps they reuse (so at that eps the attack *is* the
# default); L2 step sizes elsewhere follow Madry's 2.5 * eps / steps.
# digits (8x8, 64 pixels on a 1/16 grid): Linf budgets are per pixel, so MNIST's range
# up to 0.3 is kept; L2 norms scale with sqrt(pixels), so MNIST's L2 budget of 2.0 over
# 784 pixels is ~0.57 here: the list spans 0.25..2.0 (2.4 is the corner of the 0.3
# Linf ball). 10 steps of 2.5 * eps / 10 suffice for an 8x8 MLP (it saturates before).
ATTACK_PRESETS: Mapping[str, AttackPreset] = {
    "digits": AttackPreset((0.025, 0.05, 0.1, 0.2, 0.3), (0.25, 0.5, 1.0, 1.5, 2.0),
                           10, 10, 0.25, 0.25),
    "mnist": AttackPreset((0.05, 0.1, 0.2, 0.3, 0.4), (0.5, 1.0, 1.5, 2.0, 3.0),
                          _MNIST.steps, _MNIST.steps, _ratio(_MNIST), 2.5 / _MNIST.steps),
    "cifar": AttackPreset(tuple(e / 255 for e in (1, 2, 4, 8, 16)), (0.125, 0.25, 0.5, 1.0),
                          _CIFAR["linf"].steps, _CIFAR["l2"].steps,
                          _ratio(_CIFAR["linf"]), _ratio(_CIFAR["l2"])),
    "imagenet": AttackPreset(tuple(e / 255 for e in (1, 2, 4, 8)), (0.5, 1.0, 2.0, 3.0),
                             10, 10, 0.25, 0.25),
}
_MNIST_LIKE = ("mnist", "fashion_mnist", "kmnist", "emnist", "binarized_mnist")


def attack_preset_for(dataset: str, image_shape: Sequence[int]) -> str:
    """``digits`` for digits; ``mnist`` for MNIST-like data (28x28x1); ``imagenet`` from
    64 px up; else ``cifar``."""
    if dataset == "digits":
        return "digits"
    if dataset.split("/")[0].split(":")[0] in _MNIST_LIKE or tuple(image_shape) == (28, 28, 1):
        return "mnist"
    return "imagenet" if max(image_shape[:2]) >= 64 else "cifar"


def corruption_preset_for(image_shape: Sequence[int]) -> str:
    """``imagenet`` parameters from 64 px up, else ``cifar`` (ROBUSTNESS.md presets)."""
    return "imagenet" if max(image_shape[:2]) >= 64 else "cifar"


@dataclasses.dataclass(frozen=True)
class AttackSetting:
    """One attack of the suite swept over ``eps`` (alpha = ``alpha_ratio * eps``)."""

    method: str
    eps: tuple[float, ...]
    steps: int = 0
    alpha_ratio: float = 0.0

    @property
    def norm(self) -> str:
        return ATTACK_NORMS[self.method]

    @property
    def alphas(self) -> tuple[float, ...]:
        return tuple(self.alpha_ratio * e for e in self.eps)


def attack_settings(
    methods: Sequence[str], preset: str, *, linf_eps: Sequence[float] = (),
    l2_eps: Sequence[float] = (), steps: int = 0,
) -> tuple[AttackSetting, ...]:
    """The suite's attacks: ``methods`` with ``preset``'s budgets unless given."""
    if preset not in ATTACK_PRESETS:
        raise RobustnessError(f"unknown attack preset {preset!r}; choose one of "
                              f"{', '.join(ATTACK_PRESETS)}")
    p = ATTACK_PRESETS[preset]
    out = []
    for m in methods:
        if m not in ATTACK_METHODS:
            raise RobustnessError(f"unknown attack {m!r}; choose from {', '.join(ATTACK_METHODS)}")
        linf = ATTACK_NORMS[m] == "linf"
        eps = tuple(float(e) for e in ((linf_eps or p.linf_eps) if linf else (l2_eps or p.l2_eps)))
        n = steps or (p.linf_steps if linf else p.l2_steps)
        ratio = p.linf_alpha_ratio if linf else p.l2_alpha_ratio
        if steps and steps != (p.linf_steps if linf else p.l2_steps):
            ratio = 2.5 / steps  # Madry's rule for a step count of the user's
        out.append(AttackSetting(m, eps, 0 if m == "fgsm" else n, 0.0 if m == "fgsm" else ratio))
    return tuple(out)


# ----------------------------------------------------------------------------- the spec


@dataclasses.dataclass(frozen=True)
class SuiteSpec:
    """What the suite evaluates. ``chunk_size`` 0 sizes chunks from ``memory_budget_bytes``
    (0: ``evaluator.default_memory_budget``)."""

    corruptions: tuple[str, ...] = CORRUPTIONS
    severities: tuple[int, ...] = SEVERITIES
    num_keys: int = 1
    preset: str = "cifar"
    attacks: tuple[AttackSetting, ...] = ()
    flip_noises: tuple[str, ...] = ("gaussian_noise",)
    flip_frames: int = 10
    seed: int = 0
    chunk_size: int = 0
    memory_budget_bytes: int = 0
    num_bins: int = DEFAULT_NUM_BINS

    def validate(self) -> SuiteSpec:
        bad = [c for c in self.corruptions if c not in CORRUPTIONS]
        if bad:
            raise RobustnessError(f"unknown corruption {bad[0]!r}; choose from {', '.join(CORRUPTIONS)}")
        if len(set(self.corruptions)) != len(self.corruptions):
            raise RobustnessError(f"corruptions listed twice: {list(self.corruptions)}")
        if not self.severities or any(s not in SEVERITIES for s in self.severities) or (
                len(set(self.severities)) != len(self.severities)):
            raise RobustnessError(f"severities must be distinct values in 1..5, got {list(self.severities)}")
        if self.num_keys < 1:
            raise RobustnessError(f"num_keys must be >= 1, got {self.num_keys}")
        if self.preset not in ("cifar", "imagenet"):
            raise RobustnessError(f"preset must be cifar or imagenet, got {self.preset!r}")
        for name in self.flip_noises:
            if name not in FLIP_NOISES:
                raise RobustnessError(f"flip noise {name!r} not supported; choose from {', '.join(FLIP_NOISES)}")
        if self.flip_noises and self.flip_frames < 2:
            raise RobustnessError(f"flip_frames must be >= 2, got {self.flip_frames}")
        for a in self.attacks:
            if a.method not in ATTACK_METHODS:
                raise RobustnessError(f"unknown attack {a.method!r}")
            if not a.eps or any(not (math.isfinite(e) and e > 0) for e in a.eps):
                raise RobustnessError(f"{a.method}: eps must be finite and > 0, got {list(a.eps)}")
            if a.method != "fgsm" and a.steps < 1:
                raise RobustnessError(f"{a.method}: steps must be >= 1, got {a.steps}")
        if self.chunk_size < 0 or self.memory_budget_bytes < 0:
            raise RobustnessError("chunk_size and memory_budget_bytes must be >= 0")
        return self

    def groups(self) -> list[tuple[str, tuple[str, ...]]]:
        """The selected corruptions by group, in ``CORRUPTION_GROUPS`` order."""
        chosen = set(self.corruptions)
        out = [(g, tuple(n for n in names if n in chosen)) for g, names in CORRUPTION_GROUPS]
        return [(g, names) for g, names in out if names]

    def keys_for(self, name: str) -> int:
        return self.num_keys if name in RANDOM_CORRUPTIONS else 1

    def severity_params(self, name: str) -> np.ndarray:
        """Encoded parameters ``f32[V, P]`` of the selected severities."""
        return np.stack([param_array(name, corruption_params(name, s, self.preset))
                         for s in self.severities])

    def flip_levels(self, name: str) -> np.ndarray:
        """Noise parameter of each frame ``f32[T]``: 0 (clean) up to the severity-5 value."""
        top = corruption_params(name, 5, self.preset)[0]
        return np.linspace(0.0, top, self.flip_frames).astype(np.float32)


# ----------------------------------------------------------------------------- keys


def name_id(name: str) -> int:
    """A stable 31-bit id of a corruption or attack name (folded into keys)."""
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def example_keys(key: jax.Array, index_B: jax.Array) -> jax.Array:
    """Per-example keys ``[B, 2]``: ``fold_in(key, i)`` for each global example index."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(index_B)


def corruption_key(key: jax.Array, name: str, k: int | jax.Array) -> jax.Array:
    """Key of noise draw ``k`` of corruption ``name`` (per example: ``example_keys``)."""
    return jax.random.fold_in(jax.random.fold_in(key, name_id(name)), k)


def _corrupt(name: str, param_P: jax.Array, images_BHWC: jax.Array, key: jax.Array,
             index_B: jax.Array) -> jax.Array:
    """``name`` at encoded ``param_P``; random ones draw per example from ``key`` and the index."""
    if name not in RANDOM_CORRUPTIONS:  # per-image and key-free: the batch at once
        return perturb_by_param(images_BHWC, name, param_P, key)
    one = lambda x, k: perturb_by_param(x[None], name, param_P, k)[0]
    return jax.vmap(one)(images_BHWC, example_keys(key, index_B))


def _psum(tree: PyTree, axis_name: str | None) -> PyTree:
    return tree if axis_name is None else lax.psum(tree, axis_name)


# ----------------------------------------------------------------------------- programs
#
# Every program is ``program(variables_S, batch, *, axis_name=None) -> sums`` with
# ``batch = {"image": f32[B, H, W, C], "label": i32[B], "mask": f32[B], "index": i32[B]}``;
# sums add across chunks and devices.


def corruption_program(apply_fn: ApplyFn, spec: SuiteSpec, names: Sequence[str],
                       key: jax.Array) -> Callable[..., PyTree]:
    """Calibration sums ``{name: {stat: [S, V, ...]}}`` of every corruption in ``names`` at
    every selected severity, summed over the noise keys."""
    params = {n: spec.severity_params(n) for n in names}
    num_bins = spec.num_bins

    def program(variables_S, batch, *, axis_name=None):
        out = {name: _corruption_stats(apply_fn, variables_S, batch, name, params[name],
                                       spec.keys_for(name), key, num_bins) for name in names}
        return _psum(out, axis_name)

    return program


def _corruption_stats(apply_fn: ApplyFn, variables_S: PyTree, batch: Mapping[str, jax.Array],
                      name: str, params_VP: np.ndarray, num_keys: int, key: jax.Array,
                      num_bins: int) -> PyTree:
    """Calibration sums ``[S, V, ...]`` of one corruption at ``V`` severities, summed over keys."""
    images, labels, mask, index = batch["image"], batch["label"], batch["mask"], batch["index"]
    v, k = params_VP.shape[0], num_keys
    keys_K = jax.vmap(lambda i: corruption_key(key, name, i))(jnp.arange(k))

    def per_param(p):
        return jax.vmap(lambda kk: _corrupt(name, p, images, kk, index))(keys_K)

    x_CBHWC = jax.vmap(per_param)(jnp.asarray(params_VP)).reshape((v * k, *images.shape))

    def stats_of(variables):
        return jax.vmap(lambda x: calibration_stats(
            apply_fn(variables, x), labels, num_bins, mask=mask))(x_CBHWC)

    stats = jax.vmap(stats_of)(variables_S)  # leaves [S, V * K, ...]
    return jax.tree.map(lambda a: a.reshape((a.shape[0], v, k, *a.shape[2:])).sum(axis=2), stats)


def clean_program(apply_fn: ApplyFn, spec: SuiteSpec, key: jax.Array) -> Callable[..., PyTree]:
    """``{"clean": calibration sums [S, ...], "flip": {name: {"flips": i32[S, T-1],
    "count": i32[]}}}``: flips count examples whose frame-``t`` prediction differs
    from frame 0."""
    levels = {n: spec.flip_levels(n) for n in spec.flip_noises}
    num_bins = spec.num_bins

    def program(variables_S, batch, *, axis_name=None):
        images, labels, mask, index = batch["image"], batch["label"], batch["mask"], batch["index"]
        valid = mask.astype(bool)
        clean = jax.vmap(lambda v: calibration_stats(apply_fn(v, images), labels, num_bins,
                                                     mask=mask))(variables_S)
        flips = {name: _flip_counts(apply_fn, variables_S, images, valid, index, name,
                                    levels_T, key) for name, levels_T in levels.items()}
        return _psum({"clean": clean, "flip": flips}, axis_name)

    return program


def _flip_counts(apply_fn: ApplyFn, variables_S: PyTree, images: jax.Array, valid: jax.Array,
                 index: jax.Array, name: str, levels_T: np.ndarray, key: jax.Array) -> PyTree:
    """Examples whose prediction at frame ``t >= 1`` differs from frame 0: ``i32[S, T-1]``."""
    base = jax.random.fold_in(jax.random.fold_in(key, _FLIP_TAG), name_id(name))
    keys_T = jax.vmap(lambda t: jax.random.fold_in(base, t))(jnp.arange(len(levels_T)))
    x_TBHWC = jax.vmap(lambda c, k: _corrupt(name, c[None], images, k, index))(
        jnp.asarray(levels_T), keys_T)

    def preds_of(variables):
        return jax.vmap(lambda x: jnp.argmax(apply_fn(variables, x), axis=-1))(x_TBHWC)

    preds_STB = jax.vmap(preds_of)(variables_S)
    changed = (preds_STB[:, 1:] != preds_STB[:, :1]) & valid[None, None, :]
    return {"flips": jnp.sum(changed, axis=-1, dtype=jnp.int32),
            "count": jnp.sum(valid, dtype=jnp.int32)}


def attack_program(apply_fn: ApplyFn, attack: AttackSetting,
                   key: jax.Array) -> Callable[..., PyTree]:
    """``{"correct": i32[S, E], "count": i32[]}``: examples correct on the clean image
    and on its adversarial version, for each epsilon of ``attack``. Each example is
    attacked on its own (its own random start), so results do not depend on chunking."""
    eps_E = np.asarray(attack.eps, np.float32)
    alpha_E = np.asarray(attack.alphas, np.float32)

    def program(variables_S, batch, *, axis_name=None):
        images, labels, mask, index = batch["image"], batch["label"], batch["mask"], batch["index"]
        valid = mask.astype(bool)
        keys_B = example_keys(jax.random.fold_in(jax.random.fold_in(key, _ATTACK_TAG),
                                                 name_id(attack.method)), index)

        def correct_of(variables):
            logits_fn = functools.partial(apply_fn, variables)

            def at(eps, alpha):
                spec = AttackSpec(attack.method, eps=eps, alpha=alpha, steps=attack.steps)
                one = lambda x, y, k: run_attack(logits_fn, x[None], y[None], spec, key=k)[0]
                adv = jax.vmap(one)(images, labels, keys_B)
                ok = robust_correct(logits_fn, images, labels, adv) & valid
                return jnp.sum(ok, dtype=jnp.int32)

            return jax.vmap(at)(jnp.asarray(eps_E), jnp.asarray(alpha_E))

        out = {"correct": jax.vmap(correct_of)(variables_S),
               "count": jnp.sum(valid, dtype=jnp.int32)}
        return _psum(out, axis_name)

    return program


def corruption_programs(apply_fn: ApplyFn, spec: SuiteSpec, key: jax.Array
                        ) -> list[tuple[str, tuple[str, ...], Callable[..., PyTree],
                                        Callable[[dict], dict] | None]]:
    """``(group, names, program, transform)`` for the selected corruptions: one program per
    group (``corruption_program``), and one per host corruption (``image_sets_program`` on
    chunks that ``transform`` corrupted on the host). Every program's sums are
    ``{name: [S, V] sums}``."""
    out = []
    for group, names in spec.groups():
        if group != "host":
            out.append((group, names, corruption_program(apply_fn, spec, names, key), None))
            continue
        for name in names:
            sets = image_sets_program(apply_fn, spec.num_bins)
            program = (lambda v, b, *, axis_name=None, name=name, sets=sets:
                       {name: sets(v, b, axis_name=axis_name)})
            out.append((group, (name,), program, host_sets(name, spec.severity_params(name))))
    return out


def host_sets(name: str, params_VP: np.ndarray) -> Callable[[dict], dict]:
    """A chunk ``{"image": f32[B, H, W, C], "label": i32[B], ...}`` -> the same chunk with
    ``name`` applied on the host at each of ``V`` encoded parameters: ``image`` becomes
    ``[B, V, H, W, C]`` and ``label`` ``[B, V]`` (``image_sets_program``'s input)."""
    corrupt, v = HOST_CORRUPTIONS[name], len(params_VP)

    def transform(batch: dict) -> dict:
        labels = np.repeat(np.asarray(batch["label"])[:, None], v, axis=1)
        return {**batch, "image": corrupt(np.asarray(batch["image"]), params_VP), "label": labels}

    return transform


def image_sets_program(apply_fn: ApplyFn, num_bins: int = DEFAULT_NUM_BINS) -> Callable[..., PyTree]:
    """Calibration sums ``[S, V]`` of ``V`` given image sets of the same examples (e.g. the
    five severities of a published corruption): ``batch["image"]`` is ``u8[B, V, H, W, C]``
    (scaled by 1/255 here) or float in [0, 1], ``batch["label"]`` is ``i32[B, V]``."""

    def program(variables_S, batch, *, axis_name=None):
        images, labels, mask = batch["image"], batch["label"], batch["mask"]
        if images.dtype == jnp.uint8:
            images = images.astype(jnp.float32) / 255.0
        x_VB = jnp.swapaxes(images, 0, 1)
        y_VB = jnp.swapaxes(labels, 0, 1)

        def stats_of(variables):
            return jax.vmap(lambda x, y: calibration_stats(
                apply_fn(variables, x), y, num_bins, mask=mask))(x_VB, y_VB)

        return _psum(jax.vmap(stats_of)(variables_S), axis_name)

    return program


# ----------------------------------------------------------------------------- the suite


@dataclasses.dataclass
class SuiteResult:
    """Host sums of the whole suite; leading axis of every array: seeds.

    ``clean``: calibration sums ``[S]`` (bins ``[S, num_bins]``);
    ``corruptions[name]``: sums ``[S, V]`` (bins ``[S, V, num_bins]``), summed over keys;
    ``flips[name]``: ``{"flips": [S, T-1], "count": int, "levels": [T]}``;
    ``attacks[method]``: ``{"correct": [S, E], "count": int}``.
    """

    spec: SuiteSpec
    num_examples: int
    num_seeds: int
    clean: dict[str, np.ndarray]
    corruptions: dict[str, dict[str, np.ndarray]]
    flips: dict[str, dict[str, Any]]
    attacks: dict[str, dict[str, Any]]
    runs: list[ProgramRun]

    def timing(self) -> list[dict[str, Any]]:
        return [{"program": r.name, "seconds": r.seconds, "compile_seconds": r.compile_seconds,
                 "chunk_size": r.chunk_size,
                 "num_chunks": r.num_chunks, "bytes_per_example_bound": r.bytes_per_example}
                for r in self.runs]


def finalize(stats: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``metrics.finalize_calibration`` over any leading axes, in float64 on the host:
    ``accuracy``, ``error``, ``nll``, ``brier``, ``ece`` shaped like ``stats["count"]``."""
    count = np.asarray(stats["count"], np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        gap = np.asarray(stats["bin_correct"], np.float64) - np.asarray(stats["bin_conf_sum"])
        acc = np.asarray(stats["correct"], np.float64) / count
        return {
            "accuracy": acc,
            "error": 1.0 - acc,
            "nll": np.asarray(stats["nll_sum"], np.float64) / count,
            "brier": np.asarray(stats["brier_sum"], np.float64) / count,
            "ece": np.abs(gap).sum(axis=-1) / count,
        }


def _seed_axis(variables_S: PyTree) -> int:
    sizes = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree.leaves(variables_S)}
    if len(sizes) != 1 or None in sizes:
        raise RobustnessError(f"variables need one leading seed axis on every leaf; got sizes {sizes}")
    return sizes.pop()


def evaluate_suite(
    apply_fn: ApplyFn,
    variables_S: PyTree,
    split: Mapping[str, np.ndarray],
    spec: SuiteSpec,
    *,
    strategy: Any = None,
    log: Callable[[str], None] | None = None,
    programs: Iterable[str] | None = None,
    fast_compile: bool | None = None,
) -> SuiteResult:
    """Evaluates ``spec`` on ``split = {"image": f32[N, H, W, C] in [0, 1], "label": i32[N]}``.

    ``apply_fn(variables, images) -> logits`` is one model; ``variables_S`` are host
    arrays with a leading seed axis (add one of size 1 for a single model). Runs one
    compiled program per corruption group, one for clean + flips, one per attack.
    ``programs`` restricts which ones run (names ``clean``, a group name, an attack).
    """
    spec = spec.validate()
    num_seeds = _seed_axis(variables_S)
    key = jax.random.PRNGKey(spec.seed)
    ev = Evaluator(variables_S, {"image": split["image"], "label": split["label"]},
                   strategy=strategy, chunk_size=spec.chunk_size,
                   memory_budget_bytes=spec.memory_budget_bytes, log=log,
                   fast_compile=fast_compile)
    wanted = None if programs is None else set(programs)
    runs: list[ProgramRun] = []

    def go(name: str, program: Callable[..., PyTree], what: str = "",
           transform: Callable[[dict], dict] | None = None) -> PyTree | None:
        if wanted is not None and name not in wanted:
            return None
        if log is not None:
            log(f"robustness: {name}{what} on {num_seeds} seed(s) ...")
        run = ev.run(name, program, transform=transform)
        runs.append(run)
        return run.sums

    clean = go("clean", clean_program(apply_fn, spec, key)) or {"clean": {}, "flip": {}}
    flips = {n: {**f, "count": int(f["count"]), "levels": spec.flip_levels(n)}
             for n, f in clean["flip"].items()}
    corruptions: dict[str, dict[str, np.ndarray]] = {}
    for group, names, program, transform in corruption_programs(apply_fn, spec, key):
        what = f" ({', '.join(names)} x {len(spec.severities)} severities)"
        sums = go(group, program, what, transform)
        if sums is not None:
            corruptions.update(sums)
    attacks = {}
    for a in spec.attacks:
        sums = go(a.method, attack_program(apply_fn, a, key), f" (eps {list(a.eps)})")
        if sums is not None:
            attacks[a.method] = {"correct": sums["correct"], "count": int(sums["count"])}
    corruptions = {n: corruptions[n] for n in spec.corruptions if n in corruptions}
    return SuiteResult(spec, ev.num_examples, num_seeds, clean["clean"], corruptions, flips,
                       attacks, runs)


def run_robustness(workdir: str, config: Any = None, **overrides: Any) -> dict[str, Any]:
    """Evaluates the trained run in ``workdir`` and writes ``workdir/robustness/``
    (see ``jaxtrain.robustness.runner.run_robustness``). Returns the headline figures."""
    from jaxtrain.robustness.runner import run_robustness as run

    return run(workdir, config, **overrides)
