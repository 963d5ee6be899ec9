"""What the blocking and the async client share: requests and replies, sans-IO.

Neither client builds a request or judges a reply by itself. This module
turns each operation's arguments into a :class:`Call` (the request kind, its
fields, the reply it expects, how long the broker may take by the request's
own terms, whether it may be sent again), checks arguments on the way
(bodies, sizes, timeouts), and holds the per-connection state of the wire
(:class:`Wire`: request ids, encoding, the frame reader, the check of each
reply). :class:`Attempts` keeps the deadlines of a call and of its retries
after a lost connection; :class:`PutWindow`, the puts a blocking client sent
without waiting for their replies (``put_window``). It does no I/O and
imports neither trio nor anyio: the clients bring the sockets and the clock.
"""

from __future__ import annotations

import itertools
import math
import os
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Generic, NoReturn, TypeVar

from .. import protocol
from ..errors import (
    BrokerqError,
    BrokerUnavailable,
    InvalidRequest,
    LocalProtocolError,
    MessageTooLarge,
    RemoteProtocolError,
    ShuttingDown,
    VersionMismatch,
    from_code,
)
from ..errors import ConnectionLost as _ConnectionLost

#: The clients import it from here; it is brokerq.ConnectionLost (errors.py).
ConnectionLost = _ConnectionLost

Body = bytes | bytearray | memoryview | str
R = TypeVar("R", bound=protocol.Reply)
KeySource = Callable[[int], list[bytes]]

#: What one body adds to a put_many frame beyond its bytes: its bin header
#: and its 16-byte key with its own header, rounded up.
PER_BODY = 32
#: Error codes after which the broker closes the connection (docs/protocol.md).
CLOSING_CODES = frozenset(
    {"bad_frame", "version", "permission", "shutting_down", "overflow", "busy"}
)


class BrokerStopping(ConnectionLost, ShuttingDown):
    """The broker answered ``shutting_down``: it is stopping, did not carry
    the request out, and closes the connection.

    To the clients it is a lost connection (a stop is no worse than a
    crash): a request that a lost connection sends again is sent again, on
    a new connection, which waits for the stopping broker to exit and
    starts the next one if no other client did. One that is not sent again
    raises this, a :class:`~brokerq.ShuttingDown` as before. Since the
    request was not carried out, a ``task_done`` is sent again too
    (:attr:`Call.resend_refused`).
    """


# -- calls -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Call(Generic[R]):
    """One request to make: what to send, what to expect back, how long it may take.

    ``wait`` is how long the broker may take by the request's own terms (a
    get's timeout; None for ever; 0 for requests that never wait). The
    reply gets the client's timeout on top. ``retry``: whether a lost
    connection sends it again (not for lease verbs). ``resend_refused``:
    whether one that ``retry`` says not to send again is sent again all the
    same when the broker refused it because it is stopping
    (:class:`BrokerStopping`: it was not carried out).
    """

    expect: type[R]
    kind: type[protocol.Request]
    wait: float | None
    fields: dict[str, Any] = field(default_factory=dict)
    retry: bool = True
    resend_refused: bool = False

    def with_timeout(self, timeout: float | None) -> Call[R]:
        """The same request with another ``timeout`` (0: it never waits in the broker)."""
        return replace(self, wait=timeout, fields={**self.fields, "timeout": timeout})


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
        """The request fields beside the bodies and keys (the wire omits defaults).

        Arguments of the wrong type are refused here (InvalidRequest), not
        converted: ``priority=1.5`` is a mistake to report, not a 1."""
        protocol.validate_timeout(self.timeout)
        if isinstance(self.priority, bool) or not isinstance(self.priority, int):
            raise InvalidRequest(f"priority must be a whole number, not {self.priority!r}")
        for name, value in (("delay", self.delay), ("ttl", self.ttl)):
            if value is not None and not protocol.is_number(value):
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
    """A put of ``body``, checked against the broker's body ``limit``; ``keys``
    gives its put key."""
    data = as_bytes(body)
    check_size(data, limit)
    fields = {"queue": queue, "body": data} | options.fields()
    (fields["key"],) = keys(1)
    return Call(protocol.PutReply, protocol.Put, options.timeout, fields)


