"""The broker's state as a plain object: queues, waiters, leases, timers.

Theory of operation
-------------------
:class:`BrokerCore` knows nothing of trio, sockets, files or clocks. The I/O
layer calls its methods and passes the current wall-clock time in; every
method changes the state completely before it returns, so there is never an
``await`` in the middle of a state change.

**Write-ahead.** Every change is first described as a journal record
(:mod:`brokerq.broker.records`) and handed to the ``write`` callable the I/O
layer gave the core; only if that returns does the state change. A write
that fails (a full disk) therefore fails the request and changes nothing.
:meth:`BrokerCore.apply` replays records at start.

**Order and fairness.** Each queue holds its ready messages in id order,
which is their arrival order; a message that comes back (released, its
lease expired, its reply not written) returns to its place by id. Dequeuers
that wait (:class:`~brokerq.broker.state.Waiter`) are kept in the order they
began to wait. A queue never has both: a message that arrives while someone
waits is handed straight to the longest waiter, and a dequeuer only waits
when nothing is ready, so no newcomer can overtake a waiter.

**Leases.** ``reserve`` hands a message out under a lease: it stays the
broker's until acked. A lease that runs out, a release, or the close of the
connection that holds it (its ``owner``) puts the message back; after
``max_deliveries`` deliveries without an ack it moves to ``<queue>:dead``.
Every lease verb names the delivery attempt, so a late ack for an attempt
whose lease already ran out is refused (:class:`~brokerq.errors.LeaseLost`).

**Timers** (lease expiries, delayed messages, ttls) are data: one heap,
entries checked lazily when they come due (:meth:`BrokerCore.tick`).

**Unfinished tasks** (``task_done``, ``join``: queue.Queue's count, per
queue, shared by every client). A put adds one task per message; a
``task_done`` takes ``n`` away, refused past the count; a get leaves the
count as it is (its consumer owes a ``task_done``); any other way a message
leaves (acked, purged, expired, buried, dead-lettered out of the queue)
finishes its task, and one that comes back from outside (kicked, a dead
letter arriving) adds one. Those removals never take the count below 0: a
``task_done`` may have come for a message before anyone got it (the stdlib
allows that), and a count of 0 then must not turn into a debt that hides
the next put from a ``join``.

One concern a module, each a part of :class:`BrokerCore`: base.py (the
state, write-ahead, handoff), queues.py (put, get, waiting, settings),
leases.py (leases, timers, dead letters), streams.py (``consume``),
tasks.py (``task_done``, ``join``), topics.py, replay.py (recovery,
snapshots).
"""

from __future__ import annotations

from .base import DEAD_SUFFIX, KEY_WINDOW, LIVE_OVERHEAD
from .leases import Leases
from .replay import Replay
from .streams import Streams
from .tasks import Tasks
from .topics import TopicVerbs

__all__ = ["DEAD_SUFFIX", "KEY_WINDOW", "LIVE_OVERHEAD", "BrokerCore"]


class BrokerCore(TopicVerbs, Leases, Streams, Tasks, Replay):
    """All queues of one broker, driven by method calls (see module doc)."""
