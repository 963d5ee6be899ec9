"""The trio broker: the thin I/O layer around :class:`~brokerq.core.BrokerCore`.

One task per connection reads frames, asks the core, and writes replies.
Requests of a connection are answered in order; everything that is already
buffered is handled before the replies go out in one write, so a client that
pipelines pays one syscall per batch, not per request. A reply that carries
messages is written on its own and at once: if that write fails, the client
cannot have read the reply, and the messages go back to the head of their
queue (a ``get`` is at-most-once, but never lost in transit).

A blocking ``get`` parks a :class:`~brokerq.core.Waiter` in the core and
waits on a :class:`trio.Event`, its deadline, and the connection's end, all
at once: a client that disconnects stops waiting at once and is removed
from the line.

Housekeeping runs once a second: idle exit (unlink the socket while still
holding the lock, serve the backlog briefly, then exit, or publish again if
work arrived) and the self-check (the socket or lock file removed or
replaced under the broker: exit, since another broker may now own the path).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import socket as stdlib_socket
from dataclasses import dataclass
from typing import Any, Final

import trio

from . import __version__, protocol
from .core import BrokerCore, Message, Waiter
from .errors import BrokerqError, InvalidRequest, PermissionDenied, RemoteProtocolError
from .protocol import (
    PROTOCOL_VERSION,
    Error,
    FrameReader,
    Get,
    GetMany,
    GetManyReply,
    GetReply,
    Hello,
    HelloReply,
    InvalidRequestFrame,
    Peek,
    PeekReply,
    Ping,
    PingReply,
    Purge,
    PurgeReply,
    Put,
    PutMany,
    PutManyReply,
    PutReply,
    Queues,
    QueuesReply,
    Stats,
    StatsReply,
    Stop,
    StopReply,
)
from .spawn import check_peer, file_identity, lock_path, publish_socket

log = logging.getLogger("brokerq.broker")

RECEIVE_SIZE: Final = 256 * 1024
#: How long an idle-exiting broker keeps serving its backlog after the unlink.
DRAIN_SECONDS: Final = 0.1
#: How long connections get to finish after a stop before they are cut.
STOP_GRACE_SECONDS: Final = 1.0
HOUSEKEEPING_SECONDS: Final = 1.0


@dataclass(frozen=True)
class BrokerConfig:
    """The broker's options (``local-queue-broker --help`` documents each)."""

    socket_path: str
    idle_exit: float = 300.0
    max_message_size: int = protocol.DEFAULT_MAX_MESSAGE_SIZE
    data_dir: str | None = None
    fsync: str = "batch"


class _PeerGone(Exception):
    """The connection ended; its task winds up quietly."""


