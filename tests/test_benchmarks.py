"""Benchmarks and the performance features they measure.

The benchmarks run with tiny sizes and write well-formed JSON (no timing is
asserted anywhere); the features compute what they claim: both data placements
train identically (``--steps-per-call`` is in ``test_fusing.py``), ``--dtype
bfloat16`` computes in bf16 with float32 parameters and optimizer state, the
im2col CNN is the same function as the XLA-conv CNN, and the PyTorch twins
used as the peer are the same models. PyTorch parts skip without torch.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import (
    common,
    conv_loops,
    corruptions,
    peer_death,
    pipeline,
    poisson,
    suite_compile,
    throughput,
    time_to_accuracy,
    torch_peer,
    whole_runs,
)
from experiments.digits_mlp import DEFAULTS
from jaxtrain import fusing, loop, program
from jaxtrain.checkpoint import load_params
from jaxtrain.models import create_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = DEFAULTS.replace(epochs=1, progress="none", compilation_cache="", tensorboard=False)
needs_torch = pytest.mark.skipif(not torch_peer.have_torch(), reason="PyTorch not installed")


def _load(path) -> dict:
    with open(path) as f:
        return json.load(f)


def _max_diff(a, b) -> float:
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b)))


# ----------------------------------------------------------------------------- common


def test_compiled_flops_counts_a_matmul():
    lowered = jax.jit(lambda a, b: a @ b).lower(jnp.ones((64, 32)), jnp.ones((32, 16)))
    assert common.compiled_flops(lowered) == 2 * 64 * 32 * 16
    assert common.compiled_flops(lowered.compile()) == 2 * 64 * 32 * 16


def test_peak_memory_reports_host_rss():
    mem = common.peak_memory()
    assert mem["host_peak_rss_bytes"] > 50 * 2**20  # jax alone is larger
    assert set(mem) >= {"device_peak_bytes", "device_bytes_in_use"}


def test_time_steps_runs_n_steps_per_repeat_and_syncs_each():
    assert common.TURNS_ENV not in os.environ  # outside a lockstep run turns are free
    synced = []
    carry, t = common.time_steps(lambda c: c + 1, 0, 5, 3, synced.append)
    assert carry == 15 and synced == [5, 10, 15]
    assert len(t["wall_s"]) == 3 and t["best_s_per_step"] <= t["median_s_per_step"]
    # calls of K fused steps: times and counts per training step, so ratios pair like for like
    _, t4 = common.time_steps(lambda c: c + 1, 0, 5, 2, lambda c: None, steps_per_call=4)
    assert t4["steps_timed"] == 20 and t4["calls_timed"] == 5
    assert t4["best_s_per_step"] == pytest.approx(min(t4["wall_s"]) / 20)


def test_write_results_names_device_and_command(tmp_path):
    args = argparse.Namespace(out=str(tmp_path), tag=None, smoke=True)
    info = common.machine_info("a note")
    path = common.write_results("demo", args, info, {"results": [{"x": np.float32(1.5)}]})
    assert os.path.basename(path) == "demo-cpu-smoke.json"
    doc = _load(path)
    assert doc["machine"]["device"].startswith("cpu: ") and doc["machine"]["note"] == "a note"
    assert doc["machine"]["cpu_cores"] >= 1 and doc["smoke"] is True
    assert doc["results"] == [{"x": 1.5}] and doc["command"].startswith("python -m ")


def test_run_child_round_trip_and_failure():
    r = common.run_child("benchmarks.common", {"x": [1, 2]}, env={"BENCH_TEST": "1"},
                         timeout=300)
    assert r["echo"] == {"x": [1, 2]} and r["memory"]["host_peak_rss_bytes"] > 0
    with pytest.raises(common.BenchmarkError, match=r"'x': 3.*exit 1"):
        common.run_child("benchmarks.common", {"x": 3, "bad": float("nan")}, timeout=300,
                         env={"XLA_FLAGS": "--no_such_xla_flag"})


def test_run_lockstep_alternates_timed_regions_and_reports_failures():
    cases = [({"turns": 4, "sleep": 0.05, "name": name}, None) for name in "ab"]
    a, b = common.run_lockstep("benchmarks.common", cases, timeout=300)
    assert a["echo"]["name"] == "a" and b["echo"]["name"] == "b"
    regions = sorted([(*r, "a") for r in a["regions"]] + [(*r, "b") for r in b["regions"]])
    # one child at a time, ABBA order: region j of each is timed next to the other's
    assert all(end <= nxt for (_, end, _), (nxt, _, _) in itertools.pairwise(regions))
    assert "".join(who for *_, who in regions) == "abbaabba"
    # a child that dies mid-run comes back as an error; the other runs to its end
    cases = [({"turns": 3, "fail": True}, None), ({"turns": 3, "sleep": 0.01}, None)]
    bad, good = common.run_lockstep("benchmarks.common", cases, timeout=300)
    assert "exit 3" in bad["error"] and len(good["regions"]) == 3


def test_paired_ratios_compare_region_by_region():
    a = {"steps_timed": 10, "wall_s": [1.0, 2.0]}  # 10 and 5 steps/s
    b = {"steps_timed": 4, "wall_s": [0.8, 0.8]}  # 5 steps/s
    assert common.paired_ratios(a, b) == pytest.approx([2.0, 1.0])


def _in_process(monkeypatch, child):
    """Runs a benchmark's children in this process (no subprocess, no second compile)."""

    def run_child(module, case, **kwargs):
        return {**child(json.loads(json.dumps(case))), "memory": common.peak_memory()}

    monkeypatch.setattr(common, "run_child", run_child)


