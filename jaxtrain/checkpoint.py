"""Orbax checkpoints of a run: state leaves, JSON metadata, and what is needed to trust them.

Layout: ``workdir/checkpoints/<step>/{state,meta,metrics}`` written by one
``ocp.CheckpointManager`` (``ocp.args.Composite`` of ``StandardSave`` +
``JsonSave``). ``<step>`` is the run's data position (batches consumed), which
equals the optimizer step unless a non-finite rollback happened.

- Any device count: the state is saved as host arrays of one replica (no device
  axis), so it restores onto any device count or strategy; the loop places it
  after restoring.
- Asynchronous: ``save`` returns once the caller's arrays are handed over; the
  device-to-host copy, a CRC32 per leaf and the Orbax write run on a background
  thread (one save in flight at a time). Callers pass arrays that nothing will
  donate or mutate (the loop passes a fresh device copy, see ``snapshot``).
- Atomic: Orbax writes into ``<step>.orbax-checkpoint-tmp-*`` and renames it when
  complete; a save interrupted at any point leaves no folder that looks complete.
- Verified: ``meta`` holds a CRC32 of every leaf; ``restore`` recomputes them, so
  truncated, deleted or altered files are reported as ``DamagedCheckpointError``
  and ``restore_latest`` falls back to the previous checkpoint.
- Keeps the last ``keep`` checkpoints plus the best one by a validation metric
  (Orbax ``preservation_policy``: ``LatestN`` or ``BestN``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import operator
import os
import shutil
import sys
import threading
import warnings
import zlib
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as ocp_policy

from jaxtrain.config import ConfigError

PyTree = Any
STATE, META = "state", "meta"
DAMAGED_DIR = "checkpoints.damaged"


class DamagedCheckpointError(RuntimeError):
    """A checkpoint whose files are missing, truncated or do not match their checksums."""

    exit_status = 1  # the CLI reports it in one line

    def __init__(self, step: int, reason: str):
        super().__init__(f"checkpoint at step {step} is damaged: {reason}")
        self.step, self.reason = step, reason


class Restored(NamedTuple):
    """What ``restore_latest`` found: the checkpoint used, and the newer damaged ones skipped."""

    step: int
    tree: PyTree
    meta: dict[str, Any]
    damaged: list[tuple[int, str]]  # (step, reason), newest first


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def state_tree(state: Any) -> dict[str, PyTree]:
    """The leaves of a ``TrainState`` that a checkpoint holds."""
    return {
        "step": state.step,
        "params": state.params,
        "model_state": state.model_state,
        "opt_state": state.opt_state,
    }


def snapshot(tree: PyTree, *, axis_name: str | None = None) -> tuple[PyTree, jnp.ndarray]:
    """A copy of ``tree`` in fresh buffers and whether every leaf is finite.

    Compile it like the train step; the copy can be written in the background
    while the next steps donate and overwrite the originals. Pure.
    """
    del axis_name  # every replica holds the same state
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    finite = jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)
    return jax.tree.map(jnp.copy, tree), finite


# ----------------------------------------------------------------------------- leaves


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def leaf_paths(tree: PyTree) -> list[tuple[str, Any]]:
    """``[("params/Dense_0/kernel", leaf), ...]``. Named tuples and tuples read like the
    dicts and lists Orbax stores them as, so saved and live trees compare by path."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [("/".join(_key_name(k) for k in path), leaf) for path, leaf in flat]


def crc32(x: Any) -> int:
    """CRC32 of an array's bytes (C order): equal bytes, equal value."""
    return zlib.crc32(memoryview(np.ascontiguousarray(x)).cast("B"))


def first_nonfinite(tree: PyTree) -> str | None:
    """Path of the first leaf of ``tree`` (host arrays) holding NaN or Inf, else None."""
    for path, x in leaf_paths(tree):
        x = np.asarray(x)
        if np.issubdtype(x.dtype, np.inexact) and not np.all(np.isfinite(x)):
            return path
    return None


# ----------------------------------------------------------------------------- manager