class Broker:
    """One broker process's serving state (the core plus connection bookkeeping)."""

    def __init__(self, config: BrokerConfig) -> None:
        self.config = config
        self.core = BrokerCore(max_message_size=config.max_message_size)
        self.max_frame_size = protocol.max_frame_size(config.max_message_size)
        self.connections = 0
        self.accepted_total = 0
        self.started_at = 0.0
        self.last_activity = 0.0
        self.closing = False
        self._stop_requested = trio.Event()
        self._live: set[_Connection] = set()

    # -- lifecycle ---------------------------------------------------------

    def request_stop(self, why: str) -> None:
        if not self._stop_requested.is_set():
            log.info("stopping: %s", why)
            self._stop_requested.set()

    async def serve(
        self,
        listener: stdlib_socket.socket | None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until stopped. ``listener`` None serves no socket (tests use
        :meth:`handle_stream` directly)."""
        self.started_at = self.last_activity = trio.current_time()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if listener is not None:
                self._socket_identity = file_identity(self.config.socket_path)
                self._lock_identity = file_identity(lock_path(self.config.socket_path))
                self._listener_scope = await nursery.start(self._accept_loop, listener)
                nursery.start_soon(self._housekeeping)
            nursery.start_soon(self._watch_signals)
            task_status.started()
            await self._stop_requested.wait()
            await self._shut_down(nursery)

    async def _shut_down(self, nursery: trio.Nursery) -> None:
        """Stop taking work, answer the waiters, give busy connections a grace."""
        self.closing = True
        self._unpublish()
        if hasattr(self, "_listener_scope"):
            self._listener_scope.cancel()
        for waiter in self.core.all_waiters():
            _wake(waiter)  # each replies "shutting_down" and closes
        for conn in self._live:
            if conn.idle:
                conn.scope.cancel()
        with trio.move_on_after(STOP_GRACE_SECONDS):
            while self.connections:
                await trio.sleep(0.01)
        for conn in self._live:
            conn.scope.cancel()
        nursery.cancel_scope.cancel()

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                self.request_stop(f"signal {signal.Signals(signum).name}")

    # -- the listening socket ------------------------------------------------

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
        """Serve ``stream`` as a client connection, in the broker's nursery."""
        self._nursery.start_soon(self.handle_stream, stream)

    def _unpublish(self) -> None:
        """Unlink the socket path, if it is still ours (we hold the lock)."""
        path = self.config.socket_path
        if getattr(self, "_socket_identity", None) and file_identity(path) == self._socket_identity:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self._socket_identity = None

    async def _housekeeping(self) -> None:
        while True:
            await trio.sleep(min(HOUSEKEEPING_SECONDS, max(self.config.idle_exit / 2, 0.01)))
            if self._files_replaced():
                self.request_stop("socket or lock file removed or replaced")
                return
            if self._idle_for() >= self.config.idle_exit:
                await self._try_idle_exit()

    def _files_replaced(self) -> bool:
        path = self.config.socket_path
        if self._socket_identity and file_identity(path) != self._socket_identity:
            return True
        return file_identity(lock_path(path)) != self._lock_identity

    def _idle_for(self) -> float:
        if self.connections or self.core.holds_messages():
            return 0.0
        return trio.current_time() - self.last_activity

    async def _try_idle_exit(self) -> None:
        """Unlink, drain the backlog briefly, then exit, or publish again."""
        log.info("idle for %.1f s: exiting", self._idle_for())
        self._unpublish()
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

    # -- one connection --------------------------------------------------------

    async def _handle_socket(self, conn: trio.socket.SocketType) -> None:
        stream = trio.SocketStream(conn)
        try:
            check_peer(conn, "the client")  # type: ignore[arg-type]
        except (PermissionDenied, OSError) as exc:
            log.warning("refused a connection: %s", exc)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(
                    protocol.encode_frame(Error(id=0, code="permission", message=str(exc)))
                )
            await stream.aclose()
            return
        await self.handle_stream(stream)

    async def handle_stream(self, stream: trio.abc.Stream) -> None:
        """Serve one client connection until it closes."""
        conn = _Connection(self, stream)
        self.connections += 1
        self._live.add(conn)
        try:
            with conn.scope:
                await conn.run()
        except _PeerGone:
            pass
        except Exception:  # a bug must cost one connection, never the broker
            log.exception("connection failed")
        finally:
            self._live.discard(conn)
            self.connections -= 1
            self.last_activity = trio.current_time()
            with contextlib.suppress(Exception):
                await stream.aclose()

    def stats(self) -> dict[str, Any]:
        now = trio.current_time()
        return {
            "pid": os.getpid(),
            "version": __version__,
            "protocol": PROTOCOL_VERSION,
            "uptime_s": now - self.started_at,
            "connections": self.connections,
            "max_message_size": self.config.max_message_size,
            "idle_exit_s": None if math.isinf(self.config.idle_exit) else self.config.idle_exit,
            **self.core.totals(),
        }


def _wake(waiter: Waiter) -> None:
    event = waiter.token
    assert isinstance(event, trio.Event)
    event.set()


def _wake_all(waiters: list[Waiter]) -> None:
    for waiter in waiters:
        _wake(waiter)


_BLOCK: Final = object()


class _Connection:
    """The request loop of one connection (see the module doc)."""

    def __init__(self, broker: Broker, stream: trio.abc.Stream) -> None:
        self.broker = broker
        self.core = broker.core
        self.stream = stream
        self.reader = FrameReader(protocol.HANDSHAKE_FRAME_LIMIT)
        self.out = bytearray()
        self.greeted = False
        self.scope = trio.CancelScope()
        self.idle = False  # waiting for a request: a stopping broker cuts it at once

    async def run(self) -> None:
        while True:
            await self._handle_buffered()
            await self._flush()
            if self.broker.closing:
                return
            self.idle = True
            data = await self._receive()
            self.idle = False
            if not data:
                return
            self.reader.feed(data)

    async def _receive(self) -> bytes | bytearray:
        try:
            return await self.stream.receive_some(RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return b""

    async def _handle_buffered(self) -> None:
        """Answer every complete request already received."""
        while True:
            try:
                payload = self.reader.next_frame()
                if payload is None:
                    return
                request = protocol.decode_request(payload)
            except InvalidRequestFrame as exc:
                self._reply_error(exc.request_id, "bad_request", str(exc))
                if not self.greeted:
                    await self._close_with_error()
                continue
            except RemoteProtocolError as exc:
                self._reply_error(0, "bad_frame", str(exc))
                await self._close_with_error()
            await self._handle(request)

    async def _close_with_error(self) -> None:
        await self._flush()
        raise _PeerGone

    def _reply_error(self, request_id: int, code: str, message: str) -> None:
        protocol.append_frame(self.out, Error(id=request_id, code=code, message=message))

    async def _handle(self, request: protocol.AnyRequest) -> None:
        if self.broker.closing:
            self._reply_error(request.id, "shutting_down", "the broker is stopping")
            return
        if not self.greeted:
            if not self._greet(request):
                await self._close_with_error()
            return
        try:
            reply = self._dispatch(request)
            if reply is _BLOCK:
                await self._flush()
                assert isinstance(request, Get | GetMany)
                reply = await self._wait_for_message(request)
        except BrokerqError as exc:
            self._reply_error(request.id, exc.code, str(exc))
            return
        except (_PeerGone, trio.Cancelled):
            raise
        except Exception as exc:
            log.exception("request %r failed", type(request).__name__)
            self._reply_error(request.id, "internal", f"internal error: {exc!r}")
            return
        if isinstance(reply, _Delivery):
            await self._send_delivery(reply)
        else:
            assert isinstance(reply, protocol.Reply)
            protocol.append_frame(self.out, reply)
        if isinstance(request, Stop):
            await self._flush()
            self.broker.request_stop("stop requested by a client")

    def _greet(self, request: protocol.AnyRequest) -> bool:
        """Answer the handshake; False if the connection must be closed."""
        if not isinstance(request, Hello):
            self._reply_error(request.id, "bad_request", "the first request must be hello")
            return False
        if request.version != PROTOCOL_VERSION:
            self._reply_error(
                request.id,
                "version",
                f"client speaks protocol {request.version}, "
                f"this broker speaks {PROTOCOL_VERSION} (brokerq {__version__})",
            )
            return False
        self.greeted = True
        self.reader.max_frame_size = self.broker.max_frame_size
        protocol.append_frame(
            self.out,
            HelloReply(
                id=request.id,
                version=PROTOCOL_VERSION,
                server=f"brokerq {__version__}",
                pid=os.getpid(),
                max_message_size=self.broker.config.max_message_size,
                max_frame_size=self.broker.max_frame_size,
            ),
        )
        return True

    def _dispatch(self, request: protocol.AnyRequest) -> protocol.AnyReply | object:
        """Answer ``request`` without waiting, or return _BLOCK to park it."""
        core = self.core
        now = trio.current_time()
        match request:
            case Put(id=rid, queue=queue, body=body):
                msg_id, waiter = core.put(queue, body, now)
                if waiter is not None:
                    _wake(waiter)
                return PutReply(id=rid, msg_id=msg_id)
            case Get(id=rid, queue=queue, timeout=timeout):
                protocol.validate_timeout(timeout)
                messages = core.get_nowait(queue)
                if messages:
                    return _Delivery(queue, messages, many=False, request_id=rid)
                return _BLOCK if timeout != 0 else _empty(rid, queue)
            case GetMany(id=rid, queue=queue, n=n, timeout=timeout):
                protocol.validate_timeout(timeout)
                if n < 1:
                    raise InvalidRequest(f"get_many needs n >= 1, not {n}")
                messages = core.get_nowait(queue, n, self._batch_bytes())
                if messages:
                    return _Delivery(queue, messages, many=True, request_id=rid)
                return _BLOCK if timeout != 0 else _empty(rid, queue)
            case PutMany(id=rid, queue=queue, bodies=bodies):
                ids, woken = core.put_many(queue, bodies, now)
                _wake_all(woken)
                return PutManyReply(id=rid, msg_ids=ids)
            case Peek(id=rid, queue=queue):
                msg = core.peek(queue)
                if msg is None:
                    return _empty(rid, queue)
                return PeekReply(id=rid, msg_id=msg.id, body=msg.body)
            case Purge(id=rid, queue=queue):
                return PurgeReply(id=rid, count=core.purge(queue))
            case Stats(id=rid, queue=None):
                return StatsReply(id=rid, stats=self.broker.stats())
            case Stats(id=rid, queue=str(queue)):
                return StatsReply(id=rid, stats=core.queue_stats(queue, now))
            case Queues(id=rid):
                return QueuesReply(id=rid, names=core.queue_names())
            case Ping(id=rid):
                return PingReply(id=rid, pid=os.getpid())
            case Stop(id=rid):
                return StopReply(id=rid)
            case Hello(id=rid):
                return Error(id=rid, code="bad_request", message="hello was already sent")
        raise AssertionError(f"unhandled request {request!r}")  # pragma: no cover

    def _batch_bytes(self) -> int:
        """What a ``get_many`` batch may take of one reply frame (see core.get_nowait)."""
        return self.broker.max_frame_size - 1024

    async def _wait_for_message(self, request: Get | GetMany) -> _Delivery | Error:
        """Park until a message is handed over, the deadline, or the peer leaves."""
        waiter = self.core.wait(request.queue, trio.Event())
        event = waiter.token
        assert isinstance(event, trio.Event)
        peer_gone = False
        timeout = math.inf if request.timeout is None else request.timeout
        try:
            async with trio.open_nursery() as nursery:

                async def watch_peer() -> None:
                    nonlocal peer_gone
                    while True:
                        data = await self._receive()
                        if not data:
                            peer_gone = True
                            nursery.cancel_scope.cancel()
                            return
                        # Pipelined requests wait their turn in the reader;
                        # past a frame's worth, stop reading (backpressure).
                        self.reader.feed(data)
                        if self.reader.buffered > self.reader.max_frame_size:
                            await trio.sleep_forever()

                nursery.start_soon(watch_peer)
                with trio.move_on_after(timeout):
                    await event.wait()
                nursery.cancel_scope.cancel()
        except BaseException:
            _wake_all(self.core.cancel_wait(waiter))
            raise
        if peer_gone:
            _wake_all(self.core.cancel_wait(waiter))
            raise _PeerGone
        if not waiter.served:
            self.core.cancel_wait(waiter)
            if self.broker.closing:
                return Error(id=request.id, code="shutting_down", message="the broker is stopping")
            return _empty(request.id, request.queue)
        messages = waiter.messages
        if isinstance(request, GetMany) and request.n > len(messages):
            room = self._batch_bytes() - sum(
                len(m.body) + protocol.MESSAGE_OVERHEAD for m in messages
            )
            messages += self.core.get_nowait(request.queue, request.n - len(messages), room)
        return _Delivery(request.queue, messages, isinstance(request, GetMany), request.id)

    async def _send_delivery(self, delivery: _Delivery) -> None:
        """Write a reply carrying messages now; if that fails they go back.

        Written alone and at once, so a failed write means the client cannot
        have read this reply: putting its messages back at the head keeps
        ``get`` at-most-once without ever losing a message in transit.
        """
        protocol.append_frame(self.out, delivery.reply())
        try:
            await self._flush()
        except _PeerGone:
            _wake_all(self.core.undeliver(delivery.queue, delivery.messages))
            raise

    async def _flush(self) -> None:
        if not self.out:
            return
        try:
            await self.stream.send_all(self.out)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise _PeerGone from exc
        finally:
            self.out.clear()


@dataclass(slots=True)
class _Delivery:
    """Messages taken off a queue for one reply, until that reply is written."""

    queue: str
    messages: list[Message]
    many: bool
    request_id: int

    def reply(self) -> GetReply | GetManyReply:
        if self.many:
            return GetManyReply(
                id=self.request_id,
                msg_ids=[m.id for m in self.messages],
                bodies=[m.body for m in self.messages],
            )
        (msg,) = self.messages
        return GetReply(id=self.request_id, msg_id=msg.id, body=msg.body)


def _empty(request_id: int, queue: str) -> Error:
    return Error(id=request_id, code="empty", message=f"queue {queue!r} is empty")
