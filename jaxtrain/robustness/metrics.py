"""Robustness metrics (see docs ROBUSTNESS.md): calibration, corruption error, stability.

Calibration metrics are pure jnp functions of logits (or probabilities with
`from_logits=False`) and take an optional `mask` [N] so a padded eval batch
counts each real example exactly once. For test sets too large for one call,
`calibration_stats` returns additive sufficient statistics:

    stats = jax.tree.map(jnp.add, calibration_stats(l1, y1, mask=m1),
                                  calibration_stats(l2, y2, mask=m2))
    finalize_calibration(stats)  # {"accuracy", "nll", "brier", "ece"}

gives the same numbers as one call on all the data (counts are int32, so exact).

Corruption summaries (CE, mCE, relative CE) are host-side numpy over tables of
top-1 errors `err[c, s]` (corruption x severity), or dicts `{name: err[s]}`.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import numpy.typing as npt

DEFAULT_NUM_BINS = 15

# ---------------------------------------------------------------- calibration


def _validate(x_NK: jax.Array, labels_N: jax.Array, mask_N: jax.Array | None) -> None:
    n = x_NK.shape[0] if x_NK.ndim == 2 else None
    if n is None or labels_N.shape != (n,) or (mask_N is not None and mask_N.shape != (n,)):
        raise ValueError(
            "expected logits/probs [N, K], labels [N] and mask [N] or None; got "
            f"{x_NK.shape}, {labels_N.shape}, {None if mask_N is None else mask_N.shape}"
        )


def _probs_and_log_probs(x_NK: jax.Array, from_logits: bool) -> tuple[jax.Array, jax.Array]:
    x_NK = x_NK.astype(jnp.promote_types(x_NK.dtype, jnp.float32))
    if from_logits:
        log_p = jax.nn.log_softmax(x_NK, axis=-1)
        return jnp.exp(log_p), log_p
    # A zero probability of the true class gives NLL -log(tiny) ~ 87, not inf.
    return x_NK, jnp.log(jnp.maximum(x_NK, jnp.finfo(x_NK.dtype).tiny))


def calibration_stats(
    logits_NK: jax.Array,
    labels_N: jax.Array,
    num_bins: int = DEFAULT_NUM_BINS,
    *,
    mask: jax.Array | None = None,
    from_logits: bool = True,
) -> dict[str, jax.Array]:
    """Additive sufficient statistics for accuracy, NLL, Brier and ECE.

    logits_NK: float [N, K] logits (or probabilities if from_logits=False);
    labels_N: int [N]; mask: optional [N] bool or 0/1, nonzero = a real example
    (masked rows may hold anything, even NaN or label -1). num_bins is static.
    Returns {"count": int32 [], "correct": int32 [], "nll_sum": f32 [],
    "brier_sum": f32 [], "bin_count": int32 [B], "bin_correct": int32 [B],
    "bin_conf_sum": f32 [B]}. Confidence bins are equal-width, [b/B, (b+1)/B),
    the last one closed; predicted class = argmax, confidence = max prob.
    """
    logits_NK, labels_N = jnp.asarray(logits_NK), jnp.asarray(labels_N)
    mask = None if mask is None else jnp.asarray(mask)
    _validate(logits_NK, labels_N, mask)
    num_classes = logits_NK.shape[1]
    valid_N = jnp.ones(labels_N.shape, bool) if mask is None else mask.astype(bool)
    safe_labels_N = jnp.where(valid_N, labels_N, 0)

    probs_NK, log_probs_NK = _probs_and_log_probs(logits_NK, from_logits)
    pred_N = jnp.argmax(log_probs_NK, axis=-1)
    correct_N = (pred_N == labels_N) & valid_N
    conf_N = jnp.max(probs_NK, axis=-1)
    nll_N = -jnp.take_along_axis(log_probs_NK, safe_labels_N[:, None], axis=-1)[:, 0]
    onehot_NK = jax.nn.one_hot(safe_labels_N, num_classes, dtype=probs_NK.dtype)
    brier_N = jnp.sum(jnp.square(probs_NK - onehot_NK), axis=-1)
    bin_N = jnp.clip(jnp.floor(conf_N * num_bins).astype(jnp.int32), 0, num_bins - 1)

    zero_f, zero_i = jnp.zeros(num_bins, conf_N.dtype), jnp.zeros(num_bins, jnp.int32)
    return {
        "count": jnp.sum(valid_N, dtype=jnp.int32),
        "correct": jnp.sum(correct_N, dtype=jnp.int32),
        "nll_sum": jnp.sum(jnp.where(valid_N, nll_N, 0.0)),
        "brier_sum": jnp.sum(jnp.where(valid_N, brier_N, 0.0)),
        "bin_count": zero_i.at[bin_N].add(valid_N.astype(jnp.int32)),
        "bin_correct": zero_i.at[bin_N].add(correct_N.astype(jnp.int32)),
        "bin_conf_sum": zero_f.at[bin_N].add(jnp.where(valid_N, conf_N, 0.0)),
    }


def finalize_calibration(stats: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Stats from `calibration_stats` (possibly summed) -> accuracy, nll, brier, ece scalars.

    ECE = sum_b (n_b/N)|acc_b - conf_b| = sum_b |correct_b - conf_sum_b| / N
    (empty bins add 0). All are NaN when count is 0.
    """
    count = jnp.asarray(stats["count"]).astype(jnp.float32)
    gap_B = jnp.asarray(stats["bin_correct"]).astype(jnp.float32) - stats["bin_conf_sum"]
    return {
        "accuracy": jnp.asarray(stats["correct"]).astype(jnp.float32) / count,
        "nll": stats["nll_sum"] / count,
        "brier": stats["brier_sum"] / count,
        "ece": jnp.sum(jnp.abs(gap_B)) / count,
    }