def put_many(
    queue: str, bodies: Iterable[Body], limit: int, keys: KeySource, options: PutOptions
) -> list[Call[protocol.PutManyReply]]:
    """One put_many request per frame's worth of bodies; every size is checked
    before any request is made."""
    fields = {"queue": queue} | options.fields()
    if isinstance(bodies, str | bytes | bytearray | memoryview) or not hasattr(bodies, "__iter__"):
        raise InvalidRequest(f"put_many takes an iterable of bodies, not {type(bodies).__name__}")
    return [
        Call(
            protocol.PutManyReply,
            protocol.PutMany,
            options.timeout,
            fields | {"bodies": chunk, "keys": keys(len(chunk))},
        )
        for chunk in chunks([b if type(b) is bytes else as_bytes(b) for b in bodies], limit)
    ]


def chunks(bodies: list[bytes], limit: int) -> list[list[bytes]]:
    """Split ``bodies`` into runs whose frames fit; raise if one body never fits."""
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
    protocol.validate_timeout(timeout)
    return Call(protocol.GetReply, protocol.Get, timeout, {"queue": queue, "timeout": timeout})


def get_many(queue: str, n: int, timeout: float | None) -> Call[protocol.GetManyReply]:
    protocol.validate_timeout(timeout)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InvalidRequest(f"get_many needs a whole number n >= 1, not {n!r}")
    return Call(
        protocol.GetManyReply,
        protocol.GetMany,
        timeout,
        {"queue": queue, "n": n, "timeout": timeout},
    )


def reserve(queue: str, timeout: float | None, lease: float | None) -> Call[protocol.ReserveReply]:
    protocol.validate_timeout(timeout)
    protocol.validate_lease(lease)
    fields = {"queue": queue, "timeout": timeout, "lease": lease}
    return Call(protocol.ReserveReply, protocol.Reserve, timeout, fields)


def kick(queue: str, n: int) -> Call[protocol.KickReply]:
    protocol.validate_count(n, "kick's n")
    return Call(protocol.KickReply, protocol.Kick, 0, {"queue": queue, "n": n})


def configure(
    queue: str,
    *,
    max_deliveries: int | None = None,
    lease: float | None = None,
    maxsize: int | None = None,
    max_bytes: int | None = None,
) -> Call[protocol.ConfigureReply]:
    protocol.validate_lease(lease)
    for name, value in (
        ("max_deliveries", max_deliveries),
        ("maxsize", maxsize),
        ("max_bytes", max_bytes),
    ):
        if value is not None:
            protocol.validate_count(value, name)
    settings = {
        "max_deliveries": max_deliveries,
        "lease": lease,
        "maxsize": maxsize,
        "max_bytes": max_bytes,
    }
    return Call(protocol.ConfigureReply, protocol.Configure, 0, {"queue": queue} | settings)


def delete(queue: str) -> Call[protocol.DeleteReply]:
    return Call(protocol.DeleteReply, protocol.Delete, 0, {"queue": queue})


def peek(queue: str) -> Call[protocol.PeekReply]:
    return Call(protocol.PeekReply, protocol.Peek, 0, {"queue": queue})


def purge(queue: str) -> Call[protocol.PurgeReply]:
    return Call(protocol.PurgeReply, protocol.Purge, 0, {"queue": queue})


def stats(queue: str | None = None) -> Call[protocol.StatsReply]:
    """The stats of ``queue``, or of the broker."""
    return Call(protocol.StatsReply, protocol.Stats, 0, {} if queue is None else {"queue": queue})


def queues() -> Call[protocol.QueuesReply]:
    return Call(protocol.QueuesReply, protocol.Queues, 0)


