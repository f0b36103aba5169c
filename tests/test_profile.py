"""--profile-steps writes a jax.profiler trace of exactly those steps; --dry-run reports
parameter count, FLOPs and memory of the compiled step (checked against hand counts)
and writes nothing."""

from __future__ import annotations

import glob
import gzip
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtrain.config import ConfigError, TrainConfig
from jaxtrain.loop import train_and_evaluate
from jaxtrain.profiling import (
    StepProfiler,
    format_dry_run,
    model_flops,
    param_count,
    parse_profile_steps,
)
from jaxtrain.writers import read_tensorboard

BASE = TrainConfig(dataset="digits", model="mlp", epochs=1, batch_size=64, lr=2e-3,
                   progress="none", compilation_cache="", parallel="none")

# Digits MLP: 8x8x1 inputs, hidden (256, 256), 10 classes.
LAYERS = [(64, 256), (256, 256), (256, 10)]
PARAMS = sum(i * o + o for i, o in LAYERS)  # 85,002


def _traced_steps(logdir: str) -> list[int]:
    (path,) = glob.glob(os.path.join(logdir, "plugins", "profile", "*", "*.trace.json.gz"))
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    return sorted(int(e["args"]["step_num"]) for e in events if e.get("name") == "train")


@pytest.mark.parametrize("text, want", [("3:5", (3, 5)), ("0:1", (0, 1)), (" 10 : 20 ", (10, 20))])
def test_parse_profile_steps(text, want):
    assert parse_profile_steps(text) == want


@pytest.mark.parametrize("text", ["5", "5:5", "6:5", "-1:3", "a:b", "1:2:3", ""])
def test_bad_profile_steps_are_config_errors(text):
    with pytest.raises(ConfigError, match="--profile-steps"):
        parse_profile_steps(text)
    if text:
        with pytest.raises(ConfigError, match="--profile-steps"):
            BASE.replace(profile_steps=text).validate()


def test_step_profiler_traces_exactly_the_window(tmp_path):
    f = jax.jit(lambda x: jnp.tanh(x @ x))
    prof = StepProfiler(str(tmp_path), "2:4", total_steps=6)
    x = jnp.ones((64, 64))
    for step in range(6):
        x = prof.run(step, f, x)
        assert prof.active == (step in (2,))  # started before step 2, stopped after step 3
    prof.close()
    assert prof.traced_steps == [2, 3]
    assert _traced_steps(str(tmp_path)) == [2, 3]


def test_step_profiler_edges(tmp_path):
    f = jax.jit(lambda x: x + 1)
    off = StepProfiler(str(tmp_path / "off"), "", total_steps=3)
    assert off.run(0, f, 1) == 2 and not os.path.exists(tmp_path / "off")
    with pytest.raises(ConfigError, match="starts after the run's last step"):
        StepProfiler(str(tmp_path / "x"), "5:9", total_steps=5)
    short = StepProfiler(str(tmp_path / "short"), "1:100", total_steps=3)
    for step in range(3):  # the run ends before STOP: close() ends the trace
        short.run(step, f, 1)
    assert short.active
    short.close()
    assert not short.active and _traced_steps(str(tmp_path / "short")) == [1, 2]
    fused = StepProfiler(str(tmp_path / "fused"), "3:5", total_steps=6)
    for step in (0, 2, 4):  # calls of two steps each: [0, 1], [2, 3], [4, 5]
        fused.run(step, f, 1, n=2)
        assert fused.active == (step == 2)
    assert fused.traced_steps == [2, 3, 4, 5]
    assert _traced_steps(str(tmp_path / "fused")) == [2, 4]  # one annotation per call