# ----------------------------------------------------------------------------- throughput


def test_throughput_fused_speedups_pair_each_k_with_the_first_in_its_round():
    def row(rnd, k, rate, model="cnn"):
        return {"round": rnd, "model": model, "data": "mnist", "dtype": "float32",
                "batch_size": 128, "steps_per_call": k, "steps_per_s": rate}

    results = [row(0, 1, 10.0), row(0, 8, 15.0), row(1, 1, 20.0), row(1, 8, 22.0),
               row(2, 1, 10.0), row(2, 8, 13.0), row(0, 1, 5.0, "mlp"), row(0, 8, None, "mlp")]
    got = throughput.fused_speedups(results, first_k=1)
    assert got[("cnn", "mnist", "float32", 128, 8)] == pytest.approx(1.3)  # of 1.5, 1.1, 1.3
    assert got[("cnn", "mnist", "float32", 128, 1)] == 1.0
    assert ("mlp", "mnist", "float32", 128, 8) not in got  # failed: no ratio
    with pytest.raises(SystemExit):
        throughput.parse_args(["--steps-per-call", "1,0"])


def test_throughput_main_writes_consistent_figures(tmp_path, monkeypatch, capsys):
    _in_process(monkeypatch, throughput.measure_case)
    assert throughput.main(["--smoke", "--cases", "mlp:digits", "--out", str(tmp_path),
                            "--note", "test", "--peak-flops", "1e12"]) == 0
    assert "steps/s" in capsys.readouterr().out
    doc = _load(tmp_path / "throughput-cpu-smoke.json")
    assert doc["machine"]["platform"] == "cpu" and doc["machine"]["note"] == "test"
    (r,) = doc["results"]
    assert r["model"] == "mlp" and r["batch_size"] == 16 and r["memory"]["host_peak_rss_bytes"] > 0
    forward = 2 * 16 * (64 * 256 + 256 * 256 + 256 * 10)  # matmul FLOPs of one forward pass
    assert 2.5 * forward < r["flops_per_step"] < 4 * forward  # forward + backward + Adam
    assert r["images_per_s"] == pytest.approx(16 * r["steps_per_s"])
    assert r["mfu"] == pytest.approx(r["flops_per_step"] * r["steps_per_s"] / 1e12)
    assert r["param_dtypes"] == ["float32"] and r["params_finite"]
    assert r["param_count"] == 64 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10
    # K fused steps: FLOPs still per step (a scan body is counted once), same first step
    fused = throughput.measure_case({**r, "steps_per_call": 3})
    assert fused["flops_per_step"] == r["flops_per_step"]
    assert fused["first_loss"] == pytest.approx(r["first_loss"], rel=1e-6)
    assert fused["timing"]["steps_timed"] == 3 * fused["timing"]["calls_timed"]
    assert fused["steps_per_s"] == pytest.approx(1 / fused["timing"]["best_s_per_step"])
    # the loop's data-parallel step over devices: the same model FLOPs and first loss
    for kind in ("pmap", "mesh"):
        par = throughput.measure_case({**r, "parallel": kind, "devices": 2})
        assert par["num_devices"] == 2 and par["param_count"] == r["param_count"]
        assert par["flops_per_step"] == r["flops_per_step"]
        assert par["first_loss"] == pytest.approx(r["first_loss"], rel=1e-5)
    # and fused over a mesh ([K, B] indices sharded on B)
    par = throughput.measure_case({**r, "parallel": "mesh", "devices": 2, "steps_per_call": 3})
    assert (par["num_devices"], par["steps_per_call"]) == (2, 3)
    assert par["first_loss"] == pytest.approx(r["first_loss"], rel=1e-5)
    with pytest.raises(ValueError, match="steps_per_call 3 needs one device or a mesh"):
        throughput.measure_case({**r, "parallel": "pmap", "devices": 2, "steps_per_call": 3})


# ----------------------------------------------------------------------------- pipeline


