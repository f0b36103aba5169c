"""Many seeds in one compiled program: the same pure step vmapped over a seed axis.

Seed ``i`` of a run with base seed ``s`` is exactly the single run with seed
``s + i``: its init key, data order, dropout and augmentation keys are derived
by the same functions (``program.init_key``, ``data.batch_indices``,
``program.step_key``), only vmapped. Every state leaf, key and metric gains a
leading axis ``[S, ...]``; the batch indices are ``[S, B]``.

Placement (``jax.jit`` over the strategy's 1-D mesh ``data``):
- default: seeds vmapped on every device, each seed's batch sharded over
  devices (state ``P()``, indices ``P(None, "data")``): BatchNorm statistics and
  gradients are global, as in a single run;
- ``seed_parallel``: the seed axis itself sharded over devices (state and
  indices ``P("data")``): no cross-device traffic at all, best for many small
  models. Needs ``S`` divisible by the device count.
``pmap`` is not combined with seeds (use ``mesh``).

Chunking (``--seed-chunk C``; ``0``, the default, picks it): each device
computes ``C`` of its seeds at a time (``lax.map`` over chunks, ``vmap`` inside
a chunk), in the same one compiled program. The stacked state, checkpoints and
results do not change; only peak activation memory (about ``C / S`` of it) and
speed do. With ``0`` the loop compiles for all seeds and, when XLA's memory
analysis of that program exceeds the memory the device has free, recompiles
for the largest chunk that fits (``fit_seed_chunk``). XLA:CPU reports few of its
temporaries there, so on a CPU this rarely chunks by itself: set the chunk.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxtrain.compile_options import compiler_options
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


def map_seeds(fn: Callable[..., Any], args: tuple, *, chunk: int = 0, groups: int = 1) -> Any:
    """``fn`` over the leading seed axis ``[S]`` of every leaf of ``args``: ``vmap``, or
    with ``0 < chunk < S / groups``, ``chunk`` seeds at a time (``lax.map`` batches).

    ``groups`` splits the seed axis into that many contiguous blocks first (one per
    device for ``seed_parallel``, whose seed axis is sharded): chunks never span two
    devices, so each device runs its own ``S / groups`` seeds ``chunk`` at a time.
    Seed ``i``'s computation is the same whatever ``chunk`` and ``groups`` are.
    """
    num = jax.tree.leaves(args)[0].shape[0]
    if chunk <= 0 or chunk >= num // groups:
        return jax.vmap(fn)(*args)
    mapped = lambda a: jax.lax.map(lambda x: fn(*x), a, batch_size=chunk)
    if groups == 1:
        return mapped(args)
    blocks = jax.tree.map(lambda x: x.reshape(groups, num // groups, *x.shape[1:]), args)
    out = jax.vmap(mapped)(blocks)
    return jax.tree.map(lambda x: x.reshape(num, *x.shape[2:]), out)


def vmap_update(update: Callable[..., Any], *, resident: bool, chunk: int = 0,
                groups: int = 1) -> Callable[..., Any]:
    """``update`` over seeds: state, indices/batch and key carry ``[S, ...]``;
    device-resident data is shared (not mapped). ``chunk``/``groups``: ``map_seeds``."""

    def seeded(*args, axis_name=None):
        one = functools.partial(update, axis_name=axis_name)
        if resident:
            state, data, idx, key = args
            return map_seeds(lambda s, i, k: one(s, data, i, k), (state, idx, key),
                             chunk=chunk, groups=groups)
        return map_seeds(one, args, chunk=chunk, groups=groups)

    return seeded


def vmap_eval(eval_fn: Callable[..., Any], *, chunk: int = 0, groups: int = 1
              ) -> Callable[..., Any]:
    """``eval_step`` over a stacked state and one shared batch: sums ``[S]``."""

    def seeded(state, batch, axis_name=None):
        return map_seeds(lambda s: eval_fn(s, batch, axis_name=axis_name), (state,),
                         chunk=chunk, groups=groups)

    return seeded


class SeedPlacement:
    """Places stacked trees and compiles seed-vmapped functions for ``strategy``."""

    def __init__(self, strategy: Strategy, seed_parallel: bool, num_seeds: int = 0):
        self.strategy = strategy
        self.seed_parallel = seed_parallel and strategy.kind == "mesh"
        # seed_parallel: the seed axis is split in one contiguous block per device
        self.groups = strategy.num_devices if self.seed_parallel else 1
        self.num_seeds = num_seeds  # S: needed by put_batch when processes split the seeds

    def local_seeds(self) -> np.ndarray:
        """Positions (``0 .. S-1``) of the seeds whose rows this process gives ``put_batch``:
        every seed, unless seed-parallel devices of several processes split them."""
        if not self.num_seeds:
            raise ValueError("SeedPlacement.local_seeds needs num_seeds")
        if not self.seed_parallel or jax.process_count() == 1:
            return np.arange(self.num_seeds)
        blocks = self._sharding(P(AXIS)).addressable_devices_indices_map((self.num_seeds,))
        return np.unique(np.concatenate([np.arange(self.num_seeds)[i[0]] for i in blocks.values()]))

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
        """Per-seed batches (or batch indices) -> devices: this process's columns
        ``[S, B / processes, ...]``; with ``seed_parallel``, whole rows of this process's
        seeds only (``[len(local_seeds()), B, ...]``: the others' stay unread)."""
        if self.strategy.kind == "none":
            return jax.device_put(tree, self.strategy.devices[0])
        if self.seed_parallel:
            if jax.process_count() == 1:
                return self.put_seeds(tree)
            local = self.local_seeds()
            at = np.zeros(self.num_seeds, np.int64)  # a global seed's row in the local block
            at[local] = np.arange(len(local))
            sharding = self._sharding(P(AXIS))

            def put(x):
                x = np.asarray(x)
                return jax.make_array_from_callback(
                    (self.num_seeds, *x.shape[1:]), sharding, lambda i: x[(at[i[0]], *i[1:])])

            return jax.tree.map(put, tree)
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

    def compile(self, fn: Callable[..., Any], *, donate_argnums: Sequence[int] = (),
                shared_argnums: Sequence[int] = ()) -> Callable:
        """jit with every output keeping the seed placement (and jaxtrain's compiler
        options: ``compile_options``).

        With ``seed_parallel``, ``fn`` runs under ``shard_map``: each device computes its
        own block of seeds, on the arguments' local blocks (``shared_argnums``: whole,
        as placed by ``put_shared``), so the program has no collectives. Left to GSPMD,
        a vmapped convolution was partitioned on its features and its activations
        all-gathered, and on 2 CPU devices the MNIST CNN's step then aborted in that
        all-gather's rendezvous (XLA:CPU's 40 s timeout)."""
        options = compiler_options(self.strategy.devices[0].platform)
        if self.strategy.kind == "none":
            return jax.jit(fn, donate_argnums=tuple(donate_argnums), compiler_options=options)
        if self.seed_parallel:
            per_block, mesh = fn, self.strategy.mesh

            def fn(*args):
                specs = tuple(P() if i in shared_argnums else P(AXIS) for i in range(len(args)))
                return jax.shard_map(per_block, mesh=mesh, in_specs=specs, out_specs=P(AXIS),
                                     check_vma=False)(*args)

        spec = P(AXIS) if self.seed_parallel else P()
        return jax.jit(fn, out_shardings=self._sharding(spec), donate_argnums=tuple(donate_argnums),
                       compiler_options=options)


def auto_seed_chunk(num_seeds: int, bytes_per_seed: int, budget_bytes: int) -> int:
    """Largest number of seeds per compiled program that fits ``budget_bytes``
    (at least 1; ``num_seeds`` when everything fits)."""
    if bytes_per_seed <= 0:
        return num_seeds
    return max(1, min(num_seeds, math.floor(budget_bytes / bytes_per_seed)))


def step_bytes(compiled: Any) -> int | None:
    """Device memory a compiled step needs beyond its (donated) arguments: XLA's
    temporaries plus outputs that do not reuse an argument buffer. ``None`` when the
    backend gives no memory analysis."""
    try:
        m = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError, AttributeError):
        return None
    if m is None:
        return None
    return int(m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes)


