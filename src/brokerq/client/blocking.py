"""The blocking client's public face: Client, Queue, Message, Subscription, connect.

Timeouts follow the stdlib :mod:`queue` contract (None: for ever, 0: the
``_nowait`` form). The core is :mod:`.lanes`; streams are :mod:`.streaming`'s.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from .. import protocol, validation
from ..spawn import resolve_socket_path
from . import api, calls
from .calls import Body, ConnectionLost
from .lanes import _Streamed
from .sockio import Connection
from .streaming import Streaming, Subscription

__all__ = ["Body", "Client", "Connection", "ConnectionLost", "Message", "Queue", "Subscription"]
__all__ += ["connect"]

R = TypeVar("R", bound=protocol.Reply)
T = TypeVar("T")

DEFAULT_TIMEOUT = calls.DEFAULT_TIMEOUT


class Client(Streaming):
    """A broker, named by its socket path; spawned on first use if needed.

    ``timeout`` is the deadline for connecting (and spawning a broker), and
    the grace a reply gets beyond its request's own timeout. ``put_window``
    (None: ``$BROKERQ_PUT_WINDOW``): up to N puts a thread sends without
    waiting for their replies (docs/usage.md, "Pipelined puts").
    ``prefetch`` (None: ``$BROKERQ_PREFETCH``): up to N messages the broker
    sends a consuming thread ahead (docs/usage.md, "Prefetching consumers").
    """

    def queue(self, name: str, **settings: Any) -> Queue:
        """The queue ``name``; settings given here are applied to it, new or
        not (see :meth:`Queue.configure`)."""
        q = Queue(name, client=self)
        if any(value is not None for value in settings.values()):
            q.configure(**settings)
        return q

    def get_any(self, queues: Iterable[str], timeout: float | None = None) -> tuple[str, bytes]:
        with calls.supported("get_any", "multi-queue wait"):
            return self.do(api.get_any(queues, timeout))

    def reserve_any(
        self, queues: Iterable[str], timeout: float | None = None, lease: float | None = None
    ) -> Message:
        call = calls.reserve_any(queues, timeout, lease)
        with calls.supported("reserve_any", "multi-queue wait"):
            reply = self.run(call)
        return Message(
            self.queue(reply.queue), reply.msg_id, reply.body, reply.attempt, reply.lease
        )

    def publish(
        self, topic: str, body: Body, *, priority: int = 0, ttl: float | None = None
    ) -> int:
        limit = self.connection().max_message_size
        return self.do(api.publish(topic, body, limit, self.next_keys, priority=priority, ttl=ttl))

    def subscribe(self, topic: str) -> Subscription:
        """A live subscription to ``topic``, in effect when this returns:
        iterate over it (or :meth:`Subscription.get`) for the body of each
        publish made while it is open; close it to end it."""
        return Subscription(self, topic)

    @property
    def broker_pid(self) -> int:
        """The pid of the broker this thread's connection is to (connecting first)."""
        return self.connection().broker_pid

    def stats(self) -> dict[str, Any]:
        return self.do(api.broker_stats())

    def queues(self) -> list[str]:
        return self.do(api.queues())


#: Set by ``brokerq`` (the top) to send ``Queue(name)`` elsewhere: given the
#: name and the socket argument, it returns another backend's queue (a
#: ``nats://`` URL, or ``$BROKERQ_URL``: brokerq.nats) or None for this
#: broker's. A hook, so that this wing imports no other backend.
queue_router: Callable[[str, Any], Any] | None = None


