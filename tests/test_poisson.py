"""Tests for jaxtrain.robustness.poisson: shot noise's sampler against scipy's Poisson pmf,
through both of its branches, the unrolled rounds and the loop alone."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats

from jaxtrain.robustness import perturbations as P
from jaxtrain.robustness import poisson as PO

N = 200_000


@functools.partial(jax.jit, static_argnames="rounds")
def draw(key, lam, rounds=None):
    return PO.poisson(key, lam, rounds=rounds)


def check_pmf(draws: np.ndarray, lam: float) -> None:
    """Chi-square against scipy's pmf over the cells expecting > 5 draws; mean and
    variance within 5 standard errors."""
    assert draws.dtype == np.float32 and np.all(draws == np.round(draws)) and draws.min() >= 0
    if lam == 0:
        assert np.all(draws == 0)
        return
    top = int(stats.poisson.ppf(1 - 1e-9, lam)) + 1
    observed = np.bincount(draws.astype(int), minlength=top + 1)[:top + 1]
    expected = stats.poisson.pmf(np.arange(top + 1), lam) * draws.size
    kept = expected > 5
    chi2 = np.sum((observed[kept] - expected[kept]) ** 2 / expected[kept])
    assert stats.chi2.sf(chi2, kept.sum() - 1) > 1e-3, (lam, chi2)
    assert abs(draws.mean() - lam) < 5 * np.sqrt(lam / draws.size)
    assert abs(draws.var() / lam - 1) < 5 * np.sqrt(2 / draws.size) + 5 / np.sqrt(lam * draws.size)


@pytest.mark.parametrize("lam", [0.0, 0.3, 2.0, 7.5, 9.99, 10.0, 12.0, 40.0, 100.0, 500.0])
def test_poisson_follows_the_poisson_pmf(lam) -> None:
    """Both branches (inversion below 10, rejection from 10) with the default rounds."""
    check_pmf(np.asarray(draw(jax.random.key(3), jnp.full((N,), lam, jnp.float32))), lam)


@pytest.mark.parametrize("rounds", [0, 1])
@pytest.mark.parametrize("lam", [10.0, 60.0])
def test_the_loop_alone_gives_the_same_distribution(lam, rounds) -> None:
    """rounds=0 leaves every value to the while loop, 1 most of them to one round."""
    draws = np.asarray(draw(jax.random.key(4), jnp.full((N,), lam, jnp.float32), rounds=rounds))
    check_pmf(draws, lam)


def test_a_mixed_image_draws_each_value_from_its_own_lam() -> None:
    """Values of an [N, H, W, C] lam spanning both branches keep their own lam: per lam,
    the mean and variance; the shape and the rows view round-trip."""
    lams = np.array([0.5, 3.0, 9.5, 10.0, 25.0, 300.0], np.float32)
    lam = jnp.asarray(np.tile(lams, 512 * 16 * 12 * 3 // 6).reshape(512, 16, 12, 3))  # [N, H, W, C]
    out = np.asarray(draw(jax.random.key(5), lam))
    assert out.shape == lam.shape
    flat, lam_flat = out.reshape(-1), np.asarray(lam).reshape(-1)
    for value in lams:
        got = flat[lam_flat == value]
        assert abs(got.mean() - value) < 5 * np.sqrt(value / got.size), value
        assert abs(got.var() / value - 1) < 5 * np.sqrt(2 / got.size) + 5 / np.sqrt(value * got.size)


def test_keys_and_shapes() -> None:
    lam = jnp.full((7, 5), 30.0)
    a, b = draw(jax.random.key(0), lam), draw(jax.random.key(1), lam)
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(a, draw(jax.random.key(0), lam))
    assert draw(jax.random.key(0), jnp.float32(4.0)).shape == ()
    assert draw(jax.random.key(0), jnp.full((9,), 20.0)).shape == (9,)


def test_nan_and_infinite_lam_give_nan_and_empty_arrays_pass() -> None:
    lam = jnp.array([[3.0, jnp.nan], [jnp.inf, 50.0]])
    out = np.asarray(draw(jax.random.key(0), lam))
    assert np.isnan(out[0, 1]) and np.isnan(out[1, 0]) and np.all(np.isfinite(out[[0, 1], [0, 1]]))
    assert PO.poisson(jax.random.key(0), jnp.zeros((4, 0))).shape == (4, 0)


def test_log_factorial_matches_scipy() -> None:
    k = np.concatenate([np.arange(0, 200), np.geomspace(200, 1e5, 300).round()]).astype(np.float32)
    got = np.asarray(jax.jit(PO.log_factorial)(jnp.asarray(k)), np.float64)
    want = special.gammaln(k.astype(np.float64) + 1)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)


def test_perturbations_reexports_the_sampler() -> None:
    assert P.poisson is PO.poisson
