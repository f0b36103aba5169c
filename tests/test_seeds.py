"""Seed i of an N-seed run equals the single run with seed base + i."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtrain import data as data_lib
from jaxtrain.checkpoint import load_params
from jaxtrain.config import TrainConfig
from jaxtrain.loop import train_and_evaluate
from jaxtrain.models import create_model
from jaxtrain.parallel import ParallelError
from jaxtrain.seeds import (
    auto_seed_chunk,
    fit_seed_chunk,
    map_seeds,
    seed_list,
    stack,
    step_bytes,
    unstack,
)

BASE = TrainConfig(
    dataset="digits", model="mlp", epochs=1, batch_size=64, lr=2e-3, progress="none",
    compilation_cache="", eval_every=10,
)


def _run(tmp_path, name: str, **changes) -> tuple[dict, dict]:
    workdir = os.path.join(tmp_path, name)
    summary = train_and_evaluate(BASE.replace(**changes), workdir)
    return summary, load_params(workdir)


def _predictions(params, digits) -> np.ndarray:
    model = create_model("mlp", digits.num_classes, mean=digits.mean, std=digits.std)
    logits = model.apply({"params": params}, digits.test["image"])
    return np.asarray(np.argmax(logits, -1))


def _assert_params_close(single, stacked, i: int) -> None:
    """Relative error ||a - b|| / ||a|| < 1e-5 per leaf (float32 reduction order differs
    between one device and a sharded batch; Adam amplifies the last bits a little)."""
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(unstack(stacked, i)), strict=True):
        assert np.linalg.norm(a - b) / (np.linalg.norm(a) + 1e-12) < 1e-5


BASE_SEED, NUM_SEEDS = 3, 4


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory):
    """The reference: each seed trained alone on one device."""
    tmp = tmp_path_factory.mktemp("single")
    return [_run(tmp, f"seed{i}", seed=BASE_SEED + i, devices=1) for i in range(NUM_SEEDS)]


@pytest.mark.parametrize(
    "devices,seed_parallel,seed_chunk",
    [(1, False, 0), (8, False, 0), (4, True, 0), (1, False, 3), (8, False, 2), (2, True, 1)],
    ids=["one-device", "mesh8-batch-sharded", "mesh4-seed-sharded", "one-device-chunk3",
         "mesh8-chunk2", "mesh2-seed-sharded-chunk1"],
)
def test_seed_i_equals_single_run(tmp_path, single_runs, devices, seed_parallel, seed_chunk):
    """Chunk 3 of 4 seeds leaves a remainder chunk; seed-sharded chunks stay on their device."""
    multi, stacked = _run(
        tmp_path, "multi", seed=BASE_SEED, num_seeds=NUM_SEEDS, devices=devices,
        seed_parallel=seed_parallel, seed_chunk=seed_chunk,
    )
    assert multi["num_seeds"] == NUM_SEEDS and multi["seeds"] == seed_list(BASE_SEED, NUM_SEEDS)
    assert multi["num_devices"] == devices
    per_device = NUM_SEEDS // devices if seed_parallel else NUM_SEEDS
    assert multi["seed_chunk"] == (seed_chunk or per_device)
    assert all(leaf.shape[0] == NUM_SEEDS for leaf in jax.tree.leaves(stacked))
    digits = data_lib.load_dataset("digits")
    for i, (single, params) in enumerate(single_runs):
        _assert_params_close(params, stacked, i)
        np.testing.assert_array_equal(
            _predictions(params, digits), _predictions(unstack(stacked, i), digits)
        )
        assert multi["test_accuracy_per_seed"][i] == pytest.approx(single["test_accuracy"], abs=1e-9)
        assert multi["test_loss_per_seed"][i] == pytest.approx(single["test_loss"], rel=1e-5)


def test_seed_summary_and_metrics_lines(tmp_path):
    summary, _ = _run(tmp_path, "multi", num_seeds=3, devices=1)
    stats = summary["test_accuracy_stats"]
    per_seed = summary["test_accuracy_per_seed"]
    assert stats["n"] == 3 and stats["values"] == per_seed
    assert stats["mean"] == pytest.approx(np.mean(per_seed))
    assert stats["std"] == pytest.approx(np.std(per_seed, ddof=1))
    assert stats["t_interval"][0] <= stats["mean"] <= stats["t_interval"][1]
    with open(os.path.join(tmp_path, "multi", "summary.json")) as f:
        on_disk = json.load(f)
    assert on_disk["test_accuracy_per_seed"] == per_seed
    with open(os.path.join(tmp_path, "multi", "metrics.jsonl")) as f:
        lines = [json.loads(x) for x in f]
    tests = [r for r in lines if r["split"] == "test"]
    assert sorted(r["seed"] for r in tests) == [0, 1, 2]
    assert [r["accuracy"] for r in sorted(tests, key=lambda r: r["seed"])] == pytest.approx(per_seed)


def test_seed_strategy_errors(tmp_path):
    with pytest.raises(ParallelError, match="pmap"):
        train_and_evaluate(BASE.replace(num_seeds=2, parallel="pmap"), str(tmp_path / "a"))
    with pytest.raises(ParallelError, match="divisible"):
        train_and_evaluate(
            BASE.replace(num_seeds=3, seed_parallel=True, devices=2), str(tmp_path / "b")
        )


def test_stack_unstack_roundtrip():
    trees = [{"w": np.full((2, 3), i, np.float32), "b": np.array(i)} for i in range(4)]
    stacked = stack(trees)
    assert stacked["w"].shape == (4, 2, 3)
    for i in range(4):
        np.testing.assert_array_equal(unstack(stacked, i)["w"], trees[i]["w"])


def test_auto_seed_chunk():
    assert auto_seed_chunk(32, bytes_per_seed=100, budget_bytes=10_000) == 32
    assert auto_seed_chunk(32, bytes_per_seed=1000, budget_bytes=10_000) == 10
    assert auto_seed_chunk(32, bytes_per_seed=10**9, budget_bytes=10) == 1


def test_automatic_chunk_when_seeds_do_not_fit(tmp_path, single_runs, monkeypatch, capsys):
    """With little free memory the loop picks a chunk below N by itself, says so, and
    trains the same models."""
    from jaxtrain import seeds

    monkeypatch.setattr(seeds, "available_bytes", lambda *a: 1)  # nothing fits: chunk 1
    multi, stacked = _run(tmp_path, "auto", seed=BASE_SEED, num_seeds=NUM_SEEDS, devices=1)
    assert multi["seed_chunk"] == 1
    assert "computing 1 at a time" in capsys.readouterr().out
    for i, (_, params) in enumerate(single_runs):
        _assert_params_close(params, stacked, i)


def test_map_seeds_chunks_equal_vmap():
    x = np.arange(6 * 3, dtype=np.float32).reshape(6, 3)
    w = np.linspace(-1, 1, 6 * 3 * 2, dtype=np.float32).reshape(6, 3, 2)

    def f(a, b):
        return {"y": a @ b, "s": a.sum()}

    want = jax.vmap(f)(x, w)
    for chunk, groups in [(1, 1), (4, 1), (6, 1), (1, 2), (2, 3), (0, 2)]:
        got = map_seeds(f, (x, w), chunk=chunk, groups=groups)
        np.testing.assert_allclose(got["y"], want["y"], rtol=1e-6)
        np.testing.assert_allclose(got["s"], want["s"], rtol=1e-6)


def test_map_seeds_computes_chunk_seeds_at_a_time():
    """The chunked program's temporaries scale with the chunk (XLA's memory analysis;
    XLA:CPU reports no temporaries for the unchunked vmap, so chunks are compared)."""

    def f(w, x):
        return jnp.sum(jnp.tanh(jnp.tanh(x @ w) @ w.T) @ w)

    w, x = np.ones((8, 256, 256), np.float32), np.ones((8, 512, 256), np.float32)
    need = {c: step_bytes(jax.jit(lambda a, b, c=c: map_seeds(f, (a, b), chunk=c))
                          .lower(w, x).compile()) for c in (2, 4)}
    if not need[4]:
        pytest.skip("no memory analysis on this backend")
    assert need[2] < 0.75 * need[4]


def test_fit_seed_chunk_halves_until_it_fits():
    class Fake:  # a compiled step whose memory is 10 units per seed in the chunk
        def __init__(self, chunk):
            self.chunk = chunk

        def memory_analysis(self):
            class M:
                temp_size_in_bytes = 10 * self.chunk
                output_size_in_bytes = alias_size_in_bytes = 0
            return M

    compiled_for = []

    def compile_for(chunk):
        compiled_for.append(chunk)
        return Fake(chunk)

    assert fit_seed_chunk(compile_for, 32, budget_bytes=None)[0] == 32
    assert fit_seed_chunk(compile_for, 32, budget_bytes=320)[0] == 32
    compiled_for.clear()
    chunk, compiled, full = fit_seed_chunk(compile_for, 32, budget_bytes=95)
    assert (chunk, compiled.chunk, full) == (9, 9, 320) and compiled_for == [32, 9]
    assert fit_seed_chunk(compile_for, 32, budget_bytes=5)[0] == 1


def test_seeds_benchmark_worker(tmp_path):
    """benchmarks.seeds' measured unit, in process: a chunked 2-seed digits run."""
    from benchmarks import seeds as bench

    row = bench.worker("multi", 2, 1, str(tmp_path), chunk=1)
    assert row["num_seeds"] == 2 and row["seed_chunk"] == 1
    assert row["seconds"] > 0 and row["peak_memory_bytes"] > 0
    assert 0.5 < row["mean_test_accuracy"] <= 1.0


