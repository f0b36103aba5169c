"""Data-parallel strategies: ``none``, ``mesh`` and ``pmap`` train the same model.

The backbone is an equivalence test: the loop's own update function
(``make_update``), compiled by each strategy on the 8 fake CPU devices of
``conftest.py``, trains 50 steps; params, BatchNorm statistics and eval sums
must agree across strategies (and device counts) within float32 tolerance.
The same runs prove that nothing recompiles after the first step and that a
steady-state step moves no data between host and devices.

Every step is blocked on before the next program runs (DESIGN.md: on a 2-core
machine an all-reduce deadlocked when a one-device and an 8-device program
were dispatched asynchronously in turn).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jaxtrain import data as data_lib
from jaxtrain import models
from jaxtrain.config import TrainConfig
from jaxtrain.parallel import AXIS, ParallelError, create_strategy, prefetch
from jaxtrain.program import build_model_and_state, init_key, make_update, step_key
from jaxtrain.state import create_train_state
from jaxtrain.steps import eval_step

ROOT = Path(__file__).resolve().parents[1]
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
STEPS = 50
RTOL = 1e-5


@functools.lru_cache(maxsize=1)
def digits() -> data_lib.Dataset:
    return data_lib.load_dataset("digits")


@functools.lru_cache(maxsize=4)
def initial_state(config: TrainConfig, steps: int):
    """The loop's initial host state (cached: compiling the init takes seconds on CPU)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(models.MODELS, "resnet_micro", RESNET_MICRO)
        return build_model_and_state(config, digits(), steps)


class CompileCounter:
    """Counts XLA backend compilations while active (a context manager)."""

    def __init__(self):
        self.count = 0

    def _listen(self, event: str, duration: float, **kwargs) -> None:
        if event == COMPILE_EVENT:
            self.count += 1

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listen)