class Checkpointer:
    """Saves and restores ``{"state": pytree, "meta": json}`` under ``workdir/checkpoints``.

    ``keep``: how many of the latest checkpoints to keep; ``best_metric`` (a key
    of the ``metrics`` passed to ``save``, e.g. ``"val_accuracy"``; ``""`` for
    none) and ``best_mode`` (``max`` or ``min``) also keep the best one.
    ``read_only`` opens without creating or changing anything.
    """

    def __init__(
        self,
        workdir: str,
        *,
        keep: int = 2,
        best_metric: str = "",
        best_mode: str = "max",
        read_only: bool = False,
    ):
        self.directory = checkpoint_dir(workdir)
        self.best_metric = best_metric
        policies: list[ocp_policy.PreservationPolicy] = [ocp_policy.LatestN(n=keep)]
        best_fn = None
        if best_metric:
            worst = -math.inf if best_mode == "max" else math.inf

            def best_fn(metrics: Mapping[str, float]) -> float:
                return float(metrics.get(best_metric, worst))

            policies.append(
                ocp_policy.BestN(get_metric_fn=best_fn, reverse=best_mode == "min", n=1)
            )
        handlers = {STATE: ocp.StandardCheckpointHandler(), META: ocp.JsonCheckpointHandler()}
        with _quiet_orbax():  # read-only mode logs two warnings that are expected here
            options = ocp.CheckpointManagerOptions(
                preservation_policy=ocp_policy.AnyPreservationPolicy(policies),
                best_fn=best_fn,  # makes Orbax store metrics, so the best survives a restart
                best_mode=best_mode,
                create=not read_only,
                read_only=read_only,
                cleanup_tmp_directories=not read_only,
                enable_async_checkpointing=False,  # saves already run on our own thread
            )
            self._manager = ocp.CheckpointManager(
                self.directory, item_handlers=handlers, options=options
            )
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_step: int | None = self._manager.latest_step()

    @property
    def tracks_best(self) -> bool:
        return bool(self.best_metric)

    # ------------------------------------------------------------------ queries

    def all_steps(self) -> list[int]:
        self.wait()
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        self.wait()
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        self.wait()
        return self._manager.best_step() if self.tracks_best else None

    # ------------------------------------------------------------------ save

    def save(
        self,
        step: int,
        tree: PyTree | Callable[[], PyTree],
        meta: Mapping[str, Any],
        *,
        metrics: Mapping[str, float] | None = None,
    ) -> None:
        """Starts saving ``tree`` at ``step`` and returns.

        ``tree`` is host or device arrays, or a function returning them (called
        on the background thread, e.g. the device-to-host copy). ``metrics``
        (floats) rank checkpoints for ``best_metric``. Waits for the previous
        save first and re-raises its error, if any.
        """
        self.wait()
        if callable(tree) and jax.process_count() > 1:
            tree = tree()  # may run collectives: keep them in program order on every process
        metrics = {k: float(v) for k, v in (metrics or {}).items()}
        meta = dict(meta)

        def write() -> None:
            host = jax.tree.map(np.asarray, tree() if callable(tree) else tree)
            checksums = {path: crc32(x) for path, x in leaf_paths(host)}
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    **{
                        STATE: ocp.args.StandardSave(host),
                        META: ocp.args.JsonSave({**meta, "checksums": checksums}),
                    }
                ),
                metrics=metrics if self.tracks_best else None,
                force=True,
            )

        def run() -> None:
            try:
                write()
            except BaseException as e:  # noqa: BLE001 (surfaced by the next wait())
                self._error = e

        self.last_step = step
        self._thread = threading.Thread(target=run, name=f"checkpoint-{step}")
        self._thread.start()

    def wait(self) -> None:
        """Blocks until the save in flight (if any) is committed; re-raises its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._manager.close()

    # ------------------------------------------------------------------ restore

    def read_meta(self, step: int) -> dict[str, Any]:
        """The JSON metadata of ``step`` (raises ``DamagedCheckpointError``)."""
        self.wait()
        try:
            args = ocp.args.Composite(**{META: ocp.args.JsonRestore()})
            meta = self._manager.restore(step, args=args)[META]
        except Exception as e:  # noqa: BLE001 (Orbax raises many types for broken files)
            raise DamagedCheckpointError(step, _reason(e)) from None
        if not isinstance(meta, dict):
            raise DamagedCheckpointError(step, "its metadata is not a JSON object")
        return dict(meta)

    def check_fits(self, step: int, target: PyTree) -> None:
        """Raises ``ConfigError`` naming the first leaf whose shape or dtype differs
        between checkpoint ``step`` and ``target`` (or is missing in one of them)."""
        try:
            saved_tree = self._manager.item_metadata(step)[STATE].tree
        except Exception as e:  # noqa: BLE001
            raise DamagedCheckpointError(step, _reason(e)) from None
        saved = dict(leaf_paths(saved_tree))
        # params first: a model change shows there before in the optimizer state
        here = dict(sorted(leaf_paths(target), key=lambda kv: not kv[0].startswith("params/")))
        where = f"the checkpoint at step {step} in {self.directory}"
        for path, x in here.items():
            if path not in saved:
                raise ConfigError(f"{where} does not fit this model: it has no {path}")
            old = saved[path]
            if tuple(old.shape) != np.shape(x) or np.dtype(old.dtype) != np.asarray(x).dtype:
                raise ConfigError(
                    f"{where} does not fit this model: {path} is {np.dtype(old.dtype)}"
                    f"{list(old.shape)} there, {np.asarray(x).dtype}{list(np.shape(x))} here"
                )
        for path in saved:
            if path not in here:
                raise ConfigError(f"{where} does not fit this model: {path} is not in this model")

    def restore(self, step: int, target: PyTree | None = None) -> tuple[PyTree, dict[str, Any]]:
        """``(state tree, meta)`` at ``step``, checked against the saved checksums.

        With ``target`` (host arrays) the tree gets its structure (named tuples
        of optimizer states); else nested dicts and lists. Raises
        ``DamagedCheckpointError`` when a file is missing, truncated or altered.
        """
        meta = self.read_meta(step)
        state_args = (
            ocp.args.StandardRestore(target) if target is not None else ocp.args.StandardRestore()
        )
        # Before, not after, a failure: reads that finish while the failure is on its way
        # up call into the closed loop too (8 tracebacks leaked in a loaded CI run).
        _drop_closed_loop_callbacks()
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(**{STATE: state_args}))
            tree = jax.tree.map(np.asarray, out[STATE])
        except Exception as e:  # noqa: BLE001
            raise DamagedCheckpointError(step, _reason(e)) from None
        checksums = meta.get("checksums")
        if not isinstance(checksums, dict):
            raise DamagedCheckpointError(step, "its metadata has no checksums")
        for path, x in leaf_paths(tree):
            if checksums.get(path) != crc32(x):
                raise DamagedCheckpointError(step, f"{path} does not match its checksum")
        return tree, meta

    def restore_latest(
        self,
        target: PyTree | None = None,
        check: Callable[[dict[str, Any]], None] | None = None,
    ) -> Restored | None:
        """The newest checkpoint that restores intact; ``None`` when there is none.

        Damaged ones are skipped (listed in ``Restored.damaged``). ``check(meta)``
        and the shapes of ``target`` are checked first for each candidate: a
        mismatch raises ``ConfigError`` (nothing is changed on disk). Raises
        ``ConfigError`` when checkpoints exist but every one is damaged.
        """
        damaged: list[tuple[int, str]] = []
        for step in reversed(self.all_steps()):
            try:
                meta = self.read_meta(step)
                if check is not None:
                    check(meta)
                if target is not None:
                    self.check_fits(step, target)
                tree, meta = self.restore(step, target)
            except DamagedCheckpointError as e:
                damaged.append((step, e.reason))
                continue
            return Restored(step, tree, meta, damaged)
        if damaged:
            listed = "; ".join(f"step {s}: {r}" for s, r in damaged)
            raise ConfigError(
                f"every checkpoint in {self.directory} is damaged ({listed}); "
                "move the folder away to start over"
            )
        return None


@contextlib.contextmanager
def _quiet_orbax():
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _is_closed_loop_callback(u: Any) -> bool:
    """An asyncio ``call_soon_threadsafe`` on a closed loop: a read that finished after
    a failed restore's event loop had ended."""
    tb = u.exc_traceback
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return (isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed"
            and tb is not None and "asyncio" in tb.tb_frame.f_code.co_filename)