def test_pipeline_main_measures_every_mode(tmp_path, monkeypatch):
    _in_process(monkeypatch, pipeline.measure_pipeline)
    assert pipeline.main(["--smoke", "--cases", "mlp:digits", "--out", str(tmp_path)]) == 0
    doc = _load(tmp_path / "pipeline-cpu-smoke.json")
    (r,) = doc["results"]
    assert "loop_check" not in doc and r["auto_placement"] == "device"
    for mode in pipeline.MODES:
        assert r[f"{mode}_steps_per_s"] > 0 and len(r["s_per_step"][mode]) == 1
    assert r["synthetic_vs_synthetic"] == 1.0 and r["params_finite"]


def test_host_and_device_placement_train_identically(tmp_path, monkeypatch):
    """Batches gathered on the host and streamed equal batches gathered inside the step
    (8-device mesh); ``--data-placement auto`` picks by ``DEVICE_DATA_BYTES``."""
    params, summaries = {}, {}
    for where in ("host", "device"):
        workdir = str(tmp_path / where)
        # digits is ~300 kB: it lives on the device unless the threshold is below that
        monkeypatch.setattr(loop, "DEVICE_DATA_BYTES", 1 if where == "host" else 1 << 30)
        summaries[where] = loop.train_and_evaluate(FAST.replace(data_placement="auto"), workdir)
        params[where] = load_params(workdir)
        manifest = _load(os.path.join(workdir, "config.json"))
        assert manifest["data"]["resident"] == (where == "device")
    assert _max_diff(params["host"], params["device"]) == 0.0
    assert summaries["host"]["test_accuracy"] == summaries["device"]["test_accuracy"]


# ----------------------------------------------------------------------------- PyTorch peer's default CNN variant


def test_torch_peer_cnn_variants_name_registered_models_that_build(monkeypatch):
    """Every variant's model exists once the benchmark registers its own, and the old
    default (``cnn_taps_mm``) lowers its two layers as named."""
    from jaxtrain import models

    monkeypatch.setattr(models, "MODELS", dict(models.MODELS))  # others' tests see the four
    torch_peer.register_benchmark_models()
    names = {case.get("model", "cnn") for case, _ in torch_peer.CNN_VARIANTS.values()}
    assert names <= set(models.MODELS), names - set(models.MODELS)
    old = models.MODELS["cnn_taps_mm"](num_classes=10)
    assert old.conv == ("taps", "nhwc_vjp")


