"""Shot noise's Poisson sampler against jax.random.poisson, side by side in one process.

    python -m benchmarks.poisson                  # both presets, both compile settings
    python -m benchmarks.poisson --repeats 9 --compile suite
    python -m benchmarks.poisson --smoke          # tiny sizes, figures meaningless

What shot noise samples: lam = x c for uniform random images x at the five severities
of a preset, vmapped over the severities in one program (as ``perturb_by_param`` runs
them): ``cifar`` batch 256 x 32x32x3, ``imagenet`` batch 16 x 224x224x3. Each sampler
is compiled with ``default`` (jaxtrain's compiler options, as training compiles) and
``suite`` (``FAST_COMPILE``, what the robustness suite compiles with on CPU). The
timed calls alternate between the two samplers, each call with a new key, so a slow
spell of the machine falls on both; the ratio is jax's median over jaxtrain's.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

from benchmarks import common
from benchmarks.corruptions import SIZES, parse_preset_args

COMPILES = ("default", "suite")


def _options(which: str) -> dict[str, Any] | None:
    from jaxtrain import compiler_options
    from jaxtrain.robustness.evaluator import FAST_COMPILE

    return compiler_options() if which == "default" else dict(FAST_COMPILE)


def time_pair(preset: str, compile_: str, batch: int, size: int, repeats: int) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxtrain.robustness import perturbations as P
    from jaxtrain.robustness import poisson as PO

    x = jnp.asarray(np.random.default_rng(0).uniform(size=(batch, size, size, 3)), jnp.float32)
    c = jnp.asarray(P.stacked_params("shot_noise", preset))[:, 0]  # f32[5]
    samplers = {
        "jaxtrain": PO.poisson,
        "jax": lambda key, lam: jax.random.poisson(key, lam, lam.shape).astype(jnp.float32),
    }
    compiled, first = {}, {}
    for name, sample in samplers.items():
        fn = jax.jit(lambda x, c, key, sample=sample: jax.vmap(lambda ci: sample(key, x * ci))(c))
        t0 = time.perf_counter()
        compiled[name] = fn.lower(x, c, jax.random.key(0)).compile(_options(compile_))
        jax.block_until_ready(compiled[name](x, c, jax.random.key(0)))
        first[name] = time.perf_counter() - t0
    times: dict[str, list[float]] = {name: [] for name in samplers}
    for i in range(repeats):
        order = list(samplers) if i % 2 == 0 else list(reversed(samplers))
        for name in order:
            t0 = time.perf_counter()
            jax.block_until_ready(compiled[name](x, c, jax.random.key(i + 1)))
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) for name, t in times.items()}
    return {"preset": preset, "compile": compile_, "batch": batch, "size": size,
            "values": 5 * batch * size * size * 3, "first_call_s": first, "median_s": med,
            "times_s": times, "speedup": med["jax"] / med["jaxtrain"]}


def parse_args(argv):
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--compile", choices=[*COMPILES, "both"], default="both")
    return parse_preset_args(p, argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    info = common.machine_info(args.note)
    batches = {"cifar": args.cifar_batch, "imagenet": args.imagenet_batch}
    compiles = COMPILES if args.compile == "both" else (args.compile,)
    runs = []
    for compile_ in compiles:
        for preset in args.presets:
            batch, size = (2, 16) if args.smoke else (batches[preset], SIZES[preset])
            run = time_pair(preset, compile_, batch, size, 1 if args.smoke else args.repeats)
            runs.append(run)
            print(f"{compile_:8s} {preset:8s} jaxtrain {run['median_s']['jaxtrain'] * 1e3:8.1f} ms"
                  f"  jax {run['median_s']['jax'] * 1e3:8.1f} ms  {run['speedup']:.2f}x", flush=True)
    common.print_table(
        "shot noise's lam at 5 severities, one batch (vmapped, compiled); median ms",
        ["compile", "preset", "batch x size", "jaxtrain", "jax.random.poisson", "speedup"],
        [[r["compile"], r["preset"], f"{r['batch']} x {r['size']}",
          common.fmt(r["median_s"]["jaxtrain"] * 1e3), common.fmt(r["median_s"]["jax"] * 1e3),
          f"{r['speedup']:.2f}x"] for r in runs])
    common.write_results("poisson", args, info, {"runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
