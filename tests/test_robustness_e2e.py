"""The robustness suite on trained runs, end to end: ``run_robustness`` on a trained digits
MLP (error grows with severity, PGD at least as strong as FGSM, report files), the
``experiments.robustness`` command line (against a baseline report; bad input exits 2
with one line), and the ``experiments.digits_seeds`` main job (small flags here, full
defaults under ``-m slow``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from jaxtrain.robustness import runner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = ["--progress", "none", "--compilation-cache", "", "--no-tensorboard"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A digits MLP trained for 4 epochs (~97% test accuracy) on one device."""
    from experiments import digits_mlp

    workdir = str(tmp_path_factory.mktemp("runs") / "mlp")
    code = digits_mlp.main(["--workdir", workdir, "--epochs", "4", "--parallel", "none",
                            "--best-metric", "", *QUIET])
    assert code == 0
    return workdir


SUITE = {"corruptions": "gaussian_noise,occlusion", "preset": "imagenet",
         "attacks": "fgsm,pgd_linf", "eps": (0.05, 0.1, 0.3), "flip_frames": 4,
         "progress": "none", "compilation_cache": ""}


@pytest.fixture(scope="module")
def report(trained):
    """run_robustness on the trained run (8 fake devices: a mesh)."""
    figures = runner.run_robustness(trained, **SUITE)
    with open(os.path.join(trained, "robustness", "report.json")) as f:
        return figures, json.load(f)


def _accuracy(report, name):
    return np.asarray(report["corruptions"][name]["accuracy"]["mean"])


def test_error_grows_with_severity_on_a_trained_model(report):
    _, rep = report
    clean = rep["clean"]["accuracy"]["mean"]
    assert clean > 0.9
    acc = np.stack([_accuracy(rep, n) for n in ("gaussian_noise", "occlusion")])
    for row in acc:
        assert row[-1] < row[0] - 0.05 and row[-1] < clean - 0.1, row
    assert np.all(np.diff(acc.mean(0)) < 0), acc.mean(0)  # mean error rises at every severity
    by_sev = np.asarray(rep["by_severity"]["error"]["mean"])
    np.testing.assert_allclose(by_sev, 1 - acc.mean(0), atol=1e-12)
    mce = rep["summary"]["mean_corruption_error"]["mean"]
    assert mce == pytest.approx(1 - acc.mean())


def test_pgd_breaks_a_trained_model_at_least_as_often_as_fgsm(report):
    _, rep = report
    f = np.asarray(rep["attacks"]["fgsm"]["robust_accuracy"]["mean"])
    p = np.asarray(rep["attacks"]["pgd_linf"]["robust_accuracy"]["mean"])
    n = rep["run"]["test_examples"]
    assert rep["attacks"]["pgd_linf"]["eps"] == [0.05, 0.1, 0.3]
    assert rep["attacks"]["pgd_linf"]["steps"] == 10  # the digits preset
    assert np.all(np.diff(f) <= 0) and np.all(np.diff(p) <= 0)
    assert np.all(p <= f + 1 / n) and p[-1] < 0.05 and f[0] > 0.5


def test_report_files_and_headline(trained, report):
    figures, rep = report
    out = os.path.join(trained, "robustness")
    for name in ("report.json", "report.md", "accuracy_vs_severity.png",
                 "robust_accuracy_vs_eps.png", "calibration.png", "stability.png"):
        assert os.path.getsize(os.path.join(out, name)) > 1000, name
        assert figures["files"][name] == os.path.join(out, name)
    assert rep["run"]["model"] == "mlp" and rep["run"]["num_seeds"] == 1
    assert rep["run"]["test_examples"] == 359 and rep["setup"]["preset"] == "imagenet"
    assert rep["setup"]["devices"]["num_devices"] == 8
    assert figures["clean_accuracy"] == rep["clean"]["accuracy"]["mean"]
    with open(os.path.join(out, "report.md")) as f:
        md = f.read()
    assert "brightness is x + c" in md  # one-channel note
    assert "| occlusion |" in md and "## Adversarial robustness" in md


