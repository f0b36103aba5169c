"""A process of a multi-process run that ends unplanned ends the others at once, in one line.

Killed (SIGKILL, the OOM killer), or failing on its own while the others wait for it
inside a compiled step, a process left them waiting: XLA's collectives do not notice,
and JAX's coordination service aborts every process (SIGABRT, a C++ trace) only once
the heartbeats have stopped for 100 s. jaxlib 0.10 gives Python no hook into that
(``distributed.initialize``), so this is written here: every process holds a TCP
connection to process 0, and the kernel closes a process's sockets however it ends. A
process that leaves on purpose says so first (``done``, or ``gone PID WHY`` when it
fails); process 0 passes any ``gone`` on to the others. A process that hears of an
unplanned end prints ``error: process I of N ...`` and exits 1, even while its main
thread waits in a compiled collective (the wait releases the GIL).

A host that vanishes without closing its connections (power, a cut network) or a frozen
process (SIGSTOP, a debugger attached) closes nothing: every process also says ``beat``
a few times per ``silence_s``, from a thread of its own, and one unheard for ``silence_s``
counts as gone. A busy process still beats: XLA compiles and runs without the GIL (a
45 s XLA:CPU compile left a 50 ms Python timer at most 58 ms late), and Python code
yields it every 5 ms. A process that finds its own beats late (it was frozen or starved
itself) blames nobody for that round. Process 0 publishes its port through JAX's
key-value store; a process that cannot reach it warns once and runs unwatched.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import selectors
import socket
import sys
import threading
import time
from typing import Any

KEY = "jaxtrain:peers"
CONNECT_TIMEOUT_S = 10  # for the port, then for the connection
SILENT = "ended without a word (killed by a signal: SIGKILL, the OOM killer? or its host went down)"
SILENCE_S = 30.0  # the default time a process may go unheard (JAX's own heartbeats: 100 s)
BEATS_PER_SILENCE = 6  # beats sent per silence_s, at most one a second


def unheard(silence_s: float) -> str:
    """Why a process that went unheard for ``silence_s`` counts as gone."""
    return (f"was not heard from for {silence_s:g} s (its host down or cut off, or the "
            "process frozen? --peer-timeout sets how long)")


def watch(process_id: int, num_processes: int, coordinator_host: str, client: Any,
          silence_s: float = SILENCE_S) -> bool:
    """Starts watching the run's other processes (call once, right after joining, on every
    process; ``client`` is JAX's coordination client). A process unheard for ``silence_s``
    seconds counts as gone (0: only ends count). False when this process could not reach
    process 0 (it warned), for one process, or when already watching."""
    global _current
    if num_processes < 2 or _current is not None:
        return False
    if not silence_s >= 0:  # also NaN
        raise ValueError(f"silence_s must be >= 0 seconds, got {silence_s}")
    watcher = _Watcher(process_id, num_processes, silence_s)
    if process_id == 0:
        try:
            server = _listen()
        except OSError as e:
            client.key_value_set(KEY, "none")  # the others need not wait for a port
            _unwatched(process_id, num_processes, "cannot listen for the others", e)
            return False
        token = secrets.token_hex(8)
        client.key_value_set(KEY, f"{server.getsockname()[1]} {token}")
        _start(watcher.serve, server, token)
    else:
        try:
            said = client.blocking_key_value_get(KEY, CONNECT_TIMEOUT_S * 1000)
            if said == "none":  # process 0 could not listen (and said so)
                return False
            port, token = said.split()
            sock = socket.create_connection((coordinator_host, int(port)), CONNECT_TIMEOUT_S)
            sock.settimeout(None)
            sock.sendall(f"{token} {process_id}\n".encode())
        except Exception as e:  # noqa: BLE001  (jax raises its own error type for the key)
            where = f"cannot reach process 0 at {coordinator_host}"
            _unwatched(process_id, num_processes, where, e)
            return False
        watcher.add(0, sock)
        _start(watcher.follow, sock)
    _start(watcher.beat)
    _current = watcher
    atexit.register(watcher.send, "done")
    return True


def _unwatched(process_id: int, num_processes: int, what: str, error: BaseException) -> None:
    print(f"warning: process {process_id} of {num_processes} {what} ({type(error).__name__}: "
          f"{error}); if a process dies, the others wait for JAX's heartbeat timeout (100 s)",
          file=sys.stderr, flush=True)


def leaving() -> None:
    """This process is leaving on its own terms: stop ending it for the others' ends
    (``cli`` calls it before the exit barrier, where every process fails alike)."""
    if _current is not None:
        _current.armed = False


def failed(status: int) -> None:
    """Tells the others that this process fails with exit ``status`` (right before it exits)."""
    if _current is not None:
        why = f"ended with exit status {status}" + (" (Ctrl-C)" if status == 130 else "")
        _current.send(f"gone {_current.pid} {why}")


_current: _Watcher | None = None


class _Watcher:
    """This process's connections to the others (process 0: to each; else: to process 0)."""

    def __init__(self, pid: int, n: int, silence_s: float = SILENCE_S) -> None:
        self.pid, self.n, self.silence_s = pid, n, silence_s
        self.every = min(1.0, silence_s / BEATS_PER_SILENCE) if silence_s else 1.0  # s a beat
        self.armed = True  # False once this process leaves (or already heard of an end)
        self.socks: dict[int, socket.socket] = {}
        self.heard_at: dict[int, float] = {}  # when each connected process last said anything
        self.done: set[int] = set()  # processes that said they leave on purpose
        self.lock = threading.Lock()
        self.sending = threading.Lock()

    def add(self, pid: int, sock: socket.socket) -> None:
        with self.lock:
            self.socks[pid] = sock
            self.heard_at[pid] = time.monotonic()

    def beat(self) -> None:
        """Says ``beat`` to every connection, for as long as this process lives (also after
        ``leaving``: the others may still be busy), and ends those unheard for too long."""
        last = time.monotonic()
        while True:
            time.sleep(self.every)
            self.send("beat")
            now = time.monotonic()
            for pid in self.overdue(now, last):
                self.gone(pid, unheard(self.silence_s))
            last = now

    def overdue(self, now: float, since: float) -> list[int]:
        """The processes unheard for ``silence_s`` at ``now``. None when this process's
        previous round (at ``since``) is long past: it was frozen or starved itself, and
        what it was sent meanwhile may wait unread (their clocks restart instead)."""
        with self.lock:
            if now - since > max(2 * self.every, self.silence_s / 2):
                self.heard_at = dict.fromkeys(self.heard_at, now)
                return []
            if not self.silence_s:
                return []
            return [pid for pid, at in self.heard_at.items()
                    if now - at > self.silence_s and pid not in self.done]

    def send(self, line: str, skip: int | None = None) -> None:
        with self.lock:
            socks = [s for pid, s in self.socks.items() if pid != skip]
        with self.sending:  # whole lines: the beat thread and others send alike
            for sock in socks:
                with contextlib.suppress(OSError):
                    sock.sendall(f"{line}\n".encode())

    def gone(self, pid: int, why: str) -> None:
        """Another process ended unplanned: pass it on (process 0), say so, exit 1."""
        with self.lock:
            if not self.armed or pid in self.done:
                return
            self.armed = False
        if self.pid == 0:
            self.send(f"gone {pid} {why}", skip=pid)
        print(f"error: process {pid} of {self.n} {why}; its own output says why; rerun the "
              "same command on every process to resume", file=sys.stderr, flush=True)
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        os._exit(1)

    def heard(self, sender: int, line: str) -> None:
        """One line from ``sender`` (a peer, or process 0 passing one on)."""
        with self.lock:
            self.heard_at[sender] = time.monotonic()
            if line == "done":
                self.done.add(sender)
        if line.startswith("gone "):
            _, pid, why = (line.split(" ", 2) + [""])[:3]
            if pid.isdigit():
                self.gone(int(pid), why or SILENT)

    def follow(self, sock: socket.socket) -> None:
        """A process other than 0: reads process 0's lines until it closes."""
        buffer = b""
        while chunk := _recv(sock):
            *lines, buffer = (buffer + chunk).split(b"\n")
            for line in lines:
                self.heard(0, line.decode(errors="replace"))
        self.gone(0, SILENT)

    def serve(self, server: socket.socket, token: str) -> None:
        """Process 0: accepts the others (each first sends ``TOKEN PID``), then reads their
        lines."""
        selector = selectors.DefaultSelector()
        selector.register(server, selectors.EVENT_READ)
        buffers: dict[socket.socket, bytes] = {}  # each connection's unfinished line
        peer: dict[socket.socket, int] = {}  # connections that introduced themselves
        while True:
            for key, _ in selector.select():
                sock = key.fileobj
                if sock is server:
                    with contextlib.suppress(OSError):
                        conn, _ = server.accept()
                        buffers[conn] = b""
                        selector.register(conn, selectors.EVENT_READ)
                    continue
                chunk = _recv(sock)
                *lines, buffers[sock] = (buffers[sock] + chunk).split(b"\n")
                for raw in lines:
                    line = raw.decode(errors="replace")
                    if sock in peer:
                        self.heard(peer[sock], line)
                    elif (pid := self.introduced(line, token)) is not None:
                        peer[sock] = pid
                        self.add(pid, sock)
                    else:
                        chunk = b""  # a stranger: drop it
                        break
                if not chunk or (sock not in peer and len(buffers[sock]) > 256):
                    selector.unregister(sock)
                    del buffers[sock]
                    if sock in peer:
                        self.gone(peer.pop(sock), SILENT)
                    else:
                        sock.close()

    def introduced(self, hello: str, token: str) -> int | None:
        """The process id a connection introduced itself with, if it knew the token."""
        said, _, pid = hello.partition(" ")
        if said == token and pid.isdigit() and 0 < int(pid) < self.n:
            return int(pid)
        return None


def _start(target: Any, *args: Any) -> None:
    threading.Thread(target=target, args=args, name="jaxtrain-peers", daemon=True).start()


def _listen() -> socket.socket:
    """A socket on every interface (IPv4 and, where the host has it, IPv6), any free port."""
    if socket.has_dualstack_ipv6():
        with contextlib.suppress(OSError):  # IPv6 built in but turned off
            return socket.create_server(("", 0), family=socket.AF_INET6, dualstack_ipv6=True)
    return socket.create_server(("", 0))


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(4096)
    except OSError:
        return b""
