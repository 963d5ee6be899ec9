"""Real processes: spawning, racing, hygiene, hostile peers, idle exit.

Every test has its own short socket directory (``sock_dir``), whose brokers
the fixture kills afterwards. Every wait is bounded: subprocess timeouts, or
a condition polled against a deadline (:func:`wait_until`); a plain sleep
is used only to show that something does *not* happen.

Exit statuses of brokers are read with ``os.waitpid``: the test process is a
child subreaper (conftest.py), so a daemonized broker becomes its child. No
test calls ``reap_children`` while it still needs the status of one of its
own subprocesses (a ``waitpid(-1)`` would steal it).
"""

from __future__ import annotations

import os
import select
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
from conftest import BIN, broker_pids, run_cli, wait_until

import brokerq
from brokerq import protocol
from brokerq.client.blocking import Connection
from brokerq.protocol import Error, FrameReader, HelloReply, PingReply, PutReply
from brokerq.spawn import take_spawn_lock

BROKERQ = str(BIN / "brokerq")
BROKER = str(BIN / "local-queue-broker")


# -- helpers ---------------------------------------------------------------


def wait_exit(pid: int, timeout: float = 10.0) -> int:
    """Wait for our child (a broker, through the subreaper) ``pid``; its exit status."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            raise AssertionError(f"process {pid} did not exit within {timeout} s")
        time.sleep(0.01)


def still_running(pid: int) -> bool:
    """True if our child ``pid`` has not exited (it is not reaped here)."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None


def one_line(data: bytes) -> str:
    """The single line of ``data`` (a stderr), failing if it has more or none."""
    text = data.decode()
    lines = text.splitlines()
    assert len(lines) == 1, f"expected one line, got {text!r}"
    assert text.endswith("\n")
    return lines[0]


def lock_file_pid(path: str) -> int:
    return int(Path(path + ".lock").read_text().strip())


def only_broker(sock_dir: str) -> int:
    pids = broker_pids(sock_dir)
    assert len(pids) == 1, f"expected one broker, found {pids}"
    return pids[0]


def read_exactly(fd: int, size: int, deadline: float) -> bytes:
    """Read ``size`` bytes from a pipe, bounded by ``deadline``; short on EOF."""
    data = b""
    while len(data) < size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        readable, _, _ = select.select([fd], [], [], remaining)
        if readable:
            chunk = os.read(fd, size - len(data))
            if not chunk:
                break
            data += chunk
    return data


