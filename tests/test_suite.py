"""The batched robustness suite against independent per-condition loops.

- every (seed, corruption, severity, key) condition, the noise-sequence flips and the
  attacks of ``evaluate_suite`` equal a Python loop over conditions and seeds that
  calls ``perturb`` / ``fgsm`` / ``pgd_linf`` and numpy metrics;
- chunked (auto-sized from a small memory budget, padded last chunk, 8-device mesh)
  equals unchunked on one device;
- all seeds in one program equal each seed evaluated alone;
- (error growing with severity on a trained model: tests/test_robustness_e2e.py);
- ``cifar10_corrupted`` through ``tfds.data_source`` under ``tfds.testing.mock_data``.

Models are tiny (one hidden layer of 32) and the test data small, so each program
compiles in about a second.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtrain.data import load_dataset
from jaxtrain.models import create_model
from jaxtrain.parallel import create_strategy
from jaxtrain.robustness import evaluator as E
from jaxtrain.robustness import metrics as M
from jaxtrain.robustness import suite as S
from jaxtrain.robustness.attacks import ATTACK_DEFAULTS, fgsm, pgd_linf
from jaxtrain.robustness.perturbations import CORRUPTIONS, perturb, perturb_by_param

NUM_EXAMPLES = 20  # not a multiple of 8: the last chunk is padded


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def tiny(digits):
    """A random tiny MLP (3 seeds stacked) and the first test examples."""
    model = create_model("mlp", 10, mean=digits.mean, std=digits.std, hidden=(32,))
    keys = jax.random.split(jax.random.PRNGKey(7), 3)
    variables = jax.tree.map(np.asarray, jax.jit(jax.vmap(
        lambda k: model.init(k, jnp.zeros((1, 8, 8, 1)))))(keys))
    split = {k: v[:NUM_EXAMPLES] for k, v in digits.test.items()}
    return model, variables, split


def _apply(model):
    return lambda v, x: model.apply(v, x, train=False)


def _seed(variables, i):
    return jax.tree.map(lambda x: x[i : i + 1], variables)


# ----------------------------------------------------------------------------- reference


def _np_metrics(logits_NK: np.ndarray, labels_N: np.ndarray) -> dict[str, float]:
    """Accuracy, NLL, Brier, ECE (15 bins) in float64 numpy, from the formulas."""
    z = logits_NK.astype(np.float64) - logits_NK.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    p = np.exp(logp)
    pred, conf = p.argmax(-1), p.max(-1)
    correct = pred == labels_N
    onehot = np.eye(p.shape[1])[labels_N]
    bins = np.minimum(np.floor(conf * 15).astype(int), 14)
    gap = sum(abs(correct[bins == b].sum() - conf[bins == b].sum()) for b in range(15))
    return {"correct": int(correct.sum()), "count": len(labels_N),
            "nll": float(-logp[np.arange(len(labels_N)), labels_N].mean()),
            "brier": float(((p - onehot) ** 2).sum(-1).mean()), "ece": gap / len(labels_N)}


def _crc(name: str) -> int:
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


@functools.partial(jax.jit, static_argnames=("name",))
def _ref_corrupt(images, keys, severity, name):
    """``perturb`` at a (traced) severity, each example with its own key."""
    return jax.vmap(lambda x, k: perturb(x[None], name, severity, k, preset="cifar")[0])(
        images, keys)


@functools.partial(jax.jit, static_argnames=("model",))
def _ref_logits(model, variables, images):
    return model.apply(variables, images)


@functools.partial(jax.jit, static_argnames=("model",))
def _ref_fgsm(model, variables, images, labels, eps):
    return fgsm(functools.partial(model.apply, variables), images, labels, eps)


@functools.partial(jax.jit, static_argnames=("model",))
def _ref_pgd_one(model, variables, x, y, eps, key):
    """PGD-Linf on one example (its own random start)."""
    f = functools.partial(model.apply, variables)
    return pgd_linf(f, x[None], y[None], eps, alpha=0.25 * eps, steps=3, key=key)[0]


@jax.jit
def _ref_noise_frame(images, keys, c):
    return jax.vmap(lambda x, k: perturb_by_param(
        x[None], "gaussian_noise", jnp.reshape(c, (1,)), k)[0])(images, keys)


def _keys(key, n):
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n))


SPEC = S.SuiteSpec(
    corruptions=("gaussian_noise", "contrast"), severities=(1, 4),
    num_keys=2, attacks=(S.AttackSetting("fgsm", (0.05, 0.2)),
                         S.AttackSetting("pgd_linf", (0.05, 0.2), steps=3, alpha_ratio=0.25)),
    flip_noises=("gaussian_noise",), flip_frames=4, seed=5,
)


@pytest.fixture(scope="module")
def suite_result(tiny):
    """All 3 seeds in one program per group, default placement (8-device mesh), one chunk."""
    model, variables, split = tiny
    return S.evaluate_suite(_apply(model), variables, split, SPEC)


def test_suite_equals_per_condition_python_loop(tiny, suite_result):
    """A Python loop over seeds, corruptions, severities, keys, frames and epsilons, calling
    small jitted functions, with metrics from their formulas in numpy."""
    model, variables, split = tiny
    images, labels = jnp.asarray(split["image"]), split["label"]
    n = len(labels)
    root = jax.random.PRNGKey(SPEC.seed)
    res = suite_result
    assert res.num_seeds == 3 and res.num_examples == n
    for s in range(3):
        v = jax.tree.map(lambda a, s=s: a[s], variables)
        ref = _np_metrics(np.asarray(_ref_logits(model, v, images)), labels)
        assert res.clean["correct"][s] == ref["correct"] and res.clean["count"][s] == n
        fin = S.finalize(res.clean)
        np.testing.assert_allclose([fin["nll"][s], fin["brier"][s], fin["ece"][s]],
                                   [ref["nll"], ref["brier"], ref["ece"]], rtol=2e-4, atol=1e-6)
        for name in SPEC.corruptions:
            keys = SPEC.num_keys if name in S.RANDOM_CORRUPTIONS else 1
            for j, severity in enumerate(SPEC.severities):
                logits = []
                for k in range(keys):
                    kk = jax.random.fold_in(jax.random.fold_in(root, _crc(name)), k)
                    x = _ref_corrupt(images, _keys(kk, n), severity, name)
                    logits.append(np.asarray(_ref_logits(model, v, x)))
                ref = _np_metrics(np.concatenate(logits), np.tile(labels, keys))
                got = res.corruptions[name]
                assert got["correct"][s, j] == ref["correct"], (name, severity, s)
                assert got["count"][s, j] == ref["count"] == keys * n
                fin = S.finalize(got)
                np.testing.assert_allclose(
                    [fin["nll"][s, j], fin["brier"][s, j], fin["ece"][s, j]],
                    [ref["nll"], ref["brier"], ref["ece"]], rtol=2e-4, atol=1e-6)
        # flips: frame t adds gaussian noise t/(T-1) * 0.10 (cifar severity 5)
        base = jax.random.fold_in(jax.random.fold_in(root, 0xF11B), _crc("gaussian_noise"))
        preds = []
        for t, c in enumerate(np.linspace(0, 0.10, SPEC.flip_frames, dtype=np.float32)):
            x = _ref_noise_frame(images, _keys(jax.random.fold_in(base, t), n), c)
            preds.append(np.asarray(_ref_logits(model, v, x)).argmax(-1))
        expected = float(M.flip_probability(np.stack(preds), "first"))
        f = res.flips["gaussian_noise"]
        assert f["flips"][s].sum() / (f["count"] * (SPEC.flip_frames - 1)) == pytest.approx(expected)
        # attacks: FGSM on the whole batch; PGD example by example with its own random start
        clean_ok = np.asarray(_ref_logits(model, v, images)).argmax(-1) == labels
        akey = jax.random.fold_in(jax.random.fold_in(root, 0xA77A), _crc("pgd_linf"))
        for e, eps in enumerate((0.05, 0.2)):
            adv = _ref_fgsm(model, v, images, jnp.asarray(labels), eps)
            ok = clean_ok & (np.asarray(_ref_logits(model, v, adv)).argmax(-1) == labels)
            assert res.attacks["fgsm"]["correct"][s, e] == ok.sum()
            adv = jnp.stack([_ref_pgd_one(model, v, images[i], labels[i], eps,
                                          jax.random.fold_in(akey, i)) for i in range(n)])
            assert float(jnp.max(jnp.abs(adv - images))) <= eps + 1e-6
            ok = clean_ok & (np.asarray(_ref_logits(model, v, adv)).argmax(-1) == labels)
            assert res.attacks["pgd_linf"]["correct"][s, e] == ok.sum()


def _same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if np.issubdtype(np.asarray(x).dtype, np.integer):
            np.testing.assert_array_equal(x, y)
        else:
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)


def test_chunked_equals_unchunked(tiny, suite_result):
    """Chunks sized from a tiny memory budget (8 examples each on the 8-device mesh, the
    last one padded) against the fixture's single chunk: same sums."""
    model, variables, split = tiny
    assert jax.device_count() == 8
    logs: list[str] = []
    chunked = S.evaluate_suite(_apply(model), variables, split,
                               dataclasses.replace(SPEC, memory_budget_bytes=1), log=logs.append,
                               programs=("clean", "noise", "fgsm", "pgd_linf"))
    assert [r.name for r in chunked.runs] == ["clean", "noise", "fgsm", "pgd_linf"]
    assert all(r.chunk_size == 8 and r.num_chunks == 3 for r in chunked.runs)
    assert all(r.num_chunks == 1 for r in suite_result.runs)
    assert any("chunk 3/3" in line for line in logs)
    _same(chunked.clean, suite_result.clean)
    _same(chunked.corruptions["gaussian_noise"], suite_result.corruptions["gaussian_noise"])
    _same({k: v["flips"] for k, v in chunked.flips.items()},
          {k: v["flips"] for k, v in suite_result.flips.items()})
    _same({k: v["correct"] for k, v in chunked.attacks.items()},
          {k: v["correct"] for k, v in suite_result.attacks.items()})


