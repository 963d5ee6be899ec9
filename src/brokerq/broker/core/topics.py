"""Topics: who gets a copy of each publish. A *durable* subscriber is a
queue (journaled, it outlives the broker), a *live* one a connection's token."""

from __future__ import annotations

from ...validation import validate_queue_name
from .queues import Queues
from .records import SubscribeRecord
from .state import Waiter


def _validate(topic: str, queue: str | None = None) -> None:
    validate_queue_name(topic, what="topic", for_put=True)
    if queue is not None:
        validate_queue_name(queue, for_put=True)


class TopicVerbs(Queues):
    def subscribe(self, topic: str, queue: str) -> bool:
        """False if ``queue`` was subscribed already."""
        _validate(topic, queue)
        if self.topics.subscribes(topic, queue):
            return False
        self._write(SubscribeRecord(topic=topic, queue=queue))
        self.topics.add(topic, queue)
        return True

    def unsubscribe(self, topic: str, queue: str) -> bool:
        _validate(topic, queue)
        if not self.topics.subscribes(topic, queue):
            return False
        self._write(SubscribeRecord(topic=topic, queue=queue, on=False))
        return self.topics.remove(topic, queue)

    def watch(self, topic: str, token: object) -> None:
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
        """Put ``body`` to every subscriber queue with room (a publish never
        waits); returns the copies made, the live subscribers' tokens and the
        waiters woken. Each copy's key is derived from ``key`` and the queue's
        name, so a retried publish makes only the copies still missing."""
        _validate(topic)
        self._check_size(body)
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