def task_done(queue: str, n: int = 1) -> Call[protocol.TaskDoneReply]:
    """``n`` tasks of ``queue`` are done. Never sent again after a lost
    connection: it is not idempotent (a first try that got through and a
    second would count twice), so the caller gets ConnectionLost, as for a
    lease verb. But sent again when a stopping broker refused it: it did
    not count then."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InvalidRequest(f"task_done needs a whole number n >= 1, not {n!r}")
    fields = {"queue": queue, "n": n}
    return Call(
        protocol.TaskDoneReply, protocol.TaskDone, 0, fields, retry=False, resend_refused=True
    )


def join(queue: str, timeout: float | None) -> Call[protocol.JoinReply]:
    """Wait until ``queue`` has no unfinished task (JoinTimeout after
    ``timeout``). Sent again after a lost connection with what is left of
    its timeout, as a get is: it changes nothing."""
    protocol.validate_timeout(timeout)
    return Call(protocol.JoinReply, protocol.Join, timeout, {"queue": queue, "timeout": timeout})


def unfinished_tasks(stats: dict[str, Any]) -> int:
    """The ``unfinished_tasks`` of a queue's stats; a broker from before
    task_done has none, which says so instead of a KeyError."""
    count = stats.get("unfinished_tasks")
    if not isinstance(count, int):
        raise BrokerqError(
            "the broker does not count unfinished tasks: it is older than this client "
            "(`brokerq stop` it; the next one started does)"
        )
    return count


def _verb(
    expect: type[R], kind: type[protocol.Request], msg_id: int, attempt: int, **extra: Any
) -> Call[R]:
    """A lease verb: never waits, never sent again (the lease may have ended)."""
    return Call(expect, kind, 0, {"msg_id": msg_id, "attempt": attempt, **extra}, retry=False)


def ack(msg_id: int, attempt: int, *, as_get: bool = False) -> Call[protocol.AckReply]:
    """``as_get``: the ack of a get made of a reserve and an ack, which leaves
    the message's task for a task_done, as a get does."""
    return _verb(protocol.AckReply, protocol.Ack, msg_id, attempt, as_get=as_get)


def release(msg_id: int, attempt: int, delay: float = 0) -> Call[protocol.ReleaseReply]:
    if not protocol.is_number(delay) or not 0 <= delay < math.inf:
        raise InvalidRequest(f"delay must be a number of seconds >= 0, not {delay!r}")
    return _verb(protocol.ReleaseReply, protocol.Release, msg_id, attempt, delay=float(delay))


def bury(msg_id: int, attempt: int) -> Call[protocol.BuryReply]:
    return _verb(protocol.BuryReply, protocol.Bury, msg_id, attempt)


def touch(msg_id: int, attempt: int, lease: float | None = None) -> Call[protocol.TouchReply]:
    protocol.validate_lease(lease)
    return _verb(protocol.TouchReply, protocol.Touch, msg_id, attempt, lease=lease)


# -- topics ------------------------------------------------------------------


def publish(
    topic: str,
    body: Body,
    limit: int,
    keys: KeySource,
    *,
    priority: int = 0,
    ttl: float | None = None,
) -> Call[protocol.PublishReply]:
    """A publish of ``body``, with a key so that a retry makes no second copy."""
    protocol.validate_queue_name(topic, what="topic", for_put=True)
    data = as_bytes(body)
    check_size(data, limit)
    fields = {
        "topic": topic,
        "body": data,
        "key": keys(1)[0],
        "priority": int(priority),
        "ttl": None if ttl is None else float(ttl),
    }
    return Call(protocol.PublishReply, protocol.Publish, 0, fields)


def subscribe(topic: str, queue: str | None = None) -> Call[protocol.SubscribeReply]:
    """``queue`` subscribes to ``topic`` (durable), or, without one, the
    connection does (live: see :class:`LiveEvents`; never sent again, since
    a live subscription belongs to one connection)."""
    protocol.validate_queue_name(topic, what="topic", for_put=True)
    fields = {"topic": topic, "queue": queue}
    return Call(protocol.SubscribeReply, protocol.Subscribe, 0, fields, retry=queue is not None)


def unsubscribe(topic: str, queue: str | None = None) -> Call[protocol.UnsubscribeReply]:
    fields = {"topic": topic, "queue": queue}
    return Call(protocol.UnsubscribeReply, protocol.Unsubscribe, 0, fields)


class LiveEvents:
    """What a live subscription's connection brought, in order (sans-IO).

    :meth:`take` sorts the frames received: each ``event``'s body is kept,
    the first other frame (the reply to the subscription's request) is
    returned. An error with id 0 (``overflow``: the broker dropped this
    slow subscriber) ends the feed; :meth:`next_body` still returns the
    bodies that came before it, then raises it once.
    """

    def __init__(self) -> None:
        self.bodies: deque[bytes] = deque()
        self.error: BrokerqError | None = None

    def take(self, wire: Wire) -> protocol.AnyReply | None:
        """Take in every whole frame received; None once all are taken."""
        while self.error is None and (frame := wire.next_reply()) is not None:
            if isinstance(frame, protocol.Event):
                self.bodies.append(frame.body)
            elif isinstance(frame, protocol.Error) and frame.id == 0:
                self.error = from_code(frame.code, frame.message)
            else:
                return frame
        return None

    def next_body(self) -> bytes | None:
        """The oldest body received; None if there is none (yet). Raises the
        error that ended the feed once every body before it was taken."""
        if self.bodies:
            return self.bodies.popleft()
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        return None


