"""One run at a time in a workdir: an advisory lock on ``WORKDIR/run.lock``.

Two runs in one workdir (a job resubmitted while the first still runs, a copied
command line) would interleave ``metrics.jsonl``, overwrite each other's
``config.json`` and checkpoints, and set aside the other's newest save as damaged.
The second run is refused instead, naming the first::

    error: --workdir W is in use by another run (pid 4242 on host-a, started
    2026-12-07 14:05:27 UTC); wait for it to end or use another --workdir

Written by hand on ``fcntl.flock`` (the standard library): the kernel drops the
lock when its process ends, however it ends (``kill -9`` included), so a crashed
run never leaves a stale lock. The ``filelock`` package truncates the file on every
attempt, which would erase the holder's name that the error above prints.

``run.lock`` exists only while a run holds it (a run killed with SIGKILL, or by
SIGTERM during its robustness suite, leaves it behind, unlocked: the next run takes
it over). ``keep_held`` holds it from training through the suite that follows. In a
multi-process run process 0 takes the lock for all (the workdir is one shared
folder) and every process raises the same error. On NFS, Linux takes ``flock``
through the server's byte-range locks.

The robustness suite holds ``WORKDIR/robustness/run.lock`` the same way
(``hold_report``), whether it runs after training or alone: two suites writing one
report would leave ``report.json`` from one and ``report.md`` or the plots from the
other. ``python -m experiments.robustness`` does not take ``run.lock``, so it may
evaluate the latest checkpoint of a run that is still training.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from collections.abc import Callable, Iterator

from jaxtrain import distributed
from jaxtrain.config import ConfigError

LOCK_NAME = "run.lock"


class WorkdirBusy(ConfigError):
    """Another run holds the workdir (exit status 2: bad input, nothing was touched)."""


class _Lock:
    """``flock`` on ``FOLDER/run.lock``: ``acquire`` returns None once held, else why not.

    ``busy(holder)`` is the refusal, given who holds the lock."""

    def __init__(self, workdir: str, busy: Callable[[str], str] | None = None) -> None:
        self.workdir = workdir
        self.busy = busy or (lambda holder: f"--workdir {workdir} is in use by another run "
                             f"({holder}); wait for it to end or use another --workdir")
        self.path = os.path.join(workdir, LOCK_NAME)
        self.fd: int | None = None
        self.made: list[str] = []  # the folders this lock created, workdir first

    def acquire(self) -> str | None:
        """None when held; else the one-line reason (another run, or the file system)."""
        try:
            folder = self.workdir
            while not os.path.isdir(folder) and folder != os.path.dirname(folder):
                self.made.append(folder)
                folder = os.path.dirname(folder)
            os.makedirs(self.workdir, exist_ok=True)
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # never O_TRUNC
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    holder = _holder(fd)
                    os.close(fd)
                    if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        self._drop_made_folders()
                        return self.busy(holder)
                    if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                        print(f"warning: {self.path} cannot be locked on this file system "
                              f"({e.strerror}); nothing stops a second run in this workdir",
                              file=sys.stderr, flush=True)
                        os.remove(self.path)
                        return None
                    raise
                # The holder before us may have removed the file as it let go: then this
                # lock is on a file no one else will open. Lock the one at the path.
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)
            self.fd = fd
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(_me()).encode() + b"\n")
            return None
        except OSError as e:
            self.release(failed=True)
            return f"cannot write {self.path}: {e.strerror or e}"

    def release(self, *, failed: bool) -> None:
        """Removes ``run.lock`` (while still held, so no one takes a file on its way
        out), then lets go; after a failure, also the folders it made, if empty."""
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.remove(self.path)
            os.close(self.fd)
            self.fd = None
        if failed:
            self._drop_made_folders()

    def _drop_made_folders(self) -> None:
        """Bad input leaves no trace: not even the folders (parents too) it made."""
        for folder in self.made:  # rmdir refuses a folder that is not empty
            try:
                os.rmdir(folder)
            except OSError:
                break
        self.made = []


def _me() -> dict[str, object]:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now(datetime.UTC).strftime(
                "%Y-%m-%d %H:%M:%S UTC"),
            "argv": sys.argv}


def _holder(fd: int) -> str:
    """Who holds the lock, from what it wrote in the file ("unknown" if not yet)."""
    try:
        info = json.loads(os.pread(fd, 65536, 0).decode())
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


class _Kept:
    """A lock that outlives the ``hold`` that took it, until ``keep_held`` ends."""

    held = False
    lock: _Lock | None = None  # process 0's; None on the others


_kept: dict[str, _Kept] = {}


@contextlib.contextmanager
def keep_held(workdir: str) -> Iterator[None]:
    """The lock that the first ``hold(workdir)`` inside the block takes stays held until
    the block ends, and later ``hold(workdir)`` calls in it take nothing: a run that
    trains (``train_and_evaluate`` holds the workdir) and then runs its robustness suite
    holds it throughout. Takes nothing itself: it may start before the processes join."""
    path = os.path.abspath(workdir)
    kept = _kept.setdefault(path, _Kept())
    try:
        yield
    finally:
        if _kept.pop(path, None) is kept and kept.lock is not None:
            kept.lock.release(failed=False)


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
    """Holds ``WORKDIR/run.lock`` for the block, creating ``workdir`` if needed.

    Call it at the same point on every process of a run: process 0 takes the lock and
    every process raises the same ``WorkdirBusy`` (a ``ConfigError``) when another run
    holds it, or when it cannot be written. If the block fails, the folders this call
    made are removed again when they are still empty."""
    import jax

    path = os.path.abspath(workdir)
    kept = _kept.get(path)
    if kept is not None and kept.held:  # keep_held: this run holds it already
        yield
        return
    with _held(_Lock(path) if jax.process_index() == 0 else None, kept):
        yield


@contextlib.contextmanager
def hold_report(workdir: str, folder: str) -> Iterator[None]:
    """Holds ``folder/run.lock`` (the report folder, ``WORKDIR/robustness``) for the block:
    one robustness suite at a time writes a workdir's report. As :func:`hold`, on every
    process of a run; a second suite raises ``WorkdirBusy``. Independent of the workdir's
    ``run.lock``: a suite may evaluate a run that is still training."""
    import jax

    path, folder = os.path.abspath(workdir), os.path.abspath(folder)
    def busy(holder: str) -> str:
        return (f"--workdir {path}: another robustness suite is writing {folder} ({holder}); "
                "wait for it to end")

    lock = _Lock(folder, busy) if jax.process_index() == 0 else None
    with _held(lock, None):
        yield


@contextlib.contextmanager
def _held(lock: _Lock | None, kept: _Kept | None) -> Iterator[None]:
    """Takes ``lock`` (process 0's; None on the others), tells every process whether it
    did, and lets go after the block (``keep_held``'s ``kept``: when its block ends)."""
    failed = True
    try:
        reason = lock.acquire() if lock is not None else None
        reason = distributed.from_process_0(reason or "")  # every process learns process 0's
        if reason:
            raise WorkdirBusy(reason)
        yield
        failed = False
    finally:
        if not failed and kept is not None:  # keep_held releases it when its block ends
            kept.held, kept.lock = True, lock
        elif lock is not None:
            lock.release(failed=failed)
