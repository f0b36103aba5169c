"""Checkpointer: async saves, retention, verification, damage, shapes, any device count."""

from __future__ import annotations

import functools
import glob
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from optax import ScaleByAdamState

from jaxtrain.checkpoint import (
    DAMAGED_DIR,
    Checkpointer,
    DamagedCheckpointError,
    crc32,
    first_nonfinite,
    leaf_paths,
    load_params,
    load_variables,
    set_aside,
    snapshot,
    state_tree,
)
from jaxtrain.config import ConfigError
from jaxtrain.models import create_model
from jaxtrain.optim import create_optimizer, create_schedule
from jaxtrain.parallel import create_strategy
from jaxtrain.state import create_train_state
from jaxtrain.steps import train_step

# Orbax's reader may leave an asyncio callback behind after failing on a damaged file; it
# surfaces as an "unraisable" warning in whichever test runs next.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _tree(scale: float) -> dict:
    """A small state-shaped tree: dicts, a tuple of named tuples, an int scalar, a key."""
    def params():
        return {"dense": {"kernel": np.full((4, 3), scale, np.float32),
                          "bias": np.zeros(3, np.float32)}}

    opt = (ScaleByAdamState(np.asarray(int(scale), np.int32), params(), params()),)
    return {"step": np.asarray(int(scale), np.int32), "params": params(), "model_state": {},
            "opt_state": opt, "rng": np.asarray(jax.random.PRNGKey(int(scale)))}


def _save(ckpt: Checkpointer, step: int, metrics=None) -> None:
    ckpt.save(step, _tree(step), {"step": step}, metrics=metrics)


def _equal(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(x, y) for x, y in zip(la, lb)
    )


def _data_files(workdir: str, step: int) -> list[str]:
    files = glob.glob(os.path.join(workdir, "checkpoints", str(step), "state", "**", "d", "*"),
                      recursive=True)
    return sorted(files, key=os.path.getsize, reverse=True)


