"""``local-queue-broker``: the broker process, from its options to READY.

Start-up order makes spawning race-free and fast (design.md §3): check the
socket directory; daemonize; hold the lock; bind a temporary name, listen,
rename it over the socket path; say ``READY <pid>``; only now import trio and
serve. Clients that connect meanwhile wait in the listen backlog.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import click

from .. import protocol
from ..errors import BrokerqError
from ..pause import pause
from ..spawn import (
    check_socket_path,
    file_identity,
    lock_holder_pid,
    lock_path,
    log_path,
    open_lock,
    publish_socket,
    resolve_socket_path,
    try_lock,
)
from .activation import inherited_listener
from .config import STOP_SIGNALS, BrokerConfig
from .core import BrokerCore, limits
from .journal import Journal, journal_path

EXIT_OK = 0
EXIT_ERROR = 1  # includes "another broker already holds the lock"
LOG_ROTATE_BYTES = 1024 * 1024
_LOG_FORMAT = "%(asctime)s brokerq[%(process)d] %(levelname)s %(message)s"
log = logging.getLogger("brokerq.broker")

F = TypeVar("F", bound=Callable[..., Any])

# The help of each option: its name, then its text (continued on indented lines).
_HELP = """
--data-dir Directory for the journal, on a disk to survive reboots (default: beside the
    socket, which survives broker crashes and idle exits).
--fsync When the journal is fsynced before a put is acknowledged: never (survives a broker
    crash, not an OS crash or power loss), batch (one fsync covers every put that arrived
    meanwhile) or always (one per write). Default: never for the journal beside the socket
    (it survives what that place does), batch with --data-dir.
--journal/--no-journal Keep messages in a journal (--no-journal: in memory only, lost when
    the broker stops; it then never idles out while it holds any).
--repair Truncate a journal corrupt in the middle at the bad record, losing what follows,
    instead of refusing to start.
--max-deliveries Deliveries of a reserved message without an ack before it moves to
    <queue>:dead (queues may set their own).
--lease Default lease of a reserved message before it is delivered again.
--idle-exit Exit after this long with no connections (0: never). Messages wait in the
    journal for the next broker; with --no-journal it never exits holding any.
--max-message-size Largest message body accepted.
--subscriber-buffer Publishes held for one live subscriber that reads too slowly; past this
    it is dropped with an 'overflow' error (one publish always fits).
--max-connections Connections served at once; one more is answered 'busy' and closed.
--frame-timeout A connection whose frame is not complete this long after its first byte,
    or whose hello is not within this long of connecting, is closed (0: never). Idle
    connections between frames are never closed.
--max-pipelined Requests of one connection answered before their replies are written (and
    at most 1 MiB of replies); nothing more is read from it until they are.
--max-queue-bytes Body bytes a queue without a max_bytes of its own may hold; puts wait for
    room as on any bounded queue (0: unlimited).
--max-total-bytes Body bytes held over all queues; a put past it fails with 'full'
    (default: 1 GiB, or a quarter of the RAM if less; 0: unlimited).
--log-level Least severe log level written.
--daemon Fork into the background, the parent exiting at once (as clients spawn it).
--lock-fd Inherited descriptor of SOCKET.lock, already flock-ed by the spawner
    (docs/protocol.md 10.4). Without it the broker takes the lock itself.
--ready-fd Inherited pipe (or any byte stream): 'READY <pid>' is written to it once the socket
    listens, 'BUSY <pid>' if another broker holds the lock; then closed.
