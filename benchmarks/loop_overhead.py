"""Loop overhead: ``train_and_evaluate``'s steady-state steps/s against a bare ``for``
loop calling the same compiled update on the same pre-placed batches.

    python -m benchmarks.loop_overhead                  # digits_mlp's defaults, 3 repeats
    python -m benchmarks.loop_overhead --repeats 5 -- --model cnn --dataset synthetic

Both sides run in this process, interleaved (loop, bare, loop, bare, ...), so load
from other processes hits them alike; the figure is the ratio of medians
(target: the loop within 5%, ratio >= 0.95). The loop's figure is its own
``summary["train_steps_per_sec"]`` (first step and evaluations excluded); the
bare loop builds the update exactly as the loop does (``make_update`` compiled
by the same strategy, state donated, data on the device when the loop puts it
there), places every step's input before the clock starts and times steps
2..N with one sync at the end. ``--breakdown`` also times the loop's per-step
host work alone (batch indices, placement, prefetch queue, window append).
Writes ``benchmarks/results/loop_overhead_<platform>.json``.
"""

from __future__ import annotations

import json
import os
import queue
import statistics
import sys
import tempfile
import threading
import time
from typing import Any

from benchmarks import common


def _config(argv: list[str]):
    from experiments import digits_mlp
    from jaxtrain.config import parse_config

    config = parse_config(digits_mlp.Config, digits_mlp.DEFAULTS, argv, "loop_overhead")
    if config.num_seeds > 1 or config.steps_per_call > 1:
        raise SystemExit("error: loop_overhead compares single-seed, one-step-per-call runs")
    return config.replace(steps_per_call=1)  # not auto: the bare loop calls one step at a time


def _setup(config):
    """What the loop builds before its first step: strategy, data, state, compiled update."""
    from jaxtrain import data as data_lib
    from jaxtrain import loop, program
    from jaxtrain.parallel import create_strategy

    strategy = create_strategy(config.parallel, config.devices)
    dataset = data_lib.load_dataset(
        config.dataset, val_fraction=config.val_fraction, data_dir=config.data_dir,
        synthetic_size=config.synthetic_size, synthetic_shape=tuple(config.synthetic_shape),
        synthetic_classes=config.synthetic_classes,
    )
    n = len(dataset.train["label"])
    total = config.epochs * data_lib.steps_per_epoch(n, config.batch_size)
    resident = config.data_placement == "device" or (
        config.data_placement == "auto"
        and dataset.train["image"].nbytes <= loop.DEVICE_DATA_BYTES
    )
    host_state = program.build_model_and_state(config, dataset, total)
    update = strategy.compile(program.make_update(config, resident=resident), donate_argnums=(0,))
    return strategy, dataset, n, total, resident, host_state, update


def bare_loop(config) -> dict[str, Any]:
    """Steps/s of ``for x in inputs: state, m = update(state, ..., x, key)``."""
    import jax

    from jaxtrain import data as data_lib
    from jaxtrain import program

    strategy, dataset, n, total, resident, host_state, update = _setup(config)
    state = strategy.replicate(host_state)
    key = strategy.replicate(program.step_key(config.seed))
    idx = [data_lib.batch_indices(config.seed, s, n, config.batch_size) for s in range(total)]
    if resident:
        data = strategy.replicate(dataset.train)
        inputs = [strategy.shard(i) for i in idx]

        def call(st, x):
            return update(st, data, x, key)
    else:
        inputs = [strategy.shard(data_lib.take(dataset.train, i)) for i in idx]

        def call(st, x):
            return update(st, x, key)
    jax.block_until_ready(inputs)
    state, metrics = call(state, inputs[0])  # compiles
    jax.block_until_ready(state)
    c0, t0 = common.cpu_seconds(), time.perf_counter()
    for x in inputs[1:]:
        state, metrics = call(state, x)
    jax.block_until_ready((state, metrics))
    seconds, cpu = time.perf_counter() - t0, common.cpu_seconds() - c0
    return {"steps": total - 1, "seconds": seconds, "steps_per_sec": (total - 1) / seconds,
            "cpu_s_per_step": cpu / (total - 1), "resident": resident}


class _Clock:
    """A metric writer that notes process CPU seconds at every write: the loop's train
    lines end its steady-state windows, its train/val lines start the next one."""

    def __init__(self):
        self.events: list[tuple[str, int, float]] = []

    def write(self, step, split, metrics):
        self.events.append((split, int(step), common.cpu_seconds()))

    def close(self):
        pass

    def cpu_per_step(self) -> float:
        cpu, steps, prev = 0.0, 0, None
        for split, step, t in self.events:
            if split == "train" and prev is not None:  # from the last write to this flush
                cpu += t - prev[1]
                steps += step - prev[0]
            if split in ("train", "val"):
                prev = (step, t)
        return cpu / steps if steps else float("nan")


def loop_run(config, workdir: str) -> dict[str, Any]:
    from jaxtrain.loop import train_and_evaluate

    clock = _Clock()
    summary = train_and_evaluate(config, workdir, writer=clock)
    return {"steps": summary["steps"], "steps_per_sec": summary["train_steps_per_sec"],
            "cpu_s_per_step": clock.cpu_per_step(), "wall_seconds": summary["wall_seconds"],
            "test_accuracy": summary["test_accuracy"]}


