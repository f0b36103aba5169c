"""Robustness reports: every number in ``report.json``, tables in ``report.md``, PNG plots.

``build_report`` turns a ``suite.SuiteResult`` (host sums, leading seed axis) into a
JSON-ready dict: per-seed values of every metric, and across seeds their mean,
sample std, 95% t-interval and percentile-bootstrap interval, min and max
(``jaxtrain.stats``). A single run has one seed (intervals are ``null``).

Metric layout: a scalar metric is ``SeedSummary.to_dict()`` (``values`` per seed,
``mean``, ``std``, ``t_interval``, ``bootstrap_interval``, ``min``, ``max``); a
metric over conditions (severities, epsilons, frames) is ``AxisSummary.to_dict()``
(``mean``, ``t_lo``, ``t_hi``, ``boot_lo``, ``boot_hi``, ... lists) plus ``values``
(``[seed][condition]``).

Top-level keys: ``schema``, ``run``, ``setup``, ``notes``, ``clean``,
``corruptions[name]`` (accuracy, error, ece, nll, brier over severities, and
reliability ``bins`` pooled over seeds), ``by_severity`` (means over corruptions),
``summary`` (clean accuracy/error, mean corruption error, and with a baseline
``ce`` / ``mce`` / ``relative_ce`` / ``relative_mce``; flip probabilities),
``stability``, ``attacks``, optionally ``cifar10_corrupted``, ``timing``.

Plots use matplotlib's object API with the Agg canvas (imported lazily; no pyplot
state is touched).
"""

from __future__ import annotations

import datetime
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxtrain.robustness import metrics as M
from jaxtrain.robustness.suite import RANDOM_CORRUPTIONS, RobustnessError, SuiteResult, finalize
from jaxtrain.stats import DEFAULT_N_BOOT, summarize, summarize_axis

SCHEMA = "jaxtrain.robustness.report/1"
METRICS = ("accuracy", "error", "ece", "nll", "brier")
PLOTS = ("accuracy_vs_severity.png", "robust_accuracy_vs_eps.png", "calibration.png",
         "stability.png", "cifar10_corrupted_accuracy.png")


# ----------------------------------------------------------------------------- statistics


def _json(x: Any) -> Any:
    """Floats (``None`` for NaN/inf), ints and nested lists of them."""
    if isinstance(x, dict):
        return {k: _json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json(v) for v in x]
    if isinstance(x, np.ndarray):
        return _json(x.tolist())
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


def scalar_stat(values_S: Sequence[float], n_boot: int = DEFAULT_N_BOOT) -> dict[str, Any]:
    """One metric over seeds: ``SeedSummary.to_dict()`` (or the values alone when some
    are not finite, e.g. an empty condition)."""
    v = np.asarray(values_S, np.float64).reshape(-1)
    if not np.all(np.isfinite(v)):
        return {"values": _json(v), "n": len(v), "mean": None}
    return summarize(v, n_boot=n_boot).to_dict()


def array_stat(values_SX: np.ndarray, n_boot: int = DEFAULT_N_BOOT) -> dict[str, Any]:
    """A metric over conditions ``[S, X...]``: per-condition summaries plus ``values``."""
    v = np.asarray(values_SX, np.float64)
    if not np.all(np.isfinite(v)):
        return {"values": _json(v), "n": v.shape[0], "mean": _json(np.nanmean(v, axis=0))}
    return {"values": _json(v), **summarize_axis(v, axis=0, n_boot=n_boot).to_dict()}


def _bins(stats: Mapping[str, np.ndarray], pool_axes: tuple[int, ...] = ()) -> dict[str, Any]:
    return {"count": _json(np.sum(stats["bin_count"], axis=pool_axes)),
            "correct": _json(np.sum(stats["bin_correct"], axis=pool_axes)),
            "conf_sum": _json(np.sum(stats["bin_conf_sum"], axis=pool_axes))}


def _metric_section(sums: Mapping[str, Mapping[str, np.ndarray]], n_boot: int) -> dict[str, Any]:
    """``{name: {metric: array_stat over severities, "bins": pooled over seeds [V][B]}}``."""
    out = {}
    for name, stats in sums.items():
        fin = finalize(stats)
        out[name] = {m: array_stat(fin[m], n_boot) for m in METRICS}
        out[name]["bins"] = _bins(stats, (0,))
    return out


# ----------------------------------------------------------------------------- baseline


def load_baseline(path: str) -> dict[str, Any]:
    """A report.json written by this module (raises ``RobustnessError`` otherwise)."""
    try:
        with open(path) as f:
            report = json.load(f)
    except (OSError, ValueError) as e:
        raise RobustnessError(f"--baseline {path} cannot be read as JSON "
                              f"({type(e).__name__})") from None
    if not isinstance(report, dict) or report.get("schema") != SCHEMA:
        raise RobustnessError(f"--baseline {path} is not a robustness report.json "
                              f"(schema {SCHEMA})")
    return report


