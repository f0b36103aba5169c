"""One run at a time in a workdir (``jaxtrain.workdir_lock``): the second is refused
naming the first, the lock goes with its holder however it ends, and a refused or
failed run leaves the workdir as it found it."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments import digits_mlp
from jaxtrain import workdir_lock
from jaxtrain.config import ConfigError
from jaxtrain.workdir_lock import LOCK_NAME, WorkdirBusy, hold


def test_held_lock_names_its_holder_and_goes_when_released(tmp_path):
    workdir = tmp_path / "new" / "run"
    with hold(str(workdir)):
        info = json.loads((workdir / LOCK_NAME).read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        assert info["started"].endswith(" UTC") and info["argv"] == sys.argv
    assert workdir.is_dir() and os.listdir(workdir) == []  # the workdir stays, the lock goes


def test_a_second_run_is_refused_and_changes_nothing(tmp_path):
    with hold(str(tmp_path)):
        content = (tmp_path / LOCK_NAME).read_bytes()
        info = json.loads(content)
        for _ in range(2):  # refused, and the first still holds it after the refusal
            with pytest.raises(WorkdirBusy) as e, hold(str(tmp_path)):
                pytest.fail("a second hold entered the block")
            assert str(e.value) == (
                f"--workdir {tmp_path} is in use by another run (pid {info['pid']} on "
                f"{info['host']}, started {info['started']}); wait for it to end or use "
                "another --workdir")
            assert (tmp_path / LOCK_NAME).read_bytes() == content
    assert isinstance(e.value, ConfigError)  # bad input: exit status 2
    with hold(str(tmp_path)):  # free again
        pass


def test_a_failed_run_removes_the_folders_it_made_but_not_one_it_found(tmp_path):
    made, found = tmp_path / "made", tmp_path / "found"
    found.mkdir()
    for workdir in (made / "a" / "b", found):
        with pytest.raises(RuntimeError), hold(str(workdir)):
            raise RuntimeError("the run failed")
    assert not made.exists()  # the parents it made too
    assert found.is_dir() and os.listdir(found) == []
    with pytest.raises(RuntimeError), hold(str(made)):  # it wrote something: kept
        (made / "metrics.jsonl").write_text("{}\n")
        raise RuntimeError("the run failed")
    assert os.listdir(made) == ["metrics.jsonl"]


def test_a_lock_not_agreed_by_every_process_is_let_go(tmp_path, monkeypatch):
    """Process 0 took the lock, then telling the others failed (a peer gone): the lock
    and the workdir it made go, as after any failure."""
    def peer_gone(text):
        raise RuntimeError("Gloo all-reduce failed: Connection closed by peer")

    monkeypatch.setattr(workdir_lock.distributed, "from_process_0", peer_gone)
    with pytest.raises(RuntimeError, match="Connection closed"), hold(str(tmp_path / "run")):
        pytest.fail("entered the block")
    assert os.listdir(tmp_path) == []


def test_keep_held_keeps_the_lock_from_the_first_hold_to_its_end(tmp_path):
    """Training's hold, then the robustness suite's, with no moment between them when a
    second run could take the workdir (22-132 ms before)."""
    other = workdir_lock._Lock(str(tmp_path))
    with workdir_lock.keep_held(str(tmp_path)):
        with hold(str(tmp_path)):
            pass
        assert other.acquire() is not None  # held after the first hold's block
        with hold(str(tmp_path)):  # takes nothing: this run holds it
            assert other.acquire() is not None
    assert other.acquire() is None  # let go when keep_held's block ends
    other.release(failed=False)
    assert os.listdir(tmp_path) == []
    with workdir_lock.keep_held(str(tmp_path)):  # a failed first hold lets go at once
        with pytest.raises(RuntimeError), hold(str(tmp_path)):
            raise RuntimeError("training failed")
        assert other.acquire() is None
        other.release(failed=False)


def test_one_robustness_suite_at_a_time_writes_a_report(tmp_path):
    """The suite's lock is ``WORKDIR/robustness/run.lock``: a second suite is refused
    naming the first, and training's lock on the workdir is independent of it (a suite
    may evaluate a run that is still training)."""
    report = tmp_path / "robustness"
    with workdir_lock.hold_report(str(tmp_path), str(report)):
        info = json.loads((report / LOCK_NAME).read_text())
        with pytest.raises(WorkdirBusy) as e, workdir_lock.hold_report(str(tmp_path),
                                                                       str(report)):
            pytest.fail("a second suite entered the block")
        assert str(e.value) == (
            f"--workdir {tmp_path}: another robustness suite is writing {report} "
            f"(pid {info['pid']} on {info['host']}, started {info['started']}); "
            "wait for it to end")
        with hold(str(tmp_path)):  # a run may train in the workdir meanwhile
            assert (tmp_path / LOCK_NAME).is_file()
    assert os.listdir(report) == []  # the lock goes; the folder stays for the report
    report.rmdir()
    with hold(str(tmp_path)), workdir_lock.hold_report(str(tmp_path), str(report)):
        pass  # and a suite may run while a run holds the workdir
    report.rmdir()
    with pytest.raises(RuntimeError), workdir_lock.hold_report(str(tmp_path), str(report)):
        raise RuntimeError("the suite failed")  # before writing anything: no folder left
    assert os.listdir(tmp_path) == []


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    """SIGKILL leaves ``run.lock`` behind; the kernel dropped its lock, so the next run
    takes it over and writes its own name in it."""
    script = ("import sys, time\nfrom jaxtrain.workdir_lock import hold\n"
              "with hold(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)],
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(WorkdirBusy, match=f"pid {proc.pid} on"), hold(str(tmp_path)):
            pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == proc.pid  # left behind
    with hold(str(tmp_path)):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_a_lock_file_removed_while_taking_it_is_not_trusted(tmp_path, monkeypatch):
    """The holder before us removes ``run.lock`` as it lets go: a lock taken on the file
    it removed would hold nothing (a third run creates a new file and locks that), so
    the lock is taken again on the file at the path."""
    real_flock, calls = fcntl.flock, []

    def flock_after_the_holder_left(fd, op):
        calls.append(op)
        if len(calls) == 1:  # between our open and our flock, the holder let go
            os.remove(tmp_path / LOCK_NAME)
        return real_flock(fd, op)

    monkeypatch.setattr(workdir_lock.fcntl, "flock", flock_after_the_holder_left)
    lock = workdir_lock._Lock(str(tmp_path))
    assert lock.acquire() is None
    try:
        assert len(calls) == 2
        assert os.fstat(lock.fd).st_ino == os.stat(tmp_path / LOCK_NAME).st_ino
    finally:
        lock.release(failed=False)


def test_a_file_system_without_locks_runs_with_a_warning(tmp_path, monkeypatch, capsys):
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(workdir_lock.fcntl, "flock", no_locks)
    with hold(str(tmp_path)):
        pass
    err = capsys.readouterr().err
    assert err.startswith(f"warning: {tmp_path / LOCK_NAME} cannot be locked on this file "
                          "system (No locks available); nothing stops a second run")
    assert os.listdir(tmp_path) == []


def test_an_unwritable_lock_is_one_line_bad_input(tmp_path):
    (tmp_path / LOCK_NAME).mkdir()  # a folder where the lock file goes
    line = f"^cannot write {re.escape(str(tmp_path / LOCK_NAME))}: Is a directory$"
    with pytest.raises(WorkdirBusy, match=line), hold(str(tmp_path)):
        pass


def test_training_and_its_robustness_suite_hold_the_workdir(tmp_path, monkeypatch):
    """The lock is held while the loop writes metrics and while the suite that follows
    runs; a run that tries the workdir meanwhile is refused."""
    from jaxtrain.robustness import runner

    refused = []

    def try_the_workdir(stage: str) -> None:  # what a second run's hold does first
        other = workdir_lock._Lock(str(tmp_path))
        reason = other.acquire()
        refused.append((stage, reason is not None))
        other.release(failed=False)

    class Probe:  # a metric writer the loop calls at every log step
        def write(self, step, split, metrics):
            if not refused:
                try_the_workdir("training")

        def close(self):
            pass

    def fake_suite(workdir, config, **kwargs):
        try_the_workdir("robustness")
        return {"mean_corruption_error": 0.0}

    from jaxtrain import loop

    real = loop.train_and_evaluate
    monkeypatch.setattr(loop, "train_and_evaluate",
                        lambda config: real(config, writer=Probe()))
    monkeypatch.setattr(runner, "run_robustness", fake_suite)
    start = time.perf_counter()
    config = digits_mlp.DEFAULTS.replace(workdir=str(tmp_path), epochs=1, progress="none",
                                         robustness=True, compilation_cache="",
                                         parallel="none")
    runner.train_then_robustness(config)
    assert refused == [("training", True), ("robustness", True)], time.perf_counter() - start
    assert not (Path(tmp_path) / LOCK_NAME).exists()