def test_one_seed_on_one_device_equals_its_slice_of_the_seed_program(tiny, suite_result):
    """Seed 2 alone (no seed vmap of size 3, one device) against row 2 of the fixture."""
    model, variables, split = tiny
    alone = S.evaluate_suite(_apply(model), _seed(variables, 2), split, SPEC,
                             strategy=create_strategy("none"),
                             programs=("clean", "noise", "pgd_linf"))
    assert alone.num_seeds == 1 and set(alone.corruptions) == {"gaussian_noise"}
    row = lambda tree: jax.tree.map(lambda a: a[2:3], tree)
    _same(alone.clean, row(suite_result.clean))
    _same(alone.corruptions["gaussian_noise"], row(suite_result.corruptions["gaussian_noise"]))
    _same(alone.flips["gaussian_noise"]["flips"], row(suite_result.flips["gaussian_noise"]["flips"]))
    _same(alone.attacks["pgd_linf"]["correct"], row(suite_result.attacks["pgd_linf"]["correct"]))


def test_warping_and_host_corruptions_are_the_same_sharded_and_per_seed(tiny):
    """elastic_transform (per-example keys) and jpeg_compression (computed on the host per
    chunk) on the 8-device mesh, 3 seeds at once, in chunks of 8 (the last padded)
    against seed 1 alone on one device in one chunk: the same sums."""
    model, variables, split = tiny
    spec = S.SuiteSpec(corruptions=("elastic_transform", "jpeg_compression"),
                       severities=(1, 5), flip_noises=(), seed=3)
    programs = ("geometric", "host")
    sharded = S.evaluate_suite(_apply(model), variables, split,
                               dataclasses.replace(spec, chunk_size=8), programs=programs)
    alone = S.evaluate_suite(_apply(model), _seed(variables, 1), split, spec,
                             strategy=create_strategy("none"), programs=programs)
    assert [r.num_chunks for r in sharded.runs] == [3, 3]
    row = lambda tree: jax.tree.map(lambda a: a[1:2], tree)
    for name in spec.corruptions:
        _same(alone.corruptions[name], row(sharded.corruptions[name]))
        assert alone.corruptions[name]["count"].tolist() == [[NUM_EXAMPLES] * 2]
    # The host path (each chunk through Pillow before it is placed) gives the pixels of
    # perturb's in-program callback: the same correct count, severity by severity.
    images, labels = jnp.asarray(split["image"]), split["label"]
    one = jax.tree.map(lambda a: a[1], variables)
    for j, severity in enumerate(spec.severities):
        x = perturb(images, "jpeg_compression", severity, jax.random.PRNGKey(0))
        correct = np.sum(np.asarray(_ref_logits(model, one, x)).argmax(-1) == labels)
        assert alone.corruptions["jpeg_compression"]["correct"][0, j] == correct


