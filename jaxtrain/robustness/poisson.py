"""Poisson draws for shot noise: the same distribution as ``jax.random.poisson``, faster.

Written here because shot noise (lam = x c for every pixel, at five severities in one
vmapped program) was the costliest corruption, and ``jax.random.poisson`` spends its
time in two loops over the whole array, Knuth's method below lam 10 and Hörmann's
transformed rejection (PTRS) above, each running until the slowest value of all is
done (``benchmarks/results/corruptions-*.json``). Here:

- lam < 10: the CDF inverted with one uniform and a fixed 40 terms, no loop exit;
- lam >= 10: the same PTRS, first as ``ROUNDS`` unrolled rounds over the whole array
  (one fused program; after them a value is still pending with probability < 0.25^8),
  then a while loop that finishes the rare rest. Its body costs several unrolled
  rounds on XLA:CPU, hence the unrolled ones first.

Arrays are viewed as rows of the last two axes (``[..., W, C] -> [-1, W * C]``) while
sampling: XLA:CPU vectorizes elementwise math along the minor axis, and an image's
minor axis is its 3 channels (4x slower for these fusions, measured by hand).

Measured (``python -m benchmarks.poisson``, 2 cores, ``benchmarks/results/poisson-cpu.json``):
shot noise's lam at 5 severities, vmapped, 7.3x faster than ``jax.random.poisson`` for a
256 x 32x32x3 batch (437 against 3168 ms) and 7.2x for 16 x 224x224x3 (1710 against
12 243 ms); 5.2x for both under the suite's ``FAST_COMPILE``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

__all__ = ["INVERSION_BELOW", "ROUNDS", "log_factorial", "poisson"]

INVERSION_BELOW = 10.0  # jax.random.poisson's own switch from Knuth to rejection
ROUNDS = 8  # unrolled PTRS rounds before the while loop (by hand: 4 and 12 were slower)
_TERMS = 40  # P(k >= 40 | lam < 10) < 1e-13, below float32's resolution
_PENDING = -1.0  # a value that no round has accepted yet
_IDLE_LAM = 1e3  # what the rejection branch samples where the inversion answers
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def _rows(a: Array) -> Array:
    return a.reshape(-1, a.shape[-2] * a.shape[-1]) if a.ndim >= 2 else a.reshape(1, -1)


def log_factorial(k: Array) -> Array:
    """log(k!) for float k >= 0: Stirling's series (to 1/1260 x^5) at x = k + 1 >= 7, and
    below 7 after the shift lgamma(x) = lgamma(x + 6) - log(x (x + 1) ... (x + 5)).
    Within float32 rounding of scipy's gammaln; cheaper than ``lax.lgamma`` on CPU."""
    x = k + 1.0
    small = x < 7.0
    y = jnp.where(small, x + 6.0, x)
    shift = jnp.where(small, x * (x + 1) * (x + 2) * (x + 3) * (x + 4) * (x + 5), 1.0)
    r = 1.0 / y
    r2 = r * r
    series = r * (1.0 / 12 - r2 * (1.0 / 360 - r2 / 1260))
    return (y - 0.5) * jnp.log(y) - y + _HALF_LOG_2PI + series - jnp.log(shift)


def _inversion(key: Array, lam: Array) -> Array:
    """Draws for lam < 10 (any other lam gives a meaningless value): k = how many of the
    CDF's first 40 values lie below one uniform."""
    u = jax.random.uniform(key, lam.shape)
    p0 = jnp.exp(-lam)

    def term(i: Array, carry: tuple[Array, Array, Array]) -> tuple[Array, Array, Array]:
        k, pmf, cdf = carry  # k: how many of F(0) .. F(i - 1) lie below u
        above = u > cdf
        pmf = pmf * lam / (i + 1).astype(lam.dtype)
        return k + above, pmf, cdf + jnp.where(above, pmf, 0.0)

    k, _, _ = lax.fori_loop(0, _TERMS, term, (jnp.zeros_like(lam), p0, p0), unroll=True)
    return k


def _ptrs_round(key: Array, lam: Array, k: Array) -> Array:
    """One round of Hörmann's PTRS (as in ``jax.random.poisson``) for lam >= 10: values
    of ``k`` still ``_PENDING`` take this round's candidate if it is accepted."""
    u, v = jax.random.uniform(key, (2, *lam.shape))
    b = 0.931 + 2.53 * jnp.sqrt(lam)
    a = -0.059 + 0.02483 * b
    inv_alpha = 1.1239 + 1.1328 / (b - 3.4)
    v_r = 0.9277 - 3.6224 / (b - 2)
    u = u - 0.5
    us = 0.5 - jnp.abs(u)
    cand = jnp.floor((2 * a / us + b) * u + lam + 0.43)
    s = jnp.log(v * inv_alpha / (a / (us * us) + b))
    t = -lam + cand * jnp.log(lam) - log_factorial(jnp.maximum(cand, 0.0))
    quick = (us >= 0.07) & (v <= v_r)
    reject = (cand < 0) | ((us < 0.013) & (v > us))
    accept = quick | (~reject & (s <= t))
    return jnp.where((k == _PENDING) & accept, cand, k)


def _rejection(key: Array, lam: Array, rounds: int) -> Array:
    """Draws for lam >= 10: ``rounds`` unrolled rounds, then a loop until none pends."""
    k = jnp.full_like(lam, _PENDING)
    for i in range(rounds):
        k = _ptrs_round(jax.random.fold_in(key, i), lam, k)

    def body(carry: tuple[Array, Array]) -> tuple[Array, Array]:
        i, k = carry
        return i + 1, _ptrs_round(jax.random.fold_in(key, i), lam, k)

    _, k = lax.while_loop(lambda c: jnp.any(c[1] == _PENDING), body, (jnp.int32(rounds), k))
    return k


def poisson(key: Array, lam: Array, *, rounds: int | None = None) -> Array:
    """Poisson(lam) draws f32[lam.shape] for lam >= 0 (f32[...]); NaN where lam is NaN or
    infinite (rather than a loop that never ends).

    The distribution of ``jax.random.poisson`` (tests: chi-square against scipy's pmf),
    not its draws. ``rounds`` (default ``ROUNDS``) sets the unrolled rejection rounds;
    any value gives the same distribution, and 0 leaves everything to the loop.
    """
    lam = jnp.asarray(lam, jnp.float32)
    shape = lam.shape
    if lam.size == 0:
        return lam
    lam = _rows(lam)
    k_small, k_large = jax.random.split(key)
    finite = jnp.isfinite(lam)
    small = lam < INVERSION_BELOW
    low = _inversion(k_small, jnp.where(small, lam, 0.0))
    high = _rejection(k_large, jnp.where(small | ~finite, _IDLE_LAM, lam),
                      ROUNDS if rounds is None else rounds)
    out = jnp.where(finite, jnp.where(small, low, high), jnp.nan)
    return out.reshape(shape)
