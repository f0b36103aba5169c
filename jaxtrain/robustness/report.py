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

``write_report`` writes the JSON, the Markdown (``markdown.render_markdown``) and
the plots (``plots``: matplotlib's object API on the Agg canvas, imported lazily).
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxtrain.robustness import metrics as M
from jaxtrain.robustness.markdown import render_markdown
from jaxtrain.robustness.plots import (
    plot_accuracy_vs_severity,
    plot_calibration,
    plot_robust_accuracy,
    plot_stability,
)
from jaxtrain.robustness.suite import RANDOM_CORRUPTIONS, RobustnessError, SuiteResult, finalize
from jaxtrain.stats import DEFAULT_N_BOOT, summarize, summarize_axis
from jaxtrain.writers import json_ready

SCHEMA = "jaxtrain.robustness.report/1"
METRICS = ("accuracy", "error", "ece", "nll", "brier")
PLOTS = ("accuracy_vs_severity.png", "robust_accuracy_vs_eps.png", "calibration.png",
         "stability.png", "cifar10_corrupted_accuracy.png")


# ----------------------------------------------------------------------------- statistics


def scalar_stat(values_S: Sequence[float], n_boot: int = DEFAULT_N_BOOT) -> dict[str, Any]:
    """One metric over seeds: ``SeedSummary.to_dict()`` (or the values alone when some
    are not finite, e.g. an empty condition)."""
    v = np.asarray(values_S, np.float64).reshape(-1)
    if not np.all(np.isfinite(v)):
        return {"values": json_ready(v), "n": len(v), "mean": None}
    return summarize(v, n_boot=n_boot).to_dict()


def array_stat(values_SX: np.ndarray, n_boot: int = DEFAULT_N_BOOT) -> dict[str, Any]:
    """A metric over conditions ``[S, X...]``: per-condition summaries plus ``values``."""
    v = np.asarray(values_SX, np.float64)
    if not np.all(np.isfinite(v)):
        return {"values": json_ready(v), "n": v.shape[0], "mean": json_ready(np.nanmean(v, axis=0))}
    return {"values": json_ready(v), **summarize_axis(v, axis=0, n_boot=n_boot).to_dict()}


def _bins(stats: Mapping[str, np.ndarray], pool_axes: tuple[int, ...] = ()) -> dict[str, Any]:
    return {"count": json_ready(np.sum(stats["bin_count"], axis=pool_axes)),
            "correct": json_ready(np.sum(stats["bin_correct"], axis=pool_axes)),
            "conf_sum": json_ready(np.sum(stats["bin_conf_sum"], axis=pool_axes))}


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
            shared = ",".join(c for c in names if c in table)
            raise RobustnessError(f"the baseline report has no {section} results for {n!r}; "
                                  "evaluate it with the same --corruptions"
                                  + (f", or pass --corruptions {shared}" if shared else ""))
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
    image_size: int | None = None,
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
                                   "errors": {n: json_ready(base[n]) for n in names}}
    # stability
    rep["stability"] = {}
    for name, f in result.flips.items():
        rate_ST = np.asarray(f["flips"], np.float64) / max(f["count"], 1)
        rep["stability"][name] = {
            "levels": json_ready(np.asarray(f["levels"], np.float64)),
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
    rep["notes"] = _notes(rep, image_channels, baseline is not None, image_size)
    rep["timing"] = result.timing()
    return json_ready(rep)


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


# The image side each corruption preset's pixel parameters were made for.
PRESET_SIZES = {"cifar": 32, "imagenet": 224}


def _notes(rep: Mapping[str, Any], channels: int | None, with_baseline: bool,
           size: int | None = None) -> list[str]:
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
    nominal = PRESET_SIZES.get(setup["preset"])
    if size and nominal and size != nominal:
        notes.insert(0, (
            f"These images are {size} px; the {setup['preset']} preset's parameters are for "
            f"{nominal} px images and several are in pixels (gaussian and defocus blur, "
            f"elastic_transform's displacement and affine jitter), so those corruptions "
            f"are {'stronger' if size < nominal else 'weaker'} here than on the benchmark "
            f"at the same severity."))
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
           json.dumps(json_ready(report), indent=1, allow_nan=False))
    paths["report.json"] = os.path.join(directory, "report.json")
    _write(os.path.join(directory, "report.md"), render_markdown(report))
    paths["report.md"] = os.path.join(directory, "report.md")
    return paths
