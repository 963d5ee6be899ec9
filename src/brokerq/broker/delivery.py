"""A connection's deliveries: requests that park, and replies that carry messages.

A reply that carries messages is written on its own and at once: if that
write fails the client cannot have read it, and the messages go back to the
head of their queue (a ``get`` is at-most-once, but never lost in transit).
The task that hands a parked get or reserve a message writes its reply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import trio

from .. import protocol
from ..pause import pause
from ..protocol import Error, Get, GetAny, GetMany, Reserve, ReserveAny
from .core.state import QUEUE_LEASE, Lease, Message, Waiter
from .replies import Replies
from .unixstream import UnixStream
from .wakeup import STREAM_GONE, PeerGone, Wakeup, wake_all

if TYPE_CHECKING:
    from .broker_base import BrokerBase

#: A parked request whose reply hand_over already wrote; or a ``taken``, which has no reply.
SENT: Final = object()

#: The requests that take one message: hand_over may write their reply.
OneTake = Get | Reserve | GetAny | ReserveAny
Take = OneTake | GetMany


@dataclass(slots=True)
class Delivery:
    """Messages taken off a queue for one reply, until that reply is written."""

    kind: type[Take]
    messages: list[Message]
    request_id: int
    lease_s: float = 0.0
    leases: list[Lease | None] | None = None  # a reserve's: what to undo if unsent

    def reply(self) -> protocol.AnyReply:
        if self.kind is GetMany:
            ids, bodies = [m.id for m in self.messages], [m.body for m in self.messages]
            return protocol.GetManyReply(id=self.request_id, msg_ids=ids, bodies=bodies)
        (msg,) = self.messages
        if self.kind is Get:
            return protocol.GetReply(id=self.request_id, msg_id=msg.id, body=msg.body)
        if self.kind is Reserve:
            return protocol.ReserveReply(
                id=self.request_id,
                msg_id=msg.id,
                body=msg.body,
                attempt=msg.attempts,
                lease=self.lease_s,
            )
        if self.kind is ReserveAny:
            return protocol.ReserveAnyReply(
                id=self.request_id,
                queue=msg.queue,
                msg_id=msg.id,
                body=msg.body,
                attempt=msg.attempts,
                lease=self.lease_s,
            )
        return protocol.GetAnyReply(
            id=self.request_id, queue=msg.queue, msg_id=msg.id, body=msg.body
        )


class Deliveries(Replies):
    def __init__(self, broker: BrokerBase, stream: trio.abc.Stream) -> None:
        super().__init__(broker, stream)
        #: The get or reserve (or get_any, reserve_any) parked, and what hand_over wrote for it.
        self.parked: tuple[OneTake, Waiter] | None = None
        self.handed: tuple[Delivery, bytes] | None = None

    async def _receive(self, *, idle: bool = False) -> bytes | bytearray:
        """What the peer sent (b"" at its end); ``idle``: as UnixStream.receive_some."""
        try:
            if idle and isinstance(self.stream, UnixStream):
                return await self.stream.receive_some(idle=True)
            return await self.stream.receive_some()
        except STREAM_GONE:
            return b""

    def _lease_left(self, msg: Message, now: float) -> float:
        lease = self.core.lease_of(msg.id)
        return 0.0 if lease is None else lease.expires_at - now

    def _batch_bytes(self) -> int:
        return self.broker.max_frame_size - 1024

    def _unserved(self, error: Error) -> Error:
        """The reply to a parked request that was not served."""
        return shutting_down(error.id) if self.broker.closing else error

    async def _wait_for_room(self, request: protocol.Put | protocol.PutMany) -> protocol.AnyReply:
        if isinstance(request, protocol.Put):
            bodies, keys = [request.body], None if request.key is None else [request.key]
        else:
            bodies, keys = request.bodies, request.keys
        putter = self.core.wait_put(request.queue, bodies, keys, put_options(request), Wakeup())
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
            full = f"queue {request.queue!r} is full"
            return self._unserved(Error(id=request.id, code="full", message=full))
        self._needs_sync()
        if isinstance(request, protocol.Put):
            return protocol.PutReply(id=request.id, msg_id=putter.ids[0])
        return protocol.PutManyReply(id=request.id, msg_ids=putter.ids)

    async def _wait_for_join(self, request: protocol.Join) -> protocol.AnyReply:
        """Done means the count was 0 at some moment after the join began: a join
        waits for the work there was, not for a queue that stays idle."""
        joiner = self.core.wait_join(request.queue, Wakeup())
        try:
            peer_gone = await self._park(joiner.token, request.timeout)
        finally:
            self.core.cancel_join(joiner)
        if peer_gone:
            raise PeerGone
        if joiner.done:
            return protocol.JoinReply(id=request.id)
        return self._unserved(join_timeout(request.id, request.queue, request.timeout))

    async def _park(self, token: object, timeout: float | None) -> bool:
        """Wait for ``token``, the timeout, or the peer's end (True), reading the socket
        in a scope the token cancels: it takes in pipelined requests meanwhile."""
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

    async def _wait_for_message(self, request: Take) -> Delivery | Error | object:
        lease = None
        if isinstance(request, Reserve):
            lease = request.lease or self.core.queue_config(request.queue)["lease"]
        if isinstance(request, GetAny | ReserveAny):
            if isinstance(request, ReserveAny):
                lease = request.lease or QUEUE_LEASE  # (then the queue's it comes from)
            waiter = self.core.wait_any(request.queues, Wakeup(), lease, owner=self)
        else:
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
            names = request.queues if isinstance(request, GetAny | ReserveAny) else request.queue
            return self._unserved(empty(request.id, names))
        messages = waiter.messages
        if isinstance(request, GetMany) and request.n > len(messages):
            room = self._batch_bytes() - sum(
                len(m.body) + protocol.MESSAGE_OVERHEAD for m in messages
            )
            messages += self.core.get_nowait(request.queue, request.n - len(messages), room)
        return self._delivery_to(request, waiter)

    def _delivery_to(self, request: Take, waiter: Waiter) -> Delivery:
        if waiter.lease is None:
            return Delivery(type(request), waiter.messages, request.id)
        lease_s = self._lease_left(waiter.messages[0], self.broker.clock())
        return Delivery(type(request), waiter.messages, request.id, lease_s, waiter.leases)

    def hand_over(self, waiter: Waiter) -> None:
        """Write the parked request's reply from the task that handed it a message,
        two passes of the run loop sooner (docs/performance.md). Not with a live feed
        or streams (their writers may be mid-frame); the parked task writes the rest."""
        parked, stream = self.parked, self.stream
        if parked is None or parked[1] is not waiter or not isinstance(stream, UnixStream):
            return
        if self.handed is not None or self.feed is not None or self.streams is not None:
            return
        if self.out or self.pending:
            return
        delivery = self._delivery_to(parked[0], waiter)
        frame = protocol.encode_frame(delivery.reply())
        if not (sent := stream.try_send(frame)):
            return  # no room, or a broken socket: the parked task deals with it
        self.handed = (delivery, frame[sent:])
        if sent == len(frame):  # nothing is left to undo if the peer goes now
            waiter.messages, waiter.leases = [], []

    async def _finish_hand_over(self, peer_gone: bool) -> object:
        assert self.handed is not None
        (delivery, rest), self.handed = self.handed, None
        if rest:
            if peer_gone:
                self._undeliver(delivery)
                raise PeerGone
            await self._send_delivery(delivery, rest)
        elif peer_gone:
            raise PeerGone
        return SENT

    async def _send_delivery(self, delivery: Delivery, rest: bytes | None = None) -> None:
        """``rest``: what hand_over left unsent. If the peer is gone, the messages go back."""
        if rest is None:
            protocol.append_frame(self.out, delivery.reply())
        else:
            self.out += rest
        try:
            await self._drain()
        except PeerGone:
            self._undeliver(delivery)
            raise

    def _undeliver(self, delivery: Delivery) -> None:
        wake_all(self.core.undeliver(delivery.messages, self.broker.clock(), delivery.leases))


def put_options(request: protocol.Put | protocol.PutMany) -> dict[str, Any]:
    return {"priority": request.priority, "delay": request.delay, "ttl": request.ttl}


def shutting_down(request_id: int) -> Error:
    return Error(id=request_id, code="shutting_down", message="the broker is stopping")


def empty(request_id: int, queue: str | list[str]) -> Error:
    """``queue``: a list for a get_any or reserve_any (every one of them was empty)."""
    if isinstance(queue, list):
        names = ", ".join(repr(name) for name in queue)
        return Error(id=request_id, code="empty", message=f"queues {names} are empty")
    return Error(id=request_id, code="empty", message=f"queue {queue!r} is empty")


def join_timeout(request_id: int, queue: str, timeout: float | None) -> Error:
    message = f"queue {queue!r} still had unfinished tasks after {timeout or 0:g} s"
    return Error(id=request_id, code="timeout", message=message)
