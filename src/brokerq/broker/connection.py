"""One client connection of the trio broker: read frames, ask the core, reply.

Requests of a connection are answered in order; everything already
buffered is handled before the replies go out in one write, so a client
that pipelines pays one syscall per batch, not per request.

* A reply to a ``put`` waits for the journal's fsync under ``--fsync batch``
  (group commit: one fsync covers every put that arrived meanwhile). The
  connection does not: those replies, and every reply after them, go to a
  commit writer task of its own, which sends them in order as their fsyncs
  complete, while the connection reads and answers on (a put pipelined
  behind another is handled, and handed to a waiting consumer, during the
  first one's fsync). A reply that carries messages waits until they are
  all sent (below).
* A reply that carries messages (``get``, ``get_many``, ``reserve``) is
  written on its own and at once: if that write fails the client cannot
  have read it, and the messages go back to their place at the head of
  their queue (a ``get`` is at-most-once, but never lost in transit).
* A blocking ``get``/``reserve`` parks a :class:`~brokerq.core.Waiter` and
  waits on its event, its deadline and the connection's end at once: a
  client that disconnects leaves the line at once. A ``join`` parks a
  :class:`~brokerq.state.Joiner` the same way; the broker wakes it once the
  queue's unfinished tasks reach 0 (Broker.after_request).
* When the connection ends, every lease it holds is released. A peer that
  shut down only its sending side reads on: at the end of its stream a
  put still waiting for room is withdrawn, and the replies the connection
  owes (one waiting for its fsync too) are written before it closes, so
  the peer learns whether its put was made (protocol.md 4).
* Limits (:mod:`brokerq.limits`): at most ``max_pipelined`` requests (or
  :data:`~brokerq.limits.REPLY_BUFFER` bytes of replies) are answered before
  their replies are written, and nothing more is read until they are, so a
  client that sends without reading is held up by its own socket. A
  client has ``frame_timeout`` seconds, waited in all, to send the rest of
  a frame it began (and a new connection its ``hello``), else the
  connection is closed (``bad_frame``); time the broker spends on anything
  else, such as writing replies the client does not read, is not counted.
  A connection idle between frames is never timed out.
* A connection that subscribes to a topic live gets a :class:`LiveFeed`: the
  publishers' tasks append ``event`` frames to it and a writer task of its
  own sends them, sharing the stream with the replies under a lock. A feed
  over its bound (a subscriber that reads too slowly) is dropped: one
  ``overflow`` error, then the connection is closed.
"""

from __future__ import annotations

import contextlib
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import trio

from .. import protocol
from ..errors import BrokerqError, InvalidRequest, QueueFull, RemoteProtocolError
from ..pause import pause
from ..protocol import (
    PROTOCOL_VERSION,
    Ack,
    AckReply,
    Bury,
    BuryReply,
    Cancel,
    Configure,
    ConfigureReply,
    Consume,
    Delete,
    DeleteReply,
    Error,
    Event,
    FrameReader,
    Get,
    GetMany,
    GetManyReply,
    GetReply,
    Hello,
    HelloReply,
    InvalidRequestFrame,
    Join,
    JoinReply,
    Kick,
    KickReply,
    Peek,
    PeekReply,
    Ping,
    PingReply,
    Publish,
    PublishReply,
    Purge,
    PurgeReply,
    Put,
    PutMany,
    PutManyReply,
    PutReply,
    Queues,
    QueuesReply,
    Release,
    ReleaseReply,
    Reserve,
    ReserveReply,
    Stats,
    StatsReply,
    Stop,
    StopReply,
    Subscribe,
    SubscribeReply,
    Taken,
    TaskDone,
    TaskDoneReply,
    Touch,
    TouchReply,
    Unsubscribe,
    UnsubscribeReply,
    validate_lease,
)
from ..version import __version__
from . import limits, streaming
from .journal import JournalFailed
from .state import Joiner, Lease, Message, Putter, Stream, Waiter
from .unixstream import UnixStream

if TYPE_CHECKING:
    from .server import Broker

_BLOCK: Final = object()
#: A parked request whose reply hand_over already wrote; or a ``taken``, which has no reply.
_SENT: Final = object()
#: How long a dropped subscriber gets to take what is being sent to it, and
#: then its ``overflow`` error.
OVERFLOW_GRACE_SECONDS: Final = 30.0
#: How long a closing connection gets to write what it still owes: the error
#: of a frame timeout, or replies that were waiting for their fsync.
TIMEOUT_GRACE_SECONDS: Final = 1.0


