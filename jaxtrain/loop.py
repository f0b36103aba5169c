"""``train_and_evaluate``: the one place with I/O, progress and checkpoint cadence.

Reads top to bottom: devices, data, model and state, checkpoint, compiled
steps, the training loop, final evaluation and summary.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtrain import data as data_lib
from jaxtrain import distributed
from jaxtrain.checkpoint import (
    Checkpointer,
    Restored,
    checkpoint_dir,
    first_nonfinite,
    set_aside,
    snapshot,
    state_tree,
)
from jaxtrain.config import ConfigError, TrainConfig, check_model_input, check_paths
from jaxtrain.manifest import build_manifest
from jaxtrain.models import create_model
from jaxtrain.optim import create_optimizer, create_schedule
from jaxtrain.parallel import (
    Strategy,
    auto_cpu_devices,
    auto_seed_cpu_devices,
    create_strategy,
    local_cpu_device_count,
    prefetch,
    usable_cores,
    use_cpu_devices,
)
from jaxtrain.profiling import StepProfiler
from jaxtrain.seeds import (
    SeedPlacement,
    check_seed_strategy,
    compile_seeded,
    seed_list,
    stack,
    vmap_eval,
)
from jaxtrain.state import TrainState, create_train_state
from jaxtrain.steps import cross_entropy, eval_step, train_step
from jaxtrain.writers import LogWriter, MetricWriter, MultiWriter, create_writers

# Datasets up to this many bytes per split live on the devices (batches are
# gathered inside the compiled step); larger ones stream from host memory.
DEVICE_DATA_BYTES = 1 << 30
# A best checkpoint (--best-metric) found within this many seconds of the last best
# write is held as a device copy and written later: at the first improving validation
# after the interval, before any other checkpoint (periodic, preemption, final,
# rollback) and when the run stops. The digits MLP's validation improved 3 times
# before its last step, within ~2 s; writing each at once (a background thread
# contending with the steps on 2 cores) made a fresh run's loop 2.17 s instead of
# 1.90 s (medians of 6). The files left at the end are the same (the best and the
# latest --keep-checkpoints); what a kill -9 can lose grows by this interval.
BEST_WRITE_INTERVAL_S = 30.0


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss, gradient or state (see ``--on-nonfinite``)."""

    exit_status = 1  # the CLI reports it in one line


# ----------------------------------------------------------------------------- preemption


class Preempted(SystemExit):
    """The run stopped on SIGTERM/SIGINT after committing a checkpoint.

    A ``SystemExit`` with status 128 + signal number (143 for SIGTERM, 130 for
    SIGINT), so the command exits non-zero and a scheduler (SLURM ``--requeue``)
    restarts it; rerunning the same command resumes.
    """

    def __init__(self, signum: int, step: int, message: str):
        super().__init__(128 + signum)
        self.signum, self.step, self.message = signum, step, message


class PreemptionGuard:
    """While installed, the first SIGTERM or SIGINT only sets ``signum`` (the loop saves
    at the next call boundary where ``due``); a second one gets the default action and
    ends the process at once. Installed by the loop in the main thread only, then restored.

    Several processes must all save the same step, though a signal reaches each at its
    own moment (or only one of them); saving where each stopped, they met in different
    Orbax barriers and hung (2 processes x 2 CPU devices, one SIGTERM each). So there
    SIGTERM is left to JAX's preemption notifier (set up by ``jax.distributed``), a
    SIGINT is passed on to it as a SIGTERM, and ``due`` is JAX's preemption sync point:
    true at the same call on every process."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, processes: int = 1) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self.synced = processes > 1 and bool(
            getattr(jax.config, "jax_enable_preemption_service", False))  # off: as one process
        self._asked: tuple[int, bool] = (-1, False)  # (call, answer) of the last sync point

    def install(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT,) if self.synced else self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def due(self, call: int) -> bool:
        """Whether to save and exit after call number ``call`` (0, 1, ... on every
        process): once a signal came, or with several processes at the call JAX's
        preemption sync picks after any process got a notice (asked once per call;
        asking again gives the same answer, so every process acts alike)."""
        if not self.synced:
            return self.signum is not None
        if self._asked[0] != call:
            from jax.experimental import multihost_utils

            self._asked = (call, multihost_utils.reached_preemption_sync_point(call))
            if self._asked[1]:
                self.signum = self.signum or signal.SIGTERM
        return self._asked[1]

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        for s in self._previous:
            signal.signal(s, signal.SIG_DFL)
        print(f"received {signal.Signals(signum).name}: saving a checkpoint at the next step "
              "boundary, then exiting (send it again to exit at once)", file=sys.stderr, flush=True)
        if self.synced:  # to JAX's preemption notifier, which tells every process
            os.kill(os.getpid(), signal.SIGTERM)


def diagnose_nonfinite(state: TrainState, batch: dict[str, np.ndarray], rng: jax.Array) -> str:
    """Where a non-finite step comes from, recomputed on the host after detection (off
    the hot path): the first non-finite parameter, else the first non-finite gradient
    leaf of the loss on ``batch``."""
    bad = first_nonfinite(state.params)
    if bad is not None:
        return f"first non-finite parameter: {bad}"

    def loss_fn(params):
        logits, _ = state.model.apply(
            {"params": params, **state.model_state}, batch["image"], train=True,
            rngs={"dropout": rng}, mutable=list(state.model_state),
        )
        return jnp.mean(cross_entropy(logits, batch["label"]))

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(state.params)
    bad = first_nonfinite(jax.device_get(grads))
    if bad is not None:
        return f"first non-finite gradient: {bad}"
    return f"loss {float(loss)}, every gradient finite on recomputation"


def drop_records_after(path: str, step: int) -> None:
    """On resume at ``step``: removes ``metrics.jsonl`` records of later steps (that work
    is redone) and a line cut short by a kill, so the file reads as one run."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()

    def keep(line: str) -> bool:
        try:
            return int(json.loads(line)["step"]) <= step
        except (ValueError, KeyError, TypeError):
            return False

    kept = [line for line in lines if keep(line)]
    if len(kept) != len(lines):
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)


