"""The C client (clients/c), written from docs/protocol.md alone, against the
real broker and the Python client: bodies both ways, a reserve session,
timeouts, a broker the C client spawns (alone and racing), and errors.

The client is built once per session with the machine's ``cc``; a build
failure (a warning included) fails every test here.
"""

from __future__ import annotations

import fcntl
import os
import select
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import BIN, Procs, broker_pids, read_line, wait_until

import brokerq

C_DIR = Path(__file__).resolve().parent.parent / "clients" / "c"
BODIES = {
    "nul": b"a\x00b\x00",
    "ff": b"\xff\xfe\x00\xff",
    "empty": b"",
    "1mib": bytes(range(256)) * 4096,
}


@pytest.fixture(scope="session")
def c_client() -> Iterator[Path]:
    out = Path(tempfile.mkdtemp(prefix="bqc-build"))
    exe = out / "brokerq-c"
    sources = [str(C_DIR / name) for name in ("brokerq-c.c", "brokerq.c", "mp.c")]
    flags = ["-std=c99", "-O2", "-Wall", "-Wextra", "-pedantic", "-Werror"]
    built = subprocess.run(
        ["cc", *flags, "-o", str(exe), *sources],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    try:
        assert built.returncode == 0, built.stderr
        yield exe
    finally:
        shutil.rmtree(out, ignore_errors=True)


def c_env(**extra: str) -> dict[str, str]:
    """The C client finds local-queue-broker on PATH, as the spec says (§10.4)."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **extra}


def run_c(
    exe: Path, *args: str, input: bytes | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [str(exe), *args],
        input=input,
        capture_output=True,
        timeout=30,
        env=env or c_env(),
        check=False,
    )


def read_exact(proc: subprocess.Popen[bytes], n: int, timeout: float = 10.0) -> bytes:
    """Exactly ``n`` bytes of ``proc``'s stdout, bounded in time."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    data = b""
    while len(data) < n:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"only {len(data)} of {n} bytes from pid {proc.pid}"
        if select.select([fd], [], [], remaining)[0]:
            chunk = os.read(fd, n - len(data))
            assert chunk, f"pid {proc.pid} closed its stdout after {len(data)} bytes"
            data += chunk
    return data


def start_session(
    exe: Path, procs: Procs, socket_path: str, queue: str, *args: str
) -> tuple[subprocess.Popen[bytes], int, int, bytes]:
    """A C reserve session: its process, then the id, attempt and body it printed."""
    proc = procs(
        [str(exe), "-s", socket_path, "reserve", queue, "-t", "10", *args],
        stdin=subprocess.PIPE,
        env=c_env(),
    )
    msg_id, attempt, length = (int(f) for f in read_line(proc).split())
    return proc, msg_id, attempt, read_exact(proc, length)


def say(proc: subprocess.Popen[bytes], line: str) -> bytes:
    """Send one verb line to a reserve session; its one-line answer."""
    assert proc.stdin is not None
    proc.stdin.write(line.encode() + b"\n")
    proc.stdin.flush()
    return read_line(proc)


def end_session(proc: subprocess.Popen[bytes]) -> int:
    assert proc.stdin is not None
    proc.stdin.close()
    return proc.wait(timeout=10)


@pytest.mark.parametrize("name", list(BODIES))
def test_c_put_python_get(c_client: Path, socket_path: str, name: str) -> None:
    body = BODIES[name]
    put = run_c(c_client, "-s", socket_path, "put", "jobs", input=body)
    assert put.returncode == 0, put.stderr
    with brokerq.connect(socket_path) as client:
        assert client.queue("jobs").get(timeout=5) == body
        assert client.queue("jobs").stats()["ready"] == 0
    assert int(put.stdout) >= 1


@pytest.mark.parametrize("name", list(BODIES))
def test_python_put_c_get(c_client: Path, socket_path: str, name: str) -> None:
    body = BODIES[name]
    with brokerq.connect(socket_path) as client:
        client.queue("jobs").put(body)
        got = run_c(c_client, "-s", socket_path, "get", "jobs", "-t", "5")
        assert got.returncode == 0, got.stderr
        assert got.stdout == body
        assert client.queue("jobs").stats()["ready"] == 0


def test_body_argument_and_socket_from_environment(c_client: Path, socket_path: str) -> None:
    env = c_env(BROKERQ_SOCKET=socket_path)
    assert run_c(c_client, "put", "jobs", "from argv", env=env).returncode == 0
    got = run_c(c_client, "get", "jobs", "-t", "5", env=env)
    assert (got.returncode, got.stdout) == (0, b"from argv")


def test_reserve_ack(c_client: Path, socket_path: str, procs: Procs) -> None:
    with brokerq.connect(socket_path) as client:
        jobs = client.queue("jobs")
        msg_id = jobs.put(b"job\x00\xff")
        proc, got_id, attempt, body = start_session(c_client, procs, socket_path, "jobs")
        assert (got_id, attempt, body) == (msg_id, 1, b"job\x00\xff")
        assert jobs.stats()["reserved"] == 1
        assert say(proc, "touch") == b"ok\n"
        assert say(proc, "touch 20") == b"ok\n"
        assert say(proc, "ack") == b"ok\n"
        assert say(proc, "ack").startswith(b"error lease_lost ")
        assert say(proc, "frobnicate").startswith(b"error usage ")
        assert end_session(proc) == 0
        stats = jobs.stats()
        assert (stats["ready"], stats["reserved"], stats["buried"]) == (0, 0, 0)
        with pytest.raises(brokerq.Empty):
            jobs.get(timeout=0)


def test_reserve_release_goes_to_another_consumer(
    c_client: Path, socket_path: str, procs: Procs
) -> None:
    with brokerq.connect(socket_path) as client:
        jobs = client.queue("jobs")
        jobs.put(b"again")
        proc, msg_id, attempt, _ = start_session(c_client, procs, socket_path, "jobs", "-l", "30")
        assert attempt == 1
        assert say(proc, "release") == b"ok\n"
        msg = jobs.reserve(timeout=5)
        assert (msg.id, msg.attempt, msg.body) == (msg_id, 2, b"again")
        msg.ack()
        assert say(proc, "ack").startswith(b"error lease_lost ")
        assert end_session(proc) == 0


def test_reserve_eof_without_ack_gives_the_message_back(
    c_client: Path, socket_path: str, procs: Procs
) -> None:
    with brokerq.connect(socket_path) as client:
        jobs = client.queue("jobs")
        jobs.put(b"unfinished")
        proc, msg_id, _, _ = start_session(c_client, procs, socket_path, "jobs")
        assert end_session(proc) == 0
        msg = jobs.reserve(timeout=5)
        assert (msg.id, msg.attempt, msg.body) == (msg_id, 2, b"unfinished")
        msg.ack()


def test_reserve_bury(c_client: Path, socket_path: str, procs: Procs) -> None:
    with brokerq.connect(socket_path) as client:
        jobs = client.queue("jobs")
        jobs.put(b"poison")
        proc, _, _, _ = start_session(c_client, procs, socket_path, "jobs")
        assert say(proc, "bury") == b"ok\n"
        assert end_session(proc) == 0
        assert jobs.stats()["buried"] == 1


def test_timeouts(c_client: Path, socket_path: str) -> None:
    with brokerq.connect(socket_path):  # a broker runs: no spawn in the timings
        start = time.monotonic()
        got = run_c(c_client, "-s", socket_path, "get", "empty", "-t", "0.2")
        took = time.monotonic() - start
        assert got.returncode == 3, got.stderr
        assert got.stdout == b""
        assert got.stderr.startswith(b"brokerq-c: empty: ")
        assert 0.15 < took < 5
        for cmd in ("get", "reserve"):
            start = time.monotonic()
            got = run_c(c_client, "-s", socket_path, cmd, "empty", "-t", "0")
            assert got.returncode == 3, got.stderr
            assert time.monotonic() - start < 2


def test_c_spawns_the_broker(c_client: Path, socket_path: str, sock_dir: str) -> None:
    assert broker_pids(sock_dir) == []
    put = run_c(c_client, "-s", socket_path, "put", "jobs", "spawned")
    assert put.returncode == 0, put.stderr
    [pid] = broker_pids(sock_dir)
    lock_fd = os.open(socket_path + ".lock", os.O_RDONLY)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(lock_fd)
    assert Path(socket_path + ".lock").read_text().strip() == str(pid)
    with brokerq.connect(socket_path) as client:
        assert client.broker_pid == pid
        assert b"local-queue-broker" in Path(f"/proc/{pid}/cmdline").read_bytes()
        assert client.queue("jobs").get(timeout=5) == b"spawned"
    assert broker_pids(sock_dir) == [pid]


def test_racing_c_clients_start_one_broker(
    c_client: Path, socket_path: str, sock_dir: str, procs: Procs
) -> None:
    n = 8
    racers = [
        procs([str(c_client), "-s", socket_path, "put", "jobs", f"m{i}"], env=c_env())
        for i in range(n)
    ]
    for proc in racers:
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
    wait_until(lambda: len(broker_pids(sock_dir)) == 1, what="one broker")
    [pid] = broker_pids(sock_dir)
    with brokerq.connect(socket_path) as client:
        assert client.broker_pid == pid
        jobs = client.queue("jobs")
        got = [jobs.get(timeout=5) for _ in range(n)]
        assert sorted(got) == sorted(f"m{i}".encode() for i in range(n))
        stats = jobs.stats()
        assert (stats["ready"], stats["put_total"]) == (0, n)
    assert broker_pids(sock_dir) == [pid]


def test_bad_queue_name_is_the_brokers_error(c_client: Path, socket_path: str) -> None:
    for queue in ("dead:letters", "tab\there", "x" * 256):
        got = run_c(c_client, "-s", socket_path, "put", queue, "body")
        assert got.returncode == 1
        assert got.stderr.startswith(b"brokerq-c: invalid: ")
        assert got.stderr.count(b"\n") == 1


def test_socket_path_too_long(c_client: Path, sock_dir: str) -> None:
    path = os.path.join(sock_dir, "s" * (108 - len(sock_dir) - 1))
    assert len(path) == 108
    got = run_c(c_client, "-s", path, "put", "jobs", "x")
    assert got.returncode == 1
    assert got.stderr.startswith(b"brokerq-c: path: socket path is 108 bytes, over the limit")
    assert os.listdir(sock_dir) == []
    assert broker_pids(sock_dir) == []


def test_unsafe_socket_directory_is_refused(c_client: Path, sock_dir: str) -> None:
    os.chmod(sock_dir, 0o755)
    got = run_c(c_client, "-s", os.path.join(sock_dir, "b.sock"), "put", "jobs", "x")
    assert got.returncode == 1
    assert got.stderr.startswith(b"brokerq-c: permission: unsafe socket directory")
    assert stat.S_IMODE(os.stat(sock_dir).st_mode) == 0o755  # never chmod'ed
    assert os.listdir(sock_dir) == []


def test_busy_broker_is_reported_not_replaced(
    c_client: Path, socket_path: str, sock_dir: str, procs: Procs
) -> None:
    procs([str(BIN / "local-queue-broker"), socket_path, "--max-connections", "1"])
    wait_until(lambda: os.path.exists(socket_path), what="the broker's socket")
    with socket.socket(socket.AF_UNIX) as held:
        held.connect(socket_path)
        got = run_c(c_client, "-s", socket_path, "put", "jobs", "x")
        assert got.returncode == 1
        assert got.stderr.startswith(b"brokerq-c: busy: ")
        assert len(broker_pids(sock_dir)) == 1


def test_usage(c_client: Path) -> None:
    helped = run_c(c_client, "-h")
    assert (helped.returncode, helped.stdout[:17]) == (0, b"usage: brokerq-c ")
    for args in ([], ["frob", "q"], ["get"], ["get", "q", "-t", "-1"], ["put", "q", "-l", "1"]):
        assert run_c(c_client, *args).returncode == 2, args
