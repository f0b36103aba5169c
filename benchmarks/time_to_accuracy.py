"""Time to 97% test accuracy on digits (MLP), from a cold start and with a warm compile cache.

    python -m benchmarks.time_to_accuracy
    python -m benchmarks.time_to_accuracy --platforms default,cpu   # GPU and its host CPU

Per platform, two fresh processes share one new, empty compilation-cache
folder: the first compiles everything (cold), the second finds the compiled
programs on disk (warm). Each trains with the ``experiments.digits_mlp``
defaults (device-resident data, the library's compiled step) and evaluates
the test split after every epoch until it reaches ``--target``. Reported:
seconds from process launch (interpreter, imports, data, init, compile,
training and evals) and from the start of training, steady seconds per step,
epochs needed, and peak memory. The persistent cache keeps every program
(``jax_persistent_cache_min_compile_time_secs=0``, as ``program.setup_compilation_cache``
sets it too since its old 0.5 s floor skipped the small digits programs).
"""

from __future__ import annotations

import sys
import tempfile
import time
from typing import Any

from benchmarks import common


def train_to_target(case: dict[str, Any]) -> dict[str, Any]:
    """Child: trains digits MLP, test accuracy after each epoch, stops at ``target``."""
    t_start = time.time()
    import jax
    import numpy as np

    from experiments.digits_mlp import DEFAULTS
    from jaxtrain import data as data_lib
    from jaxtrain import evaluation, program
    from jaxtrain.steps import eval_step

    if case.get("cache"):
        program.setup_compilation_cache(case["cache"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    t_imports = time.time()
    config = DEFAULTS.replace(epochs=case["epochs"], compilation_cache="", progress="none")
    dataset = data_lib.load_dataset(config.dataset, val_fraction=config.val_fraction)
    n = len(dataset.train["label"])
    per_epoch = data_lib.steps_per_epoch(n, config.batch_size)
    total = per_epoch * config.epochs
    device = jax.devices()[0]
    t_data = time.time()

    state = jax.device_put(program.build_model_and_state(config, dataset, total), device)
    update = jax.jit(program.make_update(config, resident=True), donate_argnums=(0,))
    eval_fn = jax.jit(eval_step)
    put = lambda x: jax.device_put(x, device)
    train = put(dataset.train)
    key = put(program.step_key(config.seed))
    evaluate = lambda st: evaluation.evaluate(put, jax.device_get, eval_fn, st, dataset.test,
                                        config.eval_batch_size)
    curve, hit, t_first_step, epoch_times = [], None, None, []
    t_epoch = time.time()
    for step in range(total):
        idx = put(data_lib.batch_indices(config.seed, step, n, config.batch_size))
        state, _ = update(state, train, idx, key)
        if t_first_step is None:
            jax.block_until_ready(state)
            t_first_step = time.time()
        if (step + 1) % per_epoch == 0:
            jax.block_until_ready(state)
            epoch_times.append(time.time() - t_epoch)
            acc = evaluate(state)["accuracy"]
            t_now = time.time()
            curve.append({"epoch": (step + 1) // per_epoch, "test_accuracy": acc,
                          "seconds_from_start": t_now - t_start})
            if hit is None and acc >= case["target"]:
                hit = {"epoch": (step + 1) // per_epoch, "step": step + 1, "time": t_now}
                if case.get("stop_at_target", True):
                    break
            t_epoch = time.time()
    # steady seconds per step: epochs after the first (which compiles), eval excluded
    steady = epoch_times[1:] or epoch_times
    return {
        **case,
        "platform": device.platform,
        "device_kind": device.device_kind,
        "reached": hit is not None,
        "epochs_to_target": hit and hit["epoch"],
        "steps_to_target": hit and hit["step"],
        "seconds_from_launch": hit and hit["time"] - case["t_launch"],
        "seconds_from_training_start": hit and hit["time"] - t_data,
        "imports_s": t_imports - t_start,
        "interpreter_start_s": t_start - case["t_launch"],
        "data_s": t_data - t_imports,
        "init_and_first_step_s": t_first_step - t_data,
        "s_per_step_steady": float(np.sum(steady) / (len(steady) * per_epoch)),
        "final_test_accuracy": curve[-1]["test_accuracy"] if curve else None,
        "curve": curve,
        "params_dtype": str(jax.tree.leaves(state.params)[0].dtype),
    }


def parse_args(argv):
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--target", type=float, default=0.97)
    p.add_argument("--epochs", type=int, default=30, help="most epochs to try")
    p.add_argument("--platforms", type=common.str_list, default=["default"],
                   help="JAX_PLATFORMS per run: 'default' (what JAX picks) or e.g. cpu")
    p.add_argument("--no-stop", action="store_true",
                   help="train every epoch even after the target (full curve)")
    p.add_argument("--timeout", type=float, default=900)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return common.child_main(train_to_target, args.child)
    info = common.machine_info(args.note)
    epochs = 2 if args.smoke else args.epochs
    results = []
    for plat in args.platforms:
        cache = tempfile.mkdtemp(prefix="jaxtrain-tta-cache-")
        env = {} if plat == "default" else {"JAX_PLATFORMS": plat}
        for start in ("cold", "warm"):
            case = {"start": start, "requested_platform": plat, "cache": cache,
                    "target": args.target, "epochs": epochs, "t_launch": time.time(),
                    "stop_at_target": not args.no_stop}
            results.append(common.run_case("benchmarks.time_to_accuracy", case, env=env,
                                           timeout=args.timeout))
    rows = [[r.get("platform", r["requested_platform"]), r["start"],
             r.get("seconds_from_launch"), r.get("seconds_from_training_start"),
             r.get("init_and_first_step_s"), r.get("epochs_to_target"),
             r.get("s_per_step_steady") and r["s_per_step_steady"] * 1e3,
             r.get("final_test_accuracy"),
             common.mib((r.get("memory") or {}).get("host_peak_rss_bytes")),
             common.mib((r.get("memory") or {}).get("device_peak_bytes")),
             "error" if "error" in r else ("" if r.get("reached") else "not reached")]
            for r in results]
    common.print_table(
        f"digits MLP: time to {args.target:.0%} test accuracy on {info['device']}",
        ["platform", "cache", "s_from_launch", "s_from_train_start", "init+compile_s",
         "epochs", "ms/step", "test_acc", "rss_MiB", "dev_MiB", ""], rows)
    common.write_results("time_to_accuracy", args, info,
                         {"target": args.target, "results": results})
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
