"""Tests for jaxtrain.stats: intervals against scipy, the bootstrap contract, pairing."""

import dataclasses
import json
import math

import hypothesis.extra.numpy as hnp
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxtrain import stats

# Fixed inputs shaped like real per-seed results (accuracies, losses, a skewed one).
SAMPLES = {
    "acc": np.array([0.912, 0.905, 0.921, 0.899, 0.917, 0.908, 0.915, 0.903]),
    "loss": np.array([0.31, 0.35, 0.29, 0.40, 0.33]),
    "skewed": np.array([1.0, 1.1, 0.9, 1.05, 0.95, 1.0, 4.0, 1.02, 0.98, 1.01, 0.97, 1.03]),
}


def _naive_bootstrap(x: np.ndarray, confidence: float, n_boot: int, seed: int):
    """Reference for the documented contract: gather with the [n_boot, S] index draw."""
    idx = np.random.default_rng(seed).integers(0, x.size, size=(n_boot, x.size))
    alpha = 1 - confidence
    return tuple(np.quantile(x[idx].mean(axis=1), [alpha / 2, 1 - alpha / 2]))


# --- summarize ---------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SAMPLES))
@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_t_interval_matches_scipy(name, confidence):
    x = SAMPLES[name]
    s = stats.summarize(x, confidence=confidence, n_boot=100)
    want = scipy.stats.t.interval(confidence, x.size - 1, loc=x.mean(), scale=scipy.stats.sem(x))
    np.testing.assert_allclose(s.t_interval, want, rtol=1e-12)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_bootstrap_interval_matches_scipy_within_monte_carlo_error(name):
    x = SAMPLES[name]
    s = stats.summarize(x, seed=0)
    ref = scipy.stats.bootstrap(
        (x,), np.mean, confidence_level=0.95, n_resamples=20_000, method="percentile", rng=1
    ).confidence_interval
    # Two independent 10k/20k-resample estimates of a 2.5% quantile differ by about
    # 0.04 standard errors of the mean (1 sd); 0.2 SE is ~5 sd, yet far below the
    # interval's half-width (~2 SE), so a wrong quantile or a missing resample fails.
    tol = 0.2 * scipy.stats.sem(x)
    assert abs(s.bootstrap_interval[0] - ref.low) < tol
    assert abs(s.bootstrap_interval[1] - ref.high) < tol


@pytest.mark.parametrize("seed", [0, 7])
def test_bootstrap_follows_documented_index_contract(seed):
    x = SAMPLES["skewed"]
    s = stats.summarize(x, confidence=0.9, n_boot=3_000, seed=seed)
    np.testing.assert_allclose(
        s.bootstrap_interval, _naive_bootstrap(x, 0.9, 3_000, seed), rtol=1e-12
    )


def test_summary_fields_match_numpy():
    x = SAMPLES["acc"]
    s = stats.summarize(x)
    assert s.values == x.tolist()
    assert s.n == x.size
    assert s.mean == pytest.approx(x.mean(), rel=1e-14)
    assert s.std == pytest.approx(np.std(x, ddof=1), rel=1e-12)
    assert s.std != pytest.approx(np.std(x, ddof=0), rel=1e-6)  # sample, not population
    assert (s.min, s.max) == (x.min(), x.max())
    assert (s.confidence, s.n_boot) == (0.95, 10_000)


def test_default_n_boot_meets_robustness_requirement():
    assert stats.summarize([1.0, 2.0, 3.0]).n_boot >= 10_000
    assert stats.paired_comparison([1.0, 2.0], [0.0, 1.0]).diff.n_boot >= 10_000


def test_determinism_given_seed():
    x = np.random.default_rng(0).normal(size=12)  # continuous: resampled means rarely tie
    first = stats.summarize(x, n_boot=2_000, seed=3)
    assert stats.summarize(x, n_boot=2_000, seed=3) == first
    assert stats.summarize(x, n_boot=2_000, seed=4).bootstrap_interval != first.bootstrap_interval


def test_single_seed_gives_nan_spread_and_strict_json():
    s = stats.summarize([0.5])
    assert (s.n, s.mean, s.min, s.max) == (1, 0.5, 0.5, 0.5)
    assert math.isnan(s.std)
    assert all(math.isnan(v) for v in s.t_interval + s.bootstrap_interval)
    d = json.loads(json.dumps(s.to_dict(), allow_nan=False))
    assert d["std"] is None and d["t_interval"] == [None, None]
    assert d["values"] == [0.5]


