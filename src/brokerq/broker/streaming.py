"""The broker's side of streams (``consume``): a Stream in the queue's line,
and a writer task that sends what it is handed as ``delivery`` frames. A
reply takes every delivery not yet sent ahead of it, so any request tells a
client it has every delivery there was. A delivered message stays the
broker's until a ``taken`` frame, even one sent just before the connection ended.
"""

from __future__ import annotations

import contextlib
import socket
from typing import TYPE_CHECKING, cast

import trio

from .. import protocol
from ..errors import InvalidRequest, RemoteProtocolError
from ..protocol import Cancel, CancelReply, Consume, ConsumeReply, Error, Taken
from .core.state import Stream, Waiter
from .unixstream import UnixStream
from .wakeup import STREAM_GONE, Wakeup

if TYPE_CHECKING:
    from .replies import Replies as Connection


def handle(
    conn: Connection, request: Consume | Taken | Cancel, now: float
) -> tuple[protocol.AnyReply | None, list[Waiter]]:
    """Returns the reply (None for ``taken``) and the waiters to wake."""
    if isinstance(request, Taken):
        return None, _taken(conn, request, now)
    if isinstance(request, Consume):
        return _consume(conn, request, now)
    return _cancel(conn, request, now)


def _consume(conn: Connection, request: Consume, now: float) -> tuple[ConsumeReply, list[Waiter]]:
    if request.mode not in ("get", "reserve"):
        raise InvalidRequest(f"mode must be 'get' or 'reserve', not {request.mode!r}")
    if request.id in (conn.streams or {}):
        raise InvalidRequest(f"stream {request.id} is open already: a consume needs a new id")
    stream, served = conn.core.consume(
        request.queue,
        request.prefetch,
        now,
        lease=request.lease,
        reserve=request.mode == "reserve",
        token=Wakeup(),
        owner=conn,
        stream_id=request.id,
    )
    if conn.streams is None:
        conn.streams = {}
    conn.streams[request.id] = stream
    conn.broker.start_task(lambda: _write(conn, stream))
    return ConsumeReply(id=request.id, lease=stream.length or 0.0), served


def _cancel(conn: Connection, request: Cancel, now: float) -> tuple[CancelReply, list[Waiter]]:
    stream = None if conn.streams is None else conn.streams.pop(request.stream, None)
    if stream is None:
        raise InvalidRequest(f"no stream {request.stream} is open on this connection")
    returned, woken = conn.core.cancel_stream(stream, now)
    _wakeup(stream).set()  # its writer sees the stream ended, and returns
    return CancelReply(id=request.id, returned=returned), woken


def _taken(conn: Connection, request: Taken, now: float) -> list[Waiter]:
    stream = None if conn.streams is None else conn.streams.get(request.id)
    try:
        if stream is None:
            raise InvalidRequest(f"taken names stream {request.id}, which is not open here")
        return conn.core.taken(stream, request.n, now)
    except InvalidRequest as exc:
        # No reply can carry this: an error with id 0, and the connection ends.
        protocol.append_frame(conn.out, Error(id=0, code="bad_request", message=str(exc)))
        conn.ending = True
        return []


def taken_while_closing(conn: Connection, request: protocol.AnyRequest) -> list[Waiter] | None:
    """A stopping broker still applies a ``taken`` (None: ``request`` is not one)."""
    if not isinstance(request, Taken) or conn.streams is None:
        return None
    return _taken_if_valid(conn, request, conn.broker.clock())


def _taken_if_valid(conn: Connection, request: Taken, now: float) -> list[Waiter]:
    """A ``taken`` that can no longer be refused: ignored unless valid."""
    stream = (conn.streams or {}).get(request.id)
    if stream is None or not 1 <= request.n <= len(stream.held):
        return []
    return conn.core.taken(stream, request.n, now)


def end_streams(conn: Connection) -> list[Waiter]:
    """Apply the ``taken`` frames the client sent, then end every stream."""
    streams = conn.streams
    if not streams:
        return []
    now = conn.broker.clock()
    woken: list[Waiter] = []
    for request in _frames_left(conn):
        if isinstance(request, Taken):
            woken += _taken_if_valid(conn, request, now)
    for stream in streams.values():
        woken += conn.core.cancel_stream(stream, now)[1]
        _wakeup(stream).set()
    streams.clear()
    return woken


def _frames_left(conn: Connection) -> list[protocol.AnyRequest]:
    """The requests received and not handled, in the buffer or the socket."""
    stream, reader = conn.stream, conn.reader
    if isinstance(stream, UnixStream) and stream.socket.fileno() >= 0:
        sock = stream.socket
        with contextlib.suppress(OSError):  # BlockingIOError: all read; or gone
            sock.shutdown(socket.SHUT_RD)
            while data := sock.recv(65536):
                reader.feed(data)
    requests: list[protocol.AnyRequest] = []
    # A bad frame ends the list: what follows it cannot be trusted.
    with contextlib.suppress(RemoteProtocolError, protocol.InvalidRequestFrame):
        while (payload := reader.next_frame()) is not None:
            requests.append(protocol.decode_request(payload))
    return requests


def _wakeup(stream: Stream) -> Wakeup:
    return cast("Wakeup", stream.token)


async def _write(conn: Connection, stream: Stream) -> None:
    """Send what the core hands ``stream`` until it ends (a cancel wakes it)."""
    lock = conn.send_lock
    wakeup = _wakeup(stream)
    while True:
        if not wakeup.flag:  # (set only while this waits: no checkpoint since)
            with trio.CancelScope() as wakeup.scope:
                await trio.sleep_forever()  # until wake() sets it, cancelling this scope
            wakeup.scope = None
        wakeup.flag = False
        if not stream.active:
            return
        if not stream.messages:
            continue  # sent already, ahead of a reply
        if lock.locked():
            await lock.acquire()
        else:
            lock.acquire_nowait()  # (no checkpoint: the deliveries go at once)
        try:
            if data := conn.stream_frames():
                await conn.stream.send_all(data)
        except STREAM_GONE:
            return
        finally:
            lock.release()
