"""Convolutions inside loops: XLA's convolution against ``jaxtrain.conv.conv_nhwc``.

    python -m benchmarks.conv_loops           # ~2 min on 2 cores; benchmarks/results/conv_loops-cpu.json
    python -m benchmarks.conv_loops --smoke   # tiny sizes (~15 s), figures meaningless

Inside a loop (``lax.fori_loop``, ``lax.scan``) XLA:CPU runs the convolutions of
JAX's own gradients, emitted in permuted layouts, with its generic loop emitter
instead of Eigen; ``conv_nhwc``'s backward is the same convolutions on explicitly
transposed operands (``jaxtrain.conv``; ``docs/PERFORMANCE.md``). Measured here,
in this one process, with the compiler options jaxtrain compiles with
(``jaxtrain.compiler_options()``: Eigen convolutions on CPU):

- ``grad``: the kernel and the input gradient of one 3x3 'SAME' convolution,
  14x14x32 -> 64, batch 128, NHWC / HWIO (the MNIST-shape CNN's second layer),
  each as ``jax.vjp`` of ``lax.conv_general_dilated`` (``xla``) and of
  ``conv_nhwc`` (``conv_nhwc``): once called directly (``jit``, seconds per call)
  and once inside a ``lax.fori_loop`` of ``--loop-iters`` iterations (seconds per
  iteration; the carried cotangent is scaled by a traced 1.0 each iteration so
  nothing is loop-invariant). The two must agree (``allclose``) before any time
  is reported.
- ``pgd``: ``robustness.attacks.pgd_linf``, ``--pgd-steps`` steps at batch
  ``--batch-size``, on the MNIST-shape CNN (28x28x1) and on ``resnet_tiny``
  (CIFAR shape, 32x32x3, BatchNorm in eval mode), random-init parameters shared
  by every variant of a model: ``conv="xla"`` (``nn.Conv``, XLA's plain
  convolution) against ``conv="nhwc_vjp"`` (every convolution on ``conv_nhwc``)
  and, for the CNN, ``conv="auto"`` (what jaxtrain builds on CPU with its compiler
  options: the narrow first layer as tap sums, the second on ``conv_nhwc``). Seconds per attack call after
  compilation; the adversarial images of every variant are compared with
  ``xla``'s (a flipped gradient sign moves a pixel by ``2 * alpha``, so the
  fraction of pixels that differ is reported and bounded).

Every timed region of every variant alternates with the others': ``--rounds``
rounds, the variants of each case in turn (reversed on odd rounds, ABBA), so a
slow spell of a shared machine falls on both sides. Reported: median and range
over rounds of each variant's seconds per call (per iteration in the loop), and
the median and range of the per-round ratios ``xla / variant`` (speedups), with
the 1-minute load average at the start and end of each round.
"""

from __future__ import annotations

import functools
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from benchmarks import common

GRAD_SHAPE = {"h": 14, "w": 14, "c": 32, "f": 64}  # MNIST CNN's second convolution
PGD_MODELS = {  # model -> (image shape, conv variants; the first is the reference)
    "cnn": ((28, 28, 1), ("xla", "nhwc_vjp", "auto")),
    "resnet_tiny": ((32, 32, 3), ("xla", "nhwc_vjp")),
}
PGD_EPS = 8 / 255
MAX_PGD_PIXELS_DIFFERENT = 0.01  # fraction of adversarial pixels allowed to differ from xla's


# ----------------------------------------------------------------------------- cases


class Case:
    """One comparison: ``variants`` maps a name to a compiled zero-argument call whose
    result can be synced; ``per_call`` divides a call's time (loop iterations)."""

    def __init__(self, name: str, variants: dict[str, Callable[[], Any]], per_call: int,
                 unit: str, check: dict[str, Any], compile_s: dict[str, float]):
        self.name, self.variants, self.per_call, self.unit = name, variants, per_call, unit
        self.check, self.compile_s = check, compile_s
        self.calls: dict[str, int] = {}
        self.seconds: dict[str, list[float]] = {v: [] for v in variants}


def _jit(fn: Callable) -> Callable:
    import jax

    from jaxtrain import compiler_options

    return jax.jit(fn, compiler_options=compiler_options())


