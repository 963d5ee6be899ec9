"""Helpers shared by bench/scale.py and bench/growth.py (not a benchmark itself).

* :class:`Broker`: a broker of our own (``local-queue-broker`` as a child, in
  a fresh ``/tmp`` directory, options given explicitly, no ``BROKERQ_*`` from
  the environment), stopped and removed on exit, whatever happens. The
  program is ``$BROKERQ_BROKER`` if set, to measure another version.
* :func:`rss`: a process's resident set (VmRSS), in bytes.
* :class:`RawConnection`: a connection that speaks the wire protocol itself,
  to park many requests (blocked gets) without a thread each.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from types import TracebackType

import brokerq
from brokerq import protocol

#: The broker: $BROKERQ_BROKER if set (to compare another version), else the one beside Python.
BROKER_PROGRAM = os.environ.get("BROKERQ_BROKER") or os.path.join(
    os.path.dirname(sys.executable), "local-queue-broker"
)
BODY = b"x" * 100
#: Seconds a raw connection waits for the broker before it gives up.
TIMEOUT = 120.0


def raise_fd_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit; return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        new = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def rss(pid: int) -> int:
    """VmRSS of ``pid`` from /proc/<pid>/status, in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class Broker:
    """``with Broker("--no-journal") as b:`` a broker of our own at ``b.socket_path``.

    Runs in the foreground as our child (its pid is ``b.pid``), logs to
    ``<socket>.log``; on exit it is stopped (``stop``, then SIGKILL by its
    pid if it has not exited within 10 s) and its directory removed.
    """

    def __init__(self, *options: str) -> None:
        self.options = list(options)
        self.directory = ""
        self.socket_path = ""
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def __enter__(self) -> Broker:
        self.directory = tempfile.mkdtemp(prefix="bqb", dir="/tmp")
        self.socket_path = os.path.join(self.directory, "s")
        env = {k: v for k, v in os.environ.items() if not k.startswith("BROKERQ_")}
        ready_r, ready_w = os.pipe()
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        log_fd = os.open(self.socket_path + ".log", flags, 0o600)
        try:
            command = [BROKER_PROGRAM, self.socket_path, *self.options]
            self.proc = subprocess.Popen(
                [*command, "--ready-fd", str(ready_w)],
                pass_fds=(ready_w,),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log_fd,
                env=env,
            )
            os.close(ready_w)
            ready_w = -1
            with os.fdopen(ready_r, "rb") as ready:
                ready_r = -1
                line = ready.readline()
            if not line.startswith(b"READY "):
                raise RuntimeError(f"the broker did not start: {self.log_tail()}")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        finally:
            os.close(log_fd)
            for fd in (ready_r, ready_w):
                if fd >= 0:
                    os.close(fd)
        return self

    def log_tail(self) -> str:
        try:
            with open(self.socket_path + ".log", errors="replace") as log:
                return "".join(log.readlines()[-5:])
        except OSError:
            return ""

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self.proc is not None and self.proc.poll() is None:
                with (
                    contextlib.suppress(brokerq.BrokerqError),
                    brokerq.Client(self.socket_path, 10.0) as client,
                ):
                    client.stop()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()  # our own child, by its pid
                    self.proc.wait()
        finally:
            if self.directory:
                shutil.rmtree(self.directory, ignore_errors=True)


class RawConnection:
    """One connection speaking the wire protocol directly (hello done on creation)."""

    def __init__(self, socket_path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)  # a hang becomes an error
        self.sock.connect(socket_path)
        self.next_id = 1
        self.send(protocol.Hello(id=0, version=protocol.PROTOCOL_VERSION, client="bench"))
        reply = self.read_reply()
        if not isinstance(reply, protocol.HelloReply):
            raise RuntimeError(f"hello refused: {reply!r}")

    def request_id(self) -> int:
        self.next_id += 1
        return self.next_id

    def send(self, *requests: protocol.Request) -> None:
        self.sock.sendall(b"".join(protocol.encode_frame(r) for r in requests))

    def read_reply(self) -> protocol.AnyReply:
        (size,) = struct.unpack(">I", self._read_exactly(4))
        return protocol.decode_reply(self._read_exactly(size))

    def _read_exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("the broker closed the connection")
            data += chunk
        return data

    def close(self) -> None:
        self.sock.close()


def per_op(run: Callable[[], int], repeats: int) -> float:
    """The median over ``repeats`` runs of seconds per operation (``run`` returns its count)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        n = run()
        times.append((time.perf_counter() - start) / n)
    return statistics.median(times)


def put_get_pairs(queue: brokerq.Queue, n: int) -> Callable[[], int]:
    """``n`` rounds of one put and one get on ``queue``, one request at a time."""

    def run() -> int:
        for _ in range(n):
            queue.put(BODY)
            queue.get(timeout=10)
        return n

    return run


def fill(queue: brokerq.Queue, count: int, batch: int = 1000) -> None:
    """Put ``count`` bodies of 100 B on ``queue`` with put_many."""
    bodies = [BODY] * batch
    done = 0
    while done < count:
        chunk = min(batch, count - done)
        queue.put_many(bodies if chunk == batch else bodies[:chunk])
        done += chunk


def git_commit() -> str:
    """The checkout's commit, ``+dirty`` when it has changes: what a run measured."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args: str) -> str:
        out = subprocess.run(["git", "-C", root, *args], capture_output=True, check=False)
        return out.stdout.decode().strip()

    return git("rev-parse", "HEAD") + ("+dirty" if git("status", "--porcelain") else "")


def run_facts(load_before: tuple[float, float, float], **versions: object) -> dict[str, object]:
    """What a run's JSON records beside its figures: the versions (Python,
    brokerq, the commit, and ``versions``), the load average before and
    after (a loaded machine's figures are not comparable), and the CPUs."""
    return {
        "versions": {
            "python": platform.python_version(),
            **versions,
            "brokerq": brokerq.__version__,
            "git": git_commit(),
        },
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "cpus": os.cpu_count(),
    }