class PeerGone(Exception):
    """The connection ended; its task winds up quietly."""


class Wakeup:
    """What a parked request (a get, reserve, put or join that waits) waits
    for: :meth:`set` by the task that serves it, or by a stopping broker.

    Not a ``trio.Event``: the parked task waits by reading its socket (to
    see the peer leave, and take in pipelined requests) inside a cancel
    scope, and setting the wakeup cancels that scope (see Connection._park).
    One task per parked request, where an Event needed a second task to
    read meanwhile: a nursery and a task per wait cost more than the rest
    of a request.
    """

    __slots__ = ("flag", "scope")

    def __init__(self) -> None:
        self.flag = False
        self.scope: trio.CancelScope | None = None  # the parked task's, while it waits

    def set(self) -> None:
        self.flag = True
        if self.scope is not None:
            self.scope.cancel()


def wake(waiter: Waiter | Putter | Joiner) -> None:
    """Wake a parked request's task; a get or reserve that was handed a message
    has its reply written at once, by the waking task (see Connection.hand_over)."""
    wakeup = waiter.token
    assert isinstance(wakeup, Wakeup)
    if type(waiter) is Waiter and waiter.messages and not wakeup.flag:  # (not a Stream)
        owner = waiter.owner
        if isinstance(owner, Connection):
            owner.hand_over(waiter)
    wakeup.set()


def wake_all(waiters: Sequence[Waiter | Putter | Joiner]) -> None:
    for waiter in waiters:
        wake(waiter)


@dataclass(slots=True)
class Delivery:
    """Messages taken off a queue for one reply, until that reply is written."""

    kind: type[Get | GetMany | Reserve]
    messages: list[Message]
    request_id: int
    lease_s: float = 0.0
    leases: list[Lease | None] | None = None  # a reserve's: what to undo if unsent

    def reply(self) -> GetReply | GetManyReply | ReserveReply:
        if self.kind is GetMany:
            return GetManyReply(
                id=self.request_id,
                msg_ids=[m.id for m in self.messages],
                bodies=[m.body for m in self.messages],
            )
        (msg,) = self.messages
        if self.kind is Reserve:
            return ReserveReply(
                id=self.request_id,
                msg_id=msg.id,
                body=msg.body,
                attempt=msg.attempts,
                lease=self.lease_s,
            )
        return GetReply(id=self.request_id, msg_id=msg.id, body=msg.body)


class LiveFeed:
    """Publishes waiting to be sent to one live subscriber, bounded in bytes.

    ``push`` is called by the publishers' tasks and never blocks: a feed
    that would go over ``limit`` (while it already holds something: one
    publish always fits) is marked overflowed and emptied instead, and the
    send the writer has in flight, if any, gets
    :data:`OVERFLOW_GRACE_SECONDS` to finish: a subscriber that reads
    nothing at all is still closed then.
    """

    __slots__ = ("limit", "overflowed", "pending", "sending", "wakeup")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.pending = bytearray()
        self.overflowed = False
        self.wakeup = trio.Event()
        self.sending: trio.CancelScope | None = None  # around the writer's send

    def push(self, event: Event) -> bool:
        """Queue ``event``; False if it was discarded (the feed overflowed)."""
        if self.overflowed:
            return False
        start = len(self.pending)
        protocol.append_frame(self.pending, event)
        if start and len(self.pending) > self.limit:
            self.pending.clear()
            self.overflowed = True
            if self.sending is not None:
                self.sending.deadline = trio.current_time() + OVERFLOW_GRACE_SECONDS
        self.wakeup.set()
        return not self.overflowed


