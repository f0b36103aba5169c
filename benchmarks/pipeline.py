"""Input pipeline on vs off: is feeding data the bottleneck?

    python -m benchmarks.pipeline
    python -m benchmarks.pipeline --cases mlp:digits,cnn:mnist,resnet18:cifar   # GPU

Per case, in one process, the same compiled training step is timed three ways,
alternating between them each repeat:

- ``host``: batches gathered from host memory on a background thread and
  placed ahead (``parallel.prefetch``), as ``--data-placement host`` does;
- ``device``: the whole split on the device, batch indices prefetched, rows
  gathered inside the compiled step, as ``--data-placement device`` (the
  ``auto`` choice for splits up to ``loop.DEVICE_DATA_BYTES``);
- ``synthetic``: one batch already on the device, reused every step (no input
  work at all): the ceiling.

A mode within a few percent of ``synthetic`` means the input is not the
bottleneck. ``--loop`` also runs ``train_and_evaluate`` on digits with
``--data-placement host`` and ``device`` and checks they train identically.
"""

from __future__ import annotations

import itertools
import sys
import tempfile
from typing import Any

from benchmarks import common, throughput

MODES = ("host", "device", "synthetic")


def measure_pipeline(case: dict[str, Any]) -> dict[str, Any]:
    """Child: steps/s of the three input modes for one model/data case."""
    import jax
    import numpy as np

    from jaxtrain import data as data_lib
    from jaxtrain import loop, program
    from jaxtrain.parallel import prefetch

    config = throughput.train_config(case)
    dataset = throughput.load(config)
    n = len(dataset.train["label"])
    bs = config.batch_size
    device = jax.devices()[0]
    put = lambda x: jax.device_put(x, device)
    state = put(program.build_model_and_state(config, dataset, 10_000))
    key = put(program.step_key(0))
    train_host = dataset.train
    train_dev = put(dataset.train)
    resident = jax.jit(program.make_update(config, resident=True), donate_argnums=(0,))
    streamed = jax.jit(program.make_update(config, resident=False), donate_argnums=(0,))

    def indices(step):
        return data_lib.batch_indices(0, step, n, bs)

    feeds = {
        "host": prefetch(({k: v[indices(s)] for k, v in train_host.items()}
                          for s in itertools.count()), put),
        "device": prefetch((put(indices(s)) for s in itertools.count()), lambda x: x),
        "synthetic": itertools.repeat(put({k: v[indices(0)] for k, v in train_host.items()})),
    }
    calls = {
        "host": lambda st, x: streamed(st, x, key),
        "device": lambda st, x: resident(st, train_dev, x, key),
        "synthetic": lambda st, x: streamed(st, x, key),
    }

    def stepper(mode):
        feed, call = feeds[mode], calls[mode]
        return lambda st: call(st, next(feed))[0]

    for mode in MODES:  # compile and warm every path
        for _ in range(2):
            state = stepper(mode)(state)
        jax.block_until_ready(state)
    if case.get("steps"):
        steps = int(case["steps"])
    else:
        import time

        t0 = time.perf_counter()
        state = jax.block_until_ready(stepper("synthetic")(state))
        steps = max(2, int(case.get("seconds", 1.0) / max(time.perf_counter() - t0, 1e-6)))
    per_mode: dict[str, list[float]] = {m: [] for m in MODES}
    cpu: dict[str, list[float]] = {m: [] for m in MODES}
    for rep in range(int(case.get("repeats", 3))):
        order = MODES[rep % 3:] + MODES[:rep % 3]
        for mode in order:
            state, t = common.time_steps(stepper(mode), state, steps, 1, jax.block_until_ready)
            per_mode[mode].append(t["best_s_per_step"])
            cpu[mode].append(t["cpu_s_per_step"])
    best = {m: min(v) for m, v in per_mode.items()}
    out = {**case, "steps_timed": steps, "dataset_bytes": int(train_host["image"].nbytes),
           "auto_placement": "device" if train_host["image"].nbytes <= loop.DEVICE_DATA_BYTES
           else "host", "s_per_step": per_mode, "cpu_s_per_step": cpu}
    for m in MODES:
        out[f"{m}_steps_per_s"] = 1.0 / best[m]
        out[f"{m}_vs_synthetic"] = best["synthetic"] / best[m]
    out["params_finite"] = bool(np.all([np.isfinite(np.asarray(x)).all()
                                        for x in jax.tree.leaves(state.params)]))
    return out