@pytest.mark.slow
def test_seeds_benchmark_main(tmp_path, capsys):
    from benchmarks import seeds as bench

    out = tmp_path / "seeds.json"
    bench.main(["--seeds", "2", "--epochs", "1", "--seed-chunk", "1", "--out", str(out)])
    with open(out) as f:
        row = json.load(f)["rows"][0]
    assert row["multi_chunked"]["seed_chunk"] == 1 and row["multi"]["seed_chunk"] == 2
    assert row["sequential_over_multi"] > 0 and "chunk 1 s" in capsys.readouterr().out


def test_seed_parallel_steps_compute_each_devices_seeds_without_collectives():
    """``--seed-parallel`` runs each device's block of seeds under ``shard_map``: the
    compiled step and eval hold no collectives, also for a convolution, whose vmap GSPMD
    had partitioned on its features, all-gathering activations (and on 2 CPU devices the
    MNIST CNN's step then aborted in the all-gather's rendezvous). Their results equal
    the same vmap on one device."""
    from jaxtrain.parallel import create_strategy
    from jaxtrain.program import build_model_and_state, make_update, step_key
    from jaxtrain.seeds import SeedPlacement, vmap_eval, vmap_update
    from jaxtrain.steps import eval_step

    config = BASE.replace(model="cnn", dataset="synthetic", synthetic_shape=(12, 12, 1),
                          synthetic_size=64, batch_size=8, num_seeds=4)
    dataset = data_lib.load_dataset("synthetic", synthetic_size=64, synthetic_shape=(12, 12, 1))
    state = build_model_and_state(config, dataset, 10)
    key = stack([np.asarray(step_key(s)) for s in range(4)])
    idx = np.stack([data_lib.batch_indices(s, 0, 64 - 6, 8) for s in range(4)])
    update = vmap_update(make_update(config, resident=True), resident=True)
    batch = {k: v[:8] for k, v in dataset.val.items()}
    results = {}
    for kind, n in (("none", 1), ("mesh", 2)):
        placement = SeedPlacement(create_strategy(kind, n), seed_parallel=True)
        args = (placement.put_seeds(state), placement.put_shared(dataset.train),
                placement.put_batch(idx), placement.put_seeds(key))
        step = placement.compile(update, shared_argnums=(1,)).lower(*args).compile()
        evaluate = placement.compile(vmap_eval(eval_step), shared_argnums=(1,))
        ev_args = (placement.put_seeds(state), placement.put_shared(batch))
        hlo = step.as_text() + evaluate.lower(*ev_args).compile().as_text()
        for op in ("all-gather", "all-reduce", "all-to-all", "collective-permute"):
            assert op not in hlo, (kind, op)
        new_state, metrics = step(*args)
        results[kind] = (placement.get(new_state.params), placement.get(metrics),
                         placement.get(evaluate(*ev_args)))
    for a, b in zip(jax.tree.leaves(results["none"]), jax.tree.leaves(results["mesh"]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_one_process_feeds_every_seed_and_put_batch_places_them_like_put_seeds():
    """``local_seeds`` is every seed in one process (the 2-process split is tested in
    ``test_distributed.py``); it needs the seed count, which ``put_batch`` does not."""
    from jaxtrain.parallel import create_strategy
    from jaxtrain.seeds import SeedPlacement

    strategy = create_strategy("mesh", 4)
    placement = SeedPlacement(strategy, seed_parallel=True, num_seeds=8)
    np.testing.assert_array_equal(placement.local_seeds(), np.arange(8))
    rows = np.arange(8 * 3).reshape(8, 3)
    placed = placement.put_batch(rows)
    assert placed.sharding == placement.put_seeds(rows).sharding
    np.testing.assert_array_equal(np.asarray(placed), rows)
    with pytest.raises(ValueError, match="needs num_seeds"):
        SeedPlacement(strategy, seed_parallel=True).local_seeds()
    np.testing.assert_array_equal(  # no seed_parallel: every process feeds every seed
        SeedPlacement(strategy, seed_parallel=False, num_seeds=4).local_seeds(), np.arange(4))
