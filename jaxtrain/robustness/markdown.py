"""``report.md``: the robustness report (``report.build_report``'s dict) as Markdown
tables: means with 95% intervals across seeds, per corruption, severity and attack."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxtrain.stats import summarize


def fmt(x: Any, digits: int = 3) -> str:
    """``x`` with ``digits`` decimals; "-" for a figure that is missing (None)."""
    return "-" if x is None else f"{x:.{digits}f}"


def _cell(stat: Mapping[str, Any], j: int | None = None, digits: int = 3) -> str:
    """``mean [t_lo, t_hi]`` of a scalar stat, or of condition ``j`` of an array stat."""
    if j is None:
        mean, ci = stat.get("mean"), stat.get("t_interval") or [None, None]
    else:
        mean = (stat.get("mean") or [None] * (j + 1))[j]
        ci = [(stat.get("t_lo") or [None] * (j + 1))[j], (stat.get("t_hi") or [None] * (j + 1))[j]]
    if ci[0] is None:
        return fmt(mean, digits)
    return f"{fmt(mean, digits)} [{fmt(ci[0], digits)}, {fmt(ci[1], digits)}]"


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
                   f"{fmt(summary.get('baseline', {}).get('clean_error'))})."), ""]
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
        rows = [[name, str(len(st["levels"])), fmt(st["levels"][-1], 3),
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
    ci = lambda iv: "-" if iv[0] is None else f"[{fmt(iv[0])}, {fmt(iv[1])}]"
    return [label, fmt(st.get("mean")), ci(t), ci(b), fmt(st.get("std")), fmt(st.get("min")),
            fmt(st.get("max"))]


def _mean_over_severities(stat: Mapping[str, Any]) -> str:
    values = np.asarray(stat["values"], np.float64)  # [S, V]
    per_seed = values.mean(axis=1)
    if len(per_seed) > 1 and np.all(np.isfinite(per_seed)):
        s = summarize(per_seed, n_boot=1)
        return f"{fmt(s.mean)} [{fmt(s.t_interval[0])}, {fmt(s.t_interval[1])}]"
    return fmt(float(np.mean(per_seed)))
