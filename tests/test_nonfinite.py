"""--on-nonfinite raise / skip / rollback under injected NaNs; checkpoints on disk stay finite.

Injections: one training example set to NaN (its batch recurs once per epoch), a
huge learning rate, and a train step that silently corrupts the params while
reporting finite metrics (the last line of defence: the save-time check). Then
``nonfinite.TrainWindow`` on its own, with hand-made metrics.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxtrain.data as data_lib
import jaxtrain.program as program_lib
from experiments import digits_mlp
from jaxtrain.checkpoint import Checkpointer, first_nonfinite, load_params
from jaxtrain.loop import NonFiniteError, Preempted, train_and_evaluate
from jaxtrain.nonfinite import TrainWindow
from jaxtrain.writers import read_jsonl

CACHE = os.path.join(tempfile.gettempdir(), "jaxtrain-tests-xla-cache")
BASE = digits_mlp.DEFAULTS.replace(
    epochs=2, checkpoint_every=5, log_every=10, progress="none", compilation_cache=CACHE,
    tensorboard=False, parallel="none", max_skipped=3,
)
PER_EPOCH = 20  # 1294 train examples // 64
NAN_STEP = 7  # the NaN example's batch in epoch 0 (1-based step)


def _nan_steps(n_train: int) -> list[int]:
    """Steps (1-based) whose batch holds the poisoned example, over ``BASE.epochs``."""
    victim = int(data_lib.epoch_order(BASE.seed, 0, n_train)[(NAN_STEP - 1) * BASE.batch_size])
    steps = []
    for epoch in range(BASE.epochs):
        pos = int(np.flatnonzero(data_lib.epoch_order(BASE.seed, epoch, n_train) == victim)[0])
        if pos < PER_EPOCH * BASE.batch_size:
            steps.append(epoch * PER_EPOCH + pos // BASE.batch_size + 1)
    return steps


@pytest.fixture
def poisoned(monkeypatch):
    """One training example becomes NaN after the dataset (and its statistics) is built."""
    load = data_lib.load_dataset
    steps = []

    def load_poisoned(*args, **kwargs):
        dataset = load(*args, **kwargs)
        train = {k: v.copy() for k, v in dataset.train.items()}
        n = len(train["label"])
        victim = int(data_lib.epoch_order(BASE.seed, 0, n)[(NAN_STEP - 1) * BASE.batch_size])
        train["image"][victim] = np.nan
        steps[:] = _nan_steps(n)
        return dataset.__class__(**{**dataset.__dict__, "train": train})

    monkeypatch.setattr(data_lib, "load_dataset", load_poisoned)
    return steps


def _assert_checkpoints_finite(workdir: str) -> list[int]:
    reader = Checkpointer(workdir, read_only=True)
    steps = reader.all_steps()
    for step in steps:
        tree, _ = reader.restore(step)
        assert first_nonfinite(tree) is None, f"checkpoint {step} holds non-finite values"
    reader.close()
    return steps


def _train_records(workdir: str) -> list[dict]:
    return [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if r["split"] == "train"]


# ----------------------------------------------------------------------------- NaN batch


def test_raise_names_the_step_and_first_gradient_leaf(tmp_path, poisoned, capsys):
    status = digits_mlp.main([
        "--workdir", str(tmp_path), "--epochs", "2", "--checkpoint-every", "5",
        "--log-every", "10", "--progress", "none", "--compilation-cache", CACHE,
        "--no-tensorboard", "--parallel", "none",
    ])
    err = capsys.readouterr().err
    assert status == 1 and err.count("\n") == 1, err
    assert poisoned[0] == NAN_STEP
    assert re.fullmatch(rf"error: non-finite loss or gradient at step {NAN_STEP}: loss=nan, "
                        r"first non-finite gradient: Dense_0/kernel; try .*\n", err), err
    # Detected at the flush of step 10, before that step's save: only step 5 is on disk.
    assert _assert_checkpoints_finite(str(tmp_path)) == [5]


def test_skip_leaves_the_state_unchanged_counts_and_finishes(tmp_path, poisoned):
    summary = train_and_evaluate(BASE.replace(on_nonfinite="skip"), str(tmp_path))
    assert summary["steps"] == 2 * PER_EPOCH and summary["test_accuracy"] > 0.8
    skipped = {r["step"]: r["skipped"] for r in _train_records(str(tmp_path)) if r["skipped"]}
    assert sum(skipped.values()) == len(poisoned) >= 1
    assert all(any(s - 10 < bad <= s for bad in poisoned) for s in skipped)
    _assert_checkpoints_finite(str(tmp_path))
    params = load_params(str(tmp_path))
    assert first_nonfinite(params) is None
    reader = Checkpointer(str(tmp_path), read_only=True)
    tree, _ = reader.restore(reader.latest_step())
    reader.close()
    assert int(tree["step"]) == 2 * PER_EPOCH  # skipped steps still count as steps


def test_rollback_restores_the_checkpoint_and_moves_on(tmp_path, poisoned, capfd):
    summary = train_and_evaluate(BASE.replace(on_nonfinite="rollback"), str(tmp_path))
    err = capfd.readouterr().err
    assert summary["steps"] == 2 * PER_EPOCH and summary["test_accuracy"] > 0.8
    events = re.findall(r"non-finite loss or gradient at step (\d+): rolled back to the "
                        r"checkpoint of step (\d+), continuing with the batch of step (\d+)", err)
    assert [int(bad) for bad, _, _ in events] == poisoned
    for bad, source, resume in (tuple(int(v) for v in e) for e in events):
        detected = -(-bad // 5) * 5  # the flush at the next multiple of 5 (checkpoint cadence)
        assert source == detected - 5 and resume == detected + 1
    assert _assert_checkpoints_finite(str(tmp_path))[-1] == 2 * PER_EPOCH
    # The data position ran to the end; the optimizer lost the 5 steps of each rollback.
    reader = Checkpointer(str(tmp_path), read_only=True)
    tree, meta = reader.restore(2 * PER_EPOCH)
    reader.close()
    assert meta["step"] == 2 * PER_EPOCH
    assert int(tree["step"]) == 2 * PER_EPOCH - 5 * len(events)


class _SignalAt:
    def __init__(self, step: int):
        self.step, self.sent = step, False

    def write(self, step, split, metrics) -> None:
        if split == "train" and step >= self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)

    def close(self) -> None:
        pass


def test_resume_after_a_rollback_is_exact(tmp_path, poisoned):
    """Data position and optimizer step differ after a rollback; a preempted and resumed
    run still ends bitwise equal to the uninterrupted one."""
    config = BASE.replace(on_nonfinite="rollback", log_every=1)
    reference = str(tmp_path / "reference")
    train_and_evaluate(config, reference)
    workdir = str(tmp_path / "run")
    with pytest.raises(Preempted):
        train_and_evaluate(config, workdir, writer=_SignalAt(NAN_STEP + 6))
    reader = Checkpointer(workdir, read_only=True)
    tree, meta = reader.restore(reader.latest_step())
    reader.close()
    assert int(tree["step"]) < meta["step"]  # the checkpoint is after the rollback
    train_and_evaluate(config, workdir)
    for a, b in zip(jax.tree.leaves(load_params(workdir)), jax.tree.leaves(load_params(reference))):
        assert a.tobytes() == b.tobytes()
    assert read_jsonl(os.path.join(workdir, "metrics.jsonl")) == read_jsonl(
        os.path.join(reference, "metrics.jsonl"))


# ----------------------------------------------------------------------------- huge lr


@pytest.mark.parametrize("policy,message", [
    ("raise", (r"non-finite loss or gradient at step 2: loss=nan, first non-finite gradient: "
               r"Dense_0/bias")),
    ("skip", r"3 consecutive non-finite steps up to step 4 \(--on-nonfinite skip\)"),
    ("rollback", r"3 consecutive non-finite steps up to step 4 \(--on-nonfinite rollback\)"),
])
def test_huge_learning_rate_stops_with_finite_checkpoints(tmp_path, policy, message):
    config = BASE.replace(lr=1e30, on_nonfinite=policy, checkpoint_every=1, log_every=1)
    with pytest.raises(NonFiniteError, match=message):
        train_and_evaluate(config, str(tmp_path))
    assert _assert_checkpoints_finite(str(tmp_path))


# ----------------------------------------------------------------------------- silent corruption


@pytest.fixture
def corrupting_step(monkeypatch):
    """A train step that turns the params to NaN on reaching optimizer step 5 yet reports
    finite metrics; the save at step 5 comes before any step could see the NaN, so only
    the save-time check can catch it."""
    step_fn = program_lib.train_step

    @functools.wraps(step_fn)
    def corrupt(state, batch, rng, **kwargs):
        new, metrics = step_fn(state, batch, rng, **kwargs)
        params = jax.tree.map(lambda p: jnp.where(new.step == 5, jnp.nan, p), new.params)
        return new.replace(params=params), metrics

    monkeypatch.setattr(program_lib, "train_step", corrupt)


@pytest.mark.parametrize("policy", ["raise", "skip", "rollback"])
def test_a_nonfinite_state_is_never_written(tmp_path, corrupting_step, policy):
    """raise/skip stop at the save of step 5; rollback goes back to the initial state each
    time (no checkpoint was ever written) and stops when the final state cannot be saved."""
    config = BASE.replace(on_nonfinite=policy, epochs=1)
    where = "the state at step 5" if policy != "rollback" else "the final state"
    with pytest.raises(NonFiniteError, match=rf"{where} holds non-finite values "
                                             r"\(params/Dense_0/bias\)"):
        train_and_evaluate(config, str(tmp_path))
    assert _assert_checkpoints_finite(str(tmp_path)) == []


# ----------------------------------------------------------------------------- TrainWindow, on its own


def _step(loss: float, bad: bool = False) -> dict[str, np.ndarray]:
    return {"loss": np.float32(np.nan if bad else loss), "accuracy": np.float32(0.5),
            "grad_norm": np.float32(1.0), "lr": np.float32(0.1), "nonfinite": np.bool_(bad)}


def _fused(*steps: dict, k: int = 4) -> dict[str, np.ndarray]:
    """A fused call's metrics: ``[K]`` stacked, zeros after the steps that ran."""
    pad = [{name: np.zeros_like(v) for name, v in steps[0].items()}] * (k - len(steps))
    return {name: np.stack([s[name] for s in [*steps, *pad]]) for name in steps[0]}


