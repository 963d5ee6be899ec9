"""The async client: anyio, so it runs under trio and asyncio alike.

::

    async with brokerq.open_async_client() as client:
        jobs = client.queue("jobs")
        await jobs.put(b"resize 1.png")
        body = await jobs.get(timeout=5)
        async with jobs.reserve(timeout=5) as msg:
            await handle(msg.body)

Requests are built and replies judged by :mod:`brokerq.calls`, as in the
blocking client; a broker is found or spawned by the blocking
:func:`~brokerq.spawn.connect_or_spawn`, run in a worker thread.

Connections
-----------
A client keeps a small pool of connections. Each request takes an idle one
(or opens a new one) and gives it back when its exchange is done, so a get
waiting in one task never holds up a put in another. A reserved message
keeps the connection it came on until it is acked, released or buried, since
the broker ends the leases of a connection that closes. A connection whose
exchange did not finish (cancelled, timed out, broken) is closed, never
reused: its replies would be out of step with its requests. One whose
reply came out of step (another request's id: RemoteProtocolError) is
closed at once.

So a request has its connection to itself until its reply is read, and
nothing can send on it mid-exchange: a ``__del__`` or a signal handler
that runs during a request cannot await a call of its own, and a task it
starts takes another connection. (The blocking client has to see to that
itself: see :mod:`brokerq.client`.)

Cancellation
------------
No message is lost to a cancelled call, and none is taken twice:

* Requests that never wait in the broker (``get_nowait``, ``peek``,
  ``stats``, the lease verbs, a put with room, ...) run shielded from
  cancellation, bounded by the client's ``timeout``: they finish at once
  anyway. A cancellation takes effect at the caller's next checkpoint, after
  the result was returned, so a body that was taken is in the caller's hands.
* A ``get`` that waits (``timeout`` not 0) first asks without waiting
  (shielded, as above). If nothing is ready, it waits on the wire as
  ``reserve`` then ``ack``: a cancellation while it waits, or after the
  broker sent the message but before the reply was read, closes the
  connection, and the broker puts the message back in its place (its
  attempt count goes up by one: a message whose waiting gets are cancelled
  ``max_deliveries`` times after hand-over moves to the dead letters, as an
  unacked reserve would). Once the reserve's reply is read, the ``ack``
  runs shielded, bounded by the client's ``timeout``, and the body is
  returned. (The ack says ``as_get``: the message's task stays unfinished
  for the caller's ``task_done``, as after a plain get.) A plain ``get`` on
  the wire could not do this: the broker removes the message when it sends
  it, so a cancelled get would lose it.
* ``get_many(n)`` that waits takes its first message as ``get`` does, then
  the rest with a shielded ``get_many(n - 1, timeout=0)``.
* A ``reserve`` that waits is cancellable: a cancelled one closes its
  connection, which gives back any message it was sent.
* A ``put`` (or ``put_many``) with a ``timeout`` other than 0 is first sent
  without waiting (shielded). Only if the queue is full is it sent again
  with the same key, to wait for room, cancellably. A cancellation then
  shuts down the sending side of its connection and reads, shielded and
  bounded by the client's ``timeout``, until the broker answers or closes
  (docs/protocol.md, section 4): the broker withdraws a put still waiting,
  and closes, and the call raises the cancellation: the message is not in
  the queue and never will be. A put the broker admitted first (room came
  at that very moment) has its reply written before the close: the call
  returns its id (ids) as if not cancelled, and the cancellation takes
  effect at the caller's next checkpoint. So a call that raised the
  cancellation can be made again without enqueueing twice. If the broker
  does not say which in time (or the connection breaks), the call raises
  BrokerUnavailable: the put may have been made. A ``put_many`` of several
  frames keeps the frames made before the one that was cancelled.

Shielding covers anyio's (and trio's) cancel scopes. Under asyncio, a bare
``task.cancel()`` (``asyncio.timeout``, ``wait_for``) is not held off by a
shield, and a put made as it came returns its id and so spends it (it is
not raised again at the next checkpoint, as a cancel scope's is); use
anyio's ``move_on_after`` / ``fail_after`` around brokerq calls.

A client belongs to one event loop; share it between the tasks of that loop.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Generator, Iterable
from typing import Any, Generic, TypeVar

import anyio
from anyio.abc import UNIXSocketStream

from .. import protocol
from ..errors import (
    BrokerqError,
    BrokerUnavailable,
    Empty,
    Full,
    LeaseLost,
    LocalProtocolError,
    VersionMismatch,
)
from ..protocol import GetManyReply, HelloReply, ReserveReply
from ..spawn import broker_running, connect_or_spawn, resolve_socket_path, still_running
from . import calls, prefetch
from .blocking import retire_older_broker
from .calls import Body, BrokerStopping, Call, ConnectionLost

__all__ = ["AsyncClient", "AsyncMessage", "AsyncQueue", "AsyncSubscription", "open_async_client"]

R = TypeVar("R", bound=protocol.Reply)
Then = Callable[["AsyncConnection", R], Awaitable[None]]

DEFAULT_TIMEOUT = calls.DEFAULT_TIMEOUT
#: Idle connections a client keeps for reuse; more are closed when given back.
MAX_IDLE = 4
#: Bytes one receive may take: anyio receives with ``recv(n)``, which
#: allocates ``n`` bytes each time; past 128 KiB glibc maps and unmaps them,
#: several times the cost of a 64 KiB receive.
RECEIVE_SIZE = 64 * 1024
_STREAM_ERRORS = (
    OSError,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
)


class _Dialer:
    """``connect_or_spawn`` in a worker thread, which the caller may abandon.

    The blocking connect (and spawn) runs on to its own deadline when the
    caller is cancelled; the socket it then returns is closed, not leaked.
    """

    def __init__(self, socket_path: str, deadline: float, spawn: bool) -> None:
        self.socket_path = socket_path
        self.deadline = deadline
        self.spawn = spawn
        self.lock = threading.Lock()
        self.abandoned = False
        self.sock: socket.socket | None = None

    def _connect(self) -> socket.socket:
        sock = connect_or_spawn(self.socket_path, self.deadline, spawn=self.spawn)
        with self.lock:
            if self.abandoned:
                sock.close()
            self.sock = sock
        return sock

    async def dial(self) -> socket.socket:
        try:
            return await anyio.to_thread.run_sync(self._connect, abandon_on_cancel=True)
        except OSError as exc:
            raise calls.unreachable(self.socket_path, exc) from exc
        except BaseException:
            with self.lock:
                self.abandoned = True
                if self.sock is not None:
                    self.sock.close()
            raise


class AsyncConnection:
    """One greeted stream to the broker, used by one task at a time."""

    def __init__(self, stream: UNIXSocketStream, wire: calls.Wire) -> None:
        self.stream = stream
        self.wire = wire
        #: The exchange did not finish, or the broker closes it: close, never reuse.
        self.broken = False
        #: A reserved message holds it (its lease ends when it closes).
        self.pinned = False
        #: Closed already: closing again is no checkpoint (see _withdraw).
        self.closed = False

    @classmethod
    async def open(cls, socket_path: str, timeout: float, *, spawn: bool = True) -> AsyncConnection:
        """Connect to the broker (spawning one if need be) and greet it."""
        deadline = time.monotonic() + timeout
        hello = calls.hello()
        while True:
            sock = await _Dialer(socket_path, deadline, spawn).dial()
            try:
                sock.setblocking(False)
                stream = await UNIXSocketStream.from_socket(sock)
            except BaseException:
                sock.close()
                raise
            conn = cls(stream, calls.Wire(socket_path))
            try:
                reply = await conn.request(hello, max(deadline - time.monotonic(), 0.001))
                break
            except ConnectionLost:
                # A broker that died (or idled out) just after accepting us:
                # connect again, which finds or starts the next one.
                await conn.aclose()
                if time.monotonic() >= deadline:
                    raise
            except VersionMismatch as exc:
                await conn.aclose()
                # An upgrade: retire the older broker (as the blocking client does).
                older = calls.broker_to_retire(socket_path, exc, may_retire=spawn)
                await anyio.to_thread.run_sync(retire_older_broker, socket_path, older, deadline)
            except BaseException:
                await conn.aclose()
                raise
        conn.wire.greeted(reply)
        return conn

    @property
    def hello(self) -> HelloReply:
        assert self.wire.hello is not None
        return self.wire.hello

    async def aclose(self) -> None:
        self.broken = True
        if not self.closed:
            self.closed = True
            await anyio.aclose_forcefully(self.stream)

    def _break(self) -> None:
        self.broken = True

    async def request(
        self,
        call: Call[R],
        limit: float | None,
        fields: dict[str, Any] | None = None,
        withdrawal: _Withdrawal[R] | None = None,
    ) -> R:
        """Send ``call`` (with ``fields`` instead of its own, if given); return its reply.

        ``limit`` bounds the exchange (None: no bound); past it the
        connection breaks and BrokerUnavailable is raised. An exchange that
        does not finish, for whatever reason, leaves the connection broken.
        A reply that puts it out of step (another request's id, or the wrong
        kind: RemoteProtocolError), or an error after which the broker
        closes it, closes it here and now, wherever it would have gone next.
        With a ``withdrawal`` (a put waiting for room), a cancellation is
        raised only once the broker has withdrawn the put or made it (see
        :meth:`_withdraw`; a put made is left in ``withdrawal.made``).
        """
        request_id = self.wire.encode(call.kind, call.fields if fields is None else fields)
        try:
            with anyio.fail_after(limit):
                await self.stream.send(bytes(self.wire.out))
                while (reply := self.wire.next_reply()) is None:
                    self.wire.feed(await self.stream.receive(RECEIVE_SIZE))
        except TimeoutError as exc:
            self.broken = True
            raise self.wire.timed_out(limit) from exc
        except _STREAM_ERRORS as exc:
            self.broken = True
            raise self.wire.lost(exc) from exc
        except BaseException as exc:  # cancelled, or a reply that cannot be read
            self.broken = True
            if withdrawal is not None and isinstance(exc, anyio.get_cancelled_exc_class()):
                withdrawal.made = await self._withdraw(call, request_id, withdrawal.timeout)
            raise
        try:
            return self.wire.check(call.expect, request_id, reply, self._break)
        finally:
            if self.broken:
                await self.aclose()

    async def _withdraw(self, call: Call[R], request_id: int, timeout: float) -> R | None:
        """The put ``request_id``, which may be waiting for room, was cancelled:
        shut down this connection's sending side and read, shielded and for
        up to ``timeout``, until the broker answers or closes; then close.

        The broker withdraws a put still waiting when it reads the end of
        the stream, and closes without a reply; a put it made before that
        (room came at that very moment) has its reply written before the
        close (docs/protocol.md, section 4, "End of a connection"). Returns
        that reply, or None if the put was withdrawn, or refused (``full``,
        ``shutting_down``), or never sent whole. Raises another error reply;
        raises BrokerUnavailable if the broker did not say which, in time or
        before the connection broke: then it may have been made. The
        connection is closed here, shielded: closing it again is no
        checkpoint, so the caller's cleanup (:meth:`AsyncClient._release`)
        cannot replace that error with the cancellation.
        """
        reply: protocol.AnyReply | None = None
        with anyio.CancelScope(shield=True):
            try:
                with anyio.fail_after(timeout):
                    with contextlib.suppress(*_STREAM_ERRORS):
                        await self.stream.send_eof()
                    while (reply := self.wire.next_reply()) is None:
                        self.wire.feed(await self.stream.receive(RECEIVE_SIZE))
            except anyio.EndOfStream:
                pass  # closed without a reply: withdrawn
            except (TimeoutError, *_STREAM_ERRORS) as exc:
                why = str(exc) or f"no answer within {timeout:g} s"
                raise BrokerUnavailable(
                    f"a put waiting for room at {self.wire.socket_path} was cancelled, and "
                    f"the broker did not say whether it withdrew it (it may have been "
                    f"enqueued): {why}"
                ) from exc
            finally:
                await self.aclose()
        if reply is None or (
            isinstance(reply, protocol.Error)
            and reply.id == request_id
            and reply.code in ("full", "shutting_down")
        ):
            return None
        return self.wire.check(call.expect, request_id, reply, self._break)


class _Withdrawal(Generic[R]):
    """How a put that waits for room meets a cancellation: within
    ``timeout`` the broker says whether it withdrew the put, or made it
    (``made``, its reply). See :meth:`AsyncConnection._withdraw`."""

    __slots__ = ("made", "timeout")

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.made: R | None = None


class AsyncClient:
    """A broker, named by its socket path; spawned on first use if needed.

    ``timeout`` is the deadline for connecting (and spawning a broker), the
    grace a reply gets beyond its request's own timeout, and the bound of a
    shielded request. ``async with`` connects at once and closes at the end.
    """

    def __init__(
        self,
        socket: str | os.PathLike[str] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        *,
        prefetch: int | None = None,
    ) -> None:
        self.socket_path = resolve_socket_path(socket)
        self.timeout, self.starts_broker = calls.client_timeout(timeout)
        #: See :class:`brokerq.Client`: the first get or reserve of a queue opens a stream.
        self.prefetch = calls.prefetch(prefetch)
        self._streams: dict[tuple[str, str, float | None], _AsyncStreamed] = {}
        #: The broker's body limit, from the latest connection's hello.
        self.max_message_size: int | None = None
        self._closed = False
        self._idle: list[AsyncConnection] = []
        self._open: set[AsyncConnection] = set()
        self._keys = calls.PutKeys()

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return f"<brokerq.AsyncClient {self.socket_path!r}{state}>"

    async def __aenter__(self) -> AsyncClient:
        try:
            await self._release(await self._acquire())
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every connection; requests still running end with BrokerqError,
        and using the client afterwards raises it."""
        self._closed = True
        connections = list(self._open)
        self._open.clear()
        self._idle.clear()
        streams, self._streams = list(self._streams.values()), {}
        connections += [s.conn for s in streams if s.conn is not None]
        for conn in connections:
            await conn.aclose()

    # -- the pool ----------------------------------------------------------

    async def _acquire(self, *, spawn: bool = True) -> AsyncConnection:
        """An idle connection, else a new one (connecting, or spawning, now)."""
        while True:
            if self._closed:
                raise calls.closed_client()
            if not self._idle:
                break
            conn = self._idle.pop()
            if not conn.broken:
                return conn
            await self._discard(conn)
        conn = await AsyncConnection.open(
            self.socket_path, self.timeout, spawn=spawn and self.starts_broker
        )
        if self._closed:
            await conn.aclose()
            raise calls.closed_client()
        self._open.add(conn)
        self.max_message_size = conn.hello.max_message_size
        return conn

    async def _release(self, conn: AsyncConnection) -> None:
        """A request is done with ``conn``: keep it for the next, or close it."""
        if conn.pinned:
            return  # a reserved message holds it now
        if conn.broken or self._closed or len(self._idle) >= MAX_IDLE:
            await self._discard(conn)
        else:
            self._idle.append(conn)

    def _recycle(self, conn: AsyncConnection) -> None:
        """A reserved message lets go of its connection (not awaited: it may
        run from a finalizer; a broken one is closed by :meth:`_acquire`)."""
        conn.pinned = False
        if not self._closed and conn in self._open:
            self._idle.append(conn)

    async def _discard(self, conn: AsyncConnection) -> None:
        self._open.discard(conn)
        await conn.aclose()

    async def _forget(self, broker_pid: int) -> None:
        """That broker is gone: its idle connections are useless."""
        stale = [c for c in self._idle if c.hello.pid == broker_pid]
        self._idle = [c for c in self._idle if c.hello.pid != broker_pid]
        for conn in stale:
            await self._discard(conn)

    # -- running calls -----------------------------------------------------

    async def _run(self, call: Call[R], then: Then[R] | None = None) -> R:
        """Run ``call`` (shielded if it never waits), retrying on a lost connection.

        ``then`` runs on the same connection after the reply, before it is
        given back (the ack of a get done as reserve + ack).
        """
        with anyio.CancelScope(shield=call.wait == 0):
            reply = await self._attempts(call, then)
        return reply  # noqa: RET504 (mypy: a cancel scope may swallow the return)

    async def _attempts(
        self, call: Call[R], then: Then[R] | None, withdrawal: _Withdrawal[R] | None = None
    ) -> R:
        attempts = calls.Attempts(call, self.timeout, anyio.current_time())
        while True:
            conn = await self._acquire()
            try:
                limit = attempts.start(anyio.current_time())
                reply = await conn.request(call, limit, attempts.fields, withdrawal)
                if then is not None:
                    await then(conn, reply)
                return reply
            except ConnectionLost as exc:  # (or a stopping broker's refusal)
                if conn.broken:
                    await self._forget(conn.hello.pid)
                refused = isinstance(exc, BrokerStopping)
                if not attempts.again(anyio.current_time(), refused=refused):
                    raise
            finally:
                await self._release(conn)

    async def _take(self, reserve: Call[ReserveReply]) -> ReserveReply:
        """A get that waits, done as reserve then ack (see the module docstring)."""

        async def ack(conn: AsyncConnection, reply: ReserveReply) -> None:
            with anyio.CancelScope(shield=True):
                try:
                    ack = calls.ack(reply.msg_id, reply.attempt, as_get=True)  # task_done's
                    await conn.request(ack, self.timeout)
                except LeaseLost as exc:  # it went back to the queue: ask again
                    raise ConnectionLost(
                        f"the lease of a get ran out before its ack: {exc}"
                    ) from exc

        return await self._run(reserve, ack)

    async def _reserve(self, call: Call[ReserveReply]) -> tuple[ReserveReply, AsyncConnection]:
        """A reserve, and the connection that now holds its lease."""
        holder: list[AsyncConnection] = []

        async def pin(conn: AsyncConnection, reply: ReserveReply) -> None:
            conn.pinned = True
            holder.append(conn)

        reply = await self._run(call, pin)
        return reply, holder[0]

    async def _put(self, call: Call[R]) -> R:
        """A put that may wait for room: first sent without waiting (shielded);
        only if the queue is full, sent again with the same key to wait."""
        if call.wait == 0:
            return await self._run(call)
        start = anyio.current_time()
        try:
            return await self._run(call.with_timeout(0))
        except Full:
            pass
        return await self._wait_for_room(call.with_timeout(_left(call.wait, start)))

    async def _wait_for_room(self, call: Call[R]) -> R:
        """A put sent to wait for room, cancellably: a cancellation is raised
        only once the broker has withdrawn the put; if the broker made it
        first, its reply is returned instead, and the cancellation takes
        effect at the caller's next checkpoint (see the module docstring)."""
        withdrawal: _Withdrawal[R] = _Withdrawal(self.timeout)
        try:
            return await self._attempts(call, None, withdrawal)
        except anyio.get_cancelled_exc_class():
            if withdrawal.made is None:
                raise
            return withdrawal.made

    async def _limit(self) -> int:
        """The broker's body limit (connecting first if no connection told it yet)."""
        if self.max_message_size is None:
            await self._release(await self._acquire())
        assert self.max_message_size is not None
        return self.max_message_size

    # -- streams (prefetch) --------------------------------------------------

    async def _take_streamed(
        self, queue: str, mode: str, n: int, timeout: float | None, lease: float | None = None
    ) -> tuple[_AsyncStreamed, list[protocol.StreamDelivery]] | None:
        """Up to ``n`` messages of ``queue`` from its stream (opened on first
        use), waiting up to ``timeout`` for the first; raises Empty. None: the
        broker does not stream (older than this client): ask plainly.

        Cancellable while it waits: nothing is taken then. The ``taken`` is
        sent shielded and nothing awaits after it, so what it took is
        returned (as the module doc says of shielded requests).
        """
        protocol.validate_timeout(timeout)
        if self._closed:
            raise calls.closed_client()
        key = (queue, mode, lease)
        streamed = self._streams.get(key)
        if streamed is None:
            state = prefetch.Prefetch(queue, self.prefetch, mode, lease)
            streamed = self._streams[key] = _AsyncStreamed(state)
        start = anyio.current_time()
        deadline = None if timeout is None else start + timeout
        attempts = calls.Attempts(calls.get(queue, timeout), self.timeout, start)
        state = streamed.state
        synced = False
        while True:
            if streamed.unsupported:
                return None
            try:
                conn = streamed.conn
                if conn is None or conn.broken:
                    conn = await self._open_stream(streamed)
                    continue
                if state.buffer:
                    async with streamed.send_lock:
                        items, frame = state.hand_out(n)
                        if not items:
                            continue  # another task took them meanwhile
                        with anyio.CancelScope(shield=True):
                            await streamed.send(frame, self.timeout)
                        state.handed(len(items))
                        return streamed, items
                if timeout == 0 or (deadline is not None and anyio.current_time() >= deadline):
                    if synced or timeout != 0:
                        raise Empty(f"queue {queue!r} is empty")
                    # Every delivery made before the broker handled the ping
                    # comes ahead of its reply: then nothing is missed.
                    with anyio.CancelScope(shield=True):
                        await self._stream_request(streamed, calls.ping())
                    synced = True
                    continue
                await streamed.pump(lambda: bool(state.buffer), deadline)
            except ConnectionLost:
                await streamed.lose()
                if not attempts.again(anyio.current_time()):
                    raise

    async def _open_stream(self, streamed: _AsyncStreamed) -> AsyncConnection:
        conn = await AsyncConnection.open(self.socket_path, self.timeout, spawn=self.starts_broker)
        if self._closed:
            await conn.aclose()
            raise calls.closed_client()
        if streamed.conn is not None and not streamed.conn.broken:
            await conn.aclose()  # another task opened it meanwhile
            return streamed.conn
        streamed.conn = conn
        streamed.replies.clear()
        try:
            with anyio.CancelScope(shield=True):
                reply = await self._stream_request(streamed, streamed.state.consume())
        except LocalProtocolError:  # a broker that does not know consume
            streamed.unsupported = True
            await streamed.lose()
            return conn
        streamed.state.opened(reply)
        return conn

    async def _stream_request(self, streamed: _AsyncStreamed, call: Call[R]) -> R:
        """One request on a stream's connection: sent, then its reply read
        by whichever task reads the connection (deliveries go to the buffer)."""
        conn = streamed.conn
        if conn is None or conn.broken:
            raise ConnectionLost(f"the stream's connection to {self.socket_path} was lost")
        async with streamed.send_lock:
            request_id = conn.wire.encode(call.kind, call.fields)
            if call.kind is protocol.Consume:
                streamed.state.opening(request_id)
            await streamed.send(bytes(conn.wire.out), self.timeout)
        replies = streamed.replies
        await streamed.pump(
            lambda: request_id in replies, anyio.current_time() + self.timeout, strict=True
        )
        reply = replies.pop(request_id)
        return conn.wire.check(call.expect, request_id, reply, conn._break)

    # -- the API -----------------------------------------------------------

    def queue(
        self,
        name: str,
        *,
        maxsize: int | None = None,
        max_bytes: int | None = None,
        max_deliveries: int | None = None,
        lease: float | None = None,
    ) -> AsyncQueue:
        """The queue ``name`` (no I/O). Settings given here are applied, as by
        :meth:`AsyncQueue.configure`, before this queue object's first request."""
        settings = {
            "maxsize": maxsize,
            "max_bytes": max_bytes,
            "max_deliveries": max_deliveries,
            "lease": lease,
        }
        return AsyncQueue(name, self, {k: v for k, v in settings.items() if v is not None})

    async def publish(
        self, topic: str, body: Body, *, priority: int = 0, ttl: float | None = None
    ) -> int:
        """Send a copy of ``body`` to every subscriber of ``topic``; return how
        many (see :meth:`brokerq.Client.publish`). Never waits in the broker,
        so it runs shielded, as a put with room does."""
        limit = await self._limit()
        call = calls.publish(topic, body, limit, self._keys.take, priority=priority, ttl=ttl)
        reply = await self._run(call)
        return reply.copies + reply.live

    def subscribe(self, topic: str) -> AsyncSubscription:
        """A live subscription to ``topic``, on a connection of its own::

            async with client.subscribe("events") as events:
                async for body in events:
                    ...

        (or ``events = await client.subscribe("events")``, then
        ``await events.aclose()``). It is in effect once entered or awaited.
        """
        return AsyncSubscription(self, topic)

    async def ping(self) -> float:
        """Round-trip time to the broker, in seconds (connecting is not counted)."""
        conn = await self._acquire()
        try:
            with anyio.CancelScope(shield=True):
                start = time.perf_counter()
                await conn.request(calls.ping(), self.timeout)
                elapsed = time.perf_counter() - start
        finally:
            await self._release(conn)
        return elapsed

    async def stats(self) -> dict[str, Any]:
        """The broker's stats: pid, version, uptime, connections, totals."""
        return (await self._run(calls.stats())).stats

    async def queues(self) -> list[str]:
        """The names of every queue the broker holds."""
        return (await self._run(calls.queues())).names

    async def stop(self) -> bool:
        """Ask the broker to exit and wait until it has; never spawns one.

        Returns False if no broker was running. Raises BrokerUnavailable if
        the broker still holds its lock after the client's ``timeout``. As
        :meth:`brokerq.Client.stop`, it waits for this broker to exit, not
        for none to run: waiting clients reconnect and start the next one.
        """
        if self._closed:
            raise calls.closed_client()
        try:
            conn = await AsyncConnection.open(self.socket_path, self.timeout, spawn=False)
        except VersionMismatch as exc:
            older = calls.older_broker(exc)
            if older is None:
                raise
            deadline = time.monotonic() + self.timeout
            await anyio.to_thread.run_sync(retire_older_broker, self.socket_path, older, deadline)
            return True
        except BrokerUnavailable:
            if broker_running(self.socket_path):
                raise  # it holds its lock but does not answer: say so
            return False
        deadline = anyio.current_time() + self.timeout
        try:
            await conn.request(calls.stop(), self.timeout)
        except ConnectionLost:
            pass  # it went before it could answer: that is what we asked for
        finally:
            await conn.aclose()
        await self._forget(conn.hello.pid)
        while still_running(self.socket_path, conn.hello.pid):
            if anyio.current_time() > deadline:
                raise calls.not_stopped(self.socket_path, self.timeout)
            await anyio.sleep(0.005)
        return True


