"""The vmapped robustness suite against a Python loop over conditions (same results).

    python -m benchmarks.robustness [--seeds 1,16] [--num-keys 1] [--repeats 3]
        [--out benchmarks/results]   # writes robustness_<platform>.json

Model: the digits MLP (256, 256), randomly initialised per seed; data: the digits test
split (359 images). Conditions: every corruption x 5 severities x keys x seeds.

- vmapped: ``suite.corruption_program`` per corruption group (severities, keys and
  seeds vmapped; one compiled program per group), run by ``evaluator.Evaluator``;
- loop: one jitted function per corruption (severity parameter and key traced, so
  it compiles once per corruption), called from Python for every (seed, severity,
  key), the per-condition sums added on the host.

Both compile with the same XLA options. Times: ``first`` is compile + one pass (what
a user waits for), ``steady`` the best of ``--repeats`` passes once compiled. The
sums of both are asserted equal (counts exactly) before any time is reported.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _machine() -> dict:
    import jax

    from jaxtrain.cpu_devices import usable_cores

    d = jax.devices()[0]
    cores = usable_cores()
    return {"platform": d.platform, "device_kind": d.device_kind, "num_devices": jax.device_count(),
            "cpu_cores": cores, "load_average_1m": os.getloadavg()[0], "jax": jax.__version__,
            "python": platform.python_version()}


def _setup(num_seeds: int):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxtrain.data import load_dataset
    from jaxtrain.models import create_model

    ds = load_dataset("digits")
    model = create_model("mlp", ds.num_classes, mean=ds.mean, std=ds.std)
    keys = jax.random.split(jax.random.PRNGKey(0), num_seeds)
    init = jax.jit(jax.vmap(lambda k: model.init(k, jnp.zeros((1, *ds.image_shape)))))
    variables = jax.tree.map(np.asarray, init(keys))
    return model, variables, ds.test


def _apply(model, variables, images):
    return model.apply(variables, images, train=False)


def run_vmapped(apply_fn, variables, split, spec, options, repeats):
    import jax

    from jaxtrain.robustness import evaluator as E
    from jaxtrain.robustness import suite as S

    ev = E.Evaluator(variables, split, fast_compile=options is not None)
    key = jax.random.PRNGKey(spec.seed)
    programs = S.corruption_programs(apply_fn, spec, key)
    t0 = time.perf_counter()
    sums = {}
    for g, _, p, transform in programs:
        sums.update(ev.run(g, p, transform=transform).sums)
    first = time.perf_counter() - t0
    steady = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for g, _, p, transform in programs:
            ev.run(g, p, transform=transform)
        steady.append(time.perf_counter() - t0)
    return sums, first, min(steady)


def run_loop(apply_fn, variables, split, spec, options, repeats):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxtrain.robustness import suite as S
    from jaxtrain.robustness.metrics import calibration_stats

    n = len(split["label"])
    images, labels = jnp.asarray(split["image"]), jnp.asarray(split["label"])
    mask, index = jnp.ones(n, jnp.float32), jnp.arange(n, dtype=jnp.int32)
    root = jax.random.PRNGKey(spec.seed)
    seeds = jax.tree.leaves(variables)[0].shape[0]
    per_seed = [jax.tree.map(lambda a, s=s: jnp.asarray(a[s]), variables) for s in range(seeds)]

    def condition(v, param, key, *, name):
        x = S._corrupt(name, param, images, key, index)
        return calibration_stats(apply_fn(v, x), labels, mask=mask)

    compiled: dict[str, object] = {}

    def one_pass():
        out = {}
        for name in spec.corruptions:
            params = spec.severity_params(name)
            keys = [S.corruption_key(root, name, k) for k in range(spec.keys_for(name))]
            if name not in compiled:
                jitted = jax.jit(functools.partial(condition, name=name))
                compiled[name] = jitted.lower(per_seed[0], params[0], keys[0]).compile(options)
            fn = compiled[name]
            rows = []
            for v in per_seed:
                row = []
                for p in params:
                    total = None
                    for k in keys:
                        got = jax.tree.map(np.asarray, fn(v, p, k))  # one condition, synced
                        total = got if total is None else jax.tree.map(np.add, total, got)
                    row.append(total)
                rows.append(row)
            out[name] = jax.tree.map(lambda *xs: np.stack(xs), *[
                jax.tree.map(lambda *ys: np.stack(ys), *row) for row in rows])
        return out

    t0 = time.perf_counter()
    sums = one_pass()
    first = time.perf_counter() - t0
    steady = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        one_pass()
        steady.append(time.perf_counter() - t0)
    return sums, first, min(steady)


def _assert_same(a, b) -> None:
    import jax
    import numpy as np

    for name in a:
        for x, y in zip(jax.tree.leaves(a[name]), jax.tree.leaves(b[name]), strict=True):
            x, y = np.asarray(x), np.asarray(y)
            if np.issubdtype(x.dtype, np.integer):
                np.testing.assert_array_equal(x, y, err_msg=name)
            else:
                np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4, err_msg=name)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="1,16", help="comma-separated seed counts")
    parser.add_argument("--num-keys", type=int, default=1)
    parser.add_argument("--corruptions", default="all")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fast-compile", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)

    import jax

    from jaxtrain.robustness import evaluator as E
    from jaxtrain.robustness import suite as S
    from jaxtrain.robustness.perturbations import CORRUPTIONS

    names = CORRUPTIONS if args.corruptions == "all" else tuple(args.corruptions.split(","))
    spec = S.SuiteSpec(corruptions=names, num_keys=args.num_keys, flip_noises=()).validate()
    fast = (jax.devices()[0].platform == "cpu") if args.fast_compile == "auto" else (
        args.fast_compile == "on")
    options = dict(E.FAST_COMPILE) if fast else None
    cases = []
    print(f"{'seeds':>5} {'conditions':>10} | {'vmapped first':>13} {'loop first':>10} "
          f"{'ratio':>6} | {'vmapped steady':>14} {'loop steady':>11} {'ratio':>6}")
    for num_seeds in [int(s) for s in args.seeds.split(",")]:
        model, variables, split = _setup(num_seeds)
        apply_fn = functools.partial(_apply, model)
        v_sums, v_first, v_steady = run_vmapped(apply_fn, variables, split, spec, options,
                                                args.repeats)
        l_sums, l_first, l_steady = run_loop(apply_fn, variables, split, spec, options,
                                             args.repeats)
        _assert_same(v_sums, l_sums)
        conditions = num_seeds * sum(len(spec.severities) * spec.keys_for(n) for n in names)
        case = {"num_seeds": num_seeds, "conditions": conditions, "corruptions": list(names),
                "num_keys": args.num_keys, "test_examples": len(split["label"]),
                "vmapped_first_s": v_first, "loop_first_s": l_first,
                "first_ratio_loop_over_vmapped": l_first / v_first,
                "vmapped_steady_s": v_steady, "loop_steady_s": l_steady,
                "steady_ratio_loop_over_vmapped": l_steady / v_steady, "same_results": True}
        cases.append(case)
        print(f"{num_seeds:>5} {conditions:>10} | {v_first:>12.1f}s {l_first:>9.1f}s "
              f"{l_first / v_first:>5.2f}x | {v_steady:>13.2f}s {l_steady:>10.2f}s "
              f"{l_steady / v_steady:>5.2f}x", flush=True)
    result = {"benchmark": "robustness: vmapped suite vs Python loop of jitted per-condition calls",
              "command": "python -m benchmarks.robustness " + " ".join(
                  sys.argv[1:] if argv is None else argv),
              "fast_compile": fast, "machine": _machine(), "cases": cases}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"robustness_{result['machine']['platform']}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