def breakdown(config, steps: int = 2000) -> dict[str, float]:
    """Microseconds per step of the loop's host work, each part timed alone (no training)."""
    import jax

    from jaxtrain import data as data_lib
    from jaxtrain.parallel import create_strategy, prefetch

    strategy = create_strategy(config.parallel, config.devices)
    dataset = data_lib.load_dataset(config.dataset, val_fraction=config.val_fraction)
    n = len(dataset.train["label"])
    b = config.batch_size
    out: dict[str, float] = {}

    def per_step(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) / steps * 1e6

    out["batch_indices_us"] = per_step(
        lambda: [data_lib.batch_indices(config.seed, s, n, b) for s in range(steps)])
    idx = data_lib.batch_indices(config.seed, 0, n, b)
    placed = [strategy.shard(idx)]
    out["place_indices_us"] = per_step(lambda: placed.extend(strategy.shard(idx)
                                                             for _ in range(steps)))
    jax.block_until_ready(placed)
    out["take_host_batch_us"] = per_step(
        lambda: [data_lib.take(dataset.train, idx) for _ in range(steps)])
    out["prefetch_queue_us"] = per_step(lambda: list(prefetch(iter(range(steps)), lambda x: x)))
    window: list[Any] = []
    m = {"loss": jax.numpy.zeros(())}
    out["window_append_us"] = per_step(lambda: [window.append(m) for _ in range(steps)])
    q: queue.Queue = queue.Queue(maxsize=2)
    threading.Thread(target=lambda: [q.put(i) for i in range(steps)], daemon=True).start()
    out["bare_queue_us"] = per_step(lambda: [q.get() for _ in range(steps)])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = common.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--breakdown", action="store_true",
                        help="also time the loop's per-step host work alone")
    args, rest = parser.parse_known_args(argv)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    if args.smoke:
        rest = ["--epochs", "2", *rest]
        args.repeats = 1
    config = _config([*rest]).replace(progress="none")
    info = common.machine_info(args.note)
    loops, bares = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            cfg = config.replace(workdir=os.path.join(tmp, f"run{r}"), resume="never")
            loops.append(loop_run(cfg, cfg.workdir))
            bares.append(bare_loop(cfg))
            print(f"repeat {r}: loop {loops[-1]['steps_per_sec']:.1f} steps/s "
                  f"({loops[-1]['cpu_s_per_step'] * 1e6:.0f} us CPU/step), "
                  f"bare {bares[-1]['steps_per_sec']:.1f} steps/s "
                  f"({bares[-1]['cpu_s_per_step'] * 1e6:.0f} us CPU/step)", flush=True)
    loop_sps = statistics.median(x["steps_per_sec"] for x in loops)
    bare_sps = statistics.median(x["steps_per_sec"] for x in bares)
    payload: dict[str, Any] = {
        "config": config.to_dict(),
        "loop_steps_per_sec": [x["steps_per_sec"] for x in loops],
        "bare_steps_per_sec": [x["steps_per_sec"] for x in bares],
        "loop_median": loop_sps,
        "bare_median": bare_sps,
        "ratio_loop_over_bare": loop_sps / bare_sps,
        "per_repeat_ratio": [a["steps_per_sec"] / b["steps_per_sec"]
                             for a, b in zip(loops, bares, strict=True)],
        # Process CPU seconds per steady-state step (all threads): steadier than wall
        # time on a shared machine. bare/loop is the loop's efficiency in CPU terms.
        "loop_cpu_us_per_step": [x["cpu_s_per_step"] * 1e6 for x in loops],
        "bare_cpu_us_per_step": [x["cpu_s_per_step"] * 1e6 for x in bares],
        "cpu_ratio_bare_over_loop": statistics.median(x["cpu_s_per_step"] for x in bares)
        / statistics.median(x["cpu_s_per_step"] for x in loops),
        "steps": loops[0]["steps"],
        "resident": bares[0]["resident"],
        "test_accuracy": [x["test_accuracy"] for x in loops],
    }
    if args.breakdown:
        payload["host_work_us_per_step"] = breakdown(config)
    common.print_table(
        f"loop overhead ({info['device']}, load {info['load_average_1m']:.1f})",
        ["side", "median steps/s", "per repeat"],
        [["loop", loop_sps, " ".join(f"{v:.0f}" for v in payload["loop_steps_per_sec"])],
         ["bare", bare_sps, " ".join(f"{v:.0f}" for v in payload["bare_steps_per_sec"])]],
    )
    print(f"ratio loop/bare = {payload['ratio_loop_over_bare']:.3f} (target >= 0.95); "
          f"CPU per step bare/loop = {payload['cpu_ratio_bare_over_loop']:.3f}")
    if args.breakdown:
        for k, v in payload["host_work_us_per_step"].items():
            print(f"  {k}: {v:.1f} us")
    tag = args.tag or common.result_tag(info) + ("-smoke" if args.smoke else "")
    args.tag = tag
    path = os.path.join(args.out, f"loop_overhead_{tag}.json")
    os.makedirs(args.out, exist_ok=True)
    doc = {"benchmark": "loop_overhead", "command": common.command_line(),
           "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "smoke": bool(args.smoke),
           "machine": info, **payload}
    with open(path, "w") as f:
        json.dump(doc, f, indent=2, default=str)
        f.write("\n")
    print(f"wrote {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
