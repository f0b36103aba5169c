"""Training curves of one or more runs from their ``metrics.jsonl``.

    python -m jaxtrain.plot RUN [RUN ...] [--out FILE] [--metrics loss accuracy]

``RUN`` is a workdir (or its ``metrics.jsonl``). One panel per metric, steps on
the x axis; each run has one color, train is a solid line, val a dashed line
with markers, the final test value a star. For seed runs (records with a
``seed`` field) the line is the mean over seeds and the band spans min to max.
Loss panels use a log scale when every value is positive. matplotlib is
imported only here.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxtrain.writers import read_jsonl

SPLIT_STYLE = {
    "train": {"linestyle": "-", "linewidth": 1.4, "alpha": 0.9},
    "val": {"linestyle": "--", "linewidth": 1.6, "marker": "o", "markersize": 3.5},
    "test": {"linestyle": "none", "marker": "*", "markersize": 12},
}


class PlotError(ValueError):
    """A run that cannot be plotted (message is one line)."""


def metrics_path(run: str) -> str:
    path = os.path.join(run, "metrics.jsonl") if os.path.isdir(run) else run
    if not os.path.isfile(path):
        raise PlotError(f"{run}: no metrics.jsonl (expected a run's workdir or its metrics.jsonl)")
    return path


def _float(v: Any) -> float:
    return float(v)  # "nan" / "inf" strings (JSON has no NaN) parse too


def load_curves(run: str) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]:
    """``{(split, metric): (steps [T], values [T, S])}`` with S = number of seeds (1 if none).

    Repeated steps (a resumed run rewrites the steps after its checkpoint) keep
    the last value written."""
    table: dict[tuple[str, str], dict[int, dict[Any, float]]] = defaultdict(
        lambda: defaultdict(dict))
    for rec in read_jsonl(metrics_path(run)):
        split, step, seed = rec.get("split"), rec.get("step"), rec.get("seed")
        if split is None or step is None:
            continue
        for k, v in rec.items():
            if k in ("split", "step", "seed"):
                continue
            try:
                table[(split, k)][int(step)][seed] = _float(v)
            except (TypeError, ValueError):
                continue
    curves = {}
    for key, by_step in table.items():
        steps = np.array(sorted(by_step))
        seeds = sorted({s for d in by_step.values() for s in d}, key=lambda s: (s is None, s))
        values = np.array([[by_step[t].get(s, math.nan) for s in seeds] for t in steps], float)
        curves[key] = (steps, values)
    return curves


def _labels(runs: Sequence[str]) -> list[str]:
    """Shortest trailing path parts that tell the runs apart."""
    parts = [os.path.normpath(os.path.abspath(r if os.path.isdir(r) else os.path.dirname(r)))
             .split(os.sep) for r in runs]
    for n in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-n:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(i) for i in range(len(runs))]


def draw(runs: Sequence[str], metrics: Sequence[str] = ("loss", "accuracy"),
         labels: Sequence[str] | None = None):
    """A matplotlib Figure with one panel per metric (see the module docstring)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not runs:
        raise PlotError("give at least one run")
    labels = list(labels) if labels else _labels(runs)
    if len(labels) != len(runs):
        raise PlotError(f"{len(labels)} labels for {len(runs)} runs")
    all_curves = [load_curves(r) for r in runs]
    if not any(all_curves):
        raise PlotError("no metrics to plot in " + ", ".join(runs))
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.6 * len(metrics) + 2.6, 4.4),
                             squeeze=False, layout="constrained")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, metric in zip(axes[0], metrics):
        positive = True
        for i, (curves, label) in enumerate(zip(all_curves, labels)):
            color = colors[i % len(colors)]
            for split in ("train", "val", "test"):
                if (split, metric) not in curves:
                    continue
                steps, values = curves[(split, metric)]
                mean = np.nanmean(values, axis=1)
                positive &= bool(np.all(mean[np.isfinite(mean)] > 0))
                seeds = values.shape[1]
                name = f"{label} {split}" + (f" (mean of {seeds} seeds)" if seeds > 1 else "")
                ax.plot(steps, mean, color=color, label=name, **SPLIT_STYLE[split])
                if seeds > 1 and split != "test":
                    ax.fill_between(steps, np.nanmin(values, 1), np.nanmax(values, 1),
                                    color=color, alpha=0.15, linewidth=0,
                                    label=f"{label} {split} min-max over seeds")
        ax.set_title(metric.replace("_", " "))
        ax.set_xlabel("step")
        ax.set_ylabel(metric.replace("_", " "))
        if metric == "loss" and positive and ax.lines:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.grid(True, alpha=0.1, which="minor")
        if not ax.lines:
            ax.text(0.5, 0.5, f"no {metric!r} in these runs", ha="center", va="center",
                    transform=ax.transAxes)
    # One legend for all panels (same runs and splits everywhere), outside the data.
    entries: dict[str, Any] = {}
    for ax in axes[0]:
        for handle, name in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(name, handle)
    if entries:
        fig.legend(entries.values(), entries.keys(), loc="outside right upper", fontsize="small")
    fig.suptitle("training curves: " + ", ".join(labels))
    return fig


def plot_runs(runs: Sequence[str], out: str, metrics: Sequence[str] = ("loss", "accuracy"),
              labels: Sequence[str] | None = None, dpi: int = 120) -> str:
    """Draws ``runs`` and saves the PNG at ``out``; returns the path."""
    import matplotlib.pyplot as plt

    fig = draw(runs, metrics, labels)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jaxtrain.plot",
        description="Plot training curves (train/val/test vs step) of runs from metrics.jsonl.",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN", help="workdir or metrics.jsonl")
    parser.add_argument("--out", default=None,
                        help="PNG path (default: RUN/curves.png for one run, "
                             "./curves.png for several)")
    parser.add_argument("--metrics", nargs="+", default=["loss", "accuracy"],
                        help="metric names, one panel each (default: loss accuracy)")
    parser.add_argument("--labels", nargs="+", default=None, help="legend names, one per run")
    args = parser.parse_args(argv)
    out = args.out or (os.path.join(args.runs[0] if os.path.isdir(args.runs[0]) else
                                    os.path.dirname(args.runs[0]) or ".", "curves.png")
                       if len(args.runs) == 1 else "curves.png")
    try:
        path = plot_runs(args.runs, out, args.metrics, args.labels)
    except (PlotError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
