"""Checkpoint save cost: how long the training loop is blocked per save, as a ratio of one step.

    python -m benchmarks.checkpoint                       # ResNet-18, CIFAR shape (synthetic)
    python -m benchmarks.checkpoint --batch-size 256      # e.g. on a GPU

The ResNet-18 train state (params, BatchNorm statistics, Adam moments: ~33.5M
float32 values, 134 MB) is saved the way ``train_and_evaluate`` saves it, and
side by side with two baselines, all in one process on one device:

- ``jaxtrain``: ``saving.Saves.save``'s path: a compiled snapshot (a device copy of the
  state plus one finiteness flag), then ``Checkpointer.save``, which returns at
  once; the device-to-host copy, CRC32 per leaf and the Orbax write run on a
  background thread.
- ``orbax-async``: ``ocp.CheckpointManager`` with Orbax's own asynchronous
  saving, handed the device arrays (Orbax copies them to host before returning).
- ``sync``: host copy and a synchronous Orbax save (the loop blocks for all of it).

Each save comes after the loop's usual host sync (the state of the last step is
ready), with ``--steps-between`` train steps between saves so the previous write
can finish; the stall is the wall time from the start of the save call until the
loop could dispatch the next step. The table also gives the mean time of the
steps taken while a background write was running, against clean steps.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

from benchmarks import common


def _state_bytes(tree: Any) -> int:
    import jax

    return int(sum(x.nbytes for x in jax.tree.leaves(tree)))


def run(args) -> dict[str, Any]:
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    from jaxtrain import data as data_lib
    from jaxtrain import program
    from jaxtrain.checkpoint import Checkpointer, snapshot, state_tree
    from jaxtrain.config import TrainConfig

    config = TrainConfig(
        model=args.model, dataset="synthetic", synthetic_shape=(32, 32, 3),
        synthetic_size=max(4 * args.batch_size, 512), batch_size=args.batch_size,
        schedule="constant", epochs=1, compilation_cache="",
    )
    dataset = data_lib.load_dataset(
        "synthetic", synthetic_size=config.synthetic_size, synthetic_shape=(32, 32, 3)
    )
    n_train = len(dataset.train["label"])
    device = jax.devices()[0]
    state = jax.device_put(program.build_model_and_state(config, dataset, 10_000), device)
    train = jax.device_put(dataset.train, device)
    key = jax.device_put(program.step_key(0), device)
    idxs = [jax.device_put(data_lib.batch_indices(0, s, n_train, args.batch_size), device)
            for s in range(4)]
    update = jax.jit(program.make_update(config, resident=True), donate_argnums=(0,))
    take_snapshot = jax.jit(snapshot)
    tree_bytes = _state_bytes(state_tree(state))

    counter = {"i": 0}

    def step(st):
        counter["i"] += 1
        st, _ = update(st, train, idxs[counter["i"] % len(idxs)], key)
        return st

    print(f"... compiling {args.model} batch {args.batch_size} on {device.device_kind}",
          flush=True)
    t0 = time.perf_counter()
    state = jax.block_until_ready(step(state))
    copy, finite = take_snapshot(state_tree(state))
    jax.block_until_ready((copy, finite))
    compile_s = time.perf_counter() - t0
    del copy

    clean = []
    for _ in range(args.clean_steps):
        t0 = time.perf_counter()
        state = jax.block_until_ready(step(state))
        clean.append(time.perf_counter() - t0)
    step_s = statistics.median(clean)
    print(f"... one step: {step_s:.3f} s (median of {len(clean)})", flush=True)

    root = tempfile.mkdtemp(prefix="ckpt-bench-")
    meta = {"config": config.to_dict(), "step": 0}

    def jaxtrain_saver():
        ckpt = Checkpointer(f"{root}/jaxtrain", keep=2)

        def save(step_no, st):
            copy, finite = take_snapshot(state_tree(st))
            if not np.all(finite):  # the loop's host sync on one flag
                raise RuntimeError("state not finite")
            ckpt.save(step_no, lambda: jax.tree.map(np.asarray, copy), {**meta, "step": step_no})

        return save, ckpt.wait, ckpt.close

    def orbax_async_saver():
        mgr = ocp.CheckpointManager(
            f"{root}/orbax-async", item_names=("state", "meta"),
            options=ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=True),
        )

        def save(step_no, st):
            mgr.save(step_no, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state_tree(st)),
                meta=ocp.args.JsonSave({**meta, "step": step_no})))

        return save, mgr.wait_until_finished, mgr.close

    def sync_saver():
        mgr = ocp.CheckpointManager(
            f"{root}/sync", item_names=("state", "meta"),
            options=ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False),
        )

        def save(step_no, st):
            host = jax.tree.map(np.asarray, state_tree(st))
            mgr.save(step_no, args=ocp.args.Composite(
                state=ocp.args.StandardSave(host),
                meta=ocp.args.JsonSave({**meta, "step": step_no})))

        return save, mgr.wait_until_finished, mgr.close

    methods = {"jaxtrain": jaxtrain_saver, "orbax-async": orbax_async_saver, "sync": sync_saver}
    results = []
    try:
        for name, make in methods.items():
            save, wait, close = make()
            stalls, during, committed = [], [], []
            for i in range(args.saves + 1):  # the first save of each method is a warm-up
                jax.block_until_ready(state)  # the loop's flush: last step's metrics are on host
                t0 = time.perf_counter()
                save(i + 1, state)
                stall = time.perf_counter() - t0
                for _ in range(args.steps_between):
                    t1 = time.perf_counter()
                    state = jax.block_until_ready(step(state))
                    if i:
                        during.append(time.perf_counter() - t1)
                wait()  # normally overlapped with the steps; waited here so the next save is clean
                if i:
                    stalls.append(stall)
                    committed.append(time.perf_counter() - t0)
            close()
            row = {
                "method": name,
                "stall_s_median": statistics.median(stalls),
                "stall_s_max": max(stalls),
                "stall_s": stalls,
                "stall_per_step": statistics.median(stalls) / step_s,
                "committed_after_s_median": statistics.median(committed),
                "step_s_during_write_mean": statistics.mean(during),
                "step_slowdown_during_write": statistics.mean(during) / statistics.mean(clean),
            }
            results.append(row)
            print(f"... {name}: stall {row['stall_s_median']:.3f} s "
                  f"= {row['stall_per_step']:.3f} step", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"model": args.model, "batch_size": args.batch_size, "state_bytes": tree_bytes,
            "param_count": int(sum(np.size(x) for x in jax.tree.leaves(state.params))),
            "compile_s": compile_s, "step_s_median": step_s, "step_s": clean,
            "saves_per_method": args.saves, "steps_between_saves": args.steps_between,
            "results": results}


def parse_args(argv):
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--batch-size", type=int, default=None,
                   help="global batch (default: 128; 32 on CPU, where a step takes seconds)")
    p.add_argument("--saves", type=int, default=4, help="timed saves per method (after 1 warm-up)")
    p.add_argument("--steps-between", type=int, default=2, help="train steps between saves")
    p.add_argument("--clean-steps", type=int, default=5, help="steps timed without any save")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    info = common.machine_info(args.note)
    if args.batch_size is None:
        args.batch_size = 32 if info["platform"] == "cpu" else 128
    if args.smoke:
        args.model, args.batch_size, args.saves, args.clean_steps = "cnn", 8, 1, 2
    out = run(args)
    rows = [[r["method"], r["stall_s_median"], r["stall_s_max"], r["stall_per_step"],
             r["committed_after_s_median"], r["step_slowdown_during_write"]]
            for r in out["results"]]
    common.print_table(
        f"save stall, {out['model']} state {out['state_bytes'] / 2**20:.0f} MiB, batch "
        f"{out['batch_size']}, one step {out['step_s_median']:.3f} s, on {info['device']}",
        ["method", "stall_s", "stall_max_s", "stall/step", "committed_after_s",
         "step_slowdown"],
        rows,
    )
    common.write_results("checkpoint", args, info, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