def _left(timeout: float | None, start: float) -> float | None:
    """What is left of ``timeout`` seconds counted from ``start``."""
    return None if timeout is None else max(0.0, timeout - (anyio.current_time() - start))


class AsyncQueue:
    """A named queue of a broker, for async code: the methods of
    :class:`brokerq.Queue`, awaited."""

    def __init__(self, name: str, client: AsyncClient, settings: dict[str, Any]) -> None:
        protocol.validate_queue_name(name)
        self.name = name
        self.client = client
        self._settings = settings or None
        self._settings_lock = anyio.Lock()

    def __repr__(self) -> str:
        return f"<brokerq.AsyncQueue {self.name!r} at {self.client.socket_path!r}>"

    async def _configured(self) -> None:
        """Apply the settings given to ``client.queue()``, once, before anything else."""
        if self._settings is None:
            return
        async with self._settings_lock:
            if self._settings is not None:
                await self.client._run(calls.configure(self.name, **self._settings))
                self._settings = None

    async def _run(self, call: Call[R]) -> R:
        await self._configured()
        return await self.client._run(call)

    async def put(
        self,
        body: Body,
        *,
        priority: int = 0,
        delay: float = 0,
        ttl: float | None = None,
        timeout: float | None = None,
    ) -> int:
        """Enqueue ``body``; return its message id. As :meth:`brokerq.Queue.put`:
        exactly once, even when sent again after a lost connection."""
        await self._configured()
        options = calls.PutOptions(priority, delay, ttl, timeout)
        limit = await self.client._limit()
        call = calls.put(self.name, body, limit, self.client._keys.take, options)
        return (await self.client._put(call)).msg_id

    async def put_nowait(self, body: Body, **options: Any) -> int:
        """``put(body, timeout=0)``: raises Full at once if the queue is full."""
        return await self.put(body, timeout=0, **options)

    async def put_many(
        self,
        bodies: Iterable[Body],
        *,
        priority: int = 0,
        delay: float = 0,
        ttl: float | None = None,
        timeout: float | None = None,
    ) -> list[int]:
        """Enqueue several bodies in order, in as few frames as fit; return their ids."""
        await self._configured()
        options = calls.PutOptions(priority, delay, ttl, timeout)
        limit = await self.client._limit()
        requests = calls.put_many(self.name, bodies, limit, self.client._keys.take, options)
        ids: list[int] = []
        for call in requests:
            ids += (await self.client._put(call)).msg_ids
        return ids

    async def get(self, timeout: float | None = None) -> bytes:
        """Remove and return the next body, waiting up to ``timeout`` seconds
        (None: for ever, 0: not at all); raises Empty on timeout. A cancelled
        get loses no message (see the module docstring)."""
        if self.client.prefetch:
            await self._configured()
            streamed = await self.client._take_streamed(self.name, "get", 1, timeout)
            if streamed is not None:
                return streamed[1][0].body
        return (await self._get(calls.get(self.name, timeout))).body

    async def get_nowait(self) -> bytes:
        return await self.get(timeout=0)

    async def get_many(self, n: int, timeout: float | None = None) -> list[bytes]:
        """Up to ``n`` bodies: waits (up to ``timeout``) for the first only,
        then returns every ready one up to ``n``. Raises Empty on timeout."""
        if self.client.prefetch:
            calls.get_many(self.name, n, timeout)  # (checks n and timeout)
            await self._configured()
            streamed = await self.client._take_streamed(self.name, "get", n, timeout)
            if streamed is not None:
                return [d.body for d in streamed[1]]
        reply = await self._get(calls.get_many(self.name, n, timeout))
        if isinstance(reply, GetManyReply):
            return reply.bodies
        if n == 1:
            return [reply.body]
        try:  # shielded: it never waits
            rest = (await self.client._run(calls.get_many(self.name, n - 1, 0))).bodies
        except BrokerqError:  # Empty, or worse: the first, acked, is the caller's anyway
            rest = []
        return [reply.body, *rest]

    async def _get(self, call: Call[R]) -> R | ReserveReply:
        """``call`` (a get or get_many) without waiting, shielded; if nothing
        is ready and it may wait, the first message by reserve then ack."""
        start = anyio.current_time()
        try:
            return await self._run(call.with_timeout(0))
        except Empty:
            if call.wait == 0:
                raise
        lease = max(self.client.timeout, 1.0)  # long enough for the ack
        reserve = calls.reserve(self.name, _left(call.wait, start), lease)
        return await self.client._take(reserve)

    def reserve(self, timeout: float | None = None, lease: float | None = None) -> Reserving:
        """Lease the next message (as :meth:`brokerq.Queue.reserve`).

        ``msg = await q.reserve()``, or ``async with q.reserve() as msg:``,
        which acks when the block exits cleanly and releases the message
        when it exits with an exception (cancellation included).
        """
        return Reserving(self, calls.reserve(self.name, timeout, lease))

    async def kick(self, n: int = 1) -> int:
        """Return up to ``n`` buried messages to ready; on ``<q>:dead``, move
        them back to ``<q>``. Returns how many moved."""
        return (await self._run(calls.kick(self.name, n))).count

    async def configure(
        self,
        *,
        max_deliveries: int | None = None,
        lease: float | None = None,
        maxsize: int | None = None,
        max_bytes: int | None = None,
    ) -> dict[str, Any]:
        """Change this queue's settings (None leaves one as it is); returns those in force."""
        call = calls.configure(
            self.name,
            max_deliveries=max_deliveries,
            lease=lease,
            maxsize=maxsize,
            max_bytes=max_bytes,
        )
        return (await self._run(call)).config

    async def delete(self) -> int:
        """Delete this queue with every message it holds; returns how many went."""
        return (await self._run(calls.delete(self.name))).count

    async def peek(self) -> bytes:
        """The body at the head, not removed. Raises Empty if none is ready."""
        return (await self._run(calls.peek(self.name))).body

    async def purge(self) -> int:
        """Remove every ready message; return how many."""
        return (await self._run(calls.purge(self.name))).count

    async def stats(self) -> dict[str, Any]:
        """Depth, bytes, waiters and totals of this queue (see docs/usage.md)."""
        return (await self._run(calls.stats(self.name))).stats

    async def qsize(self) -> int:
        """Messages ready now (a snapshot)."""
        return int((await self.stats())["ready"])

    async def empty(self) -> bool:
        return await self.qsize() == 0

    async def task_done(self, n: int = 1) -> None:
        """``n`` tasks of this queue are done (see :meth:`brokerq.Queue.task_done`).
        Runs shielded (it never waits) and is never sent again after a lost
        connection (ConnectionLost)."""
        await self._run(calls.task_done(self.name, n))

    async def join(self, timeout: float | None = None) -> None:
        """Wait until every task of this queue is done (see
        :meth:`brokerq.Queue.join`); JoinTimeout after ``timeout`` seconds.
        Cancellable: a cancelled join closes its connection and changes
        nothing in the broker."""
        await self._run(calls.join(self.name, timeout))

    async def unfinished_tasks(self) -> int:
        """The broker's count of this queue's unfinished tasks (a snapshot;
        a method here, since reading it talks to the broker)."""
        return calls.unfinished_tasks(await self.stats())

    async def subscribe(self, topic: str) -> None:
        """From now on, get a copy of every publish to ``topic`` (durable; see
        :meth:`brokerq.Queue.subscribe`)."""
        await self._run(calls.subscribe(topic, self.name))

    async def unsubscribe(self, topic: str) -> bool:
        """End the subscription to ``topic``; False if there was none."""
        return (await self._run(calls.unsubscribe(topic, self.name))).found


