"""Every spawn race of spawn-research.md §2, forced, one test per scenario.

The interleavings are forced with the pause points of :mod:`brokerq.pause`
(``BROKERQ_TEST_PAUSE``): a client or broker process stops at a named point
until the test releases it, and says when it got there. A client process
is given the variable in its environment; the broker it spawns inherits it,
so broker points are armed the same way (or through ``monkeypatch`` when
the test process itself spawns the broker).

Tests are named after their scenario (``test_sNN_...``). Scenarios 1, 3
and 11 are partly covered in test_processes.py (tests named after them);
14, 15, 16 and 18 live in test_security.py and 19 in test_chaos.py.

Every wait is bounded (:func:`wait_until`, subprocess timeouts); nothing
sleeps to synchronise. Stopped brokers get SIGCONT in a ``finally``; every
process is ended by pid: clients by the ``procs`` fixture, brokers by the
``sock_dir`` fixture, helpers here.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Procs, broker_pids, gone, read_line, run_cli, wait_until

import brokerq
from brokerq import pause, spawn
from brokerq.broker.server import HOUSEKEEPING_SECONDS
from brokerq.spawn import broker_running, lock_holder_pid

#: Time a process may take beyond its own deadline to say it gave up (a
#: loaded 2-CPU machine, the interpreter's exit).
SLACK = 2.0


# -- pause points --------------------------------------------------------------------

POINTS = (
    "client.connected",
    "client.connect_failed",
    "client.backlog_full",
    "client.lock_busy",
    "client.locked",
    "client.spawned",
    "broker.locked",
    "broker.bound",
    "broker.listening",
    "broker.before_ready",
    "broker.idle_exit",
    "broker.idle_unlinked",
    "broker.put_room",
    "broker.put_admitted",
    "broker.put_abandoned",
)


class Pause:
    """One pause point, armed by putting :attr:`spec` in BROKERQ_TEST_PAUSE."""

    def __init__(self, directory: str, point: str) -> None:
        assert point in POINTS, point
        self.point = point
        self.fifo = os.path.join(directory, f"p-{point}")
        os.mkfifo(self.fifo, 0o600)

    @property
    def spec(self) -> str:
        return f"{self.point}={self.fifo}"

    def _lines(self) -> list[tuple[int, str]]:
        try:
            text = Path(self.fifo + ".reached").read_text()
        except FileNotFoundError:
            return []
        return [(int(pid), label) for pid, label in (line.split() for line in text.splitlines())]

    def arrivals(self) -> list[int]:
        """The pids of the processes that reached the point, in order."""
        return [pid for pid, label in self._lines() if label == self.point]

    def helpers(self) -> list[int]:
        return [pid for pid, label in self._lines() if label == f"{self.point}:helper"]

    def wait(self, timeout: float = 15.0) -> int:
        """Wait until a process is held at the point; its pid."""
        return wait_until(lambda: self.arrivals()[:1], timeout, f"a process to reach {self.point}")[
            0
        ]

    def release(self, command: bytes = b"g") -> None:
        """Let the held process go on (``x``: exit 1 there; ``f``: fork a helper)."""
        fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.write(fd, command)
        finally:
            os.close(fd)


@pytest.fixture
def pauses(sock_dir: str) -> Callable[[str], Pause]:
    pause_dir = os.path.join(sock_dir, "pauses")
    os.mkdir(pause_dir, 0o700)
    return lambda point: Pause(pause_dir, point)


def pause_env(*points: Pause, **extra: str) -> dict[str, str]:
    """The environment of a client process with ``points`` armed."""
    env = {**os.environ, **extra}
    if points:
        env["BROKERQ_TEST_PAUSE"] = ",".join(p.spec for p in points)
    return env


# -- client processes ------------------------------------------------------------------

# Defines children() in a client script: the client's child processes as
# [pid, state] (a zombie has state "Z").
CHILDREN = r"""
def children():
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == os.getpid():
                found.append([int(entry), fields[0]])
    return found
"""

# One client: connects (and puts BODY to queue q unless it is "-"), then
# prints a JSON line: the broker's pid or the error, the time it took (after
# imports) and the client's children (a zombie would be one). With "hold" it
# keeps its connection open until it reads a line.
CLIENT = r"""
import json, os, sys, time
import brokerq

{CHILDREN}
path, timeout, body, hold = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]
start = time.monotonic()
result = {}
client = brokerq.Client(path, timeout=timeout)
try:
    if body != "-":
        result["id"] = client.queue("q").put(body)
    result["pid"] = client.broker_pid
except brokerq.BrokerqError as exc:
    result["error"] = f"{type(exc).__name__}: {exc}"
result["elapsed"] = time.monotonic() - start
result["children"] = children()
print(json.dumps(result), flush=True)
if hold == "hold":
    sys.stdin.readline()
