"""The NATS backend's async client (asyncio, on nats-py): streams, topics, stats.

A queue is a JetStream stream with one durable pull consumer (naming.py);
the queue's own verbs are in :mod:`.aio_queue`. nats-py runs under asyncio
only, so this client refuses to start under trio rather than fail later.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Generator
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsConnection
from nats.aio.subscription import Subscription as NatsSubscriptionHandle
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from .. import validation
from ..client import window
from ..client.calls import Body, PutOptions, as_bytes
from ..errors import BrokerUnavailable, Empty, InvalidRequest, NotSupported
from . import naming, rules, topics
from .aio_admin import QueueSettings
from .aio_message import AsyncNatsMessage
from .aio_queue import AsyncNatsQueue
from .failures import lacks, translate_errors

__all__ = ["AsyncNatsClient", "AsyncNatsMessage", "AsyncNatsQueue", "AsyncNatsSubscription"]

_log = logging.getLogger("brokerq.nats")
#: JetStream drops a second put with the same key within this window (seconds):
#: a put retried after a lost connection is long done by then.
DUPLICATE_WINDOW = 120.0
DEFAULT_TIMEOUT = 10.0
#: How long a queue's settings are taken as read: another client's
#: configure (max_deliveries, lease) is seen within this.
SETTINGS_TTL = 10.0


async def _log_error(exc: Exception) -> None:
    """nats-py's own reports (a server gone, a reconnect): logged, not printed
    (nats-py prints them to stderr by default); a request that fails raises."""
    _log.debug("nats: %s", exc)


def _refuse_trio() -> None:
    """nats-py needs a running asyncio loop: say so plainly under trio."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        raise NotSupported(
            "the NATS backend runs under asyncio only (nats-py): "
            "use the blocking client (brokerq.connect) or run this under asyncio"
        ) from None


