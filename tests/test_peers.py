"""jaxtrain.peers in one process: process 0's and a follower's side, against sockets the
test holds. ``os._exit`` is recorded, not called. Real processes: test_distributed.py."""

from __future__ import annotations

import queue
import socket
import time

import pytest

from jaxtrain import peers

QUIET_S = 0.5  # how long a case that must not end the process is watched


class FakeClient:
    """JAX's coordination client, as far as peers uses it: a key-value store."""

    def __init__(self, values: dict[str, str] | None = None):
        self.values = dict(values or {})

    def key_value_set(self, key: str, value: str) -> None:
        self.values[key] = value

    def blocking_key_value_get(self, key: str, timeout_ms: int) -> str:
        return self.values[key]


@pytest.fixture
def exits(monkeypatch):
    """No watch yet; ``os._exit`` calls land in the returned queue. The watch threads
    outlive the test: disarmed at its end, they end nothing later."""
    monkeypatch.setattr(peers, "_current", None)
    monkeypatch.setattr(peers.atexit, "register", lambda *args: None)
    calls: queue.Queue = queue.Queue()
    monkeypatch.setattr(peers.os, "_exit", calls.put)
    yield calls
    peers.leaving()


def connect(port: int, hello: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(hello.encode())
    return sock


def read_line(sock: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)  # a byte at a time: the next line stays unread
        if not chunk:
            break
        data += chunk
    return data.decode().strip()


def test_process_0_ends_when_a_peer_ends_unannounced_and_tells_the_rest(exits, capsys):
    client = FakeClient()
    assert peers.watch(0, 4, "127.0.0.1", client)
    port, token = client.values[peers.KEY].split()
    stranger = connect(int(port), "not-the-token 1\n")  # dropped, ends nothing
    stranger.close()
    done = connect(int(port), f"{token} 1\ndone\n")  # left on purpose first
    witness = connect(int(port), f"{token} 3\n")
    dying = connect(int(port), f"{token} 2\n")
    time.sleep(QUIET_S)
    done.close()
    time.sleep(QUIET_S)
    assert exits.empty()
    dying.close()  # what the kernel does for a killed process
    assert exits.get(timeout=5) == 1
    assert read_line(witness) == f"gone 2 {peers.SILENT}"
    assert capsys.readouterr().err.strip() == (
        f"error: process 2 of 4 {peers.SILENT}; its own output says why; rerun the same "
        "command on every process to resume")
    witness.close()


@pytest.fixture
def process_0():
    """A listening socket that stands in for process 0, and the client that names it."""
    server = socket.create_server(("127.0.0.1", 0))
    yield server, FakeClient({peers.KEY: f"{server.getsockname()[1]} tok"})
    server.close()


def follow(process_0) -> socket.socket:
    """Watches as process 1 of 2; process 0's end of the connection, past the greeting."""
    server, client = process_0
    assert peers.watch(1, 2, "127.0.0.1", client)
    conn, _ = server.accept()
    assert read_line(conn) == "tok 1"
    return conn


def test_a_follower_ends_on_the_word_of_process_0(exits, process_0, capsys):
    conn = follow(process_0)
    conn.sendall(b"gone 0 ended with exit status 130 (Ctrl-C)\n")
    assert exits.get(timeout=5) == 1
    assert capsys.readouterr().err.startswith(
        "error: process 0 of 2 ended with exit status 130 (Ctrl-C); its own output says why")
    conn.close()


def test_done_then_closed_ends_nothing_and_leaving_disarms(exits, process_0, monkeypatch):
    conn = follow(process_0)
    conn.sendall(b"done\n")
    time.sleep(QUIET_S)
    conn.close()
    time.sleep(QUIET_S)
    assert exits.empty()

    peers.leaving()
    monkeypatch.setattr(peers, "_current", None)  # again, but this process is leaving itself
    conn = follow(process_0)
    peers.leaving()
    peers.failed(2)
    assert read_line(conn) == "gone 1 ended with exit status 2"
    conn.close()
    time.sleep(QUIET_S)
    assert exits.empty()


def test_a_follower_that_cannot_reach_process_0_warns_and_runs_on(exits, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    client = FakeClient({peers.KEY: f"{closed_port} tok"})
    assert not peers.watch(1, 2, "127.0.0.1", client)
    assert "warning: process 1 of 2 cannot reach process 0 at 127.0.0.1" in capsys.readouterr().err
    assert exits.empty()
    assert not peers.watch(0, 1, "127.0.0.1", FakeClient())  # one process: nothing to watch


def test_process_0_that_cannot_listen_tells_the_others_not_to_wait(exits, monkeypatch, capsys):
    def refused():
        raise OSError("no free port")

    monkeypatch.setattr(peers, "_listen", refused)
    client = FakeClient()
    assert not peers.watch(0, 2, "127.0.0.1", client)
    assert client.values[peers.KEY] == "none"
    assert "warning: process 0 of 2 cannot listen for the others (OSError: no free port)" in (
        capsys.readouterr().err)
    assert not peers.watch(1, 2, "127.0.0.1", client)  # no wait, no second warning
    assert capsys.readouterr().err == ""
