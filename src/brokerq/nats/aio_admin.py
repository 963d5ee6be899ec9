"""A queue's settings and inspection on JetStream: configure, stats, purge, peek, delete.

A mixin of :class:`brokerq.nats.AsyncNatsQueue`, kept apart from the verbs
that move messages (put, get, reserve) so each module reads on its own.
Settings live in the stream (max_deliveries, maxsize, max_bytes) and its
consumer (the lease), so every client sees the same ones.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol

import nats.js.errors

from .. import validation
from ..errors import Empty, InvalidRequest
from . import burial, naming, rules, topics
from .failures import translate_errors
from .tasks import TaskCount
from .topics import TopicHost


@dataclass
class QueueSettings:
    """A queue's settings every client shares: max_deliveries lives in the
    stream's description (servers before 2.10 have no metadata), the lease
    is the consumer's ack wait."""

    max_deliveries: int = rules.DEFAULT_MAX_DELIVERIES
    lease: float = rules.DEFAULT_LEASE

    @classmethod
    def from_description(cls, text: str | None) -> QueueSettings:
        try:
            found = json.loads(text or "{}")
            return cls(max_deliveries=int(found["max_deliveries"]))
        except (ValueError, KeyError, TypeError):
            return cls()


class QueueHost(TopicHost, Protocol):
    """What a queue needs of its client (:class:`brokerq.nats.AsyncNatsClient`),
    named here so this module does not import the client's: what its topic
    subscriptions need (url, timeout, replicas, js, nc), and these."""

    #: Messages a queue takes ahead of its gets and reserves (0: none).
    prefetch: int

    def next_key(self) -> str: ...

    async def ensure(self, name: str) -> QueueSettings: ...

    def known(self, name: str) -> QueueSettings | None: ...

    def forget(self, name: str) -> None: ...


@translate_errors
class QueueAdmin:
    """configure, stats, qsize, empty, purge, peek and delete of a queue."""

    name: str
    stream: str
    client: QueueHost
    tasks: TaskCount

    async def _settings(self) -> QueueSettings:
        raise NotImplementedError

    async def configure(
        self,
        *,
        max_deliveries: int | None = None,
        lease: float | None = None,
        maxsize: int | None = None,
        max_bytes: int | None = None,
    ) -> dict[str, Any]:
        """Stored in the stream (max_deliveries, maxsize, max_bytes) and its
        consumer (lease), so every client sees them: another client reads
        them again within ``SETTINGS_TTL`` (10 s)."""
        validation.validate_lease(lease)
        js = self.client.js
        await self.client.ensure(self.name)
        info = await js.stream_info(self.stream)
        config = info.config
        settings = QueueSettings.from_description(config.description)
        if max_deliveries is not None:
            if not isinstance(max_deliveries, int) or max_deliveries < 1:
                raise InvalidRequest(f"max_deliveries must be >= 1, not {max_deliveries!r}")
            settings.max_deliveries = max_deliveries
        config.description = json.dumps({"max_deliveries": settings.max_deliveries})
        if maxsize is not None:
            config.max_msgs = maxsize or -1
        if max_bytes is not None:
            config.max_bytes = max_bytes or -1
        await js.update_stream(config)
        if lease is not None:
            consumer = await js.consumer_info(self.stream, naming.CONSUMER)
            consumer.config.ack_wait = lease
            await js.add_consumer(self.stream, consumer.config)
        self.client.forget(self.name)
        return await self.stats()

    async def stats(self) -> dict[str, Any]:
        """The local stats' keys that have a meaning here (docs/nats.md)."""
        settings = await self._settings()
        stream = await self.client.js.stream_info(self.stream)
        consumer = await self.client.js.consumer_info(self.stream, naming.CONSUMER)
        outstanding = await self.tasks.outstanding()  # (after the stream's count: see tasks.py)
        return {
            "name": self.name,
            "ready": consumer.num_pending or 0,
            "reserved": consumer.num_ack_pending or 0,
            "waiters": consumer.num_waiting or 0,
            "bytes": stream.state.bytes,
            "messages": stream.state.messages,
            "put_total": stream.state.last_seq,
            "buried": await burial.count(self.client.js, self.name),
            "redelivered": consumer.num_redelivered or 0,
            "unfinished_tasks": stream.state.messages + outstanding,
            "max_deliveries": settings.max_deliveries,
            "lease": settings.lease,
            # 0: no limit, as the local stats say it
            "maxsize": max(0, stream.config.max_msgs or 0),
            "max_bytes": max(0, stream.config.max_bytes or 0),
        }

    async def qsize(self) -> int:
        return int((await self.stats())["ready"])

    async def empty(self) -> bool:
        return await self.qsize() == 0

    async def purge(self) -> int:
        """Drops every message of the queue, reserved ones too (JetStream
        purges a stream whole); returns how many."""
        await self._settings()
        count = (await self.client.js.stream_info(self.stream)).state.messages
        await self.client.js.purge_stream(self.stream)
        return int(count)

    async def peek(self) -> bytes:
        """The oldest message's body, not taken (it may be reserved just now:
        JetStream keeps no separate ready list)."""
        await self._settings()
        state = (await self.client.js.stream_info(self.stream)).state
        if state.messages == 0:
            raise Empty(f"queue {self.name!r} is empty")
        try:
            found = await self.client.js.get_msg(self.stream, seq=state.first_seq)
        except nats.js.errors.NotFoundError:
            raise Empty(f"queue {self.name!r} is empty") from None
        return bytes(found.data or b"")

    async def delete(self) -> int:
        """Its topic subscriptions end (as the local delete's), its count of
        gets owed a task_done is forgotten, then the queue's stream goes, then
        its buried messages' stream. The count before the stream: a crash
        between them leaves the queue with its messages and no gets owed a
        task_done, never a stale count a new queue would inherit. A crash
        before the buried stream goes leaves copies no redelivery or kick
        mistakes for a new message of the same sequence (burial.py checks
        the key), and the next delete removes them."""
        await topics.forget_queue(self.client, self.name)
        await self.tasks.forget()
        try:
            count = (await self.client.js.stream_info(self.stream)).state.messages
            await self.client.js.delete_stream(self.stream)
        except nats.js.errors.NotFoundError:
            count = 0
        count += await burial.delete(self.client.js, self.name)
        self.client.forget(self.name)
        return int(count)
