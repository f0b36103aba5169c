"""Entry point shared by every experiment: parse flags, run, map errors to exit codes.

Exit status: 0 on success; 2 on bad input (one ``error: ...`` line on stderr, no
traceback, nothing in the workdir touched); 1 on any other failure, with its
traceback (one line when a collective failed because another process of the run
ended); 130 on Ctrl-C. Bad input is a ``ValueError`` or ``FileNotFoundError``
raised by jaxtrain's (or an experiment's) own code: ``ConfigError``,
``DataError``, ``ParallelError`` and the like. The same types raised inside a
library (JAX, Orbax, ...) are bugs or environment failures and keep their
traceback. An exception class may set ``exit_status`` to be reported in one
line with that status.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from jaxtrain import peers
from jaxtrain.config import TrainConfig, parse_config

# Raised by our own code, these mean "the input was bad".
USAGE_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)
_OWN_MODULES = ("jaxtrain", "experiments", "__main__")
DETERMINISTIC_XLA_FLAG = "--xla_gpu_deterministic_ops=true"


def exit_status(error: BaseException) -> int | None:
    """2 when ``error`` is bad input, its class's ``exit_status`` if set, else None."""
    status = getattr(type(error), "exit_status", None)
    if isinstance(status, int):
        return status
    if not isinstance(error, USAGE_ERRORS):
        return None
    if type(error).__module__.split(".")[0] in _OWN_MODULES:
        return 2  # ConfigError, DataError, ParallelError, ...
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    raised_in = tb.tb_frame.f_globals.get("__name__", "") if tb is not None else ""
    return 2 if raised_in.split(".")[0] in _OWN_MODULES else None


# A cross-process collective whose peer ended (gloo, the CPU collectives) fails with one
# of these: the cause is in that process's own output, and the traceback here is noise.
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer")


def peer_gone(error: BaseException) -> bool:
    """True when ``error`` is a collective failing because another process ended."""
    text = str(error)
    return "Gloo" in text and any(s in text for s in _PEER_GONE)


