"""Running the suite's programs over a test split: ``Evaluator`` places the seeds'
variables once, compiles each program once at a chunk size that fits a memory
budget (``auto_chunk_size`` from ``program_bytes``, the traced program's bound), and
sums its outputs over the chunks on the host in float64 / int64. Each chunk is
sharded over the devices on its example axis, like a training batch."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jaxtrain.compile_options import compiler_options
from jaxtrain.data import process_rows

PyTree = Any


class RobustnessError(ValueError):
    """A suite setting or run that cannot be evaluated (message is one line)."""


# ----------------------------------------------------------------------------- memory


def _aval_bytes(aval: Any) -> int:
    shape = getattr(aval, "shape", ())
    dtype = getattr(aval, "dtype", None)
    itemsize = getattr(dtype, "itemsize", 8) if dtype is not None else 8
    return int(math.prod(shape)) * int(itemsize)


def _jaxpr_bytes(jaxpr: Any) -> int:
    """Bytes of every value a jaxpr (and its sub-jaxprs) produces: an upper bound of what
    its program keeps live, as if no buffer were ever reused."""
    total = 0
    for eqn in jaxpr.eqns:
        total += sum(_aval_bytes(v.aval) for v in eqn.outvars)
        for sub in _sub_jaxprs(eqn.params):
            total += _jaxpr_bytes(sub)
    return total


def _sub_jaxprs(params: Mapping[str, Any]) -> Iterable[Any]:
    """The jaxprs inside an equation's params (scan, cond and pjit bodies, ...)."""
    try:
        from jax.extend.core import jaxprs_in_params
    except ImportError:  # older JAX: look for them by shape
        def jaxprs_in_params(params):
            for value in params.values():
                for v in value if isinstance(value, (tuple, list)) else (value,):
                    inner = getattr(v, "jaxpr", v)
                    if hasattr(inner, "eqns"):
                        yield inner

    return jaxprs_in_params(params)


def program_bytes(closed_jaxpr: Any) -> int:
    """Memory bound of a traced program: its inputs plus every value it produces."""
    jaxpr = closed_jaxpr.jaxpr
    return sum(_aval_bytes(v.aval) for v in jaxpr.invars) + _jaxpr_bytes(jaxpr)


def default_memory_budget(devices: Sequence[Any]) -> int:
    """Bytes the suite may use over ``devices``: 40% of each accelerator's memory limit;
    1 GiB in all on CPU (fake CPU devices share one host).

    A process reads only its own devices (another's ``memory_stats`` raises), takes
    theirs for every device, and agrees with the others on the smallest figure, so
    every process picks the same chunks (``distributed.agree_min``, in MiB)."""
    from jaxtrain import distributed

    local = [d for d in devices if d.process_index == jax.process_index()] or list(devices)
    stats = [d.memory_stats() if hasattr(d, "memory_stats") else None for d in local]
    if all(s and "bytes_limit" in s for s in stats) and local[0].platform != "cpu":
        budget = int(0.4 * sum(s["bytes_limit"] for s in stats) * len(devices) / len(local))
    else:
        budget = 1 << 30
    return distributed.agree_min(budget >> 20) << 20