"""
_HELP_OF = dict(
    " ".join(entry.split()).split(" ", 1) for entry in re.split(r"\n(?=--)", _HELP.strip())
)
_COUNT, _SIZE, _SECONDS = click.IntRange(min=1), click.IntRange(min=0), click.FloatRange(min=0)


def _option(
    name: str, type_: Any = None, default: Any = None, metavar: str | None = None, **kwargs: Any
) -> Callable[[F], F]:
    """An option also read from BROKERQ_<NAME>, its default shown if it has one."""
    env = "BROKERQ_" + name[2:].split("/", maxsplit=1)[0].replace("-", "_").upper()
    kwargs.update(type=type_, metavar=metavar, envvar=env, show_envvar=True)
    if default is not None:
        kwargs["default"] = default
    return click.option(name, help=_HELP_OF[name], show_default=default is not None, **kwargs)


_LOG_LEVELS = click.Choice(["debug", "info", "warning", "error"], case_sensitive=False)
_OPTIONS = [
    _option("--data-dir", click.Path(file_okay=False)),
    _option("--fsync", click.Choice(["never", "batch", "always"])),
    _option("--journal/--no-journal", default=True),
    _option("--repair", is_flag=True),
    _option("--max-deliveries", _COUNT, 20, "N"),
    _option("--lease", click.FloatRange(min=0, min_open=True), 30.0, "SECONDS"),
    _option("--idle-exit", _SECONDS, 300.0, "SECONDS"),
    _option("--max-message-size", _COUNT, protocol.DEFAULT_MAX_MESSAGE_SIZE, "BYTES"),
    _option("--subscriber-buffer", _COUNT, protocol.DEFAULT_SUBSCRIBER_BUFFER, "BYTES"),
    _option("--max-connections", _COUNT, limits.DEFAULT_MAX_CONNECTIONS, "N"),
    _option("--frame-timeout", _SECONDS, limits.DEFAULT_FRAME_TIMEOUT, "SECONDS"),
    _option("--max-pipelined", _COUNT, limits.DEFAULT_MAX_PIPELINED, "N"),
    _option("--max-queue-bytes", _SIZE, limits.DEFAULT_MAX_QUEUE_BYTES, "BYTES"),
    _option("--max-total-bytes", _SIZE, limits.default_max_total_bytes(), "BYTES"),
    _option("--log-level", _LOG_LEVELS, "info"),
]


def broker_options(f: F) -> F:
    for option in reversed(_OPTIONS):
        f = option(f)
    return f


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("socket", required=False, envvar="BROKERQ_SOCKET")
@broker_options
@click.option("--daemon", is_flag=True, help=_HELP_OF["--daemon"])
@click.option("--lock-fd", type=int, metavar="FD", help=_HELP_OF["--lock-fd"])
@click.option("--ready-fd", type=int, metavar="FD", help=_HELP_OF["--ready-fd"])
def main(
    socket: str | None, daemon: bool, lock_fd: int | None, ready_fd: int | None, **options: Any
) -> None:
    """Run the brokerq broker for SOCKET in the foreground.

    SOCKET defaults to $BROKERQ_SOCKET, else the per-user path
    ($XDG_RUNTIME_DIR/brokerq/broker.sock or /tmp/brokerq-UID/broker.sock).
    Clients start this program on their own when no broker answers; run it
    by hand (or under a supervisor) to choose its options yourself.

    Exit status: 0 after a stop, SIGTERM or idle exit; 1 on an error,
    including when another broker already serves SOCKET (the message names
    its pid); 2 on a usage error.
    """
    sys.exit(run(socket, daemon=daemon, lock_fd=lock_fd, ready_fd=ready_fd, **options))


def run(
    socket: str | None,
    *,
    daemon: bool = False,
    lock_fd: int | None = None,
    ready_fd: int | None = None,
    fsync: str | None = None,
    log_level: str = "info",
    journal: bool = True,
    repair: bool = False,
    **options: Any,
) -> int:
    """Returns the exit status; ``options`` are BrokerConfig's (``idle_exit`` 0: never)."""
    path = resolve_socket_path(socket)
    if options.get("idle_exit") == 0:
        options["idle_exit"] = math.inf
    data_dir = options.get("data_dir")
    if fsync is None:  # never beside the socket, a place that does not survive reboots anyway
        fsync = "never" if data_dir is None else "batch"
    try:
        check_socket_path(path)
        activated = inherited_listener(path)  # before a fork changes our pid
    except BrokerqError as exc:
        return _fail(str(exc))
    if activated is not None and daemon:
        return _fail("--daemon cannot be used with a socket passed by systemd")
    config = BrokerConfig(path, fsync=fsync, activated=activated is not None, **options)
    if daemon:
        _daemonize()
    try:
        fd = _hold_lock(path, lock_fd)
    except BadLockFd as exc:
        return _fail(str(exc))
    except OSError as exc:  # a symlink planted at the lock path, say (O_NOFOLLOW)
        return _fail(f"cannot open the lock file {lock_path(path)}: {exc.strerror}")
    if fd is None:
        holder = lock_holder_pid(path)
        if ready_fd is not None:
            # A spawner without flock reads "connect again" (protocol.md 10.3).
            _tell_ready_fd(ready_fd, f"BUSY {holder or 0}\n")
        who = f"pid {holder}" if holder else "starting up"
        return _fail(f"another broker ({who}) already serves {path}")
    # From the lock on, SIGTERM and SIGINT wait for the broker's receiver: a
    # client may be answered before that receiver runs (docs/usage.md).
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    pause("broker.locked")
    _setup_logging(path, daemon, log_level)
    core = config.new_core()
    try:
        opened = _open_journal(core, path, data_dir, fsync, repair) if journal else None
    except (OSError, BrokerqError) as exc:
        return _fail(f"cannot open the journal: {exc}", logged=True)
    try:
        listener = activated or publish_socket(path)
    except (OSError, BrokerqError) as exc:
        return _fail(f"cannot listen on {path}: {exc}", logged=True)
    log.info("serving %s (pid %d)", path, os.getpid())
    pause("broker.before_ready")
    if ready_fd is not None:
        _tell_ready_fd(ready_fd, f"READY {os.getpid()}\n")

    # Import trio only now: clients are already queueing in the backlog.
    import trio

    from .server import Broker

    broker = Broker(config, core, opened)
    trio.run(broker.serve, listener)
    if opened is not None:
        opened.close()
    if broker.failure:
        log.critical("exited after a journal failure: %s", broker.failure)
        return EXIT_ERROR
    log.info("exited")
    return EXIT_OK