def train(kind: str, config: TrainConfig, *, resident: bool, devices: int = 8,
          steps: int = STEPS) -> dict:
    """``steps`` steps of the loop's update under one strategy, then a test-set eval.

    Step 0 compiles; steps 1.. run under ``jax.transfer_guard("disallow")`` with
    inputs placed beforehand, and count traces and compilations."""
    ds = digits()
    n = len(ds.train["label"])
    host_state = jax.tree.map(np.copy, initial_state(config, steps))  # donated below
    strategy = create_strategy(kind, devices)
    strategy.check_batch_size(config.batch_size)
    base = make_update(config, resident=resident)
    traces = []

    def counted(*args, **kwargs):  # runs once per trace, never per call
        traces.append(kwargs.get("axis_name"))
        return base(*args, **kwargs)

    update = strategy.compile(counted, donate_argnums=(0,))
    state = strategy.replicate(host_state)
    key = strategy.replicate(step_key(config.seed))
    train_data = strategy.replicate(ds.train) if resident else None

    def inputs(step):
        idx = data_lib.batch_indices(config.seed, step, n, config.batch_size)
        return strategy.shard(idx) if resident else strategy.shard(data_lib.take(ds.train, idx))

    compiles_after_first = 0
    for step in range(steps):
        x = jax.block_until_ready(inputs(step))
        guard = jax.transfer_guard("disallow") if step else contextlib.nullcontext()
        with guard, CompileCounter() as compiled:
            args = (state, train_data, x, key) if resident else (state, x, key)
            state, metrics = update(*args)
            jax.block_until_ready((state, metrics))
        if step:
            compiles_after_first += compiled.count
    evaluate = strategy.compile(eval_step)
    eval_batch = -(-256 // strategy.shards) * strategy.shards
    sums = None
    for batch in data_lib.eval_batches(ds.test, eval_batch):
        out = jax.block_until_ready(evaluate(state, strategy.shard(batch)))
        sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    return {
        "init": host_state.params,
        "params": strategy.unreplicate(state.params),
        "model_state": strategy.unreplicate(state.model_state),
        "step": int(strategy.unreplicate(state.step)),
        "loss": float(strategy.unreplicate(metrics)["loss"]),
        "eval": {k: float(v) for k, v in strategy.unreplicate(sums).items()},
        "traces": traces,
        "compiles_after_first": compiles_after_first,
    }


def relative_errors(a, b) -> dict[str, float]:
    """``|a - b| / |b|`` per leaf (Frobenius norms), keyed by leaf path."""
    flat_a, _ = jax.tree_util.tree_flatten_with_path(a)
    flat_b = jax.tree.leaves(b)
    assert len(flat_a) == len(flat_b)
    return {
        jax.tree_util.keystr(path): float(
            np.linalg.norm(np.asarray(x, np.float64) - y) / max(np.linalg.norm(y), 1e-30)
        )
        for (path, x), y in zip(flat_a, flat_b)
    }


def moved(a, b) -> float:
    """``|a - b| / |b|`` over all leaves together."""
    diff = sum(np.sum((np.asarray(x, np.float64) - y) ** 2) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    return float(np.sqrt(diff / sum(np.sum(np.square(y, dtype=np.float64))
                                     for y in jax.tree.leaves(b))))


def assert_trees_close(a, b, rtol: float = RTOL, what: str = "") -> None:
    errors = relative_errors(a, b)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= rtol, f"{what}{worst}: relative difference {errors[worst]:.3g} > {rtol}"


# ----------------------------------------------------------------------------- equivalence

MLP = TrainConfig(dataset="digits", model="mlp", batch_size=64, lr=2e-3, optimizer="adam",
                  schedule="cosine", seed=3)
# One residual stage with BatchNorm: the same ResNet code as resnet_tiny, a third of its
# compile time. resnet_tiny itself runs in the slow test below.
RESNET_MICRO = functools.partial(models.ResNet, stage_sizes=(1,), width=4)
BN = TrainConfig(dataset="digits", model="resnet_micro", batch_size=32, lr=0.05,
                 optimizer="momentum", schedule="constant", weight_decay=1e-4, seed=1)


@pytest.fixture(scope="module")
def mlp_runs():
    # Resident data (batches gathered on the devices); pmap also on a 4-device subset.
    runs = {kind: train(kind, MLP, resident=True) for kind in ("none", "mesh", "pmap")}
    runs["pmap4"] = train("pmap", MLP, resident=True, devices=4)
    return runs


@pytest.fixture(scope="module")
def bn_runs():
    # Host batches placed per step; BatchNorm statistics must be those of the global batch.
    return {kind: train(kind, BN, resident=False) for kind in ("none", "mesh", "pmap")}


@pytest.mark.parametrize("other", ["mesh", "pmap", "pmap4"])
def test_mlp_params_agree_across_strategies(mlp_runs, other):
    ref = mlp_runs["none"]
    assert ref["step"] == mlp_runs[other]["step"] == STEPS
    # The tolerance only means something if training moved the params far beyond it.
    assert moved(ref["params"], ref["init"]) > 1e3 * RTOL
    assert_trees_close(mlp_runs[other]["params"], ref["params"], what=f"{other} vs none: ")


@pytest.mark.parametrize("other", ["mesh", "pmap", "pmap4"])
def test_mlp_eval_metrics_agree(mlp_runs, other):
    ref, got = mlp_runs["none"]["eval"], mlp_runs[other]["eval"]
    assert got["count"] == ref["count"] == len(digits().test["label"])  # padded batch masked
    assert got["correct"] == ref["correct"]
    assert got["loss_sum"] == pytest.approx(ref["loss_sum"], rel=RTOL)


@pytest.mark.parametrize("other", ["mesh", "pmap"])
def test_batchnorm_model_agrees_across_strategies(bn_runs, other):
    ref, got = bn_runs["none"], bn_runs[other]
    assert moved(ref["params"], ref["init"]) > 1e3 * RTOL
    assert_trees_close(got["params"], ref["params"], what=f"{other} params: ")
    # Running statistics from per-device batches (4 examples each) would be far off.
    assert jax.tree.leaves(ref["model_state"]), "the model has BatchNorm statistics"
    assert_trees_close(got["model_state"], ref["model_state"], what=f"{other} batch_stats: ")
    assert got["eval"]["correct"] == ref["eval"]["correct"]
    assert got["eval"]["count"] == ref["eval"]["count"]
    assert got["eval"]["loss_sum"] == pytest.approx(ref["eval"]["loss_sum"], rel=RTOL)


@pytest.mark.slow
def test_per_device_batchnorm_would_fail_the_tolerance():
    """The BatchNorm comparison can fail: pmap without the cross-device mean differs."""
    ds = digits()
    host_state = initial_state(BN, STEPS)
    strategy = create_strategy("pmap", 8)
    idx = data_lib.batch_indices(BN.seed, 0, len(ds.train["label"]), BN.batch_size)
    batch = strategy.shard(data_lib.take(ds.train, idx))

    def local_bn_update(state, batch, key, *, axis_name):
        # Same update, but the model's BatchNorm keeps axis_name=None: per-device statistics.
        state = state.replace(model=state.model.clone(axis_name=None))
        del axis_name
        return make_update(BN, resident=False)(state, batch, key, axis_name=None)

    right = strategy.compile(make_update(BN, resident=False))
    wrong = strategy.compile(local_bn_update)
    state, key = strategy.replicate(host_state), strategy.replicate(step_key(BN.seed))
    good = jax.block_until_ready(right(state, batch, key)[0])
    bad = jax.block_until_ready(wrong(state, batch, key)[0])
    errors = relative_errors(strategy.unreplicate(bad.model_state),
                             strategy.unreplicate(good.model_state))
    assert max(errors.values()) > 100 * RTOL


@pytest.mark.parametrize("kind", ["none", "mesh", "pmap"])
def test_no_recompilation_or_transfers_after_first_step(mlp_runs, bn_runs, kind):
    for runs in (mlp_runs, bn_runs):
        run = runs[kind]
        # One trace, with the axis name only under pmap; no compilation after step 0
        # (steps 1.. ran under transfer_guard("disallow"), which raises on any transfer).
        assert run["traces"] == [AXIS if kind == "pmap" else None]
        assert run["compiles_after_first"] == 0


def test_transfer_guard_catches_a_host_input():
    """The guard in ``train`` is live: an unplaced (numpy) batch is refused."""
    strategy = create_strategy("mesh", 8)
    f = strategy.compile(lambda x, *, axis_name: x * 2)
    x = np.ones((8, 3), np.float32)
    jax.block_until_ready(f(strategy.shard(x)))
    with jax.transfer_guard("disallow"), pytest.raises(Exception, match="[Dd]isallowed"):
        f(x)


@pytest.mark.slow
def test_resnet_tiny_agrees_across_strategies():
    # Adam at a modest rate: under the BN config (SGD momentum, lr 0.05) this deeper net
    # amplified float32 reduction-order noise until mesh and none drifted 4e-3 apart.
    config = MLP.replace(model="resnet_tiny", batch_size=64)
    runs = {kind: train(kind, config, resident=False) for kind in ("none", "mesh", "pmap")}
    for other in ("mesh", "pmap"):
        assert_trees_close(runs[other]["params"], runs["none"]["params"], what=f"{other}: ")
        assert_trees_close(runs[other]["model_state"], runs["none"]["model_state"])
        assert runs[other]["eval"]["correct"] == runs["none"]["eval"]["correct"]
        assert runs[other]["compiles_after_first"] == 0


# ----------------------------------------------------------------------------- randomness


class DropoutProbe(nn.Module):
    """Dense classifier whose dropout mask is kept in a ``probe`` collection.

    ``train_step`` returns non-param collections per device (they are not
    averaged), so under pmap the state shows each device's mask."""

    rate: float = 0.5
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.reshape((x.shape[0], -1))
        keep = nn.Dropout(self.rate, deterministic=not train)(jnp.ones_like(x))
        mask = self.variable("probe", "mask", jnp.zeros, x.shape, x.dtype)
        if train:
            mask.value = keep
        return nn.Dense(10)(x * keep)


PER_DEVICE, DEVICES = 4, 8  # "none" runs the same global batch on one device


@functools.cache
def dropout_probe(kind: str):
    """(strategy, placed state, compiled loop update) for the dropout probe model."""
    strategy = create_strategy(kind, DEVICES)
    rows = PER_DEVICE if kind == "pmap" else PER_DEVICE * DEVICES
    init = functools.partial(create_train_state, DropoutProbe(), optax.sgd(0.1),
                             sample_images=jnp.zeros((rows, 8, 8, 1)))
    state = strategy.init(init, jax.random.key(0))
    return strategy, state, strategy.compile(make_update(TrainConfig(), resident=False))


def dropout_masks(kind: str, seed: int) -> np.ndarray:
    """Dropout masks ``[devices, per_device, D]`` of one update step under ``kind``,
    every device given the identical shard of images."""
    strategy, state, update = dropout_probe(kind)
    images = np.random.default_rng(0).uniform(size=(PER_DEVICE, 8, 8, 1)).astype(np.float32)
    images = np.tile(images, (DEVICES, 1, 1, 1))
    batch = strategy.shard({"image": images, "label": np.zeros(len(images), np.int32)})
    new, _ = update(state, batch, strategy.replicate(step_key(seed)))
    mask = np.asarray(jax.block_until_ready(new.model_state["probe"]["mask"]))
    return mask.reshape((DEVICES, PER_DEVICE, -1))


def test_pmap_dropout_differs_across_devices_and_is_a_function_of_the_seed():
    masks = dropout_masks("pmap", seed=0)
    assert 0.3 < masks.mean() / 2 < 0.7  # inverted dropout: kept units are 1 / (1 - 0.5)
    for d in range(1, masks.shape[0]):
        assert not np.array_equal(masks[0], masks[d]), f"device {d} reused device 0's mask"
    np.testing.assert_array_equal(dropout_masks("pmap", seed=0), masks)
    assert not np.array_equal(dropout_masks("pmap", seed=1), masks)


def test_mesh_dropout_is_the_global_batch_mask():
    """Under mesh one key draws the mask of the global batch, as on one device."""
    masks = dropout_masks("mesh", seed=0)
    assert not np.array_equal(masks[0], masks[1])
    np.testing.assert_array_equal(masks, dropout_masks("none", seed=0))


# ----------------------------------------------------------------------------- devices, batch


def test_devices_restricts_to_the_first_n():
    for kind in ("mesh", "pmap"):
        strategy = create_strategy(kind, 3)
        assert strategy.devices == tuple(jax.devices()[:3])
        assert strategy.shards == 3
    assert create_strategy("auto").kind == "mesh"
    assert create_strategy("auto").devices == tuple(jax.devices())
    assert create_strategy("auto", 1).kind == "none"
    assert create_strategy("none").devices == (jax.devices()[0],)


def test_pmap_on_a_subset_places_on_that_subset():
    strategy = create_strategy("pmap", 3)
    out = strategy.compile(lambda x, *, axis_name: jax.lax.psum(x, axis_name))(
        strategy.shard(np.arange(6.0, dtype=np.float32))
    )
    assert set(out.sharding.device_set) == set(jax.devices()[:3])
    np.testing.assert_allclose(strategy.unreplicate(out), [6.0, 9.0])


@pytest.mark.parametrize(
    "kind, devices, error",
    [
        ("mesh", 9, "--devices 9 asks for more than the 8 visible"),
        ("data", 0, "unknown --parallel 'data'"),
    ],
)
def test_create_strategy_rejects(kind, devices, error):
    with pytest.raises(ParallelError, match=error):
        create_strategy(kind, devices)


@pytest.mark.parametrize(
    "devices, batch, nearest",
    [(8, 60, "56, 64"), (8, 4, ": 8$"), (3, 64, "63, 66"), (8, 0, ": 8$")],
)
def test_batch_size_must_split_over_devices(devices, batch, nearest):
    strategy = create_strategy("mesh", devices)
    with pytest.raises(ParallelError, match=nearest) as info:
        strategy.check_batch_size(batch)
    message = str(info.value)
    assert "\n" not in message
    assert f"--batch-size {batch} " in message and f"{devices} device(s)" in message
    strategy.check_batch_size(devices * 5)  # a multiple passes
    create_strategy("none").check_batch_size(batch or 1)  # one device takes any batch


def test_cli_rejects_an_indivisible_batch_before_compiling(tmp_path):
    workdir = tmp_path / "run"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.digits_mlp", "--workdir", str(workdir),
         "--batch-size", "60", "--parallel", "pmap", "--compilation-cache", ""],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0] == ("error: --batch-size 60 does not split evenly over 8 device(s) in "
                        "1 process(es) (needs a multiple of 8); nearest valid: 56, 64")
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not workdir.exists() or not any(workdir.iterdir())


