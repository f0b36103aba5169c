"""The robustness suite with FAST_COMPILE against optimized compiling: where each pays.

    python -m benchmarks.suite_compile                    # digits MLP and CIFAR-shape CNN
    python -m benchmarks.suite_compile --cases cnn:32x32x3:128,mlp:8x8x1:4096
    python -m benchmarks.suite_compile --cases sets:cnn:32x32x3:2000   # as for CIFAR-10-C
    python -m benchmarks.suite_compile --smoke            # tiny sizes, figures meaningless

Each case ``model:HxWxC:N`` runs ``suite.evaluate_suite`` (every in-memory corruption
at 5 severities, one seed, a randomly initialised model, uniform random images) once
with ``fast_compile=True`` (``evaluator.FAST_COMPILE``) and once with ``False``
(jaxtrain's ``compiler_options``), each in a fresh process without a compilation
cache, the two one after the other. It reports the compile and run seconds the
evaluator logged and the total, XLA's estimate of the model's FLOPs over the split
(a forward pass), and what ``evaluator.wants_fast_compile`` (the
``--fast-compile auto`` rule) picks for the case. A case ``sets:model:HxWxC:N`` runs
instead the one program of the published CIFAR-10-C images (``image_sets_program``)
over N x 5 severities of random uint8 images, for 3 corruptions (compiled once), as
``tfds_c`` does; ``tfds_c`` compiles it optimized unless asked.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any

from benchmarks import common

DEFAULT_CASES = ["mlp:8x8x1:359", "cnn:32x32x3:512"]


SETS_CORRUPTIONS = 3  # a sets case's runs of its one program
SEVERITIES = 5


def parse_case(text: str) -> dict[str, Any]:
    kind, rest = ("sets", text[len("sets:"):]) if text.startswith("sets:") else ("suite", text)
    try:
        model, shape, n = rest.split(":")
        h, w, c = (int(v) for v in shape.split("x"))
        return {"kind": kind, "model": model, "shape": [h, w, c], "n": int(n)}
    except ValueError:
        raise SystemExit(f"--cases: {text!r} is not [sets:]model:HxWxC:N "
                         "(e.g. cnn:32x32x3:512)") from None


def forward_flops(apply_fn, variables_S, image_shape, num_examples: int) -> float:
    """XLA's estimate of the FLOPs of ``apply_fn`` over ``num_examples`` images of
    ``image_shape`` with one seed's variables (leading seed axis); lowers, compiles nothing."""
    import jax
    import numpy as np

    one = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a)[1:], np.asarray(a).dtype),
                       variables_S)
    x = jax.ShapeDtypeStruct((1, *image_shape), np.float32)
    cost = jax.jit(apply_fn).lower(one, x).cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
        cost = cost[0]
    return float(cost["flops"]) * num_examples


def child(case: dict[str, Any]) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxtrain.models import create_model
    from jaxtrain.robustness import evaluator as E
    from jaxtrain.robustness import suite as S

    shape, n = tuple(case["shape"]), case["n"]
    rng = np.random.default_rng(0)
    channels = shape[-1]
    model = create_model(case["model"], 10, mean=(0.5,) * channels, std=(0.25,) * channels)
    variables = jax.tree.map(lambda a: np.asarray(a)[None],
                             model.init(jax.random.key(0), jnp.zeros((1, *shape))))

    def apply(v, x):
        return model.apply(v, x, train=False)

    if case.get("kind") == "sets":
        arrays = {"image": rng.integers(0, 256, (n, SEVERITIES, *shape), dtype=np.uint8),
                  "label": rng.integers(0, 10, (n, SEVERITIES)).astype(np.int32)}
        t0 = time.perf_counter()
        ev = E.Evaluator(variables, fast_compile=case["fast"])
        program = S.image_sets_program(apply)
        runs = [ev.run(f"sets{i}", program, arrays) for i in range(SETS_CORRUPTIONS)]
        total = time.perf_counter() - t0
        auto, images = False, n * SEVERITIES * SETS_CORRUPTIONS  # tfds_c: optimized unless asked
    else:
        split = {"image": rng.uniform(size=(n, *shape)).astype(np.float32),
                 "label": rng.integers(0, 10, n).astype(np.int32)}
        spec = S.SuiteSpec()
        if case.get("corruptions"):  # --smoke's short list
            spec = dataclasses.replace(spec, corruptions=tuple(case["corruptions"]))
        t0 = time.perf_counter()
        runs = S.evaluate_suite(apply, variables, split, spec, fast_compile=case["fast"]).runs
        total = time.perf_counter() - t0
        auto, images = E.wants_fast_compile("cpu", split), n
    return {**case, "total_s": total,
            "compile_s": sum(r.compile_seconds for r in runs),
            "run_s": sum(r.seconds for r in runs),
            "programs": [{"name": r.name, "compile_s": r.compile_seconds, "run_s": r.seconds}
                         for r in runs],
            "forward_flops": forward_flops(apply, variables, shape, images),
            "auto_picks_fast": auto}


def label(case: dict[str, Any]) -> str:
    sets = "sets " if case.get("kind") == "sets" else ""
    return f"{sets}{case['model']} {'x'.join(map(str, case['shape']))} x {case['n']}"


def parse_args(argv):
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--cases", type=common.str_list, default=DEFAULT_CASES,
                   help="[sets:]model:HxWxC:N, comma-separated")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        return common.child_main(child, args.child)
    cases = [parse_case(c) for c in args.cases]
    info = common.machine_info(args.note)
    runs = []
    for case in cases:
        if args.smoke:
            case = {**case, "n": 4, "corruptions": ["gaussian_noise", "contrast"]}
        pair = {}
        for fast in (True, False):
            run = common.run_child("benchmarks.suite_compile", {**case, "fast": fast},
                                   env={"JAX_ENABLE_COMPILATION_CACHE": "false"})
            pair["fast" if fast else "optimized"] = run
        runs.append(pair)
        f, o = pair["fast"], pair["optimized"]
        print(f"{label(case)} "
              f"({f['forward_flops']:.3g} FLOPs a pass): fast "
              f"{f['total_s']:.1f} s (compile {f['compile_s']:.1f}), optimized {o['total_s']:.1f} s "
              f"(compile {o['compile_s']:.1f}); auto picks "
              f"{'fast' if f['auto_picks_fast'] else 'optimized'}", flush=True)
    common.print_table(
        "the whole suite (sets: CIFAR-10-C's program), one seed: FAST_COMPILE against "
        "optimized (seconds)",
        ["case", "FLOPs a pass", "fast total", "fast compile", "fast run", "opt total",
         "opt compile", "opt run", "faster", "auto picks"],
        [[label(p["fast"]),
          f"{p['fast']['forward_flops']:.3g}",
          common.fmt(p["fast"]["total_s"]), common.fmt(p["fast"]["compile_s"]),
          common.fmt(p["fast"]["run_s"]), common.fmt(p["optimized"]["total_s"]),
          common.fmt(p["optimized"]["compile_s"]), common.fmt(p["optimized"]["run_s"]),
          "fast" if p["fast"]["total_s"] < p["optimized"]["total_s"] else "optimized",
          "fast" if p["fast"]["auto_picks_fast"] else "optimized"] for p in runs])
    common.write_results("suite_compile", args, info, {"runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
