"""The client's API, once for both drivers: what each method asks, and what it returns.

Each function here is a method of Queue, Message or Client (blocking and
async): it checks the arguments and returns an :class:`Op`. A driver's method
runs the op and takes its docstring from here, so that both say the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, Generic, TypeVar

from .. import protocol, validation
from ..errors import BrokerqError, InvalidRequest
from . import calls
from .calls import Call

R = TypeVar("R", bound=protocol.Reply)
T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])
NamedBody = tuple[str, bytes]


@dataclass(slots=True)
class Op(Generic[R, T]):
    """A request to make and what its reply returns (``result``)."""

    call: Call[R]
    result: Callable[[R], T]


def like(name: str) -> Callable[[F], F]:
    """A driver's method, with the docstring of :data:`DOCS` ``name``."""

    def document(method: F) -> F:
        method.__doc__ = DOCS[name]
        return method

    return document


def document(cls: type, **ops: Callable[..., Any]) -> None:
    """Give each public method of ``cls`` without a docstring the shared one:
    its entry in :data:`DOCS`, else its op's here (by name, or as ``ops`` says)."""
    for name, member in list(vars(cls).items()):
        method = member.fget if isinstance(member, property) else member
        if name.startswith("_") or not callable(method) or method.__doc__:
            continue
        doc = DOCS[name] if name in DOCS else ops.get(name, globals()[name]).__doc__
        if isinstance(member, property):
            setattr(cls, name, property(method, doc=doc))
        else:
            method.__doc__ = doc


#: The docstrings of the methods each driver writes its own way.
DOCS = {
    "put": """Enqueue ``body`` (str is sent as UTF-8); return its message id.

    ``priority``: higher is delivered first. ``delay``: seconds before it
    is ready. ``ttl``: seconds after which it is dropped if still waiting.
    ``timeout``: on a full queue, how long to wait for room (None: for
    ever), then Full. Exactly once, even when sent again. Under a
    ``put_window`` it returns 0 (docs/usage.md, "Pipelined puts").
    """,
    "put_nowait": """``put(body, timeout=0)``: raises Full at once if the queue is full.""",
    "put_many": """Enqueue several bodies in order, in as few frames as fit; return their ids.

    Options as for :meth:`put`; every size is checked before anything is
    sent. Under the client's ``put_window`` it returns a 0 per body.
    """,
    "get": """Remove and return the next body, waiting up to ``timeout`` seconds.

    ``None`` waits for ever; ``0`` does not wait. Raises Empty on timeout.
    (Async: a cancelled get loses no message.)
    """,
    "get_nowait": """``get(timeout=0)``: raises Empty at once if no message is ready.""",
    "get_many": """Up to ``n`` bodies: waits (up to ``timeout``) for the first only,
    then returns every ready one up to ``n``. Raises Empty on timeout.""",
    "reserve": """Lease the next message: it stays the broker's until acked.

    Waits up to ``timeout`` (as :meth:`get`). If the lease (``lease``
    seconds, else the queue's) runs out before :meth:`Message.ack`, it is
    delivered again (at-least-once).
    """,
    "get_any": """Remove and return ``(queue name, body)`` of the next message of
    any of ``queues``, waiting up to ``timeout`` seconds (as :meth:`Queue.get`).

    The first queue in the list that has a message ready gives it (the list
    is an order of priority); if none has, it waits on all of them at once,
    in each queue's line of waiters (docs/usage.md, "Waiting on several
    queues"). Raises Empty on timeout, NotSupported from an older broker.
    """,
    "reserve_any": """Lease the next message of any of ``queues`` (the first that
    has one, as :meth:`get_any`): a Message whose ``queue`` is the Queue it
    came from, to ack, release, bury or touch as one from :meth:`Queue.reserve`.
    ``lease``: seconds (None: the lease of the queue it came from).
    """,
    "ping": """Round-trip time to the broker, in seconds (connecting is not counted).""",
    "stop": """Ask the broker to exit and wait until it has; never spawns one.

    Returns False if no broker was running. Clients waiting on the broker
    reconnect, and the first starts a new one: to stop for good, stop
    those clients first.
    """,
    "live_get": """The next publish's body, waiting up to ``timeout`` (None: for
    ever; 0: only what has arrived); raises Empty if none came.""",
}


