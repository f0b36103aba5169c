"""Stopping on SIGTERM/SIGINT at a step boundary: ``PreemptionGuard`` tells the loop
when to save and exit, ``Preempted`` is the exit (status 128 + signal), so a
scheduler requeues the job and the same command resumes."""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

import jax


class Preempted(SystemExit):
    """The run stopped on SIGTERM/SIGINT after committing a checkpoint.

    A ``SystemExit`` with status 128 + signal number (143 for SIGTERM, 130 for
    SIGINT), so the command exits non-zero and a scheduler (SLURM ``--requeue``)
    restarts it; rerunning the same command resumes.
    """

    def __init__(self, signum: int, step: int, message: str):
        super().__init__(128 + signum)
        self.signum, self.step, self.message = signum, step, message


class PreemptionGuard:
    """While installed, the first SIGTERM or SIGINT only sets ``signum`` (the loop saves
    at the next call boundary where ``due``); a second one gets the default action and
    ends the process at once. Installed by the loop in the main thread only, then restored.

    Several processes must all save the same step, though a signal reaches each at its
    own moment (or only one of them); saving where each stopped, they met in different
    Orbax barriers and hung (2 processes x 2 CPU devices, one SIGTERM each). So there
    SIGTERM is left to JAX's preemption notifier (set up by ``jax.distributed``), a
    SIGINT is passed on to it as a SIGTERM, and ``due`` is JAX's preemption sync point:
    true at the same call on every process. From then on SIGTERM is handled as for one
    process: a notice, and a second one ends the process at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, processes: int = 1) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self.synced = processes > 1 and bool(
            getattr(jax.config, "jax_enable_preemption_service", False))  # off: as one process
        self._asked: tuple[int, bool] = (-1, False)  # (call, answer) of the last sync point

    def install(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT,) if self.synced else self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def due(self, call: int) -> bool:
        """Whether to save and exit after call number ``call`` (0, 1, ... on every
        process): once a signal came, or with several processes at the call JAX's
        preemption sync picks after any process got a notice (asked once per call;
        asking again gives the same answer, so every process acts alike)."""
        if not self.synced:
            return self.signum is not None
        if self._asked[0] != call:
            from jax.experimental import multihost_utils

            self._asked = (call, multihost_utils.reached_preemption_sync_point(call))
            if self._asked[1]:
                self.signum = self.signum or signal.SIGTERM
                self._second_sigterm_ends()
        return self._asked[1]

    def _second_sigterm_ends(self) -> None:
        """Every process stops now, and no sync point follows: a SIGTERM that comes during
        the save gets the single-process treatment, a notice, and a second one ends the
        process at once (JAX's notifier only recorded them; its peers hear of the end
        through ``jaxtrain.peers``). The first is not fatal: a scheduler's SIGTERM may
        reach this process only now, after another process's started the stop."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._handle_late)

    def _handle_late(self, signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        print("received SIGTERM: every process is already saving a checkpoint, then exiting "
              "(send it again to exit at once)", file=sys.stderr, flush=True)

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        for s in self._previous:
            signal.signal(s, signal.SIG_DFL)
        print(f"received {signal.Signals(signum).name}: saving a checkpoint at the next step "
              "boundary, then exiting (send it again to exit at once)", file=sys.stderr, flush=True)
        if self.synced:  # to JAX's preemption notifier, which tells every process
            os.kill(os.getpid(), signal.SIGTERM)


def sigterm_ends_the_process() -> None:
    """Gives SIGTERM its default action (the process ends at once, status 143) in a
    multi-process run, for work after training that has nothing to save.

    ``jax.distributed`` hands SIGTERM to JAX's preemption notifier, which only
    records it for the next sync point; after the loop none comes, so a signal during
    the robustness suite was ignored (both processes ran on ~55 s to exit 0, where one
    process exits at once; a scheduler's grace period ends in SIGKILL). Call it from
    the main thread when no training follows in this process: Python cannot put the
    notifier's handler back."""
    if jax.process_count() > 1 and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