def python(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", code, *args]


class RawConnection:
    """A bare socket to the broker that speaks frames by hand."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.reader = FrameReader(2**32)

    def close(self) -> None:
        self.sock.close()

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, frame: dict[str, Any]) -> None:
        payload = msgspec.msgpack.encode(frame)
        self.send_bytes(protocol.HEADER.pack(len(payload)) + payload)

    def reply(self) -> protocol.AnyReply:
        while True:
            payload = self.reader.next_frame()
            if payload is not None:
                return protocol.decode_reply(payload)
            data = self.sock.recv(65536)
            assert data, "the broker closed the connection before replying"
            self.reader.feed(data)

    def hello(self) -> HelloReply:
        self.send({"op": "hello", "id": 1, "version": protocol.PROTOCOL_VERSION})
        reply = self.reply()
        assert isinstance(reply, HelloReply), reply
        return reply

    def assert_closed(self) -> None:
        """The broker closed the connection (EOF, or a reset), with nothing more."""
        assert self.reader.buffered == 0
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            return
        assert data == b"", f"expected the connection closed, got {data!r}"

    def assert_usable(self, request_id: int) -> None:
        self.send({"op": "ping", "id": request_id})
        reply = self.reply()
        assert isinstance(reply, PingReply)
        assert reply.id == request_id


# -- 1. cold start -----------------------------------------------------------


def test_cold_start_put_then_get(socket_path: str, sock_dir: str) -> None:
    assert os.listdir(sock_dir) == []
    put = run_cli("--socket", socket_path, "put", "q", "hello")
    assert (put.returncode, put.stderr) == (0, b"")
    assert put.stdout == b"1\n"
    got = run_cli("--socket", socket_path, "get", "q")
    assert (got.returncode, got.stdout, got.stderr) == (0, b"hello\n", b"")
    pid = only_broker(sock_dir)
    assert lock_file_pid(socket_path) == pid
    assert stat.S_ISSOCK(os.lstat(socket_path).st_mode)
    assert stat.S_IMODE(os.lstat(sock_dir).st_mode) == 0o700


# -- 2. thundering herd ----------------------------------------------------------

HERD_CLIENT = r"""
import os, sys
import brokerq
path, index, ready, gate = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
os.write(ready, b"r")
os.close(ready)
os.read(gate, 1)  # blocks until the test closes the gate's write end
with brokerq.connect(path, timeout=30) as client:
    client.queue("herd").put(f"m{index}")
    print(client.broker_pid, flush=True)
"""
HERD_SIZE = 40


def test_s01_thundering_herd_starts_one_broker(
    socket_path: str, sock_dir: str, procs: Callable[..., subprocess.Popen[bytes]]
) -> None:
    ready_r, ready_w = os.pipe()
    gate_r, gate_w = os.pipe()
    try:
        herd = [
            procs(
                python(HERD_CLIENT, socket_path, str(i), str(ready_w), str(gate_r)),
                pass_fds=(ready_w, gate_r),
            )
            for i in range(HERD_SIZE)
        ]
        os.close(ready_w)
        ready_w = -1
        os.close(gate_r)
        gate_r = -1
        # Every client has imported brokerq and waits at the gate.
        ready = read_exactly(ready_r, HERD_SIZE, time.monotonic() + 60)
        assert len(ready) == HERD_SIZE, "not every herd client got to the gate"
        assert os.listdir(sock_dir) == []  # still cold
        os.close(gate_w)  # release them all at once
        gate_w = -1
        reported = []
        for proc in herd:
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err.decode()
            reported.append(int(out))
    finally:
        for fd in (ready_r, ready_w, gate_r, gate_w):
            if fd >= 0:
                os.close(fd)
    assert len(set(reported)) == 1, f"clients saw several brokers: {set(reported)}"
    pid = reported[0]
    assert broker_pids(sock_dir) == [pid]
    assert lock_file_pid(socket_path) == pid
    with brokerq.connect(socket_path) as client:
        assert client.broker_pid == pid
        queue = client.queue("herd")
        bodies = queue.get_many(HERD_SIZE * 2, timeout=0)
        with pytest.raises(brokerq.Empty):
            queue.get_nowait()
    assert len(bodies) == HERD_SIZE
    assert set(bodies) == {f"m{i}".encode() for i in range(HERD_SIZE)}


# -- 3. a stale file at the socket path ----------------------------------------------


@pytest.mark.parametrize("kind", ["stale_socket", "regular_file"])
def test_s03_stale_file_at_the_path_is_replaced(socket_path: str, sock_dir: str, kind: str) -> None:
    if kind == "stale_socket":
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(socket_path)  # bound, never listening
        stale.close()
        assert stat.S_ISSOCK(os.lstat(socket_path).st_mode)
    else:
        Path(socket_path).write_text("not a socket\n")
    before = os.lstat(socket_path).st_ino
    put = run_cli("--socket", socket_path, "put", "q", "survived")
    assert put.returncode == 0, put.stderr.decode()
    after = os.lstat(socket_path)
    assert stat.S_ISSOCK(after.st_mode)
    assert after.st_ino != before
    pid = only_broker(sock_dir)
    got = run_cli("--socket", socket_path, "get", "q", "--timeout", "5")
    assert (got.returncode, got.stdout) == (0, b"survived\n")
    assert broker_pids(sock_dir) == [pid]


# -- 4. a second broker started by hand ------------------------------------------------


def test_broker_started_by_hand_while_one_runs(socket_path: str, sock_dir: str) -> None:
    with brokerq.connect(socket_path) as client:
        pid = client.broker_pid
        queue = client.queue("q")
        queue.put(b"before")
        identity = os.lstat(socket_path)
        second = subprocess.run([BROKER, socket_path], capture_output=True, timeout=20, check=False)
        assert second.returncode == 1
        assert second.stdout == b""
        line = one_line(second.stderr)
        assert f"pid {pid}" in line
        assert socket_path in line
        # The running broker was not disturbed: same socket, still serving.
        now = os.lstat(socket_path)
        assert (now.st_ino, now.st_dev) == (identity.st_ino, identity.st_dev)
        assert lock_file_pid(socket_path) == pid
        queue.put(b"after")
        assert queue.get(timeout=5) == b"before"
        assert queue.get(timeout=5) == b"after"
    with brokerq.connect(socket_path) as again:
        assert again.broker_pid == pid
    assert broker_pids(sock_dir) == [pid]


def test_refused_broker_names_no_dead_pid(socket_path: str, sock_dir: str) -> None:
    """While a spawning client holds the lock (before the new broker wrote its
    pid), the lock file still holds the pid of a broker that has exited."""
    gone = subprocess.Popen(["true"])
    gone.wait(timeout=10)
    Path(socket_path + ".lock").write_text(f"{gone.pid}\n")  # as an idled-out broker leaves it
    fd = take_spawn_lock(socket_path)  # as a client about to spawn a broker does
    assert fd is not None
    try:
        refused = subprocess.run(
            [BROKER, socket_path], capture_output=True, timeout=20, check=False
        )
    finally:
        os.close(fd)
    assert refused.returncode == 1
    line = one_line(refused.stderr)
    assert f"pid {gone.pid}" not in line, line
    assert "starting up" in line, line


# -- 5. racing brokers started by hand ------------------------------------------------


def test_racing_brokers_started_by_hand(
    socket_path: str, sock_dir: str, procs: Callable[..., subprocess.Popen[bytes]]
) -> None:
    racers = [procs([BROKER, socket_path, "--idle-exit", "0"]) for _ in range(8)]
    wait_until(
        lambda: sum(p.poll() is not None for p in racers) >= 7,
        timeout=30,
        what="seven racing brokers to give up",
    )
    running = [p for p in racers if p.poll() is None]
    assert len(running) == 1
    (winner,) = running
    with brokerq.connect(socket_path) as client:
        assert client.broker_pid == winner.pid
        queue = client.queue("q")
        queue.put(b"raced")
        assert queue.get(timeout=5) == b"raced"
    assert broker_pids(sock_dir) == [winner.pid]
    assert lock_file_pid(socket_path) == winner.pid
    for loser in racers:
        if loser is winner:
            continue
        out, err = loser.communicate(timeout=10)
        assert loser.returncode == 1
        assert out == b""
        line = one_line(err)
        assert "another broker" in line
        # The pid, when the loser could read it, is the winner's.
        words = line.split()
        if "pid" in words:
            assert words[words.index("pid") + 1].rstrip(")") == str(winner.pid)
    assert winner.poll() is None
    winner.send_signal(signal.SIGTERM)
    winner.communicate(timeout=10)
    assert winner.returncode == 0
    assert not os.path.lexists(socket_path)
    assert broker_pids(sock_dir) == []
    # The next client just spawns a broker again.
    with brokerq.connect(socket_path) as client:
        assert client.broker_pid != winner.pid


# -- 6. daemon hygiene -------------------------------------------------------------------


def test_s11_spawned_broker_does_not_hold_the_callers_pipes(
    socket_path: str, sock_dir: str
) -> None:
    done = subprocess.run(
        [BROKERQ, "--socket", socket_path, "put", "q", "x"],
        capture_output=True,
        timeout=10,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == b"1\n"
    pid = only_broker(sock_dir)
    assert still_running(pid)
    fds = {n: os.readlink(f"/proc/{pid}/fd/{n}") for n in (0, 1, 2)}
    assert fds[0] == fds[1] == os.devnull
    assert fds[2] == socket_path + ".log"
    # Its own session: a signal to the caller's process group cannot reach it.
    assert os.getsid(pid) != os.getsid(0)
    got = run_cli("--socket", socket_path, "get", "q", "--timeout", "5")
    assert got.stdout == b"x\n"


# -- 7, 8. unsafe socket directories, socket path length: tests/test_security.py (s14, s16)


# -- 9. hostile input -------------------------------------------------------------------------


@dataclass
class Victim:
    """A running broker, a client connected before any attack, a message put."""

    client: brokerq.Client
    pid: int
    connection: Connection

    def assert_still_serving(self) -> None:
        """The same broker still serves the connection made before the attack,
        and the message put before it is still there."""
        sock_dir = os.path.dirname(self.client.socket_path)
        assert broker_pids(sock_dir) == [self.pid]
        assert self.client.broker_pid == self.pid
        self.client.ping()
        queue = self.client.queue("live")
        queue.put(b"still")
        assert queue.get(timeout=5) == b"still"
        keep = self.client.queue("keep")
        assert keep.peek() == b"precious"
        assert keep.stats()["ready"] == 1
        assert self.client.connection() is self.connection  # never reconnected


@pytest.fixture
def victim(socket_path: str) -> Iterator[Victim]:
    with brokerq.connect(socket_path) as client:
        client.queue("keep").put(b"precious")
        yield Victim(client, client.broker_pid, client.connection())


@pytest.mark.parametrize("when", ["first_frame", "after_hello"])
def test_garbage_frame_gets_bad_frame_and_close(
    socket_path: str, victim: Victim, when: str
) -> None:
    raw = RawConnection(socket_path)
    try:
        if when == "after_hello":
            raw.hello()
        garbage = b"\xc1\xc1\xc1\xc1"
        raw.send_bytes(protocol.HEADER.pack(len(garbage)) + garbage)
        reply = raw.reply()
        assert isinstance(reply, Error)
        assert (reply.id, reply.code) == (0, "bad_frame")
        raw.assert_closed()
    finally:
        raw.close()
    victim.assert_still_serving()


@pytest.mark.parametrize("when", ["first_frame", "after_hello"])
def test_length_over_the_frame_limit_gets_bad_frame_and_close(
    socket_path: str, victim: Victim, when: str
) -> None:
    raw = RawConnection(socket_path)
    try:
        if when == "after_hello":
            raw.hello()
        raw.send_bytes(protocol.HEADER.pack(0xFFFFFFFF))
        reply = raw.reply()
        assert isinstance(reply, Error)
        assert (reply.id, reply.code) == (0, "bad_frame")
        raw.assert_closed()
    finally:
        raw.close()
    victim.assert_still_serving()


@pytest.mark.parametrize(
    ("frame", "request_id"),
    [
        ({"op": "frobnicate", "id": 5}, 5),
        ({"op": "put", "id": 7, "queue": 12, "body": b"x"}, 7),
        ({"op": "get", "id": 8}, 8),  # a required field missing
        ({"op": "get", "id": 9, "queue": "q", "timeout": "soon"}, 9),
    ],
    ids=["unknown_op", "wrong_type", "missing_field", "wrong_timeout_type"],
)
def test_invalid_request_gets_bad_request_and_connection_stays(
    socket_path: str,
    victim: Victim,
    frame: dict[str, Any],
    request_id: int,
) -> None:
    raw = RawConnection(socket_path)
    try:
        raw.hello()
        raw.send(frame)
        reply = raw.reply()
        assert isinstance(reply, Error)
        assert (reply.id, reply.code) == (request_id, "bad_request")
        raw.assert_usable(request_id + 100)
        # A valid put on the same connection still works.
        raw.send({"op": "put", "id": 200, "queue": "raw", "body": b"ok"})
        put = raw.reply()
        assert isinstance(put, PutReply)
        assert put.id == 200
    finally:
        raw.close()
    assert victim.client.queue("raw").get(timeout=5) == b"ok"
    victim.assert_still_serving()


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ({"op": "ping", "id": 3}, "bad_request"),
        ({"op": "frobnicate", "id": 4}, "bad_request"),
        ({"op": "hello", "id": 6, "version": 999}, "version"),
    ],
    ids=["ping", "unknown_op", "wrong_version"],
)
def test_first_frame_not_a_valid_hello_gets_error_and_close(
    socket_path: str, victim: Victim, frame: dict[str, Any], code: str
) -> None:
    raw = RawConnection(socket_path)
    try:
        raw.send(frame)
        reply = raw.reply()
        assert isinstance(reply, Error)
        assert (reply.id, reply.code) == (frame["id"], code)
        raw.assert_closed()
    finally:
        raw.close()
    victim.assert_still_serving()


def test_connection_closed_mid_frame_harms_nobody(socket_path: str, victim: Victim) -> None:
    raw = RawConnection(socket_path)
    raw.hello()
    raw.send_bytes(protocol.HEADER.pack(100) + b"\x82")  # a frame cut short
    raw.close()
    victim.assert_still_serving()


# -- 10. oversized messages --------------------------------------------------------------------


def test_max_message_size_from_the_spawning_environment(
    socket_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BROKERQ_MAX_MESSAGE_SIZE", "1000")
    with brokerq.connect(socket_path) as client:
        monkeypatch.delenv("BROKERQ_MAX_MESSAGE_SIZE")
        assert client.connection().max_message_size == 1000
        queue = client.queue("q")
        with pytest.raises(brokerq.MessageTooLarge):
            queue.put(b"x" * 1001)
        with pytest.raises(brokerq.MessageTooLarge):
            queue.put_many([b"x" * 1001])
        queue.put(b"x" * 1000)
        assert queue.get(timeout=5) == b"x" * 1000

        too_big = run_cli("--socket", socket_path, "put", "q", "y" * 1001)
        assert too_big.returncode == 1
        assert "1001" in one_line(too_big.stderr)
        fits = run_cli("--socket", socket_path, "put", "q", "y" * 1000)
        assert fits.returncode == 0, fits.stderr.decode()
        assert queue.get(timeout=5) == b"y" * 1000

        # The broker enforces the limit too, for a client that skips the check.
        raw = RawConnection(socket_path)
        try:
            assert raw.hello().max_message_size == 1000
            raw.send({"op": "put", "id": 2, "queue": "q", "body": b"z" * 1001})
            reply = raw.reply()
            assert isinstance(reply, Error)
            assert (reply.id, reply.code) == (2, "too_large")
            raw.assert_usable(3)
        finally:
            raw.close()
        with pytest.raises(brokerq.Empty):
            queue.get_nowait()


# -- 11. stop ------------------------------------------------------------------------------------


def test_stop_on_a_cold_path_spawns_nothing(socket_path: str, sock_dir: str) -> None:
    result = run_cli("--socket", socket_path, "stop")
    assert result.returncode == 0
    assert result.stdout == b""
    line = one_line(result.stderr)
    assert "no broker is running" in line
    assert socket_path in line
    assert broker_pids(sock_dir) == []
    assert os.listdir(sock_dir) == []
    with brokerq.Client(socket_path) as client:
        assert client.stop() is False
    assert os.listdir(sock_dir) == []


def test_stop_a_running_broker(socket_path: str, sock_dir: str) -> None:
    put = run_cli("--socket", socket_path, "put", "q", "x")
    assert put.returncode == 0
    pid = only_broker(sock_dir)
    result = run_cli("--socket", socket_path, "stop")
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")
    assert wait_exit(pid) == 0
    assert broker_pids(sock_dir) == []
    assert not os.path.lexists(socket_path)
    assert os.path.exists(socket_path + ".lock")  # never deleted


# -- 12. idle exit -------------------------------------------------------------------------------


def test_idle_broker_exits_and_respawns(
    socket_path: str, sock_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BROKERQ_IDLE_EXIT", "1")
    with brokerq.connect(socket_path) as client:
        pid = client.broker_pid
        client.ping()
    assert wait_exit(pid, timeout=10) == 0
    assert not os.path.lexists(socket_path)
    assert broker_pids(sock_dir) == []
    monkeypatch.delenv("BROKERQ_IDLE_EXIT")
    with brokerq.connect(socket_path) as client:
        assert client.broker_pid != pid
        assert broker_pids(sock_dir) == [client.broker_pid]


def test_broker_with_a_journal_idles_out_holding_messages(
    socket_path: str, sock_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BROKERQ_IDLE_EXIT", "1")
    with brokerq.connect(socket_path) as client:
        pid = client.broker_pid
        client.queue("q").put(b"kept")
    assert wait_exit(pid, timeout=10) == 0
    assert not os.path.lexists(socket_path)
    with brokerq.connect(socket_path) as client:
        assert client.broker_pid != pid
        assert client.queue("q").get(timeout=5) == b"kept"


def test_broker_without_a_journal_holding_a_message_does_not_idle_exit(
    socket_path: str, sock_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BROKERQ_IDLE_EXIT", "1")
    monkeypatch.setenv("BROKERQ_JOURNAL", "0")
    with brokerq.connect(socket_path) as client:
        pid = client.broker_pid
        client.queue("q").put(b"kept")
    # Showing that something does not happen takes time: well past the
    # idle limit (1 s) and two housekeeping rounds.
    time.sleep(2.5)
    assert still_running(pid)
    assert stat.S_ISSOCK(os.lstat(socket_path).st_mode)
    with brokerq.connect(socket_path) as client:
        assert client.broker_pid == pid
        assert client.queue("q").get(timeout=5) == b"kept"
    # Empty again, with no connection: now it idles out.
    assert wait_exit(pid, timeout=10) == 0
    assert not os.path.lexists(socket_path)


# -- 13. the client does not import trio -----------------------------------------------------------

NO_TRIO = r"""
import sys
import brokerq
import brokerq.cli
loaded = [m for m in ("trio", "anyio") if m in sys.modules]
assert not loaded, f"after import: {loaded}"
with brokerq.connect(sys.argv[1]) as client:
    queue = client.queue("q")
    queue.put(b"x")
    assert queue.get(timeout=5) == b"x"
loaded = [m for m in ("trio", "anyio") if m in sys.modules]
assert not loaded, f"after use: {loaded}"
print("ok")
"""


def test_client_does_not_import_trio(socket_path: str) -> None:
    done = subprocess.run(
        python(NO_TRIO, socket_path), capture_output=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == b"ok\n"


# -- 14/15. blocked consumers in other processes ---------------------------------------------

CONSUMER = r"""
import sys
import brokerq
with brokerq.connect(sys.argv[1]) as client:
    body = client.queue(sys.argv[2]).get(timeout=float(sys.argv[3]))
sys.stdout.buffer.write(body + b"\n")
"""


def test_blocked_gets_are_served_in_order_across_processes(
    socket_path: str, procs: Callable[..., subprocess.Popen[bytes]]
) -> None:
    with brokerq.connect(socket_path) as client:
        queue = client.queue("fair")
        first = procs(python(CONSUMER, socket_path, "fair", "30"))
        wait_until(lambda: queue.stats()["waiters"] == 1, what="consumer A to wait")
        second = procs(python(CONSUMER, socket_path, "fair", "30"))
        wait_until(lambda: queue.stats()["waiters"] == 2, what="consumer B to wait")
        queue.put(b"m1")
        queue.put(b"m2")
        out_a, err_a = first.communicate(timeout=20)
        out_b, err_b = second.communicate(timeout=20)
        assert first.returncode == 0, err_a.decode()
        assert second.returncode == 0, err_b.decode()
        assert (out_a, out_b) == (b"m1\n", b"m2\n")
        stats = queue.stats()
        assert (stats["waiters"], stats["ready"], stats["delivered_total"]) == (0, 0, 2)


def test_killed_consumer_loses_no_message(
    socket_path: str, procs: Callable[..., subprocess.Popen[bytes]]
) -> None:
    with brokerq.connect(socket_path) as client:
        queue = client.queue("q")
        consumer = procs(python(CONSUMER, socket_path, "q", "30"))
        wait_until(lambda: queue.stats()["waiters"] == 1, what="the consumer to wait")
        consumer.kill()
        consumer.wait(timeout=10)
        wait_until(lambda: queue.stats()["waiters"] == 0, what="the broker to drop the waiter")
        queue.put(b"after")
        assert queue.stats()["ready"] == 1
        assert queue.get(timeout=5) == b"after"