client.close()
""".replace("{CHILDREN}", CHILDREN)


def python(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", code, *args]


def client(
    procs: Procs,
    socket_path: str,
    *,
    env: dict[str, str] | None = None,
    put: str = "-",
    timeout: float = 20.0,
    hold: bool = False,
) -> subprocess.Popen[bytes]:
    """A client process that connects (and puts ``put`` to queue q), then reports;
    with ``hold``, it keeps its connection until :func:`tell` says go."""
    args = [socket_path, str(timeout), put, "hold" if hold else "-"]
    stdin = subprocess.PIPE if hold else subprocess.DEVNULL
    return procs(python(CLIENT, *args), env=env, stdin=stdin)


def outcome(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> dict[str, Any]:
    """The report of a client process, once it has exited."""
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err.decode()
    result: dict[str, Any] = json.loads(out.decode().splitlines()[-1])
    return result


def served(proc: subprocess.Popen[bytes], timeout: float = 30.0, *, hold: bool = False) -> int:
    """The pid of the broker that served the client process ``proc``."""
    result = read_json_line(proc, timeout) if hold else outcome(proc, timeout)
    assert "error" not in result, result["error"]
    assert result["children"] == [], f"the client left children: {result['children']}"
    pid: int = result["pid"]
    return pid


def read_json_line(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> Any:
    """One JSON line of ``proc``'s stdout, bounded in time."""
    return json.loads(read_line(proc, timeout))


def tell(proc: subprocess.Popen[bytes], line: str = "go") -> None:
    assert proc.stdin is not None
    proc.stdin.write(line.encode() + b"\n")
    proc.stdin.flush()


# -- brokers -------------------------------------------------------------------------------


def spawn_count(socket_path: str) -> int:
    """How many brokers got as far as serving this socket (each logs it once)."""
    try:
        text = Path(socket_path + ".log").read_text()
    except FileNotFoundError:
        return 0
    return text.count(" INFO serving ")


def stale_socket(path: str) -> int:
    """Leave a socket file nobody listens on at ``path``; its inode."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.close()
    return os.lstat(path).st_ino


def sigkill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: gone(pid), what=f"process {pid} to die")


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    """SIGSTOP ``pid`` for the block; SIGCONT afterwards whatever happens."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def assert_one_broker(sock_dir: str, socket_path: str, pid: int) -> None:
    """``pid`` is the only broker, it holds the lock, and the path is its socket."""
    assert broker_pids(sock_dir) == [pid]
    assert broker_running(socket_path)
    assert lock_holder_pid(socket_path) == pid
    assert stat.S_ISSOCK(os.lstat(socket_path).st_mode)


# -- s02: the slow deleter ------------------------------------------------------------------


def test_s02_slow_deleter_after_its_failed_connect_deletes_nothing(
    socket_path: str, sock_dir: str, procs: Procs, pauses: Callable[[str], Pause]
) -> None:
    """A found the stale socket refused; while it dawdles, B spawns a broker.
    The naive protocol has A unlink B's live socket and start a second
    broker; here A only tries the lock, finds it held, and connects."""
    stale = stale_socket(socket_path)
    failed = pauses("client.connect_failed")
    slow = client(procs, socket_path, env=pause_env(failed))
    failed.wait()
    pid = served(client(procs, socket_path))
    live = os.lstat(socket_path).st_ino
    assert live != stale
    failed.release()
    assert served(slow) == pid
    assert os.lstat(socket_path).st_ino == live  # never unlinked, never replaced
    assert_one_broker(sock_dir, socket_path, pid)
    assert spawn_count(socket_path) == 1


def test_s02_slow_spawner_holding_the_lock_is_waited_for(
    socket_path: str, sock_dir: str, procs: Procs, pauses: Callable[[str], Pause]
) -> None:
    """A holds the lock and has not spawned yet; B finds the stale socket and
    the lock held: it waits, and both are served by A's broker."""
    stale = stale_socket(socket_path)
    locked = pauses("client.locked")
    busy = pauses("client.lock_busy")
    spawner = client(procs, socket_path, env=pause_env(locked))
    locked.wait()
    waiter = client(procs, socket_path, env=pause_env(busy))
    busy.wait()
    assert os.lstat(socket_path).st_ino == stale
    assert broker_pids(sock_dir) == []
    busy.release()  # B backs off and tries again, and again
    locked.release()
    pid = served(spawner)
    assert served(waiter) == pid
    assert_one_broker(sock_dir, socket_path, pid)
    assert spawn_count(socket_path) == 1


# -- s03: a stale socket (bind-then-close and a regular file: test_processes.py) ----------


def test_s03_stale_socket_of_a_sigkilled_broker_is_replaced(
    socket_path: str, sock_dir: str
) -> None:
    with brokerq.connect(socket_path) as first:
        killed = first.broker_pid
        first.queue("q").put(b"kept")
    old = os.lstat(socket_path).st_ino
    sigkill(killed)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with probe, pytest.raises(ConnectionRefusedError):
        probe.connect(socket_path)  # stale: nobody listens any more
    assert not broker_running(socket_path)
    with brokerq.connect(socket_path) as second:
        pid = second.broker_pid
        assert pid != killed
        assert second.queue("q").get(timeout=5) == b"kept"
    assert os.lstat(socket_path).st_ino != old
    assert_one_broker(sock_dir, socket_path, pid)


