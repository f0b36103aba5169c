"""train_and_evaluate end to end on digits: files and their fields, accuracy,
determinism, progress output, and the experiments' --help."""

import dataclasses
import io
import json
import math
import os
import re
import subprocess
import sys

import pytest

from experiments import cifar10_resnet, digits_mlp, mnist_cnn
from jaxtrain.config import build_parser
from jaxtrain.loop import train_and_evaluate
from jaxtrain.writers import Progress, read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Lean runs: no compilation cache or TensorBoard (tested elsewhere), no best-checkpoint saves.
QUIET = {"compilation_cache": "", "tensorboard": False}


def _json(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """digits_mlp's defaults for 3 epochs with the default device selection (8 fake CPUs:
    a mesh), progress on auto with stdout captured (not a terminal)."""
    workdir = tmp_path_factory.mktemp("short")
    config = digits_mlp.DEFAULTS.replace(epochs=3, **QUIET)
    real_stdout, sys.stdout = sys.stdout, io.StringIO()
    try:
        summary = train_and_evaluate(config, str(workdir))
        printed = sys.stdout.getvalue()
    finally:
        sys.stdout = real_stdout
    return config, workdir, summary, printed


def test_short_run_learns_digits(short_run):
    _, _, summary, _ = short_run
    assert summary["test_accuracy"] > 0.85


def test_short_run_writes_the_design_files(short_run):
    config, workdir, summary, _ = short_run
    assert {"config.json", "metrics.jsonl", "summary.json", "checkpoints"} <= set(
        os.listdir(workdir))

    manifest = _json(workdir / "config.json")
    resolved = manifest["config"]
    assert resolved["workdir"] == str(workdir)
    for field in dataclasses.fields(config):
        if field.name != "workdir":
            value = getattr(config, field.name)
            expected = list(value) if isinstance(value, tuple) else value
            assert resolved[field.name] == expected, field.name
    assert {"jax", "flax", "optax"} <= set(manifest["versions"])
    assert manifest["devices"]["num_devices"] == summary["num_devices"]

    on_disk = _json(workdir / "summary.json")
    assert on_disk == pytest.approx(summary)
    for key in ("test_accuracy", "test_loss", "train_steps_per_sec", "wall_seconds",
                "num_devices"):
        assert key in on_disk, key
    assert on_disk["num_devices"] == 8  # the fake CPUs of conftest; auto picks a mesh
    assert math.isfinite(on_disk["train_steps_per_sec"]) and on_disk["train_steps_per_sec"] > 0
    assert 0 < on_disk["wall_seconds"] < 600

    records = read_jsonl(str(workdir / "metrics.jsonl"))
    per_epoch = (1797 - 359 - 144) // 64  # train examples // batch
    assert all({"step", "split", "loss", "accuracy"} <= set(r) for r in records)
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    test = [r for r in records if r["split"] == "test"]
    assert {r["split"] for r in records} == {"train", "val", "test"}
    assert all({"grad_norm", "lr"} <= set(r) for r in train)
    assert [r["step"] for r in train] == sorted(r["step"] for r in train)
    assert train[-1]["step"] == 3 * per_epoch
    assert [r["step"] for r in val] == [per_epoch, 2 * per_epoch, 3 * per_epoch]
    assert len(test) == 1 and test[0]["step"] == 3 * per_epoch
    assert test[0]["accuracy"] == pytest.approx(on_disk["test_accuracy"])
    assert test[0]["loss"] == pytest.approx(on_disk["test_loss"])
    assert train[-1]["lr"] < train[0]["lr"]  # cosine decay


def test_progress_is_log_lines_when_stdout_is_not_a_terminal(short_run):
    _, _, _, printed = short_run
    assert re.search(r"^step \d+ train: loss=\S+ accuracy=\S+", printed, re.MULTILINE), printed
    assert re.search(r"^step \d+ val: loss=\S+ accuracy=\S+", printed, re.MULTILINE)
    assert "\r" not in printed  # no progress-bar redraws


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_mode_follows_the_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert Progress("auto", 10, 0, True).mode == "log"
    assert Progress("auto", 10, 0, False).mode == "none"  # not the main process
    monkeypatch.setattr(sys, "stdout", _Tty())
    monkeypatch.setattr(sys, "stderr", _Tty())
    bar = Progress("auto", 10, 0, True)
    assert bar.mode == "bar"
    bar.close()


def test_gc_frozen_keeps_older_objects_out_of_collections_and_hands_them_back():
    import gc

    from jaxtrain.loop import _FROZEN_AT_IMPORT, gc_frozen

    inside = []
    traced = gc_frozen(lambda: inside.append(gc.get_freeze_count()) or "result")
    start = gc.get_freeze_count()  # not 0 on CPython 3.12: it starts with 375 frozen
    assert start <= _FROZEN_AT_IMPORT
    for _ in range(2):  # the second call too (3.12's startup objects are unfrozen by then)
        assert traced() == "result" and inside[-1] > 10_000
        assert gc.get_freeze_count() <= start  # unfrozen on return
    with pytest.raises(ZeroDivisionError):
        gc_frozen(lambda: 1 / 0)()
    assert gc.get_freeze_count() <= start  # and when it raises
    gc.freeze()  # a caller that froze objects itself keeps them frozen
    try:
        frozen = gc.get_freeze_count()
        traced()
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()


def test_same_seed_twice_gives_identical_metrics(short_run, tmp_path):
    config, workdir, _, _ = short_run
    train_and_evaluate(config.replace(progress="none"), str(tmp_path))
    with open(workdir / "metrics.jsonl") as a, open(tmp_path / "metrics.jsonl") as b:
        first, second = a.read(), b.read()
    assert first == second
    losses = [r["loss"] for r in read_jsonl(str(tmp_path / "metrics.jsonl"))
              if r["split"] == "train"]
    assert len(losses) >= 4 and len(set(losses)) == len(losses)  # a real trajectory


@pytest.mark.slow
def test_digits_defaults_reach_97_percent(tmp_path):
    summary = train_and_evaluate(digits_mlp.DEFAULTS.replace(progress="none", **QUIET),
                                 str(tmp_path))
    assert summary["test_accuracy"] >= 0.97
    assert summary["steps"] == digits_mlp.DEFAULTS.epochs * 20


# ----------------------------------------------------------------------------- --help


def _help_entries(text):
    """``{flag: its help text with whitespace collapsed}`` from argparse's --help output."""
    options = text.split("options:", 1)[1]
    entries, current = {}, None
    for line in options.splitlines():
        m = re.match(r"^  (--[\w-]+)", line)
        if m:
            current = m.group(1)
            entries[current] = line
        elif current:
            entries[current] += " " + line
    return {k: " ".join(v.split()) for k, v in entries.items()}


def _shown(value):
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _check_help_lists_every_field(text, config, *, bools=False):
    """Every field's flag is listed; non-bool fields (or, with ``bools``, the bool
    fields) show their default."""
    entries = _help_entries(text)
    missing = []
    for field in dataclasses.fields(config):
        flag = "--" + field.name.replace("_", "-")
        assert flag in entries, f"{flag} not in --help"
        value = getattr(config, field.name)
        if isinstance(value, bool) != bools:
            continue
        if f"(default: {_shown(value)})" not in entries[flag]:
            missing.append(flag)
    assert not missing, f"--help does not show the default of {missing}"


def test_digits_help_lists_every_field_with_its_default():
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.digits_mlp", "--help"], cwd=ROOT,
        capture_output=True, text=True, timeout=120, env={**os.environ, "XLA_FLAGS": ""},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m experiments.digits_mlp")
    _check_help_lists_every_field(proc.stdout, digits_mlp.DEFAULTS)
    assert "(default: 2e-3)" in proc.stdout or "(default: 0.002)" in proc.stdout  # its own lr


@pytest.mark.parametrize("module", [mnist_cnn, cifar10_resnet], ids=lambda m: m.__name__)
def test_tfds_experiments_help_shows_their_defaults(module):
    parser = build_parser(module.Config, module.DEFAULTS, "prog")
    _check_help_lists_every_field(parser.format_help(), module.DEFAULTS)


def test_help_shows_the_defaults_of_bool_flags():
    parser = build_parser(digits_mlp.Config, digits_mlp.DEFAULTS, "prog")
    _check_help_lists_every_field(parser.format_help(), digits_mlp.DEFAULTS, bools=True)


def test_evaluate_on_batches_placed_once_equals_placing_each_time():
    """The loop keeps the validation batches on the devices (eval_inputs) when the data is
    resident; the sums over them are the same as placing every batch anew, here over 8
    devices with a padded last batch (144 rows, batches of 64)."""
    import jax
    import numpy as np

    from jaxtrain import data as data_lib
    from jaxtrain import evaluation, program
    from jaxtrain.parallel import create_strategy
    from jaxtrain.steps import eval_step

    strategy = create_strategy("mesh", 0)
    dataset = data_lib.load_dataset("digits", val_fraction=0.1)
    state = strategy.replicate(program.build_model_and_state(digits_mlp.DEFAULTS, dataset, 10))
    eval_fn = strategy.compile(eval_step)
    placed = list(evaluation.eval_inputs(strategy.shard, dataset.val, 64))
    assert len(placed) == 3 and all(isinstance(b["image"], jax.Array) for b in placed)
    again = [evaluation.evaluate(strategy.shard, strategy.unreplicate, eval_fn, state, dataset.val, 64,
                           placed=placed) for _ in range(2)]
    fresh = evaluation.evaluate(strategy.shard, strategy.unreplicate, eval_fn, state, dataset.val, 64)
    assert again[0] == again[1] == fresh and 0 < fresh["loss"] < np.inf


@pytest.mark.parametrize("where", ["validation placement", "first step"])
def test_a_run_that_fails_before_or_in_its_loop_releases_what_it_opened(tmp_path, monkeypatch,
                                                                       where):
    """The checkpointer, the metric writers, the prefetch thread and the signal handlers
    are released however a run ends: here it fails after all of them exist, while the
    validation batches are placed (before the loop) or in its first compiled call."""
    import signal
    import threading

    from jaxtrain import loop
    from jaxtrain.checkpoint import Checkpointer

    closed: list[str] = []
    close = Checkpointer.close
    monkeypatch.setattr(Checkpointer, "close", lambda self: (closed.append("ckpt"), close(self)))

    class Writer:
        def write(self, step, split, metrics):
            pass

        def close(self):
            closed.append("writer")

    def fail(*args, **kwargs):
        raise RuntimeError("injected")

    if where == "first step":
        monkeypatch.setattr(loop.StepProfiler, "run", fail)
    else:
        monkeypatch.setattr(loop, "eval_inputs", fail)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    config = digits_mlp.DEFAULTS.replace(epochs=1, progress="none", parallel="none",
                                         data_placement="device", **QUIET)
    with pytest.raises(RuntimeError, match="injected"):
        train_and_evaluate(config, str(tmp_path), writer=Writer())
    assert sorted(closed) == ["ckpt", "writer"]
    for _ in range(100):  # the prefetch thread stops within its 50 ms poll
        if not any(t.name == "jaxtrain-prefetch" for t in threading.enumerate()):
            break
        threading.Event().wait(0.05)
    assert not any(t.name == "jaxtrain-prefetch" for t in threading.enumerate())
    assert {s: signal.getsignal(s) for s in handlers} == handlers
