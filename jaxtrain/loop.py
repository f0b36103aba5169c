"""``train_and_evaluate``: the one place with I/O, progress and checkpoint cadence.

Reads top to bottom: data, devices, model and state, checkpoint, compiled steps,
the training loop, final evaluation and summary. Its parts live in their own
modules: ``cpu_devices`` (``--cpu-devices``), ``program`` (state, update, keys,
placement), ``fusing`` (K steps per call), ``evaluation``, ``nonfinite``
(``--on-nonfinite``), ``saving`` (checkpoint cadence), ``resume``, ``preemption``,
``dry_run`` and ``workdir_lock`` (one run at a time in a workdir).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxtrain import data as data_lib
from jaxtrain import distributed, workdir_lock
from jaxtrain.checkpoint import Checkpointer, snapshot, state_tree
from jaxtrain.config import ConfigError, TrainConfig, check_paths
from jaxtrain.cpu_devices import (
    local_cpu_device_count,
    resolve_cpu_devices,
    seeds_on_auto_devices,
    use_cpu_devices,
)
from jaxtrain.evaluation import eval_inputs, evaluate
from jaxtrain.fusing import (
    auto_steps_per_call,
    call_boundaries,
    call_plan,
    fuse_steps,
    fusing_needs,
)
from jaxtrain.manifest import build_manifest
from jaxtrain.nonfinite import NonFiniteError, TrainWindow, nonfinite_message
from jaxtrain.parallel import check_processes, create_strategy, prefetch
from jaxtrain.preemption import Preempted, PreemptionGuard
from jaxtrain.profiling import StepProfiler
from jaxtrain.program import (
    build_model_and_state,
    make_update,
    placement,
    setup_compilation_cache,
    step_keys,
)
from jaxtrain.resume import check_shared_workdir, drop_records_after, resume_point
from jaxtrain.saving import Saves
from jaxtrain.seeds import check_seed_strategy, compile_seeded, seed_list, vmap_eval
from jaxtrain.steps import eval_step
from jaxtrain.writers import MetricWriter, MultiWriter, Progress, create_writers, write_json

__all__ = ["NonFiniteError", "Preempted", "train_and_evaluate"]

# Datasets up to this many bytes per split live on the devices (batches are
# gathered inside the compiled step); larger ones stream from host memory.
DEVICE_DATA_BYTES = 1 << 30


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

    # Joins a multi-process run (flags or SLURM / Open MPI) before anything touches a
    # device, and before the checks that may fail on one host only, so that the others
    # learn of it (``start_together``) instead of waiting for it in a collective.
    group = distributed.detect(config.coordinator_address, config.num_processes,
                               config.process_id)  # flags or SLURM / Open MPI
    check_processes(config.parallel, group.num_processes if group else 1)
    # (hold_interrupt: start_together raises a Ctrl-C, telling the others)
    distributed.initialize(config.coordinator_address, config.num_processes, config.process_id,
                           hold_interrupt=True, peer_timeout_s=config.peer_timeout)
    with distributed.start_together():
        check_paths(config)  # read-only: a bad --workdir fails before anything is written

        # --- data (host arrays only: before the devices, whose count auto takes from them)
        dataset = data_lib.load_dataset(
            config.dataset,
            val_fraction=config.val_fraction,
            data_dir=config.data_dir,
            synthetic_size=config.synthetic_size,
            synthetic_shape=tuple(config.synthetic_shape),
            synthetic_classes=config.synthetic_classes,
        )
        resident = config.data_placement == "device" or (
            config.data_placement == "auto"
            and dataset.train["image"].nbytes <= DEVICE_DATA_BYTES
        )

        # --- devices -------------------------------------------------------------------
        cpu_devices = resolve_cpu_devices(config, dataset.image_shape, resident)
        use_cpu_devices(cpu_devices, strict=bool(config.cpu_devices))
    distributed.check_same_flags(config)
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
        from jaxtrain.dry_run import dry_run

        return dry_run(config, strategy, dataset, seeds, resident, host_state)
    profiler = StepProfiler(os.path.join(workdir, "profile"), config.profile_steps,
                            total_steps=total_steps)
    # Checkpoints are numbered by data position (batches consumed); that equals
    # state.step (optimizer steps, which key per-step randomness) until a rollback.
    base_key = step_keys(seeds)
    # one run at a time in a workdir: from the checkpoint search to summary.json
    with workdir_lock.hold(workdir):
        check_shared_workdir(workdir)
        resumed = resume_point(config, workdir, {**state_tree(host_state), "rng": base_key})
        # Every process has looked for checkpoints before any creates the folder below.
        distributed.sync("jaxtrain:resume-point")
        start_step, resumed_meta = 0, {}
        if resumed is not None:
            host_state = host_state.replace(**{k: v for k, v in resumed.tree.items() if k != "rng"})
            base_key, resumed_meta = resumed.tree["rng"], resumed.meta
            start_step = int(resumed_meta["step"])
        if start_step == total_steps and (done := finished_summary(workdir, total_steps)):
            if writer is not None:  # the loop owns it, as it does on every other way out
                writer.close()
            if is_main:
                print(f"{workdir} holds this run, finished at step {total_steps}: nothing to do "
                      "(its files are left as they are; a new --workdir trains again)", flush=True)
            return done
        os.makedirs(workdir, exist_ok=True)
        if is_main:  # a fresh start drops an earlier attempt's records (it left no checkpoint)
            drop_records_after(os.path.join(workdir, "metrics.jsonl"), start_step)
        best_mode = config.best_mode
        if best_mode == "auto":
            best_mode = "min" if config.best_metric.endswith("loss") else "max"
        # every resource below is released when the run ends, however it ends
        with contextlib.ExitStack() as cleanup:
            cleanup.callback(profiler.close)  # stops a trace left running
            ckpt = Checkpointer(workdir, keep=config.keep_checkpoints,
                                best_metric=config.best_metric, best_mode=best_mode)
            cleanup.callback(ckpt.close)

            # --- files -----------------------------------------------------------------------
            writers: list[MetricWriter] = []
            if is_main:
                manifest = build_manifest(config, strategy, dataset)
                manifest["data"]["resident"] = resident
                manifest["steps_per_call"] = steps_per_call
                manifest["cpu_devices"] = local_cpu_device_count()
                with open(os.path.join(workdir, "config.json"), "w") as f:
                    json.dump(manifest, f, indent=2)
                writers.extend(create_writers(config, workdir, resume_step=start_step))
            if writer is not None:
                writers.append(writer)
            out = MultiWriter(writers)
            cleanup.callback(out.close)

            # --- compiled steps --------------------------------------------------------------
            update_fn = make_update(config, resident=resident)
            place = placement(strategy, len(seeds), config.seed_parallel)
            key = place.state(base_key)
            put_batch = place.batch
            seed_chunk = None
            if not seeded:
                update = strategy.compile(update_fn, donate_argnums=(0,))
                evaluate_fn = strategy.compile(eval_step)
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
            state = place.state(host_state)
            # seed-parallel devices hold whole models: each process feeds its own seeds
            # whole batches
            indices = place.indices(seeds, n_train, config.batch_size)

            train_data = place.shared(dataset.train) if resident else None
            if seeded:  # compiled ahead of time: the memory it needs picks the seed chunk
                first = indices(start_step)
                data0 = ((train_data, put_batch(first)) if resident else
                         (put_batch({k: v[first] for k, v in dataset.train.items()}),))
                sample = (state, *data0, key)
                update, seed_chunk = compile_seeded(
                    place.seeds, update_fn, sample, num_seeds=len(seeds),
                    seed_chunk=config.seed_chunk, resident=resident,
                    log=print if is_main else None)
                evaluate_fn = place.seeds.compile(vmap_eval(eval_step, chunk=seed_chunk),
                                                  shared_argnums=(1,))

            def stacked(fn, first: int, n: int):
                """One step's input (``K == 1``), or ``K`` steps' stacked on a leading ``[K]``
                axis: the call's ``n``, then the last one's again as padding (``fuse_steps``
                runs ``n``)."""
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
            cleanup.callback(inputs.close)  # stops the prefetch thread even when the run fails

            def call(st, x):
                """One compiled call of ``x[0]`` steps on ``x[1]`` (indices, or the host batch)."""
                data = (train_data, x[1]) if resident else (x[1],)
                if fused is None:
                    return update(st, *data, key)
                return fused(st, *data, np.int32(x[0]), key)

            run_eval = functools.partial(evaluate, place.eval, place.get, evaluate_fn,
                                         whole=place.whole)
            # the validation batches, placed once, when the training data sits on the devices too
            val_placed = (list(eval_inputs(place.eval, dataset.val, eval_batch, place.whole))
                          if resident else None)

            # --- loop ------------------------------------------------------------------------
            progress = Progress(config.progress, total_steps, start_step, is_main)
            cleanup.callback(progress.close)
            eval_every = config.eval_every or per_epoch
            window = TrainWindow(config.on_nonfinite, config.max_skipped, place.get, seeded=seeded,
                                 skipped_in_a_row=int(resumed_meta.get("skipped_in_a_row", 0)),
                                 restored=resumed_meta.get("train_window", ()))
            initial = {**state_tree(host_state), "rng": base_key}  # rollback before any checkpoint
            saves = Saves(
                ckpt, config, best_mode=best_mode, per_epoch=per_epoch,
                snapshot=jax.jit(snapshot) if seeded else strategy.compile(snapshot), get=place.get,
                key=key, initial=initial, start_step=start_step, window=window,
                restore=lambda tree: place.state(
                    host_state.replace(**{k: v for k, v in tree.items() if k != "rng"})))
            cleanup.callback(saves.finish)  # a run that stops early still leaves its held best
            steady_time, steady_steps, t_first = 0.0, 0, None

            def write(step: int, split: str, metrics: dict[str, Any]) -> None:
                """One line per split, or per seed (with a ``seed`` field) for seed runs."""
                if not seeded:
                    out.write(step, split, {k: float(v) for k, v in metrics.items()})
                    return
                for i, s in enumerate(seeds):
                    out.write(step, split, {
                        "seed": s,
                        **{k: float(np.broadcast_to(v, (len(seeds),))[i])
                           for k, v in metrics.items()}})

            def flush(step: int, state) -> Any:
                """Writes the window's train metrics and applies ``--on-nonfinite`` (the one host
                sync); returns the state to go on with (a rollback's, after a non-finite step)."""
                mean, n, bad = window.flush(step, lambda bad, m: nonfinite_message(
                    place.get(state), dataset.train, seeds, config.batch_size, bad, m))
                write(step, "train", mean)
                progress.update(step, n, "train",
                                {k: float(np.mean(mean[k])) for k in ("loss", "accuracy")})
                if bad is not None and config.on_nonfinite == "rollback":
                    return saves.rollback(bad, step)
                return state

            guard = PreemptionGuard(jax.process_count()).install()
            cleanup.callback(guard.restore)
            step = start_step
            val, val_step = None, None
            t_mark, since_mark = time.perf_counter(), 0
            for calls, x in enumerate(inputs):
                state, metrics = profiler.run(step, call, state, x, n=x[0])
                n = x[0]  # steps in this call (call_plan never crosses an eval or checkpoint step)
                window.add(n, metrics)
                step += n
                if t_first is None:  # the first step compiles: keep it out of the steady state
                    jax.block_until_ready(state)
                    t_first = t_mark = time.perf_counter()
                else:
                    since_mark += n
                eval_due = step % eval_every == 0 or step == total_steps
                ckpt_due = bool(config.checkpoint_every) and step % config.checkpoint_every == 0
                log_due = step // config.log_every != (step - n) // config.log_every
                # a preemption between these saves the window unflushed (Saves, TrainWindow)
                if eval_due or ckpt_due or log_due:
                    state = flush(step, state)
                    steady_time += time.perf_counter() - t_mark
                    steady_steps += since_mark
                    if eval_due:
                        val = run_eval(state, dataset.val, eval_batch, placed=val_placed)
                        val_step = step
                        write(step, "val", val)
                        progress.note(f"step {step} val: loss={np.mean(val['loss']):.4f} "
                                      f"accuracy={np.mean(val['accuracy']):.4f}")
                    if step != total_steps and ckpt_due:
                        state = saves.checkpoint(step, state, val if val_step == step else None)
                    elif step != total_steps and eval_due and saves.improves_best(val):
                        state = saves.checkpoint(step, state, val, best=True)
                    t_mark, since_mark = time.perf_counter(), 0
                if guard.due(calls):  # save at this step boundary, then exit
                    saved = saves.at_preemption(step, state)
                    signame = signal.Signals(guard.signum).name
                    message = f"preempted by {signame} at step {step}: " + (
                        f"checkpoint saved in {ckpt.directory}; rerun the same command to resume"
                        if saved else "the state is not finite, so no checkpoint was saved")
                    print(message, file=sys.stderr, flush=True)
                    raise Preempted(guard.signum, step, message)
            if window:
                state = flush(step, state)

            # --- final evaluation and summary -----------------------------------------------
            saves.final(step, state, val if val_step == step else None)
            test = run_eval(state, dataset.test, eval_batch)
            val = run_eval(state, dataset.val, eval_batch, placed=val_placed)
            write(step, "test", test)
            saves.wait()

        summary = {
            **_final_figures(test, val, seeds),
            # None (null) when no call ran after the first, which compiles (e.g. one fused call)
            "train_steps_per_sec": steady_steps / steady_time if steady_steps else None,
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
            write_json(os.path.join(workdir, "summary.json"), summary)
        return summary


def finished_summary(workdir: str, total_steps: int) -> dict[str, Any] | None:
    """The ``summary.json`` of a run that already finished in ``workdir`` (resumed at its
    last step), or None: then the run still owes its final evaluation and summary.
    Every process must see it (a workdir on a filesystem they share), or none uses it."""
    path = os.path.join(workdir, "summary.json")
    try:
        with open(path, encoding="utf-8") as f:
            summary = json.load(f)
        ok = isinstance(summary, dict) and summary.get("steps") == total_steps
    except (OSError, ValueError):
        summary, ok = None, False
    return summary if distributed.agree_min(int(ok)) else None

