"""A blocking client's put window on NATS: JetStream's async publish,
acknowledged later (docs/usage.md, "Pipelined puts"; docs/nats.md).

Under ``put_window=N`` a put is published without waiting for its PubAck
and returns 0; up to N puts of a thread wait for theirs. They are settled
in order by ``flush``, by a put that finds the window full, and by any
other call of the thread first (so a ``get`` sees the thread's own puts),
as the local put window's are. A put whose PubAck does not come in time
is published again under its key, so it is stored once.
"""

from __future__ import annotations

import collections

from ..errors import BrokerqError, BrokerUnavailable
from .aio_queue import SentPut


class PutWindow:
    """One thread's puts sent and not yet acknowledged, oldest first."""

    def __init__(self) -> None:
        self.sent: collections.deque[SentPut] = collections.deque()

    def __len__(self) -> int:
        return len(self.sent)

    async def settle(self, keep: int = 0) -> None:
        """Settle the oldest puts until at most ``keep`` are left.

        A put refused (a full queue, a body too large) raises its error here
        and is dropped: it was not made, and the puts after it stand (the
        next settle goes on with them). One that still got no answer
        (BrokerUnavailable) stays, to be sent again, under its key, by the
        next settle; so does one whose settling was interrupted (Ctrl-C)."""
        while len(self.sent) > keep:
            try:
                await self.sent[0].settle()
            except BrokerUnavailable:
                raise
            except BrokerqError:
                self.sent.popleft()
                raise
            self.sent.popleft()
