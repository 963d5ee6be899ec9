"""One client connection: reading and dispatch, over Replies and Deliveries.

When it ends, every lease it holds is released, and the replies it is owed
(waiting for their fsync too) are written first, so a peer that shut down
only its sending side learns whether its put was made (protocol.md 4). A
frame begun must be complete within ``frame_timeout`` seconds waited in all;
a connection idle between frames is never timed out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import trio

from .. import protocol, validation
from ..errors import BrokerqError, InvalidRequest, QueueFull, RemoteProtocolError
from ..protocol import PROTOCOL_VERSION
from ..version import __version__
from . import streaming
from .core import limits
from .core.state import QUEUE_LEASE
from .delivery import SENT, Deliveries, Delivery, empty, join_timeout, put_options, shutting_down
from .feeds import OVERFLOW_GRACE_SECONDS, LiveFeed
from .journal import JournalFailed
from .wakeup import PeerGone, wake, wake_all

if TYPE_CHECKING:
    from .broker_base import BrokerBase

__all__ = ["OVERFLOW_GRACE_SECONDS", "Connection"]

_BLOCK: Final = object()
_SETTINGS: Final = ("max_deliveries", "lease", "maxsize", "max_bytes")  # of a configure
_TAKES: Final = (
    protocol.Get,
    protocol.GetMany,
    protocol.Reserve,
    protocol.GetAny,
    protocol.ReserveAny,
)
#: For a closing connection to write what it owes (a timeout's error, replies after fsync).
TIMEOUT_GRACE_SECONDS: Final = 1.0


class Connection(Deliveries):
    def __init__(self, broker: BrokerBase, stream: trio.abc.Stream) -> None:
        super().__init__(broker, stream)
        self.greeted = self.frame_taken = False
        self.idle = False  # waiting for a request: a stopping broker cuts it at once
        self.live_topics: dict[str, int] = {}  # topic -> id of its subscribe request
        self.waited = 0.0  # for the rest of the frame buffered now (or the hello)

    async def run(self) -> None:
        try:
            while True:
                await self._handle_buffered()
                await self._flush()
                if self.broker.closing:
                    break
                self.idle = True
                data = await self._receive_in_time()
                self.idle = False
                if not data:  # the replies owed go first, however long their fsync takes
                    break
                self.reader.feed(data)
            await self._drain()
        finally:
            if self.pending and not self.commit_failed:
                # Cut while replies wait for their fsync: let them go first.
                with trio.CancelScope(shield=True), trio.move_on_after(TIMEOUT_GRACE_SECONDS):
                    await self.drained.wait()
            if self.feed is not None:
                self.feed.scope.cancel()
            if self.commit_scope is not None:
                self.commit_scope.cancel()
            if self.live_topics:
                self.core.unwatch_all(self)
            if self.streams is not None:  # (first: its takens may lease messages to it)
                wake_all(streaming.end_streams(self))
            wake_all(self.core.release_owned(self, self.broker.clock()))
            # Ended leases may have finished a join or freed room for parked puts.
            self.broker.after_request()

    async def _receive_in_time(self) -> bytes | bytearray:
        """:meth:`_receive`, but close the connection once ``frame_timeout`` was waited
        here in all for the rest of a frame (counted from the receive that took one)."""
        timeout = self.broker.config.frame_seconds
        between_frames = self.greeted and not self.reader.buffered
        if self.frame_taken or between_frames:
            self.waited, self.frame_taken = 0.0, False
        if timeout is None or between_frames:
            return await self._receive()
        start = trio.current_time()
        with trio.move_on_after(max(0.0, timeout - self.waited)):
            try:
                return await self._receive()
            finally:
                self.waited += trio.current_time() - start
        self.idle = False
        message = f"a frame begun was not complete within {timeout:g} s"
        if not self.greeted:
            message = f"no hello within {timeout:g} s of connecting"
        self.broker.log.debug("closed a connection: %s", message)
        self._reply_error(0, "bad_frame", message)
        with trio.move_on_after(TIMEOUT_GRACE_SECONDS):
            await self._drain()
        raise PeerGone

    async def _handle_buffered(self) -> None:
        max_pipelined = self.broker.config.max_pipelined
        while True:
            try:
                payload = self.reader.next_frame()
                if payload is None:
                    return
                self.frame_taken = True
                request = protocol.decode_request(payload)
            except protocol.InvalidRequestFrame as exc:
                self._reply_error(exc.request_id, "bad_request", str(exc))
                if not self.greeted or exc.request_id == 0:
                    # An error with id 0 always ends the connection (protocol.md 5).
                    await self._close_with_error()
                if self._replies_due(max_pipelined):
                    await self._flush()
                continue
            except RemoteProtocolError as exc:
                self._reply_error(0, "bad_frame", str(exc))
                await self._close_with_error()
            await self._handle(request)
            if self._replies_due(max_pipelined):
                await self._flush()

    def _replies_due(self, max_pipelined: int) -> bool:
        """Must the replies be written now? (Not a coroutine: it runs per request.)"""
        self.unsent += 1
        return self.unsent >= max_pipelined or len(self.out) >= limits.REPLY_BUFFER

    async def _close_with_error(self) -> None:
        await self._drain()
        raise PeerGone

    async def _handle(self, request: protocol.AnyRequest) -> None:
        if self.broker.closing:
            woken = streaming.taken_while_closing(self, request)
            if woken is None:
                protocol.append_frame(self.out, shutting_down(request.id))
            else:
                wake_all(woken)
            return
        if not self.greeted:
            if not self._greet(request):
                await self._close_with_error()
            return
        if (self.sync_to or self.pending) and isinstance(request, _TAKES):
            # A journal failure on the puts' replies must not strand messages taken here.
            await self._drain()
        try:
            reply = self._dispatch(request)
            while reply is _BLOCK and self.out:
                # Write the replies before waiting, and look again: others ran meanwhile.
                await self._flush()
                reply = self._dispatch(request)
            if reply is _BLOCK:
                if isinstance(request, protocol.Put | protocol.PutMany):
                    reply = await self._wait_for_room(request)
                elif isinstance(request, protocol.Join):
                    reply = await self._wait_for_join(request)
                else:
                    assert isinstance(request, _TAKES)
                    reply = await self._wait_for_message(request)
        except BrokerqError as exc:  # a JournalFailed's code is "internal"
            self._reply_error(request.id, exc.code, str(exc))
            if isinstance(exc, JournalFailed):
                self.broker.fail(str(exc))
            return
        except (PeerGone, trio.Cancelled):
            raise
        except Exception as exc:
            self.broker.log.exception("request %r failed", type(request).__name__)
            self._reply_error(request.id, "internal", f"internal error: {exc!r}")
            return
        finally:
            self.broker.after_request()
        if isinstance(reply, Delivery):
            await self._send_delivery(reply)
        elif reply is SENT:
            if self.ending:
                await self._close_with_error()
        else:
            assert isinstance(reply, protocol.Reply)
            protocol.append_frame(self.out, reply)
        if isinstance(request, protocol.Stop):
            await self._drain()
            self.broker.request_stop("stop requested by a client")

    def _greet(self, request: protocol.AnyRequest) -> bool:
        if not isinstance(request, protocol.Hello):
            self._reply_error(request.id, "bad_request", "the first request must be hello")
            return False
        if request.version != PROTOCOL_VERSION:
            message = (
                f"client speaks protocol {request.version}, "
                f"this broker speaks {PROTOCOL_VERSION} (brokerq {__version__})"
            )
            self.broker.log.warning("refused a client: %s", message)
            version = PROTOCOL_VERSION
            error = protocol.Error(id=request.id, code="version", message=message, version=version)
            protocol.append_frame(self.out, error)
            return False
        self.greeted = True
        self.reader.max_frame_size = self.broker.max_frame_size
        protocol.append_frame(
            self.out,
            protocol.HelloReply(
                id=request.id,
                version=PROTOCOL_VERSION,
                server=f"brokerq {__version__}",
                pid=self.broker.pid,
                max_message_size=self.broker.config.max_message_size,
                max_frame_size=self.broker.max_frame_size,
            ),
        )
        return True

    def _dispatch(self, request: protocol.AnyRequest) -> protocol.AnyReply | Delivery | object:
        """Answer ``request`` without waiting, or return _BLOCK to park it."""
        core = self.core
        now = self.broker.clock()
        # First, for every request that has a timeout.
        validation.validate_timeout(getattr(request, "timeout", None))
        match request:
            case protocol.Put(id=rid, queue=queue, body=body, key=key, timeout=timeout):
                try:
                    msg_id, waiter = core.put(queue, body, now, key, **put_options(request))
                except QueueFull:
                    if timeout == 0:
                        raise
                    return _BLOCK
                if waiter is not None:
                    wake(waiter)
                self._needs_sync()
                return protocol.PutReply(id=rid, msg_id=msg_id)
            case protocol.Get(id=rid, queue=queue, timeout=timeout):
                if messages := core.get_nowait(queue):
                    return Delivery(protocol.Get, messages, rid)
                return _BLOCK if timeout != 0 else empty(rid, queue)
            case protocol.Reserve(id=rid, queue=queue, timeout=timeout, lease=lease):
                validation.validate_lease(lease)
                if (msg := core.reserve_nowait(queue, now, lease, owner=self)) is not None:
                    lease_s = self._lease_left(msg, now)
                    return Delivery(protocol.Reserve, [msg], rid, lease_s, core.leases_of([msg]))
                return _BLOCK if timeout != 0 else empty(rid, queue)
            case protocol.GetAny(id=rid, queues=queues, timeout=timeout):
                if (msg := core.take_any(queues, now)) is not None:
                    return Delivery(protocol.GetAny, [msg], rid)
                return _BLOCK if timeout != 0 else empty(rid, queues)
            case protocol.ReserveAny(id=rid, queues=queues, timeout=timeout, lease=lease):
                validation.validate_lease(lease)
                if (msg := core.take_any(queues, now, lease or QUEUE_LEASE, self)) is not None:
                    lease_s = self._lease_left(msg, now)
                    return Delivery(protocol.ReserveAny, [msg], rid, lease_s, core.leases_of([msg]))
                return _BLOCK if timeout != 0 else empty(rid, queues)
            case protocol.GetMany(id=rid, queue=queue, n=n, timeout=timeout):
                if n < 1:
                    raise InvalidRequest(f"get_many needs n >= 1, not {n}")
                if messages := core.get_nowait(queue, n, self._batch_bytes()):
                    return Delivery(protocol.GetMany, messages, rid)
                return _BLOCK if timeout != 0 else empty(rid, queue)
            case protocol.PutMany(id=rid, queue=queue, bodies=bodies, keys=keys, timeout=timeout):
                try:
                    ids, woken = core.put_many(queue, bodies, now, keys, **put_options(request))
                except QueueFull:
                    if timeout == 0:
                        raise
                    return _BLOCK
                wake_all(woken)
                self._needs_sync()
                return protocol.PutManyReply(id=rid, msg_ids=ids)
            case protocol.Ack(id=rid, msg_id=msg_id, attempt=attempt, as_get=as_get):
                core.ack(msg_id, attempt, as_get=as_get)
                return protocol.AckReply(id=rid)
            case protocol.Release(id=rid, msg_id=msg_id, attempt=attempt, delay=delay):
                wake_all(core.release(msg_id, attempt, now, delay))
                return protocol.ReleaseReply(id=rid)
            case protocol.Bury(id=rid, msg_id=msg_id, attempt=attempt):
                core.bury(msg_id, attempt)
                return protocol.BuryReply(id=rid)
            case protocol.Touch(id=rid, msg_id=msg_id, attempt=attempt, lease=lease):
                validation.validate_lease(lease)
                expires = core.touch(msg_id, attempt, now, lease)
                return protocol.TouchReply(id=rid, lease=expires - now)
            case protocol.Kick(id=rid, queue=queue, n=n):
                count, woken = core.kick(queue, n, now)
                wake_all(woken)
                return protocol.KickReply(id=rid, count=count)
            case protocol.Configure(id=rid, queue=queue):
                settings = {name: getattr(request, name) for name in _SETTINGS}
                return protocol.ConfigureReply(id=rid, config=core.configure(queue, **settings))
            case protocol.Delete(id=rid, queue=queue):
                count, admitted = core.delete_queue(queue, now)
                wake_all(admitted)
                return protocol.DeleteReply(id=rid, count=count)
            case protocol.Peek(id=rid, queue=queue):
                if (msg := core.peek(queue)) is None:
                    return empty(rid, queue)
                return protocol.PeekReply(id=rid, msg_id=msg.id, body=msg.body)
            case protocol.Purge(id=rid, queue=queue):
                return protocol.PurgeReply(id=rid, count=core.purge(queue))
            case protocol.Stats(id=rid, queue=queue):
                stats = self.broker.stats() if queue is None else core.queue_stats(queue, now)
                return protocol.StatsReply(id=rid, stats=stats)
            case protocol.Queues(id=rid):
                return protocol.QueuesReply(id=rid, names=core.queue_names())
            case protocol.Publish(
                id=rid, topic=topic, body=body, key=key, priority=priority, ttl=ttl
            ):
                copies, live, woken = core.publish(
                    topic, body, now, key, priority=priority, ttl=ttl
                )
                wake_all(woken)
                sent = 0
                for subscriber in live:
                    assert isinstance(subscriber, Connection)
                    sent += subscriber.send_event(topic, body)
                if copies:
                    self._needs_sync()
                return protocol.PublishReply(id=rid, copies=copies, live=sent)
            case protocol.Subscribe(id=rid, topic=topic, queue=str(queue)):
                core.subscribe(topic, queue)
                self._needs_sync()
                return protocol.SubscribeReply(id=rid)
            case protocol.Subscribe(id=rid, topic=topic, queue=None):
                core.watch(topic, self)
                self.live_topics[topic] = rid
                self._start_feed()
                return protocol.SubscribeReply(id=rid)
            case protocol.Unsubscribe(id=rid, topic=topic, queue=str(queue)):
                found = core.unsubscribe(topic, queue)
                self._needs_sync()
                return protocol.UnsubscribeReply(id=rid, found=found)
            case protocol.Unsubscribe(id=rid, topic=topic, queue=None):
                self.live_topics.pop(topic, None)
                return protocol.UnsubscribeReply(id=rid, found=core.unwatch(topic, self))
            case protocol.TaskDone(id=rid, queue=queue, n=n):
                return protocol.TaskDoneReply(id=rid, unfinished=core.task_done(queue, n))
            case protocol.Join(id=rid, queue=queue, timeout=timeout):
                if core.unfinished(queue) == 0:
                    return protocol.JoinReply(id=rid)
                return _BLOCK if timeout != 0 else join_timeout(rid, queue, timeout)
            case protocol.Ping(id=rid):
                return protocol.PingReply(id=rid, pid=self.broker.pid)
            case protocol.Consume() | protocol.Taken() | protocol.Cancel():
                reply, woken = streaming.handle(self, request, now)
                wake_all(woken)
                return SENT if reply is None else reply
            case protocol.Stop(id=rid):
                return protocol.StopReply(id=rid)
            case protocol.Hello(id=rid):
                return protocol.Error(id=rid, code="bad_request", message="hello was already sent")
        raise AssertionError(f"unhandled request {request!r}")  # pragma: no cover

    def send_event(self, topic: str, body: bytes) -> bool:
        """False if it overflowed: its live subscriptions end now, for no later publish."""
        assert self.feed is not None
        if self.feed.push(protocol.Event(id=self.live_topics[topic], topic=topic, body=body)):
            return True
        self.core.unwatch_all(self)
        self.live_topics.clear()
        return False

    def _start_feed(self) -> None:
        if self.feed is None:
            feed = self.feed = LiveFeed(self.broker.config.subscriber_buffer)
            self.broker.start_task(lambda: feed.write(self.stream, self.send_lock, self.scope))
