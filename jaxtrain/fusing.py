"""K training steps per compiled call (``--steps-per-call``): the fused loop, where
auto fuses, and how a run's steps split into calls. Pure: no I/O.

``fuse_steps(update, k)`` runs up to ``k`` steps of the loop's ``update`` in one
compiled ``fori_loop``; ``call_plan`` gives each call's ``(first_step, n)`` so that
no call crosses an eval, checkpoint or (auto) log step; ``unstack_steps`` splits a
call's ``[K]``-stacked metrics back into one dict per step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtrain.config import TrainConfig


def gather_rows(tree: Any, idx: jax.Array) -> Any:
    """Rows ``idx`` (int ``[B]`` or ``[K, B]``) of every ``[N, ...]`` leaf of ``tree``.

    ``mode="clip"``: the loop's indices are always in range, and ``jnp.take``'s
    default ("fill": NaN rows out of range) costs a per-element bounds select that
    XLA:CPU recomputes in every fusion consuming the batch. Inside ``lax.scan``
    that select also re-reads ``idx_KB`` with a dynamic-slice per element: the
    MNIST-shape CNN step ran 1.7x slower fused than alone (same compiled convs)."""
    return jax.tree.map(lambda x: jnp.take(x, idx, axis=0, mode="clip"), tree)


def fuse_steps(update: Callable[..., Any], k: int, *, resident: bool) -> Callable[..., Any]:
    """Up to ``k`` calls of ``update`` as one compiled loop (one dispatch for ``n`` steps).

    Takes ``idx_KB`` (resident) or a batch with a leading ``[K]`` axis instead of one
    step's, and ``n`` (int32 scalar, ``1 <= n <= k``): the steps to run, the first ``n``
    of the ``K``; the rest of the inputs are ignored (padding). Metrics come back
    stacked ``[K]``, zeros after the first ``n``. Same steps, same results as ``n``
    separate calls. Because ``n`` is an argument, a call of fewer steps (up to an eval
    step) runs the same program: no second compile. A ``fori_loop`` with a runtime
    ``n`` ran as fast as a ``lax.scan`` of static length on XLA:CPU, within noise
    (medians of 6 interleaved rounds: MNIST CNN 1.01x at K=8; MLP 1.01x and 0.92x at
    K=10, 1.03x at K=20); a scan over ``lax.cond(i < n)`` ran 0.90x. On a GPU the
    loop's condition may cost a host round trip per step: not measured yet
    (the fused_steps step of ``gpu_check.sh`` does; auto fuses on CPU only).

    Runs on one device, or with resident data on a ``mesh`` too (``idx_KB`` sharded on
    its batch axis, ``Strategy.shard_steps``; the loop refuses the rest). The host
    batch's ``[K, B]`` rows are flattened and each step gathers its own, because slicing
    the stacked batch with a dynamic-slice is fused by XLA:CPU into the consumers and
    evaluated per element (1.6-1.7x slower per CNN step); a gather stays its own
    fusion. Both ways, a conv step fused runs as fast as alone on XLA:CPU. On a mesh
    neither is local to a device (GSPMD moves the rows: 2 CPU devices ran the MNIST CNN
    0.66x (gather) and 0.80x (dynamic-slice) of single steps), hence resident only."""

    def loop_k(one_step, state, rows_KB, n):
        """``one_step(state, rows_B)`` for the first ``n`` of ``rows_KB``; metrics ``[K]``.

        ``one_step`` is jitted so that the loop body reuses the trace that finds the
        metrics' shapes (jit's trace cache): the step is traced once, not twice (the
        digits MLP's fused trace: ~0.05 s against ~0.11 s, the same program bit for bit)."""
        one_step = jax.jit(one_step)
        m_shape = jax.eval_shape(one_step, state, rows_KB[0])[1]
        metrics = jax.tree.map(lambda a: jnp.zeros((k, *a.shape), a.dtype), m_shape)

        def body(i, carry):
            st, ms = carry
            st, m = one_step(st, rows_KB[i])
            return st, jax.tree.map(lambda buf, x: buf.at[i].set(x), ms, m)

        return jax.lax.fori_loop(0, n, body, (state, metrics))

    if resident:

        def fused(state, data, idx_KB, n, key, *, axis_name=None):
            return loop_k(lambda st, idx: update(st, data, idx, key, axis_name=axis_name),
                          state, idx_KB, n)

    else:

        def fused(state, batch_K, n, key, *, axis_name=None):
            flat = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), batch_K)  # [K * B, ...]
            b = jax.tree.leaves(batch_K)[0].shape[1]
            rows_KB = jnp.arange(k * b, dtype=jnp.int32).reshape(k, b)
            return loop_k(lambda st, rows: update(st, gather_rows(flat, rows), key,
                                                  axis_name=axis_name), state, rows_KB, n)

    return fused