_count, _stats = attrgetter("count"), attrgetter("stats")


def _nothing(reply: protocol.Reply) -> None:
    return None


def _op(
    expect: type[R], kind: type[protocol.Request], result: Callable[[R], T], **fields: Any
) -> Op[R, T]:
    """An op whose request never waits in the broker."""
    return Op(Call(expect, kind, 0, fields), result)


def named_body(reply: protocol.GetAnyReply | protocol.ReserveAnyReply) -> NamedBody:
    """What :meth:`Client.get_any` returns: the queue's name, and the body."""
    return reply.queue, reply.body


def get_any(queues: Iterable[str], timeout: float | None) -> Op[protocol.GetAnyReply, NamedBody]:
    return Op(calls.get_any(queues, timeout), named_body)


def kick(queue: str, n: int = 1) -> Op[protocol.KickReply, int]:
    """Up to ``n`` buried messages back to ready (on ``<q>:dead``, to
    ``<q>``); returns how many moved."""
    validation.validate_count(n, "kick's n")
    return _op(protocol.KickReply, protocol.Kick, _count, queue=queue, n=n)


def configure(
    queue: str,
    *,
    max_deliveries: int | None = None,
    lease: float | None = None,
    maxsize: int | None = None,
    max_bytes: int | None = None,
) -> Op[protocol.ConfigureReply, dict[str, Any]]:
    """Change this queue's limits, delivery limit and default lease (None:
    unchanged); returns the settings in force (see docs/usage.md)."""
    call = calls.configure(
        queue, max_deliveries=max_deliveries, lease=lease, maxsize=maxsize, max_bytes=max_bytes
    )
    return Op(call, attrgetter("config"))


def delete(queue: str) -> Op[protocol.DeleteReply, int]:
    """Delete this queue: every message in every state, and its settings;
    returns how many messages went."""
    return _op(protocol.DeleteReply, protocol.Delete, _count, queue=queue)


def peek(queue: str) -> Op[protocol.PeekReply, bytes]:
    """The body at the head, not removed. Raises Empty if none is ready."""
    return _op(protocol.PeekReply, protocol.Peek, attrgetter("body"), queue=queue)


def purge(queue: str) -> Op[protocol.PurgeReply, int]:
    """Remove every ready message; return how many."""
    return _op(protocol.PurgeReply, protocol.Purge, _count, queue=queue)


def stats(queue: str) -> Op[protocol.StatsReply, dict[str, Any]]:
    """Depth, bytes, waiters and totals of this queue (see docs/usage.md)."""
    return _op(protocol.StatsReply, protocol.Stats, _stats, queue=queue)


def qsize(stats: dict[str, Any]) -> int:
    """Messages ready now (as :meth:`queue.Queue.qsize`: a snapshot)."""
    return int(stats["ready"])


def empty(stats: dict[str, Any]) -> bool:
    """Whether no message is ready now (a snapshot)."""
    return qsize(stats) == 0


def subscribe(queue: str, topic: str) -> Op[protocol.SubscribeReply, None]:
    """From now on, get a copy of every publish to ``topic`` (durable)."""
    return Op(calls.subscribe(topic, queue), _nothing)


def unsubscribe(queue: str, topic: str) -> Op[protocol.UnsubscribeReply, bool]:
    """End the subscription to ``topic``; False if there was none."""
    found = attrgetter("found")
    return _op(protocol.UnsubscribeReply, protocol.Unsubscribe, found, topic=topic, queue=queue)


