"""The async client: anyio, so it runs under trio and asyncio alike
(docs/usage.md, "Async client"). Requests are built and replies judged by
:mod:`.calls` and :mod:`.api`, as in the blocking client; each has a pooled
connection to itself (:mod:`.pool`). A client belongs to one event loop.

A cancelled call loses no message, nor takes one twice (docs/usage.md,
"Cancellation"). Requests that never wait in the broker run shielded,
bounded by the client's ``timeout``: a body taken is returned first. A
``get`` that waits does so as ``reserve``, whose message goes back when a
cancellation closes its connection, as a waiting ``reserve``'s does (a plain
``get``'s would be lost: the broker removes a message as it sends it), then
a shielded ``ack`` (``as_get``: the task stays for ``task_done``). A ``put``
waiting for room is withdrawn when cancelled, or returns its id if the broker
made it first: made again, it is never enqueued twice (see
:meth:`.pool.AsyncConnection.request`). Shields hold off anyio's and trio's
cancel scopes, not asyncio's ``task.cancel()`` (a put made as it came would
spend it): use ``anyio.move_on_after`` / ``fail_after``.
"""

from __future__ import annotations

import functools
import os
import time
import weakref
from collections.abc import Generator, Iterable
from typing import Any

import anyio

from .. import validation
from ..errors import BrokerqError
from ..protocol import GetManyReply, ReserveAnyReply, ReserveReply, StreamDelivery
from . import api, calls
from .api import R, T
from .async_streams import AsyncStreams, AsyncSubscription
from .calls import DEFAULT_TIMEOUT, Body, Call
from .pool import AsyncConnection, _AsyncStreamed

__all__ = ["AsyncClient", "AsyncMessage", "AsyncQueue", "AsyncSubscription", "open_async_client"]


class AsyncClient(AsyncStreams):
    """A broker, named by its socket path; spawned on first use if needed.
    ``async with`` connects at once and closes at the end."""

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
        settings = {"maxsize": maxsize, "max_bytes": max_bytes, "max_deliveries": max_deliveries}
        settings = {k: v for k, v in settings.items() if v is not None}
        return AsyncQueue(name, self, settings | ({} if lease is None else {"lease": lease}))

    async def do(self, op: api.Op[R, T]) -> T:
        """Run ``op`` (:mod:`.api`): its request, and what its reply returns."""
        return op.result(await self._run(op.call))

    async def publish(
        self, topic: str, body: Body, *, priority: int = 0, ttl: float | None = None
    ) -> int:
        limit = await self._limit()
        return await self.do(
            api.publish(topic, body, limit, self._keys.take, priority=priority, ttl=ttl)
        )

    async def get_any(
        self, queues: Iterable[str], timeout: float | None = None
    ) -> tuple[str, bytes]:
        call = calls.get_any(queues, timeout)
        reserve = functools.partial(calls.reserve_any, call.fields["queues"])
        with calls.supported("get_any", "multi-queue wait"):
            reply = await self._take(call, reserve)
        return api.named_body(reply)

    def reserve_any(
        self, queues: Iterable[str], timeout: float | None = None, lease: float | None = None
    ) -> ReservingAny:
        return ReservingAny(self, calls.reserve_any(queues, timeout, lease))

    def subscribe(self, topic: str) -> AsyncSubscription:
        """A live subscription to ``topic``, on a connection of its own, in
        effect once entered (``async with``) or awaited (docs/usage.md, "Topics")."""
        return AsyncSubscription(self, topic)

    async def stats(self) -> dict[str, Any]:
        return await self.do(api.broker_stats())

    async def queues(self) -> list[str]:
        return await self.do(api.queues())