def test_constant_values_give_zero_width_intervals():
    s = stats.summarize([0.1, 0.1, 0.1])
    assert s.std == 0.0
    assert s.t_interval == (0.1, 0.1) == s.bootstrap_interval
    assert s.mean == 0.1


def test_to_dict_round_trips_through_json():
    s = stats.summarize(SAMPLES["acc"], n_boot=500)
    d = json.loads(json.dumps(s.to_dict(), allow_nan=False))
    assert d["mean"] == s.mean and d["bootstrap_interval"] == list(s.bootstrap_interval)
    assert d["values"] == s.values


def test_accepts_jax_arrays():
    x = SAMPLES["acc"].astype(np.float32)
    got = stats.summarize(jnp.asarray(x), n_boot=500)
    assert got == stats.summarize(x, n_boot=500)


@pytest.mark.parametrize(
    "values, match",
    [
        ([], "empty"),
        (np.zeros((0, 3)), "empty"),
        ([1.0, float("nan"), 2.0], "non-finite"),
        ([1.0, float("inf")], "non-finite"),
        ([[1.0, 2.0], [3.0, 4.0]], "1-D"),
        (3.0, "1-D"),
    ],
)
def test_summarize_rejects_bad_values(values, match):
    with pytest.raises(ValueError, match=match):
        stats.summarize(values)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"confidence": 1.0}, "confidence"),
        ({"confidence": 0.0}, "confidence"),
        ({"n_boot": 0}, "n_boot"),
        ({"n_boot": 1.5}, "n_boot"),
        ({"seed": -1}, "seed"),
    ],
)
def test_summarize_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        stats.summarize([1.0, 2.0], **kwargs)


# --- summarize_axis ----------------------------------------------------------


def test_axis_summary_equals_per_column_calls():
    rng = np.random.default_rng(0)
    x_SxK = rng.normal(size=(9, 6)) * rng.uniform(0.1, 3.0, size=6) + rng.normal(size=6)
    x_SxK[:, 2] = 0.25  # a constant condition next to varying ones
    s = stats.summarize_axis(x_SxK, axis=0, confidence=0.9, n_boot=4_000, seed=5)
    assert s.n == 9 and s.mean.shape == (6,)
    for k in range(x_SxK.shape[1]):
        c = stats.summarize(x_SxK[:, k], confidence=0.9, n_boot=4_000, seed=5)
        np.testing.assert_allclose(
            [s.mean[k], s.std[k], s.t_lo[k], s.t_hi[k], s.boot_lo[k], s.boot_hi[k]],
            [c.mean, c.std, *c.t_interval, *c.bootstrap_interval],
            rtol=1e-12,
            atol=1e-15,
            err_msg=f"condition {k}",
        )
        assert (s.min[k], s.max[k]) == (c.min, c.max)
        np.testing.assert_allclose(
            (s.boot_lo[k], s.boot_hi[k]),
            _naive_bootstrap(x_SxK[:, k], 0.9, 4_000, 5),
            rtol=1e-12,
            atol=1e-15,
        )


def test_axis_summary_any_axis_and_trailing_shape():
    x_KxSxL = np.random.default_rng(1).normal(size=(3, 7, 2))
    s = stats.summarize_axis(x_KxSxL, axis=1, n_boot=1_000)
    assert s.n == 7
    for field in ("mean", "std", "t_lo", "t_hi", "boot_lo", "boot_hi", "min", "max"):
        assert getattr(s, field).shape == (3, 2), field
    c = stats.summarize(x_KxSxL[2, :, 1], n_boot=1_000)
    np.testing.assert_allclose([s.boot_lo[2, 1], s.boot_hi[2, 1]], c.bootstrap_interval, rtol=1e-12)
    d = json.loads(json.dumps(s.to_dict(), allow_nan=False))
    assert np.asarray(d["mean"]).shape == (3, 2)


def test_axis_summary_single_seed_and_bad_input():
    s = stats.summarize_axis(np.array([[1.0, 2.0]]))
    assert np.all(np.isnan(s.std)) and np.all(np.isnan(s.boot_lo))
    np.testing.assert_array_equal(s.mean, [1.0, 2.0])
    assert json.loads(json.dumps(s.to_dict(), allow_nan=False))["std"] == [None, None]
    with pytest.raises(ValueError, match="non-finite"):
        stats.summarize_axis(np.array([[1.0, np.nan], [2.0, 3.0]]))
    with pytest.raises(ValueError, match="empty"):
        stats.summarize_axis(np.zeros((0, 4)))


