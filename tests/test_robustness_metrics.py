"""Tests for jaxtrain.robustness.metrics against independent numpy references and hand values."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtrain.robustness import metrics

N, K = 1000, 10


# ---------------------------------------------------------------- numpy reference


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def reference(probs: np.ndarray, labels: np.ndarray, num_bins: int = 15) -> dict[str, float]:
    """Straightforward float64 implementation of the ROBUSTNESS.md definitions."""
    probs = np.asarray(probs, np.float64)
    n, k = probs.shape
    pred = probs.argmax(1)
    conf = probs.max(1)
    correct = (pred == labels).astype(np.float64)
    onehot = np.eye(k)[labels]
    ece = 0.0
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    for b in range(num_bins):
        lo, hi = edges[b], edges[b + 1]
        in_bin = (conf >= lo) & ((conf < hi) if b < num_bins - 1 else (conf <= hi))
        if in_bin.any():
            ece += in_bin.sum() / n * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return {
        "accuracy": correct.mean(),
        "nll": -np.log(probs[np.arange(n), labels]).mean(),
        "brier": ((probs - onehot) ** 2).sum(1).mean(),
        "ece": ece,
    }


@pytest.fixture(scope="module")
def inputs():
    """Logits [N, K] with ~50% accuracy and a spread of confidences; labels int [N]."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(N, K)) * rng.uniform(0.5, 4.0, size=(N, 1))
    labels = np.where(rng.uniform(size=N) < 0.5, logits.argmax(1), rng.integers(0, K, size=N))
    return logits.astype(np.float32), labels.astype(np.int32)


_stats_jit = jax.jit(metrics.calibration_stats, static_argnames=("num_bins", "from_logits"))


def _metrics(x, labels, *, mask=None, from_logits=True, num_bins=15):
    stats = _stats_jit(x, labels, num_bins, mask=mask, from_logits=from_logits)
    return {k: float(v) for k, v in metrics.finalize_calibration(stats).items()}


# ---------------------------------------------------------------- calibration


@pytest.mark.parametrize("from_logits", [True, False])
def test_matches_numpy_reference(inputs, from_logits):
    logits, labels = inputs
    probs = _softmax(logits)
    want = reference(probs, labels)
    x = logits if from_logits else probs.astype(np.float32)
    got = _metrics(x, labels, from_logits=from_logits)
    assert 0.4 < want["accuracy"] < 0.7 and want["ece"] > 0.02  # a non-trivial case
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_single_metric_functions_agree_with_reference(inputs):
    logits, labels = inputs
    want = reference(_softmax(logits), labels, num_bins=7)

    @jax.jit
    def all_four(x, y):
        return metrics.accuracy(x, y), metrics.nll(x, y), metrics.brier(x, y), metrics.ece(x, y, 7)

    got = all_four(logits, labels)
    for name, value in zip(["accuracy", "nll", "brier", "ece"], got):
        np.testing.assert_allclose(value, want[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_hand_values():
    # Uniform predictions over K classes: NLL = log K, Brier = 1 - 1/K, conf = 1/K.
    k = 4
    labels = jnp.array([0, 1, 2, 3])
    got = _metrics(jnp.zeros((4, k)), labels)
    np.testing.assert_allclose(got["nll"], np.log(k), rtol=1e-6)
    np.testing.assert_allclose(got["brier"], 1 - 1 / k, rtol=1e-6)
    assert got["accuracy"] == 0.25  # argmax of ties is class 0
    np.testing.assert_allclose(got["ece"], 0.0, atol=1e-6)  # conf 1/4 = accuracy 1/4
    # One bin: ECE = |accuracy - mean confidence|.
    probs = jnp.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])
    got = _metrics(probs, jnp.array([0, 1, 1]), from_logits=False, num_bins=1)
    np.testing.assert_allclose(got["ece"], abs(2 / 3 - (0.9 + 0.6 + 0.8) / 3), rtol=1e-6)
    want_brier = (0.1**2 * 2 + 0.6**2 * 2 + 0.2**2 * 2) / 3
    np.testing.assert_allclose(got["brier"], want_brier, rtol=1e-6)


