"""The blocking client's streams (``prefetch``: :mod:`.prefetch` holds
their rules) and live subscriptions, each on a connection of its own."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TypeVar

from .. import protocol, validation
from ..errors import LeaseLost, LocalProtocolError
from . import api, calls, prefetch
from .calls import Call, ConnectionLost
from .lanes import Lanes, _Streamed
from .sockio import Connection

R = TypeVar("R", bound=protocol.Reply)


class Streaming(Lanes):
    """:class:`Lanes` with streams: the client's prefetch (see :mod:`.prefetch`)."""

    def take_streamed(
        self, queue: str, mode: str, n: int, timeout: float | None, lease: float | None = None
    ) -> tuple[_Streamed, list[protocol.StreamDelivery]] | None:
        """Up to ``n`` messages of ``queue`` from this thread's stream, waiting up
        to ``timeout`` for the first. None: make a plain request instead (inside
        another call of the thread, or with a broker too old to stream)."""
        validation.validate_timeout(timeout)
        lane = self._lane()
        if lane.busy:
            return None
        lane.busy = True
        try:
            window = lane.window
            if window is not None and window.pending:
                self._read_window(lane, window, 0, time.monotonic())
            streams = lane.streams = {} if lane.streams is None else lane.streams
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
        state = streamed.state
        take = prefetch.Taking(state, timeout, self.timeout, time.monotonic())
        while True:
            try:
                conn = streamed.conn
                if conn is None or conn.closed:
                    conn = self._open_stream(streamed)
                    if conn is None:
                        return None
                step = take.next(time.monotonic())
                if step is prefetch.HAND_OUT:
                    if n > len(state.buffer):  # what has arrived meanwhile goes too
                        self._receive_streamed(streamed, conn, 0.0)
                    items, frame = state.hand_out(n)
                    with conn.exchange(self.timeout):
                        conn.send_reading(frame, time.monotonic() + self.timeout)
                    state.handed(len(items))
                    return items
                if step is prefetch.SYNC:
                    self._stream_request(streamed, conn, calls.ping())
                    take.synced = True
                elif not self._receive_streamed(streamed, conn, take.deadline):
                    raise take.empty()
            except ConnectionLost:
                streamed.conn = None
                if not take.lost(time.monotonic()):
                    raise

    def _open_stream(self, streamed: _Streamed) -> Connection | None:
        """A new connection with the stream open on it; None if the broker
        does not know ``consume`` (then plain requests read the queue)."""
        conn = self._dial()
        self._connections.append(conn)
        if self._closed:
            conn.close()
            raise calls.closed_client()
        streamed.conn = conn
        try:
            reply = self._stream_request(streamed, conn, streamed.state.consume())
        except LocalProtocolError:
            streamed.unsupported = True
            streamed.conn = None
            conn.close()
            return None
        except BaseException:
            streamed.conn = None
            streamed.state.lost()
            conn.close()
            raise
        streamed.state.opened(reply)
        return conn

    def _stream_request(self, streamed: _Streamed, conn: Connection, call: Call[R]) -> R:
        """One request on a stream's connection; the deliveries read with its
        reply go to the buffer now (a later wait on the socket would not see
        them, and with the stream's credit spent the broker sends no more)."""
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
        """Take in what the broker sends by ``deadline``; False if nothing came."""
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

    def settle_streamed(
        self, streamed: _Streamed, held: Connection | None, handed_at: float, call: Call[R]
    ) -> R:
        """A lease verb of a message reserved from a stream: on the stream's
        connection (``held``) when this thread owns it and is in no other call;
        else as a plain request, asked again after a LeaseLost (the broker may
        not have read the ``taken`` yet) for up to the client's timeout."""
        lane = self._lane()
        conn = streamed.conn
        owned = lane.streams is not None and streamed in lane.streams.values()
        if owned and not lane.busy and conn is held and conn is not None and not conn.closed:
            lane.busy = True
            try:
                return self._stream_request(streamed, conn, call)
            finally:
                lane.busy = False
        give_up = handed_at + self.timeout
        while True:
            try:
                return self.run(call)
            except LeaseLost:
                if time.monotonic() > give_up or held is None or held.closed:
                    raise
                time.sleep(0.005)


class Subscription:
    """A live subscription to a topic: the publishes made while it is open.
    If the broker goes away, it subscribes again on a new connection. One
    that reads too slowly is dropped: :meth:`get` then raises SubscriberOverflow.
    """

    def __init__(self, client: Lanes, topic: str) -> None:
        self.client = client
        self.topic = topic
        self._live = calls.LiveEvents(topic)
        self._conn: Connection | None = None
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
        self._live.closed = True
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _subscribe(self) -> None:
        """Connect and subscribe (again after a lost connection, within the
        client's timeout); events that come before the reply are kept."""
        timeout = self.client.timeout
        give_up = time.monotonic() + timeout
        while True:
            left = max(give_up - time.monotonic(), 0.001)
            conn = self.client._dial(left)
            try:
                with conn.exchange(timeout):
                    call = self._live.call
                    request_id = conn.wire.encode(call.kind, call.fields)
                    deadline = time.monotonic() + timeout
                    conn.io.send_all(conn.wire.out, deadline)
                    while (reply := self._live.take(conn.wire)) is None:
                        conn.wire.feed(conn.io.receive(deadline))
                    conn.wire.check(call.expect, request_id, reply, conn.close)
                self._conn = conn
                return
            except ConnectionLost:
                if time.monotonic() >= give_up:
                    raise

    @api.like("live_get")
    def get(self, timeout: float | None = None) -> bytes:
        validation.validate_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            conn = self._conn
            step = self._live.step(None if conn is None else conn.wire)
            if isinstance(step, bytes):
                return step
            if step is calls.SUBSCRIBE:
                self._subscribe()
            elif step is calls.DROP:
                self.close()
            else:
                assert conn is not None
                try:
                    conn.wire.feed(conn.io.receive(deadline))
                except TimeoutError:
                    raise self._live.empty(timeout) from None
                except OSError:
                    # The broker went away: subscribe again on a new connection.
                    conn.close()
                    self._conn = None