# ----------------------------------------------------------------------------- placement


def toy_init(key):
    return {"w": jax.random.normal(key, (4, 3)), "step": jnp.zeros((), jnp.int32)}


@pytest.mark.parametrize("kind", ["none", "mesh", "pmap"])
def test_init_places_like_replicate(kind):
    """``Strategy.init`` (eval_shape, then jit with out_shardings) == host init + replicate."""
    strategy = create_strategy(kind, 4)
    key = jax.random.key(7)
    direct = strategy.init(toy_init, key)
    via_host = strategy.replicate(jax.tree.map(np.asarray, jax.jit(toy_init)(key)))
    assert jax.tree.structure(direct) == jax.tree.structure(via_host)
    assert direct["w"].shape == ((4, 4, 3) if kind == "pmap" else (4, 3))
    for a, b in zip(jax.tree.leaves(direct), jax.tree.leaves(via_host)):
        assert a.shape == b.shape
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_init_of_a_train_state_under_pmap():
    """Static fields (model, optimizer) survive; every device holds the host init."""
    strategy = create_strategy("pmap", 4)
    host = initial_state(MLP, STEPS)
    init = functools.partial(create_train_state, host.model, host.tx,
                             sample_images=jnp.zeros((1, 8, 8, 1)), lr_fn=host.lr_fn)
    state = strategy.init(init, init_key(MLP.seed))
    assert state.model is host.model and state.tx is host.tx
    assert state.step.shape == (4,)
    assert_trees_close(strategy.unreplicate(state.params), host.params, rtol=1e-6)
    for leaf in jax.tree.leaves(state.params):
        assert set(leaf.sharding.device_set) == set(jax.devices()[:4])


