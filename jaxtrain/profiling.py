"""Profiling and dry-run figures: pure helpers the loop calls.

- ``parse_profile_steps("A:B")`` and ``StepProfiler``: a ``jax.profiler`` trace of
  the training steps ``A <= step < B`` (step = ``state.step`` before the update),
  each step annotated, written under ``logdir/plugins/profile/<time>/`` (open
  with ``tensorboard --logdir WORKDIR/profile`` or load ``*.trace.json.gz`` in
  https://ui.perfetto.dev), and a summary of it (top ops, device busy time:
  ``trace_summary``) printed and written to ``logdir/summary.json``.
- ``param_count``, ``compiled_stats`` and ``format_dry_run``: parameter count,
  XLA's cost analysis (FLOPs) and memory analysis of a compiled step.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxtrain.config import ConfigError

_STEPS = re.compile(r"\s*(\d+)\s*:\s*(\d+)\s*")


def parse_profile_steps(text: str) -> tuple[int, int]:
    """``"A:B"`` -> ``(A, B)`` with ``0 <= A < B``: the steps ``A .. B-1`` (like a slice)."""
    m = _STEPS.fullmatch(text)
    if not m:
        raise ConfigError(f"--profile-steps must look like START:STOP (e.g. 10:15), got {text!r}")
    start, stop = int(m.group(1)), int(m.group(2))
    if start >= stop:
        raise ConfigError(f"--profile-steps {text}: START must be < STOP")
    return start, stop


class StepProfiler:
    """Traces steps ``start <= step < stop`` of a loop into ``logdir``.

    ``run(step, fn, *args, n=1)`` calls ``fn(*args)`` as the training steps
    ``step .. step+n-1`` (``n > 1``: several steps fused in one call): it starts
    the trace before the first call that reaches ``start``, annotates every
    traced call (``StepTraceAnnotation`` with its first step, so viewers group
    by step) and, after the call that reaches ``stop - 1``, waits for the result
    and stops the trace. ``close()`` stops a trace the loop left running (a run
    shorter than ``stop``, or an error). A disabled profiler (``steps`` empty)
    just calls ``fn``.
    """

    def __init__(self, logdir: str, steps: str | tuple[int, int] | None, *,
                 total_steps: int | None = None):
        if jax.process_count() > 1:  # processes on one host would share file names
            logdir = f"{logdir}/process_{jax.process_index()}"
        self.logdir = logdir
        self.window = parse_profile_steps(steps) if isinstance(steps, str) and steps else (
            tuple(steps) if steps else None)
        if self.window and total_steps is not None and self.window[0] >= total_steps:
            raise ConfigError(
                f"--profile-steps {self.window[0]}:{self.window[1]} starts after the run's "
                f"last step ({total_steps - 1})"
            )
        self.active = False
        self.traced_steps: list[int] = []

    def run(self, step: int, fn: Callable[..., Any], *args: Any, n: int = 1) -> Any:
        if self.window is None:
            return fn(*args)
        start, stop = self.window
        if step + n <= start or step >= stop:  # the call does not touch the window
            return fn(*args)
        if not self.active:
            jax.profiler.start_trace(self.logdir)
            self.active = True
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            out = fn(*args)
        self.traced_steps.extend(range(step, step + n))
        if step + n >= stop:
            jax.block_until_ready(out)  # the trace must contain the device work
            self.close()
        return out

    def close(self) -> None:
        """Stops the trace, then prints where the traced steps' time went and writes it
        to ``logdir/summary.json`` (``trace_summary``: top ops, device busy time)."""
        if self.active:
            self.active = False
            jax.profiler.stop_trace()
            self.summarize()

    def summarize(self) -> dict[str, Any] | None:
        """The trace's summary (``None`` if it could not be read: a warning, never an error)."""
        import json
        import os
        import sys

        from jaxtrain.trace_summary import format_trace_summary, summarize_trace

        if not self.traced_steps:
            return None
        try:
            summary = summarize_trace(self.logdir, len(self.traced_steps))
        except Exception as e:  # noqa: BLE001  (a profile summary must never stop training)
            print(f"warning: could not summarize the profile in {self.logdir}: "
                  f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
            return None
        with open(os.path.join(self.logdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print(format_trace_summary(summary), flush=True)
        return summary


# ----------------------------------------------------------------------------- dry run


def param_count(params: Any) -> int:
    """Number of scalars in a params pytree (per model; a seed axis counts each seed)."""
    return int(sum(np.prod(np.shape(x), dtype=np.int64) for x in jax.tree.leaves(params)))


def param_bytes(params: Any) -> int:
    return int(sum(np.prod(np.shape(x), dtype=np.int64) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(params)))


def model_flops(fn: Callable[..., Any], *args: Any) -> float | None:
    """FLOPs of one call ``fn(*args)`` as written (model FLOPs, what MFU counts).

    Counted by XLA's HLO cost analysis of the unoptimized program lowered for the
    CPU backend from the shapes of ``args`` (nothing runs or compiles). Why not the
    compiled program's analysis: on a GPU it counts cuDNN convolutions and other
    library calls as 0 FLOPs, and the GPU plugin has no pre-compilation analysis.
    ``None`` where there is no CPU backend or the analysis is missing.
    """
    try:
        cpu = jax.local_devices(backend="cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS excludes the CPU
        return None
    on_cpu = jax.sharding.SingleDeviceSharding(cpu)
    specs = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=on_cpu), args)
    cost = jax.jit(fn).lower(*specs).cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def compiled_stats(compiled: Any) -> dict[str, float]:
    """FLOPs and memory of one compiled program (``jit(f).lower(...).compile()``), per device.

    ``flops``, ``transcendentals``, ``bytes_accessed`` come from XLA's cost
    analysis (each device runs the partitioned program once per step);
    ``*_bytes`` from its memory analysis, and ``footprint_bytes`` =
    arguments + outputs - aliased (donated) + temporaries: what the step needs
    resident on each device. Values XLA does not report are NaN.
    """
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
        cost = cost[0] if cost else {}
    cost = cost or {}
    out = {
        "flops": float(cost.get("flops", np.nan)),
        "transcendentals": float(cost.get("transcendentals", np.nan)),
        "bytes_accessed": float(cost.get("bytes accessed", np.nan)),
    }
    mem = compiled.memory_analysis()
    names = ("argument", "output", "alias", "temp", "generated_code")
    for name in names:
        value = getattr(mem, f"{name}_size_in_bytes", np.nan) if mem is not None else np.nan
        out[f"{name}_bytes"] = float(value)
    out["footprint_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                              + out["temp_bytes"])
    return out


def _size(n: float) -> str:
    if not np.isfinite(n):
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def format_dry_run(report: dict[str, Any]) -> str:
    """The lines ``--dry-run`` prints for a report built by ``dry_run.dry_run``."""
    r = report
    lines = [
        f"dry run: {r['model']} on {r['dataset']} {tuple(r['image_shape'])}, global batch "
        f"{r['global_batch_size']}, {r['strategy']} over {r['num_devices']} x {r['device_kind']}"
        + (f", {r['num_seeds']} seeds" if r.get("num_seeds", 1) > 1 else ""),
        f"parameters: {r['params']:,} ({_size(r['param_bytes'])})",
        (f"FLOPs per step: {r['flops_per_step']:.4g} ({r['flops_per_device']:.4g} per device, "
         "XLA cost analysis of the compiled step)"),
        (f"model FLOPs per step: {r['model_flops_per_step']:.4g} (one model, global batch, "
         "the step as written)" if r.get("model_flops_per_step") else
         "model FLOPs per step: n/a"),
        (f"memory per device: {_size(r['footprint_bytes'])} (arguments "
         f"{_size(r['argument_bytes'])} + outputs {_size(r['output_bytes'])} - donated "
         f"{_size(r['alias_bytes'])} + temporaries {_size(r['temp_bytes'])})"),
    ]
    if r.get("device_memory_bytes"):
        share = r["footprint_bytes"] / r["device_memory_bytes"]
        verdict = "fits" if share <= 1 else "DOES NOT FIT: lower --batch-size or use more devices"
        lines.append(f"device memory: {_size(r['device_memory_bytes'])} per device; the step "
                     f"needs {share:.1%} ({verdict})")
    return "\n".join(lines)
