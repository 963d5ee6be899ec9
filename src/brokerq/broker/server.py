"""The trio broker: :class:`BrokerBase` with the listener, a task per
connection, and housekeeping: compaction; idle exit (unlink the socket while
still holding the lock, serve the backlog briefly, then exit); and exit if
the socket or lock file is replaced (another broker may own the path).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import socket as stdlib_socket
from typing import Final

import trio

from .. import protocol
from ..errors import PermissionDenied
from ..pause import pause
from ..protocol import Error
from ..spawn import check_peer, file_identity, lock_path, publish_socket
from .broker_base import COMPACT_AT_ONCE_MAX_BYTES, COMPACT_MIN_BYTES, BrokerBase, SyncWhenIdle, log
from .config import STOP_SIGNALS, BrokerConfig
from .connection import Connection
from .core import limits
from .unixstream import UnixStream
from .wakeup import STREAM_GONE, PeerGone, wake

__all__ = ["COMPACT_AT_ONCE_MAX_BYTES", "COMPACT_MIN_BYTES", "Broker", "BrokerConfig"]

DRAIN_SECONDS: Final = 0.1  # an idle-exiting broker serves its backlog after the unlink
STOP_GRACE_SECONDS: Final = 1.0  # for connections to finish after a stop
HOUSEKEEPING_SECONDS: Final = 1.0
#: A busy refusal lingers for its client to read why; so many at once; logged so often.
REFUSE_LINGER_SECONDS: Final = 1.0
REFUSE_LINGER_MAX: Final = 64
REFUSE_LOG_SECONDS: Final = 60.0


class Broker(BrokerBase):
    # BrokerBase's __init__ is Broker's: these start as class-wide values, and
    # the set of live connections is made by serve, which all that uses it runs under.
    _live: set[Connection]
    accepted_total = 0
    last_activity = 0.0
    _lingering = 0  # connections refused as busy, lingering
    _busy_logged_at = -math.inf

    async def serve(
        self,
        listener: stdlib_socket.socket | None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until stopped (``listener`` None: tests use :meth:`handle_stream`)."""
        self._live = set()
        self.started_at = self.last_activity = trio.current_time()
        self._token = trio.lowlevel.current_trio_token()
        if self.journal is None or self.journal.syncs == "never":
            # Nothing is ever synced: no instrument called on every pass of the loop.
            await self._serve(listener, task_status)
            return
        instrument = SyncWhenIdle(self)
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
            if self._should_compact() and not self._compact_at_once("at start"):
                nursery.start_soon(self._compact)
            await nursery.start(self._watch_signals)  # before any client is answered
            if listener is not None:
                limits.ensure_fd_limit(self.config.max_connections)
                self._socket_identity = file_identity(self.config.socket_path)
                self._lock_identity = file_identity(lock_path(self.config.socket_path))
                self._listener_scope = await nursery.start(self._accept_loop, listener)
                nursery.start_soon(self._housekeeping)
            nursery.start_soon(self._run_timers)
            task_status.started()
            await self._stop_requested.wait()
            await self._shut_down(nursery)
        # A sync still running in its thread ends before the journal is compacted or closed.
        while self._committing:
            await self._synced.wait()
        if self.failure is None and self._should_compact():
            self._compact_at_once("at exit")

    async def _shut_down(self, nursery: trio.Nursery) -> None:
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

    async def _watch_signals(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
            # Blocked by the daemon since it took the lock (or by whoever spawned
            # us): one that came meanwhile is delivered now, to this receiver.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
            task_status.started()
            async for signum in signals:
                self.request_stop(f"signal {signal.Signals(signum).name}")

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

    def start_connection(self, stream: trio.abc.Stream) -> None:
        self._nursery.start_soon(self.handle_stream, stream)

    def _unpublish(self) -> None:
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
            path = self.config.socket_path
            socket_replaced = self._socket_identity and file_identity(path) != self._socket_identity
            if socket_replaced or file_identity(lock_path(path)) != self._lock_identity:
                self.request_stop("socket or lock file removed or replaced")
                return
            if self._idle_for() >= self.config.idle_exit:
                await self._try_idle_exit()
            elif self._should_compact():
                self._nursery.start_soon(self._compact)

    def _idle_for(self) -> float:
        if self.connections or (self.journal is None and self.core.holds_messages()):
            return 0.0
        return trio.current_time() - self.last_activity

    async def _try_idle_exit(self) -> None:
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

    async def _handle_socket(self, conn: trio.socket.SocketType) -> None:
        sock = stdlib_socket.socket(fileno=conn.detach())
        stream = UnixStream(sock)
        try:
            check_peer(sock, "the client")
        except (PermissionDenied, OSError) as exc:
            log.warning("refused a connection: %s", exc)
            error = Error(id=0, code="permission", message=str(exc))
            with contextlib.suppress(*STREAM_GONE):
                await stream.send_all(protocol.encode_frame(error))
            await stream.aclose()
            return
        await self.handle_stream(stream)

    async def handle_stream(self, stream: trio.abc.Stream) -> None:
        if self.connections >= self.config.max_connections:
            await self._refuse_busy(stream)
            return
        conn = Connection(self, stream)
        self.connections += 1
        self._live.add(conn)
        try:
            with conn.scope, contextlib.suppress(PeerGone):
                await conn.run()
        except Exception:  # a bug must cost one connection, never the broker
            log.exception("connection failed")
        finally:
            self._live.discard(conn)
            self.connections -= 1
            self.last_activity = trio.current_time()
            with contextlib.suppress(Exception):
                await stream.aclose()

    async def _refuse_busy(self, stream: trio.abc.Stream) -> None:
        """Answer ``busy``, and linger a moment (reading and dropping what the client
        sends) so that its hello does not hit a closed socket before it reads why."""
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
        message = (
            f"the broker already serves its maximum of {self.config.max_connections} "
            "connections (--max-connections)"
        )
        error = Error(id=0, code="busy", message=message)
        linger = self._lingering < REFUSE_LINGER_MAX
        self._lingering += int(linger)
        try:
            with trio.move_on_after(REFUSE_LINGER_SECONDS), contextlib.suppress(*STREAM_GONE):
                await stream.send_all(protocol.encode_frame(error))
                while linger and await stream.receive_some(4096):
                    pass
        finally:
            self._lingering -= int(linger)
            with contextlib.suppress(Exception):
                await stream.aclose()
