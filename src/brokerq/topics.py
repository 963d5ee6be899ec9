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

    def add_queue(self, name: str, queue: str) -> bool:
        """Subscribe ``queue`` to topic ``name``; False if it already was."""
        topic = self._topic(name)
        if queue in topic.queues:
            return False
        topic.queues[queue] = None
        return True

    def remove_queue(self, name: str, queue: str) -> bool:
        """End ``queue``'s subscription to ``name``; False if it had none."""
        topic = self._topics.get(name)
        if topic is None or queue not in topic.queues:
            return False
        del topic.queues[queue]
        self._forget_if_idle(topic)
        return True

    def has_queue(self, queue: str) -> bool:
        """Whether ``queue`` subscribes to any topic."""
        return any(queue in t.queues for t in self._topics.values())

    def drop_queue(self, queue: str) -> None:
        """A deleted queue loses every subscription (they are its settings)."""
        for topic in list(self._topics.values()):
            if queue in topic.queues:
                del topic.queues[queue]
                self._forget_if_idle(topic)

    def add_live(self, name: str, token: object) -> None:
        self._topic(name).live[token] = None

    def remove_live(self, name: str, token: object) -> bool:
        topic = self._topics.get(name)
        if topic is None or token not in topic.live:
            return False
        del topic.live[token]
        self._forget_if_idle(topic)
        return True

    def remove_live_everywhere(self, token: object) -> None:
        """A live subscriber went: forget it on every topic."""
        for topic in list(self._topics.values()):
            if token in topic.live:
                del topic.live[token]
                self._forget_if_idle(topic)

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