class Queue:
    """A named queue of a broker; like :class:`queue.Queue`, across processes.
    ``Queue("jobs")`` uses the default broker (``$BROKERQ_SOCKET`` or the
    per-user path), spawning it on first use."""

    def __new__(
        cls,
        name: str,
        *,
        client: Client | None = None,
        socket: str | os.PathLike[str] | None = None,
    ) -> Any:
        routed = None
        if client is None and queue_router is not None:
            routed = queue_router(name, socket)
        return super().__new__(cls) if routed is None else routed

    def __init__(
        self,
        name: str,
        *,
        client: Client | None = None,
        socket: str | os.PathLike[str] | None = None,
    ) -> None:
        validation.validate_queue_name(name)
        self.name = name
        self.client = client if client is not None else _shared_client(socket)

    def __repr__(self) -> str:
        return f"<brokerq.Queue {self.name!r} at {self.client.socket_path!r}>"

    def put(
        self,
        body: Body,
        *,
        priority: int = 0,
        delay: float = 0,
        ttl: float | None = None,
        timeout: float | None = None,
    ) -> int:
        options = calls.PutOptions(priority, delay, ttl, timeout)
        client = self.client
        limit = client.connection().max_message_size
        call = calls.put(self.name, body, limit, client.next_keys, options)
        if client.put_window > 0:
            client.send_put(call)
            return 0
        return client.run(call).msg_id

    def flush(self) -> None:
        """:meth:`Client.flush` of this queue's client (every queue's puts of this thread)."""
        self.client.flush()

    def put_nowait(self, body: Body, **options: Any) -> int:
        return self.put(body, timeout=0, **options)

    def put_many(
        self,
        bodies: Iterable[Body],
        *,
        priority: int = 0,
        delay: float = 0,
        ttl: float | None = None,
        timeout: float | None = None,
    ) -> list[int]:
        options = calls.PutOptions(priority, delay, ttl, timeout)
        limit = self.client.connection().max_message_size
        requests = calls.put_many(self.name, bodies, limit, self.client.next_keys, options)
        if self.client.put_window > 0:
            for call in requests:
                self.client.send_put(call)
            return [0] * sum(len(call.fields["bodies"]) for call in requests)
        return [msg_id for call in requests for msg_id in self.client.run(call).msg_ids]

    def get(self, timeout: float | None = None) -> bytes:
        if self.client.prefetch:
            streamed = self.client.take_streamed(self.name, "get", 1, timeout)
            if streamed is not None:
                return streamed[1][0].body
        return self.client.run(calls.get(self.name, timeout)).body

    def get_nowait(self) -> bytes:
        return self.get(timeout=0)

    def get_many(self, n: int, timeout: float | None = None) -> list[bytes]:
        if self.client.prefetch:
            calls.get_many(self.name, n, timeout)  # (checks n and timeout)
            streamed = self.client.take_streamed(self.name, "get", n, timeout)
            if streamed is not None:
                return [d.body for d in streamed[1]]
        return self.client.run(calls.get_many(self.name, n, timeout)).bodies

    def reserve(self, timeout: float | None = None, lease: float | None = None) -> Message:
        if self.client.prefetch:
            streamed = self.client.take_streamed(self.name, "reserve", 1, timeout, lease)
            if streamed is not None:
                (delivery,) = streamed[1]
                return StreamedMessage(self, delivery, streamed[0])
        reply = self.client.run(calls.reserve(self.name, timeout, lease))
        return Message(self, reply.msg_id, reply.body, reply.attempt, reply.lease)

    def kick(self, n: int = 1) -> int:
        return self.client.do(api.kick(self.name, n))

    def configure(
        self,
        *,
        max_deliveries: int | None = None,
        lease: float | None = None,
        maxsize: int | None = None,
        max_bytes: int | None = None,
    ) -> dict[str, Any]:
        op = api.configure(
            self.name,
            max_deliveries=max_deliveries,
            lease=lease,
            maxsize=maxsize,
            max_bytes=max_bytes,
        )
        return self.client.do(op)

    def delete(self) -> int:
        return self.client.do(api.delete(self.name))

    def peek(self) -> bytes:
        return self.client.do(api.peek(self.name))

    def purge(self) -> int:
        return self.client.do(api.purge(self.name))

    def stats(self) -> dict[str, Any]:
        return self.client.do(api.stats(self.name))

    def qsize(self) -> int:
        return api.qsize(self.stats())

    def subscribe(self, topic: str) -> None:
        self.client.do(api.subscribe(self.name, topic))

    def unsubscribe(self, topic: str) -> bool:
        return self.client.do(api.unsubscribe(self.name, topic))

    def empty(self) -> bool:
        return api.empty(self.stats())

    def task_done(self, n: int = 1) -> None:
        self.client.do(api.task_done(self.name, n))

    def join(self, timeout: float | None = None) -> None:
        self.client.do(api.join(self.name, timeout))

    @property
    def unfinished_tasks(self) -> int:
        return api.unfinished_tasks(self.stats())


