"""``--steps-per-call``: K steps fused in one compiled call (``jaxtrain.fusing``).

The call plan covers every step once and crosses no eval, checkpoint or log step;
a fused call is the same steps as single calls (same program per step, same
results, on one device and on a mesh); auto fuses only where it was measured
faster; what cannot fuse is refused before anything is written.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.digits_mlp import DEFAULTS
from jaxtrain import fusing, loop, program
from jaxtrain.checkpoint import load_params
from jaxtrain.config import ConfigError

FAST = DEFAULTS.replace(epochs=1, progress="none", compilation_cache="", tensorboard=False)


def _max_diff(a, b) -> float:
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b)))



@pytest.mark.parametrize(
    "start, total, k, boundaries, expected",
    [
        (0, 10, 1, (5,), [(i, 1) for i in range(10)]),
        (0, 10, 4, (5,), [(0, 4), (4, 1), (5, 4), (9, 1)]),
        (3, 12, 3, (6, 0), [(3, 3), (6, 3), (9, 3)]),
        (4, 12, 3, (6, 0), [(4, 2), (6, 3), (9, 3)]),
        (0, 8, 8, (20,), [(0, 8)]),
        (0, 121, 25, (100, 50), [(0, 25), (25, 25), (50, 25), (75, 25), (100, 21)]),
    ],
)
def test_call_plan(start, total, k, boundaries, expected):
    assert fusing.call_plan(start, total, k, boundaries) == expected


def test_call_plan_covers_every_step_once_and_never_crosses_a_boundary():
    for k in (1, 2, 3, 7):
        plan = fusing.call_plan(5, 103, k, (10, 25))
        steps = [s + i for s, n in plan for i in range(n)]
        assert steps == list(range(5, 103))
        for s, n in plan:
            assert 1 <= n <= k
            assert all((s + i) % 10 and (s + i) % 25 for i in range(1, n)), (s, n)
            end = s + n  # a short call ends on a boundary or at the end, never before one
            assert n == k or end % 10 == 0 or end % 25 == 0 or end == 103, (s, n)


def test_unstack_steps_splits_fused_metrics_only():
    fused = {"loss": np.arange(3.0), "nonfinite": np.zeros(3, np.int32)}
    assert [m["loss"] for m in fusing.unstack_steps(fused, seeded=False, n=3)] == [0.0, 1.0, 2.0]
    assert [m["loss"] for m in fusing.unstack_steps(fused, seeded=False, n=2)] == [0.0, 1.0]
    single = {"loss": np.float32(1.0), "nonfinite": np.int32(0)}
    assert fusing.unstack_steps(single, seeded=False) == [single]
    seeds = {"loss": np.arange(4.0)}  # a seed run's [S] metrics are one step
    assert fusing.unstack_steps(seeds, seeded=True) == [seeds]


def test_steps_per_call_trains_like_single_steps(tmp_path, caplog):
    """K fused steps (a shorter call up to the eval step) = the same run; so is the
    default, auto, which fuses the digits MLP on one CPU device in calls ending on every
    log and eval step, and so writes the same files. Short calls run the same compiled
    program as full ones: neither run compiles the single step."""
    params, lines, compiled = {}, {}, {}
    for k in (1, 6, 0):  # 20 steps per epoch: calls of 6, 6, 6, 2; auto: 7, 7, 6 (log every 7)
        workdir = str(tmp_path / f"k{k}")
        caplog.clear()
        with jax.log_compiles(True), caplog.at_level(logging.WARNING):
            summary = loop.train_and_evaluate(
                FAST.replace(parallel="none", steps_per_call=k, log_every=7), workdir)
        compiled[k] = re.findall(r"Compiling jit\((update|fused)\)", caplog.text)
        assert summary["steps_per_call"] == (k or 7)
        params[k] = load_params(workdir)
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            lines[k] = [json.loads(line) for line in f]
    assert compiled == {1: ["update"], 6: ["fused"], 0: ["fused"]}
    assert _max_diff(params[1], params[6]) < 1e-6 and _max_diff(params[1], params[0]) < 1e-6
    val = {k: [(r["step"], r["accuracy"]) for r in v if r["split"] == "val"]
           for k, v in lines.items()}
    assert val[1] == val[6] and val[1][0][0] == 20
    assert {r["step"] for r in lines[6] if r["split"] == "train"} >= {20}
    # auto: every line of the single-step run, at the same steps, with the same values
    assert [(r["step"], r["split"]) for r in lines[0]] == [(r["step"], r["split"]) for r in lines[1]]
    for a, b in zip(lines[0], lines[1]):
        assert a.keys() == b.keys()
        for name, value in a.items():
            if isinstance(value, float):
                assert value == pytest.approx(b[name], rel=1e-5, abs=1e-6), name
            else:
                assert value == b[name], name


def _eqns(jaxpr):
    """Every equation of ``jaxpr`` and of the jaxprs nested in its equations."""
    for eqn in jaxpr.eqns:
        yield eqn
        for p in eqn.params.values():
            for sub in p if isinstance(p, (list, tuple)) else [p]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _eqns(inner)


@pytest.mark.parametrize("resident", [True, False], ids=["resident", "host"])
def test_fused_conv_steps_are_single_steps_and_loop_over_row_indices(resident):
    """K fused CNN steps (convolutions and their gradients inside the compiled loop)
    compute the K single calls, in both data placements, and a call of n < K steps
    the first n of them. They take the forms XLA:CPU runs as fast fused as alone
    (fusing.gather_rows, fuse_steps): the loop slices int32 row indices only, never the
    batch itself, and every batch gather clips."""
    from jaxtrain import data as data_lib

    k = 3
    config = DEFAULTS.replace(model="cnn", batch_size=32)
    ds = data_lib.load_dataset("digits")
    state = program.build_model_and_state(config, ds, 100)
    n = len(ds.train["label"])
    idx_KB = np.stack([data_lib.batch_indices(0, s, n, 32) for s in range(k)])
    key = program.step_key(0)
    update = program.make_update(config, resident=resident)
    fused = fusing.fuse_steps(update, k, resident=resident)
    if resident:
        args = lambda idx: (ds.train, idx)
    else:
        args = lambda idx: ({name: v[idx] for name, v in ds.train.items()},)
    states, losses = [state], []
    step = jax.jit(update)
    for i in range(k):
        st, m = step(states[-1], *args(idx_KB[i]), key)
        states.append(st)
        losses.append(float(m["loss"]))
    run = jax.jit(fused)
    for steps in (k, 2):  # a full call, and a short one (its last input is padding)
        fused_state, fm = run(state, *args(idx_KB), np.int32(steps), key)
        assert np.asarray(fm["loss"])[:steps] == pytest.approx(losses[:steps], rel=1e-5)
        assert not np.any(np.asarray(fm["loss"])[steps:])  # steps not run: zeros
        assert _max_diff(jax.device_get(states[steps].params),
                         jax.device_get(fused_state.params)) < 1e-5

    eqns = list(_eqns(jax.make_jaxpr(fused)(state, *args(idx_KB), np.int32(k), key).jaxpr))
    (loop_eqn,) = [e for e in eqns if e.primitive.name == "while"]
    body = list(_eqns(loop_eqn.params["body_jaxpr"].jaxpr))
    sliced = [e.invars[0].aval for e in body
              if e.primitive.name in ("dynamic_slice", "gather", "slice")
              and e.invars[0].aval.ndim and e.invars[0].aval.shape[0] == k]
    assert sliced and all((a.dtype, a.shape) == (jnp.int32, (k, 32)) for a in sliced)
    batch_gathers = [e for e in eqns if e.primitive.name == "gather"
                     and e.invars[0].aval.shape[1:] in {(8, 8, 1), ()}
                     and e.invars[0].aval.shape[0] in (n, k * 32)]
    assert len(batch_gathers) == 2  # image and label
    assert all(e.params["mode"] == jax.lax.GatherScatterMode.CLIP for e in batch_gathers)


def test_auto_steps_per_call_fuses_the_measured_models_on_cpu_devices():
    auto = functools.partial(fusing.auto_steps_per_call, platform="cpu", strategy_kind="none",
                             seeded=False, per_epoch=20)
    mlp = DEFAULTS.replace(steps_per_call=0)  # 10 epochs, eval every epoch, log every 50 steps
    # the smallest k that makes the fewest calls ending on every eval and log step
    assert auto(mlp) == 20  # intervals of 20, 20, 10, 10, ...: one call each
    assert auto(mlp.replace(log_every=24, eval_every=80)) == 24
    assert auto(mlp.replace(log_every=60, eval_every=60)) == 30  # 60, 60, 60, 20: 7 calls
    assert auto(mlp.replace(log_every=128, eval_every=128)) == 32  # capped
    assert auto(mlp.replace(checkpoint_every=7)) == 7
    assert auto(mlp.replace(epochs=1), per_epoch=421) == 25  # MNIST: 50, ..., 50, 21
    assert auto(mlp.replace(log_every=1)) == 1
    assert auto(mlp.replace(steps_per_call=3)) == 3  # an explicit value is kept
    assert auto(mlp.replace(model="cnn")) == 20 and auto(mlp.replace(model="resnet_tiny")) == 20
    assert auto(mlp.replace(model="resnet18")) == 1  # ~1 s steps on CPU, 1.07x fused
    assert auto(mlp, platform="gpu") == 1
    assert auto(mlp, strategy_kind="mesh") == 20  # a mesh of CPU devices, resident data
    assert auto(mlp, strategy_kind="mesh", resident=False) == 1  # 0.66-0.80x: not local
    assert auto(mlp, strategy_kind="mesh", processes=2) == 1  # not measured
    assert auto(mlp, strategy_kind="pmap") == 1
    assert auto(mlp, seeded=True) == 1


def test_steps_per_call_refuses_pmap_host_data_on_a_mesh_and_seeds(tmp_path):
    with pytest.raises(ConfigError, match=r"--steps-per-call 4 needs one device or a mesh "
                                          r"\(--parallel none, mesh or auto\), not --parallel pmap"):
        loop.train_and_evaluate(FAST.replace(parallel="pmap", steps_per_call=4),
                                str(tmp_path / "pmap"))
    with pytest.raises(ConfigError, match=r"--steps-per-call 4 needs the training data on "
                                          r"the devices \(--data-placement device\)"):
        loop.train_and_evaluate(FAST.replace(parallel="mesh", steps_per_call=4,
                                             data_placement="host"), str(tmp_path / "host"))
    assert not os.path.exists(tmp_path / "pmap") and not os.path.exists(tmp_path / "host")
    with pytest.raises(ConfigError, match="--steps-per-call > 1 runs one seed only"):
        FAST.replace(num_seeds=2, steps_per_call=2).validate()


def test_steps_per_call_on_a_mesh_trains_like_single_steps_and_one_device(tmp_path, caplog):
    """Fused calls over a mesh of 4 devices (the [K, B] indices sharded on B:
    Strategy.shard_steps) write the lines single steps on the same mesh write, and end
    with their params; both match one device's. auto fuses there too, compiling the
    fused program only."""
    runs = {"mesh K=1": {"parallel": "mesh", "devices": 4, "steps_per_call": 1},
            "mesh auto": {"parallel": "mesh", "devices": 4},
            "mesh K=6": {"parallel": "mesh", "devices": 4, "steps_per_call": 6},
            "one device": {"parallel": "none", "steps_per_call": 1}}
    params, lines, compiled, summaries = {}, {}, {}, {}
    for name, changes in runs.items():
        workdir = str(tmp_path / name.replace(" ", "_"))
        caplog.clear()
        with jax.log_compiles(True), caplog.at_level(logging.WARNING):
            summaries[name] = loop.train_and_evaluate(
                FAST.replace(dropout=0.2, log_every=7, **changes), workdir)
        compiled[name] = re.findall(r"Compiling jit\((update|fused)\)", caplog.text)
        params[name] = load_params(workdir)
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            lines[name] = [json.loads(line) for line in f]
    assert [summaries[n]["steps_per_call"] for n in runs] == [1, 7, 6, 1]
    assert [summaries[n]["num_devices"] for n in runs] == [4, 4, 4, 1]
    assert compiled["mesh auto"] == compiled["mesh K=6"] == ["fused"]
    assert compiled["mesh K=1"] == ["update"]
    ref = lines["mesh K=1"]
    assert [(r["step"], r["split"]) for r in lines["mesh auto"]] == [
        (r["step"], r["split"]) for r in ref]
    for a, b in zip(lines["mesh auto"], ref):
        for name, value in a.items():
            if isinstance(value, float):
                assert value == pytest.approx(b[name], rel=1e-5, abs=1e-6), name
    for name in ("mesh auto", "mesh K=6"):
        assert _max_diff(params[name], params["mesh K=1"]) < 1e-6, name
    assert _max_diff(params["one device"], params["mesh K=1"]) < 1e-5
    assert summaries["mesh auto"]["test_loss"] == pytest.approx(
        summaries["one device"]["test_loss"], rel=1e-5)
