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

One concern a module, each a part of :class:`BrokerCore`: base.py (the
state, write-ahead, handoff), queues.py (put, get, waiting, settings),
leases.py (reserve's verbs, timers, dead letters), streams.py
(``consume``), tasks.py (``task_done``, ``join``), topics.py, replay.py
(recovery, snapshots).
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