def test_torch_peer_default_cnn_variant_is_what_auto_cpu_devices_picks(monkeypatch):
    """The loop's default for mnist_cnn on CPU: the devices ``resolve_cpu_devices`` makes
    (one: auto splits only seed runs, tests/test_cpu_devices.py), its steps fused (K=29
    for 5 epochs of 421 steps: auto_steps_per_call); a split where it would make one."""
    from experiments.mnist_cnn import DEFAULTS as MNIST
    from jaxtrain import cpu_devices

    assert torch_peer.AUTO_VARIANT in torch_peer.CNN_VARIANTS
    asked = []

    def resolve(config, image_shape, resident=True):
        asked.append((config.model, config.batch_size, config.num_seeds, tuple(image_shape)))
        return devices

    monkeypatch.setattr(cpu_devices, "resolve_cpu_devices", resolve)
    devices = 0
    assert torch_peer._auto_cpu_devices_variant({"model": "cnn", "batch_size": 128}) == (
        {"steps_per_call": 29}, "")
    assert asked == [("cnn", 128, 1, (28, 28, 1))]
    k16 = fusing.auto_steps_per_call(MNIST.replace(batch_size=16), "cpu", "none", False,
                                     54_000 // 16)
    assert k16 > 1
    assert torch_peer._auto_cpu_devices_variant({"model": "cnn", "batch_size": 16}) == (
        {"steps_per_call": k16}, "")
    devices = 2
    assert torch_peer._auto_cpu_devices_variant({"model": "cnn", "batch_size": 128}) == (
        {"parallel": "mesh", "devices": 2, "steps_per_call": 29},
        "--xla_force_host_platform_device_count=2")


# ----------------------------------------------------------------------------- bfloat16


def _matmul_dtypes(jaxpr) -> set[tuple[str, ...]]:
    found = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
            found.add(tuple(str(v.aval.dtype) for v in eqn.invars))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found |= _matmul_dtypes(sub)
    return found


@pytest.mark.parametrize("model", ["mlp", "cnn", "resnet_tiny"])
def test_bfloat16_computes_in_bf16_with_float32_state(model):
    """Every matmul and convolution (forward and backward) in the compute dtype;
    parameters, BatchNorm statistics and optimizer state stay float32."""
    case = {"model": model, "data": "mnist", "batch_size": 8, "synthetic_size": 64}
    loss = {}
    for dtype in ("float32", "bfloat16"):
        config = throughput.train_config({**case, "dtype": dtype})
        dataset = throughput.load(config)
        state = program.build_model_and_state(config, dataset, 10)
        update = program.make_update(config, resident=True)
        args = (state, dataset.train, jnp.arange(8), program.step_key(0))
        matmuls = _matmul_dtypes(jax.make_jaxpr(update)(*args).jaxpr)
        assert matmuls == {(dtype, dtype)}, matmuls
        new_state, metrics = jax.eval_shape(update, *args)  # shapes and dtypes, no compile
        for tree in (state, new_state):
            leaves = jax.tree.leaves((tree.params, tree.opt_state, tree.model_state))
            assert {x.dtype for x in leaves} <= {jnp.dtype("float32"), jnp.dtype("int32")}
        assert metrics["loss"].dtype == jnp.float32
        if model == "mlp":  # run it: a bf16 loss near, but not equal to, the f32 one
            loss[dtype] = float(jax.jit(update)(*args)[1]["loss"])
    if loss:
        assert loss["bfloat16"] != loss["float32"]
        assert loss["bfloat16"] == pytest.approx(loss["float32"], rel=3e-2)


# ----------------------------------------------------------------------------- im2col CNN


def test_im2col_cnn_is_the_same_function_with_the_same_params():
    x = jax.random.uniform(jax.random.key(0), (4, 12, 12, 3))
    xla = create_model("cnn", 10).clone(conv="xla")
    im2col = xla.clone(conv="im2col")
    fast = {"xla_backend_optimization_level": 0}  # LLVM unoptimized: compiles faster
    variables = jax.jit(xla.init, compiler_options=fast)(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(
        jnp.shape, jax.eval_shape(im2col.init, jax.random.key(1), x))

    @functools.partial(jax.jit, compiler_options=fast)
    def outputs_and_grads(v):
        loss = lambda m, v: jnp.sum(m.apply(v, x) ** 2)
        return (xla.apply(v, x), im2col.apply(v, x),
                jax.grad(functools.partial(loss, xla))(v),
                jax.grad(functools.partial(loss, im2col))(v))

    y_xla, y_im2col, g_xla, g_im2col = outputs_and_grads(variables)
    np.testing.assert_allclose(y_im2col, y_xla, atol=1e-5)
    assert _max_diff(g_xla, g_im2col) < 1e-4


# ----------------------------------------------------------------------------- time to accuracy


def test_train_to_target_records_the_curve():
    r = time_to_accuracy.train_to_target({"epochs": 2, "target": 0.0, "t_launch": time.time(),
                                          "cache": ""})
    assert r["reached"] and r["epochs_to_target"] == 1 and len(r["curve"]) == 1
    assert 0 < r["seconds_from_training_start"] < r["seconds_from_launch"]
    assert r["s_per_step_steady"] > 0 and r["params_dtype"] == "float32"


# ----------------------------------------------------------------------------- PyTorch peer


@needs_torch
@pytest.mark.parametrize("model, shape", [("mlp", (8, 8, 1)), ("cnn", (8, 8, 1)),
                                          ("cnn", (12, 12, 3))])
def test_torch_twin_is_the_same_function(model, shape):
    import torch

    mean, std = (0.3,) * shape[-1], (0.2,) * shape[-1]
    flax_model = create_model(model, 10, mean=mean, std=std)
    x = np.random.default_rng(0).uniform(size=(5, *shape)).astype(np.float32)
    variables = jax.jit(flax_model.init)(jax.random.key(1), x)
    want = jax.jit(flax_model.apply)(variables, x)
    twin = torch_peer.create_torch_model(model, shape, 10, mean, std)
    torch_peer.load_flax_params(twin, jax.device_get(variables["params"]))
    with torch.no_grad():
        got = twin(torch_peer.to_torch_images(x, "cpu")).numpy()
    np.testing.assert_allclose(got, np.asarray(want), atol=1e-4, rtol=1e-4)


@needs_torch
def test_torch_resnet18_has_the_same_parameter_count():
    variables = jax.eval_shape(create_model("resnet18", 10).init, jax.random.key(0),
                               jnp.zeros((1, 32, 32, 3)))
    n_flax = sum(np.prod(x.shape) for x in jax.tree.leaves(variables["params"]))
    twin = torch_peer.create_torch_model("resnet18", (32, 32, 3), 10, (0.0,) * 3, (1.0,) * 3)
    assert sum(p.numel() for p in twin.parameters()) == n_flax


@needs_torch
def test_torch_cosine_schedule_matches_the_library():
    import torch

    from jaxtrain.optim import create_schedule

    opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=2e-3)
    sched = torch_peer.torch_cosine(opt, 40)
    ours = create_schedule("cosine", 2e-3, 40)
    for t in range(40):
        assert opt.param_groups[0]["lr"] == pytest.approx(float(ours(t)), rel=1e-5, abs=1e-9)
        opt.step()
        sched.step()


def test_steps_only_floor_runs_the_same_steps_as_the_loop(tmp_path):
    """The floor times exactly the loop's training steps: its last loss is the one the
    loop logs for its last step (log_every 1: one step per line)."""
    floor = torch_peer.jax_steps_only({"epochs": 1, "repeats": 1})
    config = torch_peer.digits_config(epochs=1, log_every=1, best_metric="")
    loop.train_and_evaluate(config, str(tmp_path))
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["split"] == "train"]
    assert len(train) == floor["steps"] == 20  # 1294 training digits, 64 per batch
    assert floor["final_loss"] == pytest.approx(train[-1]["loss"], rel=1e-5)
    assert floor["steps_only_s"] > 0 and floor["model_flops_per_step"] == pytest.approx(3.2e7, rel=0.05)


