"""Shared helpers of the benchmarks: timing, memory, machine description, JSON, tables.

Every benchmark prints a table and writes one JSON file (``--out DIR``, default
``benchmarks/results``) holding the machine it ran on (device named), each
figure, peak memory and the command that produced it. Speed is reported as
ratios measured side by side in one run, never asserted in a test.

Cases that need their own process (XLA flags are read once, peak memory is per
process) run as children: ``run_child(module, case)`` starts
``python -m <module> --child '<json>'``; the child's ``child_main`` prints one
``RESULT {json}`` line. ``run_lockstep`` runs two or more children at once whose
timed regions take turns (``wait_turn``), so that the slow spells of a shared
machine, which last seconds to minutes, fall on both sides of a ratio alike.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO_ROOT, "benchmarks", "results")
RESULT_PREFIX = "RESULT "
TURNS_ENV = "JAXTRAIN_BENCH_TURNS"  # set in ``run_lockstep``'s children
TURN_LINE = "TURN"


class BenchmarkError(RuntimeError):
    """A benchmark child failed (message names the case and the child's last lines)."""


# ----------------------------------------------------------------------------- arguments


def base_parser(description: str) -> argparse.ArgumentParser:
    """Flags every benchmark takes: ``--out``, ``--tag``, ``--note``, ``--smoke``, ``--child``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", default=os.environ.get("BENCH_OUT", RESULTS_DIR),
                   help="folder for the JSON result (default: benchmarks/results or $BENCH_OUT)")
    p.add_argument("--tag", default=None,
                   help="suffix of the JSON file name (default: the platform, e.g. cpu or gpu)")
    p.add_argument("--note", default=os.environ.get("BENCH_NOTE", ""),
                   help="free text stored with the results (e.g. 'shared 2-core CPU, noisy')")
    p.add_argument("--smoke", action="store_true", default=os.environ.get("SMOKE") == "1",
                   help="tiny sizes: checks that the benchmark runs, figures are meaningless")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p


def float_list(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def str_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


# ----------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def nvidia_smi() -> list[dict[str, str]]:
    """One dict per GPU from ``nvidia-smi`` (name, memory, driver), ``[]`` without one."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
             "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            gpus.append({"name": parts[0], "memory_total": parts[1], "driver": parts[2]})
    return gpus


def versions(*packages: str) -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in packages:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def machine_info(note: str = "") -> dict[str, Any]:
    """Where the figures come from: JAX devices, CPU, load, GPUs, library versions."""
    import jax

    from jaxtrain.cpu_devices import usable_cores

    devices = jax.devices()
    cores = usable_cores()
    info = {
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "num_devices": len(devices),
        "cpu": _cpu_model(),
        "cpu_cores": cores,
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "gpus": nvidia_smi(),
        "python": platform.python_version(),
        "versions": versions("jax", "jaxlib", "flax", "optax", "numpy", "torch"),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "note": note,
    }
    info["device"] = describe_device(info)
    return info


def describe_device(info: dict[str, Any]) -> str:
    """One line naming the device, e.g. ``'gpu: NVIDIA H100 80GB HBM3'`` or ``'cpu: 2 cores ...'``."""
    if info["platform"] == "gpu" or info["gpus"]:
        names = sorted({g["name"] for g in info["gpus"]}) or [info["device_kind"]]
        return f"{info['platform']}: {', '.join(names)} x{info['num_devices']}"
    return f"cpu: {info['cpu_cores']} cores, {info['cpu']}"


def result_tag(info: dict[str, Any]) -> str:
    return "gpu" if info["platform"] in ("gpu", "cuda", "rocm") else info["platform"]


# ----------------------------------------------------------------------------- memory


def host_peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def device_memory() -> dict[str, int | None]:
    """Peak and current bytes on the first JAX device (``None`` where the backend
    keeps no statistics, as XLA:CPU does: then host RSS is the figure)."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return {
        "device_peak_bytes": stats.get("peak_bytes_in_use"),
        "device_bytes_in_use": stats.get("bytes_in_use"),
        "device_bytes_limit": stats.get("bytes_limit"),
    }


def peak_memory() -> dict[str, int | None]:
    """Everything known about peak memory of this process: host RSS and device stats."""
    return {"host_peak_rss_bytes": host_peak_rss_bytes(), **device_memory()}


def torch_peak_memory() -> dict[str, int | None]:
    """PyTorch's CUDA allocator peak (``None`` on CPU) plus host RSS."""
    import torch

    dev = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    return {"host_peak_rss_bytes": host_peak_rss_bytes(), "device_peak_bytes": dev}


def mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f}"


