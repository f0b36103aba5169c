"""Statistics across random seeds: summaries, intervals and paired comparisons.

ROBUSTNESS.md ("Many seeds") asks every multi-seed result to report the raw
per-seed values, mean, sample std (ddof=1), a t-interval and a percentile
bootstrap interval (>= 10k resamples), min and max; and, when comparing two
configurations with paired seeds, P(A > B) with its interval.

Everything here is host-side numpy (results are a handful of floats per seed);
scipy supplies the t quantile and the paired tests.

Bootstrap reproducibility contract: resampling is keyed by an int ``seed``.
``numpy.random.default_rng(seed).integers(0, S, size=(n_boot, S))`` draws the
resample indices once, for ``S`` seeds; every condition (column) and, in
``paired_comparison``, both the difference and the win indicator reuse the same
indices. A given ``(seed, n_boot, S)`` therefore always gives the same
resamples, whatever the number of conditions.

Conventions:
- ``n == 1``: ``std`` and both intervals are ``nan`` (one seed carries no
  information about spread; a zero-width ``(v, v)`` interval would overstate
  certainty). ``to_dict`` writes ``nan`` as ``None`` so the output is strict JSON.
- All seeds equal: ``std == 0`` and both intervals are ``(v, v)``.
- Empty input, non-finite values, ``confidence`` outside (0, 1) or
  ``n_boot < 1`` raise ``ValueError``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import scipy.stats

__all__ = [
    "AxisSummary",
    "PairedComparison",
    "SeedSummary",
    "paired_comparison",
    "summarize",
    "summarize_axis",
]

DEFAULT_N_BOOT = 10_000  # ROBUSTNESS.md: >= 10k resamples.


# --- result types ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SeedSummary:
    """Summary of one metric across seeds (see module docstring for n == 1)."""

    values: list[float]
    n: int
    mean: float
    std: float
    t_interval: tuple[float, float]
    bootstrap_interval: tuple[float, float]
    min: float
    max: float
    confidence: float
    n_boot: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict: floats, lists, ``None`` in place of ``nan``."""
        return {
            "values": [_json_float(v) for v in self.values],
            "n": self.n,
            "mean": _json_float(self.mean),
            "std": _json_float(self.std),
            "t_interval": [_json_float(v) for v in self.t_interval],
            "bootstrap_interval": [_json_float(v) for v in self.bootstrap_interval],
            "min": _json_float(self.min),
            "max": _json_float(self.max),
            "confidence": self.confidence,
            "n_boot": self.n_boot,
        }


class AxisSummary(NamedTuple):
    """Per-condition summaries; every array has the input shape minus ``axis``."""

    n: int
    mean: np.ndarray
    std: np.ndarray
    t_lo: np.ndarray
    t_hi: np.ndarray
    boot_lo: np.ndarray
    boot_hi: np.ndarray
    min: np.ndarray
    max: np.ndarray
    confidence: float
    n_boot: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict of nested lists, ``None`` in place of ``nan``."""
        out: dict[str, Any] = {"n": self.n, "confidence": self.confidence, "n_boot": self.n_boot}
        for name in ("mean", "std", "t_lo", "t_hi", "boot_lo", "boot_hi", "min", "max"):
            arr = np.asarray(getattr(self, name), dtype=np.float64)
            out[name] = _json_nested(arr.tolist())
        return out


@dataclasses.dataclass(frozen=True)
class PairedComparison:
    """A vs B over paired seeds.

    ``diff`` summarises ``a - b`` per seed (mean difference, t and bootstrap
    intervals). ``p_a_greater`` is the fraction of pairs with ``a_i > b_i``,
    exact ties counting 1/2; its interval is a percentile bootstrap over pairs
    using the same resamples as ``diff``. ``wilcoxon_p`` (signed-rank, zero
    differences dropped) and ``sign_test_p`` (binomial on non-tied pairs) are
    two-sided; both are 1.0 when every pair ties.
    """

    n: int
    diff: SeedSummary
    p_a_greater: float
    p_a_greater_interval: tuple[float, float]
    wilcoxon_p: float
    sign_test_p: float

    @property
    def mean_diff(self) -> float:
        """Mean of ``a - b`` over seeds."""
        return self.diff.mean

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict; ``diff`` nested as ``SeedSummary.to_dict()``."""
        return {
            "n": self.n,
            "mean_diff": _json_float(self.mean_diff),
            "diff": self.diff.to_dict(),
            "p_a_greater": _json_float(self.p_a_greater),
            "p_a_greater_interval": [_json_float(v) for v in self.p_a_greater_interval],
            "wilcoxon_p": _json_float(self.wilcoxon_p),
            "sign_test_p": _json_float(self.sign_test_p),
        }


