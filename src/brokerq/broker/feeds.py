"""Live subscriptions: publishers append ``event`` frames to the subscriber's
:class:`LiveFeed` (never blocking), and its own writer task sends them. A
subscriber that reads too slowly is dropped with an ``overflow`` error.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Final

import trio

from .. import protocol
from ..protocol import Error, Event
from .wakeup import STREAM_GONE

log = logging.getLogger("brokerq.broker")

#: How long a dropped subscriber gets to take what is being sent to it, and its error.
OVERFLOW_GRACE_SECONDS: Final = 30.0


class LiveFeed:
    """Publishes waiting for one live subscriber. A push past ``limit`` (one always
    fits) marks it overflowed, and the send in flight gets a grace to finish."""

    __slots__ = ("limit", "overflowed", "pending", "scope", "sending", "wakeup")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.pending = bytearray()
        self.overflowed = False
        self.wakeup = trio.Event()
        self.scope = trio.CancelScope()  # the writer's: cancelled when the connection ends
        self.sending: trio.CancelScope | None = None  # around the writer's send

    def push(self, event: Event) -> bool:
        if self.overflowed:
            return False
        start = len(self.pending)
        protocol.append_frame(self.pending, event)
        if start and len(self.pending) > self.limit:
            self.pending.clear()
            self.overflowed = True
            if self.sending is not None:
                self.sending.deadline = trio.current_time() + OVERFLOW_GRACE_SECONDS
        self.wakeup.set()
        return not self.overflowed

    async def write(
        self, stream: trio.abc.Stream, send_lock: trio.Lock, connection: trio.CancelScope
    ) -> None:
        """Send the events as they come; on overflow, the error, then cancel ``connection``."""
        with self.scope:
            while True:
                await self.wakeup.wait()
                self.wakeup = trio.Event()
                if self.overflowed:
                    break
                data, self.pending = self.pending, bytearray()
                try:
                    with trio.CancelScope() as self.sending:
                        async with send_lock:
                            await stream.send_all(data)
                except STREAM_GONE:
                    return  # the request loop sees the end and cleans up
                if self.sending.cancelled_caught:
                    # Overflowed, and not read for the grace: cut mid-frame, no error.
                    log.warning("closed a live subscriber that stopped reading")
                    connection.cancel()
                    return
                self.sending = None
            # (The connection's send_event has ended its live subscriptions already.)
            log.warning("dropped a live subscriber that fell behind")
            behind = f"this subscriber fell more than {self.limit} bytes of publishes behind"
            error = Error(id=0, code="overflow", message=behind + " and was dropped")
            with trio.move_on_after(OVERFLOW_GRACE_SECONDS), contextlib.suppress(*STREAM_GONE):
                async with send_lock:
                    await stream.send_all(protocol.encode_frame(error))
            connection.cancel()
