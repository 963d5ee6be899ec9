"""What the blocking and the async client share: requests and replies, sans-IO.

The requests the drivers make themselves are built here, their arguments
checked (the others are :mod:`.api`'s ops); the names of :mod:`.wire` and
:mod:`.window` are re-exported, so that ``calls`` is the one name the drivers need.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from .. import protocol, validation
from ..errors import (
    BrokerqError,
    Empty,
    InvalidRequest,
    LocalProtocolError,
    MessageTooLarge,
    NotSupported,
    VersionMismatch,
    from_code,
)
from .window import DEFAULT_TIMEOUT, PutKeys, PutWindow, client_timeout, prefetch, put_window
from .wire import (
    CLOSING_CODES,
    Attempts,
    Call,
    ConnectionLost,
    Wire,
    closed_client,
    closed_subscription,
    not_stopped,
    unreachable,
)

__all__ = ["CLOSING_CODES", "DEFAULT_TIMEOUT", "Attempts", "Call", "ConnectionLost"]
__all__ += ["PutKeys", "PutWindow", "Wire", "client_timeout", "closed_client", "not_stopped"]
__all__ += ["prefetch", "put_window", "unreachable"]

Body = bytes | bytearray | memoryview | str
R = TypeVar("R", bound=protocol.Reply)
KeySource = Callable[[int], list[bytes]]

#: What one body adds to a put_many frame beyond its bytes: its bin header
#: and its 16-byte key with its own header, rounded up.
PER_BODY = 32


def as_bytes(body: Body) -> bytes:
    if isinstance(body, str):
        return body.encode("utf-8")
    if isinstance(body, bytes | bytearray | memoryview):
        return bytes(body)
    raise InvalidRequest(f"a message body is bytes or str, not {type(body).__name__}")


def check_size(body: bytes, limit: int) -> None:
    if len(body) > limit:
        raise MessageTooLarge(f"a body of {len(body)} bytes is over the broker's limit of {limit}")


@dataclass(frozen=True, slots=True)
class PutOptions:
    """The options of a put or put_many (see :meth:`brokerq.Queue.put`)."""

    priority: int = 0
    delay: float = 0
    ttl: float | None = None
    timeout: float | None = None

    def fields(self) -> dict[str, Any]:
        """The request fields beside the bodies and keys. Arguments of the wrong
        type are refused, not converted: ``priority=1.5`` is a mistake, not a 1."""
        validation.validate_timeout(self.timeout)
        if isinstance(self.priority, bool) or not isinstance(self.priority, int):
            raise InvalidRequest(f"priority must be a whole number, not {self.priority!r}")
        for name, value in (("delay", self.delay), ("ttl", self.ttl)):
            if value is not None and not validation.is_number(value):
                raise InvalidRequest(f"{name} must be a number of seconds, not {value!r}")
        return {
            "priority": self.priority,
            "delay": float(self.delay),
            "ttl": None if self.ttl is None else float(self.ttl),
            "timeout": self.timeout,
        }


def put(
    queue: str, body: Body, limit: int, keys: KeySource, options: PutOptions
) -> Call[protocol.PutReply]:
    data = as_bytes(body)
    check_size(data, limit)
    fields = {"queue": queue, "body": data} | options.fields()
    (fields["key"],) = keys(1)
    return Call(protocol.PutReply, protocol.Put, options.timeout, fields)


def put_many(
    queue: str, bodies: Iterable[Body], limit: int, keys: KeySource, options: PutOptions
) -> list[Call[protocol.PutManyReply]]:
    """One put_many request per frame's worth of bodies, every size checked first."""
    fields = {"queue": queue} | options.fields()
    if isinstance(bodies, str | bytes | bytearray | memoryview) or not hasattr(bodies, "__iter__"):
        raise InvalidRequest(f"put_many takes an iterable of bodies, not {type(bodies).__name__}")
    data = [b if type(b) is bytes else as_bytes(b) for b in bodies]
    expect, kind = protocol.PutManyReply, protocol.PutMany
    return [
        Call(expect, kind, options.timeout, fields | {"bodies": chunk, "keys": keys(len(chunk))})
        for chunk in chunks(data, limit)
    ]


def chunks(bodies: list[bytes], limit: int) -> list[list[bytes]]:
    """Split ``bodies`` into runs whose frames fit."""
    sizes = [len(body) for body in bodies]
    if sum(sizes) + PER_BODY * len(sizes) <= limit:
        return [bodies] if bodies else []  # one frame: the usual batch
    for body in bodies:
        check_size(body, limit)
    runs: list[list[bytes]] = []
    run: list[bytes] = []
    size = 0
    for body in bodies:
        if run and size + len(body) + PER_BODY > limit:
            runs.append(run)
            run, size = [], 0
        run.append(body)
        size += len(body) + PER_BODY
    if run:
        runs.append(run)
    return runs