def test_cli_against_a_baseline_report(trained, report, tmp_path):
    """The same weights under another name, evaluated against the first report (on one
    device, at three of its severities): the same noise draws, so CE and relative CE are 1."""
    copy = str(tmp_path / "copy")
    shutil.copytree(trained, copy, ignore=shutil.ignore_patterns("robustness"))
    baseline = os.path.join(trained, "robustness", "report.json")
    cmd = [sys.executable, "-m", "experiments.robustness", "--workdir", copy, "--baseline",
           baseline, "--corruptions", "occlusion", "--severities", "1,3,5", "--preset", "imagenet",
           "--attacks", "none", "--flip-noises", "none", "--parallel", "none",
           "--compilation-cache", "", "--no-plots"]
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "robustness: geometric" in proc.stdout  # progress lines
    with open(os.path.join(copy, "robustness", "report.json")) as f:
        rep = json.load(f)
    s = rep["summary"]
    assert s["ce"]["occlusion"]["mean"] == pytest.approx(1.0)
    assert s["mce"]["mean"] == pytest.approx(1.0)
    assert s["relative_mce"]["mean"] == pytest.approx(1.0)
    assert s["baseline"]["path"] == baseline
    assert rep["setup"]["severities"] == [1, 3, 5]
    np.testing.assert_allclose(_accuracy(rep, "occlusion"),
                               _accuracy(report[1], "occlusion")[[0, 2, 4]])


@pytest.mark.parametrize("args,message", [
    ([], "--workdir is required"),
    (["--workdir", "{missing}"], "does not exist"),
    (["--workdir", "{empty}"], "holds no checkpoint"),
    (["--workdir", "{run}", "--corruptions", "frost"], "--corruptions: unknown name 'frost'"),
    (["--workdir", "{run}", "--severities", "1,7"], "--severities must be values in 1..5"),
    (["--workdir", "{run}", "--attacks", "fgsm,cw"], "--attacks: unknown name 'cw'"),
    (["--workdir", "{run}", "--eps", "2"], "--eps is a Linf budget"),
    (["--workdir", "{run}", "--num-keys", "0"], "--num-keys must be >= 1"),
    (["--workdir", "{run}", "--baseline", "{missing}"], "--baseline"),
    (["--workdir", "{run}", "--baseline", "{notreport}"], "is not a robustness report.json"),
    (["--workdir", "{run}", "--step", "5"], "--step 5"),
    (["--workdir", "{run}", "--cifar10-corrupted"], "--cifar10-corrupted needs a model of 32x32x3"),
    (["--workdir", "{run}", "--parallel", "pmap"], "--parallel"),
])
def test_bad_input_exits_2_with_one_line(trained, tmp_path, capsys, args, message):
    from experiments import robustness

    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(os.path.join(trained, "config.json"), empty / "config.json")
    notreport = tmp_path / "other.json"
    notreport.write_text(json.dumps({"clean": {}}))
    paths = {"missing": str(tmp_path / "nothing"), "empty": str(empty), "run": trained,
             "notreport": str(notreport)}
    argv = [a.format(**paths) for a in args]
    before = sorted(os.listdir(trained))
    code = robustness.main([*argv, "--progress", "none", "--compilation-cache", ""])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert sorted(os.listdir(trained)) == before  # nothing written