# -- s04: a broker between bind and listen, or between listen and rename ----------------------


@pytest.mark.parametrize("point", ["broker.bound", "broker.listening"])
def test_s04_broker_not_yet_published_is_waited_for_not_replaced(
    socket_path: str, sock_dir: str, procs: Procs, pauses: Callable[[str], Pause], point: str
) -> None:
    stale = stale_socket(socket_path)
    held = pauses(point)
    busy = pauses("client.lock_busy")
    spawner = client(procs, socket_path, env=pause_env(held))
    broker = held.wait()
    # The broker's socket exists under its temporary name only.
    temporary = os.path.join(sock_dir, f".bq-{broker}")
    assert stat.S_ISSOCK(os.lstat(temporary).st_mode)
    waiter = client(procs, socket_path, env=pause_env(busy))
    busy.wait()  # it found no listener and the lock held
    assert os.lstat(socket_path).st_ino == stale  # nobody unlinked anything
    assert broker_pids(sock_dir) == [broker]
    busy.release()
    held.release()
    assert served(spawner) == broker
    assert served(waiter) == broker
    assert os.lstat(socket_path).st_ino != stale
    assert not os.path.lexists(temporary)
    assert_one_broker(sock_dir, socket_path, broker)
    assert spawn_count(socket_path) == 1


# -- s05: a broker that dies before READY ----------------------------------------------------

FAKE_BROKERS = {
    "exit_1": "#!/bin/sh\necho spawned >> {count}\necho 'fake broker: refusing to start' >&2\n"
    "exit 1\n",
    "import_error": "#!{python}\nopen({count!r}, 'a').write('spawned\\n')\n"
    "import brokerq_no_such_module\n",
}
FAKE_LAST_LINES = {
    "exit_1": "fake broker: refusing to start",
    "import_error": "No module named 'brokerq_no_such_module'",
}


def assert_failed_fast(result: dict[str, Any], timeout: float, *messages: str) -> None:
    """A BrokerUnavailable naming the failure, well within the deadline, no child left."""
    assert "error" in result, f"the client was served: {result}"
    assert result["error"].startswith("BrokerUnavailable: "), result["error"]
    for message in messages:
        assert message in result["error"]
    assert result["elapsed"] < timeout / 2, f"it took {result['elapsed']:.1f} s"
    assert result["children"] == [], f"zombie or stray children: {result['children']}"


@pytest.mark.parametrize("kind", sorted(FAKE_BROKERS))
def test_s05_broker_that_exits_before_ready_fails_fast_without_respawning(
    socket_path: str, sock_dir: str, procs: Procs, kind: str
) -> None:
    count = os.path.join(sock_dir, "spawns")
    fake = os.path.join(sock_dir, "fake-broker")
    Path(fake).write_text(FAKE_BROKERS[kind].format(count=count, python=sys.executable))
    os.chmod(fake, 0o700)
    result = outcome(client(procs, socket_path, env=pause_env(BROKERQ_BROKER=fake)))
    assert_failed_fast(result, 20.0, "exited before it was ready", FAKE_LAST_LINES[kind])
    assert Path(count).read_text() == "spawned\n"  # once: no respawn loop
    assert not broker_running(socket_path)
    # The next client tries again, once, and fails the same way.
    again = outcome(client(procs, socket_path, env=pause_env(BROKERQ_BROKER=fake)))
    assert_failed_fast(again, 20.0, "exited before it was ready")
    assert Path(count).read_text() == "spawned\n" * 2
    assert not broker_running(socket_path)


def test_s05_missing_broker_program_fails_at_once(
    socket_path: str, sock_dir: str, procs: Procs
) -> None:
    missing = os.path.join(sock_dir, "no-such-broker")
    result = outcome(client(procs, socket_path, env=pause_env(BROKERQ_BROKER=missing)))
    assert_failed_fast(result, 20.0, "cannot start", missing)
    assert not broker_running(socket_path)
    assert not os.path.lexists(socket_path)


