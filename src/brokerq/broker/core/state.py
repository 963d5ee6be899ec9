"""The broker's state, as data: slotted (one per message or request, so they
stay small), equal only to themselves (parked requests are dict keys)."""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Final

from .ready import ReadyList


@dataclass(slots=True, eq=False)
class Message:
    id: int
    queue: str
    body: bytes
    enqueued_at: float
    attempts: int = 0
    _: KW_ONLY
    priority: int = 0
    expires_at: float = math.inf  # its ttl runs out then (wall clock)
    alive: bool = field(default=True, init=False)  # False once gone for good

    def __repr__(self) -> str:
        return f"Message(id={self.id}, queue={self.queue!r}, body={self.body[:32]!r})"


@dataclass(slots=True, eq=False)
class Lease:
    message: Message
    attempt: int
    owner: object
    length: float
    expires_at: float


@dataclass(slots=True, eq=False)
class Expiry:  # a timer entry: ``message``'s ttl runs out (if it still waits by then)
    message: Message


@dataclass(slots=True, eq=False)
class Putter:
    """A put parked until its queue has room for all of it; ``ids`` set once admitted."""

    queue: str
    bodies: list[bytes]
    keys: list[bytes] | None
    options: dict[str, Any]
    token: object = None
    ids: list[int] | None = field(default=None, init=False)


#: A parked reserve_any's ``lease`` when its request named none: the lease of the
#: queue the message comes from, known only then (a lease asked for is > 0, so
#: CoreBase._lease takes this as it takes None).
QUEUE_LEASE: Final = 0.0


@dataclass(slots=True, eq=False)
class Waiter:
    """A dequeuer parked until a message is handed to it; ``lease``: None for a get.
    ``queues``: a get_any's or reserve_any's, in priority order (``queue`` is the
    first), in each of whose lines it waits; empty for one queue's waiter, which
    so costs the hot path one falsy test (see CoreBase._leave_lines)."""

    queue: str
    token: object = None
    lease: float | None = None
    owner: object = None
    queues: tuple[str, ...] = ()
    messages: list[Message] = field(default_factory=list, init=False)
    #: For a reserve: the lease each message was handed with (to undo exactly that).
    leases: list[Lease | None] = field(default_factory=list, init=False)

    @property
    def served(self) -> bool:
        return bool(self.messages)


@dataclass(slots=True, eq=False)
class Stream(Waiter):
    """A ``consume``: a waiter that stays in the line while it has ``credit``,
    going to the back after each message. ``held``: delivered, not taken yet;
    ``messages``: those not yet sent; ``length``: the lease a taken one gets."""

    credit: int = 0
    length: float | None = None
    stream_id: int = 0
    held: deque[Message] = field(default_factory=deque, init=False)
    active: bool = field(default=True, init=False)


@dataclass(slots=True, eq=False)
class Joiner:
    """A ``join`` parked until its queue's unfinished tasks reach 0 (``done``:
    they did, even if more work came since)."""

    queue: str
    token: object = None
    done: bool = field(default=False, init=False)


@dataclass(slots=True, eq=False)
class QueueState:
    name: str
    ready: ReadyList[Message] = field(default_factory=ReadyList)
    #: Insertion-ordered, O(1) removal from anywhere: the fairness structure.
    waiters: OrderedDict[Waiter, None] = field(default_factory=OrderedDict)
    putters: OrderedDict[Putter, None] = field(default_factory=OrderedDict)
    buried: dict[int, Message] = field(default_factory=dict)
    reserved: int = 0
    delayed: int = 0
    bytes: int = 0  # body bytes held, in every state
    max_deliveries: int | None = None
    lease: float | None = None
    maxsize: int = 0
    max_bytes: int = 0
    put_total: int = 0
    delivered_total: int = 0
    expired_total: int = 0
    dead_lettered_total: int = 0
    unfinished: int = 0  # tasks not yet done (see tasks.py)
    #: Open streams (``consume``), and the messages delivered to them not taken yet.
    streams: int = 0
    prefetched: int = 0

    @property
    def held(self) -> int:
        """What ``maxsize`` counts: the messages held, in every state."""
        return len(self.ready) + self.delayed + self.reserved + len(self.buried) + self.prefetched


@dataclass(slots=True, eq=False)
class Topic:
    name: str
    queues: dict[str, None] = field(default_factory=dict)
    live: dict[object, None] = field(default_factory=dict)
    published_total: int = 0
    dropped_total: int = 0  # copies not made: the subscriber queue was full


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
        for name in list(self._topics):
            self.remove(name, member, live=live)

    def subscribes(self, name: str, queue: str) -> bool:
        return name in self._topics and queue in self._topics[name].queues

    def has_queue(self, queue: str) -> bool:
        return any(queue in t.queues for t in self._topics.values())

    def subscriptions(self) -> list[tuple[str, str]]:
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
