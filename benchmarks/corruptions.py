"""What each in-memory corruption costs: one batch at all 5 severities, vmapped, compiled.

    python -m benchmarks.corruptions                        # every corruption, both presets
    python -m benchmarks.corruptions --names glass_blur,zoom_blur --repeats 7
    python -m benchmarks.corruptions --smoke                # tiny sizes, figures meaningless

Per corruption and preset: ``perturb_by_param`` vmapped over ``stacked_params`` (the five
severities in one program, as the robustness suite runs them), jitted with jaxtrain's
compiler options, on uniform random images: ``cifar`` at batch 256 x 32x32x3,
``imagenet`` at batch 16 x 224x224x3 (``--cifar-batch``, ``--imagenet-batch``). Reports
the first call (compile included) and the median and best of ``--repeats`` calls after
it, each with a new key. The corruptions run one after another in one process, so their
times are comparable with each other, not with another run's.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

from benchmarks import common

SIZES = {"cifar": 32, "imagenet": 224}


def time_one(name: str, preset: str, batch: int, size: int, repeats: int) -> dict[str, Any]:
    import jax
    import numpy as np

    from jaxtrain import compiler_options
    from jaxtrain.robustness import perturbations as P

    x = jax.numpy.asarray(np.random.default_rng(0).uniform(
        size=(batch, size, size, 3)).astype(np.float32))
    params = jax.numpy.asarray(P.stacked_params(name, preset))

    def all_severities(x, params, key):
        return jax.vmap(lambda p: P.perturb_by_param(x, name, p, key))(params)

    fn = jax.jit(all_severities, compiler_options=compiler_options())
    t0 = time.perf_counter()
    jax.block_until_ready(fn(x, params, jax.random.key(0)))
    first = time.perf_counter() - t0
    times = []
    for i in range(repeats):
        key = jax.random.key(i + 1)
        t0 = time.perf_counter()
        jax.block_until_ready(fn(x, params, key))
        times.append(time.perf_counter() - t0)
    return {"name": name, "preset": preset, "batch": batch, "size": size,
            "first_call_s": first, "median_s": statistics.median(times), "best_s": min(times),
            "times_s": times}


def parse_args(argv):
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--names", type=common.str_list, default=None,
                   help="corruptions (default: every in-memory one)")
    return parse_preset_args(p, argv)


def parse_preset_args(p, argv):
    """Adds ``--presets``, ``--cifar-batch``, ``--imagenet-batch`` and ``--repeats`` to
    parser ``p`` and parses ``argv`` (also used by ``benchmarks.poisson``)."""
    p.add_argument("--presets", type=common.str_list, default=list(SIZES))
    p.add_argument("--cifar-batch", type=int, default=256)
    p.add_argument("--imagenet-batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    bad = [x for x in args.presets if x not in SIZES]
    if bad or not args.presets:
        p.error(f"--presets: {bad[0] if bad else '(none)'!r} is not one of {sorted(SIZES)}")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from jaxtrain.robustness.perturbations import CORRUPTIONS

    names = args.names or list(CORRUPTIONS)
    unknown = [n for n in names if n not in CORRUPTIONS]
    if unknown:
        raise SystemExit(f"--names: unknown corruption {unknown[0]!r}; choose from "
                         f"{', '.join(CORRUPTIONS)}")
    info = common.machine_info(args.note)
    batches = {"cifar": args.cifar_batch, "imagenet": args.imagenet_batch}
    runs = []
    for preset in args.presets:
        batch, size = batches[preset], SIZES[preset]
        if args.smoke:
            batch, size = 2, 16
        for name in names:
            run = time_one(name, preset, batch, size, 1 if args.smoke else args.repeats)
            runs.append(run)
            print(f"{preset:8s} {name:18s} median {run['median_s'] * 1e3:9.1f} ms  first call "
                  f"{run['first_call_s']:6.2f} s", flush=True)
    common.print_table(
        "one batch at 5 severities (vmapped, compiled)",
        ["preset", "corruption", "batch x size", "median ms", "best ms", "first call s"],
        [[r["preset"], r["name"], f"{r['batch']} x {r['size']}", common.fmt(r["median_s"] * 1e3),
          common.fmt(r["best_s"] * 1e3), common.fmt(r["first_call_s"])] for r in runs])
    common.write_results("corruptions", args, info, {"runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