# ----------------------------------------------------------------------------- timing


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def time_steps(
    step: Callable[[Any], Any], carry: Any, n: int, repeats: int,
    sync: Callable[[Any], Any], steps_per_call: int = 1,
) -> tuple[Any, dict[str, Any]]:
    """Runs ``carry = step(carry)`` ``n`` times per repeat, ``sync(carry)`` at the end of each.

    Returns the final carry and ``wall_s`` / ``cpu_s`` per repeat plus the best
    and median seconds per training step (best is the least disturbed by other
    load); each ``step`` call runs ``steps_per_call`` training steps, and
    ``steps_timed`` counts training steps. Each repeat is one turn of a lockstep
    run (``wait_turn``)."""
    walls, cpus = [], []
    for _ in range(repeats):
        wait_turn()
        c0, t0 = cpu_seconds(), time.perf_counter()
        for _ in range(n):
            carry = step(carry)
        sync(carry)
        walls.append(time.perf_counter() - t0)
        cpus.append(cpu_seconds() - c0)
    steps = n * steps_per_call
    per_step = sorted(w / steps for w in walls)
    return carry, {
        "steps_timed": steps,
        "calls_timed": n,
        "repeats": repeats,
        "wall_s": walls,
        "cpu_s": cpus,
        "best_s_per_step": per_step[0],
        "median_s_per_step": per_step[len(per_step) // 2],
        "cpu_s_per_step": min(cpus) / steps,
    }


def compiled_flops(compiled: Any) -> float | None:
    """FLOPs of one call from XLA's cost analysis of a compiled executable (``None`` if absent)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001  (some backends do not implement it)
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost:
        return None
    flops = cost.get("flops")
    return float(flops) if flops and flops > 0 else None


# ----------------------------------------------------------------------------- children


def _child_cmd(module: str, case: dict[str, Any],
               env: dict[str, str] | None) -> tuple[list[str], dict[str, str]]:
    child_env = {**os.environ, **(env or {})}
    path = child_env.get("PYTHONPATH", "")
    child_env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + path if path else "")
    child_env.pop(TURNS_ENV, None)
    return [sys.executable, "-m", module, "--child", json.dumps(case)], child_env


def _child_failed(module: str, case: dict[str, Any], code: int | None, output: str):
    tail = "\n".join(output.strip().splitlines()[-15:])
    return BenchmarkError(f"{module} case {case} failed (exit {code}):\n{tail}")


def run_child(
    module: str, case: dict[str, Any], *, env: dict[str, str] | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Runs ``python -m module --child '<case json>'`` from the repo root; returns its RESULT.

    ``env`` adds to (or, with a value of ``""`` for ``XLA_FLAGS``, replaces) the
    environment. Raises ``BenchmarkError`` with the child's last lines on failure."""
    cmd, child_env = _child_cmd(module, case, env)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env, cwd=REPO_ROOT,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        raise BenchmarkError(f"{module} case {case} ran past {timeout:.0f} s") from e
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX):])
            result.setdefault("process_wall_s", time.perf_counter() - t0)
            return result
    raise _child_failed(module, case, proc.returncode, proc.stdout + proc.stderr)


