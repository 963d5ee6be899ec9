"""The client wing: one set of request rules, two drivers.

The rules are sans-IO (calls, wire, window, prefetch, api); the drivers,
blocking and async, connect, move the bytes and wait (see
docs/architecture.md). ``brokerq.client`` was the blocking client's module
before the wings: its names still resolve here. Importing this package
loads neither trio nor anyio.
"""

from __future__ import annotations

from typing import Any

from . import blocking
from .blocking import DEFAULT_TIMEOUT, Client, Message, Queue, Subscription, connect


def __getattr__(name: str) -> Any:
    """Every other name of the old ``brokerq.client`` module."""
    return getattr(blocking, name)


__all__ = ["DEFAULT_TIMEOUT", "Client", "Message", "Queue", "Subscription", "connect"]
