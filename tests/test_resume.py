"""Exact resume: preemption, SIGKILL, damaged checkpoints, wrong config, other device counts.

The reference is an uninterrupted run with the same seed; an interrupted and
resumed run must end with bitwise-equal params and the same ``metrics.jsonl``.
Digits MLP, 3 epochs of 20 steps, a checkpoint every 10 steps (plus one after
every validation, for the best-checkpoint policy).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from experiments import digits_mlp
from jaxtrain.checkpoint import DAMAGED_DIR, Checkpointer, load_params
from jaxtrain.loop import Preempted, train_and_evaluate
from jaxtrain.models import MLP, MODELS
from jaxtrain.writers import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
# Compiled programs persist across the runs of this file (and its subprocesses): same
# executables, same results, much less time. A runtime field: resume may differ in it.
CACHE = os.path.join(tempfile.gettempdir(), "jaxtrain-tests-xla-cache")
TOTAL_STEPS = 60  # 3 epochs x (1294 train examples // 64)
BASE = digits_mlp.DEFAULTS.replace(
    epochs=3, checkpoint_every=10, log_every=1, progress="none", compilation_cache=CACHE,
    tensorboard=False, parallel="none",
)
# The same run on the command line (fields that change results must match BASE).
ARGS = ["--epochs", "3", "--checkpoint-every", "10", "--log-every", "1", "--progress", "log",
        "--compilation-cache", CACHE, "--no-tensorboard"]


def _params_equal(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
        for x, y in zip(la, lb)
    )


def _records(workdir) -> list[dict]:
    return read_jsonl(os.path.join(workdir, "metrics.jsonl"))


@functools.cache
def _reference(parallel: str, root: str) -> tuple:
    """The uninterrupted run: final params and metrics records (and its workdir)."""
    workdir = os.path.join(root, f"reference-{parallel}")
    train_and_evaluate(BASE.replace(parallel=parallel), workdir)
    return load_params(workdir), _records(workdir), workdir


def _reference_dir(ref: tuple) -> str:
    return ref[2]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("reference"))
    return lambda parallel="none": _reference(parallel, root)


class SignalAt:
    """A metric writer that sends ``signum`` to this process once ``step`` is logged."""

    def __init__(self, step: int, signum: int = signal.SIGTERM):
        self.step, self.signum, self.sent = step, signum, False

    def write(self, step, split, metrics) -> None:
        if split == "train" and step >= self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)

    def close(self) -> None:
        pass


def _tree_snapshot(root) -> dict[str, tuple]:
    """Every file under ``root`` with size, mtime and content hash."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            st = os.stat(path)
            out[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns, digest)
    return out


# ----------------------------------------------------------------------------- in process


class RaiseAt:
    """A metric writer that raises once ``step`` is logged (a run that stops on an error)."""

    def __init__(self, step: int):
        self.step = step

    def write(self, step, split, metrics) -> None:
        if split == "train" and step >= self.step:
            raise RuntimeError(f"stopped at step {step}")

    def close(self) -> None:
        pass


def test_held_best_checkpoints_leave_the_same_files(tmp_path, monkeypatch):
    """A best found within BEST_WRITE_INTERVAL_S of the last best write is held and written
    before any later checkpoint, on preemption and when the run stops on an error: the
    files are those of writing every best at once, and a resume is still exact."""
    import jaxtrain.saving as saving_lib

    config = BASE.replace(checkpoint_every=0)  # checkpoints: the best ones and the last
    saves: list[int] = []
    save = Checkpointer.save
    monkeypatch.setattr(Checkpointer, "save",
                        lambda self, step, *a, **k: (saves.append(step), save(self, step, *a, **k)))

    def files(workdir):
        reader = Checkpointer(workdir, read_only=True, best_metric="val_accuracy")
        return reader.all_steps(), reader.best_step()

    monkeypatch.setattr(saving_lib, "BEST_WRITE_INTERVAL_S", 0.0)  # every best at once
    train_and_evaluate(config, str(tmp_path / "eager"))
    eager, improved = list(saves), saves[:-1]
    assert eager[-1] == TOTAL_STEPS and improved and improved[0] == 20

    monkeypatch.setattr(saving_lib, "BEST_WRITE_INTERVAL_S", 1e9)
    saves.clear()
    train_and_evaluate(config, str(tmp_path / "held"))
    assert saves == [improved[-1], TOTAL_STEPS]  # the held best, written before the last one
    assert files(str(tmp_path / "held")) == files(str(tmp_path / "eager"))

    saves.clear()  # preempted with a best held: it is written, then step 45
    workdir = str(tmp_path / "preempted")
    with pytest.raises(Preempted):
        train_and_evaluate(config, workdir, writer=SignalAt(45))
    assert saves == [max(s for s in improved if s < 45), 45]
    train_and_evaluate(config, workdir)
    assert _params_equal(load_params(workdir), load_params(str(tmp_path / "eager")))
    assert _records(workdir) == _records(str(tmp_path / "eager"))

    saves.clear()  # a run stopped by an error still writes the best it held
    with pytest.raises(RuntimeError, match="stopped at step 25"):
        train_and_evaluate(config, str(tmp_path / "failed"), writer=RaiseAt(25))
    assert saves == [20] and files(str(tmp_path / "failed"))[0] == [20]