def test_a_second_suite_on_a_workdir_is_refused_and_writes_nothing(trained, capsys):
    """While one suite writes ``WORKDIR/robustness`` (here, this process holds its lock),
    ``experiments.robustness`` on the same workdir exits 2 naming it, and changes nothing."""
    from experiments import robustness
    from jaxtrain import workdir_lock

    def files() -> dict[str, bytes]:
        return {os.path.relpath(os.path.join(d, f), trained):
                open(os.path.join(d, f), "rb").read()
                for d, _, names in os.walk(trained) for f in names}

    with workdir_lock.hold_report(trained, os.path.join(trained, "robustness")):
        before = files()
        code = robustness.main(["--workdir", trained, "--corruptions", "occlusion",
                                "--attacks", "none", "--progress", "none",
                                "--compilation-cache", ""])
        assert files() == before
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith(
        f"error: --workdir {trained}: another robustness suite is writing "
        f"{os.path.join(trained, 'robustness')} (pid {os.getpid()} on "), err
    assert err[0].endswith("; wait for it to end")


# ----------------------------------------------------------------------------- the main job


SMALL_SUITE = runner.RobustnessConfig(
    corruptions="gaussian_noise", severities=(1, 3, 5), attacks="fgsm", eps=(0.1,),
    flip_frames=3)


def _check_seed_run(workdir, num_seeds):
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(workdir, "robustness", "report.json")) as f:
        rep = json.load(f)
    assert summary["num_seeds"] == num_seeds
    assert summary["robustness"]["num_seeds"] == num_seeds
    assert rep["run"]["num_seeds"] == num_seeds and rep["run"]["seeds"] == list(range(num_seeds))
    acc = rep["clean"]["accuracy"]
    assert len(acc["values"]) == num_seeds and acc["t_interval"][0] <= acc["mean"] <= acc["t_interval"][1]
    np.testing.assert_allclose(acc["values"], summary["test_accuracy_per_seed"], atol=1e-6)
    for st in rep["corruptions"].values():
        assert np.shape(st["accuracy"]["values"]) == (num_seeds, len(rep["setup"]["severities"]))
        assert all(lo <= m <= hi for lo, m, hi in zip(st["accuracy"]["t_lo"], st["accuracy"]["mean"],
                                                       st["accuracy"]["t_hi"]))
    with open(os.path.join(workdir, "robustness", "report.md")) as f:
        md = f.read()
    assert f"{num_seeds} seeds" in md and "95% t-interval" in md
    for name in ("accuracy_vs_severity.png", "robust_accuracy_vs_eps.png", "calibration.png"):
        with open(os.path.join(workdir, "robustness", name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    return summary, rep


def test_digits_seeds_main_job_small(tmp_path, monkeypatch):
    """2 seeds, 1 epoch, a small suite (TRAIN_SUITE patched): train, robustness on both
    seeds in one program, report with per-seed values and intervals."""
    from experiments import digits_seeds

    monkeypatch.setattr(runner, "TRAIN_SUITE", SMALL_SUITE)
    workdir = str(tmp_path / "seeds")
    code = digits_seeds.main(["--workdir", workdir, "--num-seeds", "2", "--epochs", "1", *QUIET])
    assert code == 0
    _, rep = _check_seed_run(workdir, 2)
    assert list(rep["corruptions"]) == ["gaussian_noise"]


@pytest.mark.slow
def test_digits_seeds_main_job_full_defaults(tmp_path):
    """``python -m experiments.digits_seeds`` as the README runs it (16 seeds, 30 epochs,
    the full suite), in a fresh process without fake devices."""
    workdir = str(tmp_path / "seeds16")
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "experiments.digits_seeds", "--workdir", workdir,
                           "--compilation-cache", ""], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=3000, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary, rep = _check_seed_run(workdir, 16)
    from jaxtrain.robustness import CORRUPTIONS

    assert list(rep["corruptions"]) == list(CORRUPTIONS)  # 20: the 14 of ROBUSTNESS.md's table, glass
    # and motion blur, snow, and rotation, translation, occlusion
    assert set(rep["attacks"]) == {"fgsm", "pgd_linf", "pgd_l2"}
    assert summary["test_accuracy"] > 0.95


def test_batchnorm_run_is_rebuilt_with_its_batch_stats(tmp_path):
    """A checkpoint holding model_state (a tiny ResNet's batch_stats) is evaluated with
    it: the suite's clean logits equal model.apply with the saved statistics."""
    import jax
    import jax.numpy as jnp

    from jaxtrain.checkpoint import Checkpointer, leaf_paths
    from jaxtrain.data import load_dataset
    from jaxtrain.models import create_model
    from jaxtrain.parallel import create_strategy
    from jaxtrain.robustness import suite as S

    cfg = {"dataset": "synthetic", "synthetic_size": 40, "synthetic_shape": [8, 8, 3],
           "synthetic_classes": 4, "val_fraction": 0.1, "model": "resnet_tiny", "seed": 0,
           "num_seeds": 1, "dtype": "float32"}
    ds = load_dataset("synthetic", synthetic_size=40, synthetic_shape=(8, 8, 3),
                      synthetic_classes=4)
    model = create_model("resnet_tiny", 4, mean=ds.mean, std=ds.std)
    # Shapes only (initializing a ResNet compiles for long on XLA:CPU); random values.
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3))))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda x: rng.normal(0, 0.3, x.shape).astype(np.float32), shapes)
    stats = jax.tree.map(lambda x: rng.uniform(0.5, 1.5, x.shape).astype(np.float32),
                         variables["batch_stats"])  # non-trivial running statistics
    tree = {"step": np.int32(3), "params": jax.tree.map(np.asarray, variables["params"]),
            "model_state": {"batch_stats": stats}, "opt_state": {}}
    workdir = str(tmp_path / "bn")
    ckpt = Checkpointer(workdir, best_metric="")
    ckpt.save(3, tree, {"config": cfg})
    ckpt.close()
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump({"config": cfg}, f)

    run = runner.load_run(workdir)
    assert [p for p, _ in leaf_paths(run.variables) if "batch_stats" in p]
    assert run.step == 3 and run.seeds == [0] and len(run.test["label"]) == 8
    res = S.evaluate_suite(run.apply_fn, run.variables, run.test,
                           S.SuiteSpec(corruptions=(), flip_noises=()),
                           strategy=create_strategy("none"))
    apply = jax.jit(lambda v: model.apply(v, run.test["image"]))
    logits = apply({"params": tree["params"], "batch_stats": stats})
    correct = int(np.sum(np.argmax(logits, -1) == run.test["label"]))
    assert res.clean["correct"][0] == correct
    ref = S.finalize(res.clean)["nll"][0]
    logp = jax.nn.log_softmax(logits)
    assert ref == pytest.approx(float(-np.mean(np.take_along_axis(
        np.asarray(logp), run.test["label"][:, None], 1))), rel=1e-4)
    # the same weights without the statistics would give other logits
    fresh = apply(variables)
    assert not np.allclose(fresh, logits)