def _drop_closed_loop_callbacks() -> None:
    """Silences what a failed Orbax restore leaves behind, for the rest of the process
    (installed by the first restore).

    When one read of a damaged checkpoint fails, Orbax's restore ends its asyncio
    loop while tensorstore's other reads are in flight. Each one that finishes
    later (after the restore returned) calls ``call_soon_threadsafe`` on the closed
    loop from a tensorstore thread, and Python prints an "Event loop is closed"
    traceback through ``sys.unraisablehook``: 10-30 of them above the one-line
    fallback warning. Only that exception, raised in asyncio, is dropped; anything
    else goes to the previous hook. Installed once.
    """
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop_callbacks", False):
        return

    def hook(u: Any) -> None:
        if not _is_closed_loop_callback(u):
            previous(u)

    hook.drops_closed_loop_callbacks = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def set_aside(workdir: str, step: int) -> str | None:
    """Moves damaged checkpoint ``step`` to ``workdir/checkpoints.damaged/`` (kept for
    inspection, out of Orbax's sight); returns where it went."""
    source = os.path.join(checkpoint_dir(workdir), str(step))
    if not os.path.isdir(source):
        return None
    dest_root = os.path.join(os.path.abspath(workdir), DAMAGED_DIR)
    os.makedirs(dest_root, exist_ok=True)
    dest, n = os.path.join(dest_root, str(step)), 1
    while os.path.exists(dest):
        dest, n = os.path.join(dest_root, f"{step}.{n}"), n + 1
    shutil.move(source, dest)
    return dest