@pytest.mark.parametrize("spelling", ["bare name on PATH", "relative path"])
def test_broker_program_named_by_a_bare_name_or_a_relative_path(
    socket_path: str, sock_dir: str, spelling: str
) -> None:
    """protocol.md 10.4: BROKERQ_BROKER is resolved on the caller's PATH and
    working directory, not the child's (which has PATH=/bin:/usr/bin and /)."""
    tools = os.path.join(sock_dir, "tools")
    os.mkdir(tools)
    os.symlink(
        os.path.join(os.path.dirname(sys.executable), "local-queue-broker"),
        os.path.join(tools, "my-broker"),
    )
    env = {**os.environ, "PATH": f"{tools}:{os.environ['PATH']}"}
    env["BROKERQ_BROKER"] = "my-broker" if spelling == "bare name on PATH" else "./tools/my-broker"
    brokerq_cli = os.path.join(os.path.dirname(sys.executable), "brokerq")
    done = subprocess.run(
        [brokerq_cli, "--socket", socket_path, "put", "q", "x"],
        cwd=sock_dir,
        env=env,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert (done.returncode, done.stderr) == (0, b"")
    assert broker_running(socket_path)
    assert run_cli("--socket", socket_path, "stop").returncode == 0


def test_s05_broker_that_dies_at_start_up_frees_the_lock(
    socket_path: str, sock_dir: str, procs: Procs, pauses: Callable[[str], Pause]
) -> None:
    """The real broker, daemonized and holding the lock, exits 1 before READY."""
    held = pauses("broker.locked")
    spawner = client(procs, socket_path, env=pause_env(held))
    broker = held.wait()
    assert broker_running(socket_path)
    held.release(b"x")
    assert_failed_fast(
        outcome(spawner), 20.0, "exited before it was ready", "exiting at broker.locked"
    )
    wait_until(lambda: gone(broker), what="the broker to exit")
    assert not broker_running(socket_path)
    assert spawn_count(socket_path) == 0
    # Nothing is left that would stop the next client.
    pid = served(client(procs, socket_path))
    assert_one_broker(sock_dir, socket_path, pid)


# -- s06: a broker that hangs before READY ------------------------------------------------------


def test_s06_broker_hung_before_ready_times_everyone_out_until_killed(
    socket_path: str, sock_dir: str, procs: Procs, pauses: Callable[[str], Pause]
) -> None:
    held = pauses("broker.locked")
    spawner = client(procs, socket_path, env=pause_env(held), timeout=2)
    hung = held.wait()
    waiter = client(procs, socket_path, timeout=2)
    spawned = outcome(spawner)
    waited = outcome(waiter)
    assert spawned["error"].startswith("BrokerUnavailable: "), spawned
    assert "did not become ready in time" in spawned["error"]
    assert waited["error"].startswith("BrokerUnavailable: "), waited
    assert "did not answer within the deadline" in waited["error"]
    for result in (spawned, waited):
        assert 2 <= result["elapsed"] < 2 + SLACK, result
        assert result["children"] == []
    # Nobody started a second broker: the hung one still holds the lock.
    assert broker_pids(sock_dir) == [hung]
    assert broker_running(socket_path)
    assert lock_holder_pid(socket_path) == hung
    sigkill(hung)
    pid = served(client(procs, socket_path))
    assert pid != hung
    assert_one_broker(sock_dir, socket_path, pid)


# -- s07: a spawner killed while it spawns --------------------------------------------------------


def test_s07_spawner_killed_right_after_popen_leaves_a_serving_broker(
    socket_path: str, sock_dir: str, procs: Procs, pauses: Callable[[str], Pause]
) -> None:
    launched = pauses("client.spawned")
    spawner = client(procs, socket_path, env=pause_env(launched))
    launched.wait()
    spawner.kill()
    spawner.wait(timeout=10)
    # The broker comes up anyway, on the lock it inherited.
    pid = served(client(procs, socket_path))
    assert_one_broker(sock_dir, socket_path, pid)
    assert spawn_count(socket_path) == 1


def test_s07_client_killed_holding_the_lock_frees_it(
    socket_path: str, sock_dir: str, procs: Procs, pauses: Callable[[str], Pause]
) -> None:
    locked = pauses("client.locked")
    spawner = client(procs, socket_path, env=pause_env(locked))
    locked.wait()
    assert broker_running(socket_path)  # the client holds the lock
    spawner.kill()
    spawner.wait(timeout=10)
    assert not broker_running(socket_path)
    assert broker_pids(sock_dir) == []
    pid = served(client(procs, socket_path))
    assert_one_broker(sock_dir, socket_path, pid)
    assert spawn_count(socket_path) == 1


# -- s08: SIGKILL with clients idle, mid-request and blocked in get -----------------------------

IDLE = r"""
import json, sys
import brokerq
client = brokerq.Client(sys.argv[1], timeout=30)
print(json.dumps(client.broker_pid), flush=True)
sys.stdin.readline()
client.queues()  # on a connection that broke meanwhile: retried on a new one
print(json.dumps(client.broker_pid), flush=True)
"""

BLOCKED = r"""
import json, sys
import brokerq
client = brokerq.Client(sys.argv[1], timeout=30)
body = client.queue("w").get(timeout=60)
print(json.dumps([body.decode(), client.broker_pid]), flush=True)
"""

# Connects, waits for a line, then puts; says "sent" once the put is
# written to the socket, before the reply is read.
MID_REQUEST = r"""
import json, sys
import brokerq
client = brokerq.Client(sys.argv[1], timeout=30)
conn = client.connection()
print(json.dumps(conn.broker_pid), flush=True)
sys.stdin.readline()
read_reply = conn.read_reply
def announce(deadline):
    print(json.dumps("sent"), flush=True)
    return read_reply(deadline)
conn.read_reply = announce
msg_id = client.queue("q").put(b"mid")
print(json.dumps([msg_id, client.broker_pid]), flush=True)
"""


def test_s08_sigkill_with_clients_idle_mid_request_and_blocked_respawns_once(
    socket_path: str, sock_dir: str, procs: Procs
) -> None:
    with brokerq.Client(socket_path, timeout=30) as test_client:
        queue = test_client.queue("q")
        acked = [queue.put(b"a1"), queue.put(b"a2")]
        killed = test_client.broker_pid
        idle = procs(python(IDLE, socket_path), stdin=subprocess.PIPE)
        mid = procs(python(MID_REQUEST, socket_path), stdin=subprocess.PIPE)
        assert read_json_line(idle) == killed
        assert read_json_line(mid) == killed
        blocked = procs(python(BLOCKED, socket_path))
        waiting = test_client.queue("w")
        wait_until(lambda: waiting.stats()["waiters"] == 1, what="the get to block")
        with stopped(killed):
            tell(mid)
            assert read_json_line(mid) == "sent"  # in the socket, never to be read
            sigkill(killed)
        # Every client finds the broker gone at once; one of them respawns.
        msg_id, mid_pid = read_json_line(mid)
        waiting.put(b"for the blocked get")
        body, blocked_pid = read_json_line(blocked)
        tell(idle)
        idle_pid = read_json_line(idle)
        pid = test_client.broker_pid
        assert pid != killed
        assert mid_pid == blocked_pid == idle_pid == pid
        assert body == "for the blocked get"
        assert_one_broker(sock_dir, socket_path, pid)
        assert spawn_count(socket_path) == 2
        # Nothing acknowledged lost, the put cut off mid-request there once.
        got = queue.get_many(10, timeout=0)
        assert got == [b"a1", b"a2", b"mid"]
        assert msg_id > max(acked)
    for proc in (idle, mid, blocked):
        assert proc.wait(timeout=10) == 0


# -- s09: a stopped broker ------------------------------------------------------------------------


def test_s09_stopped_broker_times_requests_out_and_is_not_replaced(
    socket_path: str, sock_dir: str, procs: Procs
) -> None:
    timeout = 1.5
    with brokerq.Client(socket_path, timeout=timeout) as connected:
        queue = connected.queue("q")
        queue.put(b"before")
        pid = connected.broker_pid
        with stopped(pid):
            # Each request gets at most its own wait plus the client's timeout.
            # (A put or get with timeout=None may wait for ever, by contract.)
            other = connected.queue("other")
            requests: list[tuple[Callable[[], object], float]] = [
                (lambda: other.put_nowait(b"unanswered"), 0),
                (lambda: other.get(timeout=0.5), 0.5),
                (connected.stats, 0),
            ]
            for request, wait in requests:
                start = time.monotonic()
                with pytest.raises(brokerq.BrokerUnavailable):
                    request()
                assert time.monotonic() - start < wait + timeout + SLACK
            newcomers = [client(procs, socket_path, timeout=timeout) for _ in range(3)]
            for result in map(outcome, newcomers):
                assert result["error"].startswith("BrokerUnavailable: "), result
                assert result["elapsed"] < timeout + SLACK, result
                assert result["children"] == []
            assert broker_pids(sock_dir) == [pid]
            assert lock_holder_pid(socket_path) == pid
            assert spawn_count(socket_path) == 1
        # Once it runs again, it serves, and it is still the only one.
        assert queue.get(timeout=5) == b"before"
        assert connected.broker_pid == pid
    assert served(client(procs, socket_path)) == pid
    assert_one_broker(sock_dir, socket_path, pid)


# -- s10: the idle-exit race ---------------------------------------------------------------------


def test_s10_client_in_the_backlog_at_idle_exit_is_served(
    socket_path: str,
    sock_dir: str,
    procs: Procs,
    pauses: Callable[[str], Pause],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    exiting = pauses("broker.idle_exit")
    unlinked = pauses("broker.idle_unlinked")
    connected = pauses("client.connected")
    monkeypatch.setenv("BROKERQ_IDLE_EXIT", "1")
    monkeypatch.setenv("BROKERQ_TEST_PAUSE", f"{exiting.spec},{unlinked.spec}")
    with brokerq.connect(socket_path) as first:
        pid = first.broker_pid
        first.queue("q").put(b"before")
    monkeypatch.delenv("BROKERQ_TEST_PAUSE")
    monkeypatch.delenv("BROKERQ_IDLE_EXIT")
    assert exiting.wait() == pid  # idle, about to unlink its socket
    late = client(procs, socket_path, env=pause_env(connected), put="late", hold=True)
    connected.wait()  # its connection waits in the listen backlog
    connected.release()
    exiting.release()
    unlinked.wait()
    assert not os.path.lexists(socket_path)
    unlinked.release()
    # The drain accepted it: served by the same broker, which publishes again
    # (and does not idle out while the client holds its connection).
    assert served(late, hold=True) == pid
    wait_until(lambda: os.path.lexists(socket_path), what="the socket to be published again")
    assert_one_broker(sock_dir, socket_path, pid)
    with brokerq.connect(socket_path) as again:
        assert again.broker_pid == pid
        assert again.queue("q").get_many(10, timeout=0) == [b"before", b"late"]
    tell(late)
    assert late.wait(timeout=10) == 0


def test_s10_client_arriving_after_the_idle_exit_unlink_spawns_the_next_broker(
    socket_path: str,
    sock_dir: str,
    procs: Procs,
    pauses: Callable[[str], Pause],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    unlinked = pauses("broker.idle_unlinked")
    busy = pauses("client.lock_busy")
    monkeypatch.setenv("BROKERQ_IDLE_EXIT", "1")
    monkeypatch.setenv("BROKERQ_TEST_PAUSE", unlinked.spec)
    with brokerq.connect(socket_path) as first:
        exited = first.broker_pid
        first.queue("q").put(b"kept")
    monkeypatch.delenv("BROKERQ_TEST_PAUSE")
    monkeypatch.delenv("BROKERQ_IDLE_EXIT")
    assert unlinked.wait() == exited
    assert not os.path.lexists(socket_path)
    late = client(procs, socket_path, env=pause_env(busy), put="late")
    busy.wait()  # no socket, and the exiting broker still holds the lock
    unlinked.release()
    wait_until(lambda: gone(exited), what="the idle broker to exit")
    busy.release()
    pid = served(late)
    assert pid != exited
    assert_one_broker(sock_dir, socket_path, pid)
    with brokerq.connect(socket_path) as again:
        assert again.queue("q").get_many(10, timeout=0) == [b"kept", b"late"]


# -- s11: daemon hygiene (the caller's pipes: test_processes.py) ----------------------------------

SESSION_CLIENT = r"""
import json, sys
import brokerq
client = brokerq.Client(sys.argv[1])
print(json.dumps(client.broker_pid), flush=True)
sys.stdin.readline()
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP])
def test_s11_signal_to_the_spawners_process_group_spares_the_broker(
    socket_path: str, sock_dir: str, procs: Procs, signum: signal.Signals
) -> None:
    spawner = procs(
        python(SESSION_CLIENT, socket_path), stdin=subprocess.PIPE, start_new_session=True
    )
    pid = read_json_line(spawner)
    os.killpg(spawner.pid, signum)
    spawner.wait(timeout=10)
    assert not gone(pid)
    with brokerq.connect(socket_path) as again:
        assert again.broker_pid == pid
    assert_one_broker(sock_dir, socket_path, pid)


LONG_LIVED = r"""
import json, os, signal, sys
import brokerq
if sys.argv[2] == "ignored":
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)

{CHILDREN}
with brokerq.Client(sys.argv[1]) as client:
    client.queue("q").put(b"x")
    print(json.dumps([client.broker_pid, children()]), flush=True)
sys.stdin.readline()
print(json.dumps(children()), flush=True)
""".replace("{CHILDREN}", CHILDREN)


@pytest.mark.parametrize("sigchld", ["default", "ignored"])
def test_s11_long_lived_client_has_no_zombie_after_its_broker_idles_out(
    socket_path: str, procs: Procs, sigchld: str
) -> None:
    env = pause_env(BROKERQ_IDLE_EXIT="1")
    user = procs(python(LONG_LIVED, socket_path, sigchld), stdin=subprocess.PIPE, env=env)
    pid, children = read_json_line(user)
    assert children == []
    wait_until(lambda: gone(pid), what="the broker to idle out")
    tell(user)
    assert read_json_line(user) == []
    assert user.wait(timeout=10) == 0


# -- s12: the broker's descriptors ---------------------------------------------------------------


def unix_sockets() -> dict[int, tuple[str, bool]]:
    """Every Unix socket of the system: inode -> (bound path, listening)."""
    sockets = {}
    with open("/proc/net/unix") as table:
        next(table)
        for line in table:
            fields = line.split()
            flags = int(fields[3], 16)
            sockets[int(fields[6])] = (fields[7] if len(fields) > 7 else "", bool(flags & 0x10000))
    return sockets


def unix_peers() -> dict[int, int] | None:
    """Unix stream socket inode -> its peer's inode (from ss), or None without ss."""
    ss = shutil.which("ss")
    if ss is None:
        return None
    out = subprocess.run(
        [ss, "-x", "-a", "-n", "-H"], capture_output=True, timeout=10, check=True
    ).stdout
    peers = {}
    for line in out.decode().splitlines():
        fields = line.split()
        if len(fields) >= 8 and fields[0] == "u_str":
            peers[int(fields[5])] = int(fields[7])
    return peers


def descriptors(pid: int) -> dict[int, str]:
    fds = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            fds[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
    return fds


def socket_inode(target: str) -> int | None:
    if target.startswith("socket:["):
        return int(target[len("socket:[") : -1])
    return None


def unexpected_descriptors(pid: int, socket_path: str) -> list[str]:
    """What the broker ``pid`` holds beyond its own: stdin/stdout on /dev/null,
    stderr on its log, the lock, the journal, one listener, and trio's
    epoll and wakeup socket pairs (both ends in the broker)."""
    fds = descriptors(pid)
    problems = []
    expected = {0: os.devnull, 1: os.devnull, 2: socket_path + ".log"}
    for fd, target in expected.items():
        if fds.get(fd) != target:
            problems.append(f"fd {fd} is {fds.get(fd)}, not {target}")
    files = sorted(t for fd, t in fds.items() if fd > 2 and t.startswith("/"))
    if files != sorted([socket_path + ".lock", socket_path + ".journal"]):
        problems.append(f"files: {files}")
    inodes = {fd: socket_inode(t) for fd, t in fds.items()}
    others = [t for fd, t in fds.items() if fd > 2 and not t.startswith("/") and inodes[fd] is None]
    if others not in ([], ["anon_inode:[eventpoll]"]):
        problems.append(f"other descriptors: {others}")
    table = unix_sockets()
    ours = {inode for inode in inodes.values() if inode is not None}
    listeners = [inode for inode in ours if table.get(inode, ("", False))[1]]
    if len(listeners) != 1:
        problems.append(f"listening sockets: {listeners}")
    peers = unix_peers()
    for inode in ours - set(listeners):
        path, _ = table.get(inode, ("?", False))
        if path:
            problems.append(f"socket {inode} bound to {path}")
        elif peers is not None and peers.get(inode) not in ours:
            problems.append(f"socket {inode} is connected to another process")
    return problems


def test_s12_broker_holds_only_its_own_descriptors(socket_path: str, sock_dir: str) -> None:
    # Started from a process with pipes of its own (capture_output).
    put = run_cli("--socket", socket_path, "put", "q", "x")
    assert put.returncode == 0, put.stderr.decode()
    (pid,) = broker_pids(sock_dir)
    # The CLI's connection may take a moment to be torn down.
    wait_until(
        lambda: not unexpected_descriptors(pid, socket_path),
        what="the broker to hold only its own descriptors",
        timeout=5,
    )


def test_s12_helper_forked_by_the_broker_keeps_neither_lock_nor_listener(
    socket_path: str, sock_dir: str, procs: Procs, pauses: Callable[[str], Pause]
) -> None:
    before_ready = pauses("broker.before_ready")
    spawner = client(procs, socket_path, env=pause_env(before_ready))
    broker = before_ready.wait()
    before_ready.release(b"fg")  # fork a helper, then go on
    helper = wait_until(lambda: before_ready.helpers()[:1], what="the helper")[0]
    try:
        assert served(spawner) == broker
        listener = [
            inode
            for inode in map(socket_inode, descriptors(broker).values())
            if inode is not None and unix_sockets().get(inode, ("", False))[1]
        ]
        assert len(listener) == 1
        kept = descriptors(helper).values()
        assert socket_path + ".lock" not in kept
        assert f"socket:[{listener[0]}]" not in kept
        sigkill(broker)
        assert not gone(helper)
        assert not broker_running(socket_path)  # the helper does not hold the lock
        # Nor the listener: the next client is refused at once and respawns,
        # rather than waiting in a dead broker's backlog.
        result = outcome(client(procs, socket_path, timeout=5))
        assert "error" not in result, result["error"]
        pid = result["pid"]
        assert pid not in (broker, helper)
        assert sorted(broker_pids(sock_dir)) == sorted([pid, helper])  # it has the argv
        assert lock_holder_pid(socket_path) == pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(helper, signal.SIGKILL)
        wait_until(lambda: gone(helper), what="the helper to die")


# -- s13: the socket directory, lock or socket removed or replaced under a live broker ----------

TAMPERINGS = [
    "socket_removed",
    "socket_replaced",
    "lock_removed",
    "lock_replaced",
    "dir_removed",
    "dir_replaced",
]


def tamper(kind: str, directory: str, path: str) -> None:
    if kind == "socket_removed":
        os.unlink(path)
    elif kind == "socket_replaced":
        stale_socket(path + ".new")
        os.rename(path + ".new", path)
    elif kind == "lock_removed":
        os.unlink(path + ".lock")
    elif kind == "lock_replaced":
        Path(path + ".lock.new").write_text("")
        os.rename(path + ".lock.new", path + ".lock")
    elif kind == "dir_removed":
        shutil.rmtree(directory)
    else:
        os.rename(directory, directory + ".old")
        os.mkdir(directory, 0o700)


@pytest.mark.parametrize("kind", TAMPERINGS)
def test_s13_broker_whose_files_are_removed_or_replaced_exits(
    sock_dir: str, procs: Procs, kind: str
) -> None:
    directory = os.path.join(sock_dir, "d")
    path = os.path.join(directory, "s")
    pid = served(client(procs, path))
    tamper(kind, directory, path)
    # A client right now either reaches the old broker (the path is still
    # its socket) or starts a new one (the old one serves no path any more).
    meanwhile = client(procs, path)
    wait_until(lambda: gone(pid), timeout=HOUSEKEEPING_SECONDS + SLACK, what="the broker to exit")
    during = served(meanwhile)
    after = served(client(procs, path))
    assert after != pid
    if during != pid:
        assert after == during
    assert_one_broker(sock_dir, path, after)


# -- s17: a busy broker -------------------------------------------------------------------------


def test_s17_full_backlog_makes_clients_wait_never_unlink(
    socket_path: str,
    sock_dir: str,
    procs: Procs,
    pauses: Callable[[str], Pause],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """connect() says EAGAIN: a broker listens, busy; wait for it, never
    take the lock (protocol.md 10.3)."""
    # The backlog is the system's maximum (net.core.somaxconn): the broker
    # must be able to serve every filler at once when it resumes, so that
    # the waiting client is served rather than refused as busy.
    backlog = int(Path("/proc/sys/net/core/somaxconn").read_text())
    monkeypatch.setenv("BROKERQ_MAX_CONNECTIONS", str(backlog + 64))
    with brokerq.connect(socket_path) as first:
        pid = first.broker_pid
    live = os.lstat(socket_path).st_ino
    failed = pauses("client.connect_failed")
    busy = pauses("client.backlog_full")
    locking = pauses("client.lock_busy")
    fillers: list[socket.socket] = []
    try:
        with stopped(pid):
            while True:  # fill the listen backlog until connect() says EAGAIN
                filler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                filler.setblocking(False)
                try:
                    filler.connect(socket_path)
                except BlockingIOError:
                    filler.close()
                    break
                fillers.append(filler)
                assert len(fillers) <= backlog + 1
            waiter = client(procs, socket_path, env=pause_env(failed, busy, locking))
            failed.wait()  # connect() said EAGAIN
            failed.release()
            busy.wait()  # the broker is alive and busy: it backs off to connect again
            busy.release()
            time.sleep(0.2)
            assert locking.arrivals() == []  # and never goes for the lock
            assert waiter.poll() is None
            assert os.lstat(socket_path).st_ino == live
            assert broker_pids(sock_dir) == [pid]
        assert served(waiter) == pid
    finally:
        for filler in fillers:
            filler.close()
    assert os.lstat(socket_path).st_ino == live
    assert_one_broker(sock_dir, socket_path, pid)
    assert spawn_count(socket_path) == 1


def test_s17_connection_refused_while_the_lock_is_held_is_waited_out(
    socket_path: str, sock_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BSD and macOS say ECONNREFUSED when the backlog is full: the client
    must take that for "busy" while the lock is held, not for "stale"."""
    with brokerq.connect(socket_path) as first:
        pid = first.broker_pid
    live = os.lstat(socket_path).st_ino
    refusals = [5]
    touched: list[str] = []

    class Refusing(socket.socket):
        def connect(self, address: Any) -> None:
            if refusals[0] > 0:
                refusals[0] -= 1
                raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
            super().connect(address)

    def no_spawn(*args: object) -> int:
        raise AssertionError("a broker was spawned while the lock was held")

    def recording(real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            touched.append(f"{real.__name__}{args}")
            return real(*args, **kwargs)

        return call

    with monkeypatch.context() as patch:
        patch.setattr(spawn.socket, "socket", Refusing)
        patch.setattr(spawn, "spawn_broker", no_spawn)
        for name in ("unlink", "remove", "rename", "replace"):
            patch.setattr(os, name, recording(getattr(os, name)))
        sock = spawn.connect_or_spawn(socket_path, time.monotonic() + 10)
    sock.close()
    assert refusals == [0]
    assert touched == []
    assert os.lstat(socket_path).st_ino == live
    assert_one_broker(sock_dir, socket_path, pid)
    with brokerq.connect(socket_path) as again:
        assert again.broker_pid == pid


def test_every_pause_point_exists_and_is_documented() -> None:
    """A misspelt pause point would hold nothing: every point these tests
    use is in the code, and in brokerq.pause's docstring."""
    source = "".join(path.read_text() for path in Path(spawn.__file__).parent.rglob("*.py"))
    for point in POINTS:
        assert f'pause("{point}")' in source, point
        assert f"``{point}``" in (pause.__doc__ or ""), point
