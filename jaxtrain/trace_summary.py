"""Where a profiled step's time went: the top ops and how busy the devices were.

``summarize_trace(logdir, steps)`` reads the newest ``*.xplane.pb`` that
``jax.profiler`` wrote under ``logdir`` (with ``jax.profiler.ProfileData``; no
TensorBoard needed) and returns, per call of the busiest program (the step):

- ``ops``: the ops that took the most time (``program/op`` name, ms and times run
  per call, share of the op time), summed over devices (nested events, such as a
  collective's rendezvous, count on their own too);
- ``busy_ms_per_call``: time at least one op was running, per device (the union
  of op intervals), and ``span_ms_per_call``: first op start to last op end;
  their ratio ``busy_fraction`` well below 1 means the device waited (on the
  host, on launches, on other devices).

Op events: on GPUs, the kernels of the ``/device:GPU:*`` planes (their stream
lines); on the CPU, the XLA thunks on XLA's own threads of ``/host:CPU``
(``tf_XLA*`` lines), minus the executor's wrapper events that enclose them.
XLA:CPU's own (Eigen) convolutions, which jaxtrain's CPU programs use
(``compile_options``), run asynchronously: their events time the launch, not the
work, so convolutions are missing from the top ops and the busy fraction
under-reports (the MNIST CNN step showed ~50% busy).
Tracing adds a few microseconds per op: for a tiny step (the digits MLP, ~270
ops, 0.7 ms untraced) the traced times came out about 2x the untraced ones, so
trust the shares and the busy fraction more than the absolute times there.
Hand-written because the profiler's own tools (TensorBoard, XProf) are a GUI and
optional installs; this is the one table a benchmark or a log needs.
"""

from __future__ import annotations

import glob
import os
from collections import defaultdict
from typing import Any

__all__ = ["format_trace_summary", "summarize_trace"]

# Events that enclose other events (executor, thread-pool bookkeeping), not ops.
_WRAPPERS = ("ThunkExecutor::Execute", "ThreadpoolListener::", "CommonPjRtLoadedExecutable",
             "PjRtCpuExecutable", "Wait for LaunchOnDevice")


def _newest_xplane(logdir: str) -> str:
    paths = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
    if not paths:
        raise FileNotFoundError(f"no *.xplane.pb profile under {logdir}")
    return max(paths, key=os.path.getmtime)


def _op_lines(planes) -> dict[str, list]:
    """Device name -> the lines holding its op events."""
    planes = list(planes)  # ProfileData iterates once
    devices: dict[str, list] = defaultdict(list)
    for plane in planes:
        if plane.name.startswith("/device:GPU") or plane.name.startswith("/device:TPU"):
            for line in list(plane.lines):
                if line.name.lower().startswith("stream") or "XLA Ops" in line.name:
                    devices[plane.name].append(line)
    if devices:
        return devices
    for plane in planes:  # the CPU: XLA runs its thunks on its own threads
        if plane.name == "/host:CPU":
            devices["cpu"] = [line for line in list(plane.lines) if line.name.startswith("tf_XLA")]
    return devices


def _busy_ns(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of ``[start, end)`` intervals."""
    total, end = 0.0, None
    for s, e in sorted(intervals):
        if end is None or s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def summarize_trace(logdir: str, steps: int, top: int = 15) -> dict[str, Any]:
    """Per-call op times and device busy time of the newest trace under ``logdir``.

    Figures are per call of the busiest program (``program``; ``calls`` of it in
    the trace, counted from XLA's run ids): per step for one step per call, per
    K steps with ``--steps-per-call K``. ``steps`` (the steps traced) is the count
    where the trace has no run ids."""
    from jax.profiler import ProfileData

    path = _newest_xplane(logdir)
    devices = _op_lines(ProfileData.from_file(path).planes)
    per_op: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    intervals: dict[Any, list[tuple[float, float]]] = defaultdict(list)
    module_ns: dict[str, float] = defaultdict(float)
    module_runs: dict[str, set] = defaultdict(set)
    for group, lines in devices.items():
        ops_only = any("XLA Ops" in line.name for line in lines)
        for line in lines:
            if ops_only and "XLA Ops" not in line.name:
                continue  # GPU: op-level names when present, kernels otherwise
            for ev in line.events:
                if ev.duration_ns <= 0 or ev.name.startswith(_WRAPPERS):
                    continue
                stats = dict(ev.stats)
                module = stats.get("hlo_module")  # op names repeat across programs
                name = f"{module}/{ev.name}" if module else ev.name
                per_op[name][0] += ev.duration_ns
                per_op[name][1] += 1
                if module:
                    module_ns[module] += ev.duration_ns
                    if "run_id" in stats:
                        module_runs[module].add(stats["run_id"])
                # XLA:CPU tags each thunk with its device; the untagged sync events
                # (rendezvous, waits) run inside a tagged collective
                device = stats.get("device_ordinal") if group == "cpu" else group
                if device is not None:
                    intervals[device].append((ev.start_ns, ev.start_ns + ev.duration_ns))
    busy = [_busy_ns(iv) for iv in intervals.values()]
    spans = [max(e for _, e in iv) - min(s for s, _ in iv) for iv in intervals.values()]
    # Steps dispatched before the trace started finish inside it: count the calls of
    # the busiest program (one per step, or per K fused steps) where the trace says.
    program = max(module_ns, key=module_ns.get) if module_ns else None
    calls = len(module_runs[program]) if program and module_runs[program] else steps
    total = sum(ns for ns, _ in per_op.values()) or 1.0
    ranked = sorted(per_op.items(), key=lambda kv: -kv[1][0])
    ms = 1e-6 / calls
    busy_ms = sum(busy) / len(busy) * ms if busy else 0.0
    span_ms = sum(spans) / len(spans) * ms if spans else 0.0
    return {
        "trace": path,
        "steps": steps,
        "program": program,
        "calls": calls,
        "devices": len(busy),
        "op_ms_per_call": total * ms / max(len(busy), 1),
        "busy_ms_per_call": busy_ms,
        "span_ms_per_call": span_ms,
        "busy_fraction": busy_ms / span_ms if span_ms else None,
        "distinct_ops": len(per_op),
        "ops": [{"name": name, "ms_per_call": ns * ms, "times_per_call": n / calls,
                 "share": ns / total} for name, (ns, n) in ranked[:top]],
    }


def format_trace_summary(summary: dict[str, Any], top: int = 10) -> str:
    """A few lines for a log: busy time, then the top ``top`` ops."""
    frac = summary["busy_fraction"]
    lines = [(f"profile: {summary['calls']} calls of {summary['program']} "
              f"({summary['steps']} steps traced), {summary['devices']} device(s): busy "
              f"{summary['busy_ms_per_call']:.2f} ms of a {summary['span_ms_per_call']:.2f} ms "
              f"span per call ({'-' if frac is None else f'{frac:.0%}'}), "
              f"{summary['distinct_ops']} distinct ops; top ops (ms per call, all devices):")]
    for op in summary["ops"][:top]:
        lines.append(f"  {op['ms_per_call']:9.3f}  {op['share']:6.1%}  "
                     f"x{op['times_per_call']:<5.3g} {op['name'][:90]}")
    return "\n".join(lines)
