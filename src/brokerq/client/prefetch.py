"""A client's side of a stream (``prefetch``), sans-IO: both clients drive it.

The broker sends a stream up to N ``delivery`` frames unasked. The driver
sends the ``taken`` frame of what it hands out **before** it gives it to the
application: a send that completed on a Unix socket is in the broker's
receive queue, so the broker applies it even if this process is killed the
next moment. What is buffered and not taken stays the broker's. In reserve
mode the lease starts at the ``taken``, so it never ran out in the buffer.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from .. import protocol, validation
from ..errors import Empty, from_code
from .calls import Attempts, Call, Wire, get

MODES = ("get", "reserve")
#: What a take does next (:meth:`Taking.next`): hand out what is buffered,
#: sync with the broker (a ping), or wait for a delivery.
HAND_OUT, SYNC, WAIT = "hand out", "sync", "wait"


class Prefetch:
    """One stream: its request, the deliveries received and not handed out."""

    def __init__(self, queue: str, prefetch: int, mode: str, lease: float | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"mode is 'get' or 'reserve', not {mode!r}")
        validation.validate_lease(lease)
        self.queue = queue
        self.prefetch = prefetch
        self.mode = mode
        self.lease = lease
        #: The id of the consume request once encoded (the deliveries carry it); 0: not open.
        self.stream_id = 0
        #: The lease a taken message gets (reserve mode), from the consume reply.
        self.lease_length = 0.0
        self.buffer: deque[protocol.StreamDelivery] = deque()
        self._taken_one = b""

    def __repr__(self) -> str:
        return (
            f"<Prefetch {self.mode} {self.queue!r} stream {self.stream_id}: "
            f"{len(self.buffer)} buffered>"
        )

    def consume(self) -> Call[protocol.ConsumeReply]:
        """The consume request (never sent again: a new connection opens a new stream)."""
        fields: dict[str, Any] = {"queue": self.queue, "prefetch": self.prefetch}
        if self.mode != "get":
            fields |= {"mode": self.mode, "lease": self.lease}
        return Call(protocol.ConsumeReply, protocol.Consume, 0, fields, retry=False)

    def opening(self, request_id: int) -> None:
        """Deliveries carrying ``request_id`` are this stream's (one may come before the reply)."""
        self.stream_id = request_id
        self.buffer.clear()
        self._taken_one = protocol.encode_frame(protocol.Taken(id=request_id))

    def opened(self, reply: protocol.ConsumeReply) -> None:
        self.lease_length = reply.lease

    def lost(self) -> None:
        """The connection is gone: what was buffered went back to the broker."""
        self.stream_id = 0
        self.buffer.clear()

    def take(self, wire: Wire) -> protocol.AnyReply | None:
        """Take in every whole frame received: this stream's deliveries go to
        the buffer; the first other frame is returned (a reply). An error
        with id 0 (the broker ends the connection) is raised at once."""
        buffer = self.buffer
        stream_id = self.stream_id
        while (frame := wire.next_reply()) is not None:
            if type(frame) is protocol.StreamDelivery:
                if frame.id == stream_id:
                    buffer.append(frame)
                continue  # (a stream cancelled earlier: it took those back)
            if isinstance(frame, protocol.Error) and frame.id == 0:
                raise from_code(frame.code, frame.message)
            return frame
        return None

    def hand_out(self, n: int) -> tuple[list[protocol.StreamDelivery], bytes]:
        """Up to ``n`` buffered deliveries, oldest first, and the ``taken``
        frame to send before they go to the application. Until that send
        completes they are still buffered: :meth:`handed` says it did."""
        count = min(n, len(self.buffer))
        if count == 0:
            return [], b""
        if count == 1:
            return [self.buffer[0]], self._taken_one
        items = [self.buffer[i] for i in range(count)]
        return items, protocol.encode_frame(protocol.Taken(id=self.stream_id, n=count))

    def handed(self, count: int) -> None:
        """The ``taken`` of the first ``count`` was sent: they are the caller's."""
        for _ in range(count):
            self.buffer.popleft()

    def lease_expires(self, now: float) -> float:
        """When the lease of a message handed out ``now`` runs out (a little
        ahead of the broker, which starts it when it reads the taken)."""
        return now + self.lease_length


class Taking:
    """One take from a stream. With nothing buffered, a take with ``timeout``
    0 first syncs (a ping: every delivery made before the broker handled it
    comes ahead of its reply), so nothing already in the queue is missed."""

    __slots__ = ("attempts", "deadline", "grace", "start", "state", "synced", "timeout")

    def __init__(self, state: Prefetch, timeout: float | None, grace: float, now: float) -> None:
        self.state = state
        self.timeout = timeout
        self.grace = grace
        self.start = now
        self.deadline = None if timeout is None else now + timeout
        #: Its retries' deadlines, made on the first lost connection (as from ``start``).
        self.attempts: Attempts | None = None
        #: The driver sets it once the sync's ping was answered.
        self.synced = False

    def next(self, now: float) -> str:
        """:data:`HAND_OUT`, :data:`SYNC` or :data:`WAIT`; Empty when the take is over."""
        if self.state.buffer:
            return HAND_OUT
        if self.timeout == 0 or (self.deadline is not None and now >= self.deadline):
            if self.synced or self.timeout != 0:
                raise self.empty()
            return SYNC
        return WAIT

    def empty(self) -> Empty:
        return Empty(f"queue {self.state.queue!r} is empty")

    def lost(self, now: float) -> bool:
        """The stream's connection was lost: may the take go on, on a new one?"""
        self.state.lost()
        if self.attempts is None:
            self.attempts = Attempts(get(self.state.queue, self.timeout), self.grace, self.start)
        return self.attempts.again(now)