class Reserving:
    """What :meth:`AsyncQueue.reserve` returns: await it for an
    :class:`AsyncMessage`, or use it with ``async with``."""

    def __init__(self, queue: AsyncQueue, call: Call[ReserveReply]) -> None:
        self.queue = queue
        self.call = call
        self.message: AsyncMessage | None = None

    async def _reserve(self) -> AsyncMessage:
        queue = self.queue
        await queue._configured()
        if queue.client.prefetch:
            fields = self.call.fields
            streamed = await queue.client._take_streamed(
                queue.name, "reserve", 1, fields["timeout"], fields["lease"]
            )
            if streamed is not None:
                return AsyncStreamedMessage(queue, streamed[1][0], streamed[0])
        reply, conn = await queue.client._reserve(self.call)
        return AsyncMessage(queue, reply, conn)

    def __await__(self) -> Generator[Any, None, AsyncMessage]:
        return self._reserve().__await__()

    async def __aenter__(self) -> AsyncMessage:
        self.message = await self._reserve()
        return self.message

    async def __aexit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        assert self.message is not None
        await self.message.__aexit__(exc_type)


class AsyncMessage:
    """A reserved message: ``body``, ``id``, ``attempt``, ``lease_expires``,
    and the awaited verbs that end or extend its lease.

    It holds the connection its lease came on until it is acked, released or
    buried (a message dropped unsettled lets go of it when collected; its
    lease then runs out, or ends when that connection closes). The verbs are
    never cancelled half-way (they run shielded, bounded by the client's
    timeout) and never sent again after a lost connection.
    """

    def __init__(self, queue: AsyncQueue, reply: ReserveReply, conn: AsyncConnection) -> None:
        self.queue = queue
        self.id = reply.msg_id
        self.body = reply.body
        self.attempt = reply.attempt
        self.lease_expires = time.monotonic() + reply.lease
        self.settled = False
        self._conn: AsyncConnection | None = conn
        self._unpin = weakref.finalize(self, queue.client._recycle, conn)

    def __repr__(self) -> str:
        return f"<brokerq.AsyncMessage {self.id} attempt {self.attempt} of {self.queue.name!r}>"

    async def __aenter__(self) -> AsyncMessage:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if self.settled:
            return
        if exc_type is None:
            await self.ack()
            return
        # Do not let a failed release hide the block's own exception: an
        # unreleased message comes back anyway when its lease runs out.
        with contextlib.suppress(BrokerqError):
            await self.release()

    async def _verb(self, call: Call[R], *, settles: bool) -> R:
        """A lease verb, on the connection that holds the lease if it is free."""
        client = self.queue.client
        conn, self._conn = self._conn, None
        if conn is None:  # another verb is using it, or it was let go of
            return await client._run(call)
        keep = False
        try:
            with anyio.CancelScope(shield=True):
                if client._closed:
                    raise calls.closed_client()
                reply = await conn.request(call, client.timeout)
            keep = not settles
        finally:
            if keep:
                self._conn = conn
            else:
                self._unpin()  # back to the pool (or closed, if broken)
        return reply

    async def ack(self) -> None:
        """Done with it: the message is gone for good. LeaseLost if the lease ran out."""
        await self._verb(calls.ack(self.id, self.attempt), settles=True)
        self.settled = True

    async def release(self, delay: float = 0) -> None:
        """Give it back for redelivery: now (to its place) or after ``delay`` s."""
        await self._verb(calls.release(self.id, self.attempt, delay), settles=True)
        self.settled = True

    async def bury(self) -> None:
        """Set it aside: kept, not delivered, until kicked."""
        await self._verb(calls.bury(self.id, self.attempt), settles=True)
        self.settled = True

    async def touch(self, lease: float | None = None) -> None:
        """Extend the lease (by its length, or ``lease`` seconds from now)."""
        reply = await self._verb(calls.touch(self.id, self.attempt, lease), settles=False)
        self.lease_expires = time.monotonic() + reply.lease