def baseline_errors(
    baseline: Mapping[str, Any], names: Sequence[str], severities: Sequence[int],
    section: str = "corruptions",
) -> tuple[dict[str, np.ndarray], float]:
    """The baseline's mean errors ``{name: [V]}`` at ``severities`` and its clean error.

    Seed-run baselines give their means over seeds. Raises ``RobustnessError`` naming
    what the baseline lacks."""
    if section == "corruptions":
        sev, table = baseline.get("setup", {}).get("severities", []), baseline.get(section, {})
        clean = baseline.get("clean", {}).get("error", {}).get("mean")
    else:
        part = baseline.get(section) or {}
        sev, table = part.get("severities", []), part.get("corruptions", {})
        clean = baseline.get("clean", {}).get("error", {}).get("mean")
    missing_sev = [s for s in severities if s not in sev]
    if missing_sev:
        raise RobustnessError(f"the baseline has no {section} results at severities {missing_sev}")
    cols = [list(sev).index(s) for s in severities]
    out = {}
    for n in names:
        if n not in table:
            raise RobustnessError(f"the baseline report has no {section} results for {n!r}; "
                                  "evaluate it with the same --corruptions")
        means = table[n]["error"]["mean"]
        out[n] = np.asarray([means[c] for c in cols], np.float64)
    if clean is None:
        raise RobustnessError("the baseline report has no clean error")
    return out, float(clean)


def _against_baseline(err_SCV: np.ndarray, clean_err_S: np.ndarray, names: Sequence[str],
                      base: Mapping[str, np.ndarray], base_clean: float,
                      n_boot: int) -> dict[str, Any]:
    """CE / mCE and relative CE / mCE per seed (``metrics``), summarized over seeds."""
    ce, rel = [], []
    for err_CV, clean in zip(err_SCV, clean_err_S):
        model = {n: err_CV[i] for i, n in enumerate(names)}
        ce.append([M.corruption_errors(model, base)[n] for n in names])
        rel.append([M.relative_ce(model, clean, base, base_clean)[n] for n in names])
    ce_SC, rel_SC = np.asarray(ce), np.asarray(rel)
    return {
        "ce": {n: scalar_stat(ce_SC[:, i], n_boot) for i, n in enumerate(names)},
        "mce": scalar_stat(ce_SC.mean(axis=1), n_boot),
        "relative_ce": {n: scalar_stat(rel_SC[:, i], n_boot) for i, n in enumerate(names)},
        "relative_mce": scalar_stat(rel_SC.mean(axis=1), n_boot),
    }


# ----------------------------------------------------------------------------- the report