@pytest.mark.needs("tensorboardX")
@pytest.mark.parametrize("steps_per_call, annotated", [(1, [3, 4]), (4, [0, 4])])
def test_training_run_with_profile_steps(tmp_path, steps_per_call, annotated):
    """The loop traces the calls holding steps 3 and 4 (one call per step, or fused
    calls of four steps), and still writes metrics and TensorBoard files."""
    workdir = str(tmp_path / "run")
    summary = train_and_evaluate(BASE.replace(profile_steps="3:5", log_every=5,
                                              steps_per_call=steps_per_call), workdir)
    assert summary["steps"] == 20
    assert _traced_steps(os.path.join(workdir, "profile")) == annotated
    # where the traced steps' time went: the MLP's dots are among its top ops
    with open(os.path.join(workdir, "profile", "summary.json")) as f:
        prof = json.load(f)
    assert prof["steps"] == (2 if steps_per_call == 1 else 8) and prof["devices"] >= 1
    assert prof["calls"] >= 2  # the traced calls, plus any dispatched before the trace
    assert ("update" if steps_per_call == 1 else "fused") in prof["program"]
    assert 0 < prof["busy_ms_per_call"] <= prof["span_ms_per_call"]
    assert 0 < prof["busy_fraction"] <= 1 and prof["ops"][0]["ms_per_call"] > 0
    assert any("dot" in op["name"] or "fusion" in op["name"] for op in prof["ops"])
    tb = read_tensorboard(os.path.join(workdir, "tensorboard"))
    assert {(s.step, s.tag) for s in tb} >= {(20, "train/loss"), (20, "val/accuracy"),
                                           (20, "test/accuracy")}


def _hand_dense_flops(batch: int) -> int:
    """Dot FLOPs of one fwd+bwd step (2 per multiply-add): forward, weight gradients and
    input gradients of every layer but the first (the images are not differentiated)."""
    macs = sum(i * o for i, o in LAYERS)
    return 2 * batch * (macs + macs + (macs - LAYERS[0][0] * LAYERS[0][1]))


def test_dry_run_figures_match_hand_counts(tmp_path, capsys):
    workdir = tmp_path / "never_created"
    r = train_and_evaluate(BASE.replace(dry_run=True), str(workdir))
    assert not workdir.exists()  # nothing written, no checkpoint
    assert r["params"] == PARAMS == 85_002
    assert r["param_bytes"] == 4 * PARAMS
    # XLA counts the dots exactly, plus elementwise work (bias, ReLU, softmax, Adam's
    # ~10 FLOPs per parameter), a few percent here: at least the dots, at most +25%.
    dense = _hand_dense_flops(64)
    assert dense <= r["flops_per_step"] <= 1.25 * dense, r["flops_per_step"] / dense
    # and the usual 6 * params * batch rule of thumb holds within 20% (the missing
    # first-layer input gradient makes the dots 7% less than 6PB)
    assert 0.8 <= r["flops_per_step"] / (6 * PARAMS * 64) <= 1.2
    # the step as written counts the same dots before XLA optimizes it
    assert dense <= r["model_flops_per_step"] <= 1.25 * dense
    # memory: state (params + Adam's two moments) and the device-resident train split
    # are arguments; the donated state is aliased to the output
    train_bytes = 1294 * (64 * 4 + 4)
    state_bytes = 3 * 4 * PARAMS
    assert state_bytes + train_bytes <= r["argument_bytes"] <= state_bytes + train_bytes + 65536
    assert r["alias_bytes"] >= 3 * 4 * PARAMS
    assert r["footprint_bytes"] == (r["argument_bytes"] + r["output_bytes"] - r["alias_bytes"]
                                    + r["temp_bytes"])
    out = capsys.readouterr().out
    assert "parameters: 85,002" in out and "FLOPs per step: " in out
    assert out.strip() == format_dry_run(r)