def loop_check(case: dict[str, Any]) -> dict[str, Any]:
    """Child: ``train_and_evaluate`` on digits with host and device placement."""
    import numpy as np

    from experiments.digits_mlp import DEFAULTS
    from jaxtrain.checkpoint import load_params
    from jaxtrain.loop import train_and_evaluate

    out, params = {**case}, {}
    for placement in ("host", "device"):
        config = DEFAULTS.replace(epochs=case["epochs"], data_placement=placement,
                                  compilation_cache="", progress="none")
        with tempfile.TemporaryDirectory() as workdir:
            summary = train_and_evaluate(config, workdir)
            params[placement] = load_params(workdir)
        out[placement] = {k: summary[k] for k in ("train_steps_per_sec", "wall_seconds",
                                                  "test_accuracy", "steps")}
    import jax

    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))),
                                         params["host"], params["device"]))
    out["max_abs_param_diff"] = max(diffs)
    out["identical"] = out["max_abs_param_diff"] == 0.0
    return out


def child(case: dict[str, Any]) -> dict[str, Any]:
    return loop_check(case) if case.get("kind") == "loop" else measure_pipeline(case)


def parse_args(argv):
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--cases", type=common.str_list, default=["mlp:digits", "cnn:mnist"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--mlp-batch-size", type=int, default=64)
    p.add_argument("--seconds", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--loop", action=__import__("argparse").BooleanOptionalAction, default=None,
                   help="also compare train_and_evaluate with host vs device placement "
                        "(default: on, off with --smoke)")
    p.add_argument("--epochs", type=int, default=10, help="epochs of the --loop check")
    p.add_argument("--timeout", type=float, default=1800)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return common.child_main(child, args.child)
    info = common.machine_info(args.note)
    results = []
    for spec in args.cases:
        model, _, data = spec.partition(":")
        bs = args.mlp_batch_size if model == "mlp" else args.batch_size
        case = {"model": model, "data": data, "batch_size": bs, "seconds": args.seconds,
                "repeats": args.repeats, "synthetic_size": 4096}
        if args.smoke:
            case.update(batch_size=16, steps=2, repeats=1, synthetic_size=256)
        results.append(common.run_case("benchmarks.pipeline", case, timeout=args.timeout))
    rows = [[r["model"], r["data"], r["batch_size"], r.get("auto_placement"),
             *[r.get(f"{m}_steps_per_s") for m in MODES],
             r.get("host_vs_synthetic"), r.get("device_vs_synthetic"),
             "error" if "error" in r else ""] for r in results]
    common.print_table(
        f"input pipeline on {info['device']}: training steps/s by input mode",
        ["model", "data", "batch", "auto", "host", "device", "synthetic", "host/synth",
         "device/synth", ""], rows)
    payload: dict[str, Any] = {"results": results}
    if args.loop or (args.loop is None and not args.smoke):
        case = {"kind": "loop", "epochs": 1 if args.smoke else args.epochs}
        lc = common.run_case("benchmarks.pipeline", case, timeout=args.timeout)
        payload["loop_check"] = lc
        if "error" not in lc:
            common.print_table(
                f"train_and_evaluate, digits MLP, {case['epochs']} epochs: data placement",
                ["placement", "train_steps/s", "wall_s", "test_acc"],
                [[p, lc[p]["train_steps_per_sec"], lc[p]["wall_seconds"], lc[p]["test_accuracy"]]
                 for p in ("host", "device")])
            print(f"identical parameters: {lc['identical']} "
                  f"(max |diff| {lc['max_abs_param_diff']:.3g})")
    common.write_results("pipeline", args, info, payload)
    failed = any("error" in r for r in results) or "error" in payload.get("loop_check", {})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
