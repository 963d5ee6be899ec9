"""The broker's state as a plain object: queues, waiters, fair handoff.

Theory of operation
-------------------
:class:`BrokerCore` knows nothing of trio, sockets or clocks. The I/O layer
calls its methods and passes the current time in; every method changes the
state completely before it returns, so there is never an ``await`` in the
middle of a state change (the trio way: a synchronous ``_nowait`` core, and
parking happens outside).

Each queue holds its ready messages in arrival order and its waiting
dequeuers (:class:`Waiter`) in the order they began to wait. A queue never
has both: a message that arrives while someone waits is handed straight to
the longest waiter (``put`` returns that waiter so the I/O layer can wake
it), and a dequeuer only waits when nothing is ready. That invariant is what
makes the handoff fair: there is no window in which a newcomer's
``get_nowait`` could overtake a waiter.

A waiter that gives up (timeout, disconnect, cancellation) is removed with
:meth:`BrokerCore.cancel_wait`; if a message was already handed to it, the
message goes back to the head of its queue, where the next waiter gets it.
The same happens through :meth:`BrokerCore.undeliver` when a reply
carrying messages could not be written: a ``get`` is at-most-once, but a
message is never dropped because its reply failed to leave.

Every operation is O(1) per message (deque ends, an OrderedDict of waiters).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable
from typing import Any

from .errors import MessageTooLarge
from .protocol import MESSAGE_OVERHEAD, validate_queue_name


class Message:
    """One message: the id ``put`` returned, its body, and when it arrived."""

    __slots__ = ("body", "enqueued_at", "id")

    def __init__(self, msg_id: int, body: bytes, enqueued_at: float) -> None:
        self.id = msg_id
        self.body = body
        self.enqueued_at = enqueued_at

    def __repr__(self) -> str:
        return f"Message(id={self.id}, body={self.body[:32]!r})"


class Waiter:
    """A dequeuer parked on a queue until a message is handed to it.

    ``messages`` is filled by the core; ``token`` belongs to the I/O layer
    (the trio broker keeps the event it waits on there).
    """

    __slots__ = ("messages", "queue", "token")

    def __init__(self, queue: str, token: object = None) -> None:
        self.queue = queue
        self.messages: list[Message] = []
        self.token = token

    @property
    def served(self) -> bool:
        return bool(self.messages)


class QueueState:
    """One named queue: ready messages, waiters, counters."""

    __slots__ = ("bytes", "delivered_total", "name", "put_total", "ready", "waiters")

    def __init__(self, name: str) -> None:
        self.name = name
        self.ready: deque[Message] = deque()
        # Insertion-ordered, O(1) removal from anywhere: the fairness structure.
        self.waiters: OrderedDict[Waiter, None] = OrderedDict()
        self.bytes = 0
        self.put_total = 0
        self.delivered_total = 0


class BrokerCore:
    """All queues of one broker, driven by method calls (see module doc)."""

    def __init__(self, *, max_message_size: int) -> None:
        self.max_message_size = max_message_size
        self._queues: dict[str, QueueState] = {}
        self._next_id = 1

    # -- enqueue ---------------------------------------------------------

    def put(self, name: str, body: bytes, now: float) -> tuple[int, Waiter | None]:
        """Enqueue ``body``; return its id and the waiter it went to, if any."""
        if len(body) > self.max_message_size:
            raise MessageTooLarge(
                f"body of {len(body)} bytes is over max_message_size {self.max_message_size}"
            )
        q = self._queues.get(name)
        if q is None:
            validate_queue_name(name, for_put=True)
            q = self._queues[name] = QueueState(name)
        elif ":" in name:
            validate_queue_name(name, for_put=True)
        msg = Message(self._next_id, body, now)
        self._next_id += 1
        q.put_total += 1
        if q.waiters:
            waiter, _ = q.waiters.popitem(last=False)
            waiter.messages.append(msg)
            q.delivered_total += 1
            return msg.id, waiter
        q.ready.append(msg)
        q.bytes += len(body)
        return msg.id, None

    def put_many(
        self, name: str, bodies: Iterable[bytes], now: float
    ) -> tuple[list[int], list[Waiter]]:
        """Enqueue several bodies in order; all or none (sizes checked first)."""
        bodies = list(bodies)
        validate_queue_name(name, for_put=True)
        for body in bodies:
            if len(body) > self.max_message_size:
                raise MessageTooLarge(
                    f"a body of {len(body)} bytes is over max_message_size {self.max_message_size}"
                )
        ids: list[int] = []
        woken: list[Waiter] = []
        for body in bodies:
            msg_id, waiter = self.put(name, body, now)
            ids.append(msg_id)
            if waiter is not None:
                woken.append(waiter)
        return ids, woken

    # -- dequeue ---------------------------------------------------------

    def get_nowait(self, name: str, n: int = 1, max_bytes: int | None = None) -> list[Message]:
        """Remove and return up to ``n`` ready messages (maybe none).

        ``max_bytes`` bounds the batch's encoded size (each body plus
        :data:`~brokerq.protocol.MESSAGE_OVERHEAD`) so it fits in one reply
        frame; the first message is always taken.
        """
        validate_queue_name(name)
        q = self._queues.get(name)
        if q is None or not q.ready:
            return []
        taken: list[Message] = []
        size = 0
        ready = q.ready
        while ready and len(taken) < n:
            cost = len(ready[0].body) + MESSAGE_OVERHEAD
            if taken and max_bytes is not None and size + cost > max_bytes:
                break
            taken.append(ready.popleft())
            size += cost
        q.bytes -= size - MESSAGE_OVERHEAD * len(taken)
        q.delivered_total += len(taken)
        return taken

    def wait(self, name: str, token: object = None) -> Waiter:
        """Park a dequeuer at the back of the line. Call only when nothing is ready."""
        validate_queue_name(name)
        q = self._queue(name)
        assert not q.ready, "wait() while messages are ready would break fair handoff"
        waiter = Waiter(name, token)
        q.waiters[waiter] = None
        return waiter

    def cancel_wait(self, waiter: Waiter) -> list[Waiter]:
        """Withdraw a waiter; messages already handed to it go back to the head.

        Returns the waiters those messages went to instead (to be woken).
        """
        q = self._queues.get(waiter.queue)
        if q is None:  # pragma: no cover - queues are never dropped while waited on
            return []
        q.waiters.pop(waiter, None)
        messages, waiter.messages = waiter.messages, []
        return self.undeliver(waiter.queue, messages) if messages else []

    def undeliver(self, name: str, messages: list[Message]) -> list[Waiter]:
        """Put delivered-but-unsent messages back at the head of ``name``.

        Used when a reply carrying them could not be written, or a waiter
        left after they were handed to it. Order is kept, and waiters get
        them first (longest waiter first); returns the waiters served.
        """
        q = self._queue(name)
        q.delivered_total -= len(messages)
        for msg in reversed(messages):
            q.ready.appendleft(msg)
            q.bytes += len(msg.body)
        return self._hand_to_waiters(q)

    def _hand_to_waiters(self, q: QueueState) -> list[Waiter]:
        served: list[Waiter] = []
        while q.ready and q.waiters:
            waiter, _ = q.waiters.popitem(last=False)
            msg = q.ready.popleft()
            q.bytes -= len(msg.body)
            q.delivered_total += 1
            waiter.messages.append(msg)
            served.append(waiter)
        return served

    # -- inspection ------------------------------------------------------

    def peek(self, name: str) -> Message | None:
        validate_queue_name(name)
        q = self._queues.get(name)
        if q is None or not q.ready:
            return None
        return q.ready[0]

    def purge(self, name: str) -> int:
        """Drop every ready message of ``name``; return how many."""
        validate_queue_name(name)
        q = self._queues.get(name)
        if q is None:
            return 0
        count = len(q.ready)
        q.ready.clear()
        q.bytes = 0
        return count

    def queue_names(self) -> list[str]:
        return sorted(self._queues)

    def queue_stats(self, name: str, now: float) -> dict[str, Any]:
        """The stats of one queue (all zero for a queue never used)."""
        validate_queue_name(name)
        q = self._queues.get(name) or QueueState(name)
        oldest = q.ready[0].enqueued_at if q.ready else None
        return {
            "name": name,
            "ready": len(q.ready),
            "delayed": 0,
            "reserved": 0,
            "buried": 0,
            "waiters": len(q.waiters),
            "putters": 0,
            "bytes": q.bytes,
            "put_total": q.put_total,
            "delivered_total": q.delivered_total,
            "expired_total": 0,
            "dead_lettered_total": 0,
            "oldest_ready_age_s": None if oldest is None else max(0.0, now - oldest),
        }

    def totals(self) -> dict[str, int]:
        """Sums over every queue, for the broker's stats."""
        queues = self._queues.values()
        return {
            "queues": len(self._queues),
            "ready": sum(len(q.ready) for q in queues),
            "waiters": sum(len(q.waiters) for q in queues),
            "bytes": sum(q.bytes for q in queues),
            "put_total": sum(q.put_total for q in queues),
            "delivered_total": sum(q.delivered_total for q in queues),
        }

    def all_waiters(self) -> list[Waiter]:
        """Every parked dequeuer (a stopping broker wakes them all)."""
        return [w for q in self._queues.values() for w in q.waiters]

    def holds_messages(self) -> bool:
        """True while any message lives only in this process's memory."""
        return any(q.ready for q in self._queues.values())

    def _queue(self, name: str) -> QueueState:
        q = self._queues.get(name)
        if q is None:
            q = self._queues[name] = QueueState(name)
        return q