class Message:
    """A reserved message: ``body``, ``id`` (what put returned), ``attempt``
    (1 on the first delivery), and the verbs that end or extend its lease.
    As a context manager it acks on a clean exit and releases on an
    exception, unless the block already settled it.
    """

    def __init__(self, queue: Queue, msg_id: int, body: bytes, attempt: int, lease: float) -> None:
        self.queue = queue
        self.id = msg_id
        self.body = body
        self.attempt = attempt
        self.lease_expires = time.monotonic() + lease
        self.settled = False

    def __repr__(self) -> str:
        return f"<brokerq.Message {self.id} attempt {self.attempt} of {self.queue.name!r}>"

    def __enter__(self) -> Message:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        calls.settle_on_exit(self, failed=exc_type is not None)

    def _do(self, op: api.Op[R, T]) -> T:
        return self.queue.client.do(op)

    def ack(self) -> None:
        self._do(api.ack(self.id, self.attempt))
        self.settled = True

    def ack_as_get(self) -> None:
        """Ack it as a get takes its message: its task is left for a ``task_done``."""
        self._do(api.ack(self.id, self.attempt, as_get=True))
        self.settled = True

    def release(self, delay: float = 0) -> None:
        self._do(api.release(self.id, self.attempt, delay))
        self.settled = True

    def bury(self) -> None:
        self._do(api.bury(self.id, self.attempt))
        self.settled = True

    def touch(self, lease: float | None = None) -> None:
        self.lease_expires = time.monotonic() + self._do(api.touch(self.id, self.attempt, lease))


class StreamedMessage(Message):
    """A reserved message that came prefetched: its lease began when it was
    handed out, and its verbs go behind the ``taken`` that began it."""

    def __init__(
        self, queue: Queue, delivery: protocol.StreamDelivery, streamed: _Streamed
    ) -> None:
        now = time.monotonic()
        super().__init__(queue, delivery.msg_id, delivery.body, delivery.attempt, 0.0)
        self.lease_expires = streamed.state.lease_expires(now)
        self.streamed = streamed
        self.conn = streamed.conn
        self.handed_at = now

    def _do(self, op: api.Op[R, T]) -> T:
        client = self.queue.client
        return op.result(client.settle_streamed(self.streamed, self.conn, self.handed_at, op.call))


api.document(Client, stats=api.broker_stats)
api.document(Queue)
api.document(Message)

_shared: dict[str, Client] = {}
_shared_lock = threading.Lock()


def _shared_client(socket_path: str | os.PathLike[str] | None) -> Client:
    """One Client per socket path for ``Queue(name)`` without a client."""
    path = resolve_socket_path(socket_path)
    with _shared_lock:
        client = _shared.get(path)
        if client is None or client._closed:
            client = _shared[path] = Client(path)
        return client


def connect(
    socket: str | os.PathLike[str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    *,
    put_window: int | None = None,
    prefetch: int | None = None,
) -> Client:
    """A client of the broker at ``socket`` (default: ``$BROKERQ_SOCKET`` or the
    per-user path), connected (spawning the broker if none runs) right away,
    so a broker that cannot be reached fails here rather than at the first put."""
    client = Client(socket, timeout, put_window=put_window, prefetch=prefetch)
    try:
        client.connection()
    except BaseException:
        client.close()
        raise
    return client