def accuracy(
    logits_NK: jax.Array,
    labels_N: jax.Array,
    *,
    mask: jax.Array | None = None,
    from_logits: bool = True,
) -> jax.Array:
    """Top-1 accuracy; logits (or probs) [N, K], labels int [N], mask [N] -> f32 []."""
    stats = calibration_stats(logits_NK, labels_N, mask=mask, from_logits=from_logits)
    return finalize_calibration(stats)["accuracy"]


def nll(
    logits_NK: jax.Array,
    labels_N: jax.Array,
    *,
    mask: jax.Array | None = None,
    from_logits: bool = True,
) -> jax.Array:
    """Mean -log p_y; logits (or probs) [N, K], labels int [N], mask [N] -> f32 []."""
    stats = calibration_stats(logits_NK, labels_N, mask=mask, from_logits=from_logits)
    return finalize_calibration(stats)["nll"]


def brier(
    logits_NK: jax.Array,
    labels_N: jax.Array,
    *,
    mask: jax.Array | None = None,
    from_logits: bool = True,
) -> jax.Array:
    """Mean sum_k (p_k - 1[k=y])^2; logits (or probs) [N, K], labels [N], mask [N] -> f32 []."""
    stats = calibration_stats(logits_NK, labels_N, mask=mask, from_logits=from_logits)
    return finalize_calibration(stats)["brier"]


def ece(
    logits_NK: jax.Array,
    labels_N: jax.Array,
    num_bins: int = DEFAULT_NUM_BINS,
    *,
    mask: jax.Array | None = None,
    from_logits: bool = True,
) -> jax.Array:
    """Expected calibration error, equal-width max-prob bins; [N, K], [N], mask [N] -> f32 []."""
    stats = calibration_stats(logits_NK, labels_N, num_bins, mask=mask, from_logits=from_logits)
    return finalize_calibration(stats)["ece"]


# ---------------------------------------------------------------- corruption errors

ErrorTable = Mapping[str, npt.ArrayLike] | npt.ArrayLike  # {name: [S]} or [C, S]


def _as_table(err: ErrorTable, what: str) -> tuple[list[str] | None, np.ndarray]:
    """-> (corruption names or None, float64 [C, S])."""
    if isinstance(err, Mapping):
        names = list(err)
        rows = [np.asarray(err[name], np.float64) for name in names]
        if not rows or any(r.ndim != 1 or r.shape != rows[0].shape for r in rows):
            raise ValueError(f"{what}: expected {{corruption: errors [S]}} with one S for all")
        return names, np.stack(rows)
    table = np.asarray(err, np.float64)
    if table.ndim != 2 or table.size == 0:
        raise ValueError(
            f"{what}: expected errors shaped [corruptions, severities], got {table.shape}"
        )
    return None, table


def _aligned(
    err_model: ErrorTable, err_base: ErrorTable
) -> tuple[list[str] | None, np.ndarray, np.ndarray]:
    """Model and baseline tables row-aligned by corruption (the model's corruptions)."""
    names, model_CS = _as_table(err_model, "err_model")
    if names is None:
        if isinstance(err_base, Mapping):
            raise TypeError("err_model is an array but err_base a dict; pass both the same way")
        _, base_CS = _as_table(err_base, "err_base")
    else:
        if not isinstance(err_base, Mapping):
            raise TypeError("err_model is a dict but err_base is not; pass both the same way")
        missing = [n for n in names if n not in err_base]
        if missing:
            raise KeyError(f"baseline has no errors for corruptions {missing}")
        _, base_CS = _as_table({n: err_base[n] for n in names}, "err_base")
    if model_CS.shape != base_CS.shape:
        raise ValueError(f"model errors {model_CS.shape} and baseline {base_CS.shape} differ")
    return names, model_CS, base_CS


