"""N seeds in one compiled program against N sequential single runs (same total work).

    python -m benchmarks.seeds [--seeds 1,8,32] [--epochs 5] [--seed-chunk C]
                               [--out benchmarks/results/seeds_cpu.json]

``--no-sequential`` skips the sequential runs (the GPU target compares N seeds in
one program with one seed: 32 digits MLPs should cost well under 2x one).
``--seed-chunk C`` adds, for every N > C, the N-seed program computing C seeds at
a time (``lax.map`` over chunks), to show what chunking costs in time and saves in
peak memory.

Each measurement runs in a fresh subprocess so peak memory (device memory
statistics on a GPU, resident set size on the CPU) belongs to that
configuration alone. Times are whole training runs (compile included, both
sides alike), printed side by side as ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def _peak_memory_bytes() -> int:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def worker(mode: str, n: int, epochs: int, workdir: str, chunk: int = 0) -> dict:
    """Runs in the subprocess: one N-seed run, or N single runs one after another."""
    from experiments.digits_seeds import DEFAULTS
    from jaxtrain.loop import train_and_evaluate

    base = DEFAULTS.replace(epochs=epochs, progress="none", robustness=False, compilation_cache="")
    t0 = time.perf_counter()
    if mode == "multi":
        s = train_and_evaluate(base.replace(num_seeds=n, seed_chunk=chunk),
                               os.path.join(workdir, "multi"))
        accs = s["test_accuracy_per_seed"] if n > 1 else [s["test_accuracy"]]
    else:
        accs = []
        for i in range(n):
            s = train_and_evaluate(
                base.replace(num_seeds=1, seed=base.seed + i), os.path.join(workdir, f"s{i}")
            )
            accs.append(s["test_accuracy"])
    return {
        "mode": mode, "num_seeds": n, "seed_chunk": s.get("seed_chunk"),
        "seconds": time.perf_counter() - t0,
        "peak_memory_bytes": _peak_memory_bytes(), "mean_test_accuracy": sum(accs) / len(accs),
    }


def measure(mode: str, n: int, epochs: int, chunk: int = 0) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "benchmarks.seeds", "--worker", mode, "--n", str(n),
               "--epochs", str(epochs), "--workdir", tmp, "--seed-chunk", str(chunk)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", default="1,8,32")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seed-chunk", type=int, default=0,
                   help="also time each N > C seeds computed C at a time")
    p.add_argument("--no-sequential", action="store_true",
                   help="only the one-program runs (their time against N = 1)")
    p.add_argument("--out", default="")
    p.add_argument("--worker", choices=["multi", "sequential"], help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.n, args.epochs, args.workdir, args.seed_chunk)))
        return

    import jax

    device = f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind} x{jax.device_count()}"
    rows = []
    print(f"device: {device}; digits MLP, {args.epochs} epochs per seed")
    print(f"{'N':>4} {'one program s':>14} {'sequential s':>13} {'time ratio':>11} "
          f"{'vs 1 seed':>10} {'peak MiB multi':>15} {'peak MiB seq':>13}"
          + (f" {'chunk ' + str(args.seed_chunk) + ' s':>10} {'peak MiB chunk':>15}"
             if args.seed_chunk else ""))
    one_seed = None
    for n in [int(x) for x in args.seeds.split(",")]:
        multi = measure("multi", n, args.epochs)
        seq = None if args.no_sequential else measure("sequential", n, args.epochs)
        one_seed = one_seed or (multi["seconds"] if n == 1 else None)
        row = {
            "num_seeds": n, "multi": multi, "sequential": seq,
            "sequential_over_multi": seq["seconds"] / multi["seconds"] if seq else None,
            "multi_over_one_seed": multi["seconds"] / one_seed if one_seed else None,
        }
        chunked = ""
        if 0 < args.seed_chunk < n:
            row["multi_chunked"] = c = measure("multi", n, args.epochs, args.seed_chunk)
            row["chunked_over_multi"] = c["seconds"] / multi["seconds"]
            chunked = f" {c['seconds']:>10.2f} {c['peak_memory_bytes'] / 2**20:>15.0f}"
        rows.append(row)
        vs1 = f"{row['multi_over_one_seed']:.2f}x" if one_seed else "-"
        seq_s = f"{seq['seconds']:>13.2f}" if seq else f"{'-':>13}"
        ratio = f"{row['sequential_over_multi']:>10.2f}x" if seq else f"{'-':>11}"
        seq_mem = f"{seq['peak_memory_bytes'] / 2**20:>13.0f}" if seq else f"{'-':>13}"
        print(f"{n:>4} {multi['seconds']:>14.2f} {seq_s} {ratio} {vs1:>10} "
              f"{multi['peak_memory_bytes'] / 2**20:>15.0f} {seq_mem}"
              f"{chunked}")
    result = {"benchmark": "seeds", "device": device, "epochs": args.epochs,
              "seed_chunk": args.seed_chunk, "rows": rows}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