@translate_errors
class AsyncNatsClient:
    """A NATS server (or cluster) as a brokerq client: ``async with`` connects.
    ``url``: see :func:`brokerq.nats.naming.parse_url` (servers, replicas)."""

    def __init__(
        self, url: str, timeout: float = DEFAULT_TIMEOUT, *, prefetch: int | None = None
    ) -> None:
        self.url = url
        self.prefetch = window.prefetch(prefetch)
        try:
            self._servers, self.replicas = naming.parse_url(url)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        self.timeout = timeout
        self._nc: NatsConnection | None = None
        self._js: JetStreamContext | None = None
        self._queues: dict[str, AsyncNatsQueue] = {}
        #: Each queue's settings as last read, and when (monotonic).
        self._ready: dict[str, tuple[QueueSettings, float]] = {}
        # A put's key: this client's id and a count, unique across clients
        # and processes, the same on every attempt of that put.
        self._client_id = uuid.uuid4().hex
        self._counter = itertools.count(1)

    def __repr__(self) -> str:
        return f"<brokerq.nats.AsyncNatsClient {naming.redacted(self.url)!r}>"

    async def connect(self) -> AsyncNatsClient:
        _refuse_trio()
        if self._nc is None:
            try:
                self._nc = await nats.connect(
                    self._servers,
                    connect_timeout=max(1, round(self.timeout)),
                    max_reconnect_attempts=-1,  # a restarted server or a new leader: go on
                    allow_reconnect=True,
                    error_cb=_log_error,
                )
            except (OSError, nats.errors.Error) as exc:
                where = naming.redacted(self.url)
                raise BrokerUnavailable(f"cannot reach NATS at {where}: {exc}") from exc
            self._js = self._nc.jetstream(timeout=self.timeout)
        return self

    async def __aenter__(self) -> AsyncNatsClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._nc is not None:
            for q in self._queues.values():
                await q.aclose()
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None:
            await nc.close()

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise BrokerUnavailable(
                f"not connected to {naming.redacted(self.url)}: use `async with` or connect()"
            )
        return self._js

    @property
    def nc(self) -> NatsConnection:
        if self._nc is None:
            raise BrokerUnavailable(
                f"not connected to {naming.redacted(self.url)}: use `async with` or connect()"
            )
        return self._nc

    def next_key(self) -> str:
        return f"{self._client_id}-{next(self._counter)}"

    def queue(self, name: str, **settings: Any) -> AsyncNatsQueue:
        """The queue ``name``; settings given are applied on its first use
        (see :meth:`AsyncNatsQueue.configure`)."""
        validation.validate_queue_name(name)
        q = self._queues.get(name)
        if q is None:
            q = self._queues[name] = AsyncNatsQueue(name, self)
        if any(value is not None for value in settings.values()):
            q.pending_settings.update(settings)
        return q

    async def ensure(self, name: str) -> QueueSettings:
        """The stream and consumer of queue ``name``, made if missing (idempotent:
        every client makes them with the same config), and its settings."""
        known = self.known(name)
        if known is not None:
            return known
        stream = naming.stream_name(name)
        try:
            info = await self.js.stream_info(stream)
        except nats.js.errors.NotFoundError:
            config = StreamConfig(
                name=stream,
                subjects=[naming.subject(name)],
                retention=RetentionPolicy.WORK_QUEUE,
                storage=StorageType.FILE,
                discard=DiscardPolicy.NEW,  # a full queue refuses a put, never drops one
                duplicate_window=DUPLICATE_WINDOW,
                num_replicas=self.replicas,  # a put is acknowledged by their quorum
                description=json.dumps({"max_deliveries": rules.DEFAULT_MAX_DELIVERIES}),
            )
            info = await self.js.add_stream(config)
        settings = QueueSettings.from_description(info.config.description)
        try:
            consumer = await self.js.consumer_info(stream, naming.CONSUMER)
        except nats.js.errors.NotFoundError:
            consumer = await self.js.add_consumer(
                stream,
                ConsumerConfig(
                    durable_name=naming.CONSUMER,
                    ack_policy=AckPolicy.EXPLICIT,
                    ack_wait=rules.DEFAULT_LEASE,
                    max_deliver=-1,  # the dead-letter move is ours (aio_queue.py)
                    max_ack_pending=-1,
                ),
            )
        settings.lease = float(consumer.config.ack_wait or rules.DEFAULT_LEASE)
        self._ready[name] = (settings, time.monotonic())
        return settings

    def known(self, name: str) -> QueueSettings | None:
        """Queue ``name``'s settings as read less than SETTINGS_TTL ago, or None."""
        known = self._ready.get(name)
        if known is not None and time.monotonic() - known[1] < SETTINGS_TTL:
            return known[0]
        return None

    def forget(self, name: str) -> None:
        """Drop what this client knows of ``name``'s stream (deleted, reconfigured)."""
        self._ready.pop(name, None)
        q = self._queues.get(name)
        if q is not None:
            q.drop_subscription()

    async def publish(
        self, topic: str, body: Body, *, priority: int = 0, ttl: float | None = None
    ) -> int:
        """A copy in every subscribed queue, each acknowledged once stored
        (:func:`brokerq.nats.topics.publish`), then a live publish on core
        NATS to the subscriptions open now. Returns how many queues have a
        copy: NATS does not say how many live subscribers it reached."""
        topics.check_topic(topic)
        PutOptions(priority, 0, ttl, None).fields()  # (the local publish's checks)
        if priority:
            raise lacks("priority", "publish")
        if ttl is not None and ttl <= 0:
            raise InvalidRequest(f"ttl must be > 0, not {ttl!r}")
        data = as_bytes(body)
        headers = rules.put_headers(self.next_key(), time.time(), 0, ttl)
        copies = await topics.publish(self, topic, data, headers)
        await self.nc.publish(naming.topic_subject(topic), data)
        await self.nc.flush(timeout=round(self.timeout) or 1)
        return copies

    async def topics(self) -> dict[str, list[str]]:
        """Every topic a queue subscribes to, with those queues (live
        subscriptions are core NATS ones: the server does not list them)."""
        return await topics.table(self)

    def subscribe(self, topic: str) -> AsyncNatsSubscription:
        """A live subscription to ``topic``, in effect once entered (``async
        with``) or awaited, as the local AsyncClient's."""
        validation.validate_queue_name(topic, what="topic")
        return AsyncNatsSubscription(self, topic)

    async def get_any(self, queues: Any, timeout: float | None = None) -> tuple[str, bytes]:
        raise lacks("get_any (a wait on several queues)")

    def reserve_any(self, queues: Any, timeout: float | None = None, lease: Any = None) -> Any:
        raise lacks("reserve_any (a wait on several queues)")

    async def ping(self) -> float:
        """The round trip to the server in seconds (a NATS PING and its PONG)."""
        started = time.monotonic()
        await self.nc.flush(timeout=max(1, round(self.timeout)))
        return time.monotonic() - started

    async def queues(self) -> list[str]:
        names = await self.js.streams_info()
        found = (naming.queue_of_stream(info.config.name or "") for info in names)
        return sorted(name for name in found if name is not None)

    async def stats(self) -> dict[str, Any]:
        account = await self.js.account_info()
        version = self.nc.connected_server_version
        return {
            "backend": "nats",
            "url": naming.redacted(self.url),
            "queues": len(await self.queues()),
            "bytes": account.storage,
            "server_version": f"{version.major}.{version.minor}.{version.patch}",
        }


@translate_errors
class AsyncNatsSubscription:
    """A live topic subscription on core NATS: what is published while it is open."""

    def __init__(self, client: AsyncNatsClient, topic: str) -> None:
        self.client = client
        self.topic = topic
        self._handle: NatsSubscriptionHandle | None = None

    async def start(self) -> AsyncNatsSubscription:
        """Subscribe (once): in effect when this returns."""
        if self._handle is None:
            nc = self.client.nc
            self._handle = await nc.subscribe(naming.topic_subject(self.topic))
            await nc.flush(timeout=round(self.client.timeout) or 1)
        return self

    def __await__(self) -> Generator[Any, None, AsyncNatsSubscription]:
        return self.start().__await__()

    async def get(self, timeout: float | None = None) -> bytes:
        await self.start()
        assert self._handle is not None
        try:
            # (nats-py waits for ever on 0: a no-wait get asks for a moment)
            wait = 1e9 if timeout is None else max(timeout, 0.001)
            msg = await self._handle.next_msg(timeout=wait)
        except nats.errors.TimeoutError:
            raise Empty(f"nothing published on {self.topic!r} within {timeout} s") from None
        return bytes(msg.data)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        while True:
            yield await self.get()

    async def aclose(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            await handle.unsubscribe()

    async def __aenter__(self) -> AsyncNatsSubscription:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
