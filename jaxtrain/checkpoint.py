"""Orbax checkpoints of a run: state leaves plus JSON metadata.

The state is saved as host arrays of one replica (no device axis), so a
checkpoint restores onto any device count or strategy: the loop places it with
``Strategy.replicate`` after restoring. Saves are asynchronous (Orbax writes on
a background thread and commits atomically: an interrupted save leaves a
temporary folder that is never taken for a checkpoint).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any
STATE, META = "state", "meta"


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


class Checkpointer:
    """Saves and restores ``{"state": pytree, "meta": json}`` under ``workdir/checkpoints``."""

    def __init__(self, workdir: str, *, keep: int = 2, read_only: bool = False):
        self.directory = checkpoint_dir(workdir)
        self._manager = ocp.CheckpointManager(
            self.directory,
            item_names=(STATE, META),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                create=not read_only,
                read_only=read_only,
                enable_async_checkpointing=not read_only,
            ),
        )

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, tree: PyTree, meta: Mapping[str, Any], *, force: bool = True) -> None:
        """Starts an asynchronous save of host arrays ``tree`` at ``step``."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                **{STATE: ocp.args.StandardSave(tree), META: ocp.args.JsonSave(dict(meta))}
            ),
            force=force,
        )

    def restore(self, step: int, target: PyTree | None = None) -> tuple[PyTree, dict[str, Any]]:
        """``(state tree, meta)`` at ``step``; with ``target`` (host arrays) the tree
        gets its structure (named tuples of optimizer states), else nested dicts."""
        state_args = (
            ocp.args.StandardRestore(target) if target is not None else ocp.args.StandardRestore()
        )
        out = self._manager.restore(
            step, args=ocp.args.Composite(**{STATE: state_args, META: ocp.args.JsonRestore()})
        )
        tree = jax.tree.map(np.asarray, out[STATE])
        return tree, dict(out[META])

    def wait(self) -> None:
        """Blocks until every started save is committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def load_params(workdir: str, step: int | None = None) -> PyTree:
    """The params pytree of a run's checkpoint (latest by default) as host numpy arrays.

    For a multi-seed run every leaf has a leading seed axis.
    """
    ckpt = Checkpointer(workdir, read_only=True)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None or step not in ckpt.all_steps():
            raise FileNotFoundError(
                f"no checkpoint{'' if step is None else f' at step {step}'} in {ckpt.directory}"
            )
        tree, _ = ckpt.restore(step)
        return tree["params"]
    finally:
        ckpt.close()
