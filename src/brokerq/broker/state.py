"""The broker's state, as data: messages, leases, parked requests, queues.

Plain objects with ``__slots__`` (one of each per message or request, so
they stay small); :class:`~brokerq.core.BrokerCore` holds and changes them.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from typing import Any

from .ready import ReadyList


class Message:
    """One message: the id ``put`` returned, its queue, body, arrival, deliveries."""

    __slots__ = (
        "alive",
        "attempts",
        "body",
        "enqueued_at",
        "expires_at",
        "id",
        "priority",
        "queue",
    )

    def __init__(
        self,
        msg_id: int,
        queue: str,
        body: bytes,
        enqueued_at: float,
        attempts: int = 0,
        *,
        priority: int = 0,
        expires_at: float = math.inf,
    ) -> None:
        self.id = msg_id
        self.queue = queue
        self.body = body
        self.enqueued_at = enqueued_at
        self.attempts = attempts
        self.priority = priority
        self.expires_at = expires_at  # its ttl runs out then (wall clock)
        self.alive = True  # False once gone for good (got, acked, purged, expired)

    def __repr__(self) -> str:
        return f"Message(id={self.id}, queue={self.queue!r}, body={self.body[:32]!r})"


class Lease:
    """A reserved message: whose it is, which attempt, until when."""

    __slots__ = ("attempt", "expires_at", "length", "message", "owner")

    def __init__(self, message: Message, owner: object, now: float, length: float) -> None:
        self.message = message
        self.attempt = message.attempts
        self.owner = owner
        self.length = length
        self.expires_at = now + length


class Expiry:
    """A timer entry: ``message``'s ttl runs out (if it still waits by then)."""

    __slots__ = ("message",)

    def __init__(self, message: Message) -> None:
        self.message = message


class Putter:
    """A put parked until its queue has room for all of it (FIFO among putters).

    When the core admits it, it enqueues the bodies and sets ``ids``.
    """

    __slots__ = ("bodies", "ids", "keys", "options", "queue", "token")

    def __init__(
        self,
        queue: str,
        bodies: list[bytes],
        keys: list[bytes] | None,
        options: dict[str, Any],
        token: object = None,
    ) -> None:
        self.queue = queue
        self.bodies = bodies
        self.keys = keys
        self.options = options
        self.token = token
        self.ids: list[int] | None = None


class Waiter:
    """A dequeuer parked on a queue until a message is handed to it.

    ``lease`` is None for ``get`` and the lease length for ``reserve``.
    ``messages`` is filled by the core; ``token`` belongs to the I/O layer.
    """

    __slots__ = ("lease", "leases", "messages", "owner", "queue", "token")

    def __init__(
        self, queue: str, token: object = None, lease: float | None = None, owner: object = None
    ) -> None:
        self.queue = queue
        self.messages: list[Message] = []
        #: For a reserve: the lease each message was handed with (to undo exactly that).
        self.leases: list[Lease | None] = []
        self.token = token
        self.lease = lease
        self.owner = owner

    @property
    def served(self) -> bool:
        return bool(self.messages)


class Stream(Waiter):
    """A prefetching consumer (``consume``): a waiter that stays in its
    queue's line while it has ``credit``, going to the back after each
    message (round robin), and leaves it while it has none.

    ``held`` are the messages delivered to it and not taken yet, in the
    order they were delivered: still the broker's (in the journal as
    ready), they go back to their place when the stream ends. ``messages``
    (a Waiter's) are those of them not yet handed to the I/O layer to send.
    ``length`` is None for a get-mode stream, else the lease a taken
    message gets (reserve mode); ``owner`` holds those leases.
    """

    __slots__ = ("active", "credit", "held", "length", "stream_id")

    def __init__(
        self,
        queue: str,
        prefetch: int,
        length: float | None,
        *,
        token: object = None,
        owner: object = None,
        stream_id: int = 0,
    ) -> None:
        super().__init__(queue, token, None, owner)
        self.credit = prefetch
        self.held: deque[Message] = deque()
        self.length = length
        self.active = True
        self.stream_id = stream_id


class Joiner:
    """A ``join`` parked until its queue's unfinished tasks reach 0.

    ``done`` is set by the core when they did (the count may have risen
    again by the time the I/O layer replies: a join returns once the work
    it waited for was done, not when no work is left). ``token`` belongs to
    the I/O layer.
    """

    __slots__ = ("done", "queue", "token")

    def __init__(self, queue: str, token: object = None) -> None:
        self.queue = queue
        self.token = token
        self.done = False


