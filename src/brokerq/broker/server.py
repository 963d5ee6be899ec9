"""The trio broker: the thin I/O layer around :class:`~brokerq.core.BrokerCore`.

:class:`Broker` owns the listener (a task per connection, see
:mod:`brokerq.connection`), the journal's committer (group commit), the
timer task (lease expiries and delays, from the core's heap) and
housekeeping, which runs once a second:

* compaction, when the journal has grown past twice the live data (also
  checked when the broker starts and when it exits: see :meth:`Broker.serve`);
* idle exit: unlink the socket while still holding the lock, serve the
  backlog briefly, then exit (or publish again if work arrived);
* the self-check: the socket or lock file removed or replaced under the
  broker means another broker may own the path now: exit.

A failed journal write or fsync is fatal: :meth:`Broker.fail` stops the
broker, which exits non-zero, and no further request is acknowledged.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import socket as stdlib_socket
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import trio

from .. import protocol
from ..errors import PermissionDenied
from ..pause import pause
from ..protocol import PROTOCOL_VERSION, Error
from ..spawn import check_peer, file_identity, lock_path, publish_socket
from ..version import __version__
from . import limits
from .connection import Connection, PeerGone, wake, wake_all
from .core import BrokerCore
from .journal import Journal, JournalFailed
from .unixstream import UnixStream

if TYPE_CHECKING:
    import outcome  # trio's

log = logging.getLogger("brokerq.broker")

#: How long an idle-exiting broker keeps serving its backlog after the unlink.
DRAIN_SECONDS: Final = 0.1
#: How long connections get to finish after a stop before they are cut.
STOP_GRACE_SECONDS: Final = 1.0
HOUSEKEEPING_SECONDS: Final = 1.0
#: How long, at most, the event loop waits for a sync's thread to take it up.
SYNC_HANDOFF_SECONDS: Final = 0.001
#: A sync due after another is started once the event loop is about to wait
#: for I/O (nothing else is ready), or after this many passes of a loop that
#: is not.
SYNC_DEFER_PASSES: Final = 4
#: The journal is compacted once it is over twice the live data and this.
COMPACT_MIN_BYTES: Final = 1024 * 1024
#: At start and at exit a compaction is done at once, blocking, when the live
#: data (``BrokerCore.snapshot_size``) is at most this: a write of a few MiB.
#: Past it, one at start runs in a thread while the broker serves, and one
#: at exit is left to the next broker's start.
COMPACT_AT_ONCE_MAX_BYTES: Final = 4 * COMPACT_MIN_BYTES
#: How long a connection refused as busy is kept open for its client to read why.
REFUSE_LINGER_SECONDS: Final = 1.0
#: How many refused connections may linger at once; past that they are closed at once.
REFUSE_LINGER_MAX: Final = 64
#: How often, at most, refusals as busy are logged.
REFUSE_LOG_SECONDS: Final = 60.0


@dataclass(frozen=True)
class BrokerConfig:
    """The broker's options (``local-queue-broker --help`` documents each)."""

    socket_path: str
    idle_exit: float = 300.0
    max_message_size: int = protocol.DEFAULT_MAX_MESSAGE_SIZE
    data_dir: str | None = None
    fsync: str = "batch"
    max_deliveries: int = 20
    lease: float = 30.0
    subscriber_buffer: int = protocol.DEFAULT_SUBSCRIBER_BUFFER
    #: Limits (limits.py): connections at once; seconds for a frame (and for
    #: the hello; inf: none); requests answered before their replies are
    #: written; body bytes of a queue without max_bytes, and of all queues (0: none).
    max_connections: int = limits.DEFAULT_MAX_CONNECTIONS
    frame_timeout: float = limits.DEFAULT_FRAME_TIMEOUT
    max_pipelined: int = limits.DEFAULT_MAX_PIPELINED
    max_queue_bytes: int = limits.DEFAULT_MAX_QUEUE_BYTES
    max_total_bytes: int = limits.default_max_total_bytes()
    #: The listener came from systemd (activation.py): the socket file is not ours.
    activated: bool = False

    @property
    def frame_seconds(self) -> float | None:
        """``frame_timeout`` as it applies: None when off (0 or inf)."""
        timeout = self.frame_timeout
        return None if timeout <= 0 or math.isinf(timeout) else timeout