def ping() -> Call[protocol.PingReply]:
    return Call(protocol.PingReply, protocol.Ping, 0)


def stop() -> Call[protocol.StopReply]:
    """Ask the broker to exit (never sent again: it may be going already)."""
    return Call(protocol.StopReply, protocol.Stop, 0, retry=False)


def hello() -> Call[protocol.HelloReply]:
    return Call(protocol.HelloReply, protocol.Hello, 0, {"version": protocol.PROTOCOL_VERSION})


def older_broker(exc: VersionMismatch) -> int | None:
    """The version of a broker older than this client, which the client may
    retire (:func:`retirement`); None if the broker is newer or did not say."""
    theirs = exc.broker_version
    return theirs if theirs is not None and theirs < protocol.PROTOCOL_VERSION else None


def broker_to_retire(socket_path: str, exc: VersionMismatch, *, may_retire: bool) -> int:
    """Judge a ``version`` error to a hello: the protocol version of an older
    broker to retire now (an upgrade), else raise: :func:`newer_broker`'s
    error for a newer broker, ``exc`` itself when it may not be retired here
    (a client that must not start a broker, as ``stop``)."""
    older = older_broker(exc)
    if older is None:
        raise newer_broker(socket_path, exc) from None
    if not may_retire:
        raise exc
    return older


def retirement(version: int) -> bytes:
    """What asks a broker of an older protocol ``version`` to exit: ``hello``
    in its version, then ``stop``. Every version keeps these two requests'
    shape (docs/protocol.md, "Versioning rules"), for exactly this."""
    out = bytearray()
    protocol.append_frame(out, protocol.Hello(id=1, version=version, client="brokerq upgrade"))
    protocol.append_frame(out, protocol.Stop(id=2))
    return bytes(out)


def newer_broker(socket_path: str, exc: VersionMismatch) -> VersionMismatch:
    """The error for a broker that speaks a version this client does not know."""
    if exc.broker_version is None:
        return exc
    return VersionMismatch(
        f"the broker at {socket_path} speaks protocol {exc.broker_version}, this client "
        f"speaks {protocol.PROTOCOL_VERSION}: upgrade brokerq here, or stop that broker",
        exc.broker_version,
    )


# -- put keys ----------------------------------------------------------------


class PutKeys:
    """Put keys: an 8-byte random prefix per client (and process), then a counter."""

    def __init__(self) -> None:
        self.prefix = os.urandom(8)
        self.counter = itertools.count()

    def take(self, n: int) -> list[bytes]:
        prefix, counter = self.prefix, self.counter
        return [prefix + next(counter).to_bytes(8, "big") for _ in range(n)]


# -- deadlines ---------------------------------------------------------------


