"""``saving.Saves``, the loop's checkpoint cadence, on its own: a stand-in checkpointer,
no devices, no files. The same behaviour end to end is in ``test_resume.py`` and
``test_nonfinite.py``."""

from __future__ import annotations

import types

import numpy as np
import pytest

from experiments import digits_mlp
from jaxtrain import saving
from jaxtrain.nonfinite import NonFiniteError, TrainWindow
from jaxtrain.saving import Saves

# ----------------------------------------------------------------------------- Saves


class _Checkpointer:
    """Records what ``Saves`` asks of a ``checkpoint.Checkpointer``."""

    tracks_best = True
    directory = "ckpt"

    def __init__(self, restored=None):
        self.saved: list[tuple[int, dict, dict]] = []
        self.last_step = None
        self.restored = restored

    def save(self, step, get_tree, meta, *, metrics=None):
        self.saved.append((step, get_tree(), metrics))
        self.last_step = step

    def restore_latest(self, target):
        return self.restored

    def wait(self):
        pass


def _state(value: float, step: int = 0):
    """A stand-in TrainState: the leaves ``checkpoint.state_tree`` reads."""
    return types.SimpleNamespace(step=step, params={"w": np.float32(value)}, model_state={},
                                 opt_state={})


def _saves(ckpt, policy="raise", best_mode="max", restore=None):
    def snapshot(tree):
        return tree, np.all(np.isfinite(tree["params"]["w"]))

    config = digits_mlp.DEFAULTS.replace(on_nonfinite=policy, best_metric="val_accuracy")
    return Saves(ckpt, config, best_mode=best_mode, per_epoch=10, snapshot=snapshot,
                 get=lambda tree: tree, key=np.zeros(2, np.uint32),
                 initial={"params": {"w": 0.0}, "rng": None},
                 restore=restore or (lambda tree: tree), start_step=0,
                 window=TrainWindow(policy, 3, lambda tree: tree, seeded=False,
                                    skipped_in_a_row=2))


def test_a_checkpoint_holds_its_metadata_and_validation_metrics():
    ckpt = _Checkpointer()
    saves = _saves(ckpt)
    assert saves.checkpoint(25, _state(1.0, step=25), {"accuracy": np.float64(0.9)}).step == 25
    (step, tree, metrics), = ckpt.saved
    assert step == 25 and tree["params"]["w"] == 1.0 and "rng" in tree
    assert metrics == {"val_accuracy": 0.9}


def test_a_best_found_soon_after_the_last_is_held_then_written_before_any_later_one(monkeypatch):
    monkeypatch.setattr(saving, "BEST_WRITE_INTERVAL_S", 1e9)
    ckpt = _Checkpointer()
    saves = _saves(ckpt)
    val = {"accuracy": 0.8}
    assert saves.improves_best(val)
    saves.checkpoint(10, _state(1.0), val, best=True)
    assert not saves.improves_best({"accuracy": 0.7})
    assert saves.improves_best({"accuracy": 0.85})
    saves.checkpoint(20, _state(2.0), {"accuracy": 0.85}, best=True)  # replaces the held one
    assert ckpt.saved == []
    assert saves.save(30, _state(3.0))
    assert [s for s, _, _ in ckpt.saved] == [20, 30]  # the held best first: steps rise
    saves.checkpoint(40, _state(4.0), {"accuracy": 0.9}, best=True)
    saves.finish()  # a run that stops still leaves its held best
    assert [s for s, _, _ in ckpt.saved] == [20, 30, 40]


def test_improves_best_follows_the_mode():
    saves = _saves(_Checkpointer(), best_mode="min")
    assert [saves.improves_best({"accuracy": a}) for a in (0.5, 0.6, 0.4, 0.4)] == [
        True, False, True, False]


def test_a_state_that_is_not_finite_is_never_written():
    ckpt = _Checkpointer()
    with pytest.raises(NonFiniteError, match=r"the state at step 5 holds non-finite values "
                                             r"\(params/w\)"):
        _saves(ckpt).checkpoint(5, _state(np.nan))
    assert not _saves(ckpt).save(5, _state(np.inf))
    with pytest.raises(NonFiniteError, match="the final state holds non-finite values"):
        _saves(ckpt).final(5, _state(np.nan), None)
    assert ckpt.saved == []


def test_rollback_restores_the_latest_checkpoint_or_the_initial_state(capsys):
    restored = []
    saves = _saves(_Checkpointer(), policy="rollback", restore=lambda tree: restored.append(tree))
    saves.checkpoint(5, _state(np.nan))  # no checkpoint yet: the initial state
    assert restored[-1]["params"]["w"] == 0.0
    found = types.SimpleNamespace(step=3, tree={"params": {"w": 7.0}, "rng": None})
    saves = _saves(_Checkpointer(restored=found), policy="rollback",
                   restore=lambda tree: restored.append(tree))
    saves.rollback(9, 9)
    assert restored[-1]["params"]["w"] == 7.0
    assert "rolled back to the checkpoint of step 3, continuing with the batch of step 10" in (
        capsys.readouterr().err)


def test_at_preemption_saves_once_and_says_whether_it_could():
    ckpt = _Checkpointer()
    saves = _saves(ckpt)
    assert saves.at_preemption(7, _state(1.0)) and saves.at_preemption(7, _state(1.0))
    assert [s for s, _, _ in ckpt.saved] == [7]
    assert not saves.at_preemption(8, _state(np.nan))