def auto_chunk_size(per_example_bytes: int, budget_bytes: int, num_examples: int, ways: int) -> int:
    """A chunk size (a multiple of ``ways``, at least ``ways``) whose estimated memory fits
    ``budget_bytes``: the fewest chunks that fit, evened out so the padding of the last
    chunk stays under ``ways`` examples per chunk."""
    fit = max(ways, max(1, budget_bytes // max(1, per_example_bytes)) // ways * ways)
    chunks = -(-num_examples // fit)
    even = -(-num_examples // chunks)
    return max(ways, -(-even // ways) * ways)


# ----------------------------------------------------------------------------- running


@dataclasses.dataclass
class ProgramRun:
    """Host sums of one program over the test set, and how it ran."""

    name: str
    sums: PyTree
    chunk_size: int
    num_chunks: int
    seconds: float  # running the chunks, compilation excluded
    compile_seconds: float
    bytes_per_example: int | None


def _to_host(tree: PyTree) -> PyTree:
    def cast(x):
        x = np.asarray(x)
        return x.astype(np.int64) if np.issubdtype(x.dtype, np.integer) else x.astype(np.float64)

    return jax.tree.map(cast, tree)


# XLA:CPU compiles these programs ~1.2-2x faster with LLVM's optimizations off and runs
# them ~1.1-2.3x slower, so it pays only where compiling dominates. The whole suite, one
# seed (``python -m benchmarks.suite_compile``, 2 cores, ``suite_compile-cpu*.json``),
# fast against optimized: digits MLP (359 x 8x8x1) 9.6 against 15.7 s; CIFAR-shape CNN
# 64 images 25.2 against 28.0 s, 128 images 35.1 against 32.5 s, 512 images 90.3 against
# 57.0 s; MNIST-shape CNN 256 images 25.8 against 25.2 s, 1024 images 61.4 against 42.7
# s; ResNet-18 on 8 CIFAR-shape images 26.8 against 31.5 s, 32 images 46.5 against 47.5
# s, 64 images 71.6 against 71.9 s; at ImageNet size (224x224x3, another CPU) a CNN on 1
# image 15.8 against 16.1 s, 4 images 46.7 against 30.6 s, ResNet-18 on 1 image 52.0
# against 46.5 s (the rule's one miss measured), 2 images 79.8 against 78.2 s. Hence on
# CPU only for splits of at most FAST_COMPILE_MAX_VALUES values (N x H x W x C; digits:
# 23 000, 64 CIFAR images 197 000, CIFAR-10: 31 million).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
FAST_COMPILE_MAX_VALUES = 2**18


def wants_fast_compile(platform: str, split: Mapping[str, np.ndarray] | None) -> bool:
    """The ``fast_compile`` default: on CPU, for a split of at most
    ``FAST_COMPILE_MAX_VALUES`` image values (no split: on)."""
    if platform != "cpu":
        return False
    return not split or np.size(split["image"]) <= FAST_COMPILE_MAX_VALUES


class Evaluator:
    """Runs programs over a test split in chunks, data-parallel over ``strategy``'s devices
    (``mesh`` or ``none``; default: all devices).

    ``variables_S`` (host arrays, leading seed axis) are placed once; each program is
    compiled once at its chunk size. ``log`` receives one line per program (and per
    chunk when there are several); ``None`` is silent. ``fast_compile`` compiles with
    ``FAST_COMPILE`` (default: ``wants_fast_compile``, on CPU for small splits), else
    with jaxtrain's ``compiler_options`` for the platform.
    """

    def __init__(self, variables_S: PyTree, split: Mapping[str, np.ndarray] | None = None, *,
                 strategy: Any = None, chunk_size: int = 0, memory_budget_bytes: int = 0,
                 log: Callable[[str], None] | None = None, fast_compile: bool | None = None):
        from jaxtrain.parallel import create_strategy

        self.strategy = strategy if strategy is not None else create_strategy("auto")
        if self.strategy.kind == "pmap":
            raise RobustnessError("the robustness suite runs with --parallel auto, none or mesh "
                                  "(it shards each chunk over a mesh), not pmap")
        self.variables_S = variables_S
        self.split = {k: np.asarray(v) for k, v in (split or {}).items()}
        self.num_examples = len(self.split["label"]) if self.split else 0
        self.ways = max(self.strategy.shards, jax.process_count())
        self.chunk_size = chunk_size
        if chunk_size and chunk_size % self.ways:
            raise RobustnessError(f"chunk size {chunk_size} must be a multiple of the "
                                  f"{self.ways} device(s)")
        self.budget = memory_budget_bytes or default_memory_budget(self.strategy.devices)
        self.log = log
        platform = self.strategy.devices[0].platform
        if fast_compile is None:
            fast_compile = wants_fast_compile(platform, self.split)
        self.compiler_options = dict(FAST_COMPILE) if fast_compile else compiler_options(platform)
        self._placed = self.strategy.replicate(variables_S)
        self._compiled: dict[Any, Any] = {}

    def _batch(self, arrays: Mapping[str, np.ndarray], start: int, size: int,
               transform: Callable[[dict], dict] | None = None) -> dict[str, np.ndarray]:
        n = len(next(iter(arrays.values())))
        idx = np.arange(start, min(start + size, n))
        mask = np.zeros(size, np.float32)
        mask[: len(idx)] = 1.0
        idx = np.concatenate([idx, np.zeros(size - len(idx), idx.dtype)])
        batch = {k: v[idx] for k, v in arrays.items()}
        batch.update(mask=mask, index=idx.astype(np.int32))
        rows = process_rows(size)  # this process's rows, as a training batch's
        batch = {k: v[rows] for k, v in batch.items()}
        return batch if transform is None else transform(batch)

    def run(self, name: str, program: Callable[..., PyTree],
            arrays: Mapping[str, np.ndarray] | None = None, *,
            transform: Callable[[dict], dict] | None = None) -> ProgramRun:
        """Sums of ``program`` over every example of ``arrays`` (default: the split).
        ``transform`` maps each host chunk (this process's rows, padded) before it is
        placed: e.g. a corruption computed on the host.

        Without a fixed ``chunk_size`` the program is traced at the whole test set first;
        when its memory bound (``program_bytes``) exceeds the budget it is traced again at
        the chunk size ``auto_chunk_size`` picks. Compiled once."""
        arrays = self.split if arrays is None else arrays
        n = len(next(iter(arrays.values())))
        t0 = time.perf_counter()
        shapes = tuple((k, v.shape[1:], v.dtype.str) for k, v in sorted(arrays.items()))
        cached = self._compiled.get((id(program), n, shapes))
        if cached is not None:  # the same program on same-shaped data (e.g. CIFAR-10-C)
            compiled, chunk, per_example, _ = cached
            first = self.strategy.shard(self._batch(arrays, 0, chunk, transform))
        else:
            jitted = self.strategy.compile(program)
            chunk = self.chunk_size or -(-n // self.ways) * self.ways
            first = self.strategy.shard(self._batch(arrays, 0, chunk, transform))
            traced = jitted.trace(self._placed, first)
            per_example = None
            if not self.chunk_size:
                per_example = max(1, math.ceil(program_bytes(traced.jaxpr) / chunk))
                fit = auto_chunk_size(per_example, self.budget, n, self.ways)
                if fit < chunk:
                    chunk = fit
                    first = self.strategy.shard(self._batch(arrays, 0, chunk, transform))
                    traced = jitted.trace(self._placed, first)
            compiled = traced.lower().compile(self.compiler_options)
            # keeps ``program`` alive, so its id is not reused by another one
            self._compiled[(id(program), n, shapes)] = (compiled, chunk, per_example, program)
        t1 = time.perf_counter()
        chunks = -(-n // chunk)
        sums = None
        for i, start in enumerate(range(0, n, chunk)):
            batch = first if i == 0 else self.strategy.shard(
                self._batch(arrays, start, chunk, transform))
            out = _to_host(self.strategy.unreplicate(compiled(self._placed, batch)))  # blocks
            sums = out if sums is None else jax.tree.map(np.add, sums, out)
            if self.log is not None and chunks > 1:
                self.log(f"  {name}: chunk {i + 1}/{chunks} ({time.perf_counter() - t1:.1f} s)")
        seconds = time.perf_counter() - t1
        if self.log is not None:
            self.log(f"robustness: {name} done: compile {t1 - t0:.1f} s, run {seconds:.1f} s "
                     f"({n} examples, {chunks} chunk(s) of {chunk})")
        return ProgramRun(name, sums, chunk, chunks, seconds, t1 - t0, per_example)
