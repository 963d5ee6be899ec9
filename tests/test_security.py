"""Security, tested for real: the pitfalls and scenarios 14-16 of the spawn
research (``docs/security.md`` says what is defended and what is not).

Each test is named after what it proves:

* ``s14``: an unsafe socket directory is refused, by the client and by a
  broker started by hand, and nothing is created, chmod-ed or chown-ed;
  the default per-user directory squatted by another user is refused.
* ``s15``: a peer of another uid: the broker answers it one ``permission``
  error and closes; the client refuses a broker of another uid.
* ``s16``: long ``XDG_RUNTIME_DIR``, ``TMPDIR`` and socket paths.
* ``xdg``: when ``$XDG_RUNTIME_DIR`` is trusted.
* ``pitfall``: symlinks, the socket file's mode, the spawned broker's
  environment.

Other users are real: the test process runs as root and forks children
that drop to another uid (:class:`OtherUser`); they run brokerq's own code
(the interpreter cannot be exec-ed by another uid here, ``/root`` being
private, so they fork without exec). Tests that need root skip without it.
Every wait is bounded; every directory is removed afterwards, even one
chowned to another user.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import random
import select
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from conftest import BIN, broker_pids, kill_brokers, run_cli, wait_until

import brokerq
from brokerq import protocol
from brokerq.broker import daemon
from brokerq.protocol import Error, FrameReader
from brokerq.spawn import (
    MAX_SOCKET_PATH,
    check_socket_path,
    default_socket_path,
    peer_uid,
    publish_socket,
    resolve_socket_path,
)

BROKER = str(BIN / "local-queue-broker")
NOBODY = 65534
#: The portable limit for a path brokerq makes up itself (BSD and macOS).
PORTABLE_PATH_LIMIT = 103

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")


# -- helpers ---------------------------------------------------------------


def one_line(data: bytes | str) -> str:
    """The single line of ``data`` (a stderr), failing if it has more or none."""
    text = data.decode() if isinstance(data, bytes) else data
    lines = text.splitlines()
    assert len(lines) == 1, f"expected one line, got {text!r}"
    assert text.endswith("\n")
    return lines[0]


def tree_state(root: str) -> dict[str, tuple[Any, ...]]:
    """Every entry under ``root`` (not following symlinks) with what a chmod,
    chown, write, create or delete would change: a "nothing touched" check."""
    state: dict[str, tuple[Any, ...]] = {}
    for directory, dirs, files in os.walk(root):
        for name in [".", *dirs, *files]:
            path = os.path.normpath(os.path.join(directory, name))
            st = os.lstat(path)
            content = Path(path).read_bytes() if stat.S_ISREG(st.st_mode) else None
            state[path] = (
                st.st_mode,
                st.st_uid,
                st.st_gid,
                st.st_ino,
                st.st_nlink,
                st.st_size,
                st.st_mtime_ns,
                st.st_ctime_ns,
                content,
                os.readlink(path) if stat.S_ISLNK(st.st_mode) else None,
            )
    return state


def remove_tree(path: str) -> None:
    """Remove ``path`` (a directory, a symlink or a file) if it exists."""
    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)


def frame(fields: dict[str, Any]) -> bytes:
    payload = msgspec.msgpack.encode(fields)
    return protocol.HEADER.pack(len(payload)) + payload


def replies_in(data: bytes) -> list[protocol.AnyReply]:
    """Every whole frame in ``data``, decoded; fails on a partial one."""
    reader = FrameReader(2**24)
    reader.feed(data)
    replies = []
    while (payload := reader.next_frame()) is not None:
        replies.append(protocol.decode_reply(payload))
    assert reader.buffered == 0, f"a partial frame: {data!r}"
    return replies


def broker_in_process(socket_path: str | None) -> tuple[int, str]:
    """Run ``local-queue-broker`` in this process (a forked child of another
    uid cannot exec it): its exit status and stderr. Only for cases that fail
    before serving."""
    read_end, write_end = os.pipe()
    with open(write_end, "w") as err, contextlib.redirect_stderr(err):
        status = daemon.run(socket_path)
    try:
        return status, os.read(read_end, 65536).decode()
    finally:
        os.close(read_end)


def read_until_eof(fd: int, deadline: float) -> bytes:
    data = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError("timed out reading from a child of another uid")
        readable, _, _ = select.select([fd], [], [], remaining)
        if readable:
            chunk = os.read(fd, 65536)
            if not chunk:
                return data
            data += chunk


def unused_uid() -> int:
    """A uid no account has and no ``/tmp/brokerq-<uid>`` exists for (random,
    so that concurrent test runs do not pick the same one)."""
    used = {entry.pw_uid for entry in pwd.getpwall()}
    for uid in random.sample(range(20000, 60000), 200):
        if uid not in used and not os.path.lexists(f"/tmp/brokerq-{uid}"):
            return uid
    raise AssertionError("no unused uid found")


@dataclass
class Child:
    """A forked child of the test process running as another uid."""

    pid: int
    uid: int
    ready_fd: int
    result_fd: int
    reaped: bool = False
    fds: list[int] = field(default_factory=list)

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Wait for the child to call its ``ready()``."""
        readable, _, _ = select.select([self.ready_fd], [], [], timeout)
        assert readable, f"the uid {self.uid} child was not ready within {timeout} s"
        if os.read(self.ready_fd, 1) != b"R":
            self.result()  # it ended first: raise its error
            raise AssertionError(f"the uid {self.uid} child ended before it was ready")

    def result(self, timeout: float = 30.0) -> Any:
        """What the child's function returned (it has exited then)."""
        deadline = time.monotonic() + timeout
        data = read_until_eof(self.result_fd, deadline)
        self._reap(deadline)
        outcome = json.loads(data) if data else {"error": "no result (killed?)"}
        if "error" in outcome:
            raise AssertionError(f"the uid {self.uid} child failed: {outcome['error']}")
        return outcome["ok"]

    def _reap(self, deadline: float) -> None:
        while not self.reaped:
            try:
                done, _ = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                done = self.pid
            if done:
                self.reaped = True
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"the uid {self.uid} child {self.pid} did not exit")
            time.sleep(0.01)

    def kill(self) -> None:
        if not self.reaped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, 9)
            self._reap(time.monotonic() + 10)
        for fd in (self.ready_fd, self.result_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


ChildFunction = Callable[..., Any]


class OtherUser:
    """Starts forked children that drop to another uid, then run a function.

    The function gets a ``ready()`` callable (for the test's
    :meth:`Child.wait_ready`) and the arguments given; what it returns must
    be JSON; an exception it raises fails the test in :meth:`Child.result`.
    The child never returns into pytest: it ends with ``os._exit``.
    """

    def __init__(self) -> None:
        self.children: list[Child] = []

    def start(self, fn: ChildFunction, *args: Any, uid: int = NOBODY) -> Child:
        ready_r, ready_w = os.pipe()
        result_r, result_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child
            try:
                os.close(ready_r)
                os.close(result_r)
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
                assert os.geteuid() == uid

                def ready() -> None:
                    os.write(ready_w, b"R")

                outcome = {"ok": fn(ready, *args)}
            except BaseException as exc:  # reported, never raised into pytest
                outcome = {"error": f"{type(exc).__name__}: {exc}"}
            try:
                view = memoryview(json.dumps(outcome).encode())
                while view:
                    view = view[os.write(result_w, view) :]
            finally:
                os._exit(0)
        os.close(ready_w)
        os.close(result_w)
        child = Child(pid, uid, ready_r, result_r)
        self.children.append(child)
        return child

    def kill_all(self) -> None:
        for child in self.children:
            child.kill()


@pytest.fixture
def other_user(sock_dir: str) -> Iterator[OtherUser]:
    """Children of another uid, killed (by pid) and reaped afterwards.

    Depends on ``sock_dir`` so that they are gone before its brokers are
    killed and every child reaped.
    """
    if os.geteuid() != 0:
        pytest.skip("needs root to run a process as another user")
    users = OtherUser()
    try:
        yield users
    finally:
        users.kill_all()


@pytest.fixture
def scratch() -> Iterator[Callable[[], str]]:
    """More short directories (``mkdtemp`` in /tmp), removed afterwards
    whoever they were chowned to."""
    made: list[str] = []

    def make() -> str:
        path = tempfile.mkdtemp(prefix="bqs", dir="/tmp")
        made.append(path)
        return path

    yield make
    for path in made:
        remove_tree(path)


# -- s14: unsafe socket directories ------------------------------------------


UNSAFE_DIRS = ["other_owner", "symlink", "mode_0755", "mode_0777", "regular_file"]


@pytest.mark.parametrize("kind", UNSAFE_DIRS)
def test_s14_unsafe_socket_directory_is_refused(sock_dir: str, kind: str) -> None:
    """Refused by every client and by a broker started by hand, with a clear
    one-line error naming the directory; nothing is created anywhere, and the
    directory is not chmod-ed or chown-ed (nor the symlink's target)."""
    directory = os.path.join(sock_dir, "d")
    if kind == "other_owner":
        if os.geteuid() != 0:
            pytest.skip("needs root to chown a directory to another user")
        os.mkdir(directory, 0o700)
        os.chown(directory, NOBODY, NOBODY)
    elif kind == "symlink":
        good = os.path.join(sock_dir, "good")
        os.mkdir(good, 0o700)
        os.symlink(good, directory)
    elif kind == "mode_0755":
        os.mkdir(directory)
        os.chmod(directory, 0o755)
    elif kind == "mode_0777":
        os.mkdir(directory)
        os.chmod(directory, 0o777)
    else:
        Path(directory).write_text("not a directory\n")
    path = os.path.join(directory, "b.sock")
    before = tree_state(sock_dir)

    result = run_cli("--socket", path, "put", "q", "x")
    assert result.returncode == 1
    assert result.stdout == b""
    line = one_line(result.stderr)
    assert f"unsafe socket directory {directory}" in line

    with pytest.raises(brokerq.PermissionDenied, match="unsafe socket directory"):
        brokerq.connect(path, timeout=5)
    with pytest.raises(brokerq.PermissionDenied):
        brokerq.Queue("q", socket=path).put(b"x")

    async def async_client() -> None:
        with anyio.fail_after(10):
            async with brokerq.open_async_client(path, timeout=5):
                pass

    with pytest.raises(brokerq.PermissionDenied, match="unsafe socket directory"):
        anyio.run(async_client)

    by_hand = subprocess.run([BROKER, path], capture_output=True, timeout=20, check=False)
    assert by_hand.returncode == 1
    assert f"unsafe socket directory {directory}" in one_line(by_hand.stderr)

    assert tree_state(sock_dir) == before
    assert broker_pids(sock_dir) == []


def test_s14_missing_parent_directory_is_a_clear_error(sock_dir: str) -> None:
    """Only the socket's own directory is created: a missing parent is a
    one-line error from the client and the broker alike, not a traceback."""
    directory = os.path.join(sock_dir, "no", "such")
    path = os.path.join(directory, "b.sock")
    result = run_cli("--socket", path, "put", "q", "x")
    assert result.returncode == 1
    assert f"its parent {os.path.dirname(directory)} does not exist" in one_line(result.stderr)
    with pytest.raises(brokerq.BrokerUnavailable, match="socket directory") as missing:
        brokerq.connect(path, timeout=5)
    assert not isinstance(missing.value, brokerq.PermissionDenied)  # nothing was refused
    by_hand = subprocess.run([BROKER, path], capture_output=True, timeout=20, check=False)
    assert by_hand.returncode == 1
    assert "does not exist" in one_line(by_hand.stderr)
    assert os.listdir(sock_dir) == []


SQUATS = ["open_dir", "private_dir", "symlink"]


def squat(ready: Callable[[], None], kind: str, victim_dir: str, elsewhere: str) -> int:
    """As the squatter: make ``victim_dir`` (the victim's default directory)
    ours, with a listening socket where the victim's broker would be; report
    the uid of the first process that connects to it."""
    if kind == "symlink":
        os.mkdir(elsewhere)
        os.chmod(elsewhere, 0o777)
        os.symlink(elsewhere, victim_dir)
        listen_dir = elsewhere
    else:
        os.mkdir(victim_dir)
        os.chmod(victim_dir, 0o777 if kind == "open_dir" else 0o700)
        listen_dir = victim_dir
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(os.path.join(listen_dir, "broker.sock"))
    os.chmod(os.path.join(listen_dir, "broker.sock"), 0o777)
    listener.listen(8)
    listener.settimeout(30)
    ready()
    conn, _ = listener.accept()
    return peer_uid(conn)


def squatted_victim(ready: Callable[[], None]) -> dict[str, Any]:
    """As the victim: use the default socket, with the client and the broker."""
    os.environ.pop("XDG_RUNTIME_DIR", None)
    os.environ.pop("BROKERQ_SOCKET", None)
    outcome: dict[str, Any] = {"path": resolve_socket_path(None)}
    try:
        brokerq.connect(timeout=5).close()
        outcome["client"] = "connected"
    except brokerq.BrokerqError as exc:
        outcome["client"] = f"{type(exc).__name__}: {exc}"
    outcome["broker"] = broker_in_process(None)
    return outcome


@pytest.mark.parametrize("kind", SQUATS)
def test_s14_squatted_default_directory_is_refused(
    other_user: OtherUser, scratch: Callable[[], str], kind: str
) -> None:
    """Another user (nobody) pre-creates the victim's ``/tmp/brokerq-UID`` (or
    a symlink there to a directory of its own) with a socket listening in it.
    The victim's client and broker refuse it before connecting, and change
    nothing in it."""
    victim = unused_uid()
    victim_dir = f"/tmp/brokerq-{victim}"
    elsewhere = os.path.join(scratch(), "theirs")
    os.chown(os.path.dirname(elsewhere), NOBODY, NOBODY)  # the squatter's own
    try:
        squatter = other_user.start(squat, kind, victim_dir, elsewhere)
        squatter.wait_ready()
        before = tree_state(victim_dir), tree_state(os.path.dirname(elsewhere))
        outcome = other_user.start(squatted_victim, uid=victim).result()
        assert outcome["path"] == f"{victim_dir}/broker.sock"
        assert outcome["client"].startswith("PermissionDenied: ")
        assert f"unsafe socket directory {victim_dir}" in outcome["client"]
        status, stderr = outcome["broker"]
        assert status == 1
        assert f"unsafe socket directory {victim_dir}" in one_line(stderr)
        assert (tree_state(victim_dir), tree_state(os.path.dirname(elsewhere))) == before
        # The first connection the squatter gets is this one, root's: the
        # victim never connected to the squatter's socket.
        marker = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        marker.settimeout(10)
        with marker:
            marker.connect(f"{victim_dir}/broker.sock")
            assert squatter.result() == os.geteuid()
    finally:
        kill_brokers(victim_dir)  # one a regression let the victim start
        remove_tree(victim_dir)


def private_default_dir(ready: Callable[[], None]) -> str:
    os.environ.pop("XDG_RUNTIME_DIR", None)
    os.umask(0)  # the directory is 0700 whatever the umask
    path = resolve_socket_path(None)
    check_socket_path(path)
    return path


@needs_root
def test_s14_default_directory_is_created_private(other_user: OtherUser) -> None:
    """The control for the squatting test: unsquatted, the same user's client
    creates ``/tmp/brokerq-UID`` itself, its own, mode 0700."""
    uid = unused_uid()
    directory = f"/tmp/brokerq-{uid}"
    try:
        path = other_user.start(private_default_dir, uid=uid).result()
        assert path == f"{directory}/broker.sock"
        st = os.lstat(directory)
        assert stat.S_ISDIR(st.st_mode)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (uid, 0o700)
        assert os.listdir(directory) == []
    finally:
        remove_tree(directory)


# -- s15: a peer with a different uid ---------------------------------------------


def intrude(ready: Callable[[], None], path: str, kind: str) -> str:
    """As another user: connect to the broker, maybe send a hello and a put
    at once, and read everything until the broker closes."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)
    if kind == "hello_and_put":
        with contextlib.suppress(OSError):  # the broker may have closed already
            sock.sendall(
                frame({"op": "hello", "id": 1, "version": protocol.PROTOCOL_VERSION})
                + frame({"op": "put", "id": 2, "queue": "intruder", "body": b"x"})
            )
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:  # closed with our bytes unread
            break
        if not chunk:
            break
        data += chunk
    return data.hex()


@pytest.mark.parametrize("kind", ["silent", "hello_and_put"])
def test_s15_broker_refuses_a_client_of_another_uid(
    socket_path: str, sock_dir: str, other_user: OtherUser, kind: str
) -> None:
    """A process of another uid that reaches the socket (here the test opens
    the directory and the socket up, as a careless setup might) gets one
    ``permission`` error frame, id 0, before anything it sent is read, then
    the connection closes. The broker keeps serving its own user."""
    with brokerq.connect(socket_path) as client:
        pid = client.broker_pid
        connection = client.connection()
        os.chmod(sock_dir, 0o711)
        os.chmod(socket_path, 0o666)
        try:
            received = bytes.fromhex(other_user.start(intrude, socket_path, kind).result())
        finally:
            os.chmod(sock_dir, 0o700)
            os.chmod(socket_path, 0o600)
        replies = replies_in(received)
        assert len(replies) == 1, replies
        (reply,) = replies
        assert isinstance(reply, Error)
        assert (reply.id, reply.code) == (0, "permission")
        assert f"uid {NOBODY}" in reply.message
        # The intruder's put was never read.
        assert "intruder" not in client.queues()
        assert client.connection() is connection
        client.queue("q").put(b"still")
        assert client.queue("q").get(timeout=5) == b"still"
    log = Path(socket_path + ".log")
    wait_until(lambda: "refused a connection" in log.read_text(), what="the refusal logged")
    with brokerq.connect(socket_path) as again:
        assert again.broker_pid == pid
    assert broker_pids(sock_dir) == [pid]


def impostor(ready: Callable[[], None], directory: str, connections: int) -> list[Any]:
    """As another user: listen, and report who connected and what they sent."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(os.path.join(directory, "s"))
    listener.listen(8)
    listener.settimeout(30)
    ready()
    seen = []
    for _ in range(connections):
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(20)
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
            seen.append([peer_uid(conn), data.hex()])
    return seen


def test_s15_client_refuses_a_broker_of_another_uid(
    socket_path: str, sock_dir: str, other_user: OtherUser, scratch: Callable[[], str]
) -> None:
    """A socket listened on by another uid, found at the broker's path (here
    moved there by root: a safe directory leaves no other way): the blocking
    client, the async client and the CLI refuse it right after connect,
    sending nothing (not even a hello), and neither unlink it nor spawn a
    broker."""
    theirs = scratch()
    os.chown(theirs, NOBODY, NOBODY)
    child = other_user.start(impostor, theirs, 3)
    child.wait_ready()
    os.rename(os.path.join(theirs, "s"), socket_path)
    before = tree_state(sock_dir)

    with pytest.raises(brokerq.PermissionDenied, match=f"runs as uid {NOBODY}"):
        brokerq.connect(socket_path, timeout=5)

    async def async_client() -> None:
        with anyio.fail_after(10):
            async with brokerq.open_async_client(socket_path, timeout=5):
                pass

    with pytest.raises(brokerq.PermissionDenied, match=f"runs as uid {NOBODY}"):
        anyio.run(async_client)

    result = run_cli("--socket", socket_path, "put", "q", "secret")
    assert result.returncode == 1
    line = one_line(result.stderr)
    assert f"the broker at {socket_path} runs as uid {NOBODY}" in line

    assert child.result() == [[os.geteuid(), ""]] * 3
    assert tree_state(sock_dir) == before
    assert broker_pids(sock_dir) == []


# -- s16: long paths -------------------------------------------------------------


def test_s16_long_xdg_runtime_dir_falls_back_to_tmp(
    sock_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A private ``XDG_RUNTIME_DIR`` of 110+ characters: the default socket
    would not fit a socket address, so the default is the short one in /tmp."""
    runtime = os.path.join(sock_dir, "r" * (115 - len(sock_dir) - 1))
    os.mkdir(runtime, 0o700)
    assert len(runtime) == 115
    monkeypatch.setenv("XDG_RUNTIME_DIR", runtime)
    path = default_socket_path()
    assert path == f"/tmp/brokerq-{os.geteuid()}/broker.sock"
    assert len(os.fsencode(path)) <= PORTABLE_PATH_LIMIT


def test_s16_xdg_runtime_dir_up_to_the_limit_is_used(
    sock_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The longest ``XDG_RUNTIME_DIR`` whose default socket fits is used, for
    real (a broker serves there); one byte longer falls back to /tmp."""
    suffix = "/brokerq/broker.sock"
    runtime = os.path.join(sock_dir, "r" * (MAX_SOCKET_PATH - len(suffix) - len(sock_dir) - 1))
    os.mkdir(runtime, 0o700)
    path = runtime + suffix
    assert len(os.fsencode(path)) == MAX_SOCKET_PATH
    monkeypatch.setenv("XDG_RUNTIME_DIR", runtime)
    assert default_socket_path() == path
    put = run_cli("put", "q", "fits", env={"XDG_RUNTIME_DIR": runtime})
    assert put.returncode == 0, put.stderr.decode()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    assert stat.S_IMODE(os.lstat(os.path.dirname(path)).st_mode) == 0o700
    got = run_cli("get", "q", "--timeout", "5", env={"XDG_RUNTIME_DIR": runtime})
    assert got.stdout == b"fits\n"

    longer = os.path.join(sock_dir, "s" * (len(runtime) - len(sock_dir)))
    os.mkdir(longer, 0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", longer)
    assert default_socket_path() == f"/tmp/brokerq-{os.geteuid()}/broker.sock"


def test_s16_long_tmpdir_changes_nothing(
    socket_path: str, sock_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``TMPDIR`` of 110+ characters: brokerq makes no path from it (the
    fallback is /tmp itself), clients work, and the broker does not inherit it."""
    tmpdir = os.path.join(sock_dir, "t" * (115 - len(sock_dir) - 1))
    os.mkdir(tmpdir, 0o700)
    monkeypatch.setenv("TMPDIR", tmpdir)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    assert default_socket_path() == f"/tmp/brokerq-{os.geteuid()}/broker.sock"
    put = run_cli("--socket", socket_path, "put", "q", "x", env={"TMPDIR": tmpdir})
    assert put.returncode == 0, put.stderr.decode()
    (pid,) = broker_pids(sock_dir)
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert not [v for v in environ if v.startswith(b"TMPDIR=")]
    assert os.listdir(tmpdir) == []


def test_s16_socket_path_over_the_limit_is_a_clear_error(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "x" * (120 - len(sock_dir) - 1))
    assert len(os.fsencode(path)) == 120
    result = run_cli("--socket", path, "put", "q", "x")
    assert result.returncode == 2  # a --socket the user got wrong: a usage error
    line = one_line(result.stderr)
    assert "120 bytes" in line
    assert "limit" in line
    with pytest.raises(brokerq.InvalidRequest, match="limit"):
        brokerq.connect(path, timeout=5)
    by_hand = subprocess.run([BROKER, path], capture_output=True, timeout=20, check=False)
    assert by_hand.returncode == 1
    assert "limit" in one_line(by_hand.stderr)
    assert os.listdir(sock_dir) == []
    assert broker_pids(sock_dir) == []


@pytest.mark.parametrize("basename", ["long", "short"])
def test_s16_socket_path_at_the_limit_works(sock_dir: str, basename: str) -> None:
    """At the limit, with a long name or a long directory. With the short
    name ``s`` the broker's temporary name (``.bq-<pid>``) is over the limit:
    it is bound through ``/proc/self/fd/<dirfd>/`` and renamed into place."""
    if basename == "long":
        path = os.path.join(sock_dir, "y" * (MAX_SOCKET_PATH - len(sock_dir) - 1))
    else:
        directory = os.path.join(sock_dir, "d" * (MAX_SOCKET_PATH - len(sock_dir) - 3))
        os.mkdir(directory, 0o700)
        path = os.path.join(directory, "s")
    assert len(os.fsencode(path)) == MAX_SOCKET_PATH
    result = run_cli("--socket", path, "put", "q", "edge")
    assert result.returncode == 0, result.stderr.decode()
    got = run_cli("--socket", path, "get", "q", "--timeout", "5")
    assert got.stdout == b"edge\n"
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    assert not [n for n in os.listdir(os.path.dirname(path)) if n.startswith(".bq-")]


def test_s16_without_proc_a_too_long_temporary_name_is_a_clear_error(
    sock_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where ``/proc/self/fd`` is missing (not Linux, or no /proc) the
    temporary name cannot be shortened: a clear error, and nothing is left."""
    directory = os.path.join(sock_dir, "d" * (MAX_SOCKET_PATH - len(sock_dir) - 3))
    os.mkdir(directory, 0o700)
    path = os.path.join(directory, "s")
    real_isdir = os.path.isdir
    monkeypatch.setattr(
        os.path, "isdir", lambda p: False if str(p).startswith("/proc/") else real_isdir(p)
    )
    with pytest.raises(brokerq.InvalidRequest, match="limit"):
        publish_socket(path).close()
    assert os.listdir(directory) == []


# -- XDG_RUNTIME_DIR: when it is trusted ---------------------------------------------

UNTRUSTED_RUNTIME_DIRS = [
    "not_ours",
    "mode_0755",
    "mode_0750",
    "symlink",
    "missing",
    "relative",
    "regular_file",
    "empty",
]


@pytest.mark.parametrize("kind", UNTRUSTED_RUNTIME_DIRS)
def test_xdg_runtime_dir_untrusted_falls_back_to_tmp(
    sock_dir: str, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """Only an absolute path to a real directory of ours with no access for
    group or others is trusted (after sudo or su it may name another user's
    directory). Choosing the path touches nothing."""
    runtime = os.path.join(sock_dir, "run")
    value = runtime
    if kind == "not_ours":
        if os.geteuid() != 0:
            pytest.skip("needs root to chown a directory to another user")
        os.mkdir(runtime, 0o700)
        os.chown(runtime, NOBODY, NOBODY)
    elif kind in ("mode_0755", "mode_0750"):
        os.mkdir(runtime)
        os.chmod(runtime, int(kind[-4:], 8))
    elif kind == "symlink":
        good = os.path.join(sock_dir, "good")
        os.mkdir(good, 0o700)
        os.symlink(good, runtime)
    elif kind == "relative":
        os.mkdir(runtime, 0o700)  # private, but named relative to the cwd
        monkeypatch.chdir(sock_dir)
        value = "run"
    elif kind == "regular_file":
        Path(runtime).write_text("")
    elif kind == "empty":
        value = ""
    monkeypatch.setenv("XDG_RUNTIME_DIR", value)
    before = tree_state(sock_dir)
    fallback = f"/tmp/brokerq-{os.geteuid()}/broker.sock"
    assert default_socket_path() == fallback
    assert resolve_socket_path(None) == fallback
    assert tree_state(sock_dir) == before


@pytest.mark.parametrize("value", ["{run}", "{run}/", "{run}/../run"])
def test_xdg_runtime_dir_trusted_when_ours_and_private(
    sock_dir: str, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    runtime = os.path.join(sock_dir, "run")
    os.mkdir(runtime, 0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", value.format(run=runtime))
    assert default_socket_path() == f"{runtime}/brokerq/broker.sock"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert default_socket_path() == f"/tmp/brokerq-{os.geteuid()}/broker.sock"


def resolve_default(ready: Callable[[], None], runtime: str) -> str:
    os.environ["XDG_RUNTIME_DIR"] = runtime
    path = resolve_socket_path(None)
    check_socket_path(path)
    return path


def test_xdg_runtime_dir_of_another_user_is_not_used(sock_dir: str, other_user: OtherUser) -> None:
    """As after ``sudo -u``: a process of another uid whose XDG_RUNTIME_DIR
    still names root's private runtime directory uses its own /tmp one, and
    creates nothing in root's."""
    runtime = os.path.join(sock_dir, "run")
    os.mkdir(runtime, 0o700)
    os.chmod(sock_dir, 0o711)  # so that it could reach it, were it careless
    uid = unused_uid()
    own = f"/tmp/brokerq-{uid}"
    try:
        path = other_user.start(resolve_default, runtime, uid=uid).result()
        assert path == f"{own}/broker.sock"
        assert os.lstat(own).st_uid == uid
    finally:
        os.chmod(sock_dir, 0o700)
        remove_tree(own)
    assert os.listdir(runtime) == []


# -- other pitfalls: symlinks -----------------------------------------------------


@pytest.fixture
def target(sock_dir: str) -> str:
    """A file a symlink planted beside the socket points to."""
    path = os.path.join(sock_dir, "target")
    Path(path).write_text("precious\n")
    os.chmod(path, 0o644)
    return path


def test_pitfall_symlink_at_the_lock_path_is_not_followed(
    socket_path: str, sock_dir: str, target: str
) -> None:
    """The lock file is opened with O_NOFOLLOW: the client and a broker
    started by hand fail with a one-line error, and the target is untouched."""
    os.symlink(target, socket_path + ".lock")
    before = tree_state(sock_dir)
    with pytest.raises(brokerq.BrokerUnavailable, match="symbolic link"):
        brokerq.connect(socket_path, timeout=5)
    result = run_cli("--socket", socket_path, "put", "q", "x")
    assert result.returncode == 1
    assert socket_path + ".lock" in one_line(result.stderr)
    by_hand = subprocess.run([BROKER, socket_path], capture_output=True, timeout=20, check=False)
    assert by_hand.returncode == 1
    assert socket_path + ".lock" in one_line(by_hand.stderr)
    assert tree_state(sock_dir) == before
    assert broker_pids(sock_dir) == []


def test_pitfall_symlink_at_the_log_path_is_not_followed(
    socket_path: str, sock_dir: str, target: str
) -> None:
    """The spawning client opens the broker's log with O_NOFOLLOW: it fails
    clearly rather than have a broker write through the link."""
    os.symlink(target, socket_path + ".log")
    with pytest.raises(brokerq.BrokerUnavailable, match="symbolic link"):
        brokerq.connect(socket_path, timeout=5)
    assert Path(target).read_text() == "precious\n"
    assert os.path.islink(socket_path + ".log")
    assert broker_pids(sock_dir) == []


@pytest.mark.parametrize("repair", [False, True])
def test_pitfall_symlink_at_the_journal_path_is_not_written_through(
    socket_path: str, sock_dir: str, target: str, repair: bool
) -> None:
    """The journal is opened for writing with O_NOFOLLOW: a broker refuses
    to start on a symlinked journal, even with --repair (which truncates),
    and the target keeps every byte."""
    os.symlink(target, socket_path + ".journal")
    args = [BROKER, socket_path, "--idle-exit", "0", *(["--repair"] if repair else [])]
    by_hand = subprocess.run(args, capture_output=True, timeout=20, check=False)
    assert by_hand.returncode == 1
    assert "journal" in by_hand.stderr.decode().splitlines()[-1]
    assert Path(target).read_text() == "precious\n"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o644
    assert broker_pids(sock_dir) == []


@pytest.mark.parametrize("points_to", ["file", "directory", "nothing"])
def test_pitfall_symlink_at_the_socket_path_is_replaced_not_followed(
    socket_path: str, sock_dir: str, target: str, points_to: str
) -> None:
    """The broker renames its socket over the path: a symlink there is
    replaced by the socket, never followed."""
    pointee = {
        "file": target,
        "directory": os.path.join(sock_dir, "dir"),
        "nothing": os.path.join(sock_dir, "none"),
    }[points_to]
    if points_to == "directory":
        os.mkdir(pointee, 0o700)
    os.symlink(pointee, socket_path)
    with brokerq.connect(socket_path) as client:
        client.queue("q").put(b"x")
    assert stat.S_ISSOCK(os.lstat(socket_path).st_mode)
    assert Path(target).read_text() == "precious\n"
    if points_to == "directory":
        assert os.listdir(pointee) == []
    assert not os.path.lexists(os.path.join(sock_dir, "none"))


# -- other pitfalls: modes, and what a spawned broker inherits ------------------------


@pytest.mark.parametrize("how", ["spawned", "by_hand"])
def test_pitfall_files_are_private_whatever_the_umask(
    sock_dir: str, how: str, procs: Callable[..., subprocess.Popen[bytes]]
) -> None:
    """Under umask 000 the directory is still created 0700, the socket file
    0600 (umask 0177 around bind: fchmod does not reach a socket file), the
    lock, log and journal 0600."""
    directory = os.path.join(sock_dir, "d")
    path = os.path.join(directory, "b.sock")
    if how == "spawned":
        put = subprocess.run(
            ["sh", "-c", 'umask 000 && exec "$0" --socket "$1" put q x', BIN / "brokerq", path],
            capture_output=True,
            timeout=20,
            check=False,
        )
        assert put.returncode == 0, put.stderr.decode()
        names = ["", ".lock", ".log", ".journal"]
    else:
        os.mkdir(directory, 0o700)
        procs(["sh", "-c", 'umask 000 && exec "$0" "$1"', BROKER, path])
        wait_until(lambda: os.path.exists(path), what="the broker's socket")
        names = ["", ".lock", ".journal"]
    assert stat.S_IMODE(os.lstat(directory).st_mode) == 0o700
    for name in names:
        mode = stat.S_IMODE(os.lstat(path + name).st_mode)
        assert mode == 0o600, f"{path + name}: {mode:04o}"


def test_pitfall_spawned_broker_inherits_a_clean_environment(
    socket_path: str, sock_dir: str
) -> None:
    """The broker a client spawns gets the BROKERQ_* variables and a default
    PATH, nothing else (no LD_PRELOAD, PYTHONPATH or secrets of the first
    client), runs in / in a session of its own, and as the client's user
    (root included: it is then root's own broker, see docs/security.md)."""
    env = {
        "LD_PRELOAD": "/nonexistent/bq-preload.so",
        "PYTHONPATH": "/nonexistent/bq-pythonpath",
        "BQ_TEST_SECRET": "hunter2",
        "BROKERQ_IDLE_EXIT": "77",
    }
    put = subprocess.run(
        [BIN / "brokerq", "--socket", socket_path, "put", "q", "x"],
        capture_output=True,
        timeout=20,
        cwd=sock_dir,
        env={**os.environ, **env},
        check=False,
    )
    assert put.returncode == 0, put.stderr.decode()
    (pid,) = broker_pids(sock_dir)
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    environ = dict(item.decode().split("=", 1) for item in raw if item)
    assert environ == {"BROKERQ_IDLE_EXIT": "77", "PATH": os.defpath}
    assert os.readlink(f"/proc/{pid}/cwd") == "/"
    assert os.getsid(pid) != os.getsid(0)
    assert os.stat(f"/proc/{pid}").st_uid == os.geteuid()
    assert "preload" not in Path(socket_path + ".log").read_text()
    with brokerq.connect(socket_path) as client:
        assert client.stats()["idle_exit_s"] == 77