class Connection:
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
        self.sync_to = 0  # journal bytes that must be synced before replies go out
        journal = broker.journal
        #: Whether replies to puts wait for an fsync (``--fsync batch``, not on a tmpfs).
        self.group_commit = journal is not None and journal.syncs == "batch"
        self.feed: LiveFeed | None = None  # set by the first live subscribe
        self.live_topics: dict[str, int] = {}  # topic -> id of its subscribe request
        self.send_lock = trio.Lock()  # replies and the feed's writer share the stream
        self.feed_scope = trio.CancelScope()
        self.unsent = 0  # requests answered since the replies were last written
        # Replies waiting for their group commit, in order: (journal offset
        # to be synced first, or 0; the bytes; how many requests they answer).
        # See _flush and _write_committed.
        self.pending: deque[tuple[int, bytearray, int]] = deque()
        self.pending_bytes = 0
        self.pending_requests = 0
        self.drained = trio.Event()  # set while nothing is pending
        self.drained.set()
        self.commit_wakeup = trio.Event()
        self.commit_scope: trio.CancelScope | None = None  # the writer's, once started
        self.commit_failed = False
        #: The get or reserve parked now, and its waiter (see hand_over).
        self.parked: tuple[Get | Reserve, Waiter] | None = None
        #: What hand_over wrote for it: the delivery and the bytes still unsent.
        self.handed: tuple[Delivery, bytes] | None = None
        # Seconds waited for the rest of the frame buffered now (or for the
        # hello), and whether a frame was taken since they were counted.
        self.waited = 0.0
        self.frame_taken = False
        #: Open streams (consume) by id, once there is one (see streaming.py).
        self.streams: dict[int, Stream] | None = None
        #: A protocol error with id 0 was answered: close once it is written.
        self.ending = False

    async def run(self) -> None:
        try:
            while True:
                await self._handle_buffered()
                await self._flush()
                if self.broker.closing:
                    await self._drain()
                    return
                self.idle = True
                data = await self._receive_in_time()
                self.idle = False
                if not data:
                    # The peer's end. One that shut down only its sending side
                    # reads on: the replies it is owed go first, however long
                    # their fsync takes (a put admitted before the end was
                    # read: protocol.md 4, "End of a connection").
                    if self.pending:
                        await self._wait_drained()
                    return
                self.reader.feed(data)
        finally:
            if self.pending and not self.commit_failed:
                # Cut while replies wait for their fsync (a stopping broker
                # cuts connections waiting for a request): let them go first.
                with trio.CancelScope(shield=True), trio.move_on_after(TIMEOUT_GRACE_SECONDS):
                    await self.drained.wait()
            self.feed_scope.cancel()
            if self.commit_scope is not None:
                self.commit_scope.cancel()
            if self.live_topics:
                self.core.unwatch_all(self)
            if self.streams is not None:  # (first: its takens may lease messages to it)
                wake_all(streaming.end_streams(self))
            wake_all(self.core.release_owned(self, self.broker.clock()))
            # Leases that ended may have moved messages to :dead (a join on
            # their queue may be done now) or freed room for parked puts.
            self.broker.after_request()

    async def _receive(self, *, idle: bool = False) -> bytes | bytearray:
        """What the peer sent (b"" at its end); ``idle``: as UnixStream.receive_some."""
        try:
            stream = self.stream
            if idle and isinstance(stream, UnixStream):
                return await stream.receive_some(idle=True)
            return await stream.receive_some()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return b""

    async def _receive_in_time(self) -> bytes | bytearray:
        """:meth:`_receive`; but close the connection once it has been waited
        on for ``frame_timeout`` in all for the rest of a frame (or for the hello).

        Only the time spent here counts: a frame's first bytes arrived with
        the latest receive that took a frame (or later), so its count starts
        again then; one that gets no further is cut after ``frame_timeout``.
        """
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
        if not self.greeted:
            message = f"no hello within {timeout:g} s of connecting"
        else:
            message = f"a frame begun was not complete within {timeout:g} s"
        self.broker.log.debug("closed a connection: %s", message)
        self._reply_error(0, "bad_frame", message)
        with trio.move_on_after(TIMEOUT_GRACE_SECONDS):
            await self._drain()
        raise PeerGone

    async def _handle_buffered(self) -> None:
        """Answer every complete request already received.

        The replies are written every ``max_pipelined`` requests, or once
        they pass :data:`~brokerq.limits.REPLY_BUFFER` bytes: a client that
        does not read them holds this loop up, not the broker's memory.
        """
        max_pipelined = self.broker.config.max_pipelined
        while True:
            try:
                payload = self.reader.next_frame()
                if payload is None:
                    return
                self.frame_taken = True
                request = protocol.decode_request(payload)
            except InvalidRequestFrame as exc:
                self._reply_error(exc.request_id, "bad_request", str(exc))
                if not self.greeted or exc.request_id == 0:
                    # An error with id 0 always ends the connection
                    # (protocol.md 5): one whose request cannot be named
                    # leaves the client unable to pair replies with requests.
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
        """One more request answered: must the replies be written now?

        (Not a coroutine: this runs once per request, and is usually False.)
        """
        self.unsent += 1
        return self.unsent >= max_pipelined or len(self.out) >= limits.REPLY_BUFFER

    async def _close_with_error(self) -> None:
        await self._drain()
        raise PeerGone

    def _reply_error(self, request_id: int, code: str, message: str) -> None:
        protocol.append_frame(self.out, Error(id=request_id, code=code, message=message))

    async def _handle(self, request: protocol.AnyRequest) -> None:
        if self.broker.closing:
            woken = streaming.taken_while_closing(self, request)
            if woken is None:
                self._reply_error(request.id, "shutting_down", "the broker is stopping")
            else:
                wake_all(woken)
            return
        if not self.greeted:
            if not self._greet(request):
                await self._close_with_error()
            return
        if (self.sync_to or self.pending) and isinstance(request, Get | GetMany | Reserve):
            # Settle the puts' replies first: a journal failure there must
            # not strand messages this request would take.
            await self._drain()
        try:
            reply = self._dispatch(request)
            while reply is _BLOCK and self.out:
                # Write the replies before waiting; other connections run
                # meanwhile, so look again: a message (or room) may be there now.
                await self._flush()
                reply = self._dispatch(request)
            if reply is _BLOCK:
                if isinstance(request, Put | PutMany):
                    reply = await self._wait_for_room(request)
                elif isinstance(request, Join):
                    reply = await self._wait_for_join(request)
                else:
                    assert isinstance(request, Get | GetMany | Reserve)
                    reply = await self._wait_for_message(request)
        except JournalFailed as exc:
            self._reply_error(request.id, "internal", str(exc))
            self.broker.fail(str(exc))
            return
        except BrokerqError as exc:
            self._reply_error(request.id, exc.code, str(exc))
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
        elif reply is _SENT:
            if self.ending:
                await self._close_with_error()
        else:
            assert isinstance(reply, protocol.Reply)
            protocol.append_frame(self.out, reply)
        if isinstance(request, Stop):
            await self._drain()
            self.broker.request_stop("stop requested by a client")

    def _greet(self, request: protocol.AnyRequest) -> bool:
        """Answer the handshake; False if the connection must be closed."""
        if not isinstance(request, Hello):
            self._reply_error(request.id, "bad_request", "the first request must be hello")
            return False
        if request.version != PROTOCOL_VERSION:
            message = (
                f"client speaks protocol {request.version}, "
                f"this broker speaks {PROTOCOL_VERSION} (brokerq {__version__})"
            )
            self.broker.log.warning("refused a client: %s", message)
            error = Error(id=request.id, code="version", message=message, version=PROTOCOL_VERSION)
            protocol.append_frame(self.out, error)
            return False
        self.greeted = True
        self.reader.max_frame_size = self.broker.max_frame_size
        protocol.append_frame(
            self.out,
            HelloReply(
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
        match request:
            case Put(id=rid, queue=queue, body=body, key=key, timeout=timeout):
                protocol.validate_timeout(timeout)
                try:
                    msg_id, waiter = core.put(queue, body, now, key, **_put_options(request))
                except QueueFull:
                    if timeout == 0:
                        raise
                    return _BLOCK
                if waiter is not None:
                    wake(waiter)
                self._needs_sync()
                return PutReply(id=rid, msg_id=msg_id)
            case Get(id=rid, queue=queue, timeout=timeout):
                protocol.validate_timeout(timeout)
                messages = core.get_nowait(queue)
                if messages:
                    return Delivery(Get, messages, rid)
                return _BLOCK if timeout != 0 else _empty(rid, queue)
            case Reserve(id=rid, queue=queue, timeout=timeout, lease=lease):
                protocol.validate_timeout(timeout)
                validate_lease(lease)
                msg = core.reserve_nowait(queue, now, lease, owner=self)
                if msg is not None:
                    leases = core.leases_of([msg])
                    return Delivery(Reserve, [msg], rid, self._lease_left(msg, now), leases)
                return _BLOCK if timeout != 0 else _empty(rid, queue)
            case GetMany(id=rid, queue=queue, n=n, timeout=timeout):
                protocol.validate_timeout(timeout)
                if n < 1:
                    raise InvalidRequest(f"get_many needs n >= 1, not {n}")
                messages = core.get_nowait(queue, n, self._batch_bytes())
                if messages:
                    return Delivery(GetMany, messages, rid)
                return _BLOCK if timeout != 0 else _empty(rid, queue)
            case PutMany(id=rid, queue=queue, bodies=bodies, keys=keys, timeout=timeout):
                protocol.validate_timeout(timeout)
                try:
                    ids, woken = core.put_many(queue, bodies, now, keys, **_put_options(request))
                except QueueFull:
                    if timeout == 0:
                        raise
                    return _BLOCK
                wake_all(woken)
                self._needs_sync()
                return PutManyReply(id=rid, msg_ids=ids)
            case Ack(id=rid, msg_id=msg_id, attempt=attempt, as_get=as_get):
                core.ack(msg_id, attempt, as_get=as_get)
                return AckReply(id=rid)
            case Release(id=rid, msg_id=msg_id, attempt=attempt, delay=delay):
                wake_all(core.release(msg_id, attempt, now, delay))
                return ReleaseReply(id=rid)
            case Bury(id=rid, msg_id=msg_id, attempt=attempt):
                core.bury(msg_id, attempt)
                return BuryReply(id=rid)
            case Touch(id=rid, msg_id=msg_id, attempt=attempt, lease=lease):
                validate_lease(lease)
                return TouchReply(id=rid, lease=core.touch(msg_id, attempt, now, lease) - now)
            case Kick(id=rid, queue=queue, n=n):
                count, woken = core.kick(queue, n, now)
                wake_all(woken)
                return KickReply(id=rid, count=count)
            case Configure(id=rid, queue=queue):
                config = core.configure(
                    queue,
                    max_deliveries=request.max_deliveries,
                    lease=request.lease,
                    maxsize=request.maxsize,
                    max_bytes=request.max_bytes,
                )
                return ConfigureReply(id=rid, config=config)
            case Delete(id=rid, queue=queue):
                count, admitted = core.delete_queue(queue, now)
                wake_all(admitted)
                return DeleteReply(id=rid, count=count)
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
            case Publish(id=rid, topic=topic, body=body, key=key, priority=priority, ttl=ttl):
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
                return PublishReply(id=rid, copies=copies, live=sent)
            case Subscribe(id=rid, topic=topic, queue=str(queue)):
                core.subscribe(topic, queue)
                self._needs_sync()
                return SubscribeReply(id=rid)
            case Subscribe(id=rid, topic=topic, queue=None):
                core.watch(topic, self)
                self.live_topics[topic] = rid
                self._start_feed()
                return SubscribeReply(id=rid)
            case Unsubscribe(id=rid, topic=topic, queue=str(queue)):
                found = core.unsubscribe(topic, queue)
                self._needs_sync()
                return UnsubscribeReply(id=rid, found=found)
            case Unsubscribe(id=rid, topic=topic, queue=None):
                self.live_topics.pop(topic, None)
                return UnsubscribeReply(id=rid, found=core.unwatch(topic, self))
            case TaskDone(id=rid, queue=queue, n=n):
                return TaskDoneReply(id=rid, unfinished=core.task_done(queue, n))
            case Join(id=rid, queue=queue, timeout=timeout):
                protocol.validate_timeout(timeout)
                if core.unfinished(queue) == 0:
                    return JoinReply(id=rid)
                return _BLOCK if timeout != 0 else _join_timeout(rid, queue, timeout)
            case Ping(id=rid):
                return PingReply(id=rid, pid=self.broker.pid)
            case Consume() | Taken() | Cancel():
                reply, woken = streaming.handle(self, request, now)
                wake_all(woken)
                return _SENT if reply is None else reply
            case Stop(id=rid):
                return StopReply(id=rid)
            case Hello(id=rid):
                return Error(id=rid, code="bad_request", message="hello was already sent")
        raise AssertionError(f"unhandled request {request!r}")  # pragma: no cover

    # -- live subscriptions --------------------------------------------------

    def send_event(self, topic: str, body: bytes) -> bool:
        """Queue a publish for this live subscriber (called by the publisher's task).

        False if it overflowed: its live subscriptions end here and now (so
        no later publish counts it), though its writer task may still be
        blocked sending what the subscriber has not read yet.
        """
        assert self.feed is not None
        if self.feed.push(Event(id=self.live_topics[topic], topic=topic, body=body)):
            return True
        self.core.unwatch_all(self)
        self.live_topics.clear()
        return False

    def _start_feed(self) -> None:
        if self.feed is None:
            self.feed = LiveFeed(self.broker.config.subscriber_buffer)
            self.broker.start_task(self._write_feed)

    async def _write_feed(self) -> None:
        """Send the feed's events as they come; drop the subscriber if it overflows."""
        feed = self.feed
        assert feed is not None
        with self.feed_scope:
            while True:
                await feed.wakeup.wait()
                feed.wakeup = trio.Event()
                if feed.overflowed:
                    break
                data, feed.pending = feed.pending, bytearray()
                try:
                    with trio.CancelScope() as feed.sending:
                        async with self.send_lock:
                            await self.stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return  # the request loop sees the end and cleans up
                if feed.sending.cancelled_caught:
                    # Overflowed, and not read for the grace: cut mid-frame,
                    # so no error can follow.
                    self.broker.log.warning("closed a live subscriber that stopped reading")
                    self.scope.cancel()
                    return
                feed.sending = None
            # (send_event has ended its live subscriptions already.)
            self.broker.log.warning("dropped a live subscriber that fell behind")
            error = Error(
                id=0,
                code="overflow",
                message="this subscriber fell more than "
                f"{feed.limit} bytes of publishes behind and was dropped",
            )
            with (
                trio.move_on_after(OVERFLOW_GRACE_SECONDS),
                contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
            ):
                async with self.send_lock:
                    await self.stream.send_all(protocol.encode_frame(error))
            self.scope.cancel()

    def _needs_sync(self) -> None:
        if self.group_commit:
            journal = self.broker.journal
            assert journal is not None
            self.sync_to = journal.written

    def _lease_left(self, msg: Message, now: float) -> float:
        lease = self.core.lease_of(msg.id)
        return 0.0 if lease is None else lease.expires_at - now

    def _batch_bytes(self) -> int:
        """What a ``get_many`` batch may take of one reply frame (see core.get_nowait)."""
        return self.broker.max_frame_size - 1024

    async def _wait_for_room(self, request: Put | PutMany) -> protocol.AnyReply:
        """Park a put on a full queue until it is admitted, the deadline, or the peer leaves."""
        if isinstance(request, Put):
            bodies, keys = [request.body], None if request.key is None else [request.key]
        else:
            bodies, keys = request.bodies, request.keys
        putter = self.core.wait_put(request.queue, bodies, keys, _put_options(request), Wakeup())
        try:
            peer_gone = await self._park(putter.token, request.timeout)
        except BaseException:
            wake_all(self.core.cancel_put(putter, self.broker.clock()))
            raise
        if putter.ids is None:
            if peer_gone:
                pause("broker.put_abandoned")
            wake_all(self.core.cancel_put(putter, self.broker.clock()))
            if peer_gone:
                raise PeerGone
            if self.broker.closing:
                return Error(id=request.id, code="shutting_down", message="the broker is stopping")
            return Error(id=request.id, code="full", message=f"queue {request.queue!r} is full")
        self._needs_sync()
        if isinstance(request, Put):
            return PutReply(id=request.id, msg_id=putter.ids[0])
        return PutManyReply(id=request.id, msg_ids=putter.ids)

    async def _wait_for_join(self, request: Join) -> protocol.AnyReply:
        """Park a join until its queue's tasks are done, the deadline, or the peer leaves.

        Done means the count was 0 at some moment after the join began (it
        may be above 0 again by the reply: a join waits for the work there
        was, not for a queue that stays idle).
        """
        joiner = self.core.wait_join(request.queue, Wakeup())
        try:
            peer_gone = await self._park(joiner.token, request.timeout)
        finally:
            self.core.cancel_join(joiner)
        if peer_gone:
            raise PeerGone
        if joiner.done:
            return JoinReply(id=request.id)
        if self.broker.closing:
            return Error(id=request.id, code="shutting_down", message="the broker is stopping")
        return _join_timeout(request.id, request.queue, request.timeout)

    async def _park(self, token: object, timeout: float | None) -> bool:
        """Wait until ``token`` (a :class:`Wakeup`) is set, the timeout, or the
        peer's end: True if the peer left.

        The wait is a read of the socket in a cancel scope that setting the
        token (or the timeout) cancels: the read sees the peer leave at
        once, and takes in pipelined requests (they wait their turn) up to
        a frame's worth; past that nothing more is read until the wait ends.
        """
        assert isinstance(token, Wakeup)
        deadline = math.inf if timeout is None else trio.current_time() + timeout
        with trio.CancelScope(deadline=deadline) as scope:
            token.scope = scope
            if token.flag:
                scope.cancel()
            try:
                while True:
                    if self.reader.buffered > self.reader.max_frame_size:
                        await trio.sleep_forever()  # backpressure
                    data = await self._receive(idle=True)
                    if not data:
                        return True
                    self.reader.feed(data)
            finally:
                token.scope = None
        return False

    async def _wait_for_message(
        self, request: Get | GetMany | Reserve
    ) -> Delivery | Error | object:
        """Park until a message is handed over, the deadline, or the peer leaves."""
        lease = None
        if isinstance(request, Reserve):
            lease = request.lease or self.core.queue_config(request.queue)["lease"]
        waiter = self.core.wait(request.queue, Wakeup(), lease, owner=self)
        if not isinstance(request, GetMany):
            self.parked = (request, waiter)
        try:
            peer_gone = await self._park(waiter.token, request.timeout)
        except BaseException:
            self.parked = self.handed = None
            wake_all(self.core.cancel_wait(waiter, self.broker.clock()))
            raise
        self.parked = None
        if self.handed is not None:
            return await self._finish_hand_over(peer_gone)
        if peer_gone:
            wake_all(self.core.cancel_wait(waiter, self.broker.clock()))
            raise PeerGone
        if not waiter.served:
            self.core.cancel_wait(waiter, self.broker.clock())
            if self.broker.closing:
                return Error(id=request.id, code="shutting_down", message="the broker is stopping")
            return _empty(request.id, request.queue)
        messages = waiter.messages
        if isinstance(request, GetMany) and request.n > len(messages):
            room = self._batch_bytes() - sum(
                len(m.body) + protocol.MESSAGE_OVERHEAD for m in messages
            )
            messages += self.core.get_nowait(request.queue, request.n - len(messages), room)
        return self._delivery_to(request, waiter)

    def _delivery_to(self, request: Get | GetMany | Reserve, waiter: Waiter) -> Delivery:
        """The reply to a parked request that ``waiter`` was handed messages for."""
        if waiter.lease is None:
            return Delivery(type(request), waiter.messages, request.id)
        lease_s = self._lease_left(waiter.messages[0], self.broker.clock())
        return Delivery(Reserve, waiter.messages, request.id, lease_s, waiter.leases)

    def hand_over(self, waiter: Waiter) -> None:
        """Write the reply of the get or reserve parked here, now, from the
        task that handed it a message (a put's, usually).

        Why: the parked task would write it only after trio has scheduled
        it, and after its park has wound down (two passes through the run
        loop); writing it here gets the message to the consumer sooner, and
        its task just finishes up. The reply is in order: nothing else of
        this connection is unsent while a request is parked. Not done for a
        connection with a live feed (its writer may be mid-frame), nor for a
        stream that is not a socket. If the socket takes only part of the
        frame, the parked task writes the rest; if it takes none, or fails,
        the task writes it as usual.
        """
        parked = self.parked
        stream = self.stream
        if (
            parked is None
            or parked[1] is not waiter
            or self.handed is not None
            or self.feed is not None
            or self.streams is not None
            or self.out
            or self.pending
            or not isinstance(stream, UnixStream)
        ):
            return
        delivery = self._delivery_to(parked[0], waiter)
        frame = protocol.encode_frame(delivery.reply())
        sent = stream.try_send(frame)
        if not sent:
            return  # no room, or a broken socket: the parked task deals with it
        self.handed = (delivery, frame[sent:])
        if sent == len(frame):
            # Delivered: nothing is left to undo if the peer goes now.
            waiter.messages, waiter.leases = [], []

    async def _finish_hand_over(self, peer_gone: bool) -> object:
        """Write what hand_over could not; as _send_delivery if that fails."""
        assert self.handed is not None
        (delivery, rest), self.handed = self.handed, None
        if rest:
            if peer_gone:
                self._undeliver(delivery)
                raise PeerGone
            self.out += rest
            await self._flush_delivery(delivery)
        elif peer_gone:
            raise PeerGone
        return _SENT

    async def _send_delivery(self, delivery: Delivery) -> None:
        """Write a reply carrying messages now; if that fails they go back.

        Written alone and at once, so a failed write means the client cannot
        have read this reply: putting its messages back keeps ``get``
        at-most-once without ever losing a message in transit.
        """
        protocol.append_frame(self.out, delivery.reply())
        await self._flush_delivery(delivery)

    async def _flush_delivery(self, delivery: Delivery) -> None:
        """Write the replies, the last carrying ``delivery``; if the peer is
        gone, its messages go back to their place."""
        try:
            await self._drain()
        except PeerGone:
            self._undeliver(delivery)
            raise

    def _undeliver(self, delivery: Delivery) -> None:
        now = self.broker.clock()
        wake_all(self.core.undeliver(delivery.messages, now, delivery.leases))

    async def _flush(self) -> None:
        """Write the replies answered so far, or hand them to the commit writer.

        Replies that wait for a group commit (``sync_to``), and any while
        earlier ones are still pending, go to :meth:`_write_committed` and
        this returns at once, unless more than
        :data:`~brokerq.limits.REPLY_BUFFER` bytes are pending: then it
        waits for them, so a connection's memory stays bounded.
        """
        answered, self.unsent = self.unsent, 0
        if not self.out:
            return
        if self.sync_to or self.pending:
            self._commit_out(answered)
            if (
                self.pending_requests >= self.broker.config.max_pipelined
                or self.pending_bytes > limits.REPLY_BUFFER
            ):
                await self._wait_drained()
            return
        await self._send_out()

    async def _drain(self) -> None:
        """Write every reply answered so far, in order, and return once they
        are written (a reply carrying messages must go alone and at once)."""
        await self._flush()
        if self.pending:
            await self._wait_drained()

    def _commit_out(self, answered: int) -> None:
        sync_to, self.sync_to = self.sync_to, 0
        data, self.out = self.out, bytearray()
        self.pending.append((sync_to, data, answered))
        self.pending_bytes += len(data)
        self.pending_requests += answered
        if self.drained.is_set():
            self.drained = trio.Event()
        if self.commit_scope is None:
            self.commit_scope = trio.CancelScope()
            self.broker.start_task(self._write_committed)
        self.commit_wakeup.set()

    async def _wait_drained(self) -> None:
        await self.drained.wait()
        if self.commit_failed:
            raise PeerGone

    async def _write_committed(self) -> None:
        """Send the pending replies in order, each once its fsync is done.

        A journal failure acknowledges nothing more: the pending replies are
        dropped, the client gets one ``internal`` error, and the connection
        is closed (as is the broker, by wait_synced).
        """
        assert self.commit_scope is not None
        pending = self.pending
        with self.commit_scope:
            while True:
                if not pending:
                    await self.commit_wakeup.wait()
                    self.commit_wakeup = trio.Event()
                    continue
                sync_to, data, answered = pending[0]
                try:
                    if sync_to:
                        await self.broker.wait_synced(sync_to)
                    await self._send(data)
                except JournalFailed as exc:
                    error = Error(
                        id=0, code="internal", message=f"{exc}; nothing more was acknowledged"
                    )
                    with contextlib.suppress(PeerGone):
                        await self._send(protocol.encode_frame(error))
                    self._fail_commits()
                    return
                except PeerGone:
                    self._fail_commits()
                    return
                pending.popleft()
                self.pending_bytes -= len(data)
                self.pending_requests -= answered
                if not pending:
                    self.drained.set()

    def _fail_commits(self) -> None:
        self.commit_failed = True
        self.pending.clear()
        self.pending_bytes = self.pending_requests = 0
        self.drained.set()
        self.scope.cancel()

    async def _send_out(self) -> None:
        try:
            await self._send(self.out)
        finally:
            self.out.clear()

    async def _send(self, data: bytes | bytearray) -> None:
        try:
            if self.feed is None and self.streams is None:
                await self.stream.send_all(data)
            else:
                async with self.send_lock:
                    if self.streams:  # deliveries made before these replies go first
                        data = streaming.frames_before(self, data)
                    await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise PeerGone from exc


def _put_options(request: Put | PutMany) -> dict[str, Any]:
    return {"priority": request.priority, "delay": request.delay, "ttl": request.ttl}


def _empty(request_id: int, queue: str) -> Error:
    return Error(id=request_id, code="empty", message=f"queue {queue!r} is empty")


def _join_timeout(request_id: int, queue: str, timeout: float | None) -> Error:
    return Error(
        id=request_id,
        code="timeout",
        message=f"queue {queue!r} still had unfinished tasks after {timeout or 0:g} s",
    )
