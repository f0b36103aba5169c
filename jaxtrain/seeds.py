"""Many seeds in one compiled program: the same pure step vmapped over a seed axis.

Seed ``i`` of a run with base seed ``s`` is exactly the single run with seed
``s + i``: its init key, data order, dropout and augmentation keys are derived
by the same functions (``loop.init_key``, ``data.batch_indices``,
``loop.step_key``), only vmapped. Every state leaf, key and metric gains a
leading axis ``[S, ...]``; the batch indices are ``[S, B]``.

Placement (``jax.jit`` over the strategy's 1-D mesh ``data``):
- default: seeds vmapped on every device, each seed's batch sharded over
  devices (state ``P()``, indices ``P(None, "data")``): BatchNorm statistics and
  gradients are global, as in a single run;
- ``seed_parallel``: the seed axis itself sharded over devices (state and
  indices ``P("data")``): no cross-device traffic at all, best for many small
  models. Needs ``S`` divisible by the device count.
``pmap`` is not combined with seeds (use ``mesh``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxtrain.parallel import AXIS, ParallelError, Strategy

PyTree = Any


def seed_list(base_seed: int, num_seeds: int) -> list[int]:
    """The seeds of a run: ``base, base + 1, ..., base + num_seeds - 1``."""
    return [base_seed + i for i in range(num_seeds)]


def check_seed_strategy(strategy: Strategy, num_seeds: int, seed_parallel: bool) -> None:
    """One-line errors for seed/device combinations that cannot run."""
    if strategy.kind == "pmap":
        raise ParallelError("--num-seeds > 1 runs with --parallel mesh or none, not pmap")
    if seed_parallel and num_seeds % strategy.num_devices:
        raise ParallelError(
            f"--seed-parallel needs --num-seeds divisible by the {strategy.num_devices} devices, "
            f"got {num_seeds}"
        )


def stack(trees: Sequence[PyTree]) -> PyTree:
    """``[tree_0, ..., tree_{S-1}]`` -> one tree with a leading seed axis (host arrays)."""
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def unstack(tree: PyTree, i: int) -> PyTree:
    """Seed ``i`` of a stacked tree."""
    return jax.tree.map(lambda x: x[i], tree)


def vmap_update(update: Callable[..., Any], *, resident: bool) -> Callable[..., Any]:
    """``update`` vmapped over seeds: state, indices/batch and key carry ``[S, ...]``;
    device-resident data is shared (not mapped)."""
    in_axes = (0, None, 0, 0) if resident else (0, 0, 0)

    def seeded(*args, axis_name=None):
        return jax.vmap(lambda *a: update(*a, axis_name=axis_name), in_axes=in_axes)(*args)

    return seeded


def vmap_eval(eval_fn: Callable[..., Any]) -> Callable[..., Any]:
    """``eval_step`` over a stacked state and one shared batch: sums ``[S]``."""

    def seeded(state, batch, axis_name=None):
        return jax.vmap(lambda s: eval_fn(s, batch, axis_name=axis_name))(state)

    return seeded


class SeedPlacement:
    """Places stacked trees and compiles seed-vmapped functions for ``strategy``."""

    def __init__(self, strategy: Strategy, seed_parallel: bool):
        self.strategy = strategy
        self.seed_parallel = seed_parallel and strategy.kind == "mesh"

    def _sharding(self, spec: P) -> NamedSharding:
        return NamedSharding(self.strategy.mesh, spec)

    def put_seeds(self, tree: PyTree) -> PyTree:
        """Host tree with a leading seed axis -> devices (replicated, or seed-sharded)."""
        if self.strategy.kind == "none":
            return jax.device_put(tree, self.strategy.devices[0])
        spec = P(AXIS) if self.seed_parallel else P()

        def put(x):
            x = np.asarray(x)
            return jax.make_array_from_callback(x.shape, self._sharding(spec), lambda i: x[i])

        return jax.tree.map(put, tree)

    def put_batch(self, tree: PyTree) -> PyTree:
        """This process's columns ``[S, B / processes, ...]`` of per-seed batches -> devices."""
        if self.strategy.kind == "none":
            return jax.device_put(tree, self.strategy.devices[0])
        if self.seed_parallel:
            return jax.tree.map(lambda x: self.put_seeds(x), tree)
        sharding = self._sharding(P(None, AXIS))
        return jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree
        )

    def put_shared(self, tree: PyTree) -> PyTree:
        """Data every seed reads (the device-resident dataset, an eval batch)."""
        return self.strategy.replicate(tree)

    def get(self, tree: PyTree) -> PyTree:
        """A stacked device tree as host numpy arrays ``[S, ...]``."""
        if jax.process_count() > 1 and self.seed_parallel:
            from jax.experimental import multihost_utils

            return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))
        return jax.tree.map(
            lambda x: np.asarray(x.addressable_data(0)) if not self.seed_parallel else np.asarray(x),
            tree,
        )

    def compile(self, fn: Callable[..., Any], *, donate_argnums: Sequence[int] = ()) -> Callable:
        """jit with every output keeping the seed placement."""
        if self.strategy.kind == "none":
            return jax.jit(fn, donate_argnums=tuple(donate_argnums))
        spec = P(AXIS) if self.seed_parallel else P()
        return jax.jit(fn, out_shardings=self._sharding(spec), donate_argnums=tuple(donate_argnums))


def auto_seed_chunk(num_seeds: int, bytes_per_seed: int, budget_bytes: int) -> int:
    """Largest number of seeds per compiled program that fits ``budget_bytes``
    (at least 1; ``num_seeds`` when everything fits)."""
    if bytes_per_seed <= 0:
        return num_seeds
    return max(1, min(num_seeds, math.floor(budget_bytes / bytes_per_seed)))