def _compile(fn: Callable, *args: Any) -> tuple[Callable[[], Any], float]:
    """``fn`` jitted with jaxtrain's options, compiled for ``args``; a zero-argument call."""
    t0 = time.perf_counter()
    compiled = _jit(fn).lower(*args).compile()
    return functools.partial(compiled, *args), time.perf_counter() - t0


def _max_abs(a: Any, b: Any) -> float:
    import numpy as np

    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def grad_cases(batch: int, loop_iters: int, smoke: bool) -> list[Case]:
    """The kernel and input gradients of one convolution, direct and in a ``fori_loop``."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax

    from jaxtrain.conv import conv_nhwc

    dims = ("NHWC", "HWIO", "NHWC")
    convs = {
        "xla": lambda x, k: lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                                     dimension_numbers=dims),
        "conv_nhwc": lambda x, k: conv_nhwc(x, k, (1, 1), "SAME", dimension_numbers=dims),
    }
    s = {"h": 6, "w": 6, "c": 4, "f": 8} if smoke else GRAD_SHAPE
    rng = np.random.default_rng(0)  # numpy: an eager jax.random call compiles (~1 s each)
    x = jnp.asarray(rng.standard_normal((batch, s["h"], s["w"], s["c"]), np.float32))
    k = jnp.asarray(rng.standard_normal((3, 3, s["c"], s["f"]), np.float32) / np.sqrt(9 * s["c"]))
    g = jnp.asarray(rng.standard_normal((batch, s["h"], s["w"], s["f"]), np.float32))
    one = jnp.float32(1.0)  # traced: the loop cannot tell its carry is unchanged

    def kernel_grad(conv, x, k, g):
        return jax.vjp(lambda k_: conv(x, k_), k)[1](g)[0]

    def input_grad(conv, x, k, g):
        return jax.vjp(lambda x_: conv(x_, k), x)[1](g)[0]

    def looped(grad, conv, x, k, g, one):
        def body(_, carry):
            g_t, acc = carry
            return g_t * one, acc + grad(conv, x, k, g_t)

        shape = jax.eval_shape(functools.partial(grad, conv), x, k, g)
        acc0 = jnp.zeros(shape.shape, shape.dtype)
        return lax.fori_loop(0, loop_iters, body, (g, acc0))[1]

    cases = []
    for grad_name, grad in (("kernel", kernel_grad), ("input", input_grad)):
        direct = None  # xla's gradient called directly: what each loop iteration adds
        for where in ("direct", "fori_loop"):
            variants, compile_s, values = {}, {}, {}
            for conv_name, conv in convs.items():
                if where == "direct":
                    call, compile_s[conv_name] = _compile(functools.partial(grad, conv), x, k, g)
                else:
                    call, compile_s[conv_name] = _compile(
                        functools.partial(looped, grad, conv), x, k, g, one)
                variants[conv_name] = call
                values[conv_name] = np.asarray(jax.block_until_ready(call()))
            name = f"{grad_name} gradient, {where}"
            ref, other = values["xla"], values["conv_nhwc"]
            scale = float(np.max(np.abs(ref)))
            np.testing.assert_allclose(other, ref, rtol=1e-4, atol=1e-5 * scale, err_msg=name)
            if where == "direct":
                direct, iters, unit = ref, 1, "s/call"
            else:  # the loop sums loop_iters equal gradients
                iters, unit = loop_iters, "s/iteration"
                np.testing.assert_allclose(ref / iters, direct, rtol=1e-4, atol=1e-5 * scale,
                                           err_msg=name)
            check = {"max_abs_diff": _max_abs(other, ref), "max_abs_value": scale,
                     "allclose": True}
            cases.append(Case(name, variants, iters, unit, check, compile_s))
    return cases


def _random_variables(shapes: Any, rng: Any) -> Any:
    """Random parameters of ``shapes`` (``eval_shape`` of a Flax init) drawn with numpy:
    kernels ``N(0, 1 / fan_in)``, BatchNorm scales and variances 1, biases and means 0.
    (``jax.jit(model.init)`` of ``resnet_tiny`` took ~10 s to compile here.)"""
    import jax
    import jax.numpy as jnp
    import numpy as np

    def fill(path, leaf):
        name = getattr(path[-1], "key", None)
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return jnp.asarray(rng.standard_normal(leaf.shape).astype(np.float32)
                               / np.float32(np.sqrt(fan_in)))
        return jnp.full(leaf.shape, 1.0 if name in ("scale", "var") else 0.0, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def pgd_cases(batch: int, steps: int, smoke: bool, model_names: list[str]) -> list[Case]:
    """``pgd_linf`` on each model, one compiled attack per convolution variant."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxtrain.models import create_model
    from jaxtrain.robustness.attacks import pgd_linf

    cases = []
    for model_name in model_names:
        shape, conv_kinds = PGD_MODELS[model_name]
        if smoke:
            shape = (8, 8, shape[-1])
        rng = np.random.default_rng(1)
        images = jnp.asarray(rng.uniform(size=(batch, *shape)).astype(np.float32))
        labels = jnp.asarray(rng.integers(0, 10, batch).astype(np.int32))
        kp, ka = jax.random.key(1), jax.random.key(2)
        models = {kind: create_model(model_name, 10, conv=kind) for kind in conv_kinds}
        shapes = jax.eval_shape(models[conv_kinds[0]].init, kp, images[:1])
        for kind, model in models.items():  # the same parameters, whichever lowering
            got = jax.eval_shape(model.init, kp, images[:1])
            assert got == shapes, f"{model_name} conv={kind}: other parameters"
        variables = _random_variables(shapes, rng)

        def attack(model, variables, images, labels, key):
            return pgd_linf(lambda x: model.apply(variables, x, train=False), images, labels,
                            PGD_EPS, alpha=PGD_EPS / 4, steps=steps, key=key)

        variants, compile_s, advs = {}, {}, {}
        for kind, model in models.items():
            variants[kind], compile_s[kind] = _compile(
                functools.partial(attack, model), variables, images, labels, ka)
            advs[kind] = np.asarray(jax.block_until_ready(variants[kind]()))
        ref = advs[conv_kinds[0]]
        check: dict[str, Any] = {"eps": PGD_EPS, "alpha": PGD_EPS / 4}
        for kind, adv in advs.items():
            frac = float(np.mean(np.abs(adv - ref) > 1e-6))
            check[kind] = {"max_abs_diff_vs_xla": _max_abs(adv, ref),
                           "fraction_pixels_different": frac,
                           "max_perturbation": float(np.max(np.abs(adv - np.asarray(images))))}
            assert frac <= MAX_PGD_PIXELS_DIFFERENT, (
                f"{model_name}: conv={kind}'s adversarial images differ from xla's in "
                f"{frac:.2%} of pixels")
            assert check[kind]["max_perturbation"] <= PGD_EPS + 1e-6
        name = f"pgd_linf {steps} steps, {model_name} {'x'.join(map(str, shape))}"
        cases.append(Case(name, variants, 1, "s/call", check, compile_s))
    return cases


