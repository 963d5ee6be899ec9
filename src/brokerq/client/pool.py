"""The async client's core: connections (a stream's too, for :mod:`.async_streams`),
the pool, and the calls run on it, with their retries and rules of cancellation
(:mod:`.asynchronous`). A request has a connection to itself until its reply is
read (docs/usage.md, "Tasks"); one whose exchange did not finish is closed,
never reused: its replies would be out of step with its requests.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, Self, TypeVar

import anyio
from anyio.abc import UNIXSocketStream

from .. import protocol
from ..errors import BrokerqError, BrokerUnavailable, Empty, Full, LeaseLost, VersionMismatch
from ..protocol import HelloReply, ReserveAnyReply, ReserveReply
from ..spawn import connect_or_spawn, resolve_socket_path
from . import calls, prefetch
from .calls import Call, ConnectionLost
from .sockio import retire_older_broker

R = TypeVar("R", bound=protocol.Reply)
#: A reserve's reply: of one queue, or of the first of several.
Reserved = TypeVar("Reserved", ReserveReply, ReserveAnyReply)
Then = Callable[["AsyncConnection", R], Awaitable[None]]

#: Idle connections a client keeps for reuse; more are closed when given back.
MAX_IDLE = 4
#: Bytes one receive may take: anyio receives with ``recv(n)``, which
#: allocates ``n`` bytes each time; past 128 KiB glibc maps and unmaps them,
#: several times the cost of a 64 KiB receive.
RECEIVE_SIZE = 64 * 1024
_STREAM_ERRORS = (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream)


async def _connect(socket_path: str, deadline: float, spawn: bool) -> UNIXSocketStream:
    """A stream from ``connect_or_spawn``, run in a thread the caller may abandon:
    it runs on to its deadline, and the socket it then returns is closed."""
    lock = threading.Lock()
    abandoned = False
    connected: list[socket.socket] = []

    def connect() -> socket.socket:
        sock = connect_or_spawn(socket_path, deadline, spawn=spawn)
        with lock:
            connected.append(sock)
            if abandoned:
                sock.close()
        return sock

    try:
        sock = await anyio.to_thread.run_sync(connect, abandon_on_cancel=True)
        sock.setblocking(False)
        return await UNIXSocketStream.from_socket(sock)
    except BaseException as exc:
        with lock:
            abandoned = True
            for sock in connected:
                sock.close()
        if isinstance(exc, OSError) and not connected:  # connecting failed
            raise calls.unreachable(socket_path, exc) from exc
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
        while True:
            conn = cls(await _connect(socket_path, deadline, spawn), calls.Wire(socket_path))
            try:
                reply = await conn.request(calls.hello(), max(deadline - time.monotonic(), 0.001))
                break
            except VersionMismatch as exc:
                await conn.aclose()
                # An upgrade: retire the older broker (as the blocking client does).
                older = calls.broker_to_retire(socket_path, exc, may_retire=spawn)
                await anyio.to_thread.run_sync(retire_older_broker, socket_path, older, deadline)
            except BaseException as exc:
                await conn.aclose()
                # Lost (a broker that died or idled out just after accepting us):
                # connect again, which finds or starts the next one. Else raise.
                if not isinstance(exc, ConnectionLost) or time.monotonic() >= deadline:
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
        withdraw: float | None = None,
        take: Callable[[calls.Wire], protocol.AnyReply | None] = calls.Wire.next_reply,
    ) -> R:
        """Send ``call`` (``fields`` instead of its own, if given); return its reply,
        read by ``take``, within ``limit`` (None: no bound). An unfinished exchange
        breaks the connection; a reply out of step, or an error after which the
        broker closes it, closes it. With ``withdraw``, a cancelled put is withdrawn
        (:meth:`_withdraw`), or its reply returned if it was made first."""
        request_id = self.wire.encode(call.kind, call.fields if fields is None else fields)
        try:
            with anyio.fail_after(limit):
                await self.stream.send(bytes(self.wire.out))
                while (reply := take(self.wire)) is None:
                    self.wire.feed(await self.stream.receive(RECEIVE_SIZE))
        except BaseException as exc:  # (or cancelled, or a reply that cannot be read)
            self.broken = True
            if isinstance(exc, TimeoutError):
                raise self.wire.timed_out(limit) from exc
            if isinstance(exc, _STREAM_ERRORS):
                raise self.wire.lost(exc) from exc
            if withdraw is not None and isinstance(exc, anyio.get_cancelled_exc_class()):
                made = await self._withdraw(call, request_id, withdraw)
                if made is not None:
                    return made
            raise
        try:
            return self.wire.check(call.expect, request_id, reply, self._break)
        finally:
            if self.broken:
                await self.aclose()

    async def _withdraw(self, call: Call[R], request_id: int, timeout: float) -> R | None:
        """Shut down the sending side and read, shielded, up to ``timeout``: the
        broker withdraws a put still waiting and closes, or writes the reply of a
        put made first (docs/protocol.md, section 4). Returns that reply, or None
        (withdrawn, refused, never sent whole); raises BrokerUnavailable if not
        told. Closed here, shielded, the connection's next close is no checkpoint
        whose cancellation would replace that error or reply."""
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
        refused = isinstance(reply, protocol.Error) and reply.code in ("full", "shutting_down")
        if reply is None or (refused and reply.id == request_id):
            return None
        return self.wire.check(call.expect, request_id, reply, self._break)


class _AsyncStreamed:
    """A stream of an async client: its sans-IO state, its connection, and the
    replies read for other tasks: one task at a time reads (:meth:`pump`) for all."""

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
            conn = self.conn
            left = None if deadline is None else deadline - anyio.current_time()
            if left is not None and left <= 0:
                if strict and conn is not None:  # a reply that did not come in time
                    await self.lose()
                    raise conn.wire.timed_out(left)
                return
            if conn is None or conn.broken:
                raise ConnectionLost("the stream's connection was lost")
            if self.reading:
                with anyio.move_on_after(left):
                    await self.arrived.wait()
                continue
            self.reading = True
            try:
                with anyio.move_on_after(left):
                    conn.wire.feed(await conn.stream.receive(RECEIVE_SIZE))
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


class Pool:
    """The core of an :class:`~brokerq.AsyncClient`: its pool, and the calls run on it."""

    def __init__(
        self,
        socket: str | os.PathLike[str] | None = None,
        timeout: float = calls.DEFAULT_TIMEOUT,
        *,
        prefetch: int | None = None,
    ) -> None:
        self.socket_path = resolve_socket_path(socket)
        self.timeout, self.starts_broker = calls.client_timeout(timeout)
        self.prefetch = calls.prefetch(prefetch)
        #: The streams, by queue, mode and lease (:mod:`.async_streams`).
        self._streams: dict[tuple[str, str, float | None], _AsyncStreamed] = {}
        #: The broker's body limit, from the latest connection's hello.
        self.max_message_size: int | None = None
        self._closed = False
        self._idle: list[AsyncConnection] = []
        self._open: set[AsyncConnection] = set()
        self._keys = calls.PutKeys()

    def __repr__(self) -> str:
        return f"<brokerq.AsyncClient {self.socket_path!r}{' closed' if self._closed else ''}>"

    async def __aenter__(self) -> Self:
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
        connections = [*self._open, *(s.conn for s in self._streams.values() if s.conn is not None)]
        self._open.clear()
        self._idle.clear()
        self._streams.clear()
        for conn in connections:
            await conn.aclose()

    def _check_open(self) -> None:
        if self._closed:
            raise calls.closed_client()

    async def _dial(self, timeout: float | None = None, *, spawn: bool = True) -> AsyncConnection:
        """A new connection, within ``timeout`` (None: the client's)."""
        timeout = self.timeout if timeout is None else timeout
        spawn = spawn and self.starts_broker
        return await AsyncConnection.open(self.socket_path, timeout, spawn=spawn)

    async def _acquire(self, *, spawn: bool = True) -> AsyncConnection:
        """An idle connection, else a new one (connecting, or spawning, now)."""
        while self._idle:  # (a closed client has none)
            conn = self._idle.pop()
            if not conn.broken:
                return conn
            await self._discard(conn)
        self._check_open()
        conn = await self._dial(spawn=spawn)
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

    async def _run(self, call: Call[R], then: Then[R] | None = None) -> R:
        """Run ``call`` (shielded if it never waits), retrying on a lost connection;
        ``then`` runs on its connection after the reply (a get's ack, say)."""
        with anyio.CancelScope(shield=call.wait == 0):
            reply = await self._attempts(call, then, None)
        return reply  # noqa: RET504 (mypy: a cancel scope may swallow the return)

    async def _attempts(self, call: Call[R], then: Then[R] | None, withdraw: float | None) -> R:
        attempts = calls.Attempts(call, self.timeout, anyio.current_time())
        while True:
            conn = await self._acquire()
            try:
                limit = attempts.start(anyio.current_time())
                reply = await conn.request(call, limit, attempts.fields, withdraw)
                if then is not None:
                    await then(conn, reply)
                return reply
            except ConnectionLost as exc:  # (or a stopping broker's refusal)
                if conn.broken:
                    await self._forget(conn.hello.pid)
                if not attempts.again(anyio.current_time(), exc):
                    raise
            finally:
                await self._release(conn)

    async def _take(
        self,
        call: Call[R],
        reserve: Callable[[float | None, float], Call[Reserved]],
        run: Callable[[Call[R]], Awaitable[R]] | None = None,
    ) -> R | Reserved:
        """A get (``call``: a get, get_many or get_any) made without waiting,
        shielded, by ``run`` (default :meth:`_run`); then, if nothing was ready
        and it may wait, as ``reserve(wait left, lease)`` and a shielded ack
        (see :mod:`.asynchronous`)."""
        start = anyio.current_time()
        try:
            return await (run or self._run)(call.with_timeout(0))
        except Empty:
            if call.wait == 0:
                raise
        lease = max(self.timeout, 1.0)  # long enough for the ack

        async def ack(conn: AsyncConnection, reply: Reserved) -> None:
            ack = calls.ack(reply.msg_id, reply.attempt, as_get=True)  # task_done's
            try:
                with anyio.CancelScope(shield=True):
                    await conn.request(ack, self.timeout)
            except LeaseLost as exc:  # it went back to the queue: ask again
                raise ConnectionLost(f"the lease of a get ran out before its ack: {exc}") from exc

        return await self._run(reserve(_left(call.wait, start), lease), ack)

    async def _reserve(self, call: Call[Reserved]) -> tuple[Reserved, AsyncConnection]:
        """A reserve, and the connection that now holds its lease."""
        holder: list[AsyncConnection] = []

        async def pin(conn: AsyncConnection, reply: Reserved) -> None:
            conn.pinned = True
            holder.append(conn)

        reply = await self._run(call, pin)
        return reply, holder[0]

    async def _put(self, call: Call[R]) -> R:
        """A put that may wait for room: sent first without waiting (shielded),
        and only if the queue is full again, with the same key, to wait."""
        if call.wait == 0:
            return await self._run(call)
        start = anyio.current_time()
        with contextlib.suppress(Full):
            return await self._run(call.with_timeout(0))
        return await self._attempts(call.with_timeout(_left(call.wait, start)), None, self.timeout)

    async def _limit(self) -> int:
        """The broker's body limit (connecting first if no connection told it yet)."""
        if self.max_message_size is None:
            await self._release(await self._acquire())
        assert self.max_message_size is not None
        return self.max_message_size


def _left(timeout: float | None, start: float) -> float | None:
    return None if timeout is None else max(0.0, timeout - (anyio.current_time() - start))
