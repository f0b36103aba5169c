"""Data-parallel throughput: steps/s and images/s per strategy and device count.

    python -m benchmarks.parallel                         # CPU: 1, 2, 4, 8 fake devices
    python -m benchmarks.parallel --model resnet_tiny --data cifar --batch-size 64
    python -m benchmarks.parallel --devices 1 --batch-size 1024   # GPU: pmap vs mesh on one

Each device count runs in its own process: on CPU with
``--xla_force_host_platform_device_count=N`` (fake devices sharing the host's
cores, so more devices mean more overhead, not more speed: the figures show
what each strategy costs), on GPUs with ``create_strategy(kind, N)`` over the
first N visible devices. Inside a process every strategy (``none`` only at one
device, ``mesh``, ``pmap``) compiles the library's own step
(``program.make_update``, state donated, global batch fixed), then timed repeats
alternate between strategies so load on a shared machine hits them alike;
``vs mesh`` is the ratio within one process. ``max_rel_diff`` checks that the
strategies computed the same training (params after the same steps, relative
to the first strategy): ~1e-7 after tens of steps; float32 reduction order
alone grows it to ~1e-4 over the ~1000 steps of a CPU run.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from benchmarks import common

STRATEGIES = ("none", "mesh", "pmap")


# ----------------------------------------------------------------------------- one count (child)


def measure(case: dict[str, Any]) -> dict[str, Any]:
    """Times every strategy of ``case`` on ``case["devices"]`` devices, side by side."""
    import jax
    import numpy as np

    from benchmarks.throughput import load, train_config
    from jaxtrain import data as data_lib
    from jaxtrain import program
    from jaxtrain.parallel import create_strategy

    config = train_config(case)
    resident = case.get("placement", "device") == "device"
    dataset = load(config)
    n_train, bs = len(dataset.train["label"]), config.batch_size
    if n_train < bs:  # small datasets (digits) are tiled so any batch size fits
        reps = -(-bs // n_train)
        dataset.train.update({k: np.concatenate([v] * reps) for k, v in dataset.train.items()})
        n_train *= reps
    host_state = program.build_model_and_state(config, dataset, 10_000)
    batches = [data_lib.batch_indices(0, s, n_train, bs) for s in range(4)]
    n_dev = int(case["devices"])
    kinds = [k for k in case["strategies"] if k != "none" or n_dev == 1]

    runners: dict[str, Any] = {}
    out: dict[str, Any] = {"devices": n_dev, "batch_size": bs, "strategies": {}}
    for kind in kinds:
        strategy = create_strategy(kind, n_dev)
        strategy.check_batch_size(bs)
        update = strategy.compile(program.make_update(config, resident=resident),
                                  donate_argnums=(0,))
        state = strategy.replicate(host_state)
        key = strategy.replicate(program.step_key(0))
        if resident:
            data = strategy.replicate(dataset.train)
            inputs = [strategy.shard(idx) for idx in batches]  # placed ahead, as the loop does
            call = lambda st, x, u=update, d=data, k=key: u(st, d, x, k)
        else:  # host batches placed inside the timed loop: the transfer is part of a step
            host = [data_lib.take(dataset.train, idx) for idx in batches]
            inputs = list(range(len(host)))
            call = (lambda st, i, u=update, s=strategy, h=host, k=key:
                    u(st, s.shard(h[i]), k))
        t0 = time.perf_counter()
        state, _ = call(state, inputs[0])
        jax.block_until_ready(state)
        out["strategies"][kind] = {"compile_and_first_step_s": time.perf_counter() - t0}
        runners[kind] = {"state": state, "call": call, "inputs": inputs, "i": 0,
                         "strategy": strategy, "timing": []}

    def step_fn(r):
        def step(st):
            r["i"] += 1
            st, _ = r["call"](st, r["inputs"][r["i"] % len(r["inputs"])])
            return st
        return step

    # Pick a step count from one untimed call of the slowest strategy, then alternate.
    n = int(case.get("steps") or 0)
    if not n:
        slowest = 0.0
        for r in runners.values():
            t0 = time.perf_counter()
            r["state"] = jax.block_until_ready(step_fn(r)(r["state"]))
            slowest = max(slowest, time.perf_counter() - t0)
        n = max(2, int(case.get("seconds", 1.0) / max(slowest, 1e-6)))
    for _ in range(int(case.get("repeats", 3))):
        for kind in kinds:  # block between strategies: never two programs in flight
            r = runners[kind]
            r["state"], timing = common.time_steps(step_fn(r), r["state"], n, 1,
                                                   jax.block_until_ready)
            r["timing"].append(timing["wall_s"][0] / n)

    ref_params = None
    for kind in kinds:
        r = runners[kind]
        per_step = sorted(r["timing"])
        best, median = per_step[0], per_step[len(per_step) // 2]
        params = [np.asarray(x, np.float64) for x in
                  jax.tree.leaves(r["strategy"].unreplicate(r["state"].params))]
        if ref_params is None:
            ref_params, diff = params, 0.0
        else:
            diff = max(float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
                       for a, b in zip(params, ref_params))
        out["strategies"][kind].update({
            "steps_timed": n,
            "s_per_step": r["timing"],
            "steps_per_s": 1.0 / best,
            "median_steps_per_s": 1.0 / median,
            "images_per_s": bs / best,
            "max_rel_diff": diff,
        })
    out["device_kind"] = jax.devices()[0].device_kind
    return out


# ----------------------------------------------------------------------------- main


def parse_args(argv):
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--devices", type=lambda s: [int(v) for v in s.split(",") if v],
                   default=None,
                   help="device counts, comma separated (default: 1,2,4,8 fake CPU devices; "
                        "on GPUs 1, 2, 4, ... up to all visible)")
    p.add_argument("--strategies", type=common.str_list, default=list(STRATEGIES),
                   help="of none,mesh,pmap (none runs at one device only)")
    p.add_argument("--model", default="mlp", help="any registry model (mlp, cnn, resnet_tiny, ...)")
    p.add_argument("--data", default="digits", choices=("digits", "mnist", "cifar"))
    p.add_argument("--batch-size", type=int, default=256, help="global batch")
    p.add_argument("--placement", default="device", choices=("device", "host"),
                   help="device: dataset on the devices, batches gathered in the step; "
                        "host: each batch placed from host memory inside the timed step")
    p.add_argument("--seconds", type=float, default=1.0, help="target seconds per timed repeat")
    p.add_argument("--steps", type=int, default=None, help="fixed steps per repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--timeout", type=float, default=1200, help="seconds per device count")
    return p.parse_args(argv)


def device_counts(args, info: dict[str, Any]) -> tuple[list[int], bool]:
    """The device counts to run and whether they are fake CPU devices."""
    if info["platform"] == "cpu":
        return args.devices or [1, 2, 4, 8], True
    visible = info["num_devices"]
    counts = args.devices or sorted({min(2**i, visible) for i in range(visible.bit_length())}
                                    | {visible})
    too_many = [c for c in counts if c > visible]
    if too_many:
        raise SystemExit(f"error: --devices {too_many} exceeds the {visible} visible device(s)")
    return counts, False


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return common.child_main(measure, args.child)
    unknown = set(args.strategies) - set(STRATEGIES)
    if unknown:
        raise SystemExit(f"error: unknown --strategies {sorted(unknown)}; of {STRATEGIES}")
    info = common.machine_info(args.note)
    counts, fake = device_counts(args, info)
    results = []
    for n in counts:
        case = {"devices": n, "strategies": args.strategies, "model": args.model,
                "data": args.data, "batch_size": args.batch_size, "placement": args.placement,
                "seconds": args.seconds, "steps": args.steps, "repeats": args.repeats,
                "dtype": "float32", "synthetic_size": 2048}
        if args.smoke:
            case.update(steps=2, repeats=1, synthetic_size=256)
        env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={n}",
               "JAX_PLATFORMS": "cpu"} if fake else None
        print(f"... {n} device(s): {', '.join(args.strategies)}", flush=True)
        results.append(common.run_case("benchmarks.parallel", case, env=env,
                                       timeout=args.timeout))
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["devices"], "-", r["batch_size"], "-", None, None, None, None, None,
                         "error"])
            continue
        mesh = r["strategies"].get("mesh", {}).get("steps_per_s")
        for kind, s in r["strategies"].items():
            rows.append([r["devices"], kind, r["batch_size"], r["batch_size"] // r["devices"],
                         s["steps_per_s"], s["images_per_s"], common.ratio(s["steps_per_s"], mesh),
                         s["compile_and_first_step_s"], s["max_rel_diff"], ""])
    common.print_table(
        f"data-parallel training, {args.model} on {args.data}, placement {args.placement}, "
        f"on {info['device']}{' (fake devices sharing the cores)' if fake else ''}; "
        "best of repeats",
        ["devices", "strategy", "batch", "per_device", "steps/s", "images/s", "vs mesh",
         "compile_s", "max_rel_diff", ""],
        rows,
    )
    common.write_results("parallel", args, info, {"fake_devices": fake, "results": results})
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