def task_done(queue: str, n: int = 1) -> Op[protocol.TaskDoneReply, None]:
    """A message taken by :meth:`get` was handled (as :meth:`queue.Queue.task_done`).

    Never sent again after a lost connection (it could count twice: it
    raises ConnectionLost), but sent again when a stopping broker refused
    it (it did not count then).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InvalidRequest(f"task_done needs a whole number n >= 1, not {n!r}")
    fields = {"queue": queue, "n": n}
    call = Call(
        protocol.TaskDoneReply, protocol.TaskDone, 0, fields, retry=False, resend_refused=True
    )
    return Op(call, _nothing)


def join(queue: str, timeout: float | None = None) -> Op[protocol.JoinReply, None]:
    """Block until every task of this queue is done (as :meth:`queue.Queue.join`).

    ``timeout``: raise :class:`~brokerq.JoinTimeout` after that many
    seconds (None: wait for ever; 0: only look).
    """
    validation.validate_timeout(timeout)
    fields = {"queue": queue, "timeout": timeout}
    return Op(Call(protocol.JoinReply, protocol.Join, timeout, fields), _nothing)


def unfinished_tasks(stats: dict[str, Any]) -> int:
    """The broker's count of this queue's unfinished tasks (a snapshot; a
    broker from before task_done has none: say so, not KeyError)."""
    count = stats.get("unfinished_tasks")
    if not isinstance(count, int):
        raise BrokerqError(
            "the broker does not count unfinished tasks: it is older than this client "
            "(`brokerq stop` it; the next one started does)"
        )
    return count


def ack(msg_id: int, attempt: int, *, as_get: bool = False) -> Op[protocol.AckReply, None]:
    """Done with it: the message is gone for good. LeaseLost if the lease ran out.
    ``as_get``: taken as a get takes it, its task left for a ``task_done``."""
    return Op(calls.ack(msg_id, attempt, as_get=as_get), _nothing)


def release(msg_id: int, attempt: int, delay: float = 0) -> Op[protocol.ReleaseReply, None]:
    """Give it back for redelivery: now (to its place at the head) or after ``delay`` s."""
    if not validation.is_number(delay) or not 0 <= delay < math.inf:
        raise InvalidRequest(f"delay must be a number of seconds >= 0, not {delay!r}")
    call = calls.verb(protocol.ReleaseReply, protocol.Release, msg_id, attempt, delay=float(delay))
    return Op(call, _nothing)


def bury(msg_id: int, attempt: int) -> Op[protocol.BuryReply, None]:
    """Set it aside: kept, not delivered, until kicked (``Queue.kick``)."""
    return Op(calls.verb(protocol.BuryReply, protocol.Bury, msg_id, attempt), _nothing)


def touch(msg_id: int, attempt: int, lease: float | None = None) -> Op[protocol.TouchReply, float]:
    """Extend the lease (by its length, or ``lease`` seconds from now)."""
    validation.validate_lease(lease)
    call = calls.verb(protocol.TouchReply, protocol.Touch, msg_id, attempt, lease=lease)
    return Op(call, attrgetter("lease"))


def publish(
    topic: str,
    body: calls.Body,
    limit: int,
    keys: calls.KeySource,
    *,
    priority: int = 0,
    ttl: float | None = None,
) -> Op[protocol.PublishReply, int]:
    """Send a copy of ``body`` to every subscriber of ``topic``; return how many.

    Each queue subscribed gets it as a message (``priority`` and ``ttl``
    as for :meth:`Queue.put`) unless it is full: a publish never waits.
    """
    validation.validate_queue_name(topic, what="topic", for_put=True)
    data = calls.as_bytes(body)
    calls.check_size(data, limit)
    fields = {"topic": topic, "body": data, "key": keys(1)[0], "priority": int(priority)}
    fields["ttl"] = None if ttl is None else float(ttl)
    call = Call(protocol.PublishReply, protocol.Publish, 0, fields)
    return Op(call, lambda reply: reply.copies + reply.live)


def broker_stats() -> Op[protocol.StatsReply, dict[str, Any]]:
    """The broker's stats: pid, version, uptime, connections, totals."""
    return _op(protocol.StatsReply, protocol.Stats, _stats)


def queues() -> Op[protocol.QueuesReply, list[str]]:
    """The names of every queue the broker holds."""
    return _op(protocol.QueuesReply, protocol.Queues, attrgetter("names"))