_ref_corrupt_fast = jax.jit(_ref_corrupt.__wrapped__, static_argnames=("name",),
                            compiler_options=E.FAST_COMPILE)  # as the suite on CPU


def test_glass_motion_snow_in_the_suite(tiny):
    """The three corruptions made in JAX from the published-only set run in their groups
    (glass and motion blur with the blurs, snow with fog), with per-example keys, equal to
    ``perturb`` example by example: seed 1 of the 3, 2 keys, severities 1 and 5."""
    model, variables, split = tiny
    spec = S.SuiteSpec(corruptions=("glass_blur", "motion_blur", "snow"), severities=(1, 5),
                       num_keys=2, flip_noises=(), seed=4)
    assert [g for g, _ in spec.groups()] == ["blur", "digital"]
    res = S.evaluate_suite(_apply(model), variables, split, spec,
                           programs=("blur", "digital"))
    images, labels = jnp.asarray(split["image"]), split["label"]
    n, root = len(labels), jax.random.PRNGKey(spec.seed)
    v = jax.tree.map(lambda a: a[1], variables)
    for name in spec.corruptions:
        assert name in S.RANDOM_CORRUPTIONS
        for j, severity in enumerate(spec.severities):
            logits = []
            for k in range(2):
                kk = jax.random.fold_in(jax.random.fold_in(root, _crc(name)), k)
                x = _ref_corrupt_fast(images, _keys(kk, n), severity, name)
                logits.append(np.asarray(_ref_logits(model, v, x)))
            ref = _np_metrics(np.concatenate(logits), np.tile(labels, 2))
            got = res.corruptions[name]
            assert got["count"][1, j] == 2 * n
            assert got["correct"][1, j] == ref["correct"], (name, severity)
            np.testing.assert_allclose(S.finalize(got)["nll"][1, j], ref["nll"], rtol=2e-4)


