"""The robustness report's PNG plots: accuracy against severity and against attack
budget, reliability diagrams and flip probabilities, each a mean over seeds with its
95% interval as a band. matplotlib's object API on the Agg canvas, imported lazily;
no pyplot state is touched."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxtrain.robustness.markdown import fmt


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
        _band(ax, levels, st["flip_rate"], colors[i % 3], f"{name} (flip probability {fmt(p)})")
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
