"""Where a run continues from (``--resume``): the latest sound checkpoint whose config
matches, and ``metrics.jsonl`` cut back to it so the file reads as one run."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any

import jax

from jaxtrain import distributed
from jaxtrain.checkpoint import Checkpointer, Restored, checkpoint_dir, set_aside
from jaxtrain.config import ConfigError, TrainConfig
from jaxtrain.writers import cannot_write


def drop_records_after(path: str, step: int) -> None:
    """On resume at ``step`` (0: a fresh start): removes ``metrics.jsonl`` records of later
    steps (that work is redone), a ``test`` record at ``step`` (written after the last
    checkpoint: it comes again) and a line cut short by a kill, so the file reads as one
    run."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()

    def keep(line: str) -> bool:
        try:
            record = json.loads(line)
            at = int(record["step"])
        except (ValueError, KeyError, TypeError):
            return False
        return at < step or (at == step and record.get("split") != "test")

    kept = [line for line in lines if keep(line)]
    if len(kept) != len(lines):
        try:
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                f.writelines(kept)
            os.replace(path + ".tmp", path)
        except OSError as e:  # a read-only or immutable file: one line, the file as it was
            with contextlib.suppress(OSError):
                os.remove(path + ".tmp")
            raise cannot_write(path, e) from None


def check_shared_workdir(workdir: str) -> None:
    """Raises ``ConfigError`` when the processes see different checkpoint folders in
    ``workdir`` (each host's own disk rather than one shared folder). Resuming, they
    would part ways in Orbax's first barrier and wait there for good."""
    directory = checkpoint_dir(workdir)
    entries = sorted(os.listdir(directory)) if os.path.isdir(directory) else None
    if distributed.differing({"checkpoints": entries}):
        seen = (f"{len(entries)} item{'s' * (len(entries) != 1)} in checkpoints/"
                if entries is not None else "no checkpoints/ folder")
        raise ConfigError(
            f"the processes see different checkpoints in --workdir {workdir} (process "
            f"{jax.process_index()}: {seen}); it must be one folder that every process shares"
        )


def resume_point(config: TrainConfig, workdir: str, target: Any) -> Restored | None:
    """The checkpoint a run continues from under ``--resume``, or None to start fresh.

    Checks the saved config and every leaf shape against ``target`` before anything
    is written (``ConfigError`` names the first mismatch). Damaged newer checkpoints
    are set aside with a warning naming both steps."""
    directory = checkpoint_dir(workdir)
    found = None
    if os.path.isdir(directory):
        reader = Checkpointer(workdir, read_only=True)
        try:
            if config.resume == "never" and reader.all_steps():
                raise ConfigError(f"--resume never, but {directory} already holds checkpoints; "
                                  "use a new --workdir")
            if config.resume != "never":
                found = reader.restore_latest(
                    target, check=lambda meta: check_resumable(meta.get("config", {}), config)
                )
        finally:
            reader.close()
    if found is None:
        if config.resume == "must":
            raise ConfigError(f"--resume must, but {directory} holds no checkpoint")
        return None
    for step, reason in found.damaged:
        moved = set_aside(workdir, step) if jax.process_index() == 0 else None
        print(f"warning: the latest checkpoint, step {step}, is damaged ({reason}); falling back "
              f"to step {found.step}" + (f" (moved it to {moved})" if moved else ""),
              file=sys.stderr, flush=True)
    return found


def check_resumable(saved: dict[str, Any], config: TrainConfig) -> None:
    """Raises ``ConfigError`` naming the first field where a checkpoint's config differs."""
    current = config.to_dict()
    for name, value in current.items():
        if name in TrainConfig.RUNTIME_FIELDS:
            continue
        old = saved.get(name, value)
        if isinstance(value, tuple):
            old = tuple(old) if isinstance(old, list) else old
        if old != value:
            raise ConfigError(
                f"workdir holds checkpoints of a different run: --{name.replace('_', '-')} "
                f"was {old!r}, now {value!r} (use another --workdir)"
            )
