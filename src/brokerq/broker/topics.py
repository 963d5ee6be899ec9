"""Topics: who gets a copy of each publish.

A topic has two kinds of subscribers. A *durable* subscriber is a queue:
every later publish is put to it as an ordinary message, and the
subscription is journaled (:class:`~brokerq.records.SubscribeRecord`), so
it outlives the broker. A *live* subscriber is a connection (an opaque
token of the I/O layer): it is sent each publish made while it is
subscribed, and forgotten when it goes.

This registry holds no messages and does no I/O: :class:`~brokerq.core.
BrokerCore` asks it whom to copy a publish to, then enqueues the copies
itself with its ordinary put.
"""

from __future__ import annotations

from typing import Any


class Topic:
    """One topic: its subscriber queues and live subscribers, in the order they came."""

    __slots__ = ("dropped_total", "live", "name", "published_total", "queues")

    def __init__(self, name: str) -> None:
        self.name = name
        self.queues: dict[str, None] = {}
        self.live: dict[object, None] = {}
        self.published_total = 0
        self.dropped_total = 0  # copies not made: the subscriber queue was full

    @property
    def idle(self) -> bool:
        return not self.queues and not self.live


class Topics:
    """Every topic with at least one subscriber."""

    def __init__(self) -> None:
        self._topics: dict[str, Topic] = {}

    def get(self, name: str) -> Topic | None:
        return self._topics.get(name)

    def _topic(self, name: str) -> Topic:
        topic = self._topics.get(name)
        if topic is None:
            topic = self._topics[name] = Topic(name)
        return topic

    def _forget_if_idle(self, topic: Topic) -> None:
        if topic.idle:
            del self._topics[topic.name]

    def _remove(self, name: str, member: object, *, live: bool) -> bool:
        """Take ``member`` off topic ``name``'s queues (or live subscribers);
        False if it was not there."""
        topic = self._topics.get(name)
        if topic is None:
            return False
        members: dict[Any, None] = topic.live if live else topic.queues
        if member not in members:
            return False
        del members[member]
        self._forget_if_idle(topic)
        return True

    def subscribes(self, name: str, queue: str) -> bool:
        """Whether ``queue`` subscribes to topic ``name``."""
        topic = self._topics.get(name)
        return topic is not None and queue in topic.queues

    def has_queue(self, queue: str) -> bool:
        """Whether ``queue`` subscribes to any topic."""
        return any(queue in t.queues for t in self._topics.values())

    def add_queue(self, name: str, queue: str) -> None:
        """Subscribe ``queue`` to topic ``name`` (again: no change)."""
        self._topic(name).queues[queue] = None

    def remove_queue(self, name: str, queue: str) -> bool:
        """End ``queue``'s subscription to ``name``; False if it had none."""
        return self._remove(name, queue, live=False)

    def drop_queue(self, queue: str) -> None:
        """A deleted queue loses every subscription (they are its settings)."""
        for name in list(self._topics):
            self._remove(name, queue, live=False)

    def add_live(self, name: str, token: object) -> None:
        self._topic(name).live[token] = None

    def remove_live(self, name: str, token: object) -> bool:
        return self._remove(name, token, live=True)

    def remove_live_everywhere(self, token: object) -> None:
        """A live subscriber went: forget it on every topic."""
        for name in list(self._topics):
            self._remove(name, token, live=True)

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
