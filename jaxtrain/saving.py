"""The loop's checkpoint cadence: what it writes to its ``Checkpointer`` and when.

Periodic and final saves, the best one (``--best-metric``, held up to
``BEST_WRITE_INTERVAL_S``), the save at preemption, and ``--on-nonfinite
rollback``'s restore. Every save snapshots the state on the devices first and
writes in the background; a state that is not finite is never written.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxtrain.checkpoint import Checkpointer, first_nonfinite, state_tree
from jaxtrain.config import TrainConfig
from jaxtrain.nonfinite import NonFiniteError, TrainWindow

# A best checkpoint (--best-metric) found within this many seconds of the last best
# write is held as a device copy and written later: at the first improving validation
# after the interval, before any other checkpoint (periodic, preemption, final,
# rollback) and when the run stops. The digits MLP's validation improved 3 times
# before its last step, within ~2 s; writing each at once (a background thread
# contending with the steps on 2 cores) made a fresh run's loop 2.17 s instead of
# 1.90 s (medians of 6). The files left at the end are the same (the best and the
# latest --keep-checkpoints); what a kill -9 can lose grows by this interval.
BEST_WRITE_INTERVAL_S = 30.0


class Saves:
    """The checkpoints of one run, over ``ckpt``.

    ``snapshot``: compiled ``checkpoint.snapshot`` (a device copy and whether it is
    finite); ``get``: devices -> host; ``key``: the placed per-step key, saved as
    ``rng``; ``initial``: the host tree a rollback before any checkpoint returns to;
    ``restore``: such a tree -> the placed train state; ``window``: its count of
    consecutive non-finite steps and its steps not yet flushed go into each
    checkpoint's metadata."""

    def __init__(self, ckpt: Checkpointer, config: TrainConfig, *, best_mode: str,
                 per_epoch: int, snapshot: Callable[[Any], Any], get: Callable[[Any], Any],
                 key: Any, initial: dict[str, Any], restore: Callable[[dict[str, Any]], Any],
                 start_step: int, window: TrainWindow) -> None:
        self.ckpt, self.config, self.best_mode, self.per_epoch = ckpt, config, best_mode, per_epoch
        self._snapshot, self._get, self._key = snapshot, get, key
        self._initial, self._restore, self._start_step = initial, restore, start_step
        self._window = window
        self._held: tuple | None = None  # a best checkpoint not written yet (_take's tuple)
        self._last_best_write = time.monotonic()
        self._best: float | None = None  # best --best-metric value so far in this process

    def _take(self, step: int, state: Any, val: dict[str, Any] | None) -> tuple | None:
        """A checkpoint of ``state`` at data position ``step``, ready to write: a device
        copy (nothing donates it), its metadata and metrics; None when it is not finite."""
        copy, finite = self._snapshot({**state_tree(state), "rng": self._key})
        if not np.all(self._get(finite)):
            return None
        meta = {"config": self.config.to_dict(), "step": step, "epoch": step // self.per_epoch,
                "index_in_epoch": step % self.per_epoch,
                "skipped_in_a_row": self._window.skipped_in_a_row,
                "train_window": self._window.pending()}  # [] unless between flushes
        metrics = {f"val_{k}": float(np.mean(v)) for k, v in (val or {}).items()}
        return step, copy, meta, metrics

    def _write(self, taken: tuple) -> None:
        """Starts the asynchronous write: the loop waits only for the previous one."""
        step, copy, meta, metrics = taken
        self.ckpt.save(step, lambda: self._get(copy), meta, metrics=metrics)

    def _write_held(self) -> None:
        """Writes the held best checkpoint, if any (before any later one, so steps rise)."""
        if self._held is not None:
            held, self._held = self._held, None
            self._write(held)
            self._last_best_write = time.monotonic()

    def save(self, step: int, state: Any, val: dict[str, Any] | None = None) -> bool:
        """Writes a checkpoint at ``step`` (after the held best, if any); returns False,
        writing nothing new, when the state is not finite."""
        if self._held is not None and self._held[0] == step:  # the held best is this state
            self._write_held()
            return True
        taken = self._take(step, state, val)
        if taken is None:
            return False
        self._write_held()
        self._write(taken)
        return True

    def improves_best(self, val: dict[str, Any]) -> bool:
        """True when ``val`` beats every earlier validation: only then is a best save worth
        its cost (a save per validation was most of the loop's overhead on small models)."""
        if not self.ckpt.tracks_best:
            return False
        value = float(np.mean(val[self.config.best_metric.removeprefix("val_")]))
        best = self._best
        better = best is None or (value > best if self.best_mode == "max" else value < best)
        if better:
            self._best = value
        return better

    def checkpoint(self, step: int, state: Any, val: dict[str, Any] | None = None, *,
                   best: bool = False) -> Any:
        """Saves ``state``, or applies ``--on-nonfinite`` to a state that is not finite
        (never written): returns the state to go on with. A ``best`` one found within
        ``BEST_WRITE_INTERVAL_S`` of the last best write is held instead (one process
        only: the others would have to decide alike)."""
        if (best and jax.process_count() == 1
                and time.monotonic() - self._last_best_write < BEST_WRITE_INTERVAL_S):
            taken = self._take(step, state, val)
            if taken is not None:
                self._held = taken  # a newer best replaces the one held
                return state
        elif self.save(step, state, val):
            if best:
                self._last_best_write = time.monotonic()
            return state
        where = first_nonfinite(state_tree(self._get(state)))
        if self.config.on_nonfinite == "rollback":
            return self.rollback(step, step)
        raise NonFiniteError(f"the state at step {step} holds non-finite values ({where}); "
                             "not saving it (try --on-nonfinite rollback or a lower --lr)")

    def rollback(self, bad: int, step: int) -> Any:
        """``--on-nonfinite rollback``: the last checkpoint's state (the initial one before
        any), placed on devices; the data position stays at ``step``. The optimizer step
        goes back with the state, so later checkpoints are numbered ahead of it."""
        self._write_held()
        found = self.ckpt.restore_latest(self._initial)
        source, tree = (found.step, found.tree) if found is not None else (
            self._start_step, self._initial)
        print(f"warning: non-finite loss or gradient at step {bad}: rolled back to the checkpoint "
              f"of step {source}, continuing with the batch of step {step + 1}",
              file=sys.stderr, flush=True)
        return self._restore(tree)

    def at_preemption(self, step: int, state: Any) -> bool:
        """Saves ``step`` unless it is saved already, and waits for every write to finish.
        False when the state is not finite (nothing saved)."""
        saved = self.ckpt.last_step == step or self.save(step, state)
        self.ckpt.wait()
        return saved

    def final(self, step: int, state: Any, val: dict[str, Any] | None) -> None:
        """Saves the last step unless it is saved already; raises when it is not finite."""
        if self.ckpt.last_step != step and not self.save(step, state, val):
            raise NonFiniteError(f"the final state holds non-finite values "
                                 f"({first_nonfinite(state_tree(self._get(state)))}); not saved")

    def wait(self) -> None:
        self.ckpt.wait()

    def finish(self) -> None:
        """Starts writing the held best, if any, as the run ends, however it ends (the
        caller closes the checkpointer, which waits for it). Never raises: a run that
        failed has its own error to report."""
        if self._held is not None:
            held_step = self._held[0]
            try:
                self._write_held()
            except Exception as e:  # noqa: BLE001
                print(f"warning: the best checkpoint of step {held_step} was not written: {e}",
                      file=sys.stderr, flush=True)
