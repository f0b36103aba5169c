"""Seed i of an N-seed run equals the single run with seed base + i."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from jaxtrain import data as data_lib
from jaxtrain.checkpoint import load_params
from jaxtrain.config import TrainConfig
from jaxtrain.loop import train_and_evaluate
from jaxtrain.models import create_model
from jaxtrain.parallel import ParallelError
from jaxtrain.seeds import auto_seed_chunk, seed_list, stack, unstack

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
    "devices,seed_parallel",
    [(1, False), (8, False), (4, True)],
    ids=["one-device", "mesh8-batch-sharded", "mesh4-seed-sharded"],
)
def test_seed_i_equals_single_run(tmp_path, single_runs, devices, seed_parallel):
    multi, stacked = _run(
        tmp_path, "multi", seed=BASE_SEED, num_seeds=NUM_SEEDS, devices=devices,
        seed_parallel=seed_parallel,
    )
    assert multi["num_seeds"] == NUM_SEEDS and multi["seeds"] == seed_list(BASE_SEED, NUM_SEEDS)
    assert multi["num_devices"] == devices
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
    on_disk = json.load(open(os.path.join(tmp_path, "multi", "summary.json")))
    assert on_disk["test_accuracy_per_seed"] == per_seed
    lines = [json.loads(x) for x in open(os.path.join(tmp_path, "multi", "metrics.jsonl"))]
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