def resume_point(config: TrainConfig, workdir: str, target: Any) -> Restored | None:
    """The checkpoint a run continues from under ``--resume``, or None to start fresh.

    Checks the saved config and every leaf shape against ``target`` before anything
    is written (``ConfigError`` names the first mismatch). Damaged newer checkpoints
    are set aside with a warning naming both steps."""
    directory = checkpoint_dir(workdir)
    found = None
    if os.path.isdir(directory):
        reader = Checkpointer(workdir, read_only=True)
        try:
            if config.resume == "never" and reader.all_steps():
                raise ConfigError(f"--resume never, but {directory} already holds checkpoints; "
                                  "use a new --workdir")
            if config.resume != "never":
                found = reader.restore_latest(
                    target, check=lambda meta: check_resumable(meta.get("config", {}), config)
                )
        finally:
            reader.close()
    if found is None:
        if config.resume == "must":
            raise ConfigError(f"--resume must, but {directory} holds no checkpoint")
        return None
    for step, reason in found.damaged:
        moved = set_aside(workdir, step) if jax.process_index() == 0 else None
        print(f"warning: the latest checkpoint, step {step}, is damaged ({reason}); falling back "
              f"to step {found.step}" + (f" (moved it to {moved})" if moved else ""),
              file=sys.stderr, flush=True)
    return found


# ----------------------------------------------------------------------------- setup


def setup_compilation_cache(path: str) -> None:
    """Persistent XLA cache so a second run of the same program skips compilation.

    Keeps every program, however quick to compile: a 0.5 s floor left the eval step,
    the checkpoint snapshot and the eager key ops (0.1-0.6 s each, more under load)
    compiling again in every run, ~1 s of a warm digits-MLP run's ~4 s; reading one
    back takes a few ms."""
    if not path:
        return
    path = os.path.expanduser(path)
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def build_model_and_state(
    config: TrainConfig, dataset: data_lib.Dataset, total_steps: int
) -> TrainState:
    """The initial state (host arrays) for ``config``; a pure function of ``config.seed``.

    With ``config.num_seeds > 1`` every leaf gets a leading seed axis ``[S, ...]``
    (seeds ``seed .. seed + S - 1``, each initialized exactly as its single run)."""
    model = create_model(
        config.model,
        dataset.num_classes,
        mean=dataset.mean,
        std=dataset.std,
        dropout=config.dropout,
        dtype=jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32,
    )
    schedule = create_schedule(
        config.schedule, config.lr, total_steps, warmup_steps=config.warmup_steps
    )
    tx = create_optimizer(
        config.optimizer,
        schedule,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        clip_norm=config.clip_norm or None,
    )
    check_model_input(model, dataset.image_shape, dataset.num_classes, config.model)
    sample = jnp.zeros((1, *dataset.image_shape), jnp.float32)
    init = functools.partial(create_train_state, model, tx, sample_images=sample, lr_fn=schedule)
    if config.num_seeds > 1:
        keys = jnp.stack([init_key(s) for s in seed_list(config.seed, config.num_seeds)])
        state = run_once(jax.vmap(init), keys)
    else:
        state = run_once(init, init_key(config.seed))
    return jax.tree.map(np.asarray, state)


def _host(tree: Any) -> Any:
    """Batches stay host arrays; the compiled step places them (one CPU device)."""
    return tree


def run_once(fn: Callable[..., Any], *args: Any) -> Any:
    """``jax.jit(fn)(*args)`` for a function called once, such as initialization.

    On CPU it compiles without LLVM optimization: parameter initializers (a
    threefry and an erf_inv per parameter) otherwise compile ~10x slower
    (resnet_tiny 20 s -> 1 s, the digits MLP 4 s -> 1 s) and run only once."""
    lowered = jax.jit(fn).lower(*args)
    fast = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    return lowered.compile(fast)(*args)


def init_key(seed: int) -> jax.Array:
    return jax.random.fold_in(jax.random.PRNGKey(seed), 0x1417)


