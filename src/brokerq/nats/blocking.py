"""The NATS backend's blocking client: the async one, on a loop of its own.

nats-py is asyncio-only, so each :class:`NatsClient` has one asyncio loop,
run by the calling thread itself when it is free (:mod:`.driving`): one
connection per client, shared by its threads, as the local client shares
its broker. A forked child cannot use its parent's loop (its threads do
not exist there): the first call in a child makes a new loop and a new
connection.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, TypeVar

from .. import validation
from ..client import window
from ..client.calls import Body, PutOptions, settle_on_exit
from ..errors import BrokerqError
from . import naming
from .aio import DEFAULT_TIMEOUT, AsyncNatsClient, AsyncNatsSubscription
from .aio_message import AsyncNatsMessage
from .aio_queue import AsyncNatsQueue, SentPut
from .driving import Driver
from .failures import lacks
from .put_window import PutWindow

__all__ = ["NatsClient", "NatsMessage", "NatsQueue", "NatsSubscription", "connect"]

T = TypeVar("T")


class _Loop:
    """The async client, the loop it lives on (see :mod:`.driving`), and
    each thread's put window."""

    def __init__(self, url: str, timeout: float, prefetch: int) -> None:
        self.pid = os.getpid()
        self.driver = Driver()
        self.client = AsyncNatsClient(url, timeout, prefetch=prefetch)
        self._threads = threading.local()

    def run(self, coro: Awaitable[T], wait: float | None) -> T:
        return self.driver.run(coro, wait)

    def window(self) -> PutWindow:
        """The calling thread's put window."""
        window: PutWindow | None = getattr(self._threads, "window", None)
        if window is None:
            window = self._threads.window = PutWindow()
        return window

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.run(self.client.aclose(), self.client.timeout)
        self.driver.close(self.client.timeout)