def wait_turn() -> None:
    """In a child of ``run_lockstep``: blocks until the parent gives this child the
    machine for one timed region (it ends at the next ``wait_turn`` or at the end of
    the child). Does nothing in any other process."""
    if os.environ.get(TURNS_ENV) != "1":
        return
    print(TURN_LINE, flush=True)
    if sys.stdin.readline().strip() != "go":
        raise BenchmarkError("the lockstep parent went away")


def run_lockstep(
    module: str, cases: Sequence[tuple[dict[str, Any], dict[str, str] | None]], *,
    timeout: float | None = None,
) -> list[dict[str, Any]]:
    """Runs one child per ``(case, env)`` at the same time, their timed regions in turns.

    The children set up (load, compile) side by side; after that exactly one child
    runs at a time, for one region between its ``wait_turn`` calls, the others
    blocked on a pipe: the first child's region 1, the second's region 1, ..., then
    region 2 in reverse order (ABBA), and so on until each has printed its RESULT.
    Region ``j`` of every child is thus timed within seconds of the others', so
    that a ratio of their figures is not the ratio of a quiet and a busy minute.
    Returns the RESULTs in ``cases``' order; a failed child comes back as
    ``{**case, "error": ...}`` (the others run on), as ``run_case`` does."""
    with contextlib.ExitStack() as stack:
        procs, logs = [], []
        for case, env in cases:
            cmd, child_env = _child_cmd(module, case, env)
            child_env[TURNS_ENV] = "1"
            logs.append(stack.enter_context(tempfile.TemporaryFile(mode="w+")))  # stderr
            procs.append(stack.enter_context(subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=logs[-1], text=True,
                env=child_env, cwd=REPO_ROOT)))
        t0 = time.perf_counter()
        results, tails, timed_out = _take_turns(procs, timeout)
        wall = time.perf_counter() - t0
        out = []
        for (case, _), proc, log, result, tail in zip(cases, procs, logs, results, tails):
            if result is None:
                log.seek(0)
                err = (BenchmarkError(f"{module} case {case} ran past {timeout:.0f} s")
                       if timed_out else
                       _child_failed(module, case, proc.returncode, "".join(tail) + log.read()))
                print(f"FAILED: {err}", file=sys.stderr)
                result = {**case, "error": str(err)}
            else:
                result.setdefault("process_wall_s", wall)
            out.append(result)
    return out


def _take_turns(procs: list[subprocess.Popen], timeout: float | None):
    """``run_lockstep``'s conductor: returns each child's RESULT (or ``None``), its last
    output lines, and whether the timeout killed them."""
    results: list[dict[str, Any] | None] = [None] * len(procs)
    tails: list[list[str]] = [[] for _ in procs]
    timed_out = threading.Event()

    def kill_all() -> None:
        timed_out.set()
        for p in procs:
            p.kill()

    def next_turn(i: int) -> bool:
        """Reads child ``i``'s output up to its next turn (True) or its end (False)."""
        for line in procs[i].stdout:
            if line.rstrip("\n") == TURN_LINE:
                return True
            if line.startswith(RESULT_PREFIX):
                results[i] = json.loads(line[len(RESULT_PREFIX):])
            tails[i] = (tails[i] + [line])[-15:]
        return False

    timer = threading.Timer(timeout, kill_all) if timeout else None
    if timer:
        timer.daemon = True
        timer.start()
    try:
        waiting = [i for i in range(len(procs)) if next_turn(i)]  # all set up
        order = 1
        while waiting:
            for i in waiting[::order]:
                try:
                    procs[i].stdin.write("go\n")
                    procs[i].stdin.flush()
                except BrokenPipeError:
                    pass  # it died: next_turn reads its end
                if not next_turn(i):
                    waiting.remove(i)
            order = -order
    finally:
        if timer:
            timer.cancel()
        for p in procs:
            p.stdin.close()
            p.wait()
    return results, tails, timed_out.is_set()