def available_bytes(device: jax.Device, num_local_devices: int = 1) -> int | None:
    """Memory free for one more program on ``device``: its allocator's limit minus use
    (GPU), else the host's ``MemAvailable`` shared by ``num_local_devices`` (CPU, where
    every device is the host's memory). ``None`` when unknown."""
    try:
        stats = device.memory_stats()
    except (AttributeError, RuntimeError):  # JaxRuntimeError is a RuntimeError
        stats = None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // max(1, num_local_devices)
    except OSError:
        pass
    if hasattr(os, "sysconf") and "SC_AVPHYS_PAGES" in os.sysconf_names:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // max(1, num_local_devices)
    return None


def fit_seed_chunk(compile_for: Callable[[int], Any], seeds_per_device: int,
                   budget_bytes: int | None) -> tuple[int, Any, int | None]:
    """The largest chunk whose compiled step fits ``budget_bytes``.

    ``compile_for(chunk)`` returns the compiled step computing ``chunk`` seeds at a
    time (``chunk == seeds_per_device``: all at once). Compiles for all seeds first;
    only when that program's ``step_bytes`` exceed the budget does it recompile, for
    the chunk scaled down to fit, halving until it fits or reaches 1 (which is
    returned even if it does not fit: one model is the least a run can train).
    Returns ``(chunk, compiled, bytes the all-seeds step needs)``.
    """
    compiled = compile_for(seeds_per_device)
    full = step_bytes(compiled)
    if budget_bytes is None or full is None or full <= budget_bytes:
        return seeds_per_device, compiled, full
    chunk = auto_seed_chunk(seeds_per_device, -(-full // seeds_per_device), budget_bytes)
    while True:
        compiled = compile_for(chunk)
        need = step_bytes(compiled)
        if need is None or need <= budget_bytes or chunk == 1:
            return chunk, compiled, full
        chunk = max(1, chunk // 2)


def compile_seeded(
    placement: SeedPlacement, update_fn: Callable[..., Any], sample: tuple, *, num_seeds: int,
    seed_chunk: int, resident: bool, log: Callable[[str], Any] | None = print,
) -> tuple[Any, int]:
    """The seed-vmapped ``update_fn`` compiled ahead of time for ``sample`` (its
    arguments: state, [data,] indices or batch, key, all ``[S, ...]``), and the seeds
    each device computes at a time: ``seed_chunk``, or with 0 all of them when the step
    fits the device's free memory, else the largest chunk that does (``fit_seed_chunk``;
    processes agree on the smallest, so all run one program). ``log`` gets one line
    when it chunks by itself."""
    from jaxtrain import distributed

    per_device = num_seeds // placement.groups

    def compile_for(chunk: int) -> Any:
        fn = vmap_update(update_fn, resident=resident, chunk=chunk)  # a device's seeds
        return placement.compile(fn, donate_argnums=(0,), shared_argnums=(1,) if resident else ()
                                 ).lower(*sample).compile()

    if seed_chunk:
        chunk = min(seed_chunk, per_device)
        return compile_for(chunk), chunk
    local = [d for d in placement.strategy.devices if d.process_index == jax.process_index()]
    budget = available_bytes(local[0], len(local))
    chunk, compiled, need = fit_seed_chunk(compile_for, per_device, budget)
    agreed = distributed.agree_min(chunk)
    if agreed != chunk:
        chunk, compiled = agreed, compile_for(agreed)
    if chunk < per_device and log is not None:
        why = (f"the step for {per_device} models per device needs {need / 2**30:.2f} GiB, "
               f"{budget / 2**30:.2f} GiB is free" if need is not None and budget is not None
               else "another process has less free memory")
        log(f"seeds: {why}: computing {chunk} at a time (--seed-chunk sets it)")
    return compiled, chunk
