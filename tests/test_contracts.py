"""Contracts outsiders build on (docs/protocol.md sections 3, 4, 10).

Bursts of connections, the one rule for errors with id 0, the spawn
fallback for runtimes without ``flock``, path normalisation, the frames
pipelined behind ``hello``, and a ``stop`` that leaves nothing behind. Each
test talks to a real broker in its own short socket directory.
"""

from __future__ import annotations

import fcntl
import os
import random
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
from conftest import BIN, Procs, broker_pids, read_line, reap_children, run_cli, wait_until

import brokerq
from brokerq import protocol
from brokerq.broker.journal import journal_path
from brokerq.protocol import Error, FrameReader, HelloReply, PingReply, PutReply
from brokerq.spawn import lock_path, resolve_socket_path

BROKER = str(BIN / "local-queue-broker")


def frame(obj: dict[str, Any]) -> bytes:
    payload = msgspec.msgpack.encode(obj)
    return protocol.HEADER.pack(len(payload)) + payload


HELLO = frame({"op": "hello", "id": 1, "version": protocol.PROTOCOL_VERSION})


def replies(sock: socket.socket, count: int, reader: FrameReader) -> list[protocol.AnyReply]:
    """The next ``count`` replies on ``sock`` (its timeout bounds each read)."""
    got: list[protocol.AnyReply] = []
    while len(got) < count:
        payload = reader.next_frame()
        if payload is not None:
            got.append(protocol.decode_reply(payload))
            continue
        data = sock.recv(65536)
        assert data, f"the broker closed the connection after {got}"
        reader.feed(data)
    return got


def at_eof(sock: socket.socket) -> bool:
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


# -- 1. a burst of connections ----------------------------------------------------

LOOP = """
import os, sys, brokerq
client = brokerq.connect(sys.argv[1])
queue = client.queue("loop")
print("ready", flush=True)
rounds = 0
while not os.path.exists(sys.argv[2]) and rounds < 1_000_000:
    queue.put(b"x")
    assert queue.get(timeout=10) == b"x"
    rounds += 1
print(rounds, flush=True)
"""


def test_a_burst_of_a_thousand_connects_is_never_refused(
    socket_path: str, sock_dir: str, procs: Procs
) -> None:
    """1,000 connects as fast as one process makes them (non-blocking, as a
    socket with a timeout is), while the broker serves a put/get loop: each
    connects at once (no EAGAIN from a full backlog) and completes a ping."""
    stop_file = os.path.join(sock_dir, "stop")
    loop = procs([sys.executable, "-c", LOOP, socket_path, stop_file])  # killed by pid if need be
    sockets: list[socket.socket] = []
    try:
        assert read_line(loop) == b"ready\n"
        for _ in range(1000):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.settimeout(20)
            sock.connect(socket_path)  # EAGAIN would raise BlockingIOError here
        for sock in sockets:
            sock.sendall(HELLO + frame({"op": "ping", "id": 2}))
        for sock in sockets:
            hello, ping = replies(sock, 2, FrameReader(2**20))
            assert isinstance(hello, HelloReply)
            assert isinstance(ping, PingReply)
            assert ping.id == 2
    finally:
        for sock in sockets:
            sock.close()
        Path(stop_file).touch()
        out, err = loop.communicate(timeout=30)
    assert loop.returncode == 0, err.decode()
    assert int(out.split()[-1]) > 0  # the loop was served throughout


# -- 4. one rule for errors with id 0 ---------------------------------------------


@pytest.mark.parametrize(
    "request_frame",
    [
        {"op": "ping"},  # no id
        {"op": "ping", "id": "seven"},  # not an int
        {"op": "ping", "id": 0},  # the reserved id
        {"op": "frobnicate", "id": 0},
    ],
    ids=["missing", "not_int", "zero", "zero_unknown_op"],
)
def test_an_error_with_id_0_always_ends_the_connection(
    socket_path: str, request_frame: dict[str, Any]
) -> None:
    """A request the broker cannot name gets bad_request with id 0, and the
    connection closes: an id-0 error is always about the connection, so a
    client fails everything outstanding and never guesses (protocol.md 5)."""
    with brokerq.connect(socket_path) as bystander:
        bystander.queue("keep").put(b"safe")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(socket_path)
            reader = FrameReader(2**20)
            sock.sendall(HELLO)
            replies(sock, 1, reader)
            sock.sendall(frame(request_frame) + frame({"op": "ping", "id": 5}))
            (error,) = replies(sock, 1, reader)
            assert isinstance(error, Error)
            assert (error.id, error.code) == (0, "bad_request")
            assert reader.buffered == 0
            assert at_eof(sock)  # the ping behind it is never answered
        assert bystander.queue("keep").get(timeout=5) == b"safe"