@needs_torch
def test_torch_steps_smoke():
    r = torch_peer.torch_steps({"model": "cnn", "data": "mnist", "batch_size": 8, "steps": 2,
                                "repeats": 1, "synthetic_size": 64, "threads": [1],
                                "channels_last": True})
    assert r["steps_per_s"] > 0 and r["runs"][0]["loss_finite"] and r["best_threads"] == 1


# ----------------------------------------------------------------------------- whole_runs


def test_whole_runs_parses_variants_and_refuses_bad_ones(capsys):
    assert whole_runs.parse_variants("auto=;single=--steps-per-call 1; ") == [
        ("auto", []), ("single", ["--steps-per-call", "1"])]
    assert whole_runs.parse_variants("a=--args 'x y'") == [("a", ["--args", "x y"])]
    for bad, message in [("auto", "is not NAME=ARGS"), ("=--epochs 1", "is not NAME=ARGS"),
                         ("a=;a=--epochs 2", "distinct names"), (";", "distinct names")]:
        with pytest.raises(ValueError, match=message):
            whole_runs.parse_variants(bad)
    for argv, message in [(["--variants", "x"], "is not NAME=ARGS"),
                          (["--experiment", "nope"], "no module experiments.nope"),
                          (["--rounds", "0"], "--rounds must be at least 1")]:
        with pytest.raises(SystemExit):
            whole_runs.parse_args(argv)
        assert message in capsys.readouterr().err


def test_whole_runs_command_compiles_afresh_unless_a_cache_is_named():
    cmd = whole_runs.run_command("mnist_cnn", ["--epochs", "1"], "/w")
    assert cmd[1:] == ["-m", "experiments.mnist_cnn", "--epochs", "1", "--workdir", "/w",
                       "--progress", "none", "--compilation-cache", ""]
    cached = whole_runs.run_command("digits_mlp", ["--compilation-cache=/c"], "/w")
    assert cached.count("--compilation-cache") == 0 and cached[-1] == "none"


def test_whole_runs_summary_pairs_each_variant_with_the_first_of_its_round():
    def run(rnd, variant, sps, wall):
        return {"round": rnd, "variant": variant, "steps_per_s": sps, "wall_s": wall,
                "process_s": wall + 2, "peak_rss_bytes": 100 + rnd, "test_loss": 0.5,
                "steps_per_call": 1 if variant == "a" else 25, "num_devices": 1}

    runs = [run(0, "a", 10.0, 40.0), run(0, "b", 15.0, 30.0),
            run(1, "a", 20.0, 20.0), run(1, "b", 22.0, 25.0),
            run(2, "a", 0.0, 10.0), run(2, "b", 30.0, 10.0)]  # round 2: no steady steps in a
    a, b = whole_runs.summarize(runs, ["a", "b"])
    assert a["steps_per_s_vs_first"] == [1.0, 1.0, None]
    assert b["steps_per_s_vs_first"] == [1.5, 1.1, None]
    assert b["steps_per_s_vs_first_median"] == pytest.approx(1.3)
    assert b["speedup_wall_vs_first"] == pytest.approx([40 / 30, 20 / 25, 1.0])
    assert b["speedup_process_vs_first"] == pytest.approx([42 / 32, 22 / 27, 1.0])
    assert b["steps_per_s_median"] == 22.0 and b["peak_rss_bytes_max"] == 102
    assert b["steps_per_call"] == [25] and a["steps_per_call"] == [1]


def test_whole_runs_reports_a_failed_run_in_one_error(capsys):
    assert whole_runs.main(["--args", "--epochs -1", "--rounds", "1"]) == 1
    err = capsys.readouterr().err
    assert "error: variant 'auto'" in err and "--epochs must be > 0, got -1" in err