@pytest.mark.parametrize("signum,status", [
    (signal.SIGTERM, 143), pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow),
], ids=["SIGTERM", "SIGINT"])
def test_preempted_run_saves_exits_and_resumes_exactly(tmp_path, reference, signum, status):
    ref_params, ref_records, _ = reference()
    workdir = str(tmp_path / "run")
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with pytest.raises(Preempted) as stopped:
        train_and_evaluate(BASE, workdir, writer=SignalAt(17, signum))
    assert stopped.value.code == status and stopped.value.step == 17
    assert {s: signal.getsignal(s) for s in before} == before  # handlers restored
    reader = Checkpointer(workdir, read_only=True)
    assert reader.latest_step() == 17  # saved at the step boundary where it stopped
    assert reader.read_meta(17)["index_in_epoch"] == 17
    reader.close()
    assert not os.path.exists(os.path.join(workdir, "summary.json"))

    summary = train_and_evaluate(BASE, workdir)
    assert summary["resumed_from_step"] == 17 and summary["steps"] == TOTAL_STEPS
    assert _params_equal(load_params(workdir), ref_params)
    assert _records(workdir) == ref_records  # later records of the stopped run were redone


def test_checkpoint_holds_data_position_rng_and_config(tmp_path, reference):
    reference()
    workdir = str(tmp_path / "run")
    with pytest.raises(Preempted):
        train_and_evaluate(BASE, workdir, writer=SignalAt(30))
    reader = Checkpointer(workdir, read_only=True)
    tree, meta = reader.restore(30)
    reader.close()
    assert (meta["step"], meta["epoch"], meta["index_in_epoch"]) == (30, 1, 10)
    assert int(tree["step"]) == 30
    assert np.array_equal(tree["rng"], np.asarray(jax.random.fold_in(jax.random.PRNGKey(0),
                                                                     0x57E9)))
    assert meta["config"]["lr"] == BASE.lr and meta["config"]["seed"] == BASE.seed
    assert set(tree) == {"step", "params", "model_state", "opt_state", "rng"}