# --- public functions --------------------------------------------------------


def summarize(
    values: npt.ArrayLike,
    *,
    confidence: float = 0.95,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
) -> SeedSummary:
    """Summarise one metric over seeds; ``values`` is 1-D ``[S]``, S >= 1."""
    values_S = _as_finite_float(values, "values")
    if values_S.ndim != 1:
        raise ValueError(f"values must be 1-D [num_seeds], got shape {values_S.shape}")
    s = summarize_axis(values_S, axis=0, confidence=confidence, n_boot=n_boot, seed=seed)
    return _seed_summary(values_S, s, 0)


def summarize_axis(
    values: npt.ArrayLike,
    axis: int = 0,
    *,
    confidence: float = 0.95,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
) -> AxisSummary:
    """Summarise every condition at once; ``axis`` indexes seeds (e.g. ``[S, K]``).

    The bootstrap is vectorised: one ``[n_boot, S]`` index draw (module
    docstring) turned into resample counts, then one matmul with the centred
    ``[S, K]`` values. Memory is O(n_boot * (S + K)) floats. Column ``k`` equals
    ``summarize(values[:, k])`` with the same seed, up to float rounding.
    """
    _check_options(confidence, n_boot, seed)
    arr = _as_finite_float(values, "values")
    if arr.ndim == 0:
        raise ValueError("values must have a seed axis; got a scalar")
    arr_SxK = np.moveaxis(arr, axis, 0)
    out_shape = arr_SxK.shape[1:]
    n = arr_SxK.shape[0]
    if n == 0:
        raise ValueError("values is empty along the seed axis; need at least one seed")
    arr_SxK = arr_SxK.reshape(n, -1)

    lo_K, hi_K = arr_SxK.min(axis=0), arr_SxK.max(axis=0)
    # The true mean lies in [min, max]; clip so rounding cannot push it out.
    mean_K = np.clip(arr_SxK.mean(axis=0), lo_K, hi_K)
    nan_K = np.full_like(mean_K, np.nan)
    if n == 1:
        std_K, t_lo, t_hi, b_lo, b_hi = nan_K, nan_K, nan_K, nan_K, nan_K
    else:
        # Constant columns get exactly 0 (np.std can leave ~1e-17 of rounding).
        std_K = np.where(lo_K == hi_K, 0.0, arr_SxK.std(axis=0, ddof=1))
        half_K = scipy.stats.t.ppf(0.5 + confidence / 2, n - 1) * std_K / math.sqrt(n)
        t_lo, t_hi = mean_K - half_K, mean_K + half_K
        b_lo, b_hi = _bootstrap_mean_interval(arr_SxK, mean_K, lo_K, hi_K, confidence, n_boot, seed)

    def shaped(x: np.ndarray) -> np.ndarray:
        return x.reshape(out_shape)

    return AxisSummary(
        n=n,
        mean=shaped(mean_K),
        std=shaped(std_K),
        t_lo=shaped(t_lo),
        t_hi=shaped(t_hi),
        boot_lo=shaped(b_lo),
        boot_hi=shaped(b_hi),
        min=shaped(lo_K),
        max=shaped(hi_K),
        confidence=float(confidence),
        n_boot=int(n_boot),
    )