# ----------------------------------------------------------------------------- small parts


def _uses(jaxpr, var) -> bool:
    for eqn in jaxpr.eqns:
        if any(v is var for v in eqn.invars):
            return True
    return False


def test_random_corruptions_are_those_that_use_the_key():
    """Traced only (nothing compiles): the key reaches an operation iff the corruption is in
    RANDOM_CORRUPTIONS (the others are evaluated once per severity)."""
    x = jnp.zeros((1, 8, 8, 3))
    uses_key = set()
    for name in CORRUPTIONS:
        closed = jax.make_jaxpr(lambda k, name=name: perturb(x, name, 5, k))(jax.random.PRNGKey(0))
        if _uses(closed.jaxpr, closed.jaxpr.invars[0]):
            uses_key.add(name)
    assert uses_key == set(S.RANDOM_CORRUPTIONS)


def test_auto_chunk_size():
    assert E.auto_chunk_size(100, 10_000, 1000, 8) == 96  # 100 fit; 11 chunks of <= 96
    assert E.auto_chunk_size(100, 10**9, 1000, 8) == 1000  # all fit: one chunk
    assert E.auto_chunk_size(100, 10**9, 359, 8) == 360  # rounded up to the devices
    assert E.auto_chunk_size(10**9, 1, 359, 8) == 8  # never below one row per device
    assert E.auto_chunk_size(100, 25_000, 359, 1) == 180  # 2 even chunks, not 250 + 109