def _window(policy: str, max_skipped: int = 3, skipped: int = 0, seeded: bool = False):
    return TrainWindow(policy, max_skipped, lambda tree: tree, seeded=seeded,
                       skipped_in_a_row=skipped)


def test_flush_means_the_finite_steps_of_every_call_and_names_the_first_bad_one():
    window = _window("skip")
    window.add(3, _fused(_step(1.0), _step(2.0, bad=True), _step(3.0)))  # steps 11-13
    window.add(1, _step(5.0))  # step 14
    assert window
    mean, n, first_bad = window.flush(14, describe=None)
    assert not window
    assert (n, first_bad) == (4, 12)
    assert mean["loss"] == pytest.approx(3.0) and mean["skipped"] == 1.0
    assert window.skipped_in_a_row == 0  # finite steps came after the bad one


def test_a_window_of_only_bad_steps_still_reports_their_metrics():
    window = _window("skip", max_skipped=5)
    window.add(2, _fused(_step(0, bad=True), _step(0, bad=True)))
    mean, n, first_bad = window.flush(2, describe=None)
    assert (n, first_bad, mean["skipped"]) == (2, 1, 2.0) and np.isnan(mean["loss"])
    assert window.skipped_in_a_row == 2


def test_raise_names_the_step_through_describe():
    window = _window("raise")
    window.add(1, _step(1.0))
    window.add(1, _step(1.0, bad=True))
    with pytest.raises(NonFiniteError, match="^bad at 8$"):
        window.flush(8, describe=lambda bad, m: f"bad at {bad}")