class Broker:
    """One broker process's serving state: core, journal, connections, timers.

    ``core`` and ``journal`` come already replayed (the daemon does that
    before it says READY); without a journal the broker keeps messages in
    memory only and never idles out while it holds any. ``clock`` is the
    wall clock the core's timers run on (tests pass trio's virtual one).
    """

    log = log

    def __init__(
        self,
        config: BrokerConfig,
        core: BrokerCore | None = None,
        journal: Journal | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.core = core or BrokerCore(
            max_message_size=config.max_message_size,
            max_deliveries=config.max_deliveries,
            default_lease=config.lease,
        )
        self.core.max_queue_bytes = config.max_queue_bytes
        self.core.max_total_bytes = config.max_total_bytes
        self.journal = journal
        if journal is not None:
            self.core.write = journal.append
        self.clock = clock
        self.max_frame_size = protocol.max_frame_size(config.max_message_size)
        #: This process's pid (asked once: getpid is a system call, and a
        #: broker does not fork after it is made).
        self.pid = os.getpid()
        self.connections = 0
        self.accepted_total = 0
        self.busy_total = 0  # connections refused for --max-connections
        self._lingering = 0
        self._busy_logged_at = -math.inf
        self.started_at = 0.0
        self.last_activity = 0.0
        self.closing = False
        self.failure: str | None = None
        self._stop_requested = trio.Event()
        self._live: set[Connection] = set()
        # Group commit (wait_synced): set and replaced as each sync ends; whether
        # one runs in its thread; the journal offset the waiting puts need
        # synced; whether one is due once the loop is idle (and for how many
        # passes it was); whether compaction holds the next one back.
        self._synced = trio.Event()
        self._committing = False
        self._sync_wanted = 0
        self._sync_due = False
        self._sync_due_passes = 0
        self._syncs_held = False
        self._token: trio.lowlevel.TrioToken | None = None
        self._timers_changed = trio.Event()
        self._timer_at = math.inf

    # -- lifecycle ---------------------------------------------------------

    def request_stop(self, why: str) -> None:
        if not self._stop_requested.is_set():
            log.info("stopping: %s", why)
            self._stop_requested.set()

    def fail(self, reason: str) -> None:
        """The journal failed: acknowledge nothing more, stop, exit non-zero."""
        if self.failure is None:
            self.failure = reason
            log.critical("fatal: %s", reason)
        self._synced.set()  # waiting puts wake up and see the failure
        self.request_stop("the journal failed")

    async def serve(
        self,
        listener: stdlib_socket.socket | None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until stopped. ``listener`` None serves no socket (tests use
        :meth:`handle_stream` directly).

        A journal left over twice the live data (by a broker killed before it
        compacted) is compacted first: at once if the live data is small,
        else in a thread from the start. Before an orderly exit it is
        compacted too if the live data is small; so the space of what is
        gone comes back while a broker runs, when it exits, or when the next
        one starts.
        """
        self.started_at = self.last_activity = trio.current_time()
        self._token = trio.lowlevel.current_trio_token()
        if self.journal is None or self.journal.syncs == "never":
            # Nothing is ever synced: no call into the broker on every pass
            # of the event loop (the default beside the socket).
            await self._serve(listener, task_status)
            return
        instrument = _SyncWhenIdle(self)
        trio.lowlevel.add_instrument(instrument)
        try:
            await self._serve(listener, task_status)
        finally:
            with contextlib.suppress(KeyError):  # (gone if it ever raised)
                trio.lowlevel.remove_instrument(instrument)

    async def _serve(
        self, listener: stdlib_socket.socket | None, task_status: trio.TaskStatus[None]
    ) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self._should_compact():
                if self._compact_at_once_is_cheap():
                    self._compact_at_once("at start")
                else:
                    nursery.start_soon(self._compact)
            if listener is not None:
                limits.ensure_fd_limit(self.config.max_connections)
                self._socket_identity = file_identity(self.config.socket_path)
                self._lock_identity = file_identity(lock_path(self.config.socket_path))
                self._listener_scope = await nursery.start(self._accept_loop, listener)
                nursery.start_soon(self._housekeeping)
            nursery.start_soon(self._watch_signals)
            nursery.start_soon(self._run_timers)
            task_status.started()
            await self._stop_requested.wait()
            await self._shut_down(nursery)
        # Nothing is served or appended any more; a sync still running in its
        # thread ends before the journal may be compacted or closed.
        while self._committing:
            await self._synced.wait()
        if self.failure is None and self._should_compact() and self._compact_at_once_is_cheap():
            self._compact_at_once("at exit")

    async def _shut_down(self, nursery: trio.Nursery) -> None:
        """Stop taking work, answer the waiters, give busy connections a grace."""
        self.closing = True
        self._unpublish()
        if hasattr(self, "_listener_scope"):
            self._listener_scope.cancel()
        for waiter in self.core.all_waiters():
            wake(waiter)  # each replies "shutting_down" and closes
        for conn in self._live:
            if conn.idle:
                conn.scope.cancel()
        with trio.move_on_after(STOP_GRACE_SECONDS):
            while self.connections:
                await trio.sleep(0.01)
        for conn in self._live:
            conn.scope.cancel()
        nursery.cancel_scope.cancel()

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                self.request_stop(f"signal {signal.Signals(signum).name}")

    # -- the listening socket ------------------------------------------------

    async def _accept_loop(
        self,
        listener: stdlib_socket.socket,
        *,
        task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        sock = trio.socket.from_stdlib_socket(listener)
        with trio.CancelScope() as scope, sock:
            task_status.started(scope)
            while True:
                try:
                    conn, _ = await sock.accept()
                except OSError as exc:  # EMFILE and friends: pause, don't die
                    log.warning("accept failed: %s", exc)
                    await trio.sleep(0.1)
                    continue
                self.accepted_total += 1
                self._nursery.start_soon(self._handle_socket, conn)

    def start_task(self, fn: Callable[[], Awaitable[object]]) -> None:
        """Run ``fn`` in the broker's nursery (a connection's helper task)."""
        self._nursery.start_soon(fn)

    def start_connection(self, stream: trio.abc.Stream) -> None:
        """Serve ``stream`` as a client connection, in the broker's nursery."""
        self._nursery.start_soon(self.handle_stream, stream)

    def _unpublish(self) -> None:
        """Unlink the socket path, if it is still ours (we hold the lock)."""
        if self.config.activated:
            return  # systemd's socket: it stays, and starts the next broker
        path = self.config.socket_path
        if getattr(self, "_socket_identity", None) and file_identity(path) == self._socket_identity:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self._socket_identity = None

    async def _housekeeping(self) -> None:
        while True:
            await trio.sleep(min(HOUSEKEEPING_SECONDS, max(self.config.idle_exit / 2, 0.01)))
            if self._files_replaced():
                self.request_stop("socket or lock file removed or replaced")
                return
            if self._idle_for() >= self.config.idle_exit:
                await self._try_idle_exit()
            elif self._should_compact():
                self._nursery.start_soon(self._compact)

    def _files_replaced(self) -> bool:
        path = self.config.socket_path
        if self._socket_identity and file_identity(path) != self._socket_identity:
            return True
        return file_identity(lock_path(path)) != self._lock_identity

    def _idle_for(self) -> float:
        """Seconds with no connection (and, without a journal, no message held)."""
        if self.connections or (self.journal is None and self.core.holds_messages()):
            return 0.0
        return trio.current_time() - self.last_activity

    async def _try_idle_exit(self) -> None:
        """Unlink, drain the backlog briefly, then exit, or publish again."""
        log.info("idle for %.1f s: exiting", self._idle_for())
        if self.config.activated:  # systemd starts the next one on the next connection
            self.request_stop("idle exit")
            return
        pause("broker.idle_exit")
        self._unpublish()
        pause("broker.idle_unlinked")
        accepted = self.accepted_total
        await trio.sleep(DRAIN_SECONDS)
        if self.accepted_total == accepted and self._idle_for() >= self.config.idle_exit:
            self.request_stop("idle exit")
            return
        log.info("work arrived while exiting: serving again")
        self._listener_scope.cancel()
        listener = publish_socket(self.config.socket_path)
        self._socket_identity = file_identity(self.config.socket_path)
        self._listener_scope = await self._nursery.start(self._accept_loop, listener)

    # -- one connection --------------------------------------------------------

    async def _handle_socket(self, conn: trio.socket.SocketType) -> None:
        sock = stdlib_socket.socket(fileno=conn.detach())
        stream = UnixStream(sock)
        try:
            check_peer(sock, "the client")
        except (PermissionDenied, OSError) as exc:
            log.warning("refused a connection: %s", exc)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(
                    protocol.encode_frame(Error(id=0, code="permission", message=str(exc)))
                )
            await stream.aclose()
            return
        await self.handle_stream(stream)

    async def handle_stream(self, stream: trio.abc.Stream) -> None:
        """Serve one client connection until it closes."""
        if self.connections >= self.config.max_connections:
            await self._refuse_busy(stream)
            return
        conn = Connection(self, stream)
        self.connections += 1
        self._live.add(conn)
        try:
            with conn.scope:
                await conn.run()
        except PeerGone:
            pass
        except Exception:  # a bug must cost one connection, never the broker
            log.exception("connection failed")
        finally:
            self._live.discard(conn)
            self.connections -= 1
            self.last_activity = trio.current_time()
            with contextlib.suppress(Exception):
                await stream.aclose()

    async def _refuse_busy(self, stream: trio.abc.Stream) -> None:
        """Answer a connection past --max-connections with ``busy``, and close it.

        It lingers a moment (reading and dropping what the client sends)
        so that the client's hello does not hit a closed socket before it
        reads why; a flood of them is closed at once.
        """
        self.busy_total += 1
        now = trio.current_time()
        if now - self._busy_logged_at >= REFUSE_LOG_SECONDS:
            self._busy_logged_at = now
            log.warning(
                "refusing connections: %d are open, the maximum (--max-connections); "
                "%d refused so far",
                self.connections,
                self.busy_total,
            )
        error = Error(
            id=0,
            code="busy",
            message=f"the broker already serves its maximum of {self.config.max_connections} "
            "connections (--max-connections)",
        )
        linger = self._lingering < REFUSE_LINGER_MAX
        self._lingering += int(linger)
        try:
            with (
                trio.move_on_after(REFUSE_LINGER_SECONDS),
                contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
            ):
                await stream.send_all(protocol.encode_frame(error))
                while linger and await stream.receive_some(4096):
                    pass
        finally:
            self._lingering -= int(linger)
            with contextlib.suppress(Exception):
                await stream.aclose()

    def stats(self) -> dict[str, Any]:
        now = trio.current_time()
        journal = self.journal
        return {
            "pid": self.pid,
            "version": __version__,
            "protocol": PROTOCOL_VERSION,
            "uptime_s": now - self.started_at,
            "connections": self.connections,
            "max_message_size": self.config.max_message_size,
            "idle_exit_s": None if math.isinf(self.config.idle_exit) else self.config.idle_exit,
            "max_deliveries": self.core.max_deliveries,
            "lease_s": self.core.default_lease,
            "journal": None if journal is None else journal.path,
            "journal_bytes": 0 if journal is None else journal.size,
            "fsync": None if journal is None else journal.fsync,
            "fsync_skipped_on_tmpfs": journal is not None and journal.in_memory,
            "subscriber_buffer": self.config.subscriber_buffer,
            "max_connections": self.config.max_connections,
            "busy_total": self.busy_total,
            "frame_timeout_s": self.config.frame_seconds,
            "max_pipelined": self.config.max_pipelined,
            "max_queue_bytes": self.config.max_queue_bytes,
            "max_total_bytes": self.config.max_total_bytes,
            "held_bytes": self.core.live_bytes,
            "socket_activated": self.config.activated,
            **self.core.totals(),
            "topics": self.core.topics.stats(),
        }

    # -- the journal: group commit and compaction --------------------------------

    async def wait_synced(self, lsn: int) -> None:
        """Return once the journal is synced up to ``lsn``: group commit.

        The sync (:meth:`Journal.sync`: an fdatasync of a preallocated
        journal) runs in a worker thread, so the broker serves on meanwhile
        (gets, reserves, and more puts: inline, a slow disk would stop every
        connection). One runs at a time, covering what was written when it
        starts. A put that finds none running and none due starts one at
        once (a lone producer waits for nothing else). The puts written
        while one runs are covered by the next, which is due when it ends
        (:meth:`_sync_done`) and starts once the event loop has nothing
        else ready (:meth:`start_due_sync`), so that every put received
        meanwhile is written first: one sync per event-loop turn, as Redis's
        ``appendfsync always`` does. On a tmpfs there is no sync at all
        (``Journal.syncs``).
        """
        journal = self.journal
        assert journal is not None
        self._sync_wanted = max(self._sync_wanted, lsn)
        while journal.synced < lsn:
            if self.failure is not None:
                raise JournalFailed(self.failure)
            if not (self._committing or self._sync_due or self._syncs_held):
                self._start_sync()
            await self._synced.wait()

    def start_due_sync(self, timeout: float) -> None:
        """The event loop is about to wait for I/O for ``timeout`` seconds (0:
        tasks are ready to run): start the sync that is due, if the loop is
        idle or was not for :data:`SYNC_DEFER_PASSES` passes."""
        if not self._sync_due or self._syncs_held or self.failure is not None:
            return
        if timeout <= 0 and self._sync_due_passes < SYNC_DEFER_PASSES:
            self._sync_due_passes += 1
            return
        self._start_sync()

    def _start_sync(self) -> None:
        """Run ``journal.sync`` in a worker thread; :meth:`_sync_done` gets its outcome.

        The event loop waits (tens of microseconds; at most
        :data:`SYNC_HANDOFF_SECONDS`) for the thread to take the job up: the
        thread needs the GIL and a CPU to reach its syscall, and a loop that
        went on running Python would hold both (on two CPUs, a sync started
        beside a loop handling a consumer's request began 150 µs later).
        trio's thread cache is used directly: ``to_thread.run_sync`` adds a
        capacity limiter, cancellation and thread naming that one call in
        flight at a time does not need.
        """
        journal, token = self.journal, self._token
        assert journal is not None
        assert token is not None
        self._sync_due, self._sync_due_passes = False, 0
        self._committing = True
        sync = journal.sync
        taken = threading.Lock()
        taken.acquire()

        def run() -> int:  # in the worker thread
            taken.release()
            return sync()

        def deliver(result: outcome.Outcome[int]) -> None:  # in the worker thread
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(self._sync_done, result)

        try:
            trio.lowlevel.start_thread_soon(run, deliver)
        except Exception as exc:  # no thread could be started, say: as fatal
            self._committing = False
            self.fail(f"could not start a sync: {exc!r}")
            return
        taken.acquire(timeout=SYNC_HANDOFF_SECONDS)

    def _sync_done(self, result: outcome.Outcome[int]) -> None:
        """A sync ended: wake its waiters; the next is due if puts wait for one."""
        journal = self.journal
        assert journal is not None
        self._committing = False
        try:
            result.unwrap()
        except Exception as exc:  # JournalFailed; anything else is as fatal
            self.fail(str(exc) if isinstance(exc, JournalFailed) else f"sync failed: {exc!r}")
            return
        if self._sync_wanted > journal.synced:
            self._sync_due = True
        self._wake_sync_waiters()

    def _wake_sync_waiters(self) -> None:
        done, self._synced = self._synced, trio.Event()
        done.set()

    def _should_compact(self) -> bool:
        journal = self.journal
        return (
            journal is not None
            and not journal.compacting
            and not journal.failed
            and journal.size > COMPACT_MIN_BYTES
            and journal.size > 2 * self.core.snapshot_size()
        )

    async def _compact(self) -> None:
        """Rewrite the journal to the live state, in a thread, appends going on."""
        journal = self.journal
        assert journal is not None
        before = journal.size
        compaction = journal.begin_compaction(self.core.snapshot())
        try:
            await trio.to_thread.run_sync(compaction.write_snapshot)
            # A sync in its thread must not see the swap: hold the next one
            # back (under load one is due whenever one ends) and wait for the
            # one running to end.
            self._syncs_held = True
            while self._committing:
                await self._synced.wait()
            compaction.finish()  # inline: no sync starts until it is done
        except OSError as exc:
            compaction.abandon()
            log.warning("journal compaction failed (the old journal stays): %s", exc)
            return
        except BaseException:  # cancelled: the broker stops, and the old journal stays
            compaction.abandon()
            raise
        finally:
            if self._syncs_held:  # finish synced all that was written: wake the waiters
                self._syncs_held = False
                self._wake_sync_waiters()
        log.info("compacted the journal from %d to %d bytes", before, journal.size)

    def _compact_at_once_is_cheap(self) -> bool:
        return self.core.snapshot_size() <= COMPACT_AT_ONCE_MAX_BYTES

    def _compact_at_once(self, when: str) -> None:
        """Compact now, blocking: only while nothing is served (at start, at exit)."""
        journal = self.journal
        assert journal is not None
        before = journal.size
        try:
            journal.compact(self.core.snapshot())
        except OSError as exc:
            log.warning("journal compaction %s failed (the old journal stays): %s", when, exc)
            return
        log.info("compacted the journal %s from %d to %d bytes", when, before, journal.size)

    # -- timers -------------------------------------------------------------------

    def after_request(self) -> None:
        """After every request: admit parked puts where room was freed, wake
        the joins whose queue's tasks are done, and wake the timer task if
        the request added an earlier timer."""
        if self.core.freed:
            pause("broker.put_room")
            woken = self.core.admit_freed(self.clock())
            if woken:
                pause("broker.put_admitted")
            wake_all(woken)
        wake_all(self.core.joins_done())  # (nothing to do while nobody joins)
        deadline = self.core.next_deadline()
        if deadline is not None and deadline < self._timer_at:
            self._timers_changed.set()

    async def _run_timers(self) -> None:
        while True:
            deadline = self.core.next_deadline()
            self._timer_at = math.inf if deadline is None else deadline
            with trio.move_on_after(max(0.0, self._timer_at - self.clock())):
                await self._timers_changed.wait()
            self._timers_changed = trio.Event()
            try:
                wake_all(self.core.tick(self.clock()))
                wake_all(self.core.admit_freed(self.clock()))
                wake_all(self.core.joins_done())  # expired or dead-lettered messages
            except JournalFailed as exc:
                self.fail(str(exc))


class _SyncWhenIdle(trio.abc.Instrument):
    """Tells the broker each time its event loop is about to wait for I/O."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    def before_io_wait(self, timeout: float) -> None:
        self.broker.start_due_sync(timeout)
