"""A queue's durable subscription to a topic, on JetStream: subscribe, unsubscribe, publish.

A subscription is one message in the stream ``BQSUBS``, on the subject
``bq.s.<topic>.<queue>`` (one kept per subject), so subscribing and
unsubscribing are each one atomic step every client sees at once. A
publish reads the topic's subscribers there and puts a copy in each
queue's stream, as a put: under the publish's key (JetStream drops a copy
sent again after a lost reply) and acknowledged once stored, so the copy
waits in the queue while no consumer runs, and survives a server restart.

Why not stream sources (the server copying a topic stream into each
queue's): on nats-server 2.9 a work-queue stream that sources another
finds where it left off from the sourced messages it still holds, and
once its consumers have taken them all, a restart copies the whole topic
stream again. A copy made by the publisher is exact, counted (``publish``
returns how many queues have it, as on the local broker), and, as the
local broker's, skips a full queue rather than waiting for room.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol, TypeVar

import nats.js.errors
from nats.aio.client import Client as NatsConnection
from nats.js import JetStreamContext
from nats.js.api import DEFAULT_PREFIX, DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

from .. import validation
from ..errors import BrokerqError, BrokerUnavailable
from . import naming
from .failures import NO_STREAM, UNANSWERED, asked_again

T = TypeVar("T")

#: How long one attempt of a copy waits for its PubAck before it is sent
#: again under its key (as a put's attempt: aio_queue.ATTEMPT_TIMEOUT).
ATTEMPT_TIMEOUT = 2.0
#: JetStream's error codes for a stream at its limits (messages, bytes).
_FULL_CODES = frozenset({10077, 10078})


class TopicHost(Protocol):
    """What the subscriptions need of their client (:class:`brokerq.nats.AsyncNatsClient`),
    named here so this module does not import the client's."""

    url: str
    timeout: float
    replicas: int

    @property
    def js(self) -> JetStreamContext: ...

    @property
    def nc(self) -> NatsConnection: ...


def check_topic(topic: str) -> None:
    """The local broker's rule: a queue's name, without the broker's ``:``."""
    validation.validate_queue_name(topic, for_put=True, what="topic")


async def subscribe(host: TopicHost, queue: str, topic: str) -> None:
    """Record ``queue``'s subscription to ``topic``: every publish that reads
    the subscribers after this returns puts a copy in ``queue``. The queue's
    stream is made first (by the caller) and the record written second: a
    client dying between the two leaves the queue made but not subscribed,
    and this call never returned, so nothing was promised."""
    check_topic(topic)
    await _ensure_registry(host)
    record = naming.subscription_subject(topic, queue)
    # (written again after no answer: the record is the same, one kept per subject)
    await _answered(host, lambda: host.js.publish(record, queue.encode(), timeout=ATTEMPT_TIMEOUT))


async def unsubscribe(host: TopicHost, queue: str, topic: str) -> bool:
    """Erase the record (one purge, so two racing calls cannot both find it);
    whether there was one. The copies already in the queue stay. (A purge
    whose answer was lost, made again, finds nothing: False, the
    subscription ended all the same.)"""
    check_topic(topic)
    return await _purge(host, naming.subscription_subject(topic, queue)) > 0


async def forget_queue(host: TopicHost, queue: str) -> None:
    """Erase every subscription of ``queue`` (it is being deleted, as the
    local ``delete`` ends them). A publish that finds a queue's stream gone
    erases its record too, so a client dying before its delete is harmless."""
    await _purge(host, naming.queue_subscriptions(queue))


async def subscribers(host: TopicHost, topic: str) -> list[str]:
    """The queues subscribed to ``topic`` now, sorted."""
    return sorted(queue for _, queue in await _records(host, naming.topic_subscriptions(topic)))


async def table(host: TopicHost) -> dict[str, list[str]]:
    """Every topic with subscribers, and its queues (for ``brokerq topics``)."""
    found: dict[str, list[str]] = {}
    for topic, queue in await _records(host, naming.SUBSCRIPTIONS_SUBJECTS):
        found.setdefault(topic, []).append(queue)
    return {topic: sorted(queues) for topic, queues in sorted(found.items())}