class NatsClient:
    """A NATS server as a blocking brokerq client (``brokerq.connect("nats://...")``).

    ``put_window`` and ``prefetch`` (None: ``$BROKERQ_PUT_WINDOW``,
    ``$BROKERQ_PREFETCH``) as the local Client's: JetStream's async publish
    (:mod:`.put_window`) and pull batches (:mod:`.pulling`)."""

    def __init__(
        self,
        url: str,
        timeout: float = DEFAULT_TIMEOUT,
        *,
        put_window: int | None = None,
        prefetch: int | None = None,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self.put_window = window.put_window(put_window)
        self.prefetch = window.prefetch(prefetch)
        self._lock = threading.Lock()
        self._loop: _Loop | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"<brokerq.nats.NatsClient {naming.redacted(self.url)!r}>"

    def _current(self) -> _Loop:
        with self._lock:
            if self._closed:
                raise BrokerqError(f"{self!r} is closed")
            if self._loop is None or self._loop.pid != os.getpid():
                # (in a forked child the parent's threads are gone: start afresh)
                self._loop = _Loop(self.url, self.timeout, self.prefetch)
                self._loop.run(self._loop.client.connect(), self.timeout + 5)
            return self._loop

    def call(self, step: Callable[[AsyncNatsClient], Awaitable[T]], timeout: float | None = 0) -> T:
        """Run ``step(async client)`` on the loop, after this thread's windowed
        puts are settled; wait for it ``timeout`` (the call's own, None: for
        ever) plus this client's grace."""
        loop = self._current()
        wait = None if timeout is None else timeout + self.timeout + 5
        window = loop.window()
        if window:
            loop.run(window.settle(), None)  # (each put's tries end within the client's timeout)
        return loop.run(step(loop.client), wait)

    def put_windowed(self, send: Callable[[AsyncNatsClient], Awaitable[SentPut]]) -> int:
        """A put under the window: sent once the window has room; returns 0."""
        loop = self._current()
        window = loop.window()

        async def step() -> None:
            await window.settle(keep=self.put_window - 1)
            window.sent.append(await send(loop.client))

        loop.run(step(), None)
        return 0

    def flush(self) -> None:
        """Every windowed put of this thread acknowledged (or its error raised)."""
        loop = self._loop
        if loop is not None and loop.pid == os.getpid() and loop.window():
            loop.run(loop.window().settle(), None)

    @property
    def closed(self) -> bool:
        return self._closed

    def connect(self) -> NatsClient:
        self._current()
        return self

    def close(self) -> None:
        """Flush this thread's windowed puts, then close (also when the flush raises)."""
        try:
            if not self._closed:
                self.flush()
        finally:
            with self._lock:
                loop, self._loop, self._closed = self._loop, None, True
            if loop is not None and loop.pid == os.getpid():
                loop.stop()

    def __enter__(self) -> NatsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def queue(self, name: str, **settings: Any) -> NatsQueue:
        q = NatsQueue(name, self)
        if any(value is not None for value in settings.values()):
            q.configure(**settings)
        return q

    def publish(
        self, topic: str, body: bytes, *, priority: int = 0, ttl: float | None = None
    ) -> int:
        return self.call(lambda c: c.publish(topic, body, priority=priority, ttl=ttl))

    def subscribe(self, topic: str) -> NatsSubscription:
        return NatsSubscription(self, self.call(lambda c: c.subscribe(topic).start()))

    def topics(self) -> dict[str, list[str]]:
        """Every topic a queue subscribes to, with those queues."""
        return self.call(lambda c: c.topics())

    def stats(self) -> dict[str, Any]:
        return self.call(lambda c: c.stats())

    def queues(self) -> list[str]:
        return self.call(lambda c: c.queues())

    def get_any(self, queues: Iterable[str], timeout: float | None = None) -> tuple[str, bytes]:
        raise lacks("get_any (a wait on several queues)")

    def reserve_any(
        self, queues: Iterable[str], timeout: float | None = None, lease: float | None = None
    ) -> NatsMessage:
        raise lacks("reserve_any (a wait on several queues)")

    def ping(self) -> float:
        """The round trip to the server in seconds (connecting first is not counted)."""
        self._current()
        return self.call(lambda c: c.ping())

    def stop(self) -> bool:
        raise lacks("stop (the server is not brokerq's to stop)")

    @property
    def broker_pid(self) -> int:
        raise lacks("broker_pid (no broker process of brokerq's)")


class NatsQueue:
    """A queue on JetStream, with the local Queue's methods (docs/nats.md)."""

    def __init__(self, name: str, client: NatsClient) -> None:
        validation.validate_queue_name(name)
        self.name = name
        self.client = client

    def __repr__(self) -> str:
        where = naming.redacted(self.client.url)
        return f"<brokerq.nats.NatsQueue {self.name!r} at {where!r}>"

    def _call(self, step: Callable[[AsyncNatsQueue], Awaitable[T]], timeout: float | None = 0) -> T:
        return self.client.call(lambda c: step(c.queue(self.name)), timeout)

    def put(
        self,
        body: Body,
        *,
        priority: int = 0,
        delay: float = 0,
        ttl: float | None = None,
        timeout: float | None = None,
    ) -> int:
        options = PutOptions(priority, delay, ttl, timeout)
        if self.client.put_window > 0:
            return self.client.put_windowed(lambda c: c.queue(self.name).put_sent(body, options))
        return self._call(
            lambda q: q.put(body, priority=priority, delay=delay, ttl=ttl, timeout=timeout),
            timeout or 0,
        )

    def put_nowait(self, body: Body, **options: Any) -> int:
        return self.put(body, timeout=0, **options)

    def put_many(self, bodies: Iterable[Body], **options: Any) -> list[int]:
        items = list(bodies)
        return self._call(lambda q: q.put_many(items, **options), options.get("timeout") or 0)

    def flush(self) -> None:
        """``client.flush()``: this thread's windowed puts acknowledged."""
        self.client.flush()

    def get(self, timeout: float | None = None) -> bytes:
        return self._call(lambda q: q.get(timeout), timeout)

    def get_nowait(self) -> bytes:
        return self.get(timeout=0)

    def get_many(self, n: int, timeout: float | None = None) -> list[bytes]:
        return self._call(lambda q: q.get_many(n, timeout), timeout)

    def reserve(self, timeout: float | None = None, lease: float | None = None) -> NatsMessage:
        return NatsMessage(self, self._call(lambda q: q.reserve_message(timeout, lease), timeout))

    def configure(self, **settings: Any) -> dict[str, Any]:
        return self._call(lambda q: q.configure(**settings))

    def stats(self) -> dict[str, Any]:
        return self._call(lambda q: q.stats())

    def qsize(self) -> int:
        return self._call(lambda q: q.qsize())

    def empty(self) -> bool:
        return self._call(lambda q: q.empty())

    def purge(self) -> int:
        return self._call(lambda q: q.purge())

    def peek(self) -> bytes:
        return self._call(lambda q: q.peek())

    def delete(self) -> int:
        return self._call(lambda q: q.delete())

    def kick(self, n: int = 1) -> int:
        # Not one request but a few per message: each is bounded, the whole is not.
        return self._call(lambda q: q.kick(n), None)

    def task_done(self, n: int = 1) -> None:
        self._call(lambda q: q.task_done(n))

    def join(self, timeout: float | None = None) -> None:
        validation.validate_timeout(timeout)  # (before it is added to the wait below)
        wait = None if timeout is None or math.isinf(timeout) else timeout
        self._call(lambda q: q.join(timeout), wait)

    def subscribe(self, topic: str) -> None:
        self._call(lambda q: q.subscribe(topic))

    def unsubscribe(self, topic: str) -> bool:
        return self._call(lambda q: q.unsubscribe(topic))

    @property
    def unfinished_tasks(self) -> int:
        return self._call(lambda q: q.unfinished_tasks())


class NatsMessage:
    """A reserved message: ``body``, ``id`` (the stream sequence), ``attempt``,
    and the lease verbs; a context manager as the local Message."""

    def __init__(self, queue: NatsQueue, inner: AsyncNatsMessage) -> None:
        self.queue = queue
        self._inner = inner
        self.id = inner.id
        self.body = inner.body
        self.attempt = inner.attempt

    def __repr__(self) -> str:
        return f"<brokerq.nats.NatsMessage {self.id} attempt {self.attempt} of {self.queue.name!r}>"

    @property
    def settled(self) -> bool:
        return self._inner.settled

    @property
    def lease_expires(self) -> float:
        return self._inner.lease_expires

    def _do(self, step: Callable[[AsyncNatsMessage], Awaitable[None]]) -> None:
        self.queue.client.call(lambda _c: step(self._inner))

    def ack(self) -> None:
        self._do(lambda m: m.ack())

    def ack_as_get(self) -> None:
        """Ack it as a get takes its message: its task is left for a ``task_done``."""
        self._do(lambda m: m.ack_as_get())

    def release(self, delay: float = 0) -> None:
        self._do(lambda m: m.release(delay))

    def bury(self) -> None:
        self._do(lambda m: m.bury())

    def touch(self, lease: float | None = None) -> None:
        self._do(lambda m: m.touch(lease))

    def __enter__(self) -> NatsMessage:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        settle_on_exit(self, failed=exc_type is not None)


class NatsSubscription:
    """A live topic subscription (core NATS): iterate, or :meth:`get`; close to end it."""

    def __init__(self, client: NatsClient, inner: AsyncNatsSubscription) -> None:
        self.client = client
        self._inner = inner

    def get(self, timeout: float | None = None) -> bytes:
        return self.client.call(lambda _c: self._inner.get(timeout), timeout)

    def __iter__(self) -> Iterator[bytes]:
        while True:
            yield self.get()

    def close(self) -> None:
        self.client.call(lambda _c: self._inner.aclose())

    def __enter__(self) -> NatsSubscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(
    url: str,
    timeout: float = DEFAULT_TIMEOUT,
    *,
    put_window: int | None = None,
    prefetch: int | None = None,
) -> NatsClient:
    """A client of the NATS server at ``url``, connected now, so a server that
    cannot be reached fails here rather than at the first put."""
    return NatsClient(url, timeout, put_window=put_window, prefetch=prefetch).connect()