def build_report(
    result: SuiteResult,
    *,
    run: Mapping[str, Any] | None = None,
    baseline: Mapping[str, Any] | None = None,
    baseline_path: str = "",
    cifar10_corrupted: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    devices: Mapping[str, Any] | None = None,
    image_channels: int | None = None,
    n_boot: int = DEFAULT_N_BOOT,
) -> dict[str, Any]:
    """The report dict (strict JSON after ``_json``) of a suite result; see the module
    docstring for its layout. ``baseline``: another run's report (``load_baseline``)."""
    spec = result.spec
    names = list(result.corruptions)
    run = dict(run or {})
    seeds = run.get("seeds") or list(range(result.num_seeds))
    rep: dict[str, Any] = {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "run": {**run, "num_seeds": result.num_seeds, "seeds": seeds,
                "test_examples": result.num_examples},
        "setup": {
            "preset": spec.preset, "severities": list(spec.severities),
            "num_keys": spec.num_keys, "corruptions": names,
            "random_corruptions": [n for n in names if n in RANDOM_CORRUPTIONS],
            "flip_noises": list(spec.flip_noises), "flip_frames": spec.flip_frames,
            "noise_seed": spec.seed, "num_bins": spec.num_bins, "n_boot": n_boot,
            "interval": "95% t-interval and percentile bootstrap over seeds",
            "devices": dict(devices or {}),
        },
    }
    # clean
    clean_fin = finalize(result.clean) if result.clean else None
    if clean_fin is not None:
        rep["clean"] = {m: scalar_stat(clean_fin[m], n_boot) for m in METRICS}
        rep["clean"]["bins"] = _bins(result.clean)  # per seed
    # corruptions
    rep["corruptions"] = _metric_section(result.corruptions, n_boot)
    summary: dict[str, Any] = {}
    if clean_fin is not None:
        summary["clean_accuracy"] = rep["clean"]["accuracy"]
        summary["clean_error"] = rep["clean"]["error"]
    if names:
        fins = {n: finalize(result.corruptions[n]) for n in names}
        per_metric = {m: np.stack([fins[n][m] for n in names], axis=1) for m in METRICS}  # [S, C, V]
        rep["by_severity"] = {m: array_stat(v.mean(axis=1), n_boot) for m, v in per_metric.items()}
        rep["by_severity"]["bins"] = _bins(
            {k: np.stack([result.corruptions[n][k] for n in names]) for k in
             ("bin_count", "bin_correct", "bin_conf_sum")}, (0, 1))
        err_SCV = per_metric["error"]
        summary["mean_corruption_error"] = scalar_stat(
            [M.mean_corruption_error(e) for e in err_SCV], n_boot)
        summary["mean_corruption_accuracy"] = scalar_stat(
            per_metric["accuracy"].mean(axis=(1, 2)), n_boot)
        if baseline is not None and clean_fin is not None:
            base, base_clean = baseline_errors(baseline, names, spec.severities)
            summary.update(_against_baseline(err_SCV, clean_fin["error"], names, base,
                                             base_clean, n_boot))
            summary["baseline"] = {"path": baseline_path,
                                   "run": dict(baseline.get("run", {})),
                                   "clean_error": base_clean,
                                   "errors": {n: _json(base[n]) for n in names}}
    # stability
    rep["stability"] = {}
    for name, f in result.flips.items():
        rate_ST = np.asarray(f["flips"], np.float64) / max(f["count"], 1)
        rep["stability"][name] = {
            "levels": _json(np.asarray(f["levels"], np.float64)),
            "flip_rate": array_stat(rate_ST, n_boot),
            "flip_probability": scalar_stat(rate_ST.mean(axis=1), n_boot),
        }
    if rep["stability"]:
        summary["flip_probability"] = {n: s["flip_probability"] for n, s in rep["stability"].items()}
    # attacks
    rep["attacks"] = {}
    for a in spec.attacks:
        if a.method not in result.attacks:
            continue
        r = result.attacks[a.method]
        rep["attacks"][a.method] = {
            "norm": a.norm, "steps": a.steps, "eps": list(a.eps), "alpha": list(a.alphas),
            "robust_accuracy": array_stat(np.asarray(r["correct"], np.float64) / r["count"], n_boot),
        }
    # the published benchmark
    if cifar10_corrupted:
        rep["cifar10_corrupted"] = _published_section(
            cifar10_corrupted, spec.severities, clean_fin, baseline, n_boot)
        if "summary" in rep["cifar10_corrupted"]:
            summary["cifar10_corrupted"] = rep["cifar10_corrupted"]["summary"]
    rep["summary"] = summary
    rep["notes"] = _notes(rep, image_channels, baseline is not None)
    rep["timing"] = result.timing()
    return _json(rep)


def _published_section(sums: Mapping[str, Mapping[str, np.ndarray]], severities: Sequence[int],
                       clean_fin: Mapping[str, np.ndarray] | None,
                       baseline: Mapping[str, Any] | None, n_boot: int) -> dict[str, Any]:
    from jaxtrain.robustness.tfds_c import MCE_CORRUPTIONS

    names = list(sums)
    section: dict[str, Any] = {"severities": list(severities),
                               "corruptions": _metric_section(sums, n_boot)}
    err_SCV = np.stack([finalize(sums[n])["error"] for n in names], axis=1)
    standard = [i for i, n in enumerate(names) if n in MCE_CORRUPTIONS]
    summary = {"mean_corruption_error": scalar_stat(err_SCV.mean(axis=(1, 2)), n_boot),
               "corruptions": names}
    if standard:
        summary["mean_corruption_error_15"] = scalar_stat(
            err_SCV[:, standard].mean(axis=(1, 2)), n_boot)
    if baseline is not None and baseline.get("cifar10_corrupted") and clean_fin is not None:
        base, base_clean = baseline_errors(baseline, names, severities, "cifar10_corrupted")
        summary.update(_against_baseline(err_SCV, clean_fin["error"], names, base, base_clean,
                                         n_boot))
    section["summary"] = summary
    return section


def _notes(rep: Mapping[str, Any], channels: int | None, with_baseline: bool) -> list[str]:
    setup = rep["setup"]
    notes = [
        ("Each random corruption draws its noise per test example from a key that depends only "
         "on the corruption, the key index and the example, the same at every severity and "
         "for every seed (common random numbers): differences between severities and between "
         "seeds are not differences of noise draws."),
        (f"Deterministic corruptions are evaluated once per severity; random ones "
         f"({', '.join(setup['random_corruptions']) or 'none'}) with {setup['num_keys']} noise "
         f"key(s) each."),
        ("Mean corruption error = mean over the corruptions and severities evaluated here of "
         "the top-1 error. CE and mCE (Hendrycks & Dietterich 2019) are relative to the "
         "--baseline report and over the corruptions evaluated here, which are not the 15 of "
         "ImageNet-C (mCE over those needs the published cifar10_corrupted images)."),
        ("Flip probability: frame t of a noise sequence adds noise of t/(T-1) times the "
         "preset's severity-5 level (frame 0 is clean); each frame is compared with the "
         "first (ImageNet-P noise sequences)."),
        ("Robust accuracy counts an example as broken when it is already misclassified "
         "clean; eps = 0 in the plots is the clean accuracy."),
    ]
    if channels == 1:
        notes.insert(0, "One-channel images: brightness is x + c (no HSV), and saturate is the "
                        "identity, so its accuracy equals the clean accuracy.")
    if not with_baseline:
        notes.append("No --baseline given: CE / mCE are not reported.")
    return notes