def paired_ratios(a: dict[str, Any], b: dict[str, Any]) -> list[float]:
    """Per timed region, ``a``'s steps/s over ``b``'s, from two ``time_steps`` timings
    of one ``run_lockstep`` run (region ``j`` of each, timed seconds apart)."""
    na, nb = a["steps_timed"], b["steps_timed"]
    return [(wb / nb) / (wa / na) for wa, wb in zip(a["wall_s"], b["wall_s"]) if wa > 0]


def run_case(
    module: str, case: dict[str, Any], *, env: dict[str, str] | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """``run_child``, but a failed case is reported on stderr and comes back as
    ``{**case, "error": ...}`` so the other cases still run and print."""
    try:
        return run_child(module, case, env=env, timeout=timeout)
    except BenchmarkError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return {**case, "error": str(e)}


def child_main(fn: Callable[[dict[str, Any]], dict[str, Any]], case_json: str) -> int:
    """Runs ``fn(case)`` in a child and prints its result (plus peak memory) as one line."""
    case = json.loads(case_json)
    result = fn(case)
    result.setdefault("memory", peak_memory())
    print(RESULT_PREFIX + json.dumps(result, default=_jsonable), flush=True)
    return 0


def _jsonable(x: Any) -> Any:
    try:
        import numpy as np

        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, np.ndarray):
            return x.tolist()
    except ImportError:
        pass
    return str(x)


# ----------------------------------------------------------------------------- output


def command_line() -> str:
    return "python -m " + shlex.join([_module_name(), *sys.argv[1:]])


def _module_name() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return spec.name if spec is not None else os.path.basename(sys.argv[0])


def write_results(
    name: str, args: argparse.Namespace, info: dict[str, Any], payload: dict[str, Any]
) -> str:
    """Writes ``<out>/<name>-<tag>.json`` with the machine, command and ``payload``; returns the path."""
    tag = args.tag or result_tag(info) + ("-smoke" if args.smoke else "")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{name}-{tag}.json")
    doc = {
        "benchmark": name,
        "command": command_line(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "smoke": bool(args.smoke),
        "machine": info,
        **payload,
    }
    with open(path + ".tmp", "w") as f:
        json.dump(doc, f, indent=2, default=_jsonable)
        f.write("\n")
    os.replace(path + ".tmp", path)
    print(f"wrote {os.path.relpath(path)}")
    return path


def fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        if x == 0:
            return "0"
        if abs(x) >= 1e5 or abs(x) < 1e-3:
            return f"{x:.{digits}g}"
        return f"{x:.{digits}g}" if abs(x) < 10 ** digits else f"{x:.0f}"
    return str(x)


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain fixed-width table (the figures are also in the JSON)."""
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max(len(col), *(len(r[i]) for r in cells)) if cells else len(col)
              for i, col in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(col.ljust(w) for col, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    sys.stdout.flush()


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _echo(case: dict[str, Any]) -> dict[str, Any]:
    """Echoes ``case``; with ``turns``: that many timed regions (``wait_turn``) of
    ``sleep`` seconds each, returned as ``[start, end]`` times; ``fail``: exits 3
    after the first."""
    memory = peak_memory()  # imports jax while the children set up side by side
    regions = []
    for _ in range(int(case.get("turns", 0))):
        wait_turn()
        if case.get("fail") and regions:
            sys.exit(3)
        start = time.time()
        time.sleep(float(case.get("sleep", 0.0)))
        regions.append([start, time.time()])
    return {"echo": case, "regions": regions, "memory": memory}


def _echo_main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.common --child JSON`` echoes its case (tests the protocols)."""
    args = base_parser("echo child").parse_args(argv)
    if args.child is None:
        print("benchmarks.common is a library; run a benchmark module instead", file=sys.stderr)
        return 2
    return child_main(_echo, args.child)


if __name__ == "__main__":
    sys.exit(_echo_main())
