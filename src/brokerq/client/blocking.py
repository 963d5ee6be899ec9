"""The blocking client: plain sockets, no trio, safe across threads and fork.

A :class:`Client` names a broker by its socket path and opens connections
lazily, one per thread, so a ``get`` blocked in one thread never holds up a
``put`` in another (as with :class:`queue.Queue`). After ``os.fork()`` the
child opens fresh connections instead of sharing its parent's sockets.

Timeouts follow the stdlib :mod:`queue` contract: ``timeout=None`` waits
for ever, ``0`` is the ``_nowait`` form, and running out raises
:class:`~brokerq.Empty`. The socket's own deadline is derived from the
request's: the broker has the request's timeout to answer, plus the
client's ``timeout`` (the connect/spawn deadline) as a grace for the reply.

With a ``put_window`` of N, a put is sent without waiting for its reply
(up to N per thread unread), and the replies are read by :meth:`Client.flush`,
by the put that finds the window full, or by any other request of the
thread, which flushes first (see docs/usage.md, "Pipelined puts").

Calls are reentrant, as ``queue.SimpleQueue.put`` is: a call made while
the same thread is inside another one (from a ``__del__`` the garbage
collector runs, or a signal handler) never touches the connection or the
put window of the call it interrupted. Each thread has a :class:`_Lane`:
its connection, its window, and whether a call runs on them; a call that
finds it in use takes the lane nested in it, with a connection of its own
(opened once, kept for the next such call), and no window: it is sent and
answered at once.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from .. import protocol
from ..errors import (
    BrokerqError,
    BrokerUnavailable,
    Empty,
    LeaseLost,
    LocalProtocolError,
    RemoteProtocolError,
    VersionMismatch,
)
from ..pause import pause
from ..spawn import (
    broker_running,
    connect_or_spawn,
    lock_holder_pid,
    resolve_socket_path,
    still_running,
)
from . import calls, prefetch
from .calls import Body, BrokerStopping, Call, ConnectionLost
from .sockio import Spinner, spin_from_environment

__all__ = [
    "Body",
    "Client",
    "Connection",
    "ConnectionLost",
    "Message",
    "Queue",
    "Subscription",
    "connect",
]

R = TypeVar("R", bound=protocol.Reply)

DEFAULT_TIMEOUT = calls.DEFAULT_TIMEOUT

#: How many forks this process is from the one that imported this module: a
#: Client made in a parent sees it change in a forked child, where comparing
#: pids would make a getpid system call on every request.
_forks = 0


def _count_fork() -> None:
    global _forks
    _forks += 1


os.register_at_fork(after_in_child=_count_fork)


class Connection:
    """One socket to the broker, greeted, used by one thread at a time."""

    def __init__(
        self, socket_path: str, timeout: float, *, spawn: bool = True, spin: float | None = None
    ) -> None:
        """``spin``: the reply spin in seconds (None: ``$BROKERQ_SPIN_US``, sockio)."""
        spin = spin_from_environment() if spin is None else spin
        deadline = time.monotonic() + timeout
        self.socket_path = socket_path
        self.pid = os.getpid()
        while True:
            try:
                self.sock = connect_or_spawn(socket_path, deadline, spawn=spawn)
            except OSError as exc:
                raise calls.unreachable(socket_path, exc) from exc
            self.closed = False
            self.wire = calls.Wire(socket_path)
            self.io = Spinner(self.sock, spin)
            hello = calls.hello()
            try:
                reply = self.request(
                    hello.expect, hello.kind, deadline - time.monotonic(), **hello.fields
                )
                break
            except ConnectionLost:
                # A broker that died (or idled out) just after accepting us:
                # connect again, which finds or starts the next one.
                if time.monotonic() >= deadline:
                    raise
            except VersionMismatch as exc:
                self.close()
                # An upgrade: the broker still running is older than this
                # client. Ask it to finish and exit; the next one is ours.
                # (Without spawn, stop() retires it without starting another.)
                older = calls.broker_to_retire(socket_path, exc, may_retire=spawn)
                retire_older_broker(socket_path, older, deadline)
            except BaseException:
                self.close()
                raise
        self.wire.greeted(reply)
        self.broker_pid = reply.pid
        self.server = reply.server
        self.max_message_size = reply.max_message_size

    def close(self) -> None:
        self.closed = True
        self.sock.close()

    def request(
        self, expect: type[R], kind: type[protocol.Request], wait: float | None, **fields: Any
    ) -> R:
        """Send one request and return its reply (of type ``expect``).

        ``wait`` bounds the whole exchange (None: no bound). A broken or
        timed-out connection is closed and raises BrokerUnavailable; an
        error reply raises the matching :class:`~brokerq.BrokerqError`.
        """
        request_id = self.wire.encode(kind, fields)
        deadline = None if wait is None else time.monotonic() + wait
        try:  # (inline, not self.exchange: a generator per request costs a microsecond)
            self.io.send_all(self.wire.out, deadline)
            reply = self.read_reply(deadline)
        except BaseException as exc:
            raise self._interrupted(exc, wait)  # noqa: B904 (its cause is set)
        return self.wire.check(expect, request_id, reply, self.close)

    @contextlib.contextmanager
    def exchange(self, wait: float | None) -> Iterator[None]:
        """Around socket I/O, as in :meth:`request` (see :meth:`_interrupted`)."""
        try:
            yield
        except BaseException as exc:
            raise self._interrupted(exc, wait)  # noqa: B904 (its cause is set)

    def _interrupted(self, exc: BaseException, wait: float | None) -> BaseException:
        """An exchange was interrupted by ``exc``: close the connection, whose
        replies would be out of step from then on, and return what to raise:
        BrokerUnavailable for a timeout, ConnectionLost for a broken socket,
        else ``exc`` itself; but RemoteProtocolError, never retried, if
        another request on this connection found it out of step (and
        closed it) meanwhile."""
        self.close()
        if isinstance(exc, RemoteProtocolError) and self.wire.failure is None:
            self.wire.failure = exc  # a frame that cannot be read: out of step too
        out_of_step = self.wire.out_of_step()
        if out_of_step is not None and isinstance(exc, OSError | ValueError):
            error: BaseException = out_of_step
        elif isinstance(exc, TimeoutError):
            error = self.wire.timed_out(wait)
        elif isinstance(exc, OSError):
            error = self.wire.lost(exc)
        else:
            return exc
        error.__cause__ = exc
        return error

    def read_reply(self, deadline: float | None) -> protocol.AnyReply:
        """The next reply, received by ``deadline`` (else TimeoutError)."""
        while True:
            reply = self.wire.next_reply()
            if reply is not None:
                return reply
            self.wire.feed(self.io.receive(deadline))

    def send_reading(self, data: bytes | bytearray, deadline: float | None) -> None:
        """Send all of ``data`` by ``deadline``, taking in whatever the broker
        sends meanwhile (replies to earlier requests, left in :attr:`wire`
        to be read in order). A client that pipelines must: a broker whose
        replies are not read stops reading, and both would wait for ever."""
        self.io.send_all(data, deadline, self.wire.feed)


def retire_older_broker(socket_path: str, version: int, deadline: float) -> None:
    """Ask the broker at ``socket_path``, which speaks the older protocol
    ``version``, to stop (it answers its clients, syncs its journal and
    exits), and wait until it holds its lock no more (:func:`still_running`)."""
    start = time.monotonic()
    try:
        sock = connect_or_spawn(socket_path, deadline, spawn=False)
    except OSError as exc:
        raise calls.unreachable(socket_path, exc) from exc
    pid = lock_holder_pid(socket_path)  # (it serves: the pid is its own)
    with sock, contextlib.suppress(OSError):
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        sock.sendall(calls.retirement(version))
        while sock.recv(65536):
            pass  # its replies, then the end of the connection as it stops
    while still_running(socket_path, pid):
        if time.monotonic() > deadline:
            raise calls.not_stopped(socket_path, deadline - start)
        time.sleep(0.005)


class _Lane:
    """One thread's use of a :class:`Client`: a connection, a put window, and
    whether a call of the thread runs on them (``busy``).

    A call that finds the thread's lane busy runs inside another call of
    the thread (from a ``__del__``, a signal handler): it takes the first
    lane nested in it that is not (:meth:`free`), with a connection of its
    own, opened on first use and kept for the next such call, and no window.
    The lanes in use are always the first of the chain, since their calls nest.
    """

    __slots__ = ("busy", "conn", "inner", "streams", "window")

    def __init__(self) -> None:
        self.busy = False
        self.conn: Connection | None = None
        self.window: calls.PutWindow | None = None
        self.inner: _Lane | None = None
        #: The thread's streams (prefetch), by queue, mode and lease; never a nested lane's.
        self.streams: dict[tuple[str, str, float | None], _Streamed] | None = None

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


class Client:
    """A broker, named by its socket path; spawned on first use if needed.

    ``timeout`` is the deadline for connecting (and spawning a broker), and
    the grace a reply gets beyond its request's own timeout.

    ``put_window`` (None: ``$BROKERQ_PUT_WINDOW``, else 0): with N > 0,
    :meth:`Queue.put` sends its put and returns 0 without waiting for the
    reply, as long as fewer than N of this thread's puts are unacknowledged;
    :meth:`flush` (or any other request of the thread, or :meth:`close`)
    reads their replies. See docs/usage.md, "Pipelined puts".

    ``prefetch`` (None: ``$BROKERQ_PREFETCH``, else 0): with N > 0, the
    first :meth:`Queue.get` (``get_many``, ``reserve``) of a queue in a
    thread opens a stream on a connection of its own, and the broker sends
    the thread up to N of the queue's messages ahead, as they arrive. See
    docs/usage.md, "Prefetching consumers".
    """

    def __init__(
        self,
        socket: str | os.PathLike[str] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        *,
        put_window: int | None = None,
        prefetch: int | None = None,
    ) -> None:
        self.socket_path = resolve_socket_path(socket)
        self.timeout, self.starts_broker = calls.client_timeout(timeout)
        self.put_window = calls.put_window(put_window)
        self.prefetch = calls.prefetch(prefetch)
        #: How long a connection spins for a reply before it sleeps, in
        #: seconds (``$BROKERQ_SPIN_US``, checked here as the others are).
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
        """This thread's lane (in a forked child, after forgetting the parent's)."""
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
        copies sends nothing, so the parent's connections live on; its
        windows and put keys are the parent's too."""
        stale = self._connections
        self._reset()
        for conn in stale:
            conn.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<brokerq.Client {self.socket_path!r}{' closed' if self._closed else ''}>"

    def close(self) -> None:
        """Close every connection of this client; using it afterwards raises.

        First flushes this thread's put window (:meth:`flush`); if that
        raises, the connections are closed all the same and the error
        propagates. Puts other threads left unflushed are dropped with
        their connections, unacknowledged. Inside another call of this
        thread (a ``__del__``, a signal handler) it flushes nothing (the
        window is that call's), and that call fails: the client is closed.
        """
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

        Reads the reply of each, in order; once it returns, they hold as
        puts that returned do (durable per ``--fsync``, surviving a broker
        crash). An error reply to one of them (``Full``, say) is raised
        here, after the replies before it; the puts after it were still
        made, and stay in the window for the next flush. A lost connection
        sends the unacknowledged puts again, same keys, in order, on a new
        one, within the client's ``timeout``. Nothing to do without a
        window (``put_window`` 0), or inside another call of this thread (a
        ``__del__``, a signal handler): the puts of such a call are never
        windowed, and the window is the interrupted call's to read.
        """
        if self._closed:
            raise calls.closed_client()
        self._flush_window()

    def _flush_window(self) -> None:
        """Flush this thread's window, if it holds anything and no call of
        the thread is using it."""
        lane = self._lane()
        window = lane.window
        if window is not None and window.pending and not lane.busy:
            lane.busy = True
            try:
                self._read_window(lane, window, 0, time.monotonic())
            finally:
                lane.busy = False

    def send_put(self, call: Call[protocol.PutReply] | Call[protocol.PutManyReply]) -> None:
        """Send a put in this thread's window, without reading its reply;
        first, if the window is full, read replies until a put's slot is free
        (raising an error reply read on the way: this put is then not sent).

        Inside another call of this thread, it goes around the window: it is
        made at once (:meth:`run`) on a connection of its own, acknowledged
        (or raising its error) when this returns."""
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
        """Send the window's puts not yet sent on the connection of ``lane``
        (which the caller holds), then (unless ``keep`` is None) read replies
        until ``keep`` puts at most are unacknowledged. After a lost
        connection, every unacknowledged put is sent again on a new one
        (Attempts decides until when); an error reply is raised once its
        put has left the window."""
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
        """This thread's connection, opened (and the broker spawned) on demand;
        inside another call of the thread, the one its nested calls use."""
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

    def _lane_connection(self, lane: _Lane, spawn: bool = True) -> Connection:
        """The connection of ``lane``, which the caller holds, opened on demand."""
        conn = lane.conn
        if conn is None or conn.closed:
            if self._closed:
                raise calls.closed_client()
            conn = Connection(
                self.socket_path, self.timeout, spawn=spawn and self.starts_broker, spin=self.spin
            )
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
        """One request on this thread's connection, retried if the broker dies
        or stops.

        ``wait`` is how long the broker may take by the request's own terms
        (a get's timeout; 0 for requests that never wait); the reply gets
        the client's ``timeout`` on top. If the connection is lost before
        the reply, or a stopping broker refuses the request (it was not
        carried out), the request is sent again on a new connection (which
        waits for a stopping broker to exit, and starts a new broker if
        needed) until that deadline passes: puts
        carry a key, so a retried put is never enqueued twice; a retried
        get or reserve asks again with what is left of its timeout.
        """
        return self.run(Call(expect, kind, wait, fields, retry))

    def run(self, call: Call[R]) -> R:
        """:meth:`call`, for a request built by :mod:`brokerq.calls`.

        Flushes this thread's put window first: the reply read next is this
        call's. Inside another call of this thread (a ``__del__``, a signal
        handler), it runs on a nested lane: another connection, no window."""
        lane = self._lane()
        if lane.busy:
            lane = lane.free()
        lane.busy = True
        try:  # (inline, not self._take(): this is every request's path)
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
                    refused = isinstance(exc, BrokerStopping)
                    if not attempts.again(time.monotonic(), refused=refused):
                        raise
        finally:
            lane.busy = False

    def _take(self) -> _Lane:
        """A lane for one call, as :meth:`run` takes it: the thread's (its
        window flushed), or inside another call a nested one. The caller
        sets its ``busy`` back to False when done."""
        lane = self._lane()
        if lane.busy:
            lane = lane.free()
        lane.busy = True
        try:
            window = lane.window
            if window is not None and window.pending:
                self._read_window(lane, window, 0, time.monotonic())
        except BaseException:
            lane.busy = False
            raise
        return lane

    # -- streams (prefetch) --------------------------------------------------

    def take_streamed(
        self, queue: str, mode: str, n: int, timeout: float | None, lease: float | None = None
    ) -> tuple[_Streamed, list[protocol.StreamDelivery]] | None:
        """Up to ``n`` messages of ``queue`` from this thread's stream (opened
        on first use), waiting up to ``timeout`` for the first; raises Empty.

        None means: make a plain request instead. So it is inside another
        call of this thread (a ``__del__``, a signal handler), which must
        not touch the stream of the call it interrupted, and with a broker
        too old to stream. The thread's put window is flushed first, as
        before any request. The ``taken`` of what it returns was sent
        before it returns (see :mod:`brokerq.prefetch`).
        """
        protocol.validate_timeout(timeout)
        lane = self._lane()
        if lane.busy:
            return None
        lane.busy = True
        try:
            window = lane.window
            if window is not None and window.pending:
                self._read_window(lane, window, 0, time.monotonic())
            streams = lane.streams
            if streams is None:
                streams = lane.streams = {}
            key = (queue, mode, lease)
            streamed = streams.get(key)
            if streamed is None:
                state = prefetch.Prefetch(queue, self.prefetch, mode, lease)
                streamed = streams[key] = _Streamed(state)
            if streamed.unsupported:
                return None
            items = self._take_streamed(streamed, n, timeout)
            return None if items is None else (streamed, items)
        finally:
            lane.busy = False

    def _take_streamed(
        self, streamed: _Streamed, n: int, timeout: float | None
    ) -> list[protocol.StreamDelivery] | None:
        """:meth:`take_streamed` on a lane the caller holds. After a lost
        connection the stream is opened again on a new one (what was
        buffered went back), as a get is sent again, until the call's
        deadline (``calls.Attempts``)."""
        state = streamed.state
        start = time.monotonic()
        deadline = None if timeout is None else start + timeout
        attempts = calls.Attempts(calls.get(state.queue, timeout), self.timeout, start)
        synced = False
        while True:
            try:
                conn = streamed.conn
                if conn is None or conn.closed:
                    conn = self._open_stream(streamed)
                    if conn is None:
                        return None
                buffer = state.buffer
                if buffer:
                    if n > len(buffer):  # what has arrived meanwhile goes too
                        self._receive_streamed(streamed, conn, 0.0)
                    items, frame = state.hand_out(n)
                    with conn.exchange(self.timeout):
                        conn.send_reading(frame, time.monotonic() + self.timeout)
                    state.handed(len(items))
                    return items
                if timeout == 0 or (deadline is not None and time.monotonic() >= deadline):
                    if synced or timeout != 0:
                        raise Empty(f"queue {state.queue!r} is empty")
                    # Every delivery made before the broker handled the
                    # ping comes ahead of its reply: then nothing is missed.
                    self._stream_request(streamed, conn, calls.ping())
                    synced = True
                    continue
                if not self._receive_streamed(streamed, conn, deadline):
                    raise Empty(f"queue {state.queue!r} is empty")
            except ConnectionLost:
                state.lost()
                streamed.conn = None
                if not attempts.again(time.monotonic()):
                    raise

    def _open_stream(self, streamed: _Streamed) -> Connection | None:
        """A new connection with the stream open on it; None if the broker
        does not know ``consume`` (older than this client: the queue is
        then read with plain requests)."""
        conn = Connection(self.socket_path, self.timeout, spawn=self.starts_broker, spin=self.spin)
        self._connections.append(conn)
        if self._closed:
            conn.close()
            raise calls.closed_client()
        streamed.conn = conn
        try:
            reply = self._stream_request(streamed, conn, streamed.state.consume())
        except LocalProtocolError:
            streamed.unsupported = True
            reply = None
        except BaseException:
            streamed.conn = None
            streamed.state.lost()
            conn.close()
            raise
        if reply is None:
            streamed.conn = None
            conn.close()
            return None
        streamed.state.opened(reply)
        return conn

    def _stream_request(self, streamed: _Streamed, conn: Connection, call: Call[R]) -> R:
        """One request on a stream's connection: the deliveries that come
        before its reply go to the buffer, and so do those read with it.

        (The deliveries read in the same receive as the reply must be taken
        in now: they are in no socket any more, so a later wait on the
        socket would not see them, and with the stream's credit spent the
        broker sends nothing more. The consume reply and its first
        deliveries often come in one read.)"""
        state = streamed.state
        request_id = conn.wire.encode(call.kind, call.fields)
        if call.kind is protocol.Consume:
            state.opening(request_id)
        deadline = time.monotonic() + self.timeout
        with conn.exchange(self.timeout):
            conn.send_reading(conn.wire.out, deadline)
            while (reply := state.take(conn.wire)) is None:
                conn.wire.feed(conn.io.receive(deadline))
            if (extra := state.take(conn.wire)) is not None:
                conn.wire.fail(f"a reply that answers nothing: {extra!r}", conn.close)
        return conn.wire.check(call.expect, request_id, reply, conn.close)

    def _receive_streamed(
        self, streamed: _Streamed, conn: Connection, deadline: float | None
    ) -> bool:
        """Take in what the broker sends, waiting until ``deadline`` for
        something (0: only what has come); False if nothing came."""
        try:
            data = conn.io.receive(deadline)
        except TimeoutError:
            return False
        except OSError as exc:
            conn.close()
            raise conn.wire.lost(exc) from exc
        with conn.exchange(self.timeout):
            conn.wire.feed(data)
            reply = streamed.state.take(conn.wire)
        if reply is not None:  # nothing was asked
            conn.wire.fail(f"a reply that answers nothing: {reply!r}", conn.close)
        return True

    def settle_streamed(self, message: StreamedMessage, call: Call[R]) -> R:
        """A lease verb of a message reserved from a stream: on that stream's
        connection, after the ``taken`` that started the lease, when this
        thread owns it and is in no other call; else (another thread, or
        the stream's connection gone) as a plain request, which may, just
        after the hand-out, find the broker has not read the ``taken`` yet:
        a LeaseLost then is asked again for up to the client's timeout."""
        streamed = message.streamed
        lane = self._lane()
        conn = streamed.conn
        if (
            not lane.busy
            and lane.streams is not None
            and streamed in lane.streams.values()
            and conn is message.conn
            and conn is not None
            and not conn.closed
        ):
            lane.busy = True
            try:
                return self._stream_request(streamed, conn, call)
            finally:
                lane.busy = False
        give_up = message.handed_at + self.timeout
        while True:
            try:
                return self.run(call)
            except LeaseLost:
                if time.monotonic() > give_up or message.conn is None or message.conn.closed:
                    raise
                time.sleep(0.005)

    def next_keys(self, n: int) -> list[bytes]:
        """``n`` fresh put keys: unique to this client (and process), 16 bytes each."""
        if _forks != self._fork:
            self._forked()  # a child's keys have a prefix of their own
        return self._keys.take(n)

    def queue(self, name: str, **settings: Any) -> Queue:
        """The queue ``name``; settings given here (``maxsize``, ``max_bytes``,
        ``max_deliveries``, ``lease``) are applied to it, new or not (see
        Queue.configure)."""
        q = Queue(name, client=self)
        if any(value is not None for value in settings.values()):
            q.configure(**settings)
        return q

    def publish(
        self, topic: str, body: Body, *, priority: int = 0, ttl: float | None = None
    ) -> int:
        """Send a copy of ``body`` to every subscriber of ``topic``; return how many.

        Each queue subscribed to the topic (:meth:`Queue.subscribe`) gets it
        as an ordinary message (with ``priority`` and ``ttl`` as for
        :meth:`Queue.put`), unless it is full: a publish never waits. Each
        live subscriber (:meth:`subscribe`) is sent it. 0 means nobody
        subscribes: the message went nowhere. Retried after a lost
        connection like a put, without a second copy in any queue.
        """
        limit = self.connection().max_message_size
        call = calls.publish(topic, body, limit, self.next_keys, priority=priority, ttl=ttl)
        reply = self.run(call)
        return reply.copies + reply.live

    def subscribe(self, topic: str) -> Subscription:
        """A live subscription to ``topic``, in effect when this returns.

        Iterate over it (or call :meth:`Subscription.get`) for the body of
        each publish made while it is open; close it (or use it as a context
        manager) to end it. It has a connection of its own.
        """
        return Subscription(self, topic)

    def ping(self) -> float:
        """Round-trip time to the broker, in seconds."""
        lane = self._take()
        try:
            conn = self._lane_connection(lane)  # connecting (or spawning) is not part of the trip
            start = time.perf_counter()
            ping = calls.ping()
            conn.request(ping.expect, ping.kind, self.timeout)
            return time.perf_counter() - start
        finally:
            lane.busy = False

    @property
    def broker_pid(self) -> int:
        return self.connection().broker_pid

    def stats(self) -> dict[str, Any]:
        """The broker's stats: pid, version, uptime, connections, totals."""
        return self.run(calls.stats()).stats

    def queues(self) -> list[str]:
        """The names of every queue the broker holds."""
        return self.run(calls.queues()).names

    def stop(self) -> bool:
        """Ask the broker to exit and wait until it has; never spawns one.

        Returns False if no broker was running. Raises BrokerUnavailable if
        the broker still holds its lock after the client's ``timeout``.
        Flushes this thread's put window first.

        Clients waiting on the broker (a ``get``, a live subscription,
        ``brokerq consume``) reconnect, and the first of them starts a new
        broker once this one has exited: this returns all the same (it
        waits for this broker, not for none to run). To stop for good, stop
        those clients first.
        """
        lane = self._take()
        try:
            if lane.conn is not None:
                # A fresh connection: one opened earlier may be to a broker
                # gone since, which would leave the one now serving running.
                lane.conn.close()
            try:
                conn = self._lane_connection(lane, spawn=False)
            except VersionMismatch as exc:
                older = calls.older_broker(exc)
                if older is None:
                    raise
                retire_older_broker(self.socket_path, older, time.monotonic() + self.timeout)
                return True
            except BrokerUnavailable:
                if broker_running(self.socket_path):
                    raise  # it holds its lock but does not answer: say so
                return False
            deadline = time.monotonic() + self.timeout
            try:
                stop = calls.stop()
                conn.request(stop.expect, stop.kind, self.timeout)
            except ConnectionLost:
                pass  # it went before it could answer: that is what we asked for
            finally:
                conn.close()
        finally:
            lane.busy = False
        pause("client.stop_sent")
        while still_running(self.socket_path, conn.broker_pid):
            if time.monotonic() > deadline:
                raise calls.not_stopped(self.socket_path, self.timeout)
            time.sleep(0.005)
        return True


class Queue:
    """A named queue of a broker; like :class:`queue.Queue`, across processes.

    ``Queue("jobs")`` uses the default broker (``$BROKERQ_SOCKET`` or the
    per-user path), spawning it on first use; ``client.queue("jobs")`` uses
    an explicit one.
    """

    def __init__(
        self,
        name: str,
        *,
        client: Client | None = None,
        socket: str | os.PathLike[str] | None = None,
    ) -> None:
        protocol.validate_queue_name(name)
        self.name = name
        self.client = client if client is not None else _shared_client(socket)

    def __repr__(self) -> str:
        return f"<brokerq.Queue {self.name!r} at {self.client.socket_path!r}>"

    def put(
        self,
        body: Body,
        *,
        priority: int = 0,
        delay: float = 0,
        ttl: float | None = None,
        timeout: float | None = None,
    ) -> int:
        """Enqueue ``body`` (str is sent as UTF-8); return its message id.

        With the client's ``put_window`` above 0, it is sent without waiting
        for the reply and returns 0: it is acknowledged only once
        :meth:`flush` (or another request of this thread) returns. An
        exception raised here may be the error of an earlier windowed put,
        read while waiting for room in the window: this put was then not
        sent. See docs/usage.md, "Pipelined puts".

        ``priority``: higher is delivered first, FIFO within a priority.
        ``delay``: seconds before it can be delivered. ``ttl``: seconds after
        which it is dropped if still waiting (ready or delayed).
        ``timeout``: on a queue at its ``maxsize``/``max_bytes``, how long to
        wait for room (None: for ever, 0: not at all); then raises Full.

        Exactly once: if the broker dies before it answers, the put is sent
        again with the same key, and the broker drops the copy if the first
        one got through.
        """
        options = calls.PutOptions(priority, delay, ttl, timeout)
        limit = self.client.connection().max_message_size
        call = calls.put(self.name, body, limit, self.client.next_keys, options)
        if self.client.put_window > 0:
            self.client.send_put(call)
            return 0
        return self.client.run(call).msg_id

    def flush(self) -> None:
        """:meth:`Client.flush` of this queue's client (every queue's puts of this thread)."""
        self.client.flush()

    def put_nowait(self, body: Body, **options: Any) -> int:
        """``put(body, timeout=0)``: raises Full at once if the queue is full."""
        return self.put(body, timeout=0, **options)

    def put_many(
        self,
        bodies: Iterable[Body],
        *,
        priority: int = 0,
        delay: float = 0,
        ttl: float | None = None,
        timeout: float | None = None,
    ) -> list[int]:
        """Enqueue several bodies in order, in as few frames as fit; return their ids.

        ``priority``, ``delay``, ``ttl`` and ``timeout`` as for :meth:`put`.
        Every size is checked before anything is sent. Under the client's
        ``put_window``, each of its frames is a put of the window (sent,
        not yet acknowledged) and it returns a 0 per body (see :meth:`put`).
        """
        options = calls.PutOptions(priority, delay, ttl, timeout)
        limit = self.client.connection().max_message_size
        requests = calls.put_many(self.name, bodies, limit, self.client.next_keys, options)
        if self.client.put_window > 0:
            for call in requests:
                self.client.send_put(call)
            return [0] * sum(len(call.fields["bodies"]) for call in requests)
        return [msg_id for call in requests for msg_id in self.client.run(call).msg_ids]

    def get(self, timeout: float | None = None) -> bytes:
        """Remove and return the next body, waiting up to ``timeout`` seconds.

        ``None`` waits for ever; ``0`` does not wait. Raises Empty on timeout.
        """
        if self.client.prefetch:
            streamed = self.client.take_streamed(self.name, "get", 1, timeout)
            if streamed is not None:
                return streamed[1][0].body
        return self.client.run(calls.get(self.name, timeout)).body

    def get_nowait(self) -> bytes:
        return self.get(timeout=0)

    def get_many(self, n: int, timeout: float | None = None) -> list[bytes]:
        """Up to ``n`` bodies: waits (up to ``timeout``) for the first only,
        then returns every ready one up to ``n``. Raises Empty on timeout."""
        if self.client.prefetch:
            calls.get_many(self.name, n, timeout)  # (checks n and timeout)
            streamed = self.client.take_streamed(self.name, "get", n, timeout)
            if streamed is not None:
                return [d.body for d in streamed[1]]
        return self.client.run(calls.get_many(self.name, n, timeout)).bodies

    def reserve(self, timeout: float | None = None, lease: float | None = None) -> Message:
        """Lease the next message: it stays the broker's until acked.

        Waits up to ``timeout`` (as :meth:`get`). If the lease (``lease``
        seconds, else the queue's default) runs out, or this client's
        connection closes, before :meth:`Message.ack`, the message is
        delivered again (at-least-once). Use it as a context manager to ack
        on success and release on an exception.
        """
        if self.client.prefetch:
            streamed = self.client.take_streamed(self.name, "reserve", 1, timeout, lease)
            if streamed is not None:
                (delivery,) = streamed[1]
                return StreamedMessage(self, delivery, streamed[0])
        reply = self.client.run(calls.reserve(self.name, timeout, lease))
        return Message(self, reply.msg_id, reply.body, reply.attempt, reply.lease)

    def kick(self, n: int = 1) -> int:
        """Return up to ``n`` buried messages to ready; on ``<q>:dead``, move
        them back to ``<q>``. Returns how many moved."""
        return self.client.run(calls.kick(self.name, n)).count

    def configure(
        self,
        *,
        max_deliveries: int | None = None,
        lease: float | None = None,
        maxsize: int | None = None,
        max_bytes: int | None = None,
    ) -> dict[str, Any]:
        """Change this queue's settings; None leaves a setting as it is.

        ``maxsize`` / ``max_bytes``: the most messages / body bytes it holds
        in every state (``maxsize`` 0: unlimited; ``max_bytes`` 0: the
        broker's ``--max-queue-bytes``, unlimited by default); a put on a
        full queue waits for room.
        Kept in the journal. Returns the settings now in force.
        """
        call = calls.configure(
            self.name,
            max_deliveries=max_deliveries,
            lease=lease,
            maxsize=maxsize,
            max_bytes=max_bytes,
        )
        return self.client.run(call).config

    def delete(self) -> int:
        """Delete this queue: every message it holds, in every state, and its
        settings; returns how many messages went. (Using the name again
        makes a new, empty queue.)"""
        return self.client.run(calls.delete(self.name)).count

    def peek(self) -> bytes:
        """The body at the head, not removed. Raises Empty if none is ready."""
        return self.client.run(calls.peek(self.name)).body

    def purge(self) -> int:
        """Remove every ready message; return how many."""
        return self.client.run(calls.purge(self.name)).count

    def stats(self) -> dict[str, Any]:
        """Depth, bytes, waiters and totals of this queue (see docs/usage.md)."""
        return self.client.run(calls.stats(self.name)).stats

    def qsize(self) -> int:
        """Messages ready now (as :meth:`queue.Queue.qsize`: a snapshot)."""
        return int(self.stats()["ready"])

    def subscribe(self, topic: str) -> None:
        """From now on, get a copy of every publish to ``topic``, kept in the
        journal until :meth:`unsubscribe` or :meth:`delete` (durable)."""
        self.client.run(calls.subscribe(topic, self.name))

    def unsubscribe(self, topic: str) -> bool:
        """End the subscription to ``topic``; False if there was none. The
        copies already in this queue stay."""
        return self.client.run(calls.unsubscribe(topic, self.name)).found

    def empty(self) -> bool:
        return self.qsize() == 0

    def task_done(self, n: int = 1) -> None:
        """A message taken by :meth:`get` was handled (as :meth:`queue.Queue.task_done`).

        The count is the broker's, per queue, shared by every process: each
        put adds a task; this takes ``n`` away (``n`` > 1: that many at
        once, for a :meth:`get_many` batch). Calling it more times than
        there are tasks raises InvalidRequest, a ValueError, as the stdlib
        does. An acked :meth:`reserve` counts as its task_done already.
        Never sent again after a lost connection (a retry whose first try
        got through would count twice): raises ConnectionLost (a
        BrokerUnavailable), as the lease verbs do.
        """
        self.client.run(calls.task_done(self.name, n))

    def join(self, timeout: float | None = None) -> None:
        """Block until every task of this queue is done (as :meth:`queue.Queue.join`).

        Returns once the broker's count of unfinished tasks (put, not yet
        task_done, acked or otherwise settled) is 0. ``timeout``: raise
        :class:`~brokerq.JoinTimeout` (a TimeoutError) after that many
        seconds (None: wait for ever; 0: only look). After a lost connection
        it asks again with what is left of its timeout, as :meth:`get` does.
        """
        self.client.run(calls.join(self.name, timeout))

    @property
    def unfinished_tasks(self) -> int:
        """The broker's count of this queue's unfinished tasks (a snapshot,
        read from its stats, as :attr:`queue.Queue.unfinished_tasks`)."""
        return calls.unfinished_tasks(self.stats())


class Message:
    """A reserved message: ``body``, ``id`` (what put returned), ``attempt``
    (1 on the first delivery), and the verbs that end or extend its lease.

    As a context manager it acks when the block exits cleanly and releases
    the message (for redelivery) when it exits with an exception, unless
    the block already settled it.
    """

    def __init__(self, queue: Queue, msg_id: int, body: bytes, attempt: int, lease: float) -> None:
        self.queue = queue
        self.id = msg_id
        self.body = body
        self.attempt = attempt
        self.lease_expires = time.monotonic() + lease
        self.settled = False

    def __repr__(self) -> str:
        return f"<brokerq.Message {self.id} attempt {self.attempt} of {self.queue.name!r}>"

    def __enter__(self) -> Message:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if self.settled:
            return
        if exc_type is None:
            self.ack()
            return
        # Do not let a failed release hide the block's own exception: an
        # unreleased message comes back anyway when its lease runs out.
        with contextlib.suppress(BrokerqError):
            self.release()

    def ack(self) -> None:
        """Done with it: the message is gone for good. LeaseLost if the lease ran out."""
        self.queue.client.run(calls.ack(self.id, self.attempt))
        self.settled = True

    def release(self, delay: float = 0) -> None:
        """Give it back for redelivery: now (to its place at the head) or after ``delay`` s."""
        self.queue.client.run(calls.release(self.id, self.attempt, delay))
        self.settled = True

    def bury(self) -> None:
        """Set it aside: kept, not delivered, until kicked (``Queue.kick``)."""
        self.queue.client.run(calls.bury(self.id, self.attempt))
        self.settled = True

    def touch(self, lease: float | None = None) -> None:
        """Extend the lease (by its length, or ``lease`` seconds from now)."""
        reply = self.queue.client.run(calls.touch(self.id, self.attempt, lease))
        self.lease_expires = time.monotonic() + reply.lease


class _Streamed:
    """A stream of one thread: its sans-IO state, its connection once open."""

    __slots__ = ("conn", "state", "unsupported")

    def __init__(self, state: prefetch.Prefetch) -> None:
        self.state = state
        self.conn: Connection | None = None
        self.unsupported = False  # the broker does not know consume


class StreamedMessage(Message):
    """A reserved message that came prefetched (``prefetch``): its lease
    began when it was handed out, and its verbs go on its stream's
    connection, behind the ``taken`` that began it."""

    def __init__(
        self, queue: Queue, delivery: protocol.StreamDelivery, streamed: _Streamed
    ) -> None:
        now = time.monotonic()
        super().__init__(queue, delivery.msg_id, delivery.body, delivery.attempt, 0.0)
        self.lease_expires = streamed.state.lease_expires(now)
        self.streamed = streamed
        self.conn = streamed.conn
        self.handed_at = now

    def ack(self) -> None:
        self.queue.client.settle_streamed(self, calls.ack(self.id, self.attempt))
        self.settled = True

    def release(self, delay: float = 0) -> None:
        self.queue.client.settle_streamed(self, calls.release(self.id, self.attempt, delay))
        self.settled = True

    def bury(self) -> None:
        self.queue.client.settle_streamed(self, calls.bury(self.id, self.attempt))
        self.settled = True

    def touch(self, lease: float | None = None) -> None:
        call = calls.touch(self.id, self.attempt, lease)
        reply = self.queue.client.settle_streamed(self, call)
        self.lease_expires = time.monotonic() + reply.lease


class Subscription:
    """A live subscription to a topic: the publishes made while it is open.

    It has a connection of its own. If the broker goes away (crashed or
    stopped), it reconnects (spawning a broker if need be) and subscribes
    again; publishes made in between are missed, as for any live
    subscriber (a queue subscription misses nothing). A subscriber that
    reads too slowly is dropped by the broker: :meth:`get` then raises
    :class:`~brokerq.errors.SubscriberOverflow` (after the publishes that
    came before it), and the subscription is closed.
    """

    def __init__(self, client: Client, topic: str) -> None:
        self.client = client
        self.topic = topic
        self._call = calls.subscribe(topic)
        self._events = calls.LiveEvents()
        self._conn: Connection | None = None
        self._closed = False
        self._overflowed = False  # dropped by the broker, not closed by its owner
        self._subscribe()

    def __repr__(self) -> str:
        return f"<brokerq.Subscription {self.topic!r} at {self.client.socket_path!r}>"

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[bytes]:
        while True:
            yield self.get()

    def close(self) -> None:
        """End the subscription (closing its connection)."""
        self._closed = True
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _subscribe(self) -> None:
        """Connect and subscribe; events that come before the reply are kept.
        A connection lost before the reply (or a stopping broker's refusal)
        is tried again on a new one, within the client's timeout."""
        timeout = self.client.timeout
        give_up = time.monotonic() + timeout
        while True:
            left = max(give_up - time.monotonic(), 0.001)
            client = self.client
            conn = Connection(
                client.socket_path, left, spawn=client.starts_broker, spin=client.spin
            )
            try:
                with conn.exchange(timeout):
                    request_id = conn.wire.encode(self._call.kind, self._call.fields)
                    deadline = time.monotonic() + timeout
                    conn.io.send_all(conn.wire.out, deadline)
                    while (reply := self._events.take(conn.wire)) is None:
                        conn.wire.feed(conn.io.receive(deadline))
                    conn.wire.check(self._call.expect, request_id, reply, conn.close)
            except ConnectionLost:
                if time.monotonic() >= give_up:
                    raise
                continue
            self._conn = conn
            return

    def get(self, timeout: float | None = None) -> bytes:
        """The next publish's body, waiting up to ``timeout`` (None: for
        ever; 0: not at all); raises Empty if none came."""
        protocol.validate_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while (body := self._events.next_body()) is None:
            if self._closed:
                raise calls.closed_subscription(self.topic, self._overflowed)
            conn = self._conn
            if conn is None:
                self._subscribe()
                continue
            self._events.take(conn.wire)  # frames already received
            if self._events.error is not None:
                self._overflowed = True
                self.close()  # dropped by the broker: the bodies before, then the error
                continue
            if self._events.bodies:
                continue
            try:
                conn.wire.feed(conn.io.receive(deadline))
            except TimeoutError:
                raise Empty(f"nothing published to {self.topic!r} within {timeout:g} s") from None
            except OSError:
                # The broker went away: subscribe again on a new connection.
                conn.close()
                self._conn = None
        return body


_shared: dict[str, Client] = {}
_shared_lock = threading.Lock()


def _shared_client(socket_path: str | os.PathLike[str] | None) -> Client:
    """One Client per socket path for ``Queue(name)`` without a client."""
    path = resolve_socket_path(socket_path)
    with _shared_lock:
        client = _shared.get(path)
        if client is None or client._closed:
            client = _shared[path] = Client(path)
        return client


def connect(
    socket: str | os.PathLike[str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    *,
    put_window: int | None = None,
    prefetch: int | None = None,
) -> Client:
    """A client of the broker at ``socket`` (default: ``$BROKERQ_SOCKET`` or the
    per-user path). Connects (spawning the broker if none runs) right away, so
    a broker that cannot be reached fails here rather than at the first put.
    ``put_window``, ``prefetch``: see :class:`Client`."""
    client = Client(socket, timeout, put_window=put_window, prefetch=prefetch)
    try:
        client.connection()
    except BaseException:
        client.close()
        raise
    return client