class _AsyncStreamed:
    """A stream of an async client: its sans-IO state, its connection, and
    the replies read for requests of other tasks. One task at a time reads
    the connection (:meth:`pump`), for every task waiting on it."""

    def __init__(self, state: prefetch.Prefetch) -> None:
        self.state = state
        self.conn: AsyncConnection | None = None
        self.send_lock = anyio.Lock()
        self.replies: dict[int, protocol.AnyReply] = {}
        self.reading = False
        self.arrived = anyio.Event()
        self.unsupported = False

    async def send(self, data: bytes, timeout: float) -> None:
        """Send on the stream's connection (the caller holds ``send_lock``)."""
        conn = self.conn
        if conn is None or conn.broken:
            raise ConnectionLost("the stream's connection was lost")
        try:
            with anyio.fail_after(timeout):
                await conn.stream.send(data)
        except TimeoutError as exc:
            await self.lose()
            raise conn.wire.timed_out(timeout) from exc
        except _STREAM_ERRORS as exc:
            await self.lose()
            raise conn.wire.lost(exc) from exc

    async def pump(
        self, done: Callable[[], bool], deadline: float | None, *, strict: bool = False
    ) -> None:
        """Read frames until ``done()`` or ``deadline`` (then return; with
        ``strict`` raise BrokerUnavailable), or wait while another task reads."""
        while not done():
            left = None if deadline is None else deadline - anyio.current_time()
            if left is not None and left <= 0:
                conn = self.conn
                if strict and conn is not None:  # a reply that did not come in time
                    await self.lose()
                    raise conn.wire.timed_out(left)
                return
            conn = self.conn
            if conn is None or conn.broken:
                raise ConnectionLost("the stream's connection was lost")
            if self.reading:
                arrived = self.arrived
                with anyio.move_on_after(left):
                    await arrived.wait()
                continue
            self.reading = True
            try:
                with anyio.move_on_after(left):
                    data = await conn.stream.receive(RECEIVE_SIZE)
                    conn.wire.feed(data)
                    while (frame := self.state.take(conn.wire)) is not None:
                        self.replies[frame.id] = frame
            except _STREAM_ERRORS as exc:
                await self.lose()
                raise conn.wire.lost(exc) from exc
            except BrokerqError:  # an error with id 0: the broker ends the connection
                await self.lose()
                raise
            finally:
                self.reading = False
                arrived, self.arrived = self.arrived, anyio.Event()
                arrived.set()

    async def lose(self) -> None:
        """The connection is gone (or unusable): what was buffered is the broker's."""
        conn, self.conn = self.conn, None
        self.state.lost()
        self.replies.clear()
        if conn is not None:
            await conn.aclose()


