"""Shared fixtures: a short private socket directory per test, and cleanup.

Brokers daemonize, so without help they would be reparented to init and
outlive the test run. The test process makes itself a *child subreaper*
(Linux), so every broker a test starts stays its descendant; after each
test the brokers of that test's directory are found by their argv (the
socket path is unique to the test) and ended by pid, and every exited
child is reaped.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

import brokerq
from brokerq.broker.server import Broker, BrokerConfig

PR_SET_CHILD_SUBREAPER = 36
T = TypeVar("T")
BIN = Path(sys.executable).parent


def _become_subreaper() -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


_become_subreaper()


def broker_pids(marker: str) -> list[int]:
    """Live broker processes whose command line mentions ``marker``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = [a.decode(errors="replace") for a in argv]
        if any("local-queue-broker" in a for a in text) and any(marker in a for a in text):
            pids.append(int(entry.name))
    return pids


def reap_children() -> None:
    """Collect every exited child (brokers land here through the subreaper)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def kill_brokers(marker: str) -> list[int]:
    pids = broker_pids(marker)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while broker_pids(marker) and time.monotonic() < deadline:
        reap_children()
        time.sleep(0.01)
    reap_children()
    return pids


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No BROKERQ_* setting of the caller's leaks into a test."""
    for name in list(os.environ):
        if name.startswith("BROKERQ_"):
            monkeypatch.delenv(name)


@pytest.fixture
def sock_dir() -> Iterator[str]:
    """A fresh, short, private directory (pytest's tmp_path is often too long)."""
    path = tempfile.mkdtemp(prefix="bq", dir="/tmp")
    try:
        yield path
    finally:
        kill_brokers(path)
        shutil.rmtree(path, ignore_errors=True)


BACKENDS = ["asyncio", "trio"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The anyio backend an async-client test runs on: each test runs on both."""
    return str(request.param)


@pytest.fixture
def jdir() -> Iterator[str]:
    """A fresh directory for a journal, removed afterwards."""
    path = tempfile.mkdtemp(prefix="bqj", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    """A broker serving in this test's trio run, with no socket and no journal:
    tests connect to it over in-memory streams (test_server.connect)."""
    b = Broker(
        BrokerConfig(socket_path="/nonexistent/b.sock", max_message_size=1000),
        clock=trio.current_time,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(b.serve, None)
        yield b
        b.request_stop("test over")


@pytest.fixture
def socket_path(sock_dir: str) -> str:
    return os.path.join(sock_dir, "b.sock")


@pytest.fixture
def observer(socket_path: str) -> Iterator[brokerq.Client]:
    """A second client of the test's broker (its own connection, no window,
    no prefetch), to look at the queues with."""
    with brokerq.connect(socket_path) as c:
        yield c


Procs = Callable[..., subprocess.Popen[bytes]]


@pytest.fixture
def procs(sock_dir: str) -> Iterator[Procs]:
    """Start subprocesses that are killed (if need be) and waited for afterwards.

    Depends on ``sock_dir`` so that it is torn down first: the subprocesses
    are gone before the brokers are killed and every child is reaped.
    """
    started: list[subprocess.Popen[bytes]] = []

    def start(args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        proc = subprocess.Popen(args, **kwargs)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def wait_until(predicate: Callable[[], T], timeout: float = 10.0, what: str = "a condition") -> T:
    """Poll ``predicate`` until it returns something true, or fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def gone(pid: int) -> bool:
    """True once ``pid`` has exited: reaped here if it is our child, else a
    zombie or no longer in /proc, with every thread ended.

    Threads matter: a broker SIGKILLed while its worker thread is in an
    fsync shows as a zombie at once, but its sockets and lock stay open
    (the threads share them) until that fsync returns."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return True
    except ChildProcessError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    if stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
        return False
    threads = [line for line in status.splitlines() if line.startswith("Threads:")]
    return not threads or int(threads[0].split()[1]) <= 1


def run_cli(
    *args: str, input: bytes | None = None, env: dict[str, str] | None = None, timeout: float = 20
) -> subprocess.CompletedProcess[bytes]:
    """Run the installed ``brokerq`` command for real, bounded in time."""
    return subprocess.run(
        [str(BIN / "brokerq"), *args],
        input=input,
        capture_output=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


def read_line(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> bytes:
    """One line of ``proc``'s stdout, bounded in time."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    data = b""
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no line from pid {proc.pid} within {timeout} s (got {data!r})"
        readable, _, _ = select.select([fd], [], [], remaining)
        if readable:
            chunk = os.read(fd, 1)
            assert chunk, f"pid {proc.pid} closed its stdout (got {data!r})"
            data += chunk
    return data
