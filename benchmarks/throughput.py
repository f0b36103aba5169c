"""Training throughput: steps/s, images/s, FLOP/s and MFU per model and data shape.

    python -m benchmarks.throughput                      # CPU defaults (small)
    python -m benchmarks.throughput --cases resnet18:cifar --dtypes bfloat16 \\
        --peak-flops 989e12 --batch-size 256             # an H100, bf16 dense peak
    python -m benchmarks.throughput --cases cnn:mnist --steps-per-call 1,8 --rounds 3
                                                         # fused against single steps

Each case runs in its own process (clean peak memory, no cache sharing) and
times the library's own compiled step (``program.make_update`` with the dataset on
the device, batches gathered inside the step, state donated), exactly what
``train_and_evaluate`` runs. FLOPs come from XLA's cost analysis of the step
before optimization (the model's arithmetic, platform independent); MFU is
FLOP/s over ``--peak-flops`` (omitted without it). Data: ``digits`` (8x8x1,
embedded), ``mnist`` (synthetic 28x28x1) and ``cifar`` (synthetic 32x32x3).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

from benchmarks import common

MODELS = ("mlp", "cnn", "resnet18")
DATA = ("digits", "mnist", "cifar")
SHAPES = {"mnist": (28, 28, 1), "cifar": (32, 32, 3)}
DEFAULT_CASES = [f"{m}:{d}" for m in MODELS for d in DATA]


# ----------------------------------------------------------------------------- one case (child)


def train_config(case: dict[str, Any]):
    """The ``TrainConfig`` of a benchmark case (``model``, ``data``, ``batch_size``, ``dtype``)."""
    from jaxtrain.config import TrainConfig

    data = case["data"]
    fields: dict[str, Any] = {
        "model": case["model"],
        "batch_size": case["batch_size"],
        "dtype": case.get("dtype", "float32"),
        "compilation_cache": "",
        "schedule": "constant",
        "epochs": 1,
        "data_placement": case.get("placement", "device"),
    }
    if data == "digits":
        fields["dataset"] = "digits"
    else:
        fields.update(dataset="synthetic", synthetic_shape=SHAPES[data],
                      synthetic_size=case.get("synthetic_size", 2048))
    return TrainConfig(**fields)


def load(config):
    from jaxtrain import data as data_lib

    return data_lib.load_dataset(
        config.dataset, val_fraction=config.val_fraction,
        synthetic_size=config.synthetic_size, synthetic_shape=tuple(config.synthetic_shape),
        synthetic_classes=config.synthetic_classes,
    )


def measure_case(case: dict[str, Any]) -> dict[str, Any]:
    """Times the library's compiled training step for ``case`` in this process.

    ``case``: ``model``, ``data``, ``batch_size``, ``dtype``, ``seconds`` (target wall
    time of one timed repeat), ``repeats``, optional ``steps`` (fixed count),
    ``peak_flops``, ``steps_per_call``, ``parallel`` (``none``, ``mesh`` or ``pmap``
    over ``devices`` devices, 0 = all: the loop's data-parallel step, e.g. over CPU
    cores made devices with ``JAX_NUM_CPU_DEVICES``, as ``--cpu-devices`` does)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxtrain import data as data_lib
    from jaxtrain import fusing, parallel, profiling, program

    t0 = time.perf_counter()
    config = train_config(case)
    dataset = load(config)
    n_train = len(dataset.train["label"])
    bs = config.batch_size
    if n_train < bs:  # small datasets (digits) are tiled so any batch size fits
        reps = -(-bs // n_train)
        dataset.train.update({k: np.concatenate([v] * reps) for k, v in dataset.train.items()})
        n_train *= reps
    k = int(case.get("steps_per_call", 1))
    host_state = state = program.build_model_and_state(config, dataset, 10_000)
    single = program.make_update(config, resident=True)
    update = fusing.fuse_steps(single, k, resident=True) if k > 1 else single
    kind = case.get("parallel", "none")
    strategy = parallel.create_strategy(kind, int(case.get("devices", 0)))
    if k > 1 and (needs := fusing.fusing_needs(strategy.kind, resident=True)):
        raise ValueError(f"steps_per_call {k} needs {needs}")
    strategy.check_batch_size(bs)
    # placed as the loop places them: state, data and key replicated, batch indices sharded
    state = strategy.replicate(state)
    train = strategy.replicate(dataset.train)
    key = strategy.replicate(program.step_key(0))
    fused_n = (np.int32(k),) if k > 1 else ()  # a fused call runs all k (fuse_steps' n)
    shape = (k, bs) if k > 1 else (bs,)
    put = strategy.shard_steps if k > 1 else strategy.shard  # [K, B]: sharded on B
    idxs = [put(np.resize(data_lib.batch_indices(0, s, n_train, bs), shape).astype(np.int32))
            for s in range(4)]
    t_setup = time.perf_counter() - t0

    jitted = strategy.compile(update, donate_argnums=(0,))
    common.wait_turn()  # compile and first call: one turn of a lockstep run
    t0 = time.perf_counter()
    lowered = jitted.lower(state, train, idxs[0], *fused_n, key)
    compiled = lowered.compile()
    if strategy.devices[0].platform == "cpu" and strategy.num_devices > 1:
        compiled = parallel.Throttled(compiled, parallel.CPU_MAX_IN_FLIGHT)  # the CPU hazard
    t_compile = time.perf_counter() - t0
    # FLOPs of one step over the whole batch, from the single-step program as written
    # (cost analysis counts a scan body once), on the host values (before any placement)
    model_flops = profiling.model_flops(single, host_state, dataset.train,
                                        np.resize(data_lib.batch_indices(0, 0, n_train, bs), bs)
                                        .astype(np.int32), program.step_key(0))
    xla_flops = common.compiled_flops(compiled) if k == 1 else None

    counter = {"i": 0}

    def step(st):
        counter["i"] += 1
        st, _ = compiled(st, train, idxs[counter["i"] % len(idxs)], *fused_n, key)
        return st

    t0 = time.perf_counter()
    state, first_metrics = compiled(state, train, idxs[0], *fused_n, key)
    jax.block_until_ready(state)
    t_first = time.perf_counter() - t0
    # loss of the initial parameters on the first batch: equal across layouts, flags and
    # lowerings of the same model (a check that a variant computes the same function)
    first_loss = float(np.ravel(jax.device_get(first_metrics["loss"]))[0])
    if case.get("steps"):
        n = int(case["steps"])
    else:  # as many calls as fit in ``seconds``, judged from one more call (a turn)
        common.wait_turn()
        t0 = time.perf_counter()
        state = jax.block_until_ready(step(state))
        n = max(2, int(case.get("seconds", 2.0) / max(time.perf_counter() - t0, 1e-6)))
    state, timing = common.time_steps(step, state, n, int(case.get("repeats", 3)),
                                      jax.block_until_ready, steps_per_call=k)
    loss_finite = bool(jnp.all(jnp.isfinite(jax.tree.leaves(state.params)[0])))
    s_per_step = timing["best_s_per_step"]
    flops = model_flops or xla_flops
    out: dict[str, Any] = {
        **case,
        "steps_per_call": k,
        "setup_s": t_setup,
        "compile_s": t_compile,
        "first_call_s": t_first,
        "timing": timing,
        "steps_per_s": 1.0 / s_per_step,
        "median_steps_per_s": 1.0 / timing["median_s_per_step"],
        "images_per_s": bs / s_per_step,
        "cpu_s_per_step": timing["cpu_s_per_step"],
        "flops_per_step": flops,
        "xla_compiled_flops_per_step": xla_flops,
        "flops_per_s": flops / s_per_step if flops else None,
        "params_finite": loss_finite,
        "first_loss": first_loss,
        "param_count": int(sum(np.size(x) for x in jax.tree.leaves(host_state.params))),
        "param_dtypes": sorted({str(x.dtype) for x in jax.tree.leaves(host_state.params)}),
        "num_devices": strategy.num_devices,
    }
    peak = case.get("peak_flops")
    out["mfu"] = out["flops_per_s"] / peak if peak and out["flops_per_s"] else None
    return out


# ----------------------------------------------------------------------------- main


def parse_args(argv):
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--cases", type=common.str_list, default=DEFAULT_CASES,
                   help="model:data[:dtype], comma separated (models: mlp,cnn,resnet18 or any "
                        "registry name; data: digits,mnist,cifar; dtype overrides --dtypes)")
    p.add_argument("--dtypes", type=common.str_list, default=["float32"],
                   help="compute dtypes to run, e.g. float32,bfloat16")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--resnet-batch-size", type=int, default=None,
                   help="batch size for resnet* cases (default: --batch-size; 32 on CPU)")
    p.add_argument("--seconds", type=float, default=2.0, help="target seconds per timed repeat")
    p.add_argument("--resnet-steps", type=int, default=None,
                   help="fixed timed steps for resnet* cases (default: 3 on CPU, else by --seconds)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--peak-flops", type=float, default=None,
                   help="peak FLOP/s of one device for MFU (H100 SXM bf16 dense: 989e12)")
    p.add_argument("--steps-per-call", type=_int_list, default=[1],
                   help="steps per compiled call (fusing.fuse_steps), comma separated: each case "
                        "runs once per value, one after the other, and the table gives "
                        "each value's steps/s over the first's (median over --rounds)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the whole set of cases this many times, alternating")
    p.add_argument("--parallel", choices=("none", "pmap", "mesh"), default="none",
                   help="the loop's data-parallel step over --devices devices (on a CPU, "
                        "make them with JAX_NUM_CPU_DEVICES=N)")
    p.add_argument("--devices", type=int, default=0, help="devices for --parallel (0 = all)")
    p.add_argument("--synthetic-size", type=int, default=2048)
    p.add_argument("--timeout", type=float, default=1800, help="seconds per case")
    return p.parse_args(argv)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in common.str_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers, comma separated: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1: {text!r}")
    return values