def step_key(seed: int) -> jax.Array:
    """Base key of per-step randomness (dropout, augmentation), folded with the step."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), 0x57E9)


def make_update(
    config: TrainConfig, *, resident: bool
) -> Callable[..., tuple[TrainState, dict[str, jnp.ndarray]]]:
    """The function compiled for one training step (before parallel compilation).

    ``resident``: ``update(state, data, idx_B, key)`` gathers the batch from
    device-resident ``data``; otherwise ``update(state, batch, key)``.
    """
    step_fn = functools.partial(
        train_step, label_smoothing=config.label_smoothing, skip_nonfinite=True
    )

    def run(state, batch, key, axis_name):
        rng = jax.random.fold_in(key, state.step)
        aug_key, drop_key = jax.random.split(rng)
        if config.crop_padding or config.flip:
            if axis_name is not None:
                aug_key = jax.random.fold_in(aug_key, jax.lax.axis_index(axis_name))
            image = data_lib.augment(
                aug_key, batch["image"], crop_padding=config.crop_padding, flip=config.flip
            )
            batch = {**batch, "image": image}
        return step_fn(state, batch, drop_key, axis_name=axis_name)

    if resident:

        def update(state, data, idx, key, *, axis_name=None):
            return run(state, gather_rows(data, idx), key, axis_name)

    else:

        def update(state, batch, key, *, axis_name=None):
            return run(state, batch, key, axis_name)

    return update


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


def resolve_cpu_devices(config: TrainConfig, image_shape: tuple[int, ...],
                        resident: bool = True) -> int:
    """``config.cpu_devices``, or for 0 (auto) the CPU devices to make (0 = JAX's one).

    Auto splits a single-process run with every device (``--parallel`` auto, mesh or
    pmap) by ``parallel.auto_cpu_devices``'s rule; a seed run (auto or mesh: the seed
    axis, ``seeds_on_auto_devices``) by ``parallel.auto_seed_cpu_devices``'s. Not
    when the device count is already fixed (``JAX_NUM_CPU_DEVICES``,
    ``--xla_force_host_platform_device_count`` or ``jax_num_cpu_devices`` set), or an
    explicit ``--steps-per-call`` K > 1 could not run on several (host data:
    ``fusing_needs``). Harmless on a GPU host: the CPU devices it makes go unused."""
    if config.cpu_devices:
        return config.cpu_devices
    try:
        group = distributed.detect(config.coordinator_address, config.num_processes,
                                   config.process_id)
    except distributed.DistributedError:  # distributed.initialize says why
        return 0
    if (group is not None or config.parallel == "none"
            or config.devices or (config.steps_per_call > 1 and not resident)
            or "JAX_NUM_CPU_DEVICES" in os.environ
            or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
            or jax.config.jax_num_cpu_devices != -1):
        return 0
    if config.num_seeds > 1:
        if config.parallel == "pmap":  # seed runs refuse it (check_seed_strategy)
            return 0
        return auto_seed_cpu_devices(config.model, config.num_seeds, config.batch_size,
                                     tuple(image_shape[:2]), usable_cores())
    return auto_cpu_devices(config.model, config.batch_size, tuple(image_shape[:2]),
                            usable_cores())


def seeds_on_auto_devices(config: TrainConfig, cpu_devices: int, strategy: Strategy) -> bool:
    """Whether a seed run's devices are the CPU devices ``--cpu-devices 0`` made for it,
    which then hold one block of seeds each (``--seed-parallel``): splitting each seed's
    batch over them instead ran the 16-seed digits MLP at 0.54x one device (2 cores)."""
    return (config.num_seeds > 1 and not config.cpu_devices and cpu_devices > 1
            and strategy.kind == "mesh" and strategy.num_devices == cpu_devices
            and strategy.devices[0].platform == "cpu")


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


# ----------------------------------------------------------------------------- evaluation


def eval_inputs(place: Callable, split: data_lib.Split, batch_size: int, whole: bool = False
                ) -> Iterator[Any]:
    """This process's rows (``data.process_rows``; all of them with ``whole``) of each
    eval batch of ``split`` (``data.eval_batches``), placed."""
    rows = data_lib.process_rows(batch_size, whole)
    for batch in data_lib.eval_batches(split, batch_size):
        yield place({k: v[rows] for k, v in batch.items()})


def evaluate(
    place: Callable, get: Callable, eval_fn: Callable, state: Any, split: data_lib.Split,
    batch_size: int, *, placed: Sequence[Any] | None = None, whole: bool = False,
) -> dict[str, Any]:
    """Loss and accuracy over every example of ``split`` exactly once (padded + masked).

    ``place`` puts this process's rows of a batch on devices, ``get`` brings the
    summed results back; ``placed``: ``eval_inputs(place, split, batch_size)`` kept
    by a caller that evaluates ``split`` again and again (the loop's validation
    split, when the data sits on the devices: ~2 of a digits evaluation's ~3 ms went
    to slicing and placing); ``whole``: every process places whole batches
    (``eval_inputs``). Values are floats, or ``[S]`` arrays for a seed run."""
    sums = None
    batches = placed if placed is not None else eval_inputs(place, split, batch_size, whole)
    for batch in batches:
        out = eval_fn(state, batch)
        sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    sums = get(sums)
    loss, acc = sums["loss_sum"] / sums["count"], sums["correct"] / sums["count"]
    if np.ndim(loss):
        return {"loss": np.asarray(loss, np.float64), "accuracy": np.asarray(acc, np.float64)}
    return {"loss": float(loss), "accuracy": float(acc)}


# ----------------------------------------------------------------------------- progress


class Progress:
    """A tqdm bar on a terminal, plain log lines otherwise (or nothing)."""

    def __init__(self, mode: str, total: int, initial: int, enabled: bool):
        if mode == "auto":
            mode = "bar" if sys.stdout.isatty() else "log"
        self.mode = mode if enabled else "none"
        self._bar = None
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
        self._log = LogWriter() if self.mode == "log" else None

    def update(self, step: int, n: int, split: str, metrics: dict[str, float]) -> None:
        if self._bar is not None:
            self._bar.update(n)
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)
        elif self._log is not None:
            self._log.write(step, split, metrics)

    def note(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text)
        elif self._log is not None:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# ----------------------------------------------------------------------------- the loop


def _final_figures(test: dict, val: dict, seeds: list[int]) -> dict[str, Any]:
    """Summary figures; a seed run adds per-seed lists and their statistics."""
    figures = {"num_seeds": len(seeds)}
    for split, m in (("test", test), ("val", val)):
        for name, value in m.items():
            key = f"{split}_{name}"
            if np.ndim(value):
                from jaxtrain.stats import summarize

                figures[key] = float(np.mean(value))
                figures[f"{key}_per_seed"] = [float(v) for v in value]
                figures[f"{key}_stats"] = summarize(value).to_dict()
            else:
                figures[key] = float(value)
    return figures


def check_resumable(saved: dict[str, Any], config: TrainConfig) -> None:
    """Raises ``ConfigError`` naming the first field where a checkpoint's config differs."""
    current = config.to_dict()
    for name, value in current.items():
        if name in TrainConfig.RUNTIME_FIELDS:
            continue
        old = saved.get(name, value)
        if isinstance(value, tuple):
            old = tuple(old) if isinstance(old, list) else old
        if old != value:
            raise ConfigError(
                f"workdir holds checkpoints of a different run: --{name.replace('_', '-')} "
                f"was {old!r}, now {value!r} (use another --workdir or --resume never)"
            )