@pytest.mark.parametrize("kind", ["none", "mesh", "pmap"])
def test_shard_places_rows_in_order(kind):
    strategy = create_strategy(kind, 4)
    x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    placed = strategy.shard({"x": x})["x"]
    if kind == "pmap":
        assert placed.shape == (4, 2, 3)
        shards = sorted(placed.addressable_shards, key=lambda s: s.index[0].start)
        for d, shard in enumerate(shards):
            np.testing.assert_array_equal(np.asarray(shard.data)[0], x[2 * d: 2 * d + 2])
    np.testing.assert_array_equal(np.asarray(placed).reshape(8, 3), x)


@pytest.mark.parametrize("kind", ["none", "mesh"])
def test_shard_steps_puts_each_steps_rows_where_shard_puts_them(kind):
    """``[K, B, ...]`` stacked steps (a fused call's input): step k's rows sit on the
    devices that ``shard`` gives that step's batch alone."""
    strategy = create_strategy(kind, 4)
    x = np.arange(3 * 8 * 2, dtype=np.int32).reshape(3, 8, 2)
    placed = strategy.shard_steps({"x": x})["x"]
    np.testing.assert_array_equal(np.asarray(placed), x)
    for k in range(3):
        alone = strategy.shard(x[k])
        where = {d: np.asarray(s.data) for s in alone.addressable_shards for d in [s.device]}
        for s in placed.addressable_shards:
            np.testing.assert_array_equal(np.asarray(s.data)[k], where[s.device])
    if kind == "mesh":
        assert placed.sharding.spec == P(None, AXIS)


