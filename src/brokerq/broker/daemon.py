"""``local-queue-broker``: the broker process, from its options to READY.

Start-up order is what makes spawning race-free and fast (design.md §3):

1. check the socket directory (0700, ours, not a symlink);
2. daemonize if a client spawned us (fork; the launcher exits at once so
   the client reaps it, and the broker is nobody's zombie);
3. hold the lock: a spawned broker inherits it already taken, one started by
   hand takes it without blocking or exits 1 naming the holder's pid;
4. bind a temporary name, listen, rename it over the socket path;
5. say ``READY <pid>`` on the pipe the spawner gave us;
6. only now import trio and serve. Clients that connect meanwhile wait in
   the listen backlog, not in a retry loop.
"""

from __future__ import annotations

import contextlib
import logging
import os
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
from . import limits
from .activation import inherited_listener
from .core import BrokerCore
from .journal import Journal, journal_path

EXIT_OK = 0
EXIT_ERROR = 1  # includes "another broker already holds the lock"
LOG_ROTATE_BYTES = 1024 * 1024

F = TypeVar("F", bound=Callable[..., Any])


def broker_options(f: F) -> F:
    """The options every broker command shares, each also read from BROKERQ_*."""
    options = [
        click.option(
            "--data-dir",
            type=click.Path(file_okay=False),
            envvar="BROKERQ_DATA_DIR",
            show_envvar=True,
            help="Directory for the journal, on a disk to survive reboots "
            "(default: beside the socket, which survives broker crashes and idle exits).",
        ),
        click.option(
            "--fsync",
            type=click.Choice(["never", "batch", "always"]),
            envvar="BROKERQ_FSYNC",
            show_envvar=True,
            help="When the journal is fsynced before a put is acknowledged: never (survives "
            "a broker crash, not an OS crash or power loss), batch (one fsync covers every "
            "put that arrived meanwhile) or always (one per write). Default: never for the "
            "journal beside the socket (it survives what that place does), batch with "
            "--data-dir.",
        ),
        click.option(
            "--journal/--no-journal",
            default=True,
            show_default=True,
            envvar="BROKERQ_JOURNAL",
            show_envvar=True,
            help="Keep messages in a journal (--no-journal: in memory only, lost when the "
            "broker stops; it then never idles out while it holds any).",
        ),
        click.option(
            "--repair",
            is_flag=True,
            envvar="BROKERQ_REPAIR",
            show_envvar=True,
            help="Truncate a journal corrupt in the middle at the bad record, losing what "
            "follows, instead of refusing to start.",
        ),
        click.option(
            "--max-deliveries",
            type=click.IntRange(min=1),
            default=20,
            show_default=True,
            envvar="BROKERQ_MAX_DELIVERIES",
            show_envvar=True,
            metavar="N",
            help="Deliveries of a reserved message without an ack before it moves to "
            "<queue>:dead (queues may set their own).",
        ),
        click.option(
            "--lease",
            type=click.FloatRange(min=0, min_open=True),
            default=30.0,
            show_default=True,
            envvar="BROKERQ_LEASE",
            show_envvar=True,
            metavar="SECONDS",
            help="Default lease of a reserved message before it is delivered again.",
        ),
        click.option(
            "--idle-exit",
            type=click.FloatRange(min=0),
            default=300.0,
            show_default=True,
            envvar="BROKERQ_IDLE_EXIT",
            show_envvar=True,
            metavar="SECONDS",
            help="Exit after this long with no connections (0: never). Messages wait in "
            "the journal for the next broker; with --no-journal it never exits holding any.",
        ),
        click.option(
            "--max-message-size",
            type=click.IntRange(min=1),
            default=protocol.DEFAULT_MAX_MESSAGE_SIZE,
            show_default=True,
            envvar="BROKERQ_MAX_MESSAGE_SIZE",
            show_envvar=True,
            metavar="BYTES",
            help="Largest message body accepted.",
        ),
        click.option(
            "--subscriber-buffer",
            type=click.IntRange(min=1),
            default=protocol.DEFAULT_SUBSCRIBER_BUFFER,
            show_default=True,
            envvar="BROKERQ_SUBSCRIBER_BUFFER",
            show_envvar=True,
            metavar="BYTES",
            help="Publishes held for one live subscriber that reads too slowly; past "
            "this it is dropped with an 'overflow' error (one publish always fits).",
        ),
        click.option(
            "--max-connections",
            type=click.IntRange(min=1),
            default=limits.DEFAULT_MAX_CONNECTIONS,
            show_default=True,
            envvar="BROKERQ_MAX_CONNECTIONS",
            show_envvar=True,
            metavar="N",
            help="Connections served at once; one more is answered 'busy' and closed.",
        ),
        click.option(
            "--frame-timeout",
            type=click.FloatRange(min=0),
            default=limits.DEFAULT_FRAME_TIMEOUT,
            show_default=True,
            envvar="BROKERQ_FRAME_TIMEOUT",
            show_envvar=True,
            metavar="SECONDS",
            help="A connection whose frame is not complete this long after its first "
            "byte, or whose hello is not within this long of connecting, is closed "
            "(0: never). Idle connections between frames are never closed.",
        ),
        click.option(
            "--max-pipelined",
            type=click.IntRange(min=1),
            default=limits.DEFAULT_MAX_PIPELINED,
            show_default=True,
            envvar="BROKERQ_MAX_PIPELINED",
            show_envvar=True,
            metavar="N",
            help="Requests of one connection answered before their replies are written "
            "(and at most 1 MiB of replies); nothing more is read from it until they are.",
        ),
        click.option(
            "--max-queue-bytes",
            type=click.IntRange(min=0),
            default=limits.DEFAULT_MAX_QUEUE_BYTES,
            show_default=True,
            envvar="BROKERQ_MAX_QUEUE_BYTES",
            show_envvar=True,
            metavar="BYTES",
            help="Body bytes a queue without a max_bytes of its own may hold; puts wait "
            "for room as on any bounded queue (0: unlimited).",
        ),
        click.option(
            "--max-total-bytes",
            type=click.IntRange(min=0),
            default=limits.default_max_total_bytes(),
            show_default=True,
            envvar="BROKERQ_MAX_TOTAL_BYTES",
            show_envvar=True,
            metavar="BYTES",
            help="Body bytes held over all queues; a put past it fails with 'full' "
            "(default: 1 GiB, or a quarter of the RAM if less; 0: unlimited).",
        ),
        click.option(
            "--log-level",
            type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
            default="info",
            show_default=True,
            envvar="BROKERQ_LOG_LEVEL",
            show_envvar=True,
            help="Least severe log level written.",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("socket", required=False, envvar="BROKERQ_SOCKET")
@broker_options
@click.option(
    "--daemon",
    is_flag=True,
    help="Fork into the background, the parent exiting at once (as clients spawn it).",
)
@click.option(
    "--lock-fd",
    type=int,
    metavar="FD",
    help="Inherited descriptor of SOCKET.lock, already flock-ed by the spawner "
    "(docs/protocol.md 10.4). Without it the broker takes the lock itself.",
)
@click.option(
    "--ready-fd",
    type=int,
    metavar="FD",
    help="Inherited pipe (or any byte stream): 'READY <pid>' is written to it once "
    "the socket listens, 'BUSY <pid>' if another broker holds the lock; then closed.",
)
def main(
    socket: str | None,
    daemon: bool,
    lock_fd: int | None,
    ready_fd: int | None,
    **options: Any,
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
    data_dir: str | None = None,
    fsync: str | None = None,
    idle_exit: float = 300.0,
    max_message_size: int = protocol.DEFAULT_MAX_MESSAGE_SIZE,
    log_level: str = "info",
    journal: bool = True,
    repair: bool = False,
    max_deliveries: int = 20,
    lease: float = 30.0,
    subscriber_buffer: int = protocol.DEFAULT_SUBSCRIBER_BUFFER,
    max_connections: int = limits.DEFAULT_MAX_CONNECTIONS,
    frame_timeout: float = limits.DEFAULT_FRAME_TIMEOUT,
    max_pipelined: int = limits.DEFAULT_MAX_PIPELINED,
    max_queue_bytes: int = limits.DEFAULT_MAX_QUEUE_BYTES,
    max_total_bytes: int | None = None,
) -> int:
    """Start a broker for ``socket``; returns the exit status."""
    path = resolve_socket_path(socket)
    fsync = default_fsync(data_dir) if fsync is None else fsync
    try:
        check_socket_path(path)
        activated = inherited_listener(path)  # before a fork changes our pid
    except BrokerqError as exc:
        return _fail(str(exc))
    if activated is not None and daemon:
        return _fail("--daemon cannot be used with a socket passed by systemd")
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
            # A spawner that could not take the lock itself (protocol.md
            # 10.3, without flock) reads this as "another broker won: connect
            # again", where end of file would mean "failed to start".
            _tell_ready_fd(ready_fd, f"BUSY {holder or 0}\n")
        who = f"pid {holder}" if holder else "starting up"
        return _fail(f"another broker ({who}) already serves {path}")
    pause("broker.locked")
    _setup_logging(path, daemon, log_level)
    log = logging.getLogger("brokerq.broker")
    core = BrokerCore(
        max_message_size=max_message_size, max_deliveries=max_deliveries, default_lease=lease
    )
    opened = None
    if journal:
        try:
            opened = _open_journal(core, journal_path(path, data_dir), fsync, repair, data_dir)
        except (OSError, BrokerqError) as exc:
            log.error("cannot open the journal: %s", exc)
            return _fail(f"cannot open the journal: {exc}")
    try:
        listener = activated or publish_socket(path)
    except (OSError, BrokerqError) as exc:
        log.error("cannot listen on %s: %s", path, exc)
        return _fail(f"cannot listen on {path}: {exc}")
    log.info("serving %s (pid %d)", path, os.getpid())
    pause("broker.before_ready")
    if ready_fd is not None:
        _tell_ready_fd(ready_fd, f"READY {os.getpid()}\n")

    # Import trio only now: clients are already queueing in the backlog.
    import trio

    from .server import Broker, BrokerConfig

    config = BrokerConfig(
        socket_path=path,
        idle_exit=idle_exit if idle_exit > 0 else float("inf"),
        max_message_size=max_message_size,
        data_dir=data_dir,
        fsync=fsync,
        max_deliveries=max_deliveries,
        lease=lease,
        subscriber_buffer=subscriber_buffer,
        max_connections=max_connections,
        frame_timeout=frame_timeout,  # 0: off (BrokerConfig.frame_seconds)
        max_pipelined=max_pipelined,
        max_queue_bytes=max_queue_bytes,
        max_total_bytes=(
            limits.default_max_total_bytes() if max_total_bytes is None else max_total_bytes
        ),
        activated=activated is not None,
    )
    broker = Broker(config, core, opened)
    trio.run(broker.serve, listener)
    if opened is not None:
        opened.close()
    if broker.failure:
        log.critical("exited after a journal failure: %s", broker.failure)
        return EXIT_ERROR
    log.info("exited")
    return EXIT_OK


def default_fsync(data_dir: str | None) -> str:
    """The ``--fsync`` a broker gets when none is given.

    ``never`` for the journal beside the socket: that place (a tmpfs under
    ``$XDG_RUNTIME_DIR``, usually) is documented to survive broker crashes
    and idle exits, not reboots, and a record written before the reply
    already survives a broker crash (docs/guarantees.md). An fsync per
    group of puts would buy what the place cannot keep. ``batch`` with
    ``--data-dir``, which is asked for to survive OS crashes and power
    loss: every acknowledged put then waits for an fsync that covers it.
    """
    return "never" if data_dir is None else "batch"


def _open_journal(
    core: BrokerCore, path: str, fsync: str, repair: bool, data_dir: str | None
) -> Journal:
    """Open the journal and replay it into ``core``."""
    if data_dir is not None:
        os.makedirs(data_dir, mode=0o700, exist_ok=True)
    journal, result = Journal.open(path, fsync, repair=repair, preallocate=True)
    for record in result.records:
        core.apply(record)
    restored = core.finish_replay(time.time())
    logging.getLogger("brokerq.broker").info(
        "journal %s: %d records, %d messages restored", path, len(result.records), restored
    )
    return journal


def _fail(message: str) -> int:
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
    """Write ``line`` to the spawner's ready pipe and close it (a spawner
    that went away is no reason not to serve)."""
    with contextlib.suppress(OSError):
        os.write(fd, line.encode())
    with contextlib.suppress(OSError):
        os.close(fd)


def _hold_lock(path: str, inherited: int | None) -> int | None:
    """The locked lock fd, kept (close-on-exec) for the broker's whole life;
    None if another broker holds the lock.

    An inherited fd must be ``<socket>.lock`` itself: a broker holding a
    lock on anything else would serve beside the real lock holder. Raises
    BadLockFd if it is not (or is not open, or cannot be locked)."""
    if inherited is None:
        fd = open_lock(path)
    else:
        fd = inherited
        _check_lock_fd(fd, path)
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


def _check_lock_fd(fd: int, path: str) -> None:
    """Raise BadLockFd unless ``fd`` is an open descriptor of ``<path>.lock``."""
    where = lock_path(path)
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise BadLockFd(f"--lock-fd {fd} is not an open file descriptor: {exc.strerror}") from exc
    if file_identity(where) != (st.st_dev, st.st_ino):
        raise BadLockFd(f"--lock-fd {fd} is not the lock file {where}")


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
    logging.basicConfig(
        stream=sys.stderr,
        level=level.upper(),
        format="%(asctime)s brokerq[%(process)d] %(levelname)s %(message)s",
    )


if __name__ == "__main__":  # pragma: no cover
    main()