# --steps-per-call 0 (auto) fuses only where it was measured faster: on XLA:CPU
# (2-core AMD EPYC, jaxlib 0.10.2, one device, resident data) K steps per call against
# one, interleaved in one process (K=8, 6-8 rounds, median): the digits MLP 1.26x, the
# CNN on MNIST shape 1.30x and on digits 1.11x, resnet_tiny on CIFAR shape 1.38x,
# ResNet-18 (batch 32) 1.07x. A call's cost beyond its steps is mostly page faults:
# XLA:CPU maps the step's temporary buffers (34 MiB for the MNIST CNN) fresh each
# call, ~8600 faults per single step against ~2200 per step at K=4 (getrusage).
# Convolutional steps used to run slower fused (~15x, then 1.7x); conv.conv_nhwc and
# gather_rows removed the two causes. ResNet-18 is left out: 1.07x, and at ~1 s a step
# on CPU, K steps would put up to half a minute between preemption checks. GPUs: not
# measured yet (gpu_check's fused_steps step does). Through the loop, a 1-epoch MNIST-size
# CNN run on one device: 21-22 steady steps/s with auto's K=25 against 15 with single steps;
# split over 2 CPU devices (a mesh), fused against single steps: 1.05x at batch 128, 1.44x
# at 256, as fast as one fused device (benchmarks/results/whole_runs-*-mesh-fused.json).
AUTO_FUSED_MODELS = frozenset({"mlp", "cnn", "resnet_tiny"})
AUTO_MAX_STEPS_PER_CALL = 32


def call_boundaries(config: TrainConfig, per_epoch: int, *, logs: bool) -> tuple[int, ...]:
    """The intervals no compiled call crosses: eval and checkpoint steps, and with
    ``logs`` (auto) log steps too (0 = none)."""
    every = (config.eval_every or per_epoch, config.checkpoint_every)
    return (*every, config.log_every) if logs else every


def auto_steps_per_call(
    config: TrainConfig, platform: str, strategy_kind: str, seeded: bool, per_epoch: int,
    *, resident: bool = True, processes: int = 1,
) -> int:
    """``config.steps_per_call``, or for 0 (auto) the most steps a compiled call runs.

    Auto fuses on CPU devices, one seed, for ``AUTO_FUSED_MODELS``: on one device, or on
    a mesh of one process with resident data (``fusing_needs``). Its calls end on
    every eval, checkpoint and log step (``call_boundaries``), so the run writes exactly
    what single steps write; a call runs ``k`` steps or fewer, up to the next of those
    (one program: ``fuse_steps``). ``k``: the smallest that makes as few calls over the
    whole run as ``AUTO_MAX_STEPS_PER_CALL`` (digits, 20 steps per epoch, log every 50:
    20; MNIST, 421 per epoch: 25 for one epoch, 29 for five, whose intervals include
    the 29 steps from 421 to the log at 450). 1 anywhere else, or when every interval is 1 step."""
    if config.steps_per_call:
        return config.steps_per_call
    if (seeded or platform != "cpu" or config.model not in AUTO_FUSED_MODELS
            or fusing_needs(strategy_kind, resident) or processes > 1):
        return 1
    total = config.epochs * per_epoch
    ends = [np.arange(b, total, b) for b in call_boundaries(config, per_epoch, logs=True) if b]
    gaps = np.diff(np.unique(np.concatenate([[0, total], *ends])))
    fewest = int(np.sum(-(-gaps // AUTO_MAX_STEPS_PER_CALL)))
    return next(k for k in range(1, AUTO_MAX_STEPS_PER_CALL + 1)
                if int(np.sum(-(-gaps // k))) == fewest)


def fusing_needs(strategy_kind: str, resident: bool) -> str:
    """What K steps per call (``fuse_steps``) need that this strategy and data placement
    lack, "" when nothing: they run on one device, or on a ``mesh`` with the training
    data on the devices."""
    if strategy_kind == "pmap":
        return "one device or a mesh (--parallel none, mesh or auto), not --parallel pmap"
    if strategy_kind == "mesh" and not resident:
        return ("the training data on the devices (--data-placement device) when it runs "
                "on several; or one device (--parallel none)")
    return ""


def call_plan(
    start: int, total: int, k: int, boundaries: tuple[int, ...]
) -> list[tuple[int, int]]:
    """``(first_step, n)`` per compiled call from ``start`` to ``total``: ``k`` steps, or
    fewer up to the next multiple of a boundary (eval, checkpoint, ...) or the end, so
    no call crosses one (``k == 1``: all single)."""
    plan, s = [], start
    while s < total:
        nxt = min([total, *(((s // b) + 1) * b for b in boundaries if b)])
        n = min(k, nxt - s)
        plan.append((s, n))
        s += n
    return plan


def unstack_steps(metrics: dict[str, Any], seeded: bool, n: int = 1) -> list[dict[str, Any]]:
    """Host metrics of one call of ``n`` steps -> one dict per step (a fused call's are
    stacked ``[K]``, of which the first ``n`` ran; a single step's are scalars, or
    ``[S]`` for a seed run, which is never fused)."""
    if seeded or np.ndim(metrics["loss"]) == 0:
        return [metrics]
    return [{k: v[i] for k, v in metrics.items()} for i in range(n)]
