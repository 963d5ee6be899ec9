"""The blocking client's core: lanes, put windows, retries; safe across threads and fork.

Each thread has a lane: a connection opened lazily (so a ``get`` blocked in
one thread never holds up a ``put`` in another), and a put window. A forked
child opens fresh connections. Calls are reentrant (see :class:`_Lane`).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Self, TypeVar

from .. import protocol
from ..errors import BrokerUnavailable, VersionMismatch
from ..pause import pause
from ..spawn import resolve_socket_path
from . import api, calls, prefetch
from .api import Op
from .calls import Call, ConnectionLost
from .sockio import Connection, spin_from_environment, stop_unopened, wait_stopped

R = TypeVar("R", bound=protocol.Reply)
T = TypeVar("T")

#: How many forks this process is from the one that imported this module: a
#: Client made in a parent sees it change in a forked child, where comparing
#: pids would make a getpid system call on every request.
_forks = 0


def _count_fork() -> None:
    global _forks
    _forks += 1


os.register_at_fork(after_in_child=_count_fork)


@dataclass(slots=True, eq=False)
class _Lane:
    """One thread's use of a :class:`Client`: a connection, a put window, and
    whether a call of the thread runs on them (``busy``).

    A call that finds it busy runs inside another call of the thread (from a
    ``__del__``, a signal handler), and must not touch that call's connection
    or window: it takes the first nested lane not busy (:meth:`free`), with a
    connection of its own and no window. The lanes in use are always the
    first of the chain, since their calls nest.
    """

    busy: bool = False
    conn: Connection | None = None
    window: calls.PutWindow | None = None
    inner: _Lane | None = None
    #: The thread's streams (prefetch), by queue, mode and lease; never a nested lane's.
    streams: dict[tuple[str, str, float | None], _Streamed] | None = None

    def free(self) -> _Lane:
        """The first lane of the chain from this one that no call is using."""
        lane = self
        while lane.busy:
            inner = lane.inner
            if inner is None:
                inner = _Lane()
                if lane.inner is None:  # (else a call nested in this one, run meanwhile, made it)
                    lane.inner = inner
                inner = lane.inner
            lane = inner
        return lane


@dataclass(slots=True, eq=False)
class _Streamed:
    """A stream of one thread: its sans-IO state, its connection once open."""

    state: prefetch.Prefetch
    conn: Connection | None = None
    unsupported: bool = False  # the broker does not know consume


class Lanes:
    """The core of a :class:`~brokerq.Client`: per-thread lanes, each with a
    connection and a put window, and the calls run on them."""

    def __init__(
        self,
        socket: str | os.PathLike[str] | None = None,
        timeout: float = calls.DEFAULT_TIMEOUT,
        *,
        put_window: int | None = None,
        prefetch: int | None = None,
    ) -> None:
        self.socket_path = resolve_socket_path(socket)
        self.timeout, self.starts_broker = calls.client_timeout(timeout)
        self.put_window = calls.put_window(put_window)
        self.prefetch = calls.prefetch(prefetch)
        #: The reply spin, in seconds (``$BROKERQ_SPIN_US``, checked here as the others are).
        self.spin = spin_from_environment()
        self._closed = False
        self._reset()

    def _reset(self) -> None:
        self._fork = _forks
        self._local = threading.local()  # .lane: each thread's _Lane
        #: Every connection opened, for close(). No lock guards it: a call
        #: nested in another (a __del__ run by an allocation) could find it
        #: held by its own thread. Appending and popping are atomic.
        self._connections: list[Connection] = []
        self._keys = calls.PutKeys()

    def _lane(self) -> _Lane:
        if _forks != self._fork:
            self._forked()
        try:
            lane: _Lane = self._local.lane
        except AttributeError:
            # (setdefault: a call nested in this one may have made it meanwhile)
            lane = self._local.__dict__.setdefault("lane", _Lane())
        return lane

    def _forked(self) -> None:
        """A forked child must not talk over its parent's sockets. Closing our
        copies sends nothing: the parent's connections live on."""
        stale = self._connections
        self._reset()
        for conn in stale:
            conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<brokerq.Client {self.socket_path!r}{' closed' if self._closed else ''}>"

    def close(self) -> None:
        """Close every connection of this client, after flushing this thread's
        put window (other threads' unflushed puts are dropped, unacknowledged)."""
        try:
            if not self._closed:
                self._flush_window()
        finally:
            self._closed = True
            self._local = threading.local()  # and every thread's lanes and window
            while self._connections:
                self._connections.pop().close()

    def flush(self) -> None:
        """Wait until every put this thread sent in its put window is acknowledged.
        An error reply to one (``Full``, say) is raised here, after the replies
        before it; the puts after it stay in the window for the next flush."""
        if self._closed:
            raise calls.closed_client()
        self._flush_window()

    def _flush_window(self) -> None:
        """Flush this thread's window, unless a call of the thread is using it
        (then the lane taken is a nested one, which has no window)."""
        with self._holding():
            pass

    def send_put(self, call: Call[protocol.PutReply] | Call[protocol.PutManyReply]) -> None:
        """Send a put in this thread's window, first reading replies until a
        slot is free (an error read on the way is raised: this put is not sent)."""
        lane = self._lane()
        if lane.busy:
            made: Call[Any] = call  # (either kind of put)
            self.run(made)
            return
        lane.busy = True
        try:
            window = lane.window
            if window is None:
                window = lane.window = calls.PutWindow(self.timeout)
            began = time.monotonic()
            if len(window.pending) >= self.put_window:
                self._read_window(lane, window, self.put_window - 1, began)
            window.add(call, began)
            self._read_window(lane, window, None, began)
        finally:
            lane.busy = False

    def _read_window(
        self, lane: _Lane, window: calls.PutWindow, keep: int | None, began: float
    ) -> None:
        """Send the window's unsent puts, then read replies until at most ``keep``
        (None: any number) are unacknowledged, resending after a lost connection."""
        while True:
            conn = self._lane_connection(lane)
            try:
                now = time.monotonic()
                data = window.encode_unsent(conn, conn.wire, now)
                if data:
                    deadline = window.send_deadline(now)
                    with conn.exchange(None if deadline is None else deadline - now):
                        conn.send_reading(data, deadline)
                if keep is None or len(window.pending) <= keep:
                    return
                now = time.monotonic()
                deadline = window.reply_deadline(now)
                with conn.exchange(None if deadline is None else deadline - now):
                    reply = conn.read_reply(deadline)
                window.answered(reply, conn.wire, conn.close)
            except ConnectionLost:  # (or a stopping broker's refusal: the put stays)
                if not window.lost(began, time.monotonic()):
                    raise

    def connection(self, *, spawn: bool = True) -> Connection:
        """This thread's connection (its nested calls' inside another of its
        calls), opened (and the broker spawned) on demand."""
        lane = self._lane()
        if lane.busy:
            lane = lane.free()
        conn = lane.conn
        if conn is not None and not conn.closed:
            return conn
        lane.busy = True  # (a call nested in the connect takes a lane of its own)
        try:
            return self._lane_connection(lane, spawn)
        finally:
            lane.busy = False

    def _dial(self, timeout: float | None = None, *, spawn: bool = True) -> Connection:
        """A new connection (within ``timeout``, else the client's)."""
        return Connection(
            self.socket_path,
            self.timeout if timeout is None else timeout,
            spawn=spawn and self.starts_broker,
            spin=self.spin,
        )

    def _lane_connection(self, lane: _Lane, spawn: bool = True) -> Connection:
        """The connection of ``lane`` (held by the caller), opened on demand."""
        conn = lane.conn
        if conn is None or conn.closed:
            if self._closed:
                raise calls.closed_client()
            conn = self._dial(spawn=spawn)
            self._connections.append(conn)
            if self._closed:  # by another thread, or a call nested in this one, meanwhile
                conn.close()
                raise calls.closed_client()
            stale = [c for c in self._connections if c.closed]
            for old in stale:
                with contextlib.suppress(ValueError):
                    self._connections.remove(old)
            lane.conn = conn
        return conn

    def call(
        self,
        expect: type[R],
        kind: type[protocol.Request],
        wait: float | None,
        *,
        retry: bool = True,
        **fields: Any,
    ) -> R:
        """One request on this thread's connection, sent again on a new one
        after a lost connection or a stopping broker's refusal, within
        ``wait`` plus the client's timeout (:class:`~.wire.Attempts`)."""
        return self.run(Call(expect, kind, wait, fields, retry))

    def run(self, call: Call[R]) -> R:
        """:meth:`call`, for a request built by :mod:`.calls`. Flushes this
        thread's put window first: the reply read next is this call's."""
        lane = self._lane()
        if lane.busy:
            lane = lane.free()
        lane.busy = True
        try:  # (inline, not self._holding(): this is every request's path)
            window = lane.window
            if window is not None and window.pending:
                self._read_window(lane, window, 0, time.monotonic())
            attempts = calls.Attempts(call, self.timeout, time.monotonic())
            while True:
                conn = lane.conn
                if conn is None or conn.closed:
                    conn = self._lane_connection(lane)
                limit = attempts.start(time.monotonic())
                try:
                    return conn.request(call.expect, call.kind, limit, **attempts.fields)
                except ConnectionLost as exc:
                    if not attempts.again(time.monotonic(), exc):
                        raise
        finally:
            lane.busy = False

    @contextlib.contextmanager
    def _holding(self) -> Iterator[_Lane]:
        """A lane for one call, as :meth:`run` takes it: the thread's (its
        window flushed), or inside another call a nested one."""
        lane = self._lane()
        if lane.busy:
            lane = lane.free()
        lane.busy = True
        try:
            window = lane.window
            if window is not None and window.pending:
                self._read_window(lane, window, 0, time.monotonic())
            yield lane
        finally:
            lane.busy = False

    def next_keys(self, n: int) -> list[bytes]:
        if _forks != self._fork:
            self._forked()  # a child's keys have a prefix of their own
        return self._keys.take(n)

    def do(self, op: Op[R, T]) -> T:
        return op.result(self.run(op.call))

    @api.like("ping")
    def ping(self) -> float:
        with self._holding() as lane:
            conn = self._lane_connection(lane)  # connecting (or spawning) is not part of the trip
            start = time.perf_counter()
            ping = calls.ping()
            conn.request(ping.expect, ping.kind, self.timeout)
            return time.perf_counter() - start

    @api.like("stop")
    def stop(self) -> bool:
        with self._holding() as lane:
            if lane.conn is not None:
                # A fresh connection: one opened earlier may be to a broker
                # gone since, which would leave the one now serving running.
                lane.conn.close()
            try:
                conn = self._lane_connection(lane, spawn=False)
            except (VersionMismatch, BrokerUnavailable) as exc:
                return stop_unopened(self.socket_path, exc, self.timeout)
            deadline = time.monotonic() + self.timeout
            try:
                stop = calls.stop()
                conn.request(stop.expect, stop.kind, self.timeout)
            except ConnectionLost:
                pass  # it went before it could answer: that is what we asked for
            finally:
                conn.close()
        pause("client.stop_sent")
        wait_stopped(self.socket_path, conn.broker_pid, deadline, self.timeout)
        return True
