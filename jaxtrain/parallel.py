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
    check_processes(kind, jax.process_count())
    return Strategy(kind, tuple(devices))


def check_processes(kind: str, processes: int) -> None:
    """Raises ``ParallelError`` when strategy ``kind`` cannot span ``processes``. The loop
    calls it before the processes join (a process leaving after they joined could take
    JAX's coordination service down under the others); ``create_strategy`` after."""
    if kind == "none" and processes > 1:
        raise ParallelError("--parallel none cannot run across several processes")


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