def _damage_data(workdir: str, step: int, how: str) -> None:
    """Damages every OCDBT data file of ``step``. Every one, not the biggest: OCDBT keeps
    superseded b-tree files next to live ones (often of equal size), and which one a
    glob lists first varies, so damaging one file at times damaged nothing read."""
    for path in _data_files(workdir, step):
        if how == "truncate":
            os.truncate(path, os.path.getsize(path) // 2)
        elif how == "delete":
            os.remove(path)
        else:  # "overwrite": same size, different bytes
            with open(path, "r+b") as f:
                data = bytearray(f.read())
                data[len(data) // 2] ^= 0xFF
                f.seek(0)
                f.write(data)


# ----------------------------------------------------------------------------- save / restore


def test_roundtrip_keeps_structure_values_and_meta(tmp_path):
    ckpt = Checkpointer(str(tmp_path), keep=3)
    _save(ckpt, 5)
    tree, meta = ckpt.restore(5, target=_tree(0))
    ckpt.close()
    assert _equal(tree, _tree(5))
    assert type(tree["opt_state"][0]).__name__ == "ScaleByAdamState"
    assert meta["step"] == 5
    assert meta["checksums"]["params/dense/kernel"] == crc32(_tree(5)["params"]["dense"]["kernel"])


def test_save_returns_before_the_write_and_tree_can_be_a_function(tmp_path):
    ckpt = Checkpointer(str(tmp_path))
    calls = []

    def produce():
        calls.append(1)
        return _tree(7)

    ckpt.save(7, produce, {"step": 7})
    ckpt.wait()
    assert calls == [1]
    assert ckpt.latest_step() == 7 and ckpt.last_step == 7
    ckpt.close()


def test_error_in_background_save_surfaces_on_wait(tmp_path):
    ckpt = Checkpointer(str(tmp_path))

    def broken():
        raise OSError("disk full")

    ckpt.save(1, broken, {})
    with pytest.raises(OSError, match="disk full"):
        ckpt.wait()
    ckpt.close()


def test_keeps_last_k_plus_best_across_restarts(tmp_path):
    ckpt = Checkpointer(str(tmp_path), keep=2, best_metric="val_accuracy", best_mode="max")
    accuracy = {1: 0.5, 2: 0.9, 3: None, 4: 0.6, 5: None, 6: 0.7}
    for step in (1, 2, 3):
        _save(ckpt, step, None if accuracy[step] is None else {"val_accuracy": accuracy[step]})
    ckpt.close()
    ckpt = Checkpointer(str(tmp_path), keep=2, best_metric="val_accuracy", best_mode="max")
    for step in (4, 5, 6):  # a restarted run still knows step 2 is the best
        _save(ckpt, step, None if accuracy[step] is None else {"val_accuracy": accuracy[step]})
    assert ckpt.all_steps() == [2, 5, 6]
    assert ckpt.best_step() == 2
    ckpt.close()


def test_best_by_loss_keeps_the_minimum(tmp_path):
    ckpt = Checkpointer(str(tmp_path), keep=1, best_metric="val_loss", best_mode="min")
    for step, loss in ((1, 0.9), (2, 0.1), (3, 0.5), (4, 0.7)):
        _save(ckpt, step, {"val_loss": loss})
    assert ckpt.all_steps() == [2, 4]
    ckpt.close()


def test_without_best_metric_only_last_k(tmp_path):
    ckpt = Checkpointer(str(tmp_path), keep=2)
    for step in (1, 2, 3):
        _save(ckpt, step, {"val_accuracy": 1.0 / step})
    assert ckpt.all_steps() == [2, 3]
    ckpt.close()


def test_interrupted_save_is_never_taken_for_a_checkpoint(tmp_path):
    ckpt = Checkpointer(str(tmp_path))
    _save(ckpt, 3)
    ckpt.close()
    # What a save killed mid-write leaves: Orbax's temporary folder, never renamed.
    root = os.path.join(tmp_path, "checkpoints")
    shutil.copytree(os.path.join(root, "3"), os.path.join(root, "9.orbax-checkpoint-tmp-123"))
    for f in _data_files(str(tmp_path), 3)[:1]:
        rel = os.path.relpath(f, os.path.join(root, "3"))
        os.truncate(os.path.join(root, "9.orbax-checkpoint-tmp-123", rel), 10)
    reader = Checkpointer(str(tmp_path), read_only=True)
    assert reader.all_steps() == [3]
    assert reader.restore_latest(_tree(0)).step == 3
    reader.close()


# ----------------------------------------------------------------------------- damage


@pytest.mark.parametrize("damage", ["truncate", "delete", "overwrite", "meta", "state_dir"])
def test_damaged_latest_falls_back_to_previous(tmp_path, damage):
    workdir = str(tmp_path)
    ckpt = Checkpointer(workdir, keep=3)
    for step in (10, 20):
        _save(ckpt, step)
    ckpt.close()
    step_dir = os.path.join(workdir, "checkpoints", "20")
    if damage in ("truncate", "delete", "overwrite"):
        _damage_data(workdir, 20, damage)
    elif damage == "meta":
        os.remove(os.path.join(step_dir, "meta", "metadata"))
    else:
        shutil.rmtree(os.path.join(step_dir, "state"))
    reader = Checkpointer(workdir, read_only=True)
    with pytest.raises(DamagedCheckpointError, match="step 20"):
        reader.restore(20, _tree(0))
    found = reader.restore_latest(_tree(0))
    reader.close()
    assert found.step == 10 and [s for s, _ in found.damaged] == [20]
    assert _equal(found.tree, _tree(10))


def _closed_loop_error() -> BaseException:
    """What a tensorstore read finishing after a failed restore raises: asyncio's
    ``call_soon_threadsafe`` on a closed loop."""
    import asyncio

    loop = asyncio.new_event_loop()
    loop.close()
    try:
        loop.call_soon_threadsafe(print)
    except RuntimeError as e:
        return e
    raise AssertionError("call_soon_threadsafe on a closed loop did not raise")


def test_a_failed_restore_leaves_no_closed_loop_tracebacks(tmp_path, monkeypatch):
    """Reads still in flight when a damaged restore gives up call into its closed event
    loop from tensorstore threads, after restore returned: Python printed 10-30 'Event
    loop is closed' tracebacks above the fallback warning. Those (only those) are dropped."""
    import sys
    import types

    workdir = str(tmp_path)
    ckpt = Checkpointer(workdir)
    _save(ckpt, 10)
    ckpt.close()
    _damage_data(workdir, 10, "truncate")
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    reader = Checkpointer(workdir, read_only=True)
    with pytest.raises(DamagedCheckpointError):
        reader.restore(10, _tree(0))
    reader.close()

    def unraisable(error):
        return types.SimpleNamespace(exc_type=type(error), exc_value=error,
                                     exc_traceback=error.__traceback__, err_msg=None,
                                     object=None)

    sys.unraisablehook(unraisable(_closed_loop_error()))
    other = RuntimeError("Event loop is closed")  # raised elsewhere: still reported
    sys.unraisablehook(unraisable(other))
    unrelated = ValueError("something else")
    sys.unraisablehook(unraisable(unrelated))
    assert [u.exc_value for u in seen] == [other, unrelated]


def test_values_that_differ_from_their_checksums_are_damage(tmp_path):
    """Bytes that still decode but changed (what a flipped bit in array data gives)."""
    ckpt = Checkpointer(str(tmp_path))
    _save(ckpt, 4)
    ckpt.close()
    path = os.path.join(tmp_path, "checkpoints", "4", "meta", "metadata")
    with open(path) as f:
        meta = json.load(f)
    meta["checksums"]["params/dense/kernel"] ^= 1
    with open(path, "w") as f:
        json.dump(meta, f)
    reader = Checkpointer(str(tmp_path), read_only=True)
    with pytest.raises(DamagedCheckpointError,
                       match="step 4.*params/dense/kernel does not match its checksum"):
        reader.restore(4, _tree(0))
    reader.close()


def test_every_checkpoint_damaged_is_a_one_line_error(tmp_path):
    ckpt = Checkpointer(str(tmp_path))
    _save(ckpt, 1)
    ckpt.close()
    _damage_data(str(tmp_path), 1, "delete")
    reader = Checkpointer(str(tmp_path), read_only=True)
    with pytest.raises(ConfigError, match="every checkpoint .* is damaged") as e:
        reader.restore_latest(_tree(0))
    reader.close()
    assert "\n" not in str(e.value)


def test_set_aside_moves_the_step_out_of_orbax_sight(tmp_path):
    workdir = str(tmp_path)
    ckpt = Checkpointer(workdir, keep=3)
    for step in (1, 2):
        _save(ckpt, step)
    ckpt.close()
    moved = set_aside(workdir, 2)
    assert moved == os.path.join(workdir, DAMAGED_DIR, "2") and os.path.isdir(moved)
    reader = Checkpointer(workdir, read_only=True)
    assert reader.all_steps() == [1]
    reader.close()


# ----------------------------------------------------------------------------- shapes / config


def test_shape_mismatch_names_the_first_leaf(tmp_path):
    ckpt = Checkpointer(str(tmp_path))
    _save(ckpt, 1)
    ckpt.wait()
    other = _tree(0)
    other["params"]["dense"]["kernel"] = np.zeros((4, 5), np.float32)
    with pytest.raises(ConfigError, match=r"params/dense/kernel is float32\[4, 3\] there, "
                                          r"float32\[4, 5\] here"):
        ckpt.restore_latest(other)
    extra = _tree(0)
    extra["params"]["head"] = {"kernel": np.zeros((3, 2), np.float32)}
    with pytest.raises(ConfigError, match="it has no params/head/kernel"):
        ckpt.restore_latest(extra)
    ckpt.close()


def test_check_callback_refuses_before_restoring(tmp_path):
    ckpt = Checkpointer(str(tmp_path))
    _save(ckpt, 1)

    def check(meta):
        raise ConfigError(f"--lr was {meta['step']}")

    with pytest.raises(ConfigError, match="--lr was 1"):
        ckpt.restore_latest(_tree(0), check=check)
    ckpt.close()


def test_read_only_checkpointer_creates_nothing(tmp_path):
    reader = Checkpointer(str(tmp_path / "absent"), read_only=True)
    assert reader.all_steps() == [] and reader.restore_latest(_tree(0)) is None
    reader.close()
    assert not os.path.exists(tmp_path / "absent")


def test_load_params_latest_and_by_step(tmp_path):
    ckpt = Checkpointer(str(tmp_path), keep=3)
    for step in (1, 2):
        _save(ckpt, step)
    ckpt.close()
    assert _equal(load_params(str(tmp_path)), _tree(2)["params"])
    assert _equal(load_params(str(tmp_path), step=1), _tree(1)["params"])
    assert _equal(load_params(str(tmp_path), step=np.int64(1)), _tree(1)["params"])
    for not_a_step in (1.0, "1", True):  # not "damaged", not "no checkpoint at step 1"
        with pytest.raises(TypeError, match="step must be an int or None"):
            load_params(str(tmp_path), step=not_a_step)
    with pytest.raises(FileNotFoundError, match="no checkpoint at step 7"):
        load_params(str(tmp_path), step=7)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_params(str(tmp_path / "nothing"))


def test_load_variables_adds_model_state(tmp_path):
    with_bn = _tree(3)
    with_bn["model_state"] = {"batch_stats": {"mean": np.arange(3, dtype=np.float32)}}
    ckpt = Checkpointer(str(tmp_path), keep=3)
    ckpt.save(1, _tree(1), {})
    ckpt.save(2, with_bn, {})
    ckpt.close()
    variables = load_variables(str(tmp_path))
    assert set(variables) == {"params", "batch_stats"}
    assert _equal(variables["batch_stats"], with_bn["model_state"]["batch_stats"])
    assert set(load_variables(str(tmp_path), step=1)) == {"params"}


def test_load_params_skips_damaged_latest_with_a_warning(tmp_path):
    ckpt = Checkpointer(str(tmp_path), keep=3)
    for step in (1, 2):
        _save(ckpt, step)
    ckpt.close()
    _damage_data(str(tmp_path), 2, "delete")
    with pytest.warns(UserWarning, match="damaged checkpoint at step 2.*using step 1"):
        params = load_params(str(tmp_path))
    assert _equal(params, _tree(1)["params"])


# ----------------------------------------------------------------------------- leaves


def test_leaf_paths_read_named_tuples_like_saved_dicts():
    paths = [p for p, _ in leaf_paths(_tree(1))]
    assert "opt_state/0/mu/dense/kernel" in paths and "params/dense/bias" in paths


def test_first_nonfinite_and_snapshot_flag():
    tree = _tree(1)
    assert first_nonfinite(tree) is None
    copy, finite = jax.jit(snapshot)(tree)
    assert bool(finite) and _equal(copy, tree)
    tree["opt_state"][0].nu["dense"]["bias"][1] = np.inf
    assert first_nonfinite(tree) == "opt_state/0/nu/dense/bias"
    assert not bool(jax.jit(snapshot)(tree)[1])


def test_snapshot_survives_donation_of_the_original():
    x = {"w": jnp.arange(6.0)}
    copy, _ = jax.jit(snapshot)(x)
    jax.jit(lambda t: jax.tree.map(lambda v: v * 0 - 1, t), donate_argnums=0)(x)
    assert np.array_equal(np.asarray(copy["w"]), np.arange(6.0))


# ----------------------------------------------------------------------------- device counts


@functools.lru_cache(maxsize=1)
def _mlp_state():
    model = create_model("mlp", 10, mean=(0.3,), std=(0.3,))
    tx = create_optimizer("adam", create_schedule("cosine", 1e-2, 100))
    return create_train_state(model, tx, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))


def _batch(n: int = 32) -> dict:
    rng = np.random.default_rng(0)
    return {"image": rng.uniform(0, 1, (n, 8, 8, 1)).astype(np.float32),
            "label": rng.integers(0, 10, n).astype(np.int32)}


@functools.cache
def _compiled(kind: str, devices: int):
    strategy = create_strategy(kind, devices)
    step = strategy.compile(functools.partial(train_step, skip_nonfinite=True))
    return strategy, step, strategy.compile(snapshot)


def _train(kind: str, devices: int, host_state, steps: int):
    """``steps`` train steps under a strategy; returns the strategy, state on devices and
    the host copy the loop would checkpoint (snapshot compiled like the step, then ``get``)."""
    strategy, step, take_snapshot = _compiled(kind, devices)
    state = strategy.replicate(host_state)
    rng = strategy.replicate(jax.random.PRNGKey(1))
    for _ in range(steps):
        state, _ = step(state, strategy.shard(_batch()), rng)
        jax.block_until_ready(state)  # 8 fake devices on 2 cores: never interleave programs
    copy, finite = take_snapshot(state_tree(state))
    assert np.all(strategy.unreplicate(finite))
    return strategy, state, strategy.unreplicate(copy)


@pytest.mark.parametrize("saved,restored", [
    (("pmap", 8), ("mesh", 4)),
    (("none", 1), ("pmap", 8)),
    pytest.param(("pmap", 8), ("none", 1), marks=pytest.mark.slow),
    pytest.param(("mesh", 4), ("pmap", 8), marks=pytest.mark.slow),
], ids=["pmap8-to-mesh4", "1-to-pmap8", "pmap8-to-1", "mesh4-to-pmap8"])
def test_restore_onto_another_device_count(tmp_path, saved, restored):
    base = _mlp_state()
    host = jax.tree.map(np.asarray, base)
    _, _, tree = _train(*saved, host, steps=2)
    assert all(np.ndim(x) == np.ndim(y) for x, y in zip(jax.tree.leaves(tree),
                                                        jax.tree.leaves(state_tree(host))))
    ckpt = Checkpointer(str(tmp_path))
    ckpt.save(2, tree, {"step": 2})
    ckpt.close()

    reader = Checkpointer(str(tmp_path), read_only=True)
    found = reader.restore_latest(state_tree(host))
    reader.close()
    assert _equal(found.tree, tree)  # bitwise: nothing depends on the saving device count
    resumed = host.replace(**found.tree)
    strategy, state, after = _train(*restored, resumed, steps=1)
    assert int(strategy.unreplicate(state.step)) == 3
    # One more step on the new device count matches the same step on one device.
    _, _, reference = _train("none", 1, resumed, steps=1)
    for a, b in zip(jax.tree.leaves(after["params"]), jax.tree.leaves(reference["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_benchmark_smoke(tmp_path):
    from benchmarks import checkpoint as bench

    assert bench.main(["--smoke", "--out", str(tmp_path)]) == 0
    assert os.path.exists(tmp_path / "checkpoint-cpu-smoke.json")