def build_cases(args, platform: str) -> list[dict[str, Any]]:
    cases = []
    on_cpu = platform == "cpu"
    for spec in args.cases:
        model, data, *pinned = [*spec.split(":"), ""][:3] if ":" in spec else (spec, "")
        pinned = [d for d in pinned if d]
        if data not in DATA:
            raise SystemExit(f"error: unknown data {data!r} in --cases {spec!r}; one of {DATA}")
        for dtype in pinned or args.dtypes:
            resnet = model.startswith("resnet")
            bs = args.batch_size
            if resnet:
                bs = args.resnet_batch_size or (min(bs, 32) if on_cpu else bs)
            case = {"model": model, "data": data, "dtype": dtype, "batch_size": bs,
                    "seconds": args.seconds, "repeats": args.repeats,
                    "peak_flops": args.peak_flops,
                    "synthetic_size": args.synthetic_size, "parallel": args.parallel,
                    "devices": args.devices}
            steps = args.resnet_steps or (3 if on_cpu else None)
            if resnet and steps:
                case["steps"] = steps
            if args.smoke:
                case.update(batch_size=min(bs, 16), steps=2, repeats=1, synthetic_size=256)
            cases.extend({**case, "steps_per_call": k} for k in args.steps_per_call)
    return cases


def fused_speedups(results: list[dict[str, Any]], first_k: int) -> dict[tuple, float]:
    """``(model, data, dtype, batch, K)`` -> the median over rounds of K's steps/s over
    ``first_k``'s for the same case in the same round."""
    rate = {(r.get("round", 0), r["model"], r["data"], r["dtype"], r["batch_size"],
             r.get("steps_per_call") or 1): r.get("steps_per_s") for r in results}
    ratios: dict[tuple, list[float]] = {}
    for (rnd, *case, k), steps_per_s in rate.items():
        ratio = common.ratio(steps_per_s, rate.get((rnd, *case, first_k)))
        if ratio is not None:
            ratios.setdefault((*case, k), []).append(ratio)
    return {key: statistics.median(v) for key, v in ratios.items()}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return common.child_main(measure_case, args.child)
    info = common.machine_info(args.note)
    results = []
    cases = build_cases(args, info["platform"])
    for rnd in range(max(args.rounds, 1)):
        for case in cases:
            print(f"... {case['model']} {case['data']} {case['dtype']} batch {case['batch_size']}"
                  f", {case['steps_per_call']} step(s) per call, round {rnd + 1}", flush=True)
            r = common.run_case("benchmarks.throughput", case, timeout=args.timeout)
            results.append({**r, "round": rnd})
    first_k = args.steps_per_call[0]
    speedups = fused_speedups(results, first_k)
    rows = [
        [r["model"], r["data"], r["dtype"], r["batch_size"], r["steps_per_call"],
         speedups.get((r["model"], r["data"], r["dtype"], r["batch_size"], r["steps_per_call"])),
         r.get("steps_per_s"),
         r.get("images_per_s"), r.get("flops_per_step") and r["flops_per_step"] / 1e9,
         r.get("flops_per_s") and r["flops_per_s"] / 1e12, r.get("mfu"),
         r.get("compile_s"), common.mib((r.get("memory") or {}).get("host_peak_rss_bytes")),
         common.mib((r.get("memory") or {}).get("device_peak_bytes")),
         "error" if "error" in r else ""]
        for r in results
    ]
    common.print_table(
        f"train throughput on {info['device']} (best of repeats)",
        ["model", "data", "dtype", "batch", "k", f"vs_k{first_k}", "steps/s", "images/s",
         "GFLOP/step", "TFLOP/s", "MFU", "compile_s", "rss_MiB", "dev_MiB", ""],
        rows,
    )
    common.write_results("throughput", args, info, {
        "peak_flops": args.peak_flops, "results": results,
        "steps_per_call_speedups": [{"case": list(key[:4]), "steps_per_call": key[4],
                                     f"median_over_k{first_k}": v}
                                    for key, v in speedups.items()]})
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