def test_unprepared_cifar10_corrupted_is_reported_before_the_suite_runs(tmp_path, monkeypatch):
    """A CIFAR-shaped run with --cifar10-corrupted and no prepared data: one error before
    the in-memory suite (which took 76 s on 60 examples before it was checked)."""
    pytest.importorskip("tensorflow_datasets")
    from experiments import mnist_cnn
    from jaxtrain.robustness import suite

    workdir = str(tmp_path / "cifar_shaped")
    assert mnist_cnn.main(["--workdir", workdir, "--dataset", "synthetic", "--synthetic-shape",
                           "32,32,3", "--synthetic-size", "80", "--synthetic-classes", "10",
                           "--model", "mlp", "--batch-size", "16", "--epochs", "1",
                           *QUIET]) == 0

    def suite_ran(*args, **kwargs):
        raise AssertionError("the suite ran before the data check")

    monkeypatch.setattr(suite, "evaluate_suite", suite_ran)
    empty = tmp_path / "tfds"
    empty.mkdir()
    with pytest.raises(runner.RobustnessError,
                       match=r"cifar10_corrupted/\w+_1 is not prepared in .*tfds build"):
        runner.run_robustness(workdir, cifar10_corrupted=True, data_dir=str(empty),
                              progress="none", compilation_cache="")