# --- paired_comparison -------------------------------------------------------

pytestmark_no_warnings = pytest.mark.filterwarnings("error")


@pytestmark_no_warnings
def test_paired_a_always_better():
    b = SAMPLES["acc"]
    a = b + np.linspace(0.001, 0.02, b.size)
    r = stats.paired_comparison(a, b)
    assert r.p_a_greater == 1.0
    assert r.p_a_greater_interval == (1.0, 1.0)
    assert r.mean_diff == pytest.approx(np.mean(a - b), rel=1e-12)
    assert r.diff.t_interval[0] > 0 and r.diff.bootstrap_interval[0] > 0
    assert r.sign_test_p == pytest.approx(2 * 0.5**b.size)
    assert r.wilcoxon_p == pytest.approx(scipy.stats.wilcoxon(a, b).pvalue)


@pytestmark_no_warnings
def test_paired_identical_is_a_coin_flip():
    x = SAMPLES["loss"]
    r = stats.paired_comparison(x, x.copy())
    assert r.p_a_greater == 0.5
    assert r.p_a_greater_interval == (0.5, 0.5)
    assert r.mean_diff == 0.0 and r.diff.t_interval == (0.0, 0.0)
    assert r.wilcoxon_p == 1.0 and r.sign_test_p == 1.0


@pytestmark_no_warnings
def test_paired_mixed_with_ties_and_symmetry():
    a = np.array([3.0, 1.0, 2.0, 5.0, 4.0, 2.0])
    b = np.array([1.0, 2.0, 2.0, 4.0, 4.5, 1.0])  # win, loss, tie, win, loss, win
    r = stats.paired_comparison(a, b, n_boot=5_000, seed=2)
    assert r.p_a_greater == pytest.approx((3 + 0.5) / 6)
    lo, hi = r.p_a_greater_interval
    assert 0.0 <= lo < r.p_a_greater < hi <= 1.0
    # diff is summarize(a - b) with the same seed (matmul rounding aside).
    ref = stats.summarize(a - b, n_boot=5_000, seed=2)
    assert dataclasses.replace(r.diff, bootstrap_interval=ref.bootstrap_interval) == ref
    np.testing.assert_allclose(r.diff.bootstrap_interval, ref.bootstrap_interval, rtol=1e-12)
    assert r.sign_test_p == pytest.approx(scipy.stats.binomtest(3, 5).pvalue)

    swapped = stats.paired_comparison(b, a, n_boot=5_000, seed=2)
    assert swapped.p_a_greater == pytest.approx(1 - r.p_a_greater)
    # Same resamples, so the win interval mirrors exactly (up to rounding).
    np.testing.assert_allclose(swapped.p_a_greater_interval, (1 - hi, 1 - lo), atol=1e-12)
    assert swapped.mean_diff == pytest.approx(-r.mean_diff)


def test_paired_to_dict_is_strict_json():
    r = stats.paired_comparison([0.9], [0.8])
    d = json.loads(json.dumps(r.to_dict(), allow_nan=False))
    assert d["p_a_greater"] == 1.0 and d["p_a_greater_interval"] == [None, None]
    assert d["diff"]["n"] == 1


@pytest.mark.parametrize(
    "a, b, match",
    [
        ([1.0, 2.0], [1.0], "same length"),
        ([], [], "empty"),
        ([1.0, np.nan], [1.0, 2.0], "non-finite"),
        ([1.0, 2.0], [1.0, np.inf], "non-finite"),
        ([[1.0, 2.0]], [[1.0, 2.0]], "1-D"),
    ],
)
def test_paired_rejects_bad_input(a, b, match):
    with pytest.raises(ValueError, match=match):
        stats.paired_comparison(a, b)


# --- properties --------------------------------------------------------------

_finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(values=hnp.arrays(np.float64, st.integers(2, 20), elements=_finite), seed=st.integers(0, 99))
def test_interval_properties(values, seed):
    s = stats.summarize(values, n_boot=1_000, seed=seed)
    assert s.min <= s.mean <= s.max
    assert s.std >= 0
    for lo, hi in (s.t_interval, s.bootstrap_interval):
        assert lo <= s.mean <= hi
    # Resampled means never leave the data's range.
    assert s.min <= s.bootstrap_interval[0] <= s.bootstrap_interval[1] <= s.max