class AsyncQueue:
    """A named queue, for async code: the methods of :class:`brokerq.Queue`, awaited."""

    def __init__(self, name: str, client: AsyncClient, settings: dict[str, Any]) -> None:
        validation.validate_queue_name(name)
        self.name = name
        self.client = client
        self._settings = settings or None
        self._settings_lock = anyio.Lock()

    def __repr__(self) -> str:
        return f"<brokerq.AsyncQueue {self.name!r} at {self.client.socket_path!r}>"

    async def _configured(self) -> None:
        """Apply the settings given to ``client.queue()``, once, before anything else."""
        if self._settings is not None:
            async with self._settings_lock:
                if self._settings is not None:
                    await self.client._run(calls.configure(self.name, **self._settings))
                    self._settings = None

    async def _run(self, call: Call[R]) -> R:
        await self._configured()
        return await self.client._run(call)

    async def _do(self, op: api.Op[R, T]) -> T:
        return op.result(await self._run(op.call))

    async def put(
        self,
        body: Body,
        *,
        priority: int = 0,
        delay: float = 0,
        ttl: float | None = None,
        timeout: float | None = None,
    ) -> int:
        await self._configured()
        options = calls.PutOptions(priority, delay, ttl, timeout)
        limit = await self.client._limit()
        call = calls.put(self.name, body, limit, self.client._keys.take, options)
        return (await self.client._put(call)).msg_id

    async def put_nowait(self, body: Body, **options: Any) -> int:
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
        await self._configured()
        options = calls.PutOptions(priority, delay, ttl, timeout)
        limit = await self.client._limit()
        ids: list[int] = []
        for call in calls.put_many(self.name, bodies, limit, self.client._keys.take, options):
            ids += (await self.client._put(call)).msg_ids
        return ids

    async def get(self, timeout: float | None = None) -> bytes:
        if self.client.prefetch:
            await self._configured()
            streamed = await self.client._take_streamed(self.name, "get", 1, timeout)
            if streamed is not None:
                return streamed[1][0].body
        return (await self._get(calls.get(self.name, timeout))).body

    async def get_nowait(self) -> bytes:
        return await self.get(timeout=0)

    async def get_many(self, n: int, timeout: float | None = None) -> list[bytes]:
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
        """``call`` (a get or get_many) as :meth:`AsyncClient._take` makes it:
        without waiting, shielded; then, if it may wait, by reserve and ack."""
        return await self.client._take(call, functools.partial(calls.reserve, self.name), self._run)

    def reserve(self, timeout: float | None = None, lease: float | None = None) -> Reserving:
        return Reserving(self, calls.reserve(self.name, timeout, lease))

    async def kick(self, n: int = 1) -> int:
        return await self._do(api.kick(self.name, n))

    async def configure(
        self,
        *,
        max_deliveries: int | None = None,
        lease: float | None = None,
        maxsize: int | None = None,
        max_bytes: int | None = None,
    ) -> dict[str, Any]:
        op = api.configure(
            self.name,
            max_deliveries=max_deliveries,
            lease=lease,
            maxsize=maxsize,
            max_bytes=max_bytes,
        )
        return await self._do(op)

    async def delete(self) -> int:
        return await self._do(api.delete(self.name))

    async def peek(self) -> bytes:
        return await self._do(api.peek(self.name))

    async def purge(self) -> int:
        return await self._do(api.purge(self.name))

    async def stats(self) -> dict[str, Any]:
        return await self._do(api.stats(self.name))

    async def qsize(self) -> int:
        return api.qsize(await self.stats())

    async def empty(self) -> bool:
        return api.empty(await self.stats())

    async def task_done(self, n: int = 1) -> None:
        await self._do(api.task_done(self.name, n))

    async def join(self, timeout: float | None = None) -> None:
        await self._do(api.join(self.name, timeout))

    async def unfinished_tasks(self) -> int:
        return api.unfinished_tasks(await self.stats())

    async def subscribe(self, topic: str) -> None:
        await self._do(api.subscribe(self.name, topic))

    async def unsubscribe(self, topic: str) -> bool:
        return await self._do(api.unsubscribe(self.name, topic))


class _Reservation:
    """A reserve to make: awaited for its message, or with ``async with``
    (acked on a clean exit, released on an exception, as a Message is)."""

    message: AsyncMessage | None = None

    async def _reserve(self) -> AsyncMessage:
        raise NotImplementedError

    def __await__(self) -> Generator[Any, None, AsyncMessage]:
        return self._reserve().__await__()

    async def __aenter__(self) -> AsyncMessage:
        self.message = await self._reserve()
        return self.message

    async def __aexit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        assert self.message is not None
        await self.message.__aexit__(exc_type)


class Reserving(_Reservation):
    """What :meth:`AsyncQueue.reserve` returns: awaited, or with ``async with``."""

    def __init__(self, queue: AsyncQueue, call: Call[ReserveReply]) -> None:
        self.queue = queue
        self.call = call

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