class _Device:
    """A stand-in device: ``memory_stats`` as an accelerator of ``limit`` bytes, or as
    another process's device (which raises, like JAX's non-addressable devices)."""

    def __init__(self, process_index: int, limit: int | None, platform: str = "gpu"):
        self.process_index, self.limit, self.platform = process_index, limit, platform

    def memory_stats(self):
        if self.process_index != jax.process_index():
            raise RuntimeError("MemoryStats is only supported for addressable PjRt devices.")
        return None if self.limit is None else {"bytes_limit": self.limit, "bytes_in_use": 0}


def test_default_memory_budget_reads_only_this_processes_devices():
    """40% of the accelerators' memory, read from this process's devices only (taken for
    the others', whose ``memory_stats`` raises), in whole MiB; 1 GiB on CPU."""
    gib = 1 << 30
    here, other = jax.process_index(), jax.process_index() + 1
    two_here = [_Device(here, 10 * gib), _Device(here, 10 * gib)]
    assert E.default_memory_budget(two_here) == 8 * gib
    assert E.default_memory_budget([*two_here, _Device(other, 10 * gib)] * 2) == 24 * gib
    assert E.default_memory_budget([_Device(here, 3 * gib + 12345)]) == (int(1.2 * gib) >> 20) << 20
    assert E.default_memory_budget([_Device(here, None), _Device(other, gib)]) == gib
    assert E.default_memory_budget([_Device(here, 10 * gib, "cpu")]) == gib


def test_program_bytes_grows_with_the_chunk(tiny):
    model, variables, split = tiny
    program = S.corruption_program(_apply(model), SPEC, ("gaussian_noise",), jax.random.PRNGKey(0))

    def bound(n):
        batch = {"image": split["image"][:n], "label": split["label"][:n],
                 "mask": np.ones(n, np.float32), "index": np.arange(n, dtype=np.int32)}
        return E.program_bytes(jax.jit(program).trace(variables, batch).jaxpr)

    b8, b16 = bound(8), bound(16)
    # images x severities x keys x seeds of activations at least
    assert b16 > b8 > 8 * 64 * 4 * 2 * 2
    assert 1.5 < b16 / b8 < 2.1


def test_attack_presets():
    assert S.attack_preset_for("digits", (8, 8, 1)) == "digits"
    assert S.attack_preset_for("mnist", (28, 28, 1)) == "mnist"
    assert S.attack_preset_for("fashion_mnist", (28, 28, 1)) == "mnist"
    assert S.attack_preset_for("cifar10", (32, 32, 3)) == "cifar"
    assert S.attack_preset_for("imagenette", (224, 224, 3)) == "imagenet"
    # at the reference budgets the sweeps run exactly ATTACK_DEFAULTS' attacks
    for preset, norm, method in (("mnist", "linf", "pgd_linf"), ("cifar", "linf", "pgd_linf"),
                                 ("cifar", "l2", "pgd_l2")):
        ref = ATTACK_DEFAULTS[preset][norm]
        (a,) = S.attack_settings((method,), preset)
        j = [round(e, 6) for e in a.eps].index(round(ref.eps, 6))
        assert a.steps == ref.steps and a.alphas[j] == pytest.approx(ref.alpha)
    (f,) = S.attack_settings(("fgsm",), "digits", linf_eps=(0.1,))
    assert f.eps == (0.1,) and f.steps == 0
    with pytest.raises(S.RobustnessError, match="unknown attack"):
        S.attack_settings(("cw",), "cifar")


@pytest.mark.parametrize("change,match", [
    ({"corruptions": ("frost",)}, "unknown corruption 'frost'"),  # published images only
    ({"severities": (0, 1)}, "severities"),
    ({"num_keys": 0}, "num_keys"),
    ({"flip_noises": ("shot_noise",)}, "flip noise"),
    ({"attacks": (S.AttackSetting("pgd_linf", (0.1,), steps=0),)}, "steps"),
    ({"attacks": (S.AttackSetting("fgsm", (-0.1,)),)}, "eps"),
])
def test_spec_errors(change, match):
    with pytest.raises(S.RobustnessError, match=match):
        S.SuiteSpec(**change).validate()


# ----------------------------------------------------------------------------- cifar10_corrupted


