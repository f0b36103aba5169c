"""jaxtrain.peers in one process: process 0's and a follower's side, against sockets the
test holds. ``os._exit`` is recorded, not called. Real processes: test_distributed.py."""

from __future__ import annotations

import queue
import socket
import threading
import time

import pytest

from jaxtrain import peers

QUIET_S = 0.5  # how long a case that must not end the process is watched
SHORT_S = 0.6  # silence_s of the cases on silence


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


def read_line(sock: socket.socket, skip: str = "") -> str:
    """The next line from ``sock``, passing over lines equal to ``skip``."""
    while True:
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(1)  # a byte at a time: the next line stays unread
            if not chunk:
                break
            data += chunk
        line = data.decode().strip()
        if line != skip or not data:
            return line


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
    assert read_line(witness, skip="beat") == f"gone 2 {peers.SILENT}"
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


def follow(process_0, silence_s: float = peers.SILENCE_S) -> socket.socket:
    """Watches as process 1 of 2; process 0's end of the connection, past the greeting."""
    server, client = process_0
    assert peers.watch(1, 2, "127.0.0.1", client, silence_s)
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
    assert read_line(conn, skip="beat") == "gone 1 ended with exit status 2"
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


def test_a_follower_beats_and_ends_when_process_0_goes_silent(exits, process_0, capsys):
    conn = follow(process_0, SHORT_S)
    assert read_line(conn) == "beat"  # every SHORT_S / 6 s, for process 0 to hear
    assert read_line(conn) == "beat"
    heard = time.monotonic()  # process 0 (this test) says nothing: frozen, or its host gone
    assert exits.get(timeout=5) == 1
    assert SHORT_S / 2 < time.monotonic() - heard < SHORT_S + 2
    assert capsys.readouterr().err.strip() == (
        f"error: process 0 of 2 {peers.unheard(SHORT_S)}; its own output says why; rerun "
        "the same command on every process to resume")
    assert "--peer-timeout" in peers.unheard(SHORT_S)
    conn.close()


def test_process_0_ends_a_silent_peer_not_one_that_beats_or_said_done(exits, capsys):
    client = FakeClient()
    assert peers.watch(0, 4, "127.0.0.1", client, silence_s=SHORT_S)
    port, token = client.values[peers.KEY].split()
    witness = connect(int(port), f"{token} 1\n")
    done = connect(int(port), f"{token} 3\ndone\n")  # silent after that: it is leaving
    stop = threading.Event()

    def beats() -> None:
        while not stop.wait(SHORT_S / 6):
            witness.sendall(b"beat\n")

    beater = threading.Thread(target=beats, daemon=True)
    beater.start()
    time.sleep(3 * SHORT_S)
    assert exits.empty()  # the witness beats; the other said done
    silent = connect(int(port), f"{token} 2\n")
    assert exits.get(timeout=5) == 1
    stop.set()
    beater.join()  # before the witness closes
    assert read_line(witness, skip="beat") == f"gone 2 {peers.unheard(SHORT_S)}"
    assert capsys.readouterr().err.startswith(f"error: process 2 of 4 {peers.unheard(SHORT_S)};")
    for sock in (witness, done, silent):
        sock.close()


def test_a_process_that_was_frozen_itself_blames_nobody():
    """``overdue``, the rule the beat thread applies each round, on made-up clocks."""
    watcher = peers._Watcher(0, 3, silence_s=10)
    assert watcher.every == 1.0 and peers._Watcher(0, 2, silence_s=0.6).every == pytest.approx(0.1)
    watcher.heard_at = {1: 100.0, 2: 109.0}
    assert watcher.overdue(now=111.0, since=110.0) == [1]  # 11 s unheard; 2 s
    watcher.done.add(1)
    assert watcher.overdue(now=111.0, since=110.0) == []  # said it leaves
    watcher.done.clear()
    # Its own previous round 20 s ago: this process was frozen, not its peers.
    assert watcher.overdue(now=130.0, since=110.0) == []
    assert watcher.heard_at == {1: 130.0, 2: 130.0}
    assert watcher.overdue(now=139.0, since=138.0) == []
    assert watcher.overdue(now=141.0, since=140.0) == [1, 2]
    never = peers._Watcher(0, 2, silence_s=0)  # 0: only a process's end counts
    never.heard_at = {1: 0.0}
    assert never.overdue(now=1000.0, since=999.0) == []


def test_a_negative_silence_is_refused(exits):
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="silence_s must be >= 0 seconds"):
            peers.watch(0, 2, "127.0.0.1", FakeClient(), silence_s=bad)