class Attempts:
    """The deadlines of one call and of its retries after a lost connection.

    The exchange may take the call's ``wait`` plus ``grace`` (the client's
    timeout); a call that may wait for ever has no deadline. After a lost
    connection the call may be sent again until that deadline (or, without
    one, for ``grace`` counted from the loss); a retried get or reserve
    asks with what is left of its own timeout (:attr:`fields`).
    """

    def __init__(self, call: Call[Any], grace: float, now: float) -> None:
        self.call = call
        self.grace = grace
        self.fields = dict(call.fields)
        self.deadline = None if call.wait is None else now + call.wait + grace
        timeout = call.fields.get("timeout")
        self.request_deadline = None if timeout is None else now + timeout
        self.retry_until = self.deadline
        self.started = now

    def wait_from(self, now: float) -> float | None:
        """The reply of a call sent earlier (a put in a window) is waited
        for from ``now``: it gets its own deadline, and at least ``grace``
        from now. Returns that deadline (None: no bound)."""
        if self.deadline is not None:
            self.deadline = max(self.deadline, now + self.grace)
        return self.deadline

    def retry_from(self, began: float) -> None:
        """The caller began to wait for this call, sent earlier, at ``began``:
        after a lost connection it may be sent again until ``grace`` after
        that at least (a call that may wait for ever counts from the loss)."""
        if self.retry_until is not None and self.deadline is not None:
            self.retry_until = max(self.retry_until, began + self.grace)

    def start(self, now: float) -> float | None:
        """An attempt begins: how long its exchange may take (None: no bound)."""
        self.started = now
        return None if self.deadline is None else max(self.deadline - now, 0.001)

    def again(self, now: float, *, refused: bool = False) -> bool:
        """The attempt lost its connection (``refused``: the broker refused
        the request as it stops, :class:`BrokerStopping`): may the call be
        sent again?"""
        if self.deadline is None and (self.retry_until is None or now - self.started > self.grace):
            # No deadline of its own (it may wait for ever): reconnecting
            # may take the grace, counted from this loss.
            self.retry_until = now + self.grace
        assert self.retry_until is not None
        if not (self.call.retry or (refused and self.call.resend_refused)):
            return False
        if now >= self.retry_until:
            return False
        if self.request_deadline is not None:
            self.fields["timeout"] = max(0.0, self.request_deadline - now)
        return True


# -- the put window ----------------------------------------------------------

PUT_WINDOW_VARIABLE = "BROKERQ_PUT_WINDOW"


def put_window(value: int | None) -> int:
    """The put window of a client: ``value``, or with None ``$BROKERQ_PUT_WINDOW``
    (unset or empty: 0, off). Raises InvalidRequest (a ValueError) for a
    negative or malformed one."""
    return _count_setting(value, "put_window", PUT_WINDOW_VARIABLE, "puts")


#: A client's timeout: the deadline for connecting, and each reply's grace.
DEFAULT_TIMEOUT = 10.0


def client_timeout(timeout: float) -> tuple[float, bool]:
    """A client's ``timeout`` as (the grace every reply gets, whether it may
    start a broker). Raises InvalidRequest for a negative or non-number one.

    0 is the ``_nowait`` form of connecting, as for a get: the client uses a
    broker only if one is already running, and never starts one or waits
    for one to start; its replies get the default grace.
    """
    if not protocol.is_number(timeout) or not 0 <= timeout < math.inf:
        raise InvalidRequest(
            f"timeout must be a number of seconds >= 0 (0: only a running broker), not {timeout!r}"
        )
    if timeout == 0:
        return DEFAULT_TIMEOUT, False
    return float(timeout), True


PREFETCH_VARIABLE = "BROKERQ_PREFETCH"


def prefetch(value: int | None) -> int:
    """The prefetch of a client: ``value``, or with None ``$BROKERQ_PREFETCH``
    (unset or empty: 0, off). Raises InvalidRequest (a ValueError) for a
    negative or malformed one, as :func:`put_window` does."""
    return _count_setting(value, "prefetch", PREFETCH_VARIABLE, "messages")


def _count_setting(value: int | None, name: str, variable: str, unit: str) -> int:
    """An opt-in count of a client (0: off): ``value``, else the environment's."""
    if value is None:
        name, raw = variable, os.environ.get(variable, "").strip()
        try:
            value = int(raw) if raw else 0
        except ValueError:
            raise InvalidRequest(f"{name} must be a whole number of {unit}, not {raw!r}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{name} is a number of {unit}, not {value!r}")
    if value < 0:
        raise InvalidRequest(f"{name} must be 0 or more, not {value}")
    return value


@dataclass(slots=True)
class Unacknowledged:
    """A put sent in a window whose reply has not been read: its call, its
    :class:`Attempts` (the fields it is sent with, its deadlines), and the
    id of the request that last carried it."""

    call: Call[Any]  # a put or a put_many
    attempts: Attempts
    request_id: int = 0