async def publish(host: TopicHost, topic: str, data: bytes, headers: Mapping[str, str]) -> int:
    """Put a copy of ``data`` in every subscribed queue, at once; how many have it.

    Each copy is a put under the publish's key: one sent again after a lost
    reply is dropped by that queue's duplicate window. A publisher dying
    midway has put copies in some queues and not the others, as a
    ``put_many`` dying midway; it had not returned, so no publish was
    acknowledged, and no queue holds two copies."""
    queues = await subscribers(host, topic)
    copies = (copy(host, queue, data, headers) for queue in queues)
    made = await asyncio.gather(*copies, return_exceptions=True)  # (each tried to its end)
    failed = [outcome for outcome in made if isinstance(outcome, BaseException)]
    if failed:
        raise failed[0]
    return sum(1 for outcome in made if outcome is True)


async def copy(host: TopicHost, queue: str, data: bytes, headers: Mapping[str, str]) -> bool:
    """One queue's copy, sent until acknowledged (for the client's timeout);
    False if the queue is full (the local broker drops that copy too: a
    publish never waits for room) or was deleted (its record is erased)."""
    give_up = time.monotonic() + host.timeout
    while True:
        try:
            await host.js.publish(
                naming.subject(queue),
                data,
                headers=dict(headers),
                timeout=min(host.timeout, ATTEMPT_TIMEOUT),
            )
            return True
        except (*UNANSWERED, nats.js.errors.APIError) as exc:
            if getattr(exc, "err_code", None) in _FULL_CODES:
                return False
            if isinstance(exc, NO_STREAM) and await _deleted(host, queue):
                await _purge(host, naming.queue_subscriptions(queue))
                return False
            if not isinstance(exc, UNANSWERED):
                raise
            if time.monotonic() >= give_up:
                raise BrokerUnavailable(f"queue {queue!r} took no copy in time: {exc!r}") from exc
        await asyncio.sleep(0.05)


async def _deleted(host: TopicHost, queue: str) -> bool:
    """Whether ``queue``'s stream is gone (no answer is not an answer: the copy
    is tried again)."""
    try:
        await host.js.stream_info(naming.stream_name(queue))
    except nats.js.errors.NotFoundError:
        return True
    except UNANSWERED:
        pass
    return False


async def _ensure_registry(host: TopicHost) -> None:
    """Make the subscriptions' stream if missing (idempotent: every client
    makes it with the same config)."""
    try:
        await _answered(host, lambda: host.js.stream_info(naming.SUBSCRIPTIONS_STREAM))
    except nats.js.errors.NotFoundError:
        config = StreamConfig(
            name=naming.SUBSCRIPTIONS_STREAM,
            subjects=[naming.SUBSCRIPTIONS_SUBJECTS],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_msgs_per_subject=1,  # a subscription is there or not
            discard=DiscardPolicy.OLD,
            num_replicas=host.replicas,
        )
        await _answered(host, lambda: host.js.add_stream(config))


async def _records(host: TopicHost, subjects: str) -> list[tuple[str, str]]:
    """The (topic, queue) of every record matching ``subjects`` (the server
    lists the matching subjects of a stream in its info)."""
    try:
        info = await _answered(
            host,
            lambda: host.js.stream_info(naming.SUBSCRIPTIONS_STREAM, subjects_filter=subjects),
        )
    except nats.js.errors.NotFoundError:
        return []  # (nothing ever subscribed)
    found = (naming.parse_subscription(s) for s, n in (info.state.subjects or {}).items() if n)
    return [pair for pair in found if pair is not None]


async def _purge(host: TopicHost, subjects: str) -> int:
    """Purge the records matching ``subjects`` in one request; how many went.
    (nats-py's purge_stream says only whether it succeeded.)"""
    request = json.dumps({"filter": subjects}).encode()
    subject = f"{DEFAULT_PREFIX}.STREAM.PURGE.{naming.SUBSCRIPTIONS_STREAM}"
    reply = await _answered(host, lambda: host.nc.request(subject, request, ATTEMPT_TIMEOUT))
    answer = json.loads(reply.data)
    error = answer.get("error")
    if error is None:
        return int(answer.get("purged", 0))
    if error.get("err_code") == 10059:  # stream not found: nothing ever subscribed
        return 0
    raise BrokerqError(f"NATS refused to erase subscriptions: {error.get('description')}")


async def _answered(host: TopicHost, request: Callable[[], Awaitable[T]]) -> T:
    """``request``, made again while no answer comes (a stream's leader being
    elected, a reconnect), for the client's timeout, as a put is: each is a
    read, or a write whose second time changes nothing more."""
    return await asked_again(request, host.timeout, ATTEMPT_TIMEOUT + 1)
