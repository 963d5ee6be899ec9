"""How a parked request is woken: the piece the connection, the streams and
the broker share (below all three, so that none imports another for it)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, Protocol, cast

import trio

from .core.state import Joiner, Putter, Waiter

#: What a stream raises once its peer (or the connection) is gone.
STREAM_GONE: Final = (trio.BrokenResourceError, trio.ClosedResourceError)


class PeerGone(Exception):
    """The connection ended; its task winds up quietly."""


class Wakeup:
    """Not a ``trio.Event``: the parked task waits by reading its socket (to see the
    peer leave) in a scope that setting this cancels: one task per request, not two."""

    __slots__ = ("flag", "scope")

    def __init__(self) -> None:
        self.flag = False
        self.scope: trio.CancelScope | None = None  # the parked task's, while it waits

    def set(self) -> None:
        self.flag = True
        if self.scope is not None:
            self.scope.cancel()


class Owner(Protocol):
    """The connection a get or reserve waits on (see Deliveries.hand_over)."""

    def hand_over(self, waiter: Waiter) -> None: ...


def wake(waiter: Waiter | Putter | Joiner) -> None:
    """A get or reserve handed a message has its reply written by the waking task."""
    wakeup = waiter.token
    assert isinstance(wakeup, Wakeup)
    if type(waiter) is Waiter and waiter.messages and not wakeup.flag:  # (not a Stream)
        cast(Owner, waiter.owner).hand_over(waiter)
    wakeup.set()


def wake_all(waiters: Sequence[Waiter | Putter | Joiner]) -> None:
    for waiter in waiters:
        wake(waiter)