class AsyncStreamedMessage(AsyncMessage):
    """A reserved message that came prefetched: its lease began when it was
    handed out, and its verbs go on its stream's connection, behind the
    ``taken`` that began it (see :class:`brokerq.client.StreamedMessage`)."""

    def __init__(
        self, queue: AsyncQueue, delivery: protocol.StreamDelivery, streamed: _AsyncStreamed
    ) -> None:
        self.queue = queue
        self.id = delivery.msg_id
        self.body = delivery.body
        self.attempt = delivery.attempt
        self.lease_expires = streamed.state.lease_expires(time.monotonic())
        self.settled = False
        self._conn = None
        self._streamed = streamed
        self._stream_conn = streamed.conn

    async def _verb(self, call: Call[R], *, settles: bool) -> R:
        client = self.queue.client
        streamed = self._streamed
        with anyio.CancelScope(shield=True):
            if client._closed:
                raise calls.closed_client()
            if streamed.conn is self._stream_conn and streamed.conn is not None:
                reply = await client._stream_request(streamed, call)
            else:
                reply = await client._run(call)  # its connection is gone: so is the lease
        return reply


class AsyncSubscription:
    """A live subscription to a topic, for async code (see
    :class:`brokerq.Subscription`): iterate with ``async for``, or await
    :meth:`get`. Reading is cancellable at any point: a publish is either
    returned or kept for the next read.
    """

    def __init__(self, client: AsyncClient, topic: str) -> None:
        self.client = client
        self.topic = topic
        self._call = calls.subscribe(topic)
        self._events = calls.LiveEvents()
        self._conn: AsyncConnection | None = None
        self._closed = False
        self._overflowed = False  # dropped by the broker, not closed by its owner

    def __repr__(self) -> str:
        return f"<brokerq.AsyncSubscription {self.topic!r} at {self.client.socket_path!r}>"

    async def _start(self) -> AsyncSubscription:
        if self._conn is None:
            await self._subscribe()
        return self

    def __await__(self) -> Generator[Any, None, AsyncSubscription]:
        return self._start().__await__()

    async def __aenter__(self) -> AsyncSubscription:
        return await self._start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __aiter__(self) -> AsyncSubscription:
        return self

    async def __anext__(self) -> bytes:
        return await self.get()

    async def aclose(self) -> None:
        """End the subscription (closing its connection)."""
        self._closed = True
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await conn.aclose()

    async def _subscribe(self) -> None:
        """Connect and subscribe; events that come before the reply are kept.
        A connection lost before the reply (or a stopping broker's refusal)
        is tried again on a new one, within the client's timeout."""
        give_up = time.monotonic() + self.client.timeout
        while True:
            try:
                await self._subscribe_once(max(give_up - time.monotonic(), 0.001))
                return
            except ConnectionLost:
                if time.monotonic() >= give_up:
                    raise

    async def _subscribe_once(self, timeout: float) -> None:
        if self.client._closed:
            raise calls.closed_client()
        conn = await AsyncConnection.open(
            self.client.socket_path, timeout, spawn=self.client.starts_broker
        )
        try:
            request_id = conn.wire.encode(self._call.kind, self._call.fields)
            with anyio.fail_after(self.client.timeout):
                await conn.stream.send(bytes(conn.wire.out))
                while (reply := self._events.take(conn.wire)) is None:
                    conn.wire.feed(await conn.stream.receive(RECEIVE_SIZE))
            conn.wire.check(self._call.expect, request_id, reply, conn._break)
        except TimeoutError as exc:
            await conn.aclose()
            raise conn.wire.timed_out(self.client.timeout) from exc
        except _STREAM_ERRORS as exc:
            await conn.aclose()
            raise conn.wire.lost(exc) from exc
        except BaseException:
            await conn.aclose()
            raise
        self._conn = conn

    async def get(self, timeout: float | None = None) -> bytes:
        """The next publish's body, waiting up to ``timeout`` (None: for ever;
        0: only what has arrived); raises Empty if none came."""
        protocol.validate_timeout(timeout)
        deadline = None if timeout is None else anyio.current_time() + timeout
        while (body := self._events.next_body()) is None:
            if self._closed:
                raise calls.closed_subscription(self.topic, self._overflowed)
            conn = self._conn
            if conn is None:
                await self._subscribe()
                continue
            self._events.take(conn.wire)  # frames already received
            if self._events.error is not None:
                self._overflowed = True
                await self.aclose()  # dropped by the broker: the bodies before, then the error
                continue
            if self._events.bodies:
                continue
            # A read that finds data waiting returns at once, so a floor of
            # 1 ms lets timeout=0 take what has arrived.
            left = None if deadline is None else max(0.001, deadline - anyio.current_time())
            with anyio.move_on_after(left) as scope:
                try:
                    conn.wire.feed(await conn.stream.receive(RECEIVE_SIZE))
                except _STREAM_ERRORS:
                    # The broker went away: subscribe again on a new connection.
                    self._conn = None
                    await conn.aclose()
            if scope.cancelled_caught:
                raise Empty(f"nothing published to {self.topic!r} within {timeout:g} s")
        return body


def open_async_client(
    socket: str | os.PathLike[str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    *,
    prefetch: int | None = None,
) -> AsyncClient:
    """An async client of the broker at ``socket`` (default: ``$BROKERQ_SOCKET``
    or the per-user path). ``async with open_async_client() as client:``
    connects (spawning the broker if none runs) on entry and closes on exit.
    ``prefetch``: see :class:`brokerq.Client` (None: ``$BROKERQ_PREFETCH``)."""
    return AsyncClient(socket, timeout, prefetch=prefetch)
