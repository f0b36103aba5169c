"""Data-parallel strategies behind one small interface.

- ``none``: one device, ``jax.jit``.
- ``mesh``: ``jax.jit`` over a 1-D ``Mesh`` with axis ``data``: state replicated
  (``P()``), batches sharded on their leading axis (``P("data")``). XLA inserts
  the gradient all-reduce; BatchNorm sees the global batch by construction.
- ``pmap``: ``jax.pmap`` with axis ``data``: every array carries a leading device
  axis; the step averages with ``lax.pmean`` over ``axis_name``.

All three run the same step function; it must accept ``axis_name`` (``None``
except under pmap). Inputs are placed with their sharding straight from host
memory (``jax.make_array_from_callback`` / ``make_array_from_process_local_data``,
which also work across processes), never with the deprecated
``device_put_replicated`` / ``device_put_sharded``.

Across processes (``jaxtrain.distributed``) ``mesh`` and ``pmap`` span the
devices of every process (both checked with jax 0.10.2 on CPU with gloo
collectives); ``none`` and ``--devices`` (a subset) are single-process only.
Each process passes ``shard`` its own rows of the global batch.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxtrain.compile_options import compiler_options

AXIS = "data"
STRATEGIES = ("auto", "none", "pmap", "mesh")
PyTree = Any


class ParallelError(ValueError):
    """A device or batch configuration that cannot run (message is one line)."""


@dataclasses.dataclass(frozen=True)
class Strategy:
    """How arrays are placed and functions compiled on ``devices`` (global, all processes)."""

    kind: str
    devices: tuple[Any, ...]

    @functools.cached_property
    def mesh(self) -> Mesh:
        return Mesh(np.asarray(self.devices), (AXIS,))

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    @property
    def local_devices(self) -> list[Any]:
        return [d for d in self.devices if d.process_index == jax.process_index()]

    @property
    def axis_name(self) -> str | None:
        return AXIS if self.kind == "pmap" else None

    @property
    def shards(self) -> int:
        """How many ways a global batch is split (1 for ``none``)."""
        return 1 if self.kind == "none" else self.num_devices

    # ------------------------------------------------------------------ checks

    def check_batch_size(self, batch_size: int, flag: str = "--batch-size") -> None:
        """Raises ``ParallelError`` unless ``batch_size`` splits over devices and processes."""
        nproc = jax.process_count()
        ways = max(self.shards, nproc)
        if batch_size % ways == 0 and batch_size > 0:
            return
        below = batch_size - batch_size % ways
        nearest = f"{below}, {below + ways}" if below > 0 else f"{ways}"
        raise ParallelError(
            f"{flag} {batch_size} does not split evenly over {self.shards} device(s) in "
            f"{nproc} process(es) (needs a multiple of {ways}); nearest valid: {nearest}"
        )

    # ------------------------------------------------------------------ placement

    def replicate(self, tree: PyTree) -> PyTree:
        """Host (or device) arrays -> a copy on every device (pmap: leading device axis)."""
        if self.kind == "none":
            return jax.device_put(tree, self.devices[0])

        def put(x):
            x = np.asarray(x)
            if self.kind == "pmap":
                shape = (self.num_devices, *x.shape)
                sharding = NamedSharding(self.mesh, P(AXIS))
                return jax.make_array_from_callback(
                    shape, sharding, lambda idx: np.broadcast_to(x, shape)[idx]
                )
            return jax.make_array_from_callback(
                x.shape, NamedSharding(self.mesh, P()), lambda idx: x[idx]
            )

        return jax.tree.map(put, tree)

    def shard(self, tree: PyTree) -> PyTree:
        """This process's rows of a global batch ``[B / processes, ...]`` -> a global
        array sharded over devices on its leading axis (pmap: ``[devices, B / devices, ...]``)."""
        if self.kind == "none":
            return jax.device_put(tree, self.devices[0])
        sharding = NamedSharding(self.mesh, P(AXIS))

        def put(x):
            x = np.asarray(x)
            if self.kind == "pmap":
                x = x.reshape((len(self.local_devices), -1, *x.shape[1:]))
            return jax.make_array_from_process_local_data(sharding, x)

        return jax.tree.map(put, tree)

    def shard_steps(self, tree: PyTree) -> PyTree:
        """This process's rows of ``K`` steps' global batches ``[K, B / processes, ...]``
        -> a global ``[K, B, ...]`` array sharded over devices on its batch axis (a fused
        call's input, ``fusing.fuse_steps``): each step's rows sit where ``shard`` puts them.
        ``none`` and ``mesh`` only (a ``pmap`` function maps a leading device axis)."""
        if self.kind == "none":
            return jax.device_put(tree, self.devices[0])
        if self.kind == "pmap":
            raise ParallelError("steps stacked for one call run on one device or a mesh, "
                                "not --parallel pmap")
        sharding = NamedSharding(self.mesh, P(None, AXIS))
        return jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)

    def unreplicate(self, tree: PyTree) -> PyTree:
        """One copy of a replicated tree, as host numpy arrays."""

        def get(x):
            x = np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)
            return x[0] if self.kind == "pmap" else x

        return jax.tree.map(get, tree)

    def init(self, fn: Callable[..., PyTree], *args: Any) -> PyTree:
        """``fn(*args)`` computed straight into this strategy's placement (as ``replicate``).

        Shapes come first (``jax.eval_shape``), then ``fn`` is jitted with matching
        ``out_shardings``, so a large state is never assembled on the host or on
        one device. ``fn`` must be a pure function of ``args`` (e.g. state init).
        """
        shapes = jax.eval_shape(fn, *args)
        if self.kind == "none":
            sharding = jax.sharding.SingleDeviceSharding(self.devices[0])
            return jax.jit(fn, out_shardings=jax.tree.map(lambda _: sharding, shapes))(*args)
        if self.kind == "mesh":
            replicated = NamedSharding(self.mesh, P())
            return jax.jit(fn, out_shardings=jax.tree.map(lambda _: replicated, shapes))(*args)
        n, stacked = self.num_devices, NamedSharding(self.mesh, P(AXIS))

        def per_device(*a):  # pmap layout: a leading device axis, one slice per device
            return jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), fn(*a))

        return jax.jit(per_device, out_shardings=jax.tree.map(lambda _: stacked, shapes))(*args)

    # ------------------------------------------------------------------ compile

    def compile(self, fn: Callable[..., Any], *, donate_argnums: Sequence[int] = ()) -> Callable:
        """Compiles ``fn(*args, axis_name=...)`` for this strategy; outputs are replicated.

        On CPU with several devices in this process the result blocks every
        ``CPU_MAX_IN_FLIGHT`` calls (see ``Throttled``); elsewhere it is the plain
        ``jax.jit`` / ``jax.pmap`` function. ``jit`` compiles with
        ``compile_options.compiler_options`` (CPU convolutions on Eigen); ``pmap``
        takes no compiler options, so it keeps XLA's defaults.
        """
        donate = tuple(donate_argnums)
        options = compiler_options(self.devices[0].platform)
        if self.kind == "pmap":
            compiled = jax.pmap(
                functools.partial(fn, axis_name=AXIS),
                axis_name=AXIS,
                devices=self.local_devices if jax.process_count() == 1 else None,
                donate_argnums=donate,
            )
        elif self.kind == "mesh":
            compiled = jax.jit(
                functools.partial(fn, axis_name=None),
                out_shardings=NamedSharding(self.mesh, P()),
                donate_argnums=donate,
                compiler_options=options,
            )
        else:
            return jax.jit(functools.partial(fn, axis_name=None), donate_argnums=donate,
                           compiler_options=options)
        if self.devices[0].platform == "cpu" and len(self.local_devices) > 1:
            return Throttled(compiled, CPU_MAX_IN_FLIGHT)
        return compiled


# XLA:CPU (jax 0.10.2) aborts a multi-device program ("Termination timeout for `all
# reduce` ... Expected 8 threads to join the rendezvous, but only 7 of them arrived")
# when ~50 or more calls with a collective are dispatched without waiting: seen with
# 2, 4 and 8 fake devices on a 2-core machine, for mesh and pmap alike, also in the
# training loop (--log-every 200). Up to 32 in flight ran 2000 steps cleanly.
CPU_MAX_IN_FLIGHT = 8


class Throttled:
    """A compiled function that waits for its output every ``every`` calls.

    Keeps at most ``every`` calls in flight (the CPU hazard above); other
    attributes (``lower``, ``trace``, ...) are those of the wrapped function.
    """

    def __init__(self, fn: Callable, every: int):
        self._fn, self._every, self._calls = fn, every, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self._fn(*args, **kwargs)
        self._calls += 1
        if self._calls % self._every == 0:
            jax.block_until_ready(out)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fn, name)


# ``--cpu-devices 0`` (auto) splits these models' steps over the cores ...
AUTO_CPU_SPLIT_MODELS = frozenset({"cnn"})
# ... while each device still gets this many input pixels per step (batch / n * H * W).
# Measured on 2 cores (benchmarks.throughput, MNIST-shape CNN, 2 devices against one):
# batch 128 (50k pixels per device) 1.17-1.46x; batch 64 (25k) 0.79-0.93x; batch 32
# 0.73-0.81x; the 8x8 digits at batch 128 (4k) 0.51-0.60x. ResNet-18 at CIFAR shape,
# batch 32, was 0.73x (likely because Eigen already spreads its large convolutions over
# the cores), so it is not split.
AUTO_CPU_MIN_PIXELS_PER_DEVICE = 2**15
# Never more than this many (each holds its own copy of device-resident data; more than
# 2 was never measured faster).
AUTO_CPU_MAX_DEVICES = 8


# ``--cpu-devices 0`` also splits a seed run (``--num-seeds`` > 1) of these models,
# one block of seeds per device (``--seed-parallel``: no all-reduce), while each device
# still gets this many input pixels per step (seeds / n * batch * H * W). Measured on
# 2 cores, whole digits-MLP runs (batch 64, 8x8 images; steady steps/s, 2 devices
# against one, alternated rounds, median): 16 seeds (8 per device, 32k pixels) 1.37x
# (1.35-1.45, 5 rounds; an identical one-device control 1.07x, 0.90-1.21) and 1.25x;
# 8 seeds (16k) 1.18x (1.07-1.23); 4 seeds (8k) 1.01x; 2 seeds 0.93x. Whole MNIST-shape
# CNN runs (batch 128, 100k pixels per seed; 3 rounds): 4 seeds 1.21x (1.10-1.32), 2 seeds
# 1.33x (1.24-1.43), where splitting each seed's batch instead ran 0.55x. The CNN's floor
# is its single-seed split's (``AUTO_CPU_MIN_PIXELS_PER_DEVICE``): not measured lower.
AUTO_CPU_SEED_SPLIT_MIN_PIXELS = {"mlp": 2**14, "cnn": AUTO_CPU_MIN_PIXELS_PER_DEVICE}


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a container's or
    ``taskset``'s share, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def auto_cpu_devices(model: str, batch_size: int, image_hw: tuple[int, int], cores: int) -> int:
    """The CPU devices ``--cpu-devices 0`` (auto) makes, 0 for JAX's default (one).

    For ``AUTO_CPU_SPLIT_MODELS``: the most devices, at most ``cores`` and
    ``AUTO_CPU_MAX_DEVICES``, that divide ``batch_size`` and still give each device
    ``AUTO_CPU_MIN_PIXELS_PER_DEVICE`` input pixels per step; 0 for other models or
    when no count above 1 fits. Pure: the caller decides whether auto applies at all
    (``loop.resolve_cpu_devices``).
    """
    if model not in AUTO_CPU_SPLIT_MODELS:
        return 0
    pixels = image_hw[0] * image_hw[1]
    fits = [n for n in range(2, min(cores, AUTO_CPU_MAX_DEVICES) + 1)
            if batch_size % n == 0 and batch_size // n * pixels >= AUTO_CPU_MIN_PIXELS_PER_DEVICE]
    return max(fits, default=0)


def auto_seed_cpu_devices(model: str, num_seeds: int, batch_size: int,
                          image_hw: tuple[int, int], cores: int) -> int:
    """The CPU devices ``--cpu-devices 0`` makes for a seed run, each computing
    ``num_seeds / n`` of the models (``--seed-parallel``); 0 for JAX's default (one).

    For ``AUTO_CPU_SEED_SPLIT_MIN_PIXELS``'s models: the most devices, at most ``cores``
    and ``AUTO_CPU_MAX_DEVICES``, that divide ``num_seeds`` (and ``batch_size``, as the
    loop asks of every run on several devices) and still give each device that many
    input pixels per step; 0 otherwise. Pure, like ``auto_cpu_devices``."""
    least = AUTO_CPU_SEED_SPLIT_MIN_PIXELS.get(model)
    if least is None:
        return 0
    pixels = batch_size * image_hw[0] * image_hw[1]
    fits = [n for n in range(2, min(cores, AUTO_CPU_MAX_DEVICES) + 1)
            if num_seeds % n == 0 and batch_size % n == 0 and num_seeds // n * pixels >= least]
    return max(fits, default=0)


def local_cpu_device_count() -> int:
    """This process's CPU devices, 0 where JAX runs without its CPU backend
    (``JAX_PLATFORMS=cuda``)."""
    try:
        return len(jax.local_devices(backend="cpu"))
    except RuntimeError:
        return 0


def use_cpu_devices(n: int, *, strict: bool = True) -> None:
    """Makes this host's CPU ``n`` XLA devices (``jax_num_cpu_devices``); 0 does nothing.

    XLA:CPU runs much of one device's program on one core, so on a CPU-only host a
    data-parallel step over one device per core can use them all (``benchmarks/
    results``: 1.2-1.5x for the MNIST CNN at batch 128 on 2 cores; tiny MLPs and
    small batches get slower). Must run before JAX starts its backends; after, it
    raises ``ParallelError`` unless the CPU already has ``n`` devices, or with
    ``strict=False`` (auto's choice, not the user's) leaves the devices as they are.
    """
    if n <= 0:
        return
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # the backends are up: fine only if they already agree
        have = len(jax.devices("cpu"))
        if have != n and strict:
            raise ParallelError(
                f"--cpu-devices {n} must be set before JAX starts (this process already has "
                f"{have} CPU device(s)); start a new process or set JAX_NUM_CPU_DEVICES={n}"
            ) from None


def create_strategy(kind: str = "auto", num_devices: int = 0) -> Strategy:
    """Picks devices (the first ``num_devices``, 0 = all) and a strategy.

    ``auto`` is ``mesh`` over all devices, or ``none`` when there is one.
    """
    if kind not in STRATEGIES:
        raise ParallelError(f"unknown --parallel {kind!r}; choose one of {list(STRATEGIES)}")
    devices = jax.devices()
    if num_devices:
        if num_devices > len(devices):
            raise ParallelError(
                f"--devices {num_devices} asks for more than the {len(devices)} visible device(s)"
            )
        if jax.process_count() > 1 and num_devices != len(devices):
            raise ParallelError("--devices cannot restrict devices in a multi-process run")
        devices = devices[:num_devices]
    if kind == "auto":
        kind = "mesh" if len(devices) > 1 else "none"
    if kind == "none" and len(devices) > 1:
        devices = devices[:1]
    if kind == "none" and jax.process_count() > 1:
        raise ParallelError("--parallel none cannot run across several processes")
    return Strategy(kind, tuple(devices))


def prefetch(
    batches: Iterable[PyTree], place: Callable[[PyTree], PyTree], size: int = 2
) -> Iterator[PyTree]:
    """Yields ``place(b)`` for each ``b`` of ``batches``, placed on a background thread.

    Up to ``size`` placed batches wait in a queue (the producer works on one
    more), so the host prepares steps ahead while the devices run. Order is
    kept. An exception raised by ``batches`` or ``place`` is re-raised in the
    consumer at the position where its batch would have come. Closing the
    iterator (``close()``, ``break`` out of a ``for``, an exception in the
    consumer, garbage collection) stops the thread and drops queued batches.

    Hand-written because these few lines are all that is needed (flax's old
    ``prefetch_to_device`` is tied to pmap).
    """
    if size < 1:
        raise ValueError(f"prefetch size must be >= 1, got {size}")
    q: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()

    def put(item: tuple[str, Any]) -> bool:
        while not stop.is_set():  # never block forever: the consumer may be gone
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for batch in batches:
                if stop.is_set() or not put(("batch", place(batch))):
                    return
            put(("done", None))
        except BaseException as e:  # noqa: BLE001  (re-raised in the consumer)
            put(("error", e))

    thread = threading.Thread(target=produce, name="jaxtrain-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, item = q.get()
            if kind == "done":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        deadline = time.monotonic() + 10.0  # a source stuck in next() is left to exit later
        while thread.is_alive() and time.monotonic() < deadline:
            try:  # drop what is queued so a blocked put returns
                while True:
                    q.get_nowait()
            except queue.Empty:
                pass
            thread.join(timeout=0.05)