class ReservingAny(_Reservation):
    """What :meth:`AsyncClient.reserve_any` returns: awaited, or with ``async with``.
    Its message's ``queue`` is the :class:`AsyncQueue` of the queue it came from."""

    def __init__(self, client: AsyncClient, call: Call[ReserveAnyReply]) -> None:
        self.client = client
        self.call = call

    async def _reserve(self) -> AsyncMessage:
        with calls.supported("reserve_any", "multi-queue wait"):
            reply, conn = await self.client._reserve(self.call)
        return AsyncMessage(self.client.queue(reply.queue), reply, conn)


class AsyncMessage:
    """A reserved message (``body``, ``id``, ``attempt``, ``lease_expires``): its
    verbs run shielded, never sent again after a lost connection. It holds the
    connection its lease came on until settled or collected (then the lease runs out)."""

    def __init__(
        self, queue: AsyncQueue, reply: ReserveReply | ReserveAnyReply, conn: AsyncConnection
    ) -> None:
        self._took(queue, reply, time.monotonic() + reply.lease)
        self._conn: AsyncConnection | None = conn
        self._unpin = weakref.finalize(self, queue.client._recycle, conn)

    def _took(
        self,
        queue: AsyncQueue,
        reply: ReserveReply | ReserveAnyReply | StreamDelivery,
        until: float,
    ) -> None:
        self.queue = queue
        self.id = reply.msg_id
        self.body = reply.body
        self.attempt = reply.attempt
        self.lease_expires = until
        self.settled = False

    def __repr__(self) -> str:
        return f"<brokerq.AsyncMessage {self.id} attempt {self.attempt} of {self.queue.name!r}>"

    async def __aenter__(self) -> AsyncMessage:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        await calls.settle_on_async_exit(self, failed=exc_type is not None)

    async def _verb(self, call: Call[R], *, settles: bool) -> R:
        """A lease verb, on the connection that holds the lease if it is free."""
        client = self.queue.client
        conn, self._conn = self._conn, None
        if conn is None:  # another verb is using it, or it was let go of
            return await client._run(call)
        keep = False
        try:
            with anyio.CancelScope(shield=True):
                client._check_open()
                reply = await conn.request(call, client.timeout)
            keep = not settles
        finally:
            if keep:
                self._conn = conn
            else:
                self._unpin()  # back to the pool (or closed, if broken)
        return reply

    async def _do(self, op: api.Op[R, T], *, settles: bool = True) -> T:
        result = op.result(await self._verb(op.call, settles=settles))
        self.settled = self.settled or settles
        return result

    async def ack(self) -> None:
        await self._do(api.ack(self.id, self.attempt))

    async def release(self, delay: float = 0) -> None:
        await self._do(api.release(self.id, self.attempt, delay))

    async def bury(self) -> None:
        await self._do(api.bury(self.id, self.attempt))

    async def touch(self, lease: float | None = None) -> None:
        touched = await self._do(api.touch(self.id, self.attempt, lease), settles=False)
        self.lease_expires = time.monotonic() + touched


class AsyncStreamedMessage(AsyncMessage):
    """Prefetched: its lease began when handed out, and its verbs go on its stream's
    connection, behind the ``taken`` (:class:`brokerq.client.StreamedMessage`)."""

    def __init__(self, queue: AsyncQueue, taken: StreamDelivery, streamed: _AsyncStreamed) -> None:
        self._took(queue, taken, streamed.state.lease_expires(time.monotonic()))
        self._conn = None
        self._streamed = streamed
        self._stream_conn = streamed.conn

    async def _verb(self, call: Call[R], *, settles: bool) -> R:
        client = self.queue.client
        with anyio.CancelScope(shield=True):
            client._check_open()
            if self._streamed.conn is self._stream_conn and self._stream_conn is not None:
                reply = await client._stream_request(self._streamed, call)
            else:
                reply = await client._run(call)  # its connection is gone: so is the lease
        return reply


api.document(AsyncClient, stats=api.broker_stats)
api.document(AsyncQueue)
api.document(AsyncMessage)


def open_async_client(
    socket: str | os.PathLike[str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    *,
    prefetch: int | None = None,
) -> AsyncClient:
    """An async client of the broker at ``socket``, with ``timeout`` and
    ``prefetch`` as for :func:`brokerq.connect`; ``async with`` connects."""
    return AsyncClient(socket, timeout, prefetch=prefetch)