def headline(report: Mapping[str, Any]) -> dict[str, Any]:
    """A few figures for ``summary.json`` and logs (means over seeds)."""
    s = report.get("summary", {})
    out: dict[str, Any] = {"num_seeds": report["run"]["num_seeds"]}
    for key in ("clean_accuracy", "mean_corruption_error", "mce", "relative_mce"):
        if key in s:
            out[key] = s[key]["mean"]
            if s[key].get("t_interval"):
                out[f"{key}_t_interval"] = s[key]["t_interval"]
    for name, f in s.get("flip_probability", {}).items():
        out[f"flip_probability_{name}"] = f["mean"]
    for method, a in report.get("attacks", {}).items():
        out[f"robust_accuracy_{method}"] = dict(zip(map(str, a["eps"]), a["robust_accuracy"]["mean"]))
    if "cifar10_corrupted" in s:
        out["cifar10_corrupted_mean_corruption_error"] = s["cifar10_corrupted"][
            "mean_corruption_error"]["mean"]
    return out


# ----------------------------------------------------------------------------- markdown


def _f(x: Any, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _cell(stat: Mapping[str, Any], j: int | None = None, digits: int = 3) -> str:
    """``mean [t_lo, t_hi]`` of a scalar stat, or of condition ``j`` of an array stat."""
    if j is None:
        mean, ci = stat.get("mean"), stat.get("t_interval") or [None, None]
    else:
        mean = (stat.get("mean") or [None] * (j + 1))[j]
        ci = [(stat.get("t_lo") or [None] * (j + 1))[j], (stat.get("t_hi") or [None] * (j + 1))[j]]
    if ci[0] is None:
        return _f(mean, digits)
    return f"{_f(mean, digits)} [{_f(ci[0], digits)}, {_f(ci[1], digits)}]"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines + [""]


def render_markdown(report: Mapping[str, Any]) -> str:
    """The tables of ``report.md`` (cells: mean over seeds [95% t-interval])."""
    run, setup, summary = report["run"], report["setup"], report.get("summary", {})
    n = run["num_seeds"]
    seeds = run.get("seeds") or []
    sev = setup["severities"]
    title = os.path.basename(str(run.get("workdir", "")).rstrip("/")) or "run"
    lines = [f"# Robustness report: {title}", ""]
    shape = "x".join(map(str, run.get("image_shape") or []))
    seed_text = (f"{n} seeds ({seeds[0]}..{seeds[-1]}), each cell the mean over seeds "
                 f"[95% t-interval]" if n > 1 else "1 seed")
    lines += [
        (f"Model `{run.get('model')}` trained on `{run.get('dataset')}` ({shape}, "
         f"{run.get('num_classes')} classes), checkpoint step {run.get('checkpoint_step')}, "
         f"{run['test_examples']} test examples; {seed_text}. Corruption parameters: "
         f"`{setup['preset']}` preset (ROBUSTNESS.md), {setup['num_keys']} noise key(s) per "
         f"random condition. Per-seed values and bootstrap intervals are in `report.json`."),
        "",
    ]
    # summary
    rows = []
    labels = [("clean_accuracy", "clean accuracy"), ("clean_error", "clean error"),
              ("mean_corruption_error", "mean corruption error"),
              ("mce", "mCE (vs baseline)"), ("relative_mce", "relative mCE (vs baseline)")]
    for key, label in labels:
        if key in summary:
            rows.append(_summary_row(label, summary[key]))
    for name, st in summary.get("flip_probability", {}).items():
        rows.append(_summary_row(f"flip probability ({name}, {setup['flip_frames']} frames)", st))
    for method, a in report.get("attacks", {}).items():
        j = len(a["eps"]) // 2
        rows.append(_summary_row(f"robust accuracy ({method}, eps {a['eps'][j]:.4g})",
                                 _pick(a["robust_accuracy"], j)))
    pub = summary.get("cifar10_corrupted", {})
    for key, label in (("mean_corruption_error", "cifar10_corrupted mean corruption error"),
                       ("mean_corruption_error_15", ("cifar10_corrupted mean corruption error "
                                                    "(15 of mCE)")),
                       ("mce", "cifar10_corrupted mCE (vs baseline)")):
        if key in pub:
            rows.append(_summary_row(label, pub[key]))
    lines += ["## Summary", ""]
    lines += _table(["metric", "mean", "95% t-interval", "95% bootstrap", "std", "min", "max"], rows)
    # accuracy per corruption and severity
    if report.get("corruptions"):
        lines += ["## Accuracy per corruption and severity", ""]
        if "clean" in report:
            lines += [f"Clean accuracy: {_cell(report['clean']['accuracy'])}.", ""]
        rows = []
        for name, m in report["corruptions"].items():
            acc = m["accuracy"]
            mean_over = _mean_over_severities(acc)
            rows.append([name] + [_cell(acc, j) for j in range(len(sev))] + [mean_over])
        if "by_severity" in report:
            acc = report["by_severity"]["accuracy"]
            rows.append(["**mean**"] + [_cell(acc, j) for j in range(len(sev))]
                        + [_mean_over_severities(acc)])
        lines += _table(["corruption"] + [f"severity {s}" for s in sev] + ["mean"], rows)
    if "ce" in summary:
        lines += ["## Corruption errors against the baseline", "",
                  (f"Baseline: `{summary.get('baseline', {}).get('path', '')}` (clean error "
                   f"{_f(summary.get('baseline', {}).get('clean_error'))})."), ""]
        rows = [[n, _cell(summary["ce"][n]), _cell(summary["relative_ce"][n])]
                for n in summary["ce"]]
        rows.append(["**mCE / relative mCE**", _cell(summary["mce"]), _cell(summary["relative_mce"])])
        lines += _table(["corruption", "CE", "relative CE"], rows)
    # attacks
    if report.get("attacks"):
        lines += ["## Adversarial robustness", "",
                  ("Robust accuracy (correct on the clean image and under the attack); alpha = "
                   "step size."), ""]
        for norm in ("linf", "l2"):
            group = {k: a for k, a in report["attacks"].items() if a["norm"] == norm}
            if not group:
                continue
            eps = sorted({e for a in group.values() for e in a["eps"]})
            rows = []
            for method, a in group.items():
                cells = [_cell(a["robust_accuracy"], a["eps"].index(e)) if e in a["eps"] else "-"
                         for e in eps]
                steps = "1" if method == "fgsm" else str(a["steps"])
                rows.append([method, steps] + cells)
            lines += [f"{'Linf' if norm == 'linf' else 'L2'} budgets:", ""]
            lines += _table(["attack", "steps"] + [f"eps {e:.4g}" for e in eps], rows)
    # calibration
    if "clean" in report:
        lines += ["## Calibration under shift", "",
                  ("ECE with 15 equal-width confidence bins; severity rows average the "
                   "corruptions evaluated."), ""]
        rows = [["clean"] + [_cell(report["clean"][m]) for m in ("accuracy", "ece", "nll", "brier")]]
        if "by_severity" in report:
            b = report["by_severity"]
            for j, s in enumerate(sev):
                rows.append([f"severity {s}"] + [_cell(b[m], j) for m in
                                                 ("accuracy", "ece", "nll", "brier")])
        lines += _table(["condition", "accuracy", "ECE", "NLL", "Brier"], rows)
    # stability
    if report.get("stability"):
        lines += ["## Stability under noise sequences", ""]
        rows = [[name, str(len(st["levels"])), _f(st["levels"][-1], 3),
                 _cell(st["flip_probability"])] for name, st in report["stability"].items()]
        lines += _table(["noise", "frames", "last frame level", "flip probability"], rows)
    # published benchmark
    if report.get("cifar10_corrupted"):
        section = report["cifar10_corrupted"]
        lines += ["## cifar10_corrupted (published CIFAR-10-C images)", ""]
        rows = [[name] + [_cell(m["accuracy"], j) for j in range(len(section["severities"]))]
                + [_mean_over_severities(m["accuracy"])]
                for name, m in section["corruptions"].items()]
        lines += _table(["corruption"] + [f"severity {s}" for s in section["severities"]]
                        + ["mean"], rows)
    # plots and notes
    lines += ["## Plots", ""]
    for name, caption in (("accuracy_vs_severity.png", "accuracy vs severity"),
                          ("robust_accuracy_vs_eps.png", "robust accuracy vs epsilon"),
                          ("calibration.png", "calibration"), ("stability.png", "stability"),
                          ("cifar10_corrupted_accuracy.png", "cifar10_corrupted accuracy")):
        if name in report.get("files", []):
            lines += [f"![{caption}]({name})", ""]
    lines += ["## Notes", ""] + [f"- {note}" for note in report.get("notes", [])] + [""]
    timing = report.get("timing", [])
    if timing:
        total = sum(t["seconds"] + t.get("compile_seconds", 0.0) for t in timing)
        lines += [f"Evaluated in {total:.1f} s ("
                  + ", ".join(f"{t['program']} {t['seconds'] + t.get('compile_seconds', 0):.1f} s"
                              for t in timing) + "), compile included.", ""]
    return "\n".join(lines)


def _pick(stat: Mapping[str, Any], j: int) -> dict[str, Any]:
    """Condition ``j`` of an array stat as a scalar stat (for the summary table)."""
    get = lambda k: (stat.get(k) or [None] * (j + 1))[j]
    return {"mean": get("mean"), "std": get("std"), "t_interval": [get("t_lo"), get("t_hi")],
            "bootstrap_interval": [get("boot_lo"), get("boot_hi")], "min": get("min"),
            "max": get("max")}


def _summary_row(label: str, st: Mapping[str, Any]) -> list[str]:
    t = st.get("t_interval") or [None, None]
    b = st.get("bootstrap_interval") or [None, None]
    ci = lambda iv: "-" if iv[0] is None else f"[{_f(iv[0])}, {_f(iv[1])}]"
    return [label, _f(st.get("mean")), ci(t), ci(b), _f(st.get("std")), _f(st.get("min")),
            _f(st.get("max"))]


def _mean_over_severities(stat: Mapping[str, Any]) -> str:
    values = np.asarray(stat["values"], np.float64)  # [S, V]
    per_seed = values.mean(axis=1)
    if len(per_seed) > 1 and np.all(np.isfinite(per_seed)):
        s = summarize(per_seed, n_boot=1)
        return f"{_f(s.mean)} [{_f(s.t_interval[0])}, {_f(s.t_interval[1])}]"
    return _f(float(np.mean(per_seed)))


# ----------------------------------------------------------------------------- plots


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _band(ax, x, stat: Mapping[str, Any], color: str, label: str | None, *, marker: str = "o",
          linestyle: str = "-") -> None:
    """Mean line; with several seeds a 95% t-interval band and a lighter min-max band."""
    mean = np.asarray(stat["mean"], np.float64)
    ax.plot(x, mean, color=color, marker=marker, markersize=3.5, linewidth=1.6, label=label,
            linestyle=linestyle, zorder=3)
    if stat.get("t_lo") is not None and stat.get("n", 1) > 1:
        ax.fill_between(x, np.asarray(stat["min"], float), np.asarray(stat["max"], float),
                        color=color, alpha=0.12, linewidth=0, zorder=1)
        ax.fill_between(x, np.asarray(stat["t_lo"], float), np.asarray(stat["t_hi"], float),
                        color=color, alpha=0.35, linewidth=0, zorder=2)


def _with_clean(clean: Mapping[str, Any] | None, stat: Mapping[str, Any]) -> dict[str, Any]:
    """An array stat with the clean value prepended (severity or eps 0)."""
    if clean is None:
        return dict(stat)
    out = {"n": stat.get("n", 1)}
    pairs = {"mean": "mean", "t_lo": "t_interval", "t_hi": "t_interval", "min": "min", "max": "max"}
    for k, ck in pairs.items():
        if stat.get(k) is None:
            out[k] = None
            continue
        c = clean.get(ck)
        c = (c[0] if k == "t_lo" else c[1]) if isinstance(c, list) else c
        out[k] = [c if c is not None else np.nan] + list(stat[k])
    return out


def _seed_caption(n: int) -> str:
    return (f"line: mean of {n} seeds; dark band: 95% t-interval of the mean; light band: "
            "min-max over seeds" if n > 1 else "one seed")


def _band_legend(n: int, color: str = "tab:blue") -> list[Any]:
    """Legend entries for the two bands (none for one seed)."""
    if n <= 1:
        return []
    from matplotlib.patches import Patch

    return [Patch(color=color, alpha=0.35, label="95% t-interval (seeds)"),
            Patch(color=color, alpha=0.12, label="min-max over seeds")]


def plot_accuracy_vs_severity(report: Mapping[str, Any], path: str, *,
                              section: str = "corruptions", title: str = "") -> None:
    """Small multiples: accuracy vs severity (0 = clean) per corruption, seed bands, baseline
    dashed. Each panel has its own accuracy range (at least 0.1 wide) so the spread across
    seeds stays visible; compare panels by their tick labels."""
    from matplotlib.lines import Line2D

    if section == "corruptions":
        table, sev = report["corruptions"], report["setup"]["severities"]
    else:
        table, sev = report[section]["corruptions"], report[section]["severities"]
    names = list(table)
    n_seeds = report["run"]["num_seeds"]
    ncols = min(5, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig = _figure(2.8 * ncols + 0.4, 2.35 * nrows + 1.2)
    axes = fig.subplots(nrows, ncols, sharex=True, squeeze=False)
    clean = report.get("clean", {}).get("accuracy")
    x = [0, *sev]
    baseline = report.get("summary", {}).get("baseline") if section == "corruptions" else None
    for i, ax in enumerate(axes.flat):
        if i >= len(names):
            ax.set_visible(False)
            continue
        name = names[i]
        st = _with_clean(clean, table[name]["accuracy"])
        _band(ax, x, st, "tab:blue", None)
        lows = [v for v in (st.get("min") or []) + list(st["mean"]) if v is not None]
        if baseline is not None and name in baseline.get("errors", {}):
            base = [1 - baseline["clean_error"], *(1 - np.asarray(baseline["errors"][name]))]
            ax.plot(x, base, color="0.35", linestyle="--", linewidth=1.2)
            lows += base
        lo = min(lows) if lows else 0.0
        y0 = max(0.0, min(math.floor((lo - 0.02) * 20) / 20, 0.9))
        ax.set_ylim(y0, 1.0 + (1.0 - y0) * 0.03)
        ax.set_title(name, fontsize=10)
        ax.set_xticks(x)
        ax.set_xticklabels(["clean", *map(str, sev)], fontsize=8)
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(alpha=0.3)
        if i % ncols == 0:
            ax.set_ylabel("accuracy")
        if i >= len(names) - ncols:
            ax.set_xlabel("severity")
    handles = [Line2D([], [], color="tab:blue", marker="o", markersize=3.5,
                      label=f"mean of {n_seeds} seeds" if n_seeds > 1 else "accuracy")]
    handles += _band_legend(n_seeds)
    if baseline is not None:
        handles.append(Line2D([], [], color="0.35", linestyle="--", label="baseline (mean)"))
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8,
               frameon=False, bbox_to_anchor=(0.5, 0.955))
    fig.suptitle(title or "Accuracy vs corruption severity (each panel: its own y range)",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path)


def plot_robust_accuracy(report: Mapping[str, Any], path: str) -> None:
    """Robust accuracy vs epsilon (0 = clean), one panel per norm, seed bands."""
    attacks = report["attacks"]
    norms = [n for n in ("linf", "l2") if any(a["norm"] == n for a in attacks.values())]
    fig = _figure(5.0 * len(norms) + 0.4, 4.0)
    axes = fig.subplots(1, len(norms), squeeze=False)[0]
    clean = report.get("clean", {}).get("accuracy")
    colors = {"fgsm": "tab:orange", "pgd_linf": "tab:red", "pgd_l2": "tab:purple"}
    for ax, norm in zip(axes, norms):
        for method, a in attacks.items():
            if a["norm"] != norm:
                continue
            x = [0.0, *a["eps"]] if clean else list(a["eps"])
            steps = "" if method == "fgsm" else f", {a['steps']} steps"
            _band(ax, x, _with_clean(clean, a["robust_accuracy"]), colors.get(method, "tab:gray"),
                  f"{method}{steps}")
        ax.set_xlabel(f"epsilon ({'L-inf, pixels in [0, 1]' if norm == 'linf' else 'L2'}; "
                      "0 = clean)")
        ax.set_ylabel("robust accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        handles, _ = ax.get_legend_handles_labels()
        ax.legend(handles=handles + _band_legend(report["run"]["num_seeds"], "0.4"), fontsize=8)
        ax.set_title(f"{'L-inf' if norm == 'linf' else 'L2'} attacks", fontsize=10)
    fig.suptitle("Robust accuracy vs attack budget\n"
                 f"({_seed_caption(report['run']['num_seeds'])})", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path)


def plot_calibration(report: Mapping[str, Any], path: str) -> None:
    """Reliability diagram (clean and each severity, pooled over corruptions and seeds;
    marker area ~ examples in the bin) and ECE / error vs severity with seed bands."""
    sev = report["setup"]["severities"]
    n_seeds = report["run"]["num_seeds"]
    fig = _figure(11.5, 4.6)
    ax1, ax2 = fig.subplots(1, 2)
    cmap = _colormap(len(sev))
    curves = [("clean", report["clean"]["bins"], "black")]
    if "by_severity" in report:
        b = report["by_severity"]["bins"]
        curves += [(f"severity {s}", {k: b[k][j] for k in b}, cmap[j]) for j, s in enumerate(sev)]
    for label, bins, color in curves:
        count = np.asarray(bins["count"], np.float64)
        correct = np.asarray(bins["correct"], np.float64)
        conf = np.asarray(bins["conf_sum"], np.float64)
        if count.ndim == 2:  # per seed: pool
            count, correct, conf = count.sum(0), correct.sum(0), conf.sum(0)
        keep = count > 0
        share = count[keep] / count.sum()
        xs, ys = conf[keep] / count[keep], correct[keep] / count[keep]
        ax1.plot(xs, ys, color=color, linewidth=1.0, alpha=0.8, label=label)
        ax1.scatter(xs, ys, s=6 + 300 * share, color=color, alpha=0.8, zorder=3, linewidths=0)
    ax1.plot([0, 1], [0, 1], color="0.5", linestyle="--", linewidth=1, label="perfect calibration")
    ax1.text(0.98, 0.03, "below the diagonal: overconfident", ha="right", fontsize=8, color="0.4")
    ax1.set_xlim(0, 1.01)
    ax1.set_ylim(0, 1.01)
    ax1.set_xlabel("confidence (mean max probability in the bin)")
    ax1.set_ylabel("accuracy in the bin")
    ax1.set_title("Reliability diagram, 15 bins (marker area ~ share of examples)", fontsize=9)
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=7, loc="upper left")
    if "by_severity" in report:
        x = [0, *sev]
        _band(ax2, x, _with_clean(report["clean"]["ece"], report["by_severity"]["ece"]),
              "tab:green", "ECE")
        _band(ax2, x, _with_clean(report["clean"]["error"], report["by_severity"]["error"]),
              "tab:blue", "top-1 error", linestyle="--")
        ax2.set_xticks(x)
        ax2.set_xticklabels(["clean", *map(str, sev)])
        ax2.set_xlabel("severity (mean over corruptions)")
        ax2.set_ylabel("ECE / error")
        ax2.set_ylim(bottom=0)
        ax2.grid(alpha=0.3)
        handles, _ = ax2.get_legend_handles_labels()
        ax2.legend(handles=handles + _band_legend(n_seeds, "0.4"), fontsize=8)
        ax2.set_title("Calibration error and top-1 error under shift", fontsize=9)
    fig.suptitle(f"Calibration ({_seed_caption(n_seeds)})", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path)


def plot_stability(report: Mapping[str, Any], path: str) -> None:
    """Fraction of predictions that differ from the clean frame, per noise level."""
    n_seeds = report["run"]["num_seeds"]
    fig = _figure(6.0, 4.4)
    ax = fig.subplots()
    colors = ["tab:blue", "tab:red", "tab:green"]
    for i, (name, st) in enumerate(report["stability"].items()):
        levels = np.asarray(st["levels"], np.float64)[1:]
        p = st["flip_probability"]["mean"]
        _band(ax, levels, st["flip_rate"], colors[i % 3], f"{name} (flip probability {_f(p)})")
    ax.set_xlabel("noise level of the frame (frame 0 is clean)")
    ax.set_ylabel("fraction of predictions changed vs frame 0")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    handles, _ = ax.get_legend_handles_labels()
    ax.legend(handles=handles + _band_legend(n_seeds, "0.4"), fontsize=8, loc="upper left")
    ax.set_title("Stability under noise sequences", fontsize=10)
    if n_seeds > 1:
        fig.text(0.5, 0.01, f"line: mean of {n_seeds} seeds", ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path)


def _colormap(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["plasma"]
    return [cmap(0.1 + 0.75 * i / max(n - 1, 1)) for i in range(n)]


# ----------------------------------------------------------------------------- files


def _write(path: str, text: str) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def write_report(report: dict[str, Any], directory: str, *, plots: bool = True) -> dict[str, str]:
    """Writes ``report.json``, ``report.md`` and (``plots``) the PNGs into ``directory``;
    returns ``{file name: path}``."""
    os.makedirs(directory, exist_ok=True)
    paths: dict[str, str] = {}
    files: list[str] = []
    if plots:
        jobs = []
        if report.get("corruptions"):
            jobs.append(("accuracy_vs_severity.png", plot_accuracy_vs_severity))
        if report.get("attacks"):
            jobs.append(("robust_accuracy_vs_eps.png", plot_robust_accuracy))
        if "clean" in report:
            jobs.append(("calibration.png", plot_calibration))
        if report.get("stability"):
            jobs.append(("stability.png", plot_stability))
        if report.get("cifar10_corrupted"):
            jobs.append(("cifar10_corrupted_accuracy.png", lambda r, p: plot_accuracy_vs_severity(
                r, p, section="cifar10_corrupted",
                title="cifar10_corrupted: accuracy vs severity")))
        for name, fn in jobs:
            fn(report, os.path.join(directory, name))
            paths[name] = os.path.join(directory, name)
            files.append(name)
    report["files"] = files
    _write(os.path.join(directory, "report.json"),
           json.dumps(_json(report), indent=1, allow_nan=False))
    paths["report.json"] = os.path.join(directory, "report.json")
    _write(os.path.join(directory, "report.md"), render_markdown(report))
    paths["report.md"] = os.path.join(directory, "report.md")
    return paths
