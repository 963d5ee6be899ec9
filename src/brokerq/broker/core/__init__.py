"""The broker's state as a plain object: queues, waiters, leases, timers.

:class:`BrokerCore` knows nothing of trio, sockets, files or clocks: the I/O
layer passes the wall-clock time in, and every method changes the state
completely before it returns (never an ``await`` mid-change).

**Write-ahead.** Every change is first a journal record handed to the
``write`` callable; only if that returns does the state change, so a failed
write (a full disk) fails the request and changes nothing.

**Fairness.** A queue never has both ready messages and waiters: a message
that arrives while someone waits goes straight to the longest waiter, and a
dequeuer only waits when nothing is ready, so no newcomer overtakes a waiter.
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