class PutWindow:
    """The puts of one thread sent without waiting for their replies (sans-IO).

    Its puts are in the order they were made; the first :attr:`sent` of
    them went out on the connection :attr:`conn` (any object the client
    uses for one), the rest are still to be sent there. A new connection
    (after a lost one) has none of them: :meth:`encode_unsent` then
    encodes every one of them again, in order, with its key. Replies come
    in the same order: :meth:`answered` takes the first put's.
    """

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.pending: deque[Unacknowledged] = deque()
        self.conn: object = None
        self.sent = 0
        self._latest: float | None = 0.0  # the latest reply deadline; None: for ever

    def __len__(self) -> int:
        return len(self.pending)

    def add(self, call: Call[protocol.PutReply] | Call[protocol.PutManyReply], now: float) -> None:
        """A put (or one frame of a put_many) made now, to be sent (:meth:`encode_unsent`)."""
        attempts = Attempts(call, self.grace, now)
        if attempts.deadline is None or self._latest is None:
            self._latest = None
        else:
            self._latest = max(self._latest, attempts.deadline)
        self.pending.append(Unacknowledged(call, attempts))

    def encode_unsent(self, conn: object, wire: Wire, now: float) -> bytes | bytearray:
        """The frames of the puts not yet sent on ``conn`` (every put, if
        ``conn`` is not the one they went out on), encoded on ``wire``.
        They count as sent from now on: if sending fails, the connection
        is lost or closed, and a new one gets them all again."""
        if conn is not self.conn:
            self.conn = conn
            self.sent = 0
        unsent = len(self.pending) - self.sent
        if unsent == 0:
            return b""
        entries = list(itertools.islice(reversed(self.pending), unsent))
        entries.reverse()
        out = bytearray()
        for entry in entries:
            entry.request_id = wire.encode(entry.call.kind, entry.attempts.fields)
            entry.attempts.start(now)
            out += wire.out
        self.sent = len(self.pending)
        return out

    def send_deadline(self, now: float) -> float | None:
        """How long sending may block: the broker reads on once it has
        answered the puts ahead, so the latest of their reply deadlines, and
        at least ``grace`` from now (None: no bound, a put may wait for ever)."""
        return None if self._latest is None else max(self._latest, now + self.grace)

    def reply_deadline(self, now: float) -> float | None:
        """The deadline of the first put's reply, waited for from ``now``."""
        return self.pending[0].attempts.wait_from(now)

    def answered(
        self, reply: protocol.AnyReply, wire: Wire, close: Callable[[], None]
    ) -> protocol.Reply:
        """The reply to the first put: it leaves the window (acknowledged, or
        answered with an error, which this raises as :meth:`Wire.check` does).
        Refused by a stopping broker, it was not carried out: it stays, to
        be sent again, and the window is lost as with its connection
        (:class:`BrokerStopping`)."""
        head = self.pending[0]
        if reply.id == head.request_id and not (
            type(reply) is protocol.Error and reply.code == ShuttingDown.code
        ):
            self.pending.popleft()
            self.sent -= 1
            if not self.pending:
                self._latest = 0.0
        expect: type[protocol.Reply] = head.call.expect
        return wire.check(expect, head.request_id, reply, close)

    def lost(self, began: float, now: float) -> bool:
        """The connection was lost (the caller began to wait at ``began``):
        may every put be sent again? Each gets its timeout's remainder, as
        :meth:`Attempts.again` says."""
        self.conn = None
        self.sent = 0
        allowed = True
        for entry in self.pending:
            entry.attempts.retry_from(began)
            allowed = entry.attempts.again(now) and allowed
        return allowed

    def clear(self) -> None:
        self.pending.clear()
        self.conn = None
        self.sent = 0
        self._latest = 0.0


# -- one connection's wire ---------------------------------------------------