def paired_comparison(
    a: npt.ArrayLike,
    b: npt.ArrayLike,
    *,
    confidence: float = 0.95,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
) -> PairedComparison:
    """Compare configurations A and B run on the same seeds; ``a[i]`` pairs ``b[i]``."""
    a_S = _as_finite_float(a, "a")
    b_S = _as_finite_float(b, "b")
    if a_S.ndim != 1 or a_S.shape != b_S.shape:
        raise ValueError(
            "a and b must be 1-D with one value per seed, same length; "
            f"got {a_S.shape}, {b_S.shape}"
        )
    if a_S.size == 0:
        raise ValueError("a and b are empty; need at least one paired seed")
    diff_S = a_S - b_S
    win_S = (a_S > b_S) + 0.5 * (a_S == b_S)
    # One call so the difference and the win indicator share bootstrap resamples.
    s = summarize_axis(
        np.stack([diff_S, win_S], axis=1), axis=0, confidence=confidence, n_boot=n_boot, seed=seed
    )
    return PairedComparison(
        n=int(a_S.size),
        diff=_seed_summary(diff_S, s, 0),
        p_a_greater=float(win_S.mean()),
        p_a_greater_interval=(float(s.boot_lo[1]), float(s.boot_hi[1])),
        wilcoxon_p=_wilcoxon_p(diff_S),
        sign_test_p=_sign_test_p(diff_S),
    )


# --- helpers -----------------------------------------------------------------


def _bootstrap_mean_interval(
    arr_SxK: np.ndarray,
    mean_K: np.ndarray,
    lo_K: np.ndarray,
    hi_K: np.ndarray,
    confidence: float,
    n_boot: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval of the mean, per column."""
    n = arr_SxK.shape[0]
    idx_BxS = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    rows_BxS = np.arange(n_boot)[:, None] * n
    counts_BxS = np.bincount((rows_BxS + idx_BxS).ravel(), minlength=n_boot * n)
    counts_BxS = counts_BxS.reshape(n_boot, n).astype(np.float64)
    # Centring keeps constant columns exact; resampled means lie in [min, max].
    means_BxK = mean_K + counts_BxS @ (arr_SxK - mean_K) / n
    means_BxK = np.clip(means_BxK, lo_K, hi_K)
    alpha = 1.0 - confidence
    q_lo, q_hi = np.quantile(means_BxK, [alpha / 2, 1 - alpha / 2], axis=0)
    return q_lo, q_hi


def _seed_summary(values_S: np.ndarray, s: AxisSummary, k: int) -> SeedSummary:
    """Column ``k`` of an [S, K] ``AxisSummary`` as a ``SeedSummary``."""

    def col(x: np.ndarray) -> float:
        return float(np.asarray(x).reshape(-1)[k])

    return SeedSummary(
        values=[float(v) for v in values_S],
        n=s.n,
        mean=col(s.mean),
        std=col(s.std),
        t_interval=(col(s.t_lo), col(s.t_hi)),
        bootstrap_interval=(col(s.boot_lo), col(s.boot_hi)),
        min=col(s.min),
        max=col(s.max),
        confidence=s.confidence,
        n_boot=s.n_boot,
    )


def _wilcoxon_p(diff_S: np.ndarray) -> float:
    if not np.any(diff_S):
        return 1.0  # every pair ties: no evidence either way
    return float(scipy.stats.wilcoxon(diff_S).pvalue)


def _sign_test_p(diff_S: np.ndarray) -> float:
    wins, losses = int(np.sum(diff_S > 0)), int(np.sum(diff_S < 0))
    if wins + losses == 0:
        return 1.0
    return float(scipy.stats.binomtest(wins, wins + losses, 0.5).pvalue)


def _as_finite_float(values: npt.ArrayLike, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        raise ValueError(f"{name} is empty; need at least one seed")
    bad = ~np.isfinite(arr)
    if bad.any():
        where = np.argwhere(bad)[:5].tolist()
        raise ValueError(
            f"{name} has {int(bad.sum())} non-finite value(s) (nan/inf) at index {where}; "
            "a diverged seed must be reported, not summarised"
        )
    return arr


def _check_options(confidence: float, n_boot: int, seed: int) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive int, got {n_boot!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")


def _json_float(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _json_nested(x: Any) -> Any:
    if isinstance(x, list):
        return [_json_nested(v) for v in x]
    return _json_float(x)