def one_line(error: BaseException) -> str:
    """The error's message on one line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(lines) or type(error).__name__


@contextlib.contextmanager
def deterministic_mode(enabled: bool) -> Iterator[None]:
    """Deterministic GPU kernels and full-precision matmuls while the body runs.

    ``--xla_gpu_deterministic_ops`` is read from ``XLA_FLAGS`` when JAX starts
    its backend, so it is added here, before the first device is touched; if the
    backend is already up (a notebook, a test) it warns on a GPU that the flag
    cannot take effect. The matmul precision is scoped to the body.
    """
    if not enabled:
        yield
        return
    import jax

    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_gpu_deterministic_ops" not in flags:
        if _backend_started():
            if jax.default_backend() == "gpu":
                print(
                    "warning: --deterministic: JAX's backend already started, so XLA_FLAGS "
                    f"cannot change; start Python with XLA_FLAGS={DETERMINISTIC_XLA_FLAG}",
                    file=sys.stderr,
                )
        else:
            os.environ["XLA_FLAGS"] = f"{flags} {DETERMINISTIC_XLA_FLAG}".strip()
    with jax.default_matmul_precision("highest"):
        yield


def _backend_started() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # private API moved: assume the worst
        return True


def run(
    config_type: type[TrainConfig],
    defaults: TrainConfig,
    argv: Sequence[str] | None,
    *,
    prog: str,
    body: Callable[[Any], Any] | None = None,
) -> int:
    """Parses ``argv`` into a config and calls ``body(config)`` (default: train_and_evaluate).

    Returns the exit status (see the module docstring); never raises except
    ``SystemExit`` from ``body``'s own sys.exit codes, which it returns too."""
    if _release_held_interrupt():
        print("error: interrupted", file=sys.stderr)
        return 130
    try:
        config = parse_config(config_type, defaults, argv, prog)
        with deterministic_mode(config.deterministic):
            if body is None:
                from jaxtrain.loop import train_and_evaluate

                body = train_and_evaluate
            body(config)
    except SystemExit as e:  # --help, or a body that exits on purpose
        if e.code is None or isinstance(e.code, int):
            return int(e.code or 0)
        print(f"error: {e.code}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return _failed(130)
    except Exception as e:  # noqa: BLE001  (every failure gets an exit status)
        status = exit_status(e)
        if status is None and peer_gone(e):
            print(f"error: another process of this run ended ({one_line(e)}); its own output "
                  "says why; rerun the same command on every process to resume",
                  file=sys.stderr)
            return _failed(1)
        if status is None:
            traceback.print_exc()
            return _failed(1)
        print(f"error: {one_line(e)}", file=sys.stderr)
        return _failed(status)
    return 0


def _release_held_interrupt() -> bool:
    """Gives Ctrl-C back its default (``KeyboardInterrupt``) if ``experiments`` held it
    while the experiment imported; True when one came meanwhile."""
    handler = signal.getsignal(signal.SIGINT)
    held = getattr(handler, "held", None)
    if held is None or threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(signal.SIGINT, signal.default_int_handler)
    return bool(held)


def _failed(status: int) -> int:
    """``status``; but a process of a multi-process run exits with it at once.

    Its peers may be waiting in a collective it will never join. Exiting normally,
    it waited for them in JAX's shutdown barrier, 5 minutes, before every process
    aborted with a C++ stack trace. Gone at once, its failure shows at once (a
    scheduler can end the job), and it tells the peers, which end in one line each
    (``jaxtrain.peers``; before, JAX aborted them when its heartbeats stopped, ~100 s)."""
    jax = sys.modules.get("jax")  # not imported: no process group (and no import for it)
    if jax is None or not jax.distributed.is_initialized():
        return status
    from jax._src.distributed import global_state  # not process_count(): it starts devices

    if global_state.num_processes == 1:
        return status
    peers.leaving()  # the others may fail alike meanwhile (bad input): not their news
    sys.stdout.flush()
    sys.stderr.flush()
    distributed = sys.modules.get("jaxtrain.distributed")
    start_failed = distributed is not None and distributed.start_failed()
    # A process that could not start waits as long as the others may take to find out
    # (their data loads), not only BAD_INPUT_WAIT_S: leaving, process 0 ends the service.
    # After Ctrl-C, leaving soon matters more.
    wait_s = (distributed.START_WAIT_S if start_failed and status != 130
              else BAD_INPUT_WAIT_S)
    if (status == 2 or start_failed) and _every_process_failed_alike(wait_s):
        with contextlib.suppress(Exception):
            jax.distributed.shutdown()  # every process is here: a quick, clean goodbye
    else:
        peers.failed(status)  # ends the others now, in one line each (jaxtrain.peers)
    os._exit(status)


BAD_INPUT_WAIT_S = 30


def _every_process_failed_alike(wait_s: float = BAD_INPUT_WAIT_S) -> bool:
    """True when every process of the run reached this exit barrier too (within ``wait_s``):
    on bad input, and after a process could not start (``distributed.start_together``).

    Bad input is found alike on every process: the same flags meet the same checks,
    some of them (the batch over the global device count, the flags compared between
    processes) only after the processes joined. Process 0 hosts the coordination
    service; when it left first, the others aborted with SIGABRT and a C++ trace
    instead of exiting 2 (2 of 22 tries in an audit).
    Meeting here first lets them all leave through JAX's shutdown, which ends the
    service last. ``jax._src``: jax has no public handle on its coordination client."""
    try:
        from jax._src.distributed import global_state  # the client jax.distributed made

        global_state.client.wait_at_barrier("jaxtrain:bad-input", int(wait_s * 1000))
    except Exception:  # noqa: BLE001  (a peer did not come, or the service is gone)
        return False
    return True


def main_guard(code: int) -> None:
    """``sys.exit(code)`` for ``if __name__ == "__main__"`` blocks."""
    sys.exit(code)