# ----------------------------------------------------------------------------- timing


def _time_region(call: Callable[[], Any], calls: int) -> float:
    import jax

    t0 = time.perf_counter()
    for _ in range(calls):
        out = call()
    jax.block_until_ready(out)
    return time.perf_counter() - t0


def measure(cases: list[Case], rounds: int, region_s: float) -> list[dict[str, float | None]]:
    """Times every variant of every case once per round, variants alternating (ABBA)."""
    for case in cases:  # calls per timed region, from one warm call each
        for name, call in case.variants.items():
            case.calls[name] = max(1, round(region_s / max(_time_region(call, 1), 1e-6)))
    loads = []
    for rnd in range(rounds):
        load0 = os.getloadavg()[0]
        for case in cases:
            names = list(case.variants)
            for name in names if rnd % 2 == 0 else names[::-1]:
                n = case.calls[name]
                wall = _time_region(case.variants[name], n)
                case.seconds[name].append(wall / (n * case.per_call))
        loads.append({"round": rnd, "load_start": load0, "load_end": os.getloadavg()[0]})
        print(f"... round {rnd + 1}/{rounds} (load {load0:.2f} -> {loads[-1]['load_end']:.2f})",
              flush=True)
    return loads


def summarize(case: Case) -> dict[str, Any]:
    """Median and range of each variant's seconds, and of the per-round ratios
    reference / variant (the reference, ``xla``, is the first variant)."""
    ref_name = next(iter(case.variants))
    ref = case.seconds[ref_name]
    variants = []
    for name, secs in case.seconds.items():
        ratios = [r / s for r, s in zip(ref, secs) if s > 0]
        variants.append({
            "variant": name,
            "calls_per_round": case.calls.get(name),
            "compile_s": case.compile_s[name],
            "seconds": secs,
            "median_s": statistics.median(secs) if secs else None,
            "min_s": min(secs) if secs else None,
            "max_s": max(secs) if secs else None,
            f"speedup_vs_{ref_name}_per_round": ratios,
            f"speedup_vs_{ref_name}_median": statistics.median(ratios) if ratios else None,
            f"speedup_vs_{ref_name}_min": min(ratios) if ratios else None,
            f"speedup_vs_{ref_name}_max": max(ratios) if ratios else None,
        })
    return {"case": case.name, "unit": case.unit, "per_call": case.per_call,
            "reference": ref_name, "check": case.check, "variants": variants}


