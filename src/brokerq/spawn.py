"""Finding a broker, and starting one when none runs, without races
(docs/design.md section 3).

The broker holds an exclusive ``flock`` on ``<socket>.lock`` for its whole
life, so a broker exists if and only if that lock is held (the kernel drops
it even on SIGKILL). Only the lock holder creates, replaces or unlinks the
socket. A client that finds nothing listening tries the lock: busy means a
broker is starting, serving or exiting (connect again); taken means none
exists, so it starts one, hands it the locked descriptor and waits for
``READY``. Run by every client: what only spawning needs is imported late.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import socket
import stat
import struct
import sys
import time
import weakref
from typing import TYPE_CHECKING, Any

from .errors import BrokerUnavailable, InvalidRequest, PermissionDenied
from .pause import pause

if TYPE_CHECKING:
    import subprocess

#: Python accepts at most 107 bytes for an AF_UNIX path on Linux (sun_path is
#: 108 with the NUL); BSD and macOS allow 103.
MAX_SOCKET_PATH = 107 if sys.platform.startswith("linux") else 103
#: The listen backlog asked for: the kernel caps it (``net.core.somaxconn``),
#: so this means "as many as the system allows", and a burst of connects
#: waits in the backlog while the broker is busy rather than failing.
LISTEN_BACKLOG = max(socket.SOMAXCONN, 65535)
#: What :func:`_try_connect` returns when connect() said EAGAIN: a broker
#: listens, its backlog full for a moment; connect again, never spawn.
BUSY = object()


def _unsafe(directory: str) -> str | None:
    """Why ``directory`` is not private (this user's real directory, mode 0700), or None."""
    try:
        st = os.lstat(directory)
    except OSError as exc:
        return f"cannot be read: {exc.strerror}"
    if stat.S_ISLNK(st.st_mode):
        return "is a symlink"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid != os.geteuid():
        return f"is owned by uid {st.st_uid}, not by you (uid {os.geteuid()})"
    if st.st_mode & 0o077:
        return f"has mode {stat.S_IMODE(st.st_mode):04o}; it must be 0700 (no group/other)"
    return None


def default_socket_path() -> str:
    """``$XDG_RUNTIME_DIR/brokerq/broker.sock`` if that directory is absolute
    (the XDG spec ignores a relative one) and private (after ``sudo`` it may
    be another user's) and the path fits, else ``/tmp/brokerq-<euid>/broker.sock``."""
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(runtime) and _unsafe(runtime) is None:
        path = normalise_path(os.path.join(runtime, "brokerq", "broker.sock"))
        if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
            return path
    return f"/tmp/brokerq-{os.geteuid()}/broker.sock"


def resolve_socket_path(socket_path: str | os.PathLike[str] | None) -> str:
    """The path given, else ``$BROKERQ_SOCKET``, else :func:`default_socket_path`;
    made absolute and normalised (:func:`normalise_path`)."""
    if socket_path is None:
        socket_path = os.environ.get("BROKERQ_SOCKET") or default_socket_path()
    return normalise_path(os.fspath(socket_path))


def normalise_path(path: str) -> str:
    """``os.path.abspath``, and a leading ``//`` folded to ``/`` (protocol.md
    10.1): two spellings of one path must name one broker and one journal."""
    path = os.path.abspath(path)
    if path.startswith("//"):
        path = "/" + path.lstrip("/")
    return path


def lock_path(socket_path: str) -> str:
    return socket_path + ".lock"


def log_path(socket_path: str) -> str:
    return socket_path + ".log"


def check_path_length(socket_path: str) -> None:
    size = len(os.fsencode(socket_path))
    if size > MAX_SOCKET_PATH:
        raise InvalidRequest(
            f"socket path is {size} bytes, over the limit of {MAX_SOCKET_PATH} "
            f"for a Unix socket: choose a shorter --socket / BROKERQ_SOCKET: {socket_path}"
        )


def check_socket_path(socket_path: str, *, create: bool = True) -> None:
    """Check the path's length, and create the socket's directory (mode 0700)
    or check that it is private, before a client or a broker touches the path.

    Anything else is refused, never chmod-ed or chown-ed: a directory
    someone else prepared is the very attack (squatting in /tmp) this guards
    against. ``create`` False (``stop``) creates nothing: a missing
    directory means no broker runs there.
    """
    check_path_length(socket_path)
    directory = os.path.dirname(socket_path)
    if not create and not os.path.lexists(directory):
        raise BrokerUnavailable(f"no broker is running at {socket_path}")
    try:
        if create:
            os.mkdir(directory, 0o700)  # only the last component, never its parents
    except FileExistsError:
        pass
    except OSError as exc:  # a missing parent, a read-only file system, ...
        why = exc.strerror
        if isinstance(exc, FileNotFoundError):
            why = f"its parent {os.path.dirname(directory)} does not exist"
        error = PermissionDenied if isinstance(exc, PermissionError) else BrokerUnavailable
        raise error(f"cannot create the socket directory {directory}: {why}") from exc
    if problem := _unsafe(directory):
        raise PermissionDenied(f"unsafe socket directory {directory}: it {problem}")


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a connected Unix socket."""
    if hasattr(socket, "SO_PEERCRED"):
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        if sys.platform.startswith("openbsd"):  # pragma: no cover - uid, gid, pid there
            return int(struct.unpack("3i", creds)[0])
        return int(struct.unpack("3i", creds)[1])
    import ctypes  # pragma: no cover - BSD and macOS: getpeereid
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    uid, gid = ctypes.c_uint32(), ctypes.c_uint32()
    if libc.getpeereid(sock.fileno(), ctypes.byref(uid), ctypes.byref(gid)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return uid.value


def check_peer(sock: socket.socket, what: str) -> None:
    """Refuse a peer that runs as another user (both ends call this)."""
    uid = peer_uid(sock)
    if uid != os.geteuid():
        raise PermissionDenied(f"{what} runs as uid {uid}, not as you (uid {os.geteuid()})")


def open_lock(socket_path: str) -> int:
    """Open (creating) ``<socket>.lock``; never follows a symlink."""
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
    return os.open(lock_path(socket_path), flags, 0o600)


def try_lock(fd: int) -> bool:
    """Take the exclusive flock without blocking; False if someone holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def take_spawn_lock(socket_path: str) -> int | None:
    """The locked lock fd if no broker exists (the caller must spawn one; the
    gone broker's pid in the file is cleared), else None."""
    fd = open_lock(socket_path)
    if not try_lock(fd):
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    return fd


def lock_holder_pid(socket_path: str) -> int | None:
    """The pid the lock holder wrote into the lock file (information only)."""
    try:
        with open(lock_path(socket_path)) as lock:
            text = lock.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def broker_running(socket_path: str) -> bool:
    """True if some process holds the broker lock of ``socket_path``."""
    try:
        fd = os.open(lock_path(socket_path), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    try:
        return not try_lock(fd)  # (closing the fd lets go of a lock it took)
    finally:
        os.close(fd)


def still_running(socket_path: str, pid: int | None) -> bool:
    """True while the broker ``pid`` (None: any process) holds the lock of
    ``socket_path``. So waiting for a stop is not defeated by a client that
    starts the next broker at once: the lock file names that one then."""
    return broker_running(socket_path) and (pid is None or lock_holder_pid(socket_path) == pid)


# -- connecting and spawning -----------------------------------------------


def _try_connect(socket_path: str, timeout: float) -> socket.socket | object | None:
    """A connected socket, :data:`BUSY`, or None if nothing listens (yet)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(max(timeout, 0.001))
        sock.connect(socket_path)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EAGAIN:
            return BUSY
        if exc.errno in (errno.ENOENT, errno.ECONNREFUSED) or isinstance(exc, TimeoutError):
            return None  # no broker is listening here (yet)
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise PermissionDenied(f"cannot connect to {socket_path}: {exc.strerror}") from exc
        raise BrokerUnavailable(f"cannot connect to {socket_path}: {exc}") from exc
    try:
        check_peer(sock, f"the broker at {socket_path}")
    except BaseException:
        sock.close()
        raise
    return sock


def connect_or_spawn(socket_path: str, deadline: float, *, spawn: bool = True) -> socket.socket:
    """Connect to the broker of ``socket_path``, starting one if none runs,
    by the ``time.monotonic()`` ``deadline`` (else BrokerUnavailable: a
    broker stopped or wedged holds the lock, so no second one is started)."""
    check_socket_path(socket_path, create=spawn)
    delay = 0.001
    while True:
        remaining = deadline - time.monotonic()
        sock = _try_connect(socket_path, remaining)
        if isinstance(sock, socket.socket):
            pause("client.connected")
            return sock
        pause("client.connect_failed")
        if sock is BUSY:
            pause("client.backlog_full")  # a broker serves, busy: connect again
        elif not spawn and not broker_running(socket_path):
            raise BrokerUnavailable(f"no broker is running at {socket_path}")
        elif spawn:
            fd = take_spawn_lock(socket_path)
            if fd is None:
                pause("client.lock_busy")
            else:
                # No broker exists, so whatever is at the path is stale.
                # Only now, holding the lock, may it be replaced.
                pause("client.locked")
                try:
                    spawn_broker(socket_path, fd, deadline)
                finally:
                    os.close(fd)
                delay = 0.001
                continue
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            what = "did not answer" if broker_running(socket_path) else "is not running"
            raise BrokerUnavailable(f"the broker at {socket_path} {what} within the deadline")
        import random  # only when there is a wait: a client starts faster without it

        time.sleep(min(delay * (0.5 + random.random()), remaining))
        delay = min(delay * 2, 0.05)


def _broker_program() -> str:
    """``$BROKERQ_BROKER``, else ``local-queue-broker`` beside this Python, else
    on PATH; as an absolute path (protocol.md 10.4: the broker starts in ``/``
    with a PATH of its own, so a bare name or a relative path is resolved here)."""
    import shutil

    configured = os.environ.get("BROKERQ_BROKER")
    if configured:
        found = shutil.which(configured)
        if found is None:
            raise BrokerUnavailable(
                f"cannot start a broker: BROKERQ_BROKER={configured!r} is not an executable"
            )
        return os.path.abspath(found)
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", os.defpath)])
    if found := shutil.which("local-queue-broker", path=path):
        return os.path.abspath(found)
    raise BrokerUnavailable(
        "cannot start a broker: no local-queue-broker program beside "
        f"{sys.executable} or on PATH (set BROKERQ_BROKER to its path)"
    )


def spawn_broker(socket_path: str, lock_fd: int, deadline: float) -> int:
    """Start a broker that inherits ``lock_fd`` (locked); return its pid once READY.
    It inherits ``BROKERQ_*`` and a default PATH, no more."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k.startswith("BROKERQ_")}
    env["PATH"] = os.defpath
    args = ["--daemon", "--lock-fd", str(lock_fd)]
    launcher, ready = launch(
        socket_path, args, (lock_fd,), start_new_session=True, cwd="/", env=env
    )
    pause("client.spawned")
    try:
        return wait_ready(ready, deadline, socket_path)
    finally:
        # The launcher forks the broker and exits at once: reap it so no
        # zombie is left, whatever happened to the broker.
        with contextlib.suppress(subprocess.TimeoutExpired, ChildProcessError):
            launcher.wait(timeout=max(0.0, deadline - time.monotonic()))


def launch(
    socket_path: str, args: list[str], pass_fds: tuple[int, ...] = (), **popen: Any
) -> tuple[subprocess.Popen[bytes], int]:
    """Start the broker for ``socket_path``, its stderr to ``<socket>.log``;
    return it and the pipe on which it says READY."""
    import subprocess

    log_flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
    log_fd = os.open(log_path(socket_path), log_flags, 0o600)
    ready_r, ready_w = os.pipe()
    command = [_broker_program(), socket_path, *args, "--ready-fd", str(ready_w)]
    try:
        proc = subprocess.Popen(
            command,
            pass_fds=(*pass_fds, ready_w),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log_fd,
            **popen,
        )
    except BaseException as exc:
        os.close(ready_r)
        if isinstance(exc, OSError):
            raise BrokerUnavailable(f"cannot start {command[0]}: {exc}") from exc
        raise
    finally:
        os.close(ready_w)
        os.close(log_fd)
    return proc, ready_r


def wait_ready(fd: int, deadline: float, socket_path: str) -> int:
    """The pid a starting broker says on ``fd`` (``READY <pid>``); closes ``fd``."""
    data = b""
    try:
        while not data.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _not_ready(socket_path, "did not become ready in time")
            if not select.select([fd], [], [], remaining)[0]:
                continue
            if not (chunk := os.read(fd, 64)):
                raise _not_ready(socket_path, "exited before it was ready")
            data += chunk
    finally:
        os.close(fd)
    if not data.startswith(b"READY "):
        raise BrokerUnavailable(f"the spawned broker said {data!r} instead of READY")
    return int(data[len(b"READY ") :])


def _not_ready(socket_path: str, what: str) -> BrokerUnavailable:
    """The error, in one line, ending with the last line of the broker's log."""
    path = log_path(socket_path)
    try:
        with open(path, errors="replace") as log:
            lines = [line.strip() for line in log if line.strip()]
    except OSError:
        return BrokerUnavailable(f"the broker spawned for {socket_path} {what}")
    tail = f": {lines[-1]} (see {path})" if lines else f" (see {path})"
    return BrokerUnavailable(f"the broker spawned for {socket_path} {what}{tail}")


# -- the broker's side: publishing the socket ------------------------------

#: The listening sockets this process published, which a child forked
#: without exec closes at once: holding one after the broker died, it would
#: let clients connect into a dead backlog and wait there for ever.
_LISTENERS: weakref.WeakSet[socket.socket] = weakref.WeakSet()
_fork_hook = False


def _close_listeners_in_child() -> None:
    for sock in list(_LISTENERS):
        sock.close()


def close_in_forked_children(sock: socket.socket) -> None:
    """Have a child forked from this process close ``sock`` at once (a
    listener); the hook is registered with the first, so only a broker has it."""
    global _fork_hook
    if not _fork_hook:
        os.register_at_fork(after_in_child=_close_listeners_in_child)
        _fork_hook = True
    _LISTENERS.add(sock)


def publish_socket(socket_path: str, backlog: int = LISTEN_BACKLOG) -> socket.socket:
    """Bind a temporary name, listen, then rename it over ``socket_path``
    (which so only ever names a listening socket). Only the lock holder may.
    Mode 0600 by the umask around ``bind`` (``fchmod`` misses a socket file)."""
    directory, name = os.path.split(socket_path)
    temp_name = f".bq-{os.getpid()}"
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name, dir_fd=dir_fd)
        bindable = os.path.join(directory, temp_name)
        if len(os.fsencode(bindable)) > MAX_SOCKET_PATH:
            # The temporary name may be longer than the socket's: /proc names it short.
            if not os.path.isdir(f"/proc/self/fd/{dir_fd}"):
                check_path_length(bindable)  # raises: no short way to name it here
            bindable = f"/proc/self/fd/{dir_fd}/{temp_name}"
        old_umask = os.umask(0o177)
        try:
            sock.bind(bindable)
        finally:
            os.umask(old_umask)
        pause("broker.bound")
        sock.listen(backlog)
        pause("broker.listening")
        os.rename(temp_name, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(temp_name, dir_fd=dir_fd)
        raise
    finally:
        os.close(dir_fd)
    close_in_forked_children(sock)
    return sock


def file_identity(path: str) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of ``path`` itself (not a symlink's target), or None."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino
