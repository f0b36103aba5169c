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
"""

from __future__ import annotations

import dataclasses
import functools
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

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
        """Raises ``ParallelError`` unless ``batch_size`` splits evenly over devices and processes."""
        ways = max(self.shards, jax.process_count())
        if batch_size % ways:
            lo = max(ways, batch_size - batch_size % ways)
            hi = lo + ways if lo < batch_size else lo
            raise ParallelError(
                f"{flag} {batch_size} does not split over {self.shards} device(s) x "
                f"{jax.process_count()} process(es) (needs a multiple of {ways}); "
                f"nearest valid sizes: {lo}, {hi}"
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

    def unreplicate(self, tree: PyTree) -> PyTree:
        """One copy of a replicated tree, as host numpy arrays."""

        def get(x):
            x = np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)
            return x[0] if self.kind == "pmap" else x

        return jax.tree.map(get, tree)

    # ------------------------------------------------------------------ compile

    def compile(self, fn: Callable[..., Any], *, donate_argnums: Sequence[int] = ()) -> Callable:
        """Compiles ``fn(*args, axis_name=...)`` for this strategy; outputs are replicated."""
        if self.kind == "pmap":
            return jax.pmap(
                functools.partial(fn, axis_name=AXIS),
                axis_name=AXIS,
                devices=self.local_devices if jax.process_count() == 1 else None,
                donate_argnums=tuple(donate_argnums),
            )
        bound = functools.partial(fn, axis_name=None)
        if self.kind == "mesh":
            return jax.jit(
                bound,
                out_shardings=NamedSharding(self.mesh, P()),
                donate_argnums=tuple(donate_argnums),
            )
        return jax.jit(bound, donate_argnums=tuple(donate_argnums))


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


def prefetch(batches: Iterable[PyTree], place: Callable[[PyTree], PyTree], size: int = 2) -> Iterator[PyTree]:
    """Places batches on devices ``size`` steps ahead on a background thread.

    Hand-written because the few lines here are all that is needed (flax's old
    ``prefetch_to_device`` is tied to pmap). Exceptions in the producer are
    re-raised in the consumer.
    """
    q: queue.Queue = queue.Queue(maxsize=size)
    done = object()
    stop = threading.Event()

    def produce():
        try:
            for b in batches:
                if stop.is_set():
                    return
                q.put(place(b))
            q.put(done)
        except BaseException as e:  # surfaced in the consumer
            q.put(e)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
