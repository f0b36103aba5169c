"""A process of a multi-process run killed mid-training: how long until the others end, and how.

    python -m benchmarks.peer_death                       # watched (default) and unwatched
    python -m benchmarks.peer_death --watch on --rounds 3
    python -m benchmarks.peer_death --signal STOP --watch on   # frozen, as a vanished host

Each round starts ``experiments.digits_mlp`` as 2 processes x 2 CPU devices on
127.0.0.1 (gloo), waits until process 0 logs step ``--kill-at``, sends SIGKILL (or
``--signal STOP``: frozen, its connections left open, as when its host vanishes) to
process ``--victim`` and times the survivor's end: seconds after the signal, its exit
status and its last stderr line. ``--watch on`` is the CLI as users run it
(``jaxtrain.peers`` watches the processes); ``off`` joins with
``distributed.initialize(watch_peers=False)`` first, as before the watch (the
survivor waits in the step's collective until JAX's heartbeat timeout aborts it).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

from benchmarks import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child(watch: str, argv: list[str]) -> int:
    """One process of the run: joins (watched or not), then the digits-MLP CLI."""
    from jaxtrain import distributed

    flags = dict(zip(argv[::2], argv[1::2]))
    distributed.initialize(flags["--coordinator-address"], int(flags["--num-processes"]),
                           int(flags["--process-id"]), watch_peers=watch == "on",
                           peer_timeout_s=float(flags["--peer-timeout"]))
    from experiments import digits_mlp

    return digits_mlp.main(argv)


def one_round(watch: str, victim: int, kill_at: int, epochs: int, timeout: float,
              sig: str = "KILL", peer_timeout: float = 30.0) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as workdir:
        port = _free_port()
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
               "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
        procs = [subprocess.Popen(
            [sys.executable, "-m", "benchmarks.peer_death", "--child", watch,
             "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2",
             "--process-id", str(pid), "--workdir", workdir, "--epochs", str(epochs),
             "--parallel", "mesh", "--compilation-cache", "", "--progress", "log",
             "--log-every", "5", "--peer-timeout", str(peer_timeout)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for pid in (0, 1)]
        try:
            step = None
            for line in procs[0].stdout:  # only process 0 logs
                if (m := re.match(r"step (\d+) train", line)) and int(m.group(1)) >= kill_at:
                    step = int(m.group(1))
                    break
            if step is None:
                raise common.BenchmarkError("the run ended before step "
                                            f"{kill_at}: {procs[0].stderr.read()[-2000:]}")
            procs[victim].send_signal(getattr(signal, f"SIG{sig}"))
            killed = time.perf_counter()
            survivor = procs[1 - victim]
            _, err = survivor.communicate(timeout=timeout)
            took = time.perf_counter() - killed
        finally:
            for p in procs:
                p.kill()  # a stopped process too
                p.communicate()
    lines = err.strip().splitlines()
    return {"watch": watch, "victim": victim, "signal": sig, "peer_timeout": peer_timeout,
            "killed_at_step": step,
            "survivor_status": survivor.returncode, "seconds_after_signal": took,
            "survivor_last_line": lines[-1] if lines else "",
            "traceback_or_abort": "Traceback" in err or survivor.returncode == -6}


def _watch_list(text: str) -> list[str]:
    values = common.str_list(text)
    if not values or any(v not in ("on", "off") for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: a list of on / off")
    return values


def parse_args(argv):
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--watch", type=_watch_list, default=["on", "off"],
                   help="variants, alternated per round: on (the CLI's default), off")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--victim", type=int, choices=(0, 1), default=1)
    p.add_argument("--kill-at", type=int, default=30, help="signal once process 0 logs this step")
    p.add_argument("--signal", choices=("KILL", "STOP"), default="KILL",
                   help="KILL: the process ends; STOP: it freezes, closing nothing")
    p.add_argument("--peer-timeout", type=float, default=30.0,
                   help="the run's --peer-timeout (seconds)")
    p.add_argument("--epochs", type=int, default=200, help="long enough to be killed mid-run")
    p.add_argument("--timeout", type=float, default=400, help="seconds to wait for the survivor")
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--child"]:  # the digits-MLP CLI's own flags follow
        return child(argv[1], argv[2:])
    args = parse_args(argv)
    info = common.machine_info(args.note)
    runs = []
    variants = ["on"] if args.smoke else args.watch  # off waits out JAX's heartbeat timeout
    for r in range(1 if args.smoke else args.rounds):
        for watch in variants:
            run = one_round(watch, args.victim, 5 if args.smoke else args.kill_at,
                            args.epochs, args.timeout, args.signal, args.peer_timeout)
            run["round"] = r
            runs.append(run)
            print(f"round {r} watch {watch}: status {run['survivor_status']} "
                  f"{run['seconds_after_signal']:.2f} s after SIG{args.signal}: "
                  f"{run['survivor_last_line']}", flush=True)
    common.print_table(
        f"survivor of a SIG{args.signal} mid-training (2 processes x 2 CPU devices, "
        f"--peer-timeout {args.peer_timeout:g})",
        ["watch", "round", "status", "s after signal", "last line"],
        [[r["watch"], r["round"], r["survivor_status"], common.fmt(r["seconds_after_signal"]),
          r["survivor_last_line"][:90]] for r in runs])
    common.write_results("peer_death", args, info, {"runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