def test_shard_steps_refuses_pmap():
    with pytest.raises(ParallelError, match="run on one device or a mesh, not --parallel pmap"):
        create_strategy("pmap", 4).shard_steps(np.zeros((3, 8), np.int32))


# ----------------------------------------------------------------------------- CPU in-flight cap

MANY_STEPS = """
import jax, jax.numpy as jnp, numpy as np
from jaxtrain.parallel import create_strategy
for kind in ("mesh", "pmap"):
    s = create_strategy(kind)
    f = s.compile(lambda w, x, *, axis_name: w - 1e-3 * jnp.mean(
        jax.lax.pmean(x, axis_name) if axis_name else x), donate_argnums=(0,))
    w = s.replicate(np.ones((), np.float32))
    x = s.shard(np.ones((8,), np.float32))
    for _ in range(400):  # never blocked on: the strategy must cap calls in flight
        w = f(w, x)
    print(kind, round(float(s.unreplicate(w)), 4), flush=True)
"""


def test_many_unblocked_steps_do_not_abort_on_cpu():
    """Hundreds of collective steps dispatched without waiting: XLA:CPU aborted the
    process (rendezvous timeout) before ``compile`` capped the calls in flight."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", MANY_STEPS], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["mesh", "0.6", "pmap", "0.6"]


def test_throttled_blocks_every_k_calls_and_forwards_attributes(monkeypatch):
    from jaxtrain import parallel

    blocked = []
    monkeypatch.setattr(parallel.jax, "block_until_ready", lambda x: blocked.append(x) or x)
    jitted = jax.jit(lambda x: x + 1)
    f = parallel.Throttled(jitted, 3)
    outs = [f(i) for i in range(7)]
    assert [int(o) for o in outs] == list(range(1, 8))
    assert [int(b) for b in blocked] == [3, 6]  # the 3rd and 6th outputs
    assert f.lower is not None and f.lower(1.0).compile() is not None
    assert isinstance(create_strategy("mesh", 2).compile(lambda x, *, axis_name: x),
                      parallel.Throttled)
    assert not isinstance(create_strategy("none").compile(lambda x, *, axis_name: x),
                          parallel.Throttled)


# ----------------------------------------------------------------------------- prefetch


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "jaxtrain-prefetch" and t.is_alive()]


def test_prefetch_keeps_order_and_places_with_the_sharding():
    strategy = create_strategy("mesh", 8)
    batches = [np.full((8, 2), i, np.float32) for i in range(6)]
    out = list(prefetch(batches, strategy.shard, size=2))
    assert [float(np.asarray(b)[0, 0]) for b in out] == list(range(6))
    sharded = jax.sharding.NamedSharding(strategy.mesh, jax.sharding.PartitionSpec(AXIS))
    assert all(b.sharding == sharded for b in out)
    assert not prefetch_threads()


def test_prefetch_runs_at_most_size_ahead():
    produced = []

    def source():
        for i in range(100):
            produced.append(i)
            yield i

    it = prefetch(source(), lambda b: b, size=2)
    assert next(it) == 0
    time.sleep(0.3)  # let the producer run as far ahead as it may
    # Taken: 1; queued: size; in the producer's hands, waiting for room: 1.
    assert len(produced) <= 1 + 2 + 1
    it.close()


@pytest.mark.parametrize("where", ["source", "place"])
def test_prefetch_reraises_in_the_consumer_at_the_failing_batch(where):
    def source():
        yield from range(3)
        if where == "source":
            raise OSError("disk gone")
        yield 3

    def place(b):
        if where == "place" and b == 3:
            raise OSError("disk gone")
        return b

    got = []
    with pytest.raises(OSError, match="disk gone"):
        for b in prefetch(source(), place):
            got.append(b)  # noqa: PERF402  (one at a time, up to the error)
    assert got == [0, 1, 2]
    deadline = time.monotonic() + 5
    while prefetch_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not prefetch_threads()


def test_prefetch_thread_stops_when_the_consumer_stops_early():
    def endless():
        i = 0
        while True:
            yield i
            i += 1

    it = prefetch(endless(), lambda b: b, size=2)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    time.sleep(0.1)  # the queue is full, the producer blocked on put
    assert len(prefetch_threads()) == 1
    it.close()
    assert not prefetch_threads()

    with pytest.raises(ZeroDivisionError):  # an error in the consumer's own body
        for b in prefetch(endless(), lambda b: b):
            if b == 2:
                1 / 0  # noqa: B018
    assert not prefetch_threads()


def test_prefetch_rejects_size_zero():
    with pytest.raises(ValueError, match="size"):
        next(prefetch([1], lambda b: b, size=0))


# ----------------------------------------------------------------------------- benchmark


@pytest.mark.slow
def test_benchmark_smoke(tmp_path, capsys):
    """``python -m benchmarks.parallel --smoke`` runs, prints the table and writes its JSON."""

    from benchmarks import parallel as bench

    assert bench.main(["--smoke", "--devices", "1,2", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "parallel-cpu-smoke.json").read_text())
    assert doc["fake_devices"] is True
    by_count = {r["devices"]: r["strategies"] for r in doc["results"]}
    assert set(by_count[1]) == {"none", "mesh", "pmap"} and set(by_count[2]) == {"mesh", "pmap"}
    for strategies in by_count.values():
        for s in strategies.values():
            assert s["steps_per_s"] > 0 and s["images_per_s"] == pytest.approx(
                256 * s["steps_per_s"])
            assert s["max_rel_diff"] < 1e-5  # the same training, whatever the strategy
    assert "vs mesh" in capsys.readouterr().out
