"""The client wing: one set of request rules, two drivers.

:mod:`.calls` builds each request and judges its reply, sans-IO (with
:mod:`.prefetch`, the buffer of a prefetching consumer); the blocking
driver (:mod:`.blocking`, over :mod:`.sockio`) and the async one
(:mod:`.asynchronous`, anyio) move the bytes and wait. The wing imports
the shared modules (protocol, errors, spawn, pause, version), never the
broker's.

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
