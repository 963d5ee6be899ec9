"""systemd socket activation (LISTEN_FDS), with the service manager played by the test.

The test binds and listens on the socket itself, as systemd's socket unit
would, and starts ``local-queue-broker`` through a tiny launcher that puts
the listener on fd 3 and sets ``LISTEN_PID``/``LISTEN_FDS`` for the broker's
own pid, as systemd does.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest
from conftest import BIN, Procs, gone, wait_until

import brokerq
from brokerq import protocol
from brokerq.protocol import Hello, HelloReply
from brokerq.spawn import lock_path, open_lock, try_lock

LAUNCHER = """\
import os, sys
fd = int(sys.argv[1])
os.dup2(fd, 3)  # inheritable: it survives the exec
if fd != 3:
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ["LISTEN_FDS"] = sys.argv[2]
os.execv(sys.argv[3], sys.argv[3:])
"""


def listen(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    sock.listen(16)
    return sock


def activate(
    procs: Procs, sock: socket.socket, socket_path: str, *args: str, fds: str = "1"
) -> subprocess.Popen[bytes]:
    """Start the broker as systemd would, with ``sock`` as its fd 3."""
    broker = str(BIN / "local-queue-broker")
    argv = [sys.executable, "-c", LAUNCHER, str(sock.fileno()), fds, broker, socket_path]
    return procs([*argv, "--no-journal", *args], pass_fds=(sock.fileno(),))


def test_an_activated_broker_serves_the_socket_it_was_given(procs: Procs, socket_path: str) -> None:
    sock = listen(socket_path)
    identity = os.stat(socket_path).st_ino
    proc = activate(procs, sock, socket_path)
    with brokerq.connect(socket_path) as client:
        assert client.broker_pid == proc.pid  # served by it, not by a spawned one
        q = client.queue("jobs")
        q.put(b"x")
        assert q.get(timeout=5) == b"x"
        stats = client.stats()
        assert stats["socket_activated"] is True
        assert os.readlink(f"/proc/{proc.pid}/fd/3").startswith("socket:")
        assert client.stop()
    assert proc.wait(timeout=10) == 0
    # systemd's socket file is left in place for the next activation.
    assert os.stat(socket_path).st_ino == identity
    sock.close()


def test_an_activated_broker_idles_out_without_unlinking(procs: Procs, socket_path: str) -> None:
    sock = listen(socket_path)
    identity = os.stat(socket_path).st_ino
    proc = activate(procs, sock, socket_path, "--idle-exit", "0.2")
    wait_until(lambda: proc.poll() is not None, what="the idle exit")
    assert proc.returncode == 0
    assert os.stat(socket_path).st_ino == identity
    # The next connection queues in systemd's socket; the next broker serves it.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as early:
        early.connect(socket_path)
        early.sendall(protocol.encode_frame(Hello(id=1, version=protocol.PROTOCOL_VERSION)))
        again = activate(procs, sock, socket_path)
        early.settimeout(10)
        reader = protocol.FrameReader(protocol.HANDSHAKE_FRAME_LIMIT)
        while (payload := reader.next_frame()) is None:
            reader.feed(early.recv(65536))
        reply = protocol.decode_reply(payload)
        assert isinstance(reply, HelloReply)
        assert reply.pid == again.pid
        with brokerq.connect(socket_path) as client:
            assert client.broker_pid == again.pid
            client.stop()
    sock.close()


def test_an_activated_broker_refuses_to_run_beside_another_lock_holder(
    procs: Procs, socket_path: str
) -> None:
    sock = listen(socket_path)
    fd = open_lock(socket_path)  # a self-spawned broker would hold this
    try:
        assert try_lock(fd)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        proc = activate(procs, sock, socket_path)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 1
        assert f"another broker (pid {os.getpid()}) already serves" in err.decode()
    finally:
        os.close(fd)
        sock.close()
    assert os.path.exists(lock_path(socket_path))


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("two", "passed 2 sockets"),
        ("elsewhere", "is bound to"),
        ("not-listening", "not listening"),
    ],
)
def test_sockets_that_cannot_be_served_are_a_clear_start_up_error(
    procs: Procs, socket_path: str, sock_dir: str, setup: str, message: str
) -> None:
    if setup == "elsewhere":
        sock = listen(os.path.join(sock_dir, "other.sock"))
    elif setup == "not-listening":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(socket_path)
    else:
        sock = listen(socket_path)
    with sock:
        proc = activate(procs, sock, socket_path, fds="2" if setup == "two" else "1")
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 1
    assert message in err.decode()
    assert len(err.decode().strip().splitlines()) == 1
    assert gone(proc.pid)


def test_an_activated_broker_raises_the_backlog(procs: Procs, socket_path: str) -> None:
    """systemd listened with a small backlog (16 here): the broker asks for
    the system's maximum, so a burst of connects waits instead of EAGAIN."""
    sock = listen(socket_path)
    proc = activate(procs, sock, socket_path)
    fillers: list[socket.socket] = []
    with brokerq.connect(socket_path) as client:
        assert client.broker_pid == proc.pid
        os.kill(proc.pid, signal.SIGSTOP)  # nothing is accepted meanwhile
        try:
            for _ in range(200):
                filler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                fillers.append(filler)
                filler.setblocking(False)
                filler.connect(socket_path)  # BlockingIOError past a backlog of 16
        finally:
            os.kill(proc.pid, signal.SIGCONT)
            for filler in fillers:
                filler.close()
        assert len(fillers) == 200
        assert client.stop()
    assert proc.wait(timeout=10) == 0
    sock.close()
