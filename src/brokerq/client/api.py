"""The client's API, once for both drivers: what each method asks, and what it returns.

Each function here is one method of :class:`brokerq.Queue`,
:class:`brokerq.Message` or :class:`brokerq.Client` (and of their async
twins): it checks the arguments and returns an :class:`Op`, the request and
the function that turns its reply into the result. A driver's method runs
the op and takes its docstring from here, so that both flavours say the same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, Generic, TypeVar

from .. import protocol
from . import calls
from .calls import Call

R = TypeVar("R", bound=protocol.Reply)
T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


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
    """Give each public method of a driver's ``cls`` that has no docstring
    the shared one: its op's here (the function of the same name, or as
    ``ops`` names it), or its entry in :data:`DOCS`."""
    for name, member in list(vars(cls).items()):
        method = member.fget if isinstance(member, property) else member
        if name.startswith("_") or not callable(method) or method.__doc__:
            continue
        doc = DOCS[name] if name in DOCS else ops.get(name, globals()[name]).__doc__
        if isinstance(member, property):
            setattr(cls, name, property(method, doc=doc))
        else:
            method.__doc__ = doc


#: The docstrings of the methods each driver writes its own way (what they
#: ask depends on the driver: a put window, a stream, a cancellation).
DOCS = {
    "put": """Enqueue ``body`` (str is sent as UTF-8); return its message id.

    With the client's ``put_window`` above 0 (blocking client), it is sent
    without waiting for the reply and returns 0: it is acknowledged only
    once :meth:`flush` (or another request of this thread) returns. An
    exception raised here may be the error of an earlier windowed put,
    read while waiting for room in the window: this put was then not
    sent. See docs/usage.md, "Pipelined puts".

    ``priority``: higher is delivered first, FIFO within a priority.
    ``delay``: seconds before it can be delivered. ``ttl``: seconds after
    which it is dropped if still waiting (ready or delayed).
    ``timeout``: on a queue at its ``maxsize``/``max_bytes``, how long to
    wait for room (None: for ever, 0: not at all); then raises Full.

    Exactly once: if the broker dies before it answers, the put is sent
    again with the same key, and the broker drops the copy if the first
    one got through. (Async: a put cancelled while it waits for room is
    withdrawn, or returns its id if it was made: see the module docstring
    of :mod:`brokerq.async_client`.)
    """,
    "put_nowait": """``put(body, timeout=0)``: raises Full at once if the queue is full.""",
    "put_many": """Enqueue several bodies in order, in as few frames as fit; return their ids.

    ``priority``, ``delay``, ``ttl`` and ``timeout`` as for :meth:`put`.
    Every size is checked before anything is sent. Under the client's
    ``put_window``, each of its frames is a put of the window (sent,
    not yet acknowledged) and it returns a 0 per body (see :meth:`put`).
    """,
    "get": """Remove and return the next body, waiting up to ``timeout`` seconds.

    ``None`` waits for ever; ``0`` does not wait. Raises Empty on timeout.
    (Async: a cancelled get loses no message; see the module docstring of
    :mod:`brokerq.async_client`.)
    """,
    "get_nowait": """``get(timeout=0)``: raises Empty at once if no message is ready.""",
    "get_many": """Up to ``n`` bodies: waits (up to ``timeout``) for the first only,
    then returns every ready one up to ``n``. Raises Empty on timeout.""",
    "reserve": """Lease the next message: it stays the broker's until acked.

    Waits up to ``timeout`` (as :meth:`get`). If the lease (``lease``
    seconds, else the queue's default) runs out, or this client's
    connection closes, before :meth:`Message.ack`, the message is
    delivered again (at-least-once). Use it as a context manager to ack
    on success and release on an exception (async: ``msg = await
    q.reserve()``, or ``async with q.reserve() as msg:``).
    """,
    "ping": """Round-trip time to the broker, in seconds (connecting is not counted).""",
    "stop": """Ask the broker to exit and wait until it has; never spawns one.

    Returns False if no broker was running. Raises BrokerUnavailable if
    the broker still holds its lock after the client's ``timeout``.
    Flushes this thread's put window first (blocking client).

    Clients waiting on the broker (a ``get``, a live subscription,
    ``brokerq consume``) reconnect, and the first of them starts a new
    broker once this one has exited: this returns all the same (it
    waits for this broker, not for none to run). To stop for good, stop
    those clients first.
    """,
    "live_get": """The next publish's body, waiting up to ``timeout`` (None: for
    ever; 0: only what has arrived); raises Empty if none came.""",
}


_count, _stats = attrgetter("count"), attrgetter("stats")


def _nothing(reply: protocol.Reply) -> None:
    return None


# -- Queue -------------------------------------------------------------------


def kick(queue: str, n: int = 1) -> Op[protocol.KickReply, int]:
    """Return up to ``n`` buried messages to ready; on ``<q>:dead``, move
    them back to ``<q>``. Returns how many moved."""
    return Op(calls.kick(queue, n), _count)


def configure(
    queue: str,
    *,
    max_deliveries: int | None = None,
    lease: float | None = None,
    maxsize: int | None = None,
    max_bytes: int | None = None,
) -> Op[protocol.ConfigureReply, dict[str, Any]]:
    """Change this queue's settings; None leaves a setting as it is.

    ``maxsize`` / ``max_bytes``: the most messages / body bytes it holds
    in every state (``maxsize`` 0: unlimited; ``max_bytes`` 0: the
    broker's ``--max-queue-bytes``, unlimited by default); a put on a
    full queue waits for room.
    Kept in the journal. Returns the settings now in force.
    """
    call = calls.configure(
        queue, max_deliveries=max_deliveries, lease=lease, maxsize=maxsize, max_bytes=max_bytes
    )
    return Op(call, attrgetter("config"))


def delete(queue: str) -> Op[protocol.DeleteReply, int]:
    """Delete this queue: every message it holds, in every state, and its
    settings; returns how many messages went. (Using the name again
    makes a new, empty queue.)"""
    return Op(calls.delete(queue), _count)


def peek(queue: str) -> Op[protocol.PeekReply, bytes]:
    """The body at the head, not removed. Raises Empty if none is ready."""
    return Op(calls.peek(queue), attrgetter("body"))


def purge(queue: str) -> Op[protocol.PurgeReply, int]:
    """Remove every ready message; return how many."""
    return Op(calls.purge(queue), _count)


def stats(queue: str) -> Op[protocol.StatsReply, dict[str, Any]]:
    """Depth, bytes, waiters and totals of this queue (see docs/usage.md)."""
    return Op(calls.stats(queue), _stats)


def qsize(stats: dict[str, Any]) -> int:
    """Messages ready now (as :meth:`queue.Queue.qsize`: a snapshot)."""
    return int(stats["ready"])


def empty(stats: dict[str, Any]) -> bool:
    """Whether no message is ready now (a snapshot)."""
    return qsize(stats) == 0


def subscribe(queue: str, topic: str) -> Op[protocol.SubscribeReply, None]:
    """From now on, get a copy of every publish to ``topic``, kept in the
    journal until :meth:`unsubscribe` or :meth:`delete` (durable)."""
    return Op(calls.subscribe(topic, queue), _nothing)


def unsubscribe(queue: str, topic: str) -> Op[protocol.UnsubscribeReply, bool]:
    """End the subscription to ``topic``; False if there was none. The
    copies already in this queue stay."""
    return Op(calls.unsubscribe(topic, queue), attrgetter("found"))


def task_done(queue: str, n: int = 1) -> Op[protocol.TaskDoneReply, None]:
    """A message taken by :meth:`get` was handled (as :meth:`queue.Queue.task_done`).

    The count is the broker's, per queue, shared by every process: each
    put adds a task; this takes ``n`` away (``n`` > 1: that many at
    once, for a :meth:`get_many` batch). Calling it more times than
    there are tasks raises InvalidRequest, a ValueError, as the stdlib
    does. An acked :meth:`reserve` counts as its task_done already.
    Never sent again after a lost connection (a retry whose first try
    got through would count twice): raises ConnectionLost (a
    BrokerUnavailable), as the lease verbs do. (Async: it runs shielded.)
    """
    return Op(calls.task_done(queue, n), _nothing)


def join(queue: str, timeout: float | None = None) -> Op[protocol.JoinReply, None]:
    """Block until every task of this queue is done (as :meth:`queue.Queue.join`).

    Returns once the broker's count of unfinished tasks (put, not yet
    task_done, acked or otherwise settled) is 0. ``timeout``: raise
    :class:`~brokerq.JoinTimeout` (a TimeoutError) after that many
    seconds (None: wait for ever; 0: only look). After a lost connection
    it asks again with what is left of its timeout, as :meth:`get` does.
    (Async: cancellable; a cancelled join changes nothing in the broker.)
    """
    return Op(calls.join(queue, timeout), _nothing)


def unfinished_tasks(stats: dict[str, Any]) -> int:
    """The broker's count of this queue's unfinished tasks (a snapshot,
    read from its stats, as :attr:`queue.Queue.unfinished_tasks`; a
    method of the async queue, since reading it talks to the broker)."""
    return calls.unfinished_tasks(stats)


# -- Message -----------------------------------------------------------------


def ack(msg_id: int, attempt: int) -> Op[protocol.AckReply, None]:
    """Done with it: the message is gone for good. LeaseLost if the lease ran out."""
    return Op(calls.ack(msg_id, attempt), _nothing)


def release(msg_id: int, attempt: int, delay: float = 0) -> Op[protocol.ReleaseReply, None]:
    """Give it back for redelivery: now (to its place at the head) or after ``delay`` s."""
    return Op(calls.release(msg_id, attempt, delay), _nothing)


def bury(msg_id: int, attempt: int) -> Op[protocol.BuryReply, None]:
    """Set it aside: kept, not delivered, until kicked (``Queue.kick``)."""
    return Op(calls.bury(msg_id, attempt), _nothing)


def touch(msg_id: int, attempt: int, lease: float | None = None) -> Op[protocol.TouchReply, float]:
    """Extend the lease (by its length, or ``lease`` seconds from now)."""
    return Op(calls.touch(msg_id, attempt, lease), attrgetter("lease"))


# -- Client ------------------------------------------------------------------


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

    Each queue subscribed to the topic (:meth:`Queue.subscribe`) gets it
    as an ordinary message (with ``priority`` and ``ttl`` as for
    :meth:`Queue.put`), unless it is full: a publish never waits (async:
    it runs shielded). Each live subscriber (:meth:`subscribe`) is sent
    it. 0 means nobody subscribes: the message went nowhere. Retried after
    a lost connection like a put, without a second copy in any queue.
    """
    call = calls.publish(topic, body, limit, keys, priority=priority, ttl=ttl)
    return Op(call, lambda reply: reply.copies + reply.live)


def broker_stats() -> Op[protocol.StatsReply, dict[str, Any]]:
    """The broker's stats: pid, version, uptime, connections, totals."""
    return Op(calls.stats(), _stats)


def queues() -> Op[protocol.QueuesReply, list[str]]:
    """The names of every queue the broker holds."""
    return Op(calls.queues(), attrgetter("names"))
