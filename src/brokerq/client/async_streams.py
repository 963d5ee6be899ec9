"""The async client's streams (``prefetch``) and live subscriptions: each
on a connection of its own (:mod:`.prefetch` holds a stream's rules)."""

from __future__ import annotations

import time
from collections.abc import Generator
from typing import Any

import anyio

from .. import protocol, validation
from ..errors import BrokerUnavailable, LocalProtocolError, VersionMismatch
from ..spawn import still_running
from . import api, calls, prefetch
from .calls import Call, ConnectionLost
from .pool import _STREAM_ERRORS, RECEIVE_SIZE, AsyncConnection, Pool, R, _AsyncStreamed
from .sockio import stop_unopened


class AsyncStreams(Pool):
    """:class:`Pool` with streams: the client's prefetch (see :mod:`.prefetch`)."""

    async def _take_streamed(
        self, queue: str, mode: str, n: int, timeout: float | None, lease: float | None = None
    ) -> tuple[_AsyncStreamed, list[protocol.StreamDelivery]] | None:
        """Up to ``n`` messages of ``queue`` from its stream, waiting up to
        ``timeout`` for the first (raises Empty); None: the broker does not stream.
        Cancellable while it waits; the ``taken`` is sent shielded, and last."""
        validation.validate_timeout(timeout)
        self._check_open()
        if (streamed := self._streams.get((queue, mode, lease))) is None:
            state = prefetch.Prefetch(queue, self.prefetch, mode, lease)
            streamed = self._streams[queue, mode, lease] = _AsyncStreamed(state)
        state = streamed.state
        take = prefetch.Taking(state, timeout, self.timeout, anyio.current_time())
        while True:
            if streamed.unsupported:
                return None
            try:
                if streamed.conn is None or streamed.conn.broken:
                    await self._open_stream(streamed)
                    continue
                step = take.next(anyio.current_time())
                if step is prefetch.HAND_OUT:
                    async with streamed.send_lock:
                        items, frame = state.hand_out(n)
                        if not items:
                            continue  # another task took them meanwhile
                        with anyio.CancelScope(shield=True):
                            await streamed.send(frame, self.timeout)
                        state.handed(len(items))
                        return streamed, items
                if step is prefetch.SYNC:
                    with anyio.CancelScope(shield=True):
                        await self._stream_request(streamed, calls.ping())
                    take.synced = True
                else:
                    await streamed.pump(lambda: bool(state.buffer), take.deadline)
            except ConnectionLost:
                await streamed.lose()
                if not take.lost(anyio.current_time()):
                    raise

    async def _open_stream(self, streamed: _AsyncStreamed) -> None:
        conn = await self._dial()
        if self._closed:
            await conn.aclose()
            raise calls.closed_client()
        if streamed.conn is not None and not streamed.conn.broken:
            await conn.aclose()  # another task opened it meanwhile
            return
        streamed.conn = conn
        streamed.replies.clear()
        try:
            with anyio.CancelScope(shield=True):
                reply = await self._stream_request(streamed, streamed.state.consume())
        except LocalProtocolError:  # a broker that does not know consume
            streamed.unsupported = True
            await streamed.lose()
            return
        streamed.state.opened(reply)

    async def _stream_request(self, streamed: _AsyncStreamed, call: Call[R]) -> R:
        """A request on a stream's connection: its reply is read by whichever task reads."""
        conn = streamed.conn
        if conn is None or conn.broken:
            raise ConnectionLost(f"the stream's connection to {self.socket_path} was lost")
        async with streamed.send_lock:
            request_id = conn.wire.encode(call.kind, call.fields)
            if call.kind is protocol.Consume:
                streamed.state.opening(request_id)
            await streamed.send(bytes(conn.wire.out), self.timeout)
        deadline = anyio.current_time() + self.timeout
        await streamed.pump(lambda: request_id in streamed.replies, deadline, strict=True)
        reply = streamed.replies.pop(request_id)
        return conn.wire.check(call.expect, request_id, reply, conn._break)

    async def ping(self) -> float:
        conn = await self._acquire()
        try:
            with anyio.CancelScope(shield=True):
                start = time.perf_counter()
                await conn.request(calls.ping(), self.timeout)
                elapsed = time.perf_counter() - start
        finally:
            await self._release(conn)
        return elapsed

    async def stop(self) -> bool:
        self._check_open()
        try:
            conn = await self._dial(spawn=False)
        except (VersionMismatch, BrokerUnavailable) as exc:
            return await anyio.to_thread.run_sync(
                stop_unopened, self.socket_path, exc, self.timeout
            )
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


api.document(AsyncStreams)


class AsyncSubscription:
    """A live subscription to a topic (see :class:`brokerq.Subscription`).
    Reading is cancellable at any point: a publish is returned or kept."""

    def __init__(self, client: Pool, topic: str) -> None:
        self.client = client
        self.topic = topic
        self._live = calls.LiveEvents(topic)
        self._conn: AsyncConnection | None = None

    def __repr__(self) -> str:
        return f"<brokerq.AsyncSubscription {self.topic!r} at {self.client.socket_path!r}>"

    async def _start(self) -> AsyncSubscription:
        await self._subscribe()  # (if not subscribed yet)
        return self

    def __await__(self) -> Generator[Any, None, AsyncSubscription]:
        return self._start().__await__()

    __aenter__ = _start

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __aiter__(self) -> AsyncSubscription:
        return self

    async def aclose(self) -> None:
        """End the subscription (closing its connection)."""
        self._live.closed = True
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await conn.aclose()

    async def _subscribe(self) -> None:
        """Connect and subscribe (keeping events that come before the reply), again
        after a lost connection or a stopping broker's refusal, within the timeout."""
        give_up = time.monotonic() + self.client.timeout
        while self._conn is None:
            self.client._check_open()
            conn = await self.client._dial(max(give_up - time.monotonic(), 0.001))
            try:
                await conn.request(self._live.call, self.client.timeout, take=self._live.take)
                self._conn = conn
            except BaseException as exc:
                await conn.aclose()
                if not isinstance(exc, ConnectionLost) or time.monotonic() >= give_up:
                    raise

    @api.like("live_get")
    async def get(self, timeout: float | None = None) -> bytes:
        validation.validate_timeout(timeout)
        deadline = None if timeout is None else anyio.current_time() + timeout
        while True:
            conn = self._conn
            step = self._live.step(None if conn is None else conn.wire)
            if isinstance(step, bytes):
                return step
            if step is calls.SUBSCRIBE:
                await self._subscribe()
            elif step is calls.DROP:
                await self.aclose()
            else:
                assert conn is not None
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
                    raise self._live.empty(timeout)

    __anext__ = get