def test_dry_run_over_a_mesh_reports_per_device_work(tmp_path):
    one = train_and_evaluate(BASE.replace(dry_run=True), str(tmp_path / "a"))
    mesh = train_and_evaluate(BASE.replace(dry_run=True, parallel="mesh", devices=8),
                              str(tmp_path / "b"))
    assert mesh["num_devices"] == 8 and mesh["params"] == one["params"]
    dense = _hand_dense_flops(64)
    # the dots split 8 ways; the optimizer update is replicated on every device
    assert dense / 8 <= mesh["flops_per_device"] <= one["flops_per_device"] / 4
    assert mesh["flops_per_step"] == 8 * mesh["flops_per_device"]
    assert mesh["model_flops_per_step"] == one["model_flops_per_step"]  # the same model step


def test_dry_run_of_a_seed_run_counts_one_model_and_all_seeds_work(tmp_path):
    one = train_and_evaluate(BASE.replace(dry_run=True), str(tmp_path / "a"))
    seeds = train_and_evaluate(BASE.replace(dry_run=True, num_seeds=4), str(tmp_path / "b"))
    assert seeds["params"] == PARAMS and seeds["num_seeds"] == 4
    assert seeds["flops_per_step"] == pytest.approx(4 * one["flops_per_step"], rel=0.05)
    assert seeds["model_flops_per_step"] == one["model_flops_per_step"]  # one model's step
    assert seeds["argument_bytes"] >= 4 * 3 * 4 * PARAMS  # four states


def test_dry_run_of_the_seeds_experiment_skips_its_robustness_suite(tmp_path, capsys):
    """``digits_seeds`` runs the robustness suite after training; a dry run trains
    nothing, so it stops after the report (it used to fail on the missing workdir)."""
    from experiments import digits_seeds

    workdir = tmp_path / "w"
    code = digits_seeds.main(["--workdir", str(workdir), "--dry-run", "--num-seeds", "2",
                              "--parallel", "none", "--compilation-cache", ""])
    out, err = capsys.readouterr()
    assert code == 0 and not workdir.exists(), err
    assert "dry run: mlp on digits" in out and "error" not in err


def test_dry_run_cli_exits_zero(tmp_path, capsys):
    from experiments import digits_mlp

    workdir = tmp_path / "w"
    code = digits_mlp.main(["--workdir", str(workdir), "--dry-run", "--parallel", "none",
                            "--compilation-cache", ""])
    assert code == 0 and not workdir.exists()
    assert "memory per device:" in capsys.readouterr().out


def test_param_count():
    tree = {"a": np.zeros((3, 4)), "b": {"c": np.zeros(5, np.float16)}}
    assert param_count(tree) == 17


def test_model_flops_counts_dots_and_convolutions_by_hand():
    """Counted on the unoptimized program (the GPU's compiled analysis misses cuDNN convs)."""
    x, w = jnp.ones((8, 16)), jnp.ones((16, 4))
    assert model_flops(lambda a, b: a @ b, x, w) == 2 * 8 * 16 * 4

    img, kernel = jnp.ones((2, 6, 6, 3), jnp.bfloat16), jnp.ones((3, 3, 3, 5), jnp.bfloat16)

    def conv(i, k):
        return jax.lax.conv_general_dilated(i, k, (1, 1), "VALID",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    # 2 * output positions (2*4*4) * output channels (5) * kernel volume (3*3*3)
    assert model_flops(conv, img, kernel) == 2 * (2 * 4 * 4) * 5 * (3 * 3 * 3)


def test_trace_summary_busy_time_is_the_union_of_op_intervals():
    from jaxtrain.trace_summary import _busy_ns

    assert _busy_ns([]) == 0
    assert _busy_ns([(0, 10), (5, 15), (20, 30)]) == 25  # overlap counted once, gap not
    assert _busy_ns([(20, 30), (0, 40)]) == 40  # nested


def test_profile_summary_failure_is_a_warning(tmp_path, capsys):
    prof = StepProfiler(str(tmp_path / "empty"), "0:1")
    prof.traced_steps = [0]  # as if a trace had been taken, but nothing was written
    assert prof.summarize() is None
    assert "warning: could not summarize the profile" in capsys.readouterr().err