def test_an_error_with_its_id_leaves_the_connection_open(socket_path: str) -> None:
    brokerq.connect(socket_path).close()  # spawn
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(socket_path)
        reader = FrameReader(2**20)
        sock.sendall(HELLO + frame({"op": "frobnicate", "id": 4}) + frame({"op": "ping", "id": 5}))
        _, error, ping = replies(sock, 3, reader)
        assert isinstance(error, Error)
        assert (error.id, error.code) == (4, "bad_request")
        assert isinstance(ping, PingReply)


# -- frames pipelined behind hello -------------------------------------------------


def test_a_frame_pipelined_behind_hello_has_the_full_frame_limit(socket_path: str) -> None:
    """The 64 KiB limit holds until the hello is handled; a frame sent in
    the same write right behind it is held to max_frame_size."""
    brokerq.connect(socket_path).close()
    body = os.urandom(200_000)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(socket_path)
        sock.sendall(HELLO + frame({"op": "put", "id": 2, "queue": "big", "body": body}))
        hello, put = replies(sock, 2, FrameReader(2**24))
        assert isinstance(hello, HelloReply)
        assert isinstance(put, PutReply)
    with brokerq.connect(socket_path) as client:
        assert client.queue("big").get(timeout=5) == body


# -- 10.1: one spelling of a path --------------------------------------------------


def test_a_leading_double_slash_names_the_same_broker(socket_path: str, sock_dir: str) -> None:
    """``//tmp/x`` and ``/tmp/x`` are one path (protocol.md 10.1): one
    broker, and one --data-dir journal name, whichever spelling is used."""
    doubled = "/" + socket_path.replace("/", "//")
    assert doubled.startswith("///")
    assert resolve_socket_path(doubled) == socket_path
    assert resolve_socket_path("//" + socket_path.lstrip("/")) == socket_path
    assert journal_path(resolve_socket_path(doubled), "/d") == journal_path(socket_path, "/d")
    with brokerq.connect(doubled) as one, brokerq.connect(socket_path) as other:
        assert one.socket_path == socket_path
        one.queue("q").put(b"same")
        assert other.queue("q").get(timeout=5) == b"same"
        assert one.broker_pid == other.broker_pid
    assert len(broker_pids(sock_dir)) == 1


# -- 10.3 / 10.4: spawning without flock --------------------------------------------


def read_ready(fd: int, deadline: float) -> bytes:
    """What the broker wrote on its ready pipe: a line, or b"" at end of file."""
    data = b""
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no line on the ready pipe in time (got {data!r})"
        readable, _, _ = select.select([fd], [], [], remaining)
        if readable:
            chunk = os.read(fd, 64)
            if not chunk:
                return data
            data += chunk
    return data