def test_consecutive_bad_steps_count_across_flushes_and_from_a_resume():
    window = _window("rollback", max_skipped=3, skipped=1)  # one counted before a resume
    window.add(1, _step(1.0, bad=True))
    window.flush(5, describe=None)
    assert window.skipped_in_a_row == 2
    window.add(1, _step(1.0, bad=True))
    with pytest.raises(NonFiniteError, match=r"3 consecutive non-finite steps up to step 6 "
                                             r"\(--on-nonfinite rollback\)"):
        window.flush(6, describe=None)


def test_seed_runs_keep_per_seed_means_and_count_every_bad_seed():
    window = _window("skip", seeded=True)
    good = {"loss": np.array([1.0, 2.0]), "accuracy": np.array([0.5, 0.6]),
            "grad_norm": np.ones(2), "lr": np.ones(2), "nonfinite": np.array([False, False])}
    bad = {**good, "loss": np.array([np.nan, 4.0]), "nonfinite": np.array([True, False])}
    window.add(1, good)
    window.add(1, bad)
    mean, n, first_bad = window.flush(2, describe=None)
    assert (n, first_bad, mean["skipped"]) == (2, 2, 1.0)
    np.testing.assert_allclose(mean["loss"], [1.0, 2.0])  # the bad step is left out for all


@pytest.mark.parametrize("seeded", [False, True])
def test_pending_steps_survive_json_and_flush_as_if_never_stopped(seeded):
    """A checkpoint between flushes keeps the window (``pending``, through JSON as Orbax's
    metadata does); a window ``restored`` from it, given the later steps, flushes the same
    record, bit for bit, as the window that never stopped."""
    steps = [_step(v, bad=(i == 1)) for i, v in enumerate((0.1, 0.2, 0.3, 0.7, 1.1))]
    if seeded:  # [S] values per step
        steps = [{k: np.stack([v, v * 2]) for k, v in s.items()} for s in steps]
    whole = _window("skip", seeded=seeded)  # seed runs are never fused
    for n, metrics in ([(1, s) for s in steps[:3]] if seeded else
                       [(2, _fused(*steps[:2])), (1, steps[2])]):
        whole.add(n, metrics)
    pending = json.loads(json.dumps(whole.pending()))
    assert len(pending) == 3 and whole  # pending keeps them for the window's own flush
    resumed = TrainWindow("skip", 3, lambda tree: tree, seeded=seeded, restored=pending)
    for w in (whole, resumed):
        w.add(1, steps[3])
        w.add(1, steps[4])
    (mean_a, n_a, bad_a), (mean_b, n_b, bad_b) = (w.flush(5, describe=None)
                                                  for w in (whole, resumed))
    assert (n_a, bad_a) == (n_b, bad_b) == (5, 2)
    for k in mean_a:
        assert np.asarray(mean_a[k]).tobytes() == np.asarray(mean_b[k]).tobytes(), k
    assert not resumed and resumed.pending() == []