def test_ece_zero_when_perfectly_calibrated_and_large_when_not():
    # At confidence c (one bin each), exactly a fraction c of the 20 examples is right.
    probs, labels = [], []
    for c in (0.55, 0.7, 0.8, 0.9, 1.0):
        n_right = round(20 * c)
        probs += [[c, 1 - c]] * 20
        labels += [0] * n_right + [1] * (20 - n_right)
    probs, labels = np.array(probs, np.float32), np.array(labels, np.int32)
    np.testing.assert_allclose(_metrics(probs, labels, from_logits=False)["ece"], 0.0, atol=1e-6)
    logits = np.log(np.maximum(probs, 1e-30))  # the same predictions given as logits
    np.testing.assert_allclose(_metrics(logits, labels)["ece"], 0.0, atol=1e-6)
    # Confidence 0.9 everywhere but half right: ECE = 0.4.
    over = np.tile(np.array([[0.9, 0.1]], np.float32), (100, 1))
    np.testing.assert_allclose(
        _metrics(over, np.arange(100) % 2, from_logits=False)["ece"], 0.4, rtol=1e-5
    )


def test_mask_counts_only_real_examples(inputs):
    logits, labels = inputs
    n_real = 700
    x = logits.copy()
    x[n_real:] = np.nan  # padding garbage the mask must hide
    y = np.where(np.arange(N) < n_real, labels, -1).astype(np.int32)
    mask = np.arange(N) < n_real
    got = _metrics(x, y, mask=mask)
    want = _metrics(logits[:n_real], labels[:n_real])
    want_np = reference(_softmax(logits[:n_real]), labels[:n_real])
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(got[name], want_np[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert int(_stats_jit(x, y, 15, mask=mask)["count"]) == n_real


def test_chunked_stats_combine_to_one_shot(inputs):
    logits, labels = inputs
    chunk = 256  # 1000 = 3 full chunks + a padded one of 232
    total = None
    for start in range(0, N, chunk):
        x, y = logits[start : start + chunk], labels[start : start + chunk]
        n = len(y)
        mask = (np.arange(chunk) < n).astype(np.float32)  # 0/1 weights work like bools
        x = np.pad(x, ((0, chunk - n), (0, 0)))
        y = np.pad(y, (0, chunk - n))
        stats = _stats_jit(x, y, 15, mask=mask)
        total = stats if total is None else jax.tree.map(jnp.add, total, stats)
    one_shot = _stats_jit(logits, labels, 15, mask=np.ones(N, bool))
    assert int(total["count"]) == N
    np.testing.assert_array_equal(total["bin_count"], one_shot["bin_count"])
    np.testing.assert_array_equal(total["bin_correct"], one_shot["bin_correct"])
    got = metrics.finalize_calibration(total)
    want = metrics.finalize_calibration(one_shot)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(got["ece"], reference(_softmax(logits), labels)["ece"], rtol=1e-5)


def test_bad_shapes_fail_loudly():
    with pytest.raises(ValueError, match="labels"):
        metrics.nll(jnp.zeros((4, 3)), jnp.zeros((5,), jnp.int32))
    with pytest.raises(ValueError, match="mask"):
        metrics.ece(jnp.zeros((4, 3)), jnp.zeros((4,), jnp.int32), mask=jnp.ones((3,)))
    with pytest.raises(ValueError):
        metrics.accuracy(jnp.zeros((4,)), jnp.zeros((4,), jnp.int32))


# ---------------------------------------------------------------- corruption errors

ERR_MODEL = np.array([[0.1, 0.2, 0.3], [0.2, 0.2, 0.2]])  # [corruption, severity]
ERR_BASE = np.array([[0.2, 0.4, 0.6], [0.4, 0.4, 0.8]])


def test_corruption_errors_by_hand():
    ce = metrics.corruption_errors(ERR_MODEL, ERR_BASE)
    np.testing.assert_allclose(ce, [0.6 / 1.2, 0.6 / 1.6])
    np.testing.assert_allclose(metrics.mce(ERR_MODEL, ERR_BASE), (0.5 + 0.375) / 2)
    np.testing.assert_allclose(metrics.mean_corruption_error(ERR_MODEL), 1.2 / 6)
    # relative: (sum_s E - 3 * clean) / (sum_s E_base - 3 * clean_base)
    rel = metrics.relative_ce(ERR_MODEL, 0.05, ERR_BASE, 0.1)
    np.testing.assert_allclose(rel, [(0.6 - 0.15) / (1.2 - 0.3), (0.6 - 0.15) / (1.6 - 0.3)])
    np.testing.assert_allclose(metrics.relative_mce(ERR_MODEL, 0.05, ERR_BASE, 0.1), np.mean(rel))


def test_corruption_errors_with_dicts():
    model = {"fog": ERR_MODEL[0], "contrast": list(ERR_MODEL[1])}
    base = {"contrast": ERR_BASE[1], "fog": ERR_BASE[0], "snow": [0.5, 0.5, 0.5]}  # extra ignored
    ce = metrics.corruption_errors(model, base)
    assert list(ce) == ["fog", "contrast"]
    np.testing.assert_allclose([ce["fog"], ce["contrast"]], [0.5, 0.375])
    np.testing.assert_allclose(metrics.mce(model, base), 0.4375)
    rel = metrics.relative_ce(model, 0.05, base, 0.1)
    np.testing.assert_allclose(rel["contrast"], 0.45 / 1.3)
    np.testing.assert_allclose(metrics.mean_corruption_error(model), 0.2)
    with pytest.raises(KeyError, match="zoom"):
        metrics.corruption_errors({"snow": [0.1, 0.1, 0.1], "zoom": [0.1] * 3}, {"snow": [0.2] * 3})
    with pytest.raises(TypeError):
        metrics.mce(model, ERR_BASE)
    with pytest.raises(ValueError):
        metrics.mce(ERR_MODEL, ERR_BASE[:, :2])  # severities differ


def test_zero_denominator_gives_nan():
    rel = metrics.relative_ce(ERR_MODEL, 0.0, np.full((2, 3), 0.1), 0.1)  # base not hurt
    assert np.isnan(rel).all()
    ce = metrics.corruption_errors(ERR_MODEL, np.array([[0.0, 0.0, 0.0], [0.4, 0.4, 0.8]]))
    assert np.isnan(ce[0]) and ce[1] == pytest.approx(0.375)


# ---------------------------------------------------------------- flip probability


def test_flip_probability_by_hand():
    # frames x images: A = 0,1,0,1 (3 consecutive flips; 2 differ from frame 0),
    # B = 2,2,2,2 (0; 0), C = 0,1,1,1 (1; 3). 3 images x 3 pairs = 9.
    preds_TN = jnp.array([[0, 2, 0], [1, 2, 1], [0, 2, 1], [1, 2, 1]])
    np.testing.assert_allclose(metrics.flip_probability(preds_TN), 4 / 9, rtol=1e-6)
    np.testing.assert_allclose(metrics.flip_probability(preds_TN, "first"), 5 / 9, rtol=1e-6)
    mask = jnp.array([0, 1, 1])  # drop A
    np.testing.assert_allclose(metrics.flip_probability(preds_TN, mask=mask), 1 / 6, rtol=1e-6)
    np.testing.assert_allclose(
        metrics.flip_probability(preds_TN, "first", mask=mask), 3 / 6, rtol=1e-6
    )
    flip_jit = jax.jit(functools.partial(metrics.flip_probability, mode="first"))
    np.testing.assert_allclose(flip_jit(preds_TN), 5 / 9, rtol=1e-6)
    with pytest.raises(ValueError, match="mode"):
        metrics.flip_probability(preds_TN, "pairs")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        metrics.flip_probability(preds_TN[:1])
