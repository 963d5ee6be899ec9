"""The client wing: one set of request rules, two drivers.

The rules, sans-IO (no sockets, no clock, neither trio nor anyio):
:mod:`.calls` builds each request, checking its arguments; :mod:`.wire`
judges each reply and keeps a connection's request ids and frames, and the
deadlines of a call's attempts (retries after a lost connection or a
stopping broker); :mod:`.window` holds a client's settings, put keys and
put window; :mod:`.prefetch` the buffer of a prefetching consumer; and
:mod:`.api` each public method's request, result and docstring, once for
both drivers.

The drivers connect, move the bytes and wait. The blocking one:
:mod:`.sockio` (a connection and its spin), :mod:`.lanes` (per-thread
lanes, reentrancy, fork, the put window's I/O), :mod:`.streaming` (streams,
live subscriptions), :mod:`.blocking` (Client, Queue, Message). The async
one (anyio): :mod:`.pool` (connections, the pool, cancellation),
:mod:`.async_streams` (streams, live subscriptions), :mod:`.asynchronous`
(AsyncClient, AsyncQueue, AsyncMessage). The wing imports the shared
modules (protocol, errors, spawn, pause, version), never the broker's.

``brokerq.client`` was the blocking client's module before the wings: its
names still resolve here (``brokerq.client.Client``, ``connect``, ...).
Importing this package loads neither trio nor anyio.
"""

from __future__ import annotations

from typing import Any

from . import blocking
from .blocking import DEFAULT_TIMEOUT, Client, Message, Queue, Subscription, connect


def __getattr__(name: str) -> Any:
    """Every other name of the old ``brokerq.client`` module."""
    return getattr(blocking, name)


__all__ = ["DEFAULT_TIMEOUT", "Client", "Message", "Queue", "Subscription", "connect"]