def _load_tree(workdir: str, step: int | None) -> PyTree:
    """The state tree of checkpoint ``step`` (newest intact one for None; warns about
    damaged newer ones) as host arrays in nested dicts."""
    if (original := step) is not None:
        try:  # an int or numpy integer; 20.0 or "20" would miss Orbax's step folders
            step = None if isinstance(step, bool) else operator.index(step)
        except TypeError:
            step = None
        if step is None:
            raise TypeError(f"step must be an int or None, got {original!r}")
    if not os.path.isdir(checkpoint_dir(workdir)):
        raise FileNotFoundError(f"no checkpoint in {checkpoint_dir(workdir)}")
    ckpt = Checkpointer(workdir, read_only=True)
    try:
        if step is None:
            found = ckpt.restore_latest()
            if found is None:
                raise FileNotFoundError(f"no checkpoint in {ckpt.directory}")
            for bad, reason in found.damaged:
                warnings.warn(f"skipped damaged checkpoint at step {bad} ({reason}); "
                              f"using step {found.step}", stacklevel=3)
            return found.tree
        if step not in ckpt.all_steps():
            raise FileNotFoundError(f"no checkpoint at step {step} in {ckpt.directory}")
        return ckpt.restore(step)[0]
    finally:
        ckpt.close()


def load_params(workdir: str, step: int | None = None) -> PyTree:
    """The params pytree of a run's checkpoint as host numpy arrays.

    ``step=None`` takes the newest intact checkpoint (warning about damaged newer
    ones). For a multi-seed run every leaf has a leading seed axis.
    """
    return _load_tree(workdir, step)["params"]


def load_variables(workdir: str, step: int | None = None) -> PyTree:
    """The model variables of a run's checkpoint, ``{"params": ..., **model_state}`` (e.g.
    ``batch_stats``), as host numpy arrays ready for ``model.apply``.

    Picks the checkpoint as ``load_params`` does; for a multi-seed run every leaf has a
    leading seed axis. (Used by the robustness suite.)
    """
    tree = _load_tree(workdir, step)
    return {"params": tree["params"], **(tree.get("model_state") or {})}