def spawn_without_lock(socket_path: str, deadline: float) -> bytes:
    """Start a broker as a client without flock does (protocol.md 10.3's
    fallback): no --lock-fd; the broker takes the lock itself."""
    ready_r, ready_w = os.pipe()
    try:
        launcher = subprocess.Popen(
            [BROKER, socket_path, "--daemon", "--ready-fd", str(ready_w)],
            pass_fds=(ready_w,),
            start_new_session=True,
            cwd="/",
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(ready_w)
        ready_w = -1
        line = read_ready(ready_r, deadline)
        launcher.wait(timeout=10)
        return line
    finally:
        os.close(ready_r)
        if ready_w >= 0:
            os.close(ready_w)


def connect_without_flock_or_peercred(socket_path: str, timeout: float = 20) -> tuple[int, int]:
    """Find or start the broker as a runtime without flock or SO_PEERCRED
    would, by the text of protocol.md alone. Returns (broker pid, spawns)."""
    deadline = time.monotonic() + timeout
    spawns = 0
    delay = 0.001
    while True:
        assert time.monotonic() < deadline, "the broker was unavailable"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        try:
            sock.connect(socket_path)
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            spawns += 1
            line = spawn_without_lock(socket_path, deadline)
            if line.startswith(b"READY "):
                continue  # go back to step 1 at once
            assert line.startswith(b"BUSY "), f"the broker failed to start: {line!r}"
            # Another broker won the lock: back off, connect again.
        except BlockingIOError:
            sock.close()  # a full backlog: a broker serves; connect again
        else:
            with sock:
                # No peer credentials: the private directory of 10.2 (the
                # fixture's) and the socket file's owner stand in (protocol.md 8).
                assert os.lstat(socket_path).st_uid == os.geteuid()
                sock.sendall(HELLO)
                (hello,) = replies(sock, 1, FrameReader(2**20))
                assert isinstance(hello, HelloReply)
                return hello.pid, spawns
        time.sleep(delay * (0.5 + random.random()))
        delay = min(delay * 2, 0.05)


def test_racing_spawners_without_flock_end_with_one_broker(socket_path: str, sock_dir: str) -> None:
    results: list[tuple[int, int]] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            results.append(connect_without_flock_or_peercred(socket_path))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    assert len(results) == 8
    pids = {pid for pid, _ in results}
    assert len(pids) == 1
    (pid,) = pids

    def only_the_winner_left() -> bool:
        reap_children()  # the losers exit 1 after saying BUSY
        return broker_pids(sock_dir) == [pid]

    wait_until(only_the_winner_left, 10, "the losing brokers to exit")
    with brokerq.connect(socket_path) as client:
        assert client.broker_pid in pids


def test_a_broker_that_loses_the_lock_says_busy_on_its_ready_pipe(socket_path: str) -> None:
    """Without --lock-fd, a broker that finds the lock held writes
    ``BUSY <pid>`` (end of file would mean it failed to start) and exits 1."""
    fd = os.open(lock_path(socket_path), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, f"{os.getpid()}\n".encode())
        line = spawn_without_lock(socket_path, time.monotonic() + 20)
    finally:
        os.close(fd)
    assert line == f"BUSY {os.getpid()}\n".encode()
    assert not os.path.exists(socket_path)


# -- --lock-fd and --ready-fd: documented, and checked --------------------------------


def test_the_spawn_options_are_in_the_help() -> None:
    out = subprocess.run([BROKER, "--help"], capture_output=True, timeout=20, check=True).stdout
    text = out.decode()
    for option in ("--lock-fd", "--ready-fd", "--daemon"):
        assert option in text, option
    assert "BUSY" in text


@pytest.mark.parametrize("kind", ["pipe", "other_file", "closed"])
def test_a_lock_fd_that_is_not_the_lock_file_is_refused_clearly(
    socket_path: str, sock_dir: str, kind: str
) -> None:
    keep: list[int] = []
    if kind == "pipe":
        r, w = os.pipe()
        keep += [r, w]
        fd = r
    elif kind == "other_file":
        fd = os.open(os.path.join(sock_dir, "other"), os.O_RDWR | os.O_CREAT, 0o600)
        keep.append(fd)
    else:
        fd = 97
    try:
        result = subprocess.run(
            [BROKER, socket_path, "--lock-fd", str(fd)],
            pass_fds=tuple(keep),
            capture_output=True,
            timeout=20,
            check=False,
        )
    finally:
        for k in keep:
            os.close(k)
    message = result.stderr.decode()
    assert result.returncode == 1, message
    assert f"--lock-fd {fd}" in message
    if kind == "closed":
        assert "not an open file descriptor" in message
    else:
        assert f"not the lock file {lock_path(socket_path)}" in message
    assert "Errno" not in message
    assert not os.path.exists(socket_path)


# -- 10.6: stop leaves nothing behind ------------------------------------------------


def test_stop_on_a_path_whose_directory_is_missing_creates_nothing(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "never", "b.sock")
    result = run_cli("--socket", path, "stop")
    assert result.returncode == 0, result.stderr
    assert b"no broker is running" in result.stderr
    assert not os.path.exists(os.path.dirname(path))
    with pytest.raises(brokerq.BrokerUnavailable):
        brokerq.Client(path, timeout=1).connection(spawn=False)
    assert not os.path.exists(os.path.dirname(path))
    wait_until(lambda: not broker_pids(sock_dir), 1, "no broker")