class Wire:
    """The sans-IO half of a connection: request ids, frames out, replies in.

    :meth:`encode` a request, send the bytes, :meth:`feed` what arrives
    until :meth:`next_reply` returns one, and :meth:`check` it.

    A reply that answers another request than the one read for, or answers
    it with the wrong kind, puts the connection out of step for good:
    :meth:`check` closes it and raises RemoteProtocolError, and keeps that
    error in :attr:`failure`, so that every other request still waiting on
    the connection fails with it too (:meth:`out_of_step`), at once, instead
    of reading on.
    """

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.reader = protocol.FrameReader(protocol.HANDSHAKE_FRAME_LIMIT)
        self.next_id = 1
        self.out = bytearray()
        self.hello: protocol.HelloReply | None = None
        #: Why the connection went out of step (None: it did not).
        self.failure: RemoteProtocolError | None = None

    def greeted(self, hello: protocol.HelloReply) -> None:
        """The broker's hello reply: its limits now apply."""
        self.hello = hello
        self.reader.max_frame_size = hello.max_frame_size

    def encode(self, kind: type[protocol.Request], fields: dict[str, Any]) -> int:
        """Encode one request into :attr:`out`; return its id."""
        request_id = self.next_id
        self.next_id += 1
        self.out.clear()
        protocol.append_frame(self.out, kind(id=request_id, **fields))
        if len(self.out) - protocol.HEADER_SIZE > self.reader.max_frame_size:
            raise LocalProtocolError(
                f"a {kind.__name__} request of {len(self.out)} bytes is over the broker's "
                f"frame limit of {self.reader.max_frame_size}"
            )
        return request_id

    def feed(self, data: bytes) -> None:
        if not data:
            raise ConnectionResetError("the broker closed the connection")
        self.reader.feed(data)

    def next_reply(self) -> protocol.AnyReply | None:
        """The next whole reply received, or None until more bytes come."""
        payload = self.reader.next_frame()
        return None if payload is None else protocol.decode_reply(payload)

    def check(
        self, expect: type[R], request_id: int, reply: protocol.AnyReply, close: Callable[[], None]
    ) -> R:
        """Return ``reply`` if it answers request ``request_id`` as expected, else raise.

        An error reply raises its :class:`~brokerq.BrokerqError`; a reply
        that is not what was asked for raises RemoteProtocolError. ``close``
        is called first whenever the connection cannot be used any more.
        """
        if reply.id != request_id and not (isinstance(reply, protocol.Error) and reply.id == 0):
            self.fail(f"reply id {reply.id} does not match request {request_id}", close)
        if isinstance(reply, protocol.Error):
            if reply.id == 0 or reply.code in CLOSING_CODES:
                close()  # the broker closes these connections
            if reply.code == "version":
                raise VersionMismatch(reply.message, reply.version)
            if _refused(reply):
                raise BrokerStopping(reply.message)
            raise from_code(reply.code, reply.message)
        if not isinstance(reply, expect):
            self.fail(f"expected a {expect.__name__}, got {reply!r}", close)
        return reply

    def fail(self, message: str, close: Callable[[], None]) -> NoReturn:
        """The connection is out of step: keep why (:attr:`failure`), close
        it, and raise RemoteProtocolError."""
        self.failure = RemoteProtocolError(message)
        close()
        raise self.failure

    def out_of_step(self) -> RemoteProtocolError | None:
        """What a request still waiting on this connection raises once it
        went out of step (a new error, with the first one's message); None
        if it did not."""
        if self.failure is None:
            return None
        return RemoteProtocolError(f"the connection went out of step: {self.failure}")

    def timed_out(self, wait: float | None) -> BrokerUnavailable:
        return BrokerUnavailable(
            f"the broker at {self.socket_path} did not answer within {wait or 0:.3g} s"
        )

    def lost(self, exc: BaseException) -> ConnectionLost:
        return ConnectionLost(f"lost the connection to the broker at {self.socket_path}: {exc}")


def _refused(reply: protocol.AnyReply) -> bool:
    """Whether ``reply`` is a stopping broker's refusal (:class:`BrokerStopping`)."""
    return isinstance(reply, protocol.Error) and reply.code == ShuttingDown.code


def unreachable(socket_path: str, exc: OSError) -> BrokerUnavailable:
    """What connecting raises for an OSError (never a bare OSError out of the API)."""
    return BrokerUnavailable(f"cannot reach the broker at {socket_path}: {exc}")


def not_stopped(socket_path: str, timeout: float) -> BrokerUnavailable:
    return BrokerUnavailable(f"the broker at {socket_path} did not exit within {timeout:g} s")


def closed_client() -> BrokerqError:
    return BrokerqError("the client is closed")


def closed_subscription(topic: str, overflowed: bool) -> BrokerqError:
    """What a closed live subscription raises: closed by its owner, or
    dropped by the broker for reading too slowly (said once, as
    SubscriberOverflow, then this)."""
    if overflowed:
        return BrokerqError(
            f"the subscription to {topic!r} was dropped by the broker for reading too slowly;"
            " subscribe again"
        )
    return BrokerqError(f"the subscription to {topic!r} is closed")
