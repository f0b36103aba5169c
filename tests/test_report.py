"""Reports from fixed suite results (no model, nothing compiled): every number where it
belongs, intervals checked against scipy, CE / mCE against a baseline by hand, strict
JSON, markdown tables, PNG plots for one and for many seeds."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.stats

from jaxtrain.robustness import report as R
from jaxtrain.robustness.suite import AttackSetting, RobustnessError, SuiteResult, SuiteSpec
from jaxtrain.writers import json_ready

NAMES = ("gaussian_noise", "contrast", "fog")
SEV = (1, 2, 3, 4, 5)
N, BINS = 200, 15


def _stats(correct, count=N, nll=0.5, brier=0.2, conf=0.8):
    """Calibration sums with ``correct`` examples right out of ``count`` (any shape)."""
    correct = np.asarray(correct, np.int64)
    shape = correct.shape
    bin_count = np.zeros((*shape, BINS), np.int64)
    bin_count[..., 12] = count
    bin_correct = np.zeros((*shape, BINS), np.int64)
    bin_correct[..., 12] = correct
    return {"count": np.full(shape, count, np.int64), "correct": correct,
            "nll_sum": np.full(shape, nll * count), "brier_sum": np.full(shape, brier * count),
            "bin_count": bin_count, "bin_correct": bin_correct,
            "bin_conf_sum": np.zeros((*shape, BINS)) + (bin_count * conf)}


def _result(num_seeds=4, shift=0, attacks=True):
    """Accuracy falls with severity, differs a little per seed and per corruption."""
    rng = np.random.default_rng(num_seeds + shift)
    clean = 190 - shift - rng.integers(0, 4, num_seeds)
    corr = {}
    for c, name in enumerate(NAMES):
        drop = (c + 1) * 10 * np.arange(1, 6) + shift
        corr[name] = _stats(clean[:, None] - drop[None, :] + rng.integers(0, 3, (num_seeds, 5)))
    spec = SuiteSpec(corruptions=NAMES, severities=SEV, flip_noises=("gaussian_noise",),
                     flip_frames=4, attacks=(AttackSetting("fgsm", (0.1, 0.2)),
                                             AttackSetting("pgd_l2", (0.5, 1.0), 10, 0.25))
                     if attacks else ())
    flips = {"gaussian_noise": {"flips": rng.integers(0, 20, (num_seeds, 3)), "count": N,
                                "levels": np.linspace(0, 0.1, 4)}}
    atk = {"fgsm": {"correct": np.stack([clean - 50, clean - 120], 1), "count": N},
           "pgd_l2": {"correct": np.stack([clean - 80, clean - 150], 1), "count": N}}
    return SuiteResult(spec, N, num_seeds, _stats(clean), corr, flips, atk if attacks else {}, [])


RUN = {"workdir": "/runs/x", "model": "mlp", "dataset": "digits", "image_shape": [8, 8, 1],
       "num_classes": 10, "checkpoint_step": 600}


@pytest.fixture(scope="module")
def built():
    res = _result()
    return res, R.build_report(res, run=RUN, image_channels=1, n_boot=2000)


def test_numbers_and_intervals(built):
    res, rep = built
    assert rep["schema"] == R.SCHEMA and rep["run"]["num_seeds"] == 4
    acc = res.clean["correct"] / N
    st = rep["clean"]["accuracy"]
    np.testing.assert_allclose(st["values"], acc)
    half = scipy.stats.t.ppf(0.975, 3) * np.std(acc, ddof=1) / 2
    np.testing.assert_allclose(st["t_interval"], [acc.mean() - half, acc.mean() + half])
    assert st["bootstrap_interval"][0] <= acc.mean() <= st["bootstrap_interval"][1]
    # per corruption x severity, with the per-seed table
    fog = rep["corruptions"]["fog"]["accuracy"]
    vals = res.corruptions["fog"]["correct"] / N
    np.testing.assert_allclose(fog["values"], vals)
    np.testing.assert_allclose(fog["mean"], vals.mean(0))
    sd = vals.std(0, ddof=1)
    np.testing.assert_allclose(fog["t_hi"], vals.mean(0) + scipy.stats.t.ppf(0.975, 3) * sd / 2)
    np.testing.assert_allclose(rep["corruptions"]["fog"]["error"]["mean"], 1 - vals.mean(0))
    np.testing.assert_allclose(rep["corruptions"]["fog"]["nll"]["mean"], 0.5)
    # ECE of one bin with confidence 0.8: |acc - 0.8|
    np.testing.assert_allclose(rep["corruptions"]["fog"]["ece"]["values"], np.abs(vals - 0.8))
    # mean corruption error per seed = mean over corruptions and severities
    err = 1 - np.stack([res.corruptions[n]["correct"] / N for n in NAMES], 1)
    np.testing.assert_allclose(rep["summary"]["mean_corruption_error"]["values"],
                               err.mean((1, 2)))
    np.testing.assert_allclose(rep["by_severity"]["error"]["mean"], err.mean((0, 1)))
    # flips: mean over frames of flips / count
    np.testing.assert_allclose(rep["summary"]["flip_probability"]["gaussian_noise"]["values"],
                               res.flips["gaussian_noise"]["flips"].mean(1) / N)
    # attacks
    ra = rep["attacks"]["pgd_l2"]
    assert ra["eps"] == [0.5, 1.0] and ra["alpha"] == [0.125, 0.25] and ra["norm"] == "l2"
    np.testing.assert_allclose(ra["robust_accuracy"]["values"], res.attacks["pgd_l2"]["correct"] / N)
    assert "ce" not in rep["summary"]  # no baseline


def test_ce_and_mce_against_a_baseline_by_hand(built):
    res, rep = built
    base_res = _result(num_seeds=2, shift=5)
    baseline = R.build_report(base_res, run=RUN, n_boot=100)
    with_base = R.build_report(res, run=RUN, baseline=baseline, baseline_path="b.json", n_boot=100)
    s = with_base["summary"]
    base_err = {n: 1 - (base_res.corruptions[n]["correct"] / N).mean(0) for n in NAMES}
    base_clean = 1 - (base_res.clean["correct"] / N).mean()
    err = {n: 1 - res.corruptions[n]["correct"] / N for n in NAMES}  # [S, V]
    clean = 1 - res.clean["correct"] / N
    ce = {n: err[n].sum(1) / base_err[n].sum() for n in NAMES}
    rel = {n: (err[n] - clean[:, None]).sum(1) / (base_err[n] - base_clean).sum() for n in NAMES}
    for n in NAMES:
        np.testing.assert_allclose(s["ce"][n]["values"], ce[n])
        np.testing.assert_allclose(s["relative_ce"][n]["values"], rel[n])
    np.testing.assert_allclose(s["mce"]["values"], np.mean([ce[n] for n in NAMES], 0))
    np.testing.assert_allclose(s["relative_mce"]["values"], np.mean([rel[n] for n in NAMES], 0))
    assert s["baseline"]["path"] == "b.json"
    # against itself (the baseline's errors are means over its seeds): CE is 1 on average
    own = R.build_report(res, run=RUN, baseline=rep, n_boot=100)["summary"]
    assert own["mce"]["mean"] == pytest.approx(1.0) and own["relative_mce"]["mean"] == pytest.approx(1.0)
    assert own["mce"]["values"] != pytest.approx([1.0] * 4)  # per seed it varies
    # a baseline at other severities or without a corruption
    sub = R.build_report(_result(2, attacks=False), run=RUN, n_boot=100)
    sub["setup"]["severities"] = [1, 2, 3]
    with pytest.raises(RobustnessError, match=r"severities \[4, 5\]"):
        R.build_report(res, run=RUN, baseline=sub)
    del sub["corruptions"]["fog"]
    sub["setup"]["severities"] = list(SEV)
    with pytest.raises(RobustnessError, match="no corruptions results for 'fog'; evaluate it with "
                                             "the same --corruptions, or pass --corruptions "
                                             "gaussian_noise,contrast$"):
        R.build_report(res, run=RUN, baseline=sub)


def test_load_baseline(tmp_path, built):
    _, rep = built
    good = tmp_path / "report.json"
    good.write_text(json.dumps(rep))
    assert R.load_baseline(str(good))["schema"] == R.SCHEMA
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(RobustnessError, match="cannot be read as JSON"):
        R.load_baseline(str(tmp_path / "bad.json"))
    (tmp_path / "other.json").write_text("[1, 2]")
    with pytest.raises(RobustnessError, match="not a robustness report"):
        R.load_baseline(str(tmp_path / "other.json"))


def _strict(text):
    def no_constant(name):
        raise ValueError(f"non-strict JSON constant {name}")

    return json.loads(text, parse_constant=no_constant)


@pytest.mark.parametrize("num_seeds", [4, 1])
def test_files_written(tmp_path, num_seeds):
    res = _result(num_seeds)
    rep = R.build_report(res, run=RUN, image_channels=1, n_boot=200)
    paths = R.write_report(rep, str(tmp_path))
    assert set(paths) == {"report.json", "report.md", "accuracy_vs_severity.png",
                          "robust_accuracy_vs_eps.png", "calibration.png", "stability.png"}
    for name, path in paths.items():
        if name.endswith(".png"):
            with open(path, "rb") as f:
                assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(paths["report.json"]) as f:
        back = _strict(f.read())
    for key in ("schema", "run", "setup", "notes", "clean", "corruptions", "by_severity",
                "summary", "stability", "attacks", "timing", "files"):
        assert key in back, key
    assert set(back["corruptions"]) == set(NAMES)
    assert set(back["corruptions"]["fog"]) == {"accuracy", "error", "ece", "nll", "brier", "bins"}
    if num_seeds == 1:
        assert back["clean"]["accuracy"]["t_interval"] == [None, None]
    with open(paths["report.md"]) as f:
        md = f.read()
    assert "| corruption | severity 1 | severity 2 | severity 3 | severity 4 | severity 5 | mean |" in md
    assert "| fgsm | 1 |" in md and "| pgd_l2 | 10 |" in md
    assert "| severity 5 |" in md  # calibration table
    assert "brightness is x + c" in md and "saturate is the identity" in md
    assert "![accuracy vs severity](accuracy_vs_severity.png)" in md
    fog = back["corruptions"]["fog"]["accuracy"]
    cell = f"{fog['mean'][0]:.3f}"
    if num_seeds > 1:
        cell += f" [{fog['t_lo'][0]:.3f}, {fog['t_hi'][0]:.3f}]"
    assert f"| fog | {cell} |" in md


def test_non_finite_values_are_null_not_nan():
    res = _result(2, attacks=False)
    res.corruptions["fog"]["count"][:, 0] = 0  # an empty condition: 0 / 0
    rep = R.build_report(res, run=RUN, n_boot=100)
    text = json.dumps(json_ready(rep), allow_nan=False)  # raises on NaN
    assert _strict(text)["corruptions"]["fog"]["accuracy"]["mean"][0] is None
    assert not math.isnan(rep["corruptions"]["contrast"]["accuracy"]["mean"][0])


def test_headline(built):
    _, rep = built
    h = R.headline(rep)
    assert h["num_seeds"] == 4
    assert h["clean_accuracy"] == rep["summary"]["clean_accuracy"]["mean"]
    assert h["mean_corruption_error"] == rep["summary"]["mean_corruption_error"]["mean"]
    assert h["robust_accuracy_fgsm"] == {"0.1": rep["attacks"]["fgsm"]["robust_accuracy"]["mean"][0],
                                         "0.2": rep["attacks"]["fgsm"]["robust_accuracy"]["mean"][1]}
    assert "flip_probability_gaussian_noise" in h


def test_notes_say_when_the_images_are_not_the_presets_size():
    res = _result(2)  # spec preset: cifar (32 px)
    notes = {size: R.build_report(res, run=RUN, image_channels=1, image_size=size,
                                  n_boot=200)["notes"] for size in (8, 32, 96)}
    assert "These images are 8 px; the cifar preset's parameters are for 32 px" in notes[8][0]
    assert "stronger here" in notes[8][0] and "weaker here" in notes[96][0]
    assert not any("px images" in n for n in notes[32])