def test_whole_runs_revisions_are_checked_and_checked_out(capsys, monkeypatch):
    head = whole_runs._git("rev-parse", "HEAD")
    assert whole_runs.resolve_revisions("HEAD, worktree") == {"HEAD": head, "worktree": "worktree"}
    for bad, message in [("HEAD", "two or more distinct"), ("HEAD,HEAD", "two or more distinct"),
                         ("HEAD,no-such-rev", "'no-such-rev' is not a commit")]:
        with pytest.raises(ValueError, match=message):
            whole_runs.resolve_revisions(bad)
    with pytest.raises(SystemExit):
        whole_runs.parse_args(["--revisions", "HEAD,no-such-rev"])
    assert "is not a commit of this repository" in capsys.readouterr().err
    # each variant under each revision, alternated, from its own tree; the worktree removed
    calls = []
    monkeypatch.setattr(whole_runs, "run_once",
                        lambda exp, argv, tree=None: calls.append((argv, tree)) or {"x": 1})
    args = whole_runs.parse_args(["--revisions", "HEAD,worktree", "--rounds", "2",
                                  "--variants", "a=;b=--epochs 1"])
    with whole_runs.checkouts(args.revision_commits) as trees:
        assert trees["worktree"] == common.REPO_ROOT and trees["HEAD"] != common.REPO_ROOT
        assert os.path.isfile(os.path.join(trees["HEAD"], "jaxtrain", "__init__.py"))
        runs = whole_runs.run_rounds(args, trees)
    assert not os.path.exists(trees["HEAD"])
    assert [r["variant"] for r in runs] == ["a @ HEAD", "b @ HEAD", "a @ worktree",
                                            "b @ worktree"] * 2
    assert [tree for _, tree in calls] == [trees["HEAD"]] * 2 + [common.REPO_ROOT] * 2 + \
        [trees["HEAD"]] * 2 + [common.REPO_ROOT] * 2
    assert calls[1][0][-2:] == ["--epochs", "1"]


# ----------------------------------------------------------------------------- conv_loops


def test_conv_loops_summary_gives_median_range_and_per_round_speedups():
    case = conv_loops.Case("demo", {"xla": None, "conv_nhwc": None}, 3, "s/iteration",
                           {}, {"xla": 1.0, "conv_nhwc": 2.0})
    case.seconds = {"xla": [1.0, 3.0, 2.0], "conv_nhwc": [0.5, 1.0, 2.0]}
    s = conv_loops.summarize(case)
    assert s["reference"] == "xla" and s["per_call"] == 3
    ref, v = s["variants"]
    assert ref["speedup_vs_xla_per_round"] == [1.0, 1.0, 1.0]
    assert v["speedup_vs_xla_per_round"] == [2.0, 3.0, 1.0]
    assert (v["median_s"], v["min_s"], v["max_s"]) == (1.0, 0.5, 2.0)
    assert (v["speedup_vs_xla_median"], v["speedup_vs_xla_min"],
            v["speedup_vs_xla_max"]) == (2.0, 1.0, 3.0)


def test_conv_loops_smoke_checks_values_and_writes_figures(tmp_path, capsys):
    """Tiny sizes, one PGD model: the variants agree (the benchmark asserts it) and every
    case has a time per round for every variant."""
    assert conv_loops.main(["--smoke", "--models", "resnet_tiny", "--out", str(tmp_path),
                            "--note", "test"]) == 0
    assert "speedup" in capsys.readouterr().out
    doc = _load(tmp_path / "conv_loops-cpu-smoke.json")
    assert doc["machine"]["note"] == "test" and doc["machine"]["compiler_options"]
    assert len(doc["loads"]) == doc["rounds"] == 2
    names = [c["case"] for c in doc["cases"]]
    assert names == [f"{g} gradient, {w}" for g in ("kernel", "input")
                     for w in ("direct", "fori_loop")] + ["pgd_linf 2 steps, resnet_tiny 8x8x3"]
    for c in doc["cases"]:
        assert c["variants"][0]["variant"] == "xla"
        for v in c["variants"]:
            assert len(v["seconds"]) == 2 and v["min_s"] <= v["median_s"] <= v["max_s"]
            assert len(v["speedup_vs_xla_per_round"]) == 2
    assert all(c["check"]["allclose"] for c in doc["cases"][:4])
    assert doc["cases"][1]["unit"] == "s/iteration" and doc["cases"][1]["per_call"] == 2
    pgd = doc["cases"][4]["check"]["nhwc_vjp"]
    assert pgd["fraction_pixels_different"] <= conv_loops.MAX_PGD_PIXELS_DIFFERENT
    with pytest.raises(SystemExit):
        conv_loops.parse_args(["--models", "vgg"])


# ----------------------------------------------------------------------------- end to end (slow)


