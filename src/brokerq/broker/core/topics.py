"""Topics: who gets a copy of each publish.

A topic has two kinds of subscribers. A *durable* subscriber is a queue:
every later publish is put to it as an ordinary message, and the
subscription is journaled (:class:`~brokerq.broker.records.SubscribeRecord`),
so it outlives the broker. A *live* subscriber is a connection (an opaque
token of the I/O layer): it is sent each publish made while it is
subscribed, and forgotten when it goes. The registry of both is
:class:`~brokerq.broker.state.Topics`.
"""

from __future__ import annotations

from ...protocol import validate_queue_name
from .queues import Queues
from .records import SubscribeRecord
from .state import Waiter


def _validate(topic: str, queue: str | None = None) -> None:
    validate_queue_name(topic, what="topic", for_put=True)
    if queue is not None:
        validate_queue_name(queue, for_put=True)


class TopicVerbs(Queues):
    def subscribe(self, topic: str, queue: str) -> bool:
        """Give ``queue`` a copy of every later publish to ``topic`` (journaled);
        False if it was subscribed already."""
        _validate(topic, queue)
        if self.topics.subscribes(topic, queue):
            return False
        self._write(SubscribeRecord(topic=topic, queue=queue))
        self.topics.add(topic, queue)
        return True

    def unsubscribe(self, topic: str, queue: str) -> bool:
        """End ``queue``'s subscription to ``topic``; False if it had none."""
        _validate(topic, queue)
        if not self.topics.subscribes(topic, queue):
            return False
        self._write(SubscribeRecord(topic=topic, queue=queue, on=False))
        return self.topics.remove(topic, queue)

    def watch(self, topic: str, token: object) -> None:
        """Make ``token`` (a connection) a live subscriber of ``topic``."""
        _validate(topic)
        self.topics.add(topic, token, live=True)

    def unwatch(self, topic: str, token: object) -> bool:
        _validate(topic)
        return self.topics.remove(topic, token, live=True)

    def unwatch_all(self, token: object) -> None:
        self.topics.remove_everywhere(token, live=True)

    def publish(
        self,
        topic: str,
        body: bytes,
        now: float,
        key: bytes | None = None,
        *,
        priority: int = 0,
        ttl: float | None = None,
    ) -> tuple[int, list[object], list[Waiter]]:
        """Copy ``body`` to every subscriber of ``topic``.

        Each subscriber queue gets an ordinary put; one that is full gets no
        copy, and the topic's ``dropped_total`` counts it: a publish never
        waits. Returns the number of copies enqueued, the live subscribers'
        tokens (the I/O layer sends them the body), and the waiters woken.

        With a ``key``, each copy's key is derived from it and the queue's
        name, so a retried publish makes only the copies still missing.
        """
        _validate(topic)
        if len(body) > self.max_message_size:
            self._too_large(body)
        found = self.topics.get(topic)
        if found is None:
            return 0, [], []
        found.published_total += 1
        copies, woken = 0, []
        for name in list(found.queues):
            if not self._has_room(name, len(body)):
                found.dropped_total += 1
                continue
            copy_key = None if key is None else [key + b"@" + name.encode()]
            _, served = self.put_many(name, [body], now, copy_key, priority=priority, ttl=ttl)
            woken += served
            copies += 1
        return copies, list(found.live), woken