def test_cifar10_corrupted_under_mock_data(monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    from jaxtrain.robustness import tfds_c

    calls = []
    real = tfds.data_source

    def spy(name, **kwargs):
        calls.append((name, kwargs))
        return real(name, **kwargs)

    monkeypatch.setattr(tfds, "data_source", spy)
    built = []  # each Evaluator, for its compile options

    class Evaluator(E.Evaluator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(tfds_c, "Evaluator", Evaluator)
    model = create_model("mlp", 10, hidden=(16,))
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    variables = jax.tree.map(np.asarray, jax.jit(jax.vmap(
        lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)))))(keys))
    names = ("frost",)  # only in the published set
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        sums = tfds_c.evaluate_cifar10_corrupted(
            _apply(model), variables, corruptions=names, severities=(1, 3),
            strategy=create_strategy("mesh"))
        loaded = tfds_c.load_cifar10_corrupted("frost", (1, 3))
        tfds_c.evaluate_cifar10_corrupted(_apply(model), variables, corruptions=names,
                                          severities=(1,), strategy=create_strategy("mesh"),
                                          fast_compile=True)
    # Optimized by default, unlike the suite's small splits; FAST_COMPILE when asked.
    assert built[0].compiler_options != E.FAST_COMPILE
    assert built[1].compiler_options == E.FAST_COMPILE
    assert [c[0] for c in calls] == ["cifar10_corrupted/frost_1", "cifar10_corrupted/frost_3"] * 2 + [
        "cifar10_corrupted/frost_1"]
    assert all(c[1]["download"] is False and c[1]["split"] == "test" for c in calls)
    assert loaded["image"].shape == (12, 2, 32, 32, 3) and loaded["image"].dtype == np.uint8
    for s in range(2):
        v = jax.tree.map(lambda a, s=s: a[s], variables)
        for j in range(2):
            x = loaded["image"][:, j].astype(np.float32) / 255.0
            ref = _np_metrics(np.asarray(model.apply(v, x)), loaded["label"][:, j])
            assert sums["frost"]["correct"][s, j] == ref["correct"]
            assert sums["frost"]["count"][s, j] == 12
            assert S.finalize(sums["frost"])["nll"][s, j] == pytest.approx(ref["nll"], rel=1e-4)


def test_cifar10_corrupted_errors(tmp_path, monkeypatch):
    pytest.importorskip("tensorflow_datasets")
    from jaxtrain.robustness import tfds_c

    with pytest.raises(S.RobustnessError, match=r"not prepared in .*tfds build cifar10_corrupted"):
        tfds_c.load_cifar10_corrupted("fog", (1,), data_dir=str(tmp_path))
    with pytest.raises(S.RobustnessError, match=r"cifar10_corrupted/fog_2 is not prepared"):
        tfds_c.check_prepared(("fog",), (2,), data_dir=str(tmp_path))
    with pytest.raises(S.RobustnessError, match="unknown cifar10_corrupted corruption 'rotation'"):
        tfds_c.load_cifar10_corrupted("rotation", (1,))
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # as if not installed
    with pytest.raises(S.RobustnessError, match="needs tensorflow-datasets"):
        tfds_c.load_cifar10_corrupted("fog", (1,))


def test_fast_compile_is_the_cpu_default_only_for_small_splits() -> None:
    from jaxtrain.compile_options import compiler_options

    small = {"image": np.zeros((359, 8, 8, 1), np.float32), "label": np.zeros(359, np.int32)}
    big = {"image": np.zeros((100, 32, 32, 3), np.float32), "label": np.zeros(100, np.int32)}
    assert E.wants_fast_compile("cpu", small) and E.wants_fast_compile("cpu", None)
    assert not E.wants_fast_compile("cpu", big) and not E.wants_fast_compile("gpu", small)
    variables = {"w": np.zeros((1, 3), np.float32)}
    strategy = create_strategy("none")
    assert E.Evaluator(variables, small, strategy=strategy).compiler_options == E.FAST_COMPILE
    assert E.Evaluator(variables, big, strategy=strategy).compiler_options == compiler_options("cpu")
    assert E.Evaluator(variables, big, strategy=strategy, fast_compile=True).compiler_options == (
        E.FAST_COMPILE)