def _bench(module: str, *args: str, tmp_path, timeout=900) -> dict:
    proc = subprocess.run([sys.executable, "-m", module, "--smoke", "--out", str(tmp_path), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    (path,) = [p for p in os.listdir(tmp_path) if p.endswith("-cpu-smoke.json")]
    return _load(tmp_path / path)


@pytest.mark.slow
def test_whole_runs_main(tmp_path):
    doc = _bench("benchmarks.whole_runs", tmp_path=tmp_path)
    auto, single = doc["runs"]  # digits MLP, 2 epochs, one device: auto fuses 20 per call
    assert (auto["variant"], auto["steps_per_call"]) == ("auto", 20)
    assert (single["variant"], single["steps_per_call"]) == ("single", 1)
    assert auto["test_loss"] == pytest.approx(single["test_loss"], rel=1e-5)
    assert all(r["steps"] == 40 and r["peak_rss_bytes"] > 0 and r["process_s"] > r["wall_s"]
               for r in doc["runs"])
    assert doc["summary"][1]["steps_per_s_vs_first_median"] > 0


@pytest.mark.slow
def test_whole_runs_main_compares_revisions(tmp_path):
    doc = _bench("benchmarks.whole_runs", "--revisions", "HEAD,worktree", "--variants", "auto=",
                 tmp_path=tmp_path)
    head, here = doc["runs"]
    assert (head["variant"], here["variant"]) == ("auto @ HEAD", "auto @ worktree")
    assert doc["revisions"]["worktree"] == "worktree" and len(doc["revisions"]["HEAD"]) == 40
    assert all(r["steps"] == 40 for r in doc["runs"])


@pytest.mark.slow
def test_pipeline_main(tmp_path):
    doc = _bench("benchmarks.pipeline", "--cases", "mlp:digits", "--loop", tmp_path=tmp_path)
    assert doc["loop_check"]["identical"] and doc["results"][0]["device_steps_per_s"] > 0


@pytest.mark.slow
def test_time_to_accuracy_main(tmp_path):
    doc = _bench("benchmarks.time_to_accuracy", "--target", "0.5", tmp_path=tmp_path)
    cold, warm = doc["results"]
    assert cold["start"] == "cold" and warm["start"] == "warm" and cold["reached"]
    assert cold["cache"] == warm["cache"] and os.listdir(cold["cache"])  # the cache was used


@needs_torch
@pytest.mark.slow
def test_torch_peer_main(tmp_path):
    doc = _bench("benchmarks.torch_peer", "--suites", "mlp,resnet,cnn", "--steps-per-call", "",
                 "--mlp-rounds", "2", tmp_path=tmp_path)
    runs = {r["name"]: r for r in doc["mlp"]["runs"]}
    # same initial parameters, same batches, same optimizer: the same test accuracy
    assert runs["pytorch eager"]["test_accuracy"] == pytest.approx(
        runs["jaxtrain, cold compile cache"]["test_accuracy"], abs=0.02)
    # like for like (loop + evals) beside end to end, on both sides
    for run in runs.values():
        assert 0 < run["train_eval_s"] < run["end_to_end_s"]
        assert run["speedup_vs_torch_train_eval"] > 0 and run["speedup_vs_torch_wall"] > 0
    jax_run = runs["jaxtrain, cold compile cache"]
    assert jax_run["end_to_end_s"] == jax_run["wall_s"] == pytest.approx(
        jax_run["setup_s"] + jax_run["train_eval_s"] + jax_run["finish_s"])
    rounds = doc["mlp"]["warm_vs_torch_rounds"]  # alternating warm-cache / PyTorch pairs
    assert len(rounds) == 2 and all(r["speedup_vs_torch_train_eval"] > 0 for r in rounds)
    assert rounds[0]["jax_train_eval_s"] == runs["jaxtrain, warm compile cache"]["train_eval_s"]
    floor = doc["mlp"]["steps_only"]
    assert floor["steps_only_s"] < jax_run["train_eval_s"] and floor["speedup_bound_vs_torch_train_eval"] > 0
    assert doc["resnet"]["ratio_images_per_s"] > 0
    # each CNN variant ran in lockstep with PyTorch's best setting: a ratio per repeat pair
    variants = doc["cnn"]["variants"]
    assert [v["name"] for v in variants] == list(torch_peer.SMOKE_CNN_VARIANTS)
    for v in variants:
        assert len(v["paired_ratios"]) == v["timing"]["repeats"] and v["ratio_vs_torch"] > 0
        assert v["first_loss"] == pytest.approx(variants[0]["first_loss"], rel=1e-4)
    assert len(doc["cnn"]["torch_rounds"]) == 1 + len(variants)


@pytest.mark.slow
def test_gpu_check_smoke(tmp_path):
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=REPO, capture_output=True,
                          text=True, timeout=900, check=False,
                          env={**os.environ, "SMOKE": "1", "OUT": str(tmp_path),
                               "PYTHON": sys.executable})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    summary = _load(tmp_path / "summary.json")
    assert summary["smoke"] and summary["device"]
    assert summary["steps"]["seeds"]["status"] == "passed"
    assert summary["figures"]["seeds/2_in_one_program"]["over_one_seed"] > 0


# ----------------------------------------------------------------------------- peer_death


def test_peer_death_refuses_unknown_variants(capsys):
    with pytest.raises(SystemExit):
        peer_death.parse_args(["--watch", "on,maybe"])
    assert "a list of on / off" in capsys.readouterr().err
    assert peer_death.parse_args(["--watch", "off"]).watch == ["off"]


@pytest.mark.slow
@pytest.mark.parametrize("sig, line", [
    ("KILL", "error: process 1 of 2 ended without a word"),
    ("STOP", "error: process 1 of 2 was not heard from for 3 s")])
def test_peer_death_smoke_stops_one_process_and_times_the_other(tmp_path, sig, line):
    assert peer_death.main(["--smoke", "--signal", sig, "--peer-timeout", "3",
                            "--out", str(tmp_path)]) == 0
    (run,) = _load(tmp_path / "peer_death-cpu-smoke.json")["runs"]
    assert run["watch"] == "on" and run["survivor_status"] == 1 and run["signal"] == sig
    assert run["survivor_last_line"].startswith(line)
    assert not run["traceback_or_abort"] and run["killed_at_step"] >= 5
    assert run["seconds_after_signal"] < (3 if sig == "KILL" else 20)


# ----------------------------------------------------------------------------- corruptions


def test_corruptions_times_each_name_and_preset(tmp_path, capsys):
    assert corruptions.main(["--smoke", "--names", "motion_blur", "--out", str(tmp_path)]) == 0
    runs = _load(tmp_path / "corruptions-cpu-smoke.json")["runs"]
    assert [(r["preset"], r["name"]) for r in runs] == [
        ("cifar", "motion_blur"), ("imagenet", "motion_blur")]
    assert all(0 < r["best_s"] <= r["median_s"] and r["first_call_s"] > 0 for r in runs)
    with pytest.raises(SystemExit, match="unknown corruption 'frost'"):
        corruptions.main(["--smoke", "--names", "frost", "--out", str(tmp_path)])


def test_poisson_times_both_samplers_per_preset_and_compile(tmp_path):
    assert poisson.main(["--smoke", "--presets", "cifar", "--out", str(tmp_path)]) == 0
    runs = _load(tmp_path / "poisson-cpu-smoke.json")["runs"]
    assert [(r["compile"], r["preset"]) for r in runs] == [("default", "cifar"), ("suite", "cifar")]
    for r in runs:
        assert set(r["median_s"]) == {"jaxtrain", "jax"} and all(v > 0 for v in r["median_s"].values())
        assert r["speedup"] == pytest.approx(r["median_s"]["jax"] / r["median_s"]["jaxtrain"])


def test_suite_compile_runs_each_case_both_ways(tmp_path):
    assert suite_compile.parse_case("cnn:32x32x3:512") == {
        "kind": "suite", "model": "cnn", "shape": [32, 32, 3], "n": 512}
    assert suite_compile.parse_case("sets:cnn:32x32x3:64")["kind"] == "sets"
    with pytest.raises(SystemExit, match="not \\[sets:\\]model:HxWxC:N"):
        suite_compile.parse_case("cnn:32x32:512")
    assert suite_compile.main(["--smoke", "--cases", "mlp:8x8x1:359,sets:mlp:8x8x1:359",
                               "--out", str(tmp_path)]) == 0
    suite, sets = _load(tmp_path / "suite_compile-cpu-smoke.json")["runs"]
    for run in (suite, sets):
        assert run["fast"]["fast"] is True and run["optimized"]["fast"] is False
        for side in run.values():
            assert side["n"] == 4 and side["total_s"] >= side["compile_s"] > 0
    for side in suite.values():
        assert {p["name"] for p in side["programs"]} >= {"clean", "noise"}
        assert side["auto_picks_fast"] is True
        assert 0 < side["forward_flops"] < 1e7  # 4 digits-shape images through the MLP
    for side in sets.values():  # one program, compiled once, run for 3 corruptions
        assert [p["name"] for p in side["programs"]] == ["sets0", "sets1", "sets2"]
        first, again = side["programs"][0]["compile_s"], side["programs"][1]["compile_s"]
        assert again < first / 10 and side["auto_picks_fast"] is False
        assert side["forward_flops"] == pytest.approx(15 * suite["fast"]["forward_flops"])