def _ratio(num_C: np.ndarray, den_C: np.ndarray) -> np.ndarray:
    """num / den, NaN where den == 0."""
    return np.divide(num_C, den_C, out=np.full_like(num_C, np.nan), where=den_C != 0)


def _per_corruption(names: list[str] | None, values_C: np.ndarray) -> dict[str, float] | np.ndarray:
    return values_C if names is None else {n: float(v) for n, v in zip(names, values_C)}


def mean_corruption_error(err: ErrorTable) -> float:
    """mean_{c,s} E(f, s, c): the summary without a baseline. err [C, S] or {name: [S]}."""
    return float(np.mean(_as_table(err, "err")[1]))


def corruption_errors(
    err_model: ErrorTable, err_base: ErrorTable
) -> dict[str, float] | np.ndarray:
    """CE_c = sum_s E(f,s,c) / sum_s E(base,s,c).

    Arrays [C, S] give an array [C]; dicts give a dict over the model's
    corruptions (the baseline must have each). NaN where the baseline sum is 0.
    """
    names, model_CS, base_CS = _aligned(err_model, err_base)
    return _per_corruption(names, _ratio(model_CS.sum(1), base_CS.sum(1)))


def mce(err_model: ErrorTable, err_base: ErrorTable) -> float:
    """mCE = mean over corruptions of CE_c (a ratio; papers print it x100)."""
    _, model_CS, base_CS = _aligned(err_model, err_base)
    return float(np.mean(_ratio(model_CS.sum(1), base_CS.sum(1))))


def relative_ce(
    err_model: ErrorTable,
    clean_err_model: float,
    err_base: ErrorTable,
    clean_err_base: float,
) -> dict[str, float] | np.ndarray:
    """Relative CE_c = sum_s (E(f,s,c) - E_clean(f)) / sum_s (E(base,s,c) - E_clean(base)).

    Same input/output forms as `corruption_errors`; NaN where the denominator is 0.
    """
    names, model_CS, base_CS = _aligned(err_model, err_base)
    num_C = (model_CS - float(clean_err_model)).sum(1)
    den_C = (base_CS - float(clean_err_base)).sum(1)
    return _per_corruption(names, _ratio(num_C, den_C))


def relative_mce(
    err_model: ErrorTable,
    clean_err_model: float,
    err_base: ErrorTable,
    clean_err_base: float,
) -> float:
    """Mean over corruptions of `relative_ce`."""
    rel = relative_ce(err_model, clean_err_model, err_base, clean_err_base)
    return float(np.mean(list(rel.values()) if isinstance(rel, dict) else rel))


# ---------------------------------------------------------------- stability


def flip_probability(
    preds_TN: jax.Array,
    mode: Literal["sequence", "first"] = "sequence",
    *,
    mask: jax.Array | None = None,
) -> jax.Array:
    """ImageNet-P flip probability; preds_TN int [T, N] (T >= 2 frames of N images) -> f32 [].

    "sequence": fraction of consecutive frame pairs (t-1, t) whose predictions
    differ; "first" (noise sequences): fraction of frames t >= 1 whose prediction
    differs from frame 0. mask: optional [N], nonzero = a real image.
    """
    preds_TN = jnp.asarray(preds_TN)
    if preds_TN.ndim != 2 or preds_TN.shape[0] < 2:
        raise ValueError(f"expected predictions [T >= 2, N], got {preds_TN.shape}")
    if mode == "sequence":
        ref_TN = preds_TN[:-1]
    elif mode == "first":
        ref_TN = preds_TN[:1]
    else:
        raise ValueError(f"mode must be 'sequence' or 'first', got {mode!r}")
    flips_TN = preds_TN[1:] != ref_TN
    if mask is None:
        return jnp.mean(flips_TN.astype(jnp.float32))
    valid_1N = jnp.asarray(mask).astype(bool)[None, :]
    if valid_1N.shape[1] != preds_TN.shape[1]:
        raise ValueError(f"mask {valid_1N.shape[1:]} does not match N={preds_TN.shape[1]}")
    num_pairs = jnp.sum(valid_1N).astype(jnp.float32) * (preds_TN.shape[0] - 1)
    return jnp.sum(flips_TN & valid_1N) / num_pairs