class QueueState:
    """One named queue: ready messages, waiters, buried ones, settings, counters."""

    __slots__ = (
        "buried",
        "bytes",
        "dead_lettered_total",
        "delayed",
        "delivered_total",
        "expired_total",
        "lease",
        "max_bytes",
        "max_deliveries",
        "maxsize",
        "name",
        "prefetched",
        "put_total",
        "putters",
        "ready",
        "reserved",
        "streams",
        "unfinished",
        "waiters",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.ready: ReadyList[Message] = ReadyList()
        # Insertion-ordered, O(1) removal from anywhere: the fairness structure.
        self.waiters: OrderedDict[Waiter, None] = OrderedDict()
        self.buried: dict[int, Message] = {}
        self.reserved = 0
        self.delayed = 0
        self.bytes = 0  # body bytes held, in every state
        self.max_deliveries: int | None = None
        self.lease: float | None = None
        self.maxsize = 0
        self.max_bytes = 0
        self.putters: OrderedDict[Putter, None] = OrderedDict()
        self.put_total = 0
        self.delivered_total = 0
        self.expired_total = 0
        self.dead_lettered_total = 0
        #: Tasks not yet done, as queue.Queue's unfinished_tasks: +1 per
        #: message put, -1 per task_done, and -1 (never below 0) per message
        #: that leaves in any way but a get (acked, purged, expired, buried,
        #: dead-lettered). Journaled (records.UnfinishedRecord).
        self.unfinished = 0
        #: Open streams (``consume``) on this queue, and the messages
        #: delivered to them and not taken yet (still held, not ready).
        self.streams = 0
        self.prefetched = 0

    @property
    def held(self) -> int:
        """The messages held, in every state (what ``maxsize`` counts)."""
        return len(self.ready) + self.delayed + self.reserved + len(self.buried) + self.prefetched


class Topic:
    """One topic: its subscriber queues and live subscribers, in the order they came."""

    __slots__ = ("dropped_total", "live", "name", "published_total", "queues")

    def __init__(self, name: str) -> None:
        self.name = name
        self.queues: dict[str, None] = {}
        self.live: dict[object, None] = {}
        self.published_total = 0
        self.dropped_total = 0  # copies not made: the subscriber queue was full


class Topics:
    """Every topic with a subscriber: queues (durable), or tokens (``live``)."""

    def __init__(self) -> None:
        self._topics: dict[str, Topic] = {}

    def get(self, name: str) -> Topic | None:
        return self._topics.get(name)

    def add(self, name: str, member: object, *, live: bool = False) -> None:
        topic = self._topics.get(name) or self._topics.setdefault(name, Topic(name))
        members: dict[Any, None] = topic.live if live else topic.queues
        members[member] = None

    def remove(self, name: str, member: object, *, live: bool = False) -> bool:
        """Take ``member`` off topic ``name``; False if it was not there."""
        topic = self._topics.get(name)
        if topic is None:
            return False
        members: dict[Any, None] = topic.live if live else topic.queues
        if member not in members:
            return False
        del members[member]
        if not topic.queues and not topic.live:
            del self._topics[name]
        return True

    def remove_everywhere(self, member: object, *, live: bool = False) -> None:
        """A deleted queue, or a live subscriber gone: off every topic."""
        for name in list(self._topics):
            self.remove(name, member, live=live)

    def subscribes(self, name: str, queue: str) -> bool:
        topic = self._topics.get(name)
        return topic is not None and queue in topic.queues

    def has_queue(self, queue: str) -> bool:
        return any(queue in t.queues for t in self._topics.values())

    def subscriptions(self) -> list[tuple[str, str]]:
        """Every durable subscription as (topic, queue), for snapshots."""
        return [(t.name, q) for t in self._topics.values() for q in t.queues]

    def stats(self) -> dict[str, dict[str, Any]]:
        return {
            t.name: {
                "queues": list(t.queues),
                "live": len(t.live),
                "published_total": t.published_total,
                "dropped_total": t.dropped_total,
            }
            for t in sorted(self._topics.values(), key=lambda t: t.name)
        }