def _open_journal(
    core: BrokerCore, socket_path: str, data_dir: str | None, fsync: str, repair: bool
) -> Journal:
    path = journal_path(socket_path, data_dir)
    if data_dir is not None:
        os.makedirs(data_dir, mode=0o700, exist_ok=True)
    journal, result = Journal.open(path, fsync, repair=repair, preallocate=True)
    for record in result.records:
        core.apply(record)
    restored = core.finish_replay(time.time())
    log.info("journal %s: %d records, %d messages restored", path, len(result.records), restored)
    return journal


def _fail(message: str, *, logged: bool = False) -> int:
    if logged:
        log.error(message)
    click.echo(f"local-queue-broker: {message}", err=True)
    return EXIT_ERROR


def _daemonize() -> None:
    """Fork once; the parent exits so its spawner can reap it at once."""
    if os.getsid(0) != os.getpid():
        with contextlib.suppress(PermissionError):
            os.setsid()
    if os.fork():
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)


class BadLockFd(Exception):
    """``--lock-fd`` names no descriptor of this socket's lock file."""


def _tell_ready_fd(fd: int, line: str) -> None:
    """A spawner that went away is no reason not to serve."""
    with contextlib.suppress(OSError):
        os.write(fd, line.encode())
    with contextlib.suppress(OSError):
        os.close(fd)


def _hold_lock(path: str, inherited: int | None) -> int | None:
    """The locked lock fd, or None if another broker holds it. An inherited fd must
    be ``<socket>.lock``: one locking anything else would serve beside its holder."""
    if inherited is None:
        fd = open_lock(path)
    else:
        fd = inherited
        try:
            st = os.fstat(fd)
        except OSError as exc:
            message = f"--lock-fd {fd} is not an open file descriptor: {exc.strerror}"
            raise BadLockFd(message) from exc
        if file_identity(lock_path(path)) != (st.st_dev, st.st_ino):
            raise BadLockFd(f"--lock-fd {fd} is not the lock file {lock_path(path)}")
    try:
        locked = try_lock(fd)  # an inherited fd shares its holder's lock: this succeeds
    except OSError as exc:
        os.close(fd)
        raise BadLockFd(f"--lock-fd {fd} cannot be locked with flock: {exc.strerror}") from exc
    if not locked:
        os.close(fd)
        return None
    os.set_inheritable(fd, False)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    # A child forked without exec must not keep a dead broker "alive".
    os.register_at_fork(after_in_child=lambda: os.close(fd))
    return fd


def _setup_logging(path: str, daemon: bool, level: str) -> None:
    if daemon:
        log_file = log_path(path)
        with contextlib.suppress(OSError):
            if os.path.getsize(log_file) > LOG_ROTATE_BYTES:
                os.replace(log_file, log_file + ".old")
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
        fd = os.open(log_file, flags, 0o600)
        os.dup2(fd, 2)
        os.close(fd)
    logging.basicConfig(stream=sys.stderr, level=level.upper(), format=_LOG_FORMAT)


if __name__ == "__main__":  # pragma: no cover
    main()
