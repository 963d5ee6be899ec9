"""The broker's state, as data: messages, leases, parked requests, queues.

Plain objects with ``__slots__`` (one of each per message or request, so
they stay small); :class:`~brokerq.broker.core.BrokerCore` holds and changes them.
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
    """A put parked until its queue has room for all of it (FIFO); the core
    sets ``ids`` when it admits it."""

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
    """A dequeuer parked until a message is handed to it (in ``messages``).

    ``lease``: None for ``get``, the lease length for ``reserve``.
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
    """A prefetching consumer (``consume``): a waiter that stays in the line
    while it has ``credit``, going to the back after each message.

    ``held``: delivered, not taken yet (still the broker's, ready to the
    journal), in order; ``messages``: those of them not yet sent. ``length``:
    None (get mode), or the lease a taken message gets for ``owner``.
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

    ``done``: they did (a join returns once the work it waited for was
    done, even if more came since).
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
        self.unfinished = 0  # tasks not yet done (see core.py's doc)
        #: Open streams (``consume``), and the messages delivered to them not taken yet.
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
