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

``run.lock`` exists only while a run holds it (a run killed with SIGKILL leaves it
behind, unlocked: the next run takes it over). In a multi-process run process 0
takes the lock for all (the workdir is one shared folder) and every process raises
the same error. On NFS, Linux takes ``flock`` through the server's byte-range locks.
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
from collections.abc import Iterator

from jaxtrain import distributed
from jaxtrain.config import ConfigError

LOCK_NAME = "run.lock"


class WorkdirBusy(ConfigError):
    """Another run holds the workdir (exit status 2: bad input, nothing was touched)."""


class _Lock:
    """``flock`` on ``WORKDIR/run.lock``: ``acquire`` returns None once held, else why not."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.path = os.path.join(workdir, LOCK_NAME)
        self.fd: int | None = None
        self.made_workdir = False

    def acquire(self) -> str | None:
        """None when held; else the one-line reason (another run, or the file system)."""
        try:
            self.made_workdir = not os.path.isdir(self.workdir)
            os.makedirs(self.workdir, exist_ok=True)
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # never O_TRUNC
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    holder = _holder(fd)
                    os.close(fd)
                    if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        self._drop_made_workdir()
                        return (f"--workdir {self.workdir} is in use by another run "
                                f"({holder}); wait for it to end or use another --workdir")
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
        out), then lets go; after a failure, also the workdir this run made, if empty."""
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.remove(self.path)
            os.close(self.fd)
            self.fd = None
        if failed:
            self._drop_made_workdir()

    def _drop_made_workdir(self) -> None:
        if self.made_workdir:  # bad input leaves no trace: not even the folder it made
            with contextlib.suppress(OSError):
                os.rmdir(self.workdir)
            self.made_workdir = False


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


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
    """Holds ``WORKDIR/run.lock`` for the block, creating ``workdir`` if needed.

    Call it at the same point on every process of a run: process 0 takes the lock and
    every process raises the same ``WorkdirBusy`` (a ``ConfigError``) when another run
    holds it, or when it cannot be written. If the block fails, a workdir this call
    made is removed again when it is still empty."""
    import jax

    lock = _Lock(os.path.abspath(workdir)) if jax.process_index() == 0 else None
    reason = lock.acquire() if lock is not None else None
    reason = distributed.from_process_0(reason or "")  # every process learns process 0's
    if reason:
        raise WorkdirBusy(reason)
    failed = True
    try:
        yield
        failed = False
    finally:
        if lock is not None:
            lock.release(failed=failed)