# Orbax's reader may leave an asyncio callback behind after a failed read of a damaged file.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_damaged_latest_checkpoint_falls_back_and_finishes_exactly(tmp_path, reference, capfd):
    ref_params, ref_records, _ = reference()
    workdir = str(tmp_path / "run")
    shutil.copytree(_reference_dir(reference()), workdir)  # a finished run, to damage
    reader = Checkpointer(workdir, read_only=True)
    steps = reader.all_steps()
    reader.close()
    latest, previous = steps[-1], steps[-2]
    assert latest == TOTAL_STEPS
    data = sorted(Path(workdir, "checkpoints", str(latest)).rglob("d/*"),
                  key=lambda p: p.stat().st_size)
    os.truncate(data[-1], data[-1].stat().st_size // 3)
    capfd.readouterr()

    summary = train_and_evaluate(BASE, workdir)
    err = capfd.readouterr().err
    assert re.search(rf"checkpoint, step {latest}, is damaged .*falling back to step {previous}",
                     err), err
    assert summary["resumed_from_step"] == previous
    assert os.path.isdir(os.path.join(workdir, DAMAGED_DIR, str(latest)))
    assert _params_equal(load_params(workdir), ref_params)
    assert _records(workdir) == ref_records


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    status = digits_mlp.main(argv)
    return status, capsys.readouterr().err


def test_preempted_between_log_steps_resumes_with_the_same_records(tmp_path, monkeypatch):
    """Stopped at step 13, logging every 5: the window of steps 11-13 goes into the
    checkpoint, and the resumed run's step-15 record averages 11-15, as if never stopped."""
    from jaxtrain.profiling import StepProfiler

    config = BASE.replace(log_every=5, steps_per_call=1)
    train_and_evaluate(config, str(tmp_path / "reference"))
    run = StepProfiler.run

    def run_then_signal(self, step, fn, *args, **kwargs):
        out = run(self, step, fn, *args, **kwargs)
        if step == 12:  # the call of step 13 (``step``: the data position before it)
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(StepProfiler, "run", run_then_signal)
    workdir = str(tmp_path / "run")
    with pytest.raises(Preempted) as stopped:
        train_and_evaluate(config, workdir)
    assert stopped.value.step == 13
    reader = Checkpointer(workdir, read_only=True)
    assert [m["loss"]["dtype"] for m in reader.read_meta(13)["train_window"]] == ["float32"] * 3
    reader.close()
    assert [r["step"] for r in _records(workdir)] == [5, 10]  # nothing written at 13
    monkeypatch.setattr(StepProfiler, "run", run)
    train_and_evaluate(config, workdir)
    assert _records(workdir) == _records(str(tmp_path / "reference"))
    assert _params_equal(load_params(workdir), load_params(str(tmp_path / "reference")))


def test_a_fresh_start_replaces_the_records_of_an_attempt_without_checkpoints(tmp_path,
                                                                             reference):
    """A run killed before its first checkpoint starts again from step 0: its records
    (and a line cut short) go, instead of the new ones being appended to them."""
    _, ref_records, ref_dir = reference()
    workdir = tmp_path / "run"
    workdir.mkdir()
    with open(ref_dir + "/metrics.jsonl") as f:
        lines = f.readlines()[:7]
    (workdir / "metrics.jsonl").write_text("".join(lines) + lines[7 - 1][:20])
    train_and_evaluate(BASE, str(workdir))
    assert _records(str(workdir)) == ref_records


def test_rerunning_a_finished_run_changes_nothing(tmp_path, reference, capsys):
    _, _, ref_dir = reference()
    workdir = str(tmp_path / "run")
    shutil.copytree(ref_dir, workdir)
    before = _tree_snapshot(workdir)
    with open(os.path.join(workdir, "summary.json")) as f:
        on_disk = json.load(f)
    assert train_and_evaluate(BASE, workdir) == on_disk
    assert _tree_snapshot(workdir) == before
    assert "finished at step 60: nothing to do" in capsys.readouterr().out


def test_a_run_stopped_after_its_last_checkpoint_writes_its_summary_once(tmp_path, reference):
    """The final checkpoint is on disk, the summary not yet: the rerun evaluates, replaces
    the test record and writes strict JSON (no steady-state steps: null, not NaN)."""
    ref_params, ref_records, ref_dir = reference()
    workdir = str(tmp_path / "run")
    shutil.copytree(ref_dir, workdir)
    os.remove(os.path.join(workdir, "summary.json"))
    summary = train_and_evaluate(BASE, workdir)
    assert summary["resumed_from_step"] == TOTAL_STEPS and summary["train_steps_per_sec"] is None
    assert _records(workdir) == ref_records  # one test record
    with open(os.path.join(workdir, "summary.json")) as f:
        on_disk = json.loads(f.read(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert on_disk["train_steps_per_sec"] is None and on_disk["test_accuracy"] > 0.9
    assert _params_equal(load_params(workdir), ref_params)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run on disk (1 epoch) for the refusal tests."""
    workdir = str(tmp_path_factory.mktemp("finished") / "run")
    train_and_evaluate(BASE.replace(epochs=1), workdir)
    return workdir


@pytest.mark.parametrize("flags,message", [
    (["--lr", "0.01"], r"--lr was 0\.002, now 0\.01"),
    (["--epochs", "2"], r"--epochs was 1, now 2"),
    (["--label-smoothing", "0.1"], r"--label-smoothing was 0\.0, now 0\.1"),
    (["--resume", "never"], r"--resume never, but .* already holds checkpoints"),
])
def test_wrong_config_is_refused_in_one_line_touching_nothing(finished, capsys, flags, message):
    before = _tree_snapshot(finished)
    argv = ["--workdir", finished, "--epochs", "1", "--progress", "none",
            "--compilation-cache", CACHE, "--no-tensorboard", "--parallel", "none", *flags]
    status, err = _cli(argv, capsys)
    assert status == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and re.search(message, err), err
    assert _tree_snapshot(finished) == before


def test_wrong_model_names_the_first_mismatching_parameter(finished, capsys, monkeypatch):
    before = _tree_snapshot(finished)
    monkeypatch.setitem(MODELS, "mlp", functools.partial(MLP, hidden=(128, 256)))
    argv = ["--workdir", finished, "--epochs", "1", "--progress", "none",
            "--compilation-cache", CACHE, "--no-tensorboard", "--parallel", "none"]
    status, err = _cli(argv, capsys)
    assert status == 2 and err.count("\n") == 1, err
    assert re.search(r"does not fit this model: params/Dense_0/bias is float32\[256\] there, "
                     r"float32\[128\] here", err), err
    assert _tree_snapshot(finished) == before


def test_resume_must_without_checkpoints_is_refused(tmp_path, capsys):
    status, err = _cli(["--workdir", str(tmp_path / "new"), "--resume", "must", "--progress",
                        "none", "--no-tensorboard"], capsys)
    assert status == 2 and "--resume must, but" in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "new" / "checkpoints")


def test_runtime_fields_may_change_on_resume(tmp_path, reference):
    """Device strategy, cadence and the non-finite policy may differ in a resumed run."""
    ref_params, _, _ = reference()
    workdir = str(tmp_path / "run")
    with pytest.raises(Preempted):
        train_and_evaluate(BASE, workdir, writer=SignalAt(25))
    changed = BASE.replace(checkpoint_every=7, keep_checkpoints=1, log_every=5,
                           on_nonfinite="skip", best_metric="val_loss", robustness=True)
    train_and_evaluate(changed, workdir)
    assert _params_equal(load_params(workdir), ref_params)


@pytest.mark.slow
def test_seed_run_resumes_exactly(tmp_path):
    """A vmapped 2-seed run: every leaf and the RNG keys carry the seed axis."""
    config = BASE.replace(num_seeds=2, epochs=2)
    reference_dir = str(tmp_path / "reference")
    train_and_evaluate(config, reference_dir)
    workdir = str(tmp_path / "run")
    with pytest.raises(Preempted):
        train_and_evaluate(config, workdir, writer=SignalAt(13))
    reader = Checkpointer(workdir, read_only=True)
    tree, _ = reader.restore(13)
    reader.close()
    assert tree["rng"].shape == (2, 2)
    train_and_evaluate(config, workdir)
    assert _params_equal(load_params(workdir), load_params(reference_dir))
    assert _records(workdir) == _records(reference_dir)


@pytest.mark.slow
@pytest.mark.parametrize("saved,resumed", [("pmap", "mesh4"), ("none", "pmap")])
def test_resume_on_another_device_count(tmp_path, reference, saved, resumed):
    """Saved with 8-device pmap, finished on a 4-device mesh (and 1 device -> pmap):
    the same run within float tolerance (reductions are ordered differently)."""
    ref_params, ref_records, _ = reference()
    workdir = str(tmp_path / "run")
    with pytest.raises(Preempted):
        train_and_evaluate(BASE.replace(parallel=saved), workdir, writer=SignalAt(20))
    devices = 4 if resumed == "mesh4" else 0
    train_and_evaluate(BASE.replace(parallel=resumed.rstrip("4"), devices=devices), workdir)
    for a, b in zip(jax.tree.leaves(load_params(workdir)), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
    final = [r for r in _records(workdir) if r["split"] == "test"]
    expected = [r for r in ref_records if r["split"] == "test"]
    assert abs(final[0]["accuracy"] - expected[0]["accuracy"]) <= 2 / 360


# ----------------------------------------------------------------------------- subprocesses


def _spawn(workdir: str, devices: int, *flags: str, stderr_path: str) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    cmd = [sys.executable, "-m", "experiments.digits_mlp", "--workdir", workdir, *ARGS, *flags]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=open(stderr_path, "w"))


def _run_until(proc: subprocess.Popen, step: int, timeout: float = 300.0) -> int:
    """Reads the child's log until it reports train step >= ``step``; returns that step."""
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        m = re.match(r"step (\d+) train", line)
        if m and int(m.group(1)) >= step:
            return int(m.group(1))
        if time.monotonic() > deadline:
            break
    proc.kill()
    pytest.fail(f"the child never reached step {step} (exit status {proc.wait()})")


def _sigkill_case(tmp_path, reference, devices: int, parallel: str, kill_after: int) -> None:
    ref_params, ref_records, _ = reference(parallel)
    workdir = str(tmp_path / "run")
    proc = _spawn(workdir, devices, "--parallel", parallel, stderr_path=str(tmp_path / "err"))
    _run_until(proc, kill_after)
    proc.kill()  # SIGKILL: no handler, no cleanup, possibly mid-save
    assert proc.wait() == -signal.SIGKILL
    proc.stdout.close()
    assert not os.path.exists(os.path.join(workdir, "summary.json")), "finished before the kill"
    reader = Checkpointer(workdir, read_only=True)
    latest = reader.latest_step()
    reader.close()
    assert latest is not None and 10 <= latest < TOTAL_STEPS

    summary = train_and_evaluate(BASE.replace(parallel=parallel), workdir)
    assert summary["resumed_from_step"] == latest
    assert _params_equal(load_params(workdir), ref_params)
    assert _records(workdir) == ref_records


def test_sigkill_then_resume_is_bitwise_exact_one_device(tmp_path, reference):
    _sigkill_case(tmp_path, reference, devices=1, parallel="none", kill_after=23)


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_exact_eight_devices(tmp_path, reference):
    _sigkill_case(tmp_path, reference, devices=8, parallel="mesh", kill_after=37)


@pytest.mark.slow
def test_sigterm_subprocess_exits_nonzero_with_checkpoint_and_resumes(tmp_path, reference):
    ref_params, ref_records, _ = reference()
    workdir = str(tmp_path / "run")
    err_path = str(tmp_path / "err")
    proc = _spawn(workdir, 1, "--parallel", "none", stderr_path=err_path)
    _run_until(proc, 15)
    proc.send_signal(signal.SIGTERM)
    proc.stdout.read()
    assert proc.wait(timeout=120) == 143
    err = Path(err_path).read_text()
    m = re.search(r"preempted by SIGTERM at step (\d+): checkpoint saved in (\S+); rerun", err)
    assert m, err
    stopped = int(m.group(1))
    assert "received SIGTERM" in err and "Traceback" not in err
    reader = Checkpointer(workdir, read_only=True)
    assert reader.latest_step() == stopped >= 15
    reader.close()
    proc = _spawn(workdir, 1, "--parallel", "none", stderr_path=err_path)
    proc.stdout.read()
    assert proc.wait(timeout=300) == 0, Path(err_path).read_text()
    assert _params_equal(load_params(workdir), ref_params)
    assert _records(workdir) == ref_records


GUARD_SCRIPT = """
import sys, time
from jaxtrain.preemption import PreemptionGuard
guard = PreemptionGuard().install()
print("ready", flush=True)
while guard.signum is None:
    time.sleep(0.01)
print("first", flush=True)
time.sleep(120)  # a long save: the second signal must not wait for it
"""


SYNCED_GUARD_SCRIPT = """
import signal, time
from jax.experimental import multihost_utils
from jaxtrain.preemption import PreemptionGuard
signal.signal(signal.SIGTERM, lambda signum, frame: None)  # JAX's notifier: records only
multihost_utils.reached_preemption_sync_point = lambda call: call == 3
guard = PreemptionGuard(processes=2)
guard.synced = True  # as with jax.distributed's preemption service
guard.install()
print("not due" if guard.due(2) else "due" if guard.due(3) else "never", flush=True)
for _ in range(1200):
    time.sleep(0.1)  # a long save: a second SIGTERM must not wait for it
"""


def test_multi_process_second_sigterm_exits_at_once_after_the_processes_agree_to_stop():
    """With several processes JAX's notifier holds SIGTERM; once the sync point says
    every process stops (``due``), SIGTERMs during the save are handled as for one
    process: the first is noted (it may be the scheduler's, reaching this process only
    now), the second ends the process at once."""
    proc = subprocess.Popen([sys.executable, "-c", SYNCED_GUARD_SCRIPT], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        assert proc.stdout.readline().strip() == "due"
        proc.send_signal(signal.SIGTERM)
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=2)  # noted, not fatal
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == -signal.SIGTERM
        assert "received SIGTERM: every process is already saving" in proc.stderr.read()
    finally:
        proc.kill()
        proc.communicate()


def test_second_signal_exits_at_once(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", GUARD_SCRIPT], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    assert proc.stdout.readline().strip() == "first"
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == -signal.SIGTERM
    assert time.monotonic() - t0 < 10
    assert "send it again to exit at once" in proc.stderr.read()