# ----------------------------------------------------------------------------- main


def parse_args(argv):
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--parts", type=common.str_list, default=["grad", "pgd"],
                   help="what to measure: grad (one convolution's gradients), pgd (attacks)")
    p.add_argument("--models", type=common.str_list, default=list(PGD_MODELS),
                   help=f"models to attack, of {', '.join(PGD_MODELS)}")
    p.add_argument("--rounds", type=int, default=9, help="timed regions per variant, alternated")
    p.add_argument("--region-s", type=float, default=0.5,
                   help="target seconds of one timed region (at least one call)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--loop-iters", type=int, default=3, help="fori_loop iterations per call")
    p.add_argument("--pgd-steps", type=int, default=5)
    args = p.parse_args(argv)
    if unknown := set(args.parts) - {"grad", "pgd"}:
        p.error(f"--parts: unknown {sorted(unknown)}; choose from grad, pgd")
    if unknown := set(args.models) - set(PGD_MODELS):
        p.error(f"--models: unknown {sorted(unknown)}; choose from {', '.join(PGD_MODELS)}")
    if args.rounds < 1 or args.loop_iters < 1 or args.pgd_steps < 1:
        p.error("--rounds, --loop-iters and --pgd-steps must be at least 1")
    if args.smoke:
        args.rounds, args.region_s, args.batch_size = min(args.rounds, 2), 0.0, 4
        args.loop_iters, args.pgd_steps = 2, 2
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from jaxtrain import compiler_options  # imports jax: after the flags are parsed

    info = common.machine_info(args.note)
    info["compiler_options"] = compiler_options()
    t0 = time.perf_counter()
    cases = []
    if "grad" in args.parts:
        print("... compiling the gradient cases", flush=True)
        cases += grad_cases(args.batch_size, args.loop_iters, args.smoke)
    if "pgd" in args.parts:
        print("... compiling the PGD cases", flush=True)
        cases += pgd_cases(args.batch_size, args.pgd_steps, args.smoke, args.models)
    loads = measure(cases, args.rounds, args.region_s)
    summary = [summarize(c) for c in cases]
    rows = []
    for s in summary:
        for v in s["variants"]:
            ref = s["reference"]
            rows.append([s["case"], v["variant"], s["unit"], v["median_s"], v["min_s"],
                         v["max_s"], v[f"speedup_vs_{ref}_median"], v[f"speedup_vs_{ref}_min"],
                         v[f"speedup_vs_{ref}_max"], v["compile_s"]])
    common.print_table(
        f"convolutions inside loops on {info['device']}, batch {args.batch_size}, "
        f"{args.rounds} rounds (median, min, max; speedup = xla's time / variant's, per round)",
        ["case", "variant", "unit", "median", "min", "max", "speedup", "sp_min", "sp_max",
         "compile_s"], rows)
    common.write_results("conv_loops", args, info, {
        "batch_size": args.batch_size, "rounds": args.rounds, "region_s": args.region_s,
        "loop_iters": args.loop_iters, "pgd_steps": args.pgd_steps, "models": args.models,
        "grad_shape": None if args.smoke else GRAD_SHAPE, "loads": loads,
        "wall_s": time.perf_counter() - t0, "memory": common.peak_memory(),
        "cases": summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