def get(queue: str, timeout: float | None) -> Call[protocol.GetReply]:
    validation.validate_timeout(timeout)
    return Call(protocol.GetReply, protocol.Get, timeout, {"queue": queue, "timeout": timeout})


def get_many(queue: str, n: int, timeout: float | None) -> Call[protocol.GetManyReply]:
    validation.validate_timeout(timeout)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InvalidRequest(f"get_many needs a whole number n >= 1, not {n!r}")
    fields = {"queue": queue, "n": n, "timeout": timeout}
    return Call(protocol.GetManyReply, protocol.GetMany, timeout, fields)


def reserve(queue: str, timeout: float | None, lease: float | None) -> Call[protocol.ReserveReply]:
    validation.validate_timeout(timeout)
    validation.validate_lease(lease)
    fields = {"queue": queue, "timeout": timeout, "lease": lease}
    return Call(protocol.ReserveReply, protocol.Reserve, timeout, fields)


def queue_list(queues: Iterable[str]) -> list[str]:
    """The names of a multi-queue wait, in their order (the order of priority).
    A lone str is refused: iterated, it would be a wait on each of its letters."""
    if isinstance(queues, str | bytes) or not hasattr(queues, "__iter__"):
        raise InvalidRequest(f"queues is an iterable of names, not {type(queues).__name__}")
    names = list(queues)
    validation.validate_queue_list(names)
    return names


def get_any(queues: Iterable[str], timeout: float | None) -> Call[protocol.GetAnyReply]:
    validation.validate_timeout(timeout)
    fields = {"queues": queue_list(queues), "timeout": timeout}
    return Call(protocol.GetAnyReply, protocol.GetAny, timeout, fields)


def reserve_any(
    queues: Iterable[str], timeout: float | None, lease: float | None
) -> Call[protocol.ReserveAnyReply]:
    validation.validate_timeout(timeout)
    validation.validate_lease(lease)
    fields = {"queues": queue_list(queues), "timeout": timeout, "lease": lease}
    return Call(protocol.ReserveAnyReply, protocol.ReserveAny, timeout, fields)


@contextlib.contextmanager
def supported(op: str, feature: str) -> Iterator[None]:
    """Raise :class:`NotSupported` for the ``bad_request`` that a broker older
    than ``op`` answers it with (it does not know the op). The client checks
    every argument first, so from a broker that knows it, this never comes."""
    try:
        yield
    except LocalProtocolError as exc:
        raise NotSupported(
            f"the broker does not support {op} ({feature}): it is older than this client; "
            "restart it (brokerq stop) to run this version"
        ) from exc


def configure(
    queue: str,
    *,
    max_deliveries: int | None = None,
    lease: float | None = None,
    maxsize: int | None = None,
    max_bytes: int | None = None,
) -> Call[protocol.ConfigureReply]:
    validation.validate_lease(lease)
    fields = {"queue": queue, "max_deliveries": max_deliveries, "lease": lease}
    fields |= {"maxsize": maxsize, "max_bytes": max_bytes}
    for name in ("max_deliveries", "maxsize", "max_bytes"):
        if fields[name] is not None:
            validation.validate_count(fields[name], name)
    return Call(protocol.ConfigureReply, protocol.Configure, 0, fields)


def verb(
    expect: type[R], kind: type[protocol.Request], msg_id: int, attempt: int, **extra: Any
) -> Call[R]:
    """A lease verb: never waits, never sent again (the lease may have ended)."""
    return Call(expect, kind, 0, {"msg_id": msg_id, "attempt": attempt, **extra}, retry=False)


def ack(msg_id: int, attempt: int, *, as_get: bool = False) -> Call[protocol.AckReply]:
    """``as_get``: the ack of a get made of a reserve and an ack, which leaves
    the message's task for a task_done, as a get does."""
    return verb(protocol.AckReply, protocol.Ack, msg_id, attempt, as_get=as_get)


def subscribe(topic: str, queue: str | None = None) -> Call[protocol.SubscribeReply]:
    """Without a ``queue``, the connection subscribes (live): never sent
    again, since a live subscription belongs to one connection."""
    validation.validate_queue_name(topic, what="topic", for_put=True)
    fields = {"topic": topic, "queue": queue}
    return Call(protocol.SubscribeReply, protocol.Subscribe, 0, fields, retry=queue is not None)


#: What a live subscription's get does next (:meth:`LiveEvents.step`).
SUBSCRIBE, DROP, RECEIVE = "subscribe", "drop", "receive"