_FROZEN_AT_IMPORT = gc.get_freeze_count()  # 375 on CPython 3.12 from its start, else 0


def gc_frozen(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Runs ``fn`` with the objects that exist when it starts kept out of the cyclic
    garbage collector's scans (``gc.freeze``), handed back when it returns.

    After ``import jax, flax, optax, orbax`` a process tracks ~140k objects (~270k
    with torch imported too), and tracing and compiling allocate enough to set off
    a full collection that walks all of them: 0.3-0.4 s of a ~4 s warm digits-MLP run
    (measured with torch imported), to free a few dozen objects. A caller that froze
    objects itself (or disabled the collector) is left as it is. CPython 3.12 starts
    with a few hundred objects frozen; those do not count as the caller's."""

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if gc.get_freeze_count() > _FROZEN_AT_IMPORT or not gc.isenabled():
            return fn(*args, **kwargs)
        gc.freeze()
        try:
            return fn(*args, **kwargs)
        finally:
            gc.unfreeze()

    return wrapped


@gc_frozen
def train_and_evaluate(
    config: TrainConfig, workdir: str | None = None, *, writer: MetricWriter | None = None
) -> dict[str, Any]:
    """Trains, evaluates and writes ``config.json``, ``metrics.jsonl``, ``summary.json``
    and checkpoints under ``workdir`` (default ``config.workdir``). Returns the summary."""
    t_start = time.perf_counter()
    config = config.validate()
    workdir = os.path.abspath(workdir or config.workdir)
    config = config.replace(workdir=workdir)
    check_paths(config)  # read-only: a bad --workdir fails before anything is written

    # --- data (host arrays only: before the devices, whose count auto takes from them) --
    dataset = data_lib.load_dataset(
        config.dataset,
        val_fraction=config.val_fraction,
        data_dir=config.data_dir,
        synthetic_size=config.synthetic_size,
        synthetic_shape=tuple(config.synthetic_shape),
        synthetic_classes=config.synthetic_classes,
    )

    resident = config.data_placement == "device" or (
        config.data_placement == "auto" and dataset.train["image"].nbytes <= DEVICE_DATA_BYTES
    )

    # --- devices ---------------------------------------------------------------------
    # Joins a multi-process run (flags or SLURM / Open MPI) before anything touches a device.
    cpu_devices = resolve_cpu_devices(config, dataset.image_shape, resident)
    use_cpu_devices(cpu_devices, strict=bool(config.cpu_devices))
    distributed.initialize(config.coordinator_address, config.num_processes, config.process_id)
    is_main = jax.process_index() == 0
    strategy = create_strategy(config.parallel, config.devices)
    if seeds_on_auto_devices(config, cpu_devices, strategy):
        config = config.replace(seed_parallel=True)  # recorded so in config.json
    strategy.check_batch_size(config.batch_size)
    seeds = seed_list(config.seed, config.num_seeds)
    seeded = len(seeds) > 1
    if seeded:
        check_seed_strategy(strategy, len(seeds), config.seed_parallel)
    if config.steps_per_call > 1 and (needs := fusing_needs(strategy.kind, resident)):
        raise ConfigError(f"--steps-per-call {config.steps_per_call} needs {needs}")
    eval_batch = -(-config.eval_batch_size // strategy.shards) * strategy.shards

    n_train = len(dataset.train["label"])
    if n_train < config.batch_size:
        raise ConfigError(
            f"--batch-size {config.batch_size} is larger than the {n_train} training examples"
        )
    if len(dataset.val["label"]) == 0:
        raise ConfigError(
            f"--val-fraction {config.val_fraction} holds out no validation examples "
            f"of {n_train}; the loop evaluates on them (use a larger --val-fraction)"
        )
    per_epoch = data_lib.steps_per_epoch(n_train, config.batch_size)
    total_steps = config.epochs * per_epoch
    steps_per_call = auto_steps_per_call(config, strategy.devices[0].platform, strategy.kind,
                                         seeded, per_epoch, resident=resident,
                                         processes=jax.process_count())

    # --- model, state, checkpoint -----------------------------------------------------
    setup_compilation_cache(config.compilation_cache)  # before the first compile (init)
    host_state = build_model_and_state(config, dataset, total_steps)
    if config.dry_run:  # compile and report only: nothing trained, nothing written
        return dry_run(config, strategy, dataset, seeds, resident, host_state)
    profiler = StepProfiler(os.path.join(workdir, "profile"), config.profile_steps,
                            total_steps=total_steps)
    # Checkpoints are numbered by data position (batches consumed); that equals
    # state.step (optimizer steps, which key per-step randomness) until a rollback.
    base_key = np.asarray(stack([step_key(s) for s in seeds]) if seeded else step_key(config.seed))
    resumed = resume_point(config, workdir, {**state_tree(host_state), "rng": base_key})
    # Every process has looked for checkpoints before any creates the folder below.
    distributed.sync("jaxtrain:resume-point")
    start_step, resumed_meta = 0, {}
    if resumed is not None:
        host_state = host_state.replace(**{k: v for k, v in resumed.tree.items() if k != "rng"})
        base_key, resumed_meta = resumed.tree["rng"], resumed.meta
        start_step = int(resumed_meta["step"])
    os.makedirs(workdir, exist_ok=True)
    if resumed is not None and is_main:
        drop_records_after(os.path.join(workdir, "metrics.jsonl"), start_step)
    best_mode = config.best_mode
    if best_mode == "auto":
        best_mode = "min" if config.best_metric.endswith("loss") else "max"
    ckpt = Checkpointer(workdir, keep=config.keep_checkpoints, best_metric=config.best_metric,
                        best_mode=best_mode)

    # --- files -----------------------------------------------------------------------
    writers: list[MetricWriter] = []
    if is_main:
        manifest = build_manifest(config, strategy, dataset)
        manifest["data"]["resident"] = resident
        manifest["steps_per_call"] = steps_per_call
        manifest["cpu_devices"] = local_cpu_device_count()
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(manifest, f, indent=2)
        writers.extend(create_writers(
            config, workdir, resume_step=start_step if resumed is not None else None))
    if writer is not None:
        writers.append(writer)
    out = MultiWriter(writers)

    # --- compiled steps --------------------------------------------------------------
    update_fn = make_update(config, resident=resident)
    seed_chunk = None
    if seeded:
        placement = SeedPlacement(strategy, config.seed_parallel)
        put_state, put_batch, put_shared = placement.put_seeds, placement.put_batch, placement.put_shared
        get = placement.get
        put_eval = put_shared if placement.seed_parallel else strategy.shard
        key = put_state(base_key)
    else:
        put_state = put_shared = strategy.replicate
        put_batch = put_eval = strategy.shard
        if strategy.kind == "none" and strategy.devices[0].platform == "cpu":
            # jit copies host arrays into its CPU buffers far cheaper than a device_put
            # per step (~0.4 ms of CPU per step on 2 cores: benchmarks/loop_overhead.py).
            put_batch = _host
        get = strategy.unreplicate
        update = strategy.compile(update_fn, donate_argnums=(0,))
        evaluate_fn = strategy.compile(eval_step)
        key = put_state(base_key)
    fused = None  # --steps-per-call: every call runs up to K steps in one compiled loop
    if steps_per_call > 1:
        fused = strategy.compile(fuse_steps(update_fn, steps_per_call, resident=resident),
                                 donate_argnums=(0,))
        if strategy.kind == "mesh":  # [K, B] indices, sharded on B
            put_batch = strategy.shard_steps
    # an explicit K crosses log steps (the log line comes at the call's end); auto's
    # calls end on them too, so its files are those of single steps
    chunks = call_plan(start_step, total_steps, steps_per_call,
                       call_boundaries(config, per_epoch, logs=not config.steps_per_call))
    state = put_state(host_state)
    # seed-parallel devices hold whole models: each process feeds its seeds whole batches
    whole = seeded and placement.seed_parallel
    local_rows = data_lib.process_rows(config.batch_size, whole)

    def indices(step: int) -> np.ndarray:
        """This process's batch indices (its ``local_rows``): ``[B_local]``, or
        ``[S, B_local]`` for seeds."""
        per_seed = [data_lib.batch_indices(s, step, n_train, config.batch_size) for s in seeds]
        return np.stack(per_seed)[:, local_rows] if seeded else per_seed[0][local_rows]

    train_data = put_shared(dataset.train) if resident else None
    if seeded:  # compiled ahead of time: the memory it needs picks the seed chunk
        idx0 = put_batch(indices(start_step))
        sample = ((state, train_data, idx0, key) if resident else
                  (state, put_batch({k: v[indices(start_step)] for k, v in dataset.train.items()}),
                   key))
        update, seed_chunk = compile_seeded(
            placement, update_fn, sample, num_seeds=len(seeds), seed_chunk=config.seed_chunk,
            resident=resident, log=print if is_main else None)
        evaluate_fn = placement.compile(vmap_eval(eval_step, chunk=seed_chunk),
                                        shared_argnums=(1,))

    def stacked(fn, first: int, n: int):
        """One step's input (``K == 1``), or ``K`` steps' stacked on a leading ``[K]`` axis:
        the call's ``n``, then the last one's again as padding (``fuse_steps`` runs ``n``)."""
        if steps_per_call == 1:
            return fn(first)
        steps = [fn(first + min(i, n - 1)) for i in range(steps_per_call)]
        return jax.tree.map(lambda *xs: np.stack(xs), *steps)

    # inputs yield (n, x): x feeds n steps (one compiled call)
    if resident:
        inputs = prefetch(((n, put_batch(stacked(indices, s, n))) for s, n in chunks),
                          lambda x: x)
    else:
        def host_batch(step):
            return {k: v[indices(step)] for k, v in dataset.train.items()}

        inputs = prefetch(((n, stacked(host_batch, s, n)) for s, n in chunks),
                          lambda x: (x[0], put_batch(x[1])))

    def call(st, x):
        """One compiled call of ``x[0]`` steps on ``x[1]`` (indices, or the host batch)."""
        data = (train_data, x[1]) if resident else (x[1],)
        return update(st, *data, key) if fused is None else fused(st, *data, np.int32(x[0]), key)

    run_eval = functools.partial(evaluate, put_eval, get, evaluate_fn, whole=whole)
    # the validation batches, placed once, when the training data sits on the devices too
    val_placed = list(eval_inputs(put_eval, dataset.val, eval_batch, whole)) if resident else None
    take_snapshot = jax.jit(snapshot) if seeded else strategy.compile(snapshot)

    # --- loop ------------------------------------------------------------------------
    progress = Progress(config.progress, total_steps, start_step, is_main)
    eval_every = config.eval_every or per_epoch
    window: list[tuple[int, dict[str, jax.Array]]] = []  # (steps, metrics) per call
    skipped_in_a_row = int(resumed_meta.get("skipped_in_a_row", 0))
    initial = {**state_tree(host_state), "rng": base_key}  # rollback target before any checkpoint
    steady_time, steady_steps, t_first = 0.0, 0, None

    def write(step: int, split: str, metrics: dict[str, Any]) -> None:
        """One line per split, or per seed (with a ``seed`` field) for seed runs."""
        if not seeded:
            out.write(step, split, {k: float(v) for k, v in metrics.items()})
            return
        for i, s in enumerate(seeds):
            out.write(step, split, {"seed": s, **{k: float(np.broadcast_to(v, (len(seeds),))[i])
                                                  for k, v in metrics.items()}})

    held: list[tuple] = []  # at most one best checkpoint not written yet (see BEST_WRITE_INTERVAL_S)
    last_best_write = [time.monotonic()]

    def take(step: int, state, val: dict[str, Any] | None) -> tuple | None:
        """A checkpoint of ``state`` at data position ``step``, ready to write: a device
        copy (nothing donates it), its metadata and metrics; None when it is not finite."""
        copy, finite = take_snapshot({**state_tree(state), "rng": key})
        if not np.all(get(finite)):
            return None
        meta = {"config": config.to_dict(), "step": step, "epoch": step // per_epoch,
                "index_in_epoch": step % per_epoch, "skipped_in_a_row": skipped_in_a_row}
        metrics = {f"val_{k}": float(np.mean(v)) for k, v in (val or {}).items()}
        return step, copy, meta, metrics

    def write_ckpt(taken: tuple) -> None:
        """Starts the asynchronous write: the loop waits only for the previous one."""
        step, copy, meta, metrics = taken
        ckpt.save(step, lambda: get(copy), meta, metrics=metrics)

    def write_held() -> None:
        """Writes the held best checkpoint, if any (before any later one, so steps rise)."""
        if held:
            write_ckpt(held.pop())
            last_best_write[0] = time.monotonic()

    def save(step: int, state, val: dict[str, Any] | None = None) -> bool:
        """Writes a checkpoint at ``step`` (after the held best, if any); returns False,
        writing nothing new, when the state is not finite."""
        if held and held[0][0] == step:  # the held best is this very state
            write_held()
            return True
        taken = take(step, state, val)
        if taken is None:
            return False
        write_held()
        write_ckpt(taken)
        return True

    def nonfinite_message(bad: int, m: dict[str, Any]) -> str:
        """One line for policy ``raise``: the step (1-based, as in metrics.jsonl) and leaf."""
        i = int(np.argmax(np.reshape(m["nonfinite"], -1))) if seeded else 0
        host = get(state)
        if seeded:
            host = jax.tree.map(lambda x: x[i], host)
        idx = data_lib.batch_indices(seeds[i], bad - 1, n_train, config.batch_size)
        rng = jax.random.split(jax.random.fold_in(step_key(seeds[i]), int(host.step)))[1]
        where = diagnose_nonfinite(host, data_lib.take(dataset.train, idx), rng)
        loss = float(np.reshape(m["loss"], -1)[i])
        seed = f" (seed {seeds[i]})" if seeded else ""
        return (f"non-finite loss or gradient at step {bad}{seed}: loss={loss}, {where}; "
                "try a lower --lr, --clip-norm, or --on-nonfinite skip/rollback")

    def rollback(bad: int, step: int):
        """``--on-nonfinite rollback``: the last checkpoint's state (the initial one before
        any), placed on devices; the data position stays at ``step``. The optimizer step
        goes back with the state, so later checkpoints are numbered ahead of it."""
        write_held()
        found = ckpt.restore_latest(initial)
        source, tree = (found.step, found.tree) if found is not None else (start_step, initial)
        print(f"warning: non-finite loss or gradient at step {bad}: rolled back to the checkpoint "
              f"of step {source}, continuing with the batch of step {step + 1}",
              file=sys.stderr, flush=True)
        return put_state(host_state.replace(**{k: v for k, v in tree.items() if k != "rng"}))

    def flush_window(step: int) -> int | None:
        """Writes the window's mean train metrics and applies ``--on-nonfinite``: raise, or
        stop after ``max_skipped`` consecutive non-finite steps (skip and rollback; a
        rollback does not reset the count). Returns the first non-finite step, if any."""
        nonlocal skipped_in_a_row
        host = [h for n, m in window for h in unstack_steps(get(m), seeded, n)]
        window.clear()
        first_bad = None
        for i, m in enumerate(host):
            if np.any(m["nonfinite"]):
                bad = step - len(host) + i + 1
                first_bad = first_bad or bad
                if config.on_nonfinite == "raise":
                    raise NonFiniteError(nonfinite_message(bad, m))
                skipped_in_a_row += 1
                if skipped_in_a_row >= config.max_skipped:
                    raise NonFiniteError(
                        f"{skipped_in_a_row} consecutive non-finite steps up to step {bad} "
                        f"(--on-nonfinite {config.on_nonfinite}); stopping (--max-skipped)"
                    )
            else:
                skipped_in_a_row = 0
        finite = [m for m in host if not np.any(m["nonfinite"])] or host
        mean = {k: np.mean([m[k] for m in finite], axis=0)
                for k in ("loss", "accuracy", "grad_norm", "lr")}
        mean["skipped"] = float(sum(np.sum(m["nonfinite"]) for m in host))
        write(step, "train", mean)
        progress.update(step, len(host), "train",
                        {k: float(np.mean(mean[k])) for k in ("loss", "accuracy")})
        return first_bad

    def checkpoint(step: int, state, val: dict[str, Any] | None = None, *, best: bool = False):
        """Saves, or applies ``--on-nonfinite`` to a state that is not finite (never written).
        A ``best`` one found within ``BEST_WRITE_INTERVAL_S`` of the last best write is
        held instead (one process only: the others would have to decide alike)."""
        if best and jax.process_count() == 1 and time.monotonic() - last_best_write[0] < BEST_WRITE_INTERVAL_S:
            taken = take(step, state, val)
            if taken is not None:
                held[:] = [taken]  # a newer best replaces the one held
                return state
        elif save(step, state, val):
            if best:
                last_best_write[0] = time.monotonic()
            return state
        where = first_nonfinite(state_tree(get(state)))
        if config.on_nonfinite == "rollback":
            return rollback(step, step)
        raise NonFiniteError(f"the state at step {step} holds non-finite values ({where}); "
                             "not saving it (try --on-nonfinite rollback or a lower --lr)")

    best_seen: list[float] = []  # best --best-metric value so far in this process

    def improves_best(val: dict[str, Any]) -> bool:
        """True when ``val`` beats every earlier validation: only then is a best save worth
        its cost (a save per validation was most of the loop's overhead on small models)."""
        if not ckpt.tracks_best:
            return False
        value = float(np.mean(val[config.best_metric.removeprefix("val_")]))
        better = not best_seen or (value > best_seen[0] if best_mode == "max" else value < best_seen[0])
        if better:
            best_seen[:] = [value]
        return better

    guard = PreemptionGuard(jax.process_count()).install()
    try:
        step = start_step
        val, val_step = None, None
        t_mark, since_mark = time.perf_counter(), 0
        for calls, x in enumerate(inputs):
            state, metrics = profiler.run(step, call, state, x, n=x[0])
            n = x[0]  # steps in this call (call_plan never crosses an eval or checkpoint step)
            window.append((n, metrics))
            step += n
            if t_first is None:  # the first step compiles: keep it out of the steady state
                jax.block_until_ready(state)
                t_first = t_mark = time.perf_counter()
            else:
                since_mark += n
            eval_due = step % eval_every == 0 or step == total_steps
            ckpt_due = bool(config.checkpoint_every) and step % config.checkpoint_every == 0
            log_due = step // config.log_every != (step - n) // config.log_every
            if eval_due or ckpt_due or log_due or guard.due(calls):
                bad = flush_window(step)  # the one host sync: this step's metrics
                if bad is not None and config.on_nonfinite == "rollback":
                    state = rollback(bad, step)
                steady_time += time.perf_counter() - t_mark
                steady_steps += since_mark
                if eval_due:
                    val = run_eval(state, dataset.val, eval_batch, placed=val_placed)
                    val_step = step
                    write(step, "val", val)
                    progress.note(f"step {step} val: loss={np.mean(val['loss']):.4f} "
                                  f"accuracy={np.mean(val['accuracy']):.4f}")
                if step != total_steps and ckpt_due:
                    state = checkpoint(step, state, val if val_step == step else None)
                elif step != total_steps and eval_due and improves_best(val):
                    state = checkpoint(step, state, val, best=True)
                t_mark, since_mark = time.perf_counter(), 0
            if guard.due(calls):  # save at this step boundary, then exit
                saved = ckpt.last_step == step or save(step, state)
                ckpt.wait()
                message = f"preempted by {signal.Signals(guard.signum).name} at step {step}: " + (
                    f"checkpoint saved in {ckpt.directory}; rerun the same command to resume"
                    if saved else "the state is not finite, so no checkpoint was saved")
                print(message, file=sys.stderr, flush=True)
                raise Preempted(guard.signum, step, message)
        if window:
            bad = flush_window(step)
            if bad is not None and config.on_nonfinite == "rollback":
                state = rollback(bad, step)

        # --- final evaluation and summary -----------------------------------------------
        if ckpt.last_step != step and not save(step, state, val if val_step == step else None):
            raise NonFiniteError(f"the final state holds non-finite values "
                                 f"({first_nonfinite(state_tree(get(state)))}); not saved")
        test = run_eval(state, dataset.test, eval_batch)
        val = run_eval(state, dataset.val, eval_batch, placed=val_placed)
        write(step, "test", test)
        ckpt.wait()
    finally:
        inputs.close()  # stops the prefetch thread even when the run failed
        guard.restore()
        profiler.close()
        progress.close()
        if held:  # a run that stops early still leaves its best on disk (held: one process)
            held_step = held[0][0]
            try:
                write_held()
            except Exception as e:  # noqa: BLE001 (the run's own error is the one to raise)
                print(f"warning: the best checkpoint of step {held_step} was not written: {e}",
                      file=sys.stderr, flush=True)
        ckpt.close()
        out.close()

    summary = {
        **_final_figures(test, val, seeds),
        "train_steps_per_sec": steady_steps / steady_time if steady_time else float("nan"),
        "wall_seconds": time.perf_counter() - t_start,
        "num_devices": strategy.num_devices,
        "strategy": strategy.kind,
        "steps": step,
        "resumed_from_step": start_step if resumed is not None else None,
        "epochs": config.epochs,
        "global_batch_size": config.batch_size,
        "steps_per_call": steps_per_call,
    }
    if seeded:
        summary["seeds"] = seeds
        summary["seed_parallel"] = bool(config.seed_parallel)
        summary["seed_chunk"] = seed_chunk
    if is_main:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def dry_run(
    config: TrainConfig, strategy: Strategy, dataset: data_lib.Dataset, seeds: list[int],
    resident: bool, host_state: TrainState,
) -> dict[str, Any]:
    """``--dry-run``: compiles the train step as the loop would (same strategy, seeds,
    data placement) and prints parameter count, FLOPs per step and memory per device.
    Trains nothing and writes nothing. Returns the figures."""
    from jaxtrain.profiling import (
        compiled_stats,
        format_dry_run,
        model_flops,
        param_bytes,
        param_count,
    )

    update_fn = make_update(config, resident=resident)
    pid = jax.process_index()
    n_train = len(dataset.train["label"])
    seeded = len(seeds) > 1
    placement = SeedPlacement(strategy, config.seed_parallel) if seeded else None
    rows = data_lib.process_rows(config.batch_size, whole=seeded and placement.seed_parallel)
    idx = np.stack([data_lib.batch_indices(s, 0, n_train, config.batch_size)[rows] for s in seeds])
    if seeded:
        put_state, put_batch, put_shared = placement.put_seeds, placement.put_batch, placement.put_shared
        key = put_state(stack([step_key(s) for s in seeds]))
    else:
        idx = idx[0]
        put_state = put_shared = strategy.replicate
        put_batch = strategy.shard
        update = strategy.compile(update_fn, donate_argnums=(0,))
        key = put_state(step_key(config.seed))
    state = put_state(host_state)
    if resident:
        args = (state, put_shared(dataset.train), put_batch(idx), key)
    else:
        args = (state, put_batch({k: v[idx] for k, v in dataset.train.items()}), key)
    seed_chunk = None
    if seeded:
        compiled, seed_chunk = compile_seeded(
            placement, update_fn, args, num_seeds=len(seeds), seed_chunk=config.seed_chunk,
            resident=resident, log=print if pid == 0 else None)
    else:
        compiled = update.lower(*args).compile()
    stats = compiled_stats(compiled)
    # one model's step over the global batch, as written (the compiled analysis above
    # counts cuDNN convolutions as 0 on a GPU, and partitioned or vmapped work per device)
    one_state = jax.tree.map(lambda x: x[0], host_state) if seeded else host_state
    gidx = data_lib.batch_indices(seeds[0], 0, n_train, config.batch_size)
    one_data = (dataset.train, gidx) if resident else ({k: v[gidx] for k, v in
                                                        dataset.train.items()},)
    flops_model = model_flops(update_fn, one_state, *one_data, step_key(seeds[0]))
    device = next(d for d in strategy.devices if d.process_index == jax.process_index())
    memory = (device.memory_stats() or {}) if hasattr(device, "memory_stats") else {}
    report = {
        "dry_run": True,
        "model": config.model,
        "dataset": dataset.name,
        "image_shape": list(dataset.image_shape),
        "global_batch_size": config.batch_size,
        "num_seeds": len(seeds),
        "seed_chunk": seed_chunk,
        "strategy": strategy.kind,
        "num_devices": strategy.num_devices,
        "device_kind": device.device_kind,
        "params": param_count(host_state.params) // len(seeds),
        "param_bytes": param_bytes(host_state.params) // len(seeds),
        "flops_per_device": stats["flops"],
        "flops_per_step": stats["flops"] * strategy.num_devices,
        "model_flops_per_step": flops_model,
        "device_memory_bytes": memory.get("bytes_limit"),
        **{k: v for k, v in stats.items() if k != "flops"},
    }
    if pid == 0:
        print(format_dry_run(report), flush=True)
    return report
