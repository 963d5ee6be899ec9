"""The broker's side of streams (``consume``): prefetching consumers.

Theory of operation
-------------------
A ``consume`` request opens a stream on a queue: a
:class:`~brokerq.broker.state.Stream` in the queue's line (the core hands it
messages as to any waiter, round robin while it has credit), and a writer
task here that sends what was handed to it as ``delivery`` frames, unasked.
The writer waits on the stream's wakeup, which the core's hand-over sets
(:func:`~brokerq.broker.wakeup.wake`); everything handed to the stream until the
writer runs goes out in one write, so the deliveries of one scheduler round
cost one syscall. Replies and deliveries share the connection's send lock,
and a reply takes every delivery not yet sent ahead of it
(``Replies.stream_frames``): a delivery made before a request was handled
is never sent after its reply, so any request (a ``ping``) tells a client that
it has every delivery there was.

A ``taken`` frame (no reply) says the client handed the stream's first
``n`` untaken deliveries to its application: the core removes them (get
mode) or leases them (reserve mode) and gives the credit back. Until then a
delivered message stays the broker's: when the stream is cancelled, or its
connection ends, it goes back to its place (:meth:`BrokerCore.cancel_stream`).
A ``taken`` the client sent before the connection ended is honoured even so:
on a Unix socket a completed send is in the broker's receive queue, so
:func:`end_streams` reads what is left there (the socket shut for reading
first, so that nothing more can come) and applies the ``taken`` frames it
finds before giving anything back. A stopping broker applies them too
(:func:`taken_while_closing`). A ``taken`` naming no stream, or more than the
stream holds, is a protocol error: ``bad_request`` with id 0, then the
connection is closed (its deliveries go back).

Nothing here runs per request while no stream is open: the connection
checks ``streams is None`` where it must.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, cast

import trio

from .. import protocol
from ..errors import InvalidRequest, RemoteProtocolError
from ..protocol import Cancel, CancelReply, Consume, ConsumeReply, Error, Taken
from .core.state import Stream, Waiter
from .unixstream import UnixStream
from .wakeup import Wakeup

if TYPE_CHECKING:
    from .replies import Replies as Connection

MODES = ("get", "reserve")


def handle(
    conn: Connection, request: Consume | Taken | Cancel, now: float
) -> tuple[protocol.AnyReply | None, list[Waiter]]:
    """Carry out a stream request; returns its reply (None for ``taken``,
    which has none) and the waiters to wake."""
    if isinstance(request, Taken):
        return None, _taken(conn, request, now)
    if isinstance(request, Consume):
        return _consume(conn, request, now)
    return _cancel(conn, request, now)


def _consume(conn: Connection, request: Consume, now: float) -> tuple[ConsumeReply, list[Waiter]]:
    if request.mode not in MODES:
        raise InvalidRequest(f"mode must be 'get' or 'reserve', not {request.mode!r}")
    streams = conn.streams
    if streams is not None and request.id in streams:
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
    if streams is None:
        streams = conn.streams = {}
    streams[request.id] = stream
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
        # No reply can carry this: the stream's state is not the client's.
        # An error with id 0, and the connection ends (Connection._handle).
        protocol.append_frame(conn.out, Error(id=0, code="bad_request", message=str(exc)))
        conn.ending = True
        return []


def taken_while_closing(conn: Connection, request: protocol.AnyRequest) -> list[Waiter] | None:
    """A stopping broker answers requests with ``shutting_down``, but a
    ``taken`` it still applies (the client handed those messages out):
    returns the waiters to wake, or None if ``request`` is no ``taken``."""
    if not isinstance(request, Taken) or conn.streams is None:
        return None
    return _taken_if_valid(conn, request, conn.broker.clock())


def _taken_if_valid(conn: Connection, request: Taken, now: float) -> list[Waiter]:
    """A ``taken`` that can no longer be refused: applied if it names what
    its stream holds, else ignored."""
    stream = (conn.streams or {}).get(request.id)
    if stream is None or not 1 <= request.n <= len(stream.held):
        return []
    return conn.core.taken(stream, request.n, now)


def end_streams(conn: Connection) -> list[Waiter]:
    """The connection ends: apply the ``taken`` frames the client sent
    before it did, then end every stream (what was not taken goes back).
    Returns the waiters to wake."""
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
    """The requests received and not handled: those buffered, and what is
    still in the socket's receive queue (shut for reading first)."""
    stream = conn.stream
    reader = conn.reader
    if isinstance(stream, UnixStream) and stream.socket.fileno() >= 0:
        sock = stream.socket
        try:
            sock.shutdown(socket.SHUT_RD)
            while data := sock.recv(65536):
                reader.feed(data)
        except OSError:
            pass  # BlockingIOError: all read; or gone: nothing more to read
    requests: list[protocol.AnyRequest] = []
    try:
        while (payload := reader.next_frame()) is not None:
            requests.append(protocol.decode_request(payload))
    except (RemoteProtocolError, protocol.InvalidRequestFrame):
        pass  # the rest cannot be trusted
    return requests


def _wakeup(stream: Stream) -> Wakeup:
    return cast("Wakeup", stream.token)


async def _write(conn: Connection, stream: Stream) -> None:
    """Send what the core hands ``stream``, batched: one write for every
    delivery made since the last one. Returns once the stream has ended
    (never cut mid-frame: a cancel wakes it) or the connection broke (its
    request loop sees that and cleans up)."""
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
            data = conn.stream_frames()
            if data:
                await conn.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            lock.release()