class LiveEvents:
    """A live subscription to ``topic``, sans-IO. An error with id 0
    (``overflow``: the broker dropped this slow subscriber) ends the feed:
    the bodies before it come first, then it is raised once, then it is closed.
    """

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.call = subscribe(topic)
        self.bodies: deque[bytes] = deque()
        self.error: BrokerqError | None = None
        #: Closed by its owner, or dropped by the broker (then ``overflowed``).
        self.closed = False
        self.overflowed = False

    def take(self, wire: Wire) -> protocol.AnyReply | None:
        """Keep each event's body; return the first other frame (the reply)."""
        while self.error is None and (frame := wire.next_reply()) is not None:
            if isinstance(frame, protocol.Event):
                self.bodies.append(frame.body)
            elif isinstance(frame, protocol.Error) and frame.id == 0:
                self.error = from_code(frame.code, frame.message)
            else:
                return frame
        return None

    def step(self, wire: Wire | None) -> bytes | str:
        """What a get does next, ``wire`` being its connection's (None: none):
        return a body, :data:`SUBSCRIBE` on a new connection, :data:`DROP` the
        connection (dropped by the broker), or :data:`RECEIVE` more."""
        if self.bodies:
            return self.bodies.popleft()
        if self.error is not None:  # (raised once, after the bodies before it)
            error, self.error = self.error, None
            raise error
        if self.closed:
            raise closed_subscription(self.topic, self.overflowed)
        if wire is None:
            return SUBSCRIBE
        self.take(wire)  # the frames already received
        if self.error is not None:
            self.overflowed = True
            return DROP
        return self.bodies.popleft() if self.bodies else RECEIVE

    def empty(self, timeout: float | None) -> Empty:
        return Empty(f"nothing published to {self.topic!r} within {timeout or 0:g} s")


def ping() -> Call[protocol.PingReply]:
    return Call(protocol.PingReply, protocol.Ping, 0)


def stop() -> Call[protocol.StopReply]:
    """Ask the broker to exit (never sent again: it may be going already)."""
    return Call(protocol.StopReply, protocol.Stop, 0, retry=False)


def hello() -> Call[protocol.HelloReply]:
    return Call(protocol.HelloReply, protocol.Hello, 0, {"version": protocol.PROTOCOL_VERSION})


def older_broker(exc: VersionMismatch) -> int | None:
    """The version of a broker older than this client (to retire), else None."""
    theirs = exc.broker_version
    return theirs if theirs is not None and theirs < protocol.PROTOCOL_VERSION else None


def broker_to_retire(socket_path: str, exc: VersionMismatch, *, may_retire: bool) -> int:
    """Judge a ``version`` error to a hello: the version of an older broker to
    retire now (an upgrade), else raise (a newer broker, or one that may not
    be retired here: a client that must not start a broker, as ``stop``)."""
    older = older_broker(exc)
    if older is None:
        if exc.broker_version is not None:  # (else it did not say: as it is)
            exc = VersionMismatch(
                f"the broker at {socket_path} speaks protocol {exc.broker_version}, this client "
                f"speaks {protocol.PROTOCOL_VERSION}: upgrade brokerq here, or stop that broker",
                exc.broker_version,
            )
        raise exc from None
    if not may_retire:
        raise exc
    return older


def retirement(version: int) -> bytes:
    """``hello`` in an older ``version``, then ``stop``: every version keeps
    these two requests' shape (docs/protocol.md, "Versioning rules") for this."""
    out = bytearray()
    protocol.append_frame(out, protocol.Hello(id=1, version=version, client="brokerq upgrade"))
    protocol.append_frame(out, protocol.Stop(id=2))
    return bytes(out)


# -- the end of a reserved message's ``with`` block, on every client ---------


class Settles(Protocol):
    @property
    def settled(self) -> bool: ...

    def ack(self) -> None: ...

    def release(self, delay: float = 0) -> None: ...


class AsyncSettles(Protocol):
    @property
    def settled(self) -> bool: ...

    async def ack(self) -> None: ...

    async def release(self, delay: float = 0) -> None: ...


def settle_on_exit(message: Settles, failed: bool) -> None:
    """A ``with`` block's message, unless settled in it: acked on a clean
    exit, released on an exception. A failed release does not hide the
    block's own exception: an unreleased message comes back anyway when its
    lease runs out."""
    if message.settled:
        return
    if not failed:
        message.ack()
        return
    with contextlib.suppress(BrokerqError):
        message.release()


async def settle_on_async_exit(message: AsyncSettles, failed: bool) -> None:
    """:func:`settle_on_exit` for an ``async with`` block's message."""
    if message.settled:
        return
    if not failed:
        await message.ack()
        return
    with contextlib.suppress(BrokerqError):
        await message.release()
