"""Pull requests on a queue's consumer, each one ended by the server's word.

JetStream hands a message to whichever pull request is waiting when it
comes. nats-py's ``fetch`` stops listening when its own timer runs out,
but the request it sent lives on in the server until that request's
expiry, which the server counts from a little later: a put arriving in
between went to a request nobody was listening to, and sat reserved there
(invisible to ``qsize``, lost to other consumers) until its lease ran out.

So brokerq sends JetStream's pull request itself (``$JS.API.CONSUMER.MSG.NEXT``,
the documented API): a wait is a request with that expiry, listened to
until the server ends it (status 408, or 404 for a no-wait request) or
fills it; a request that is still unanswered a while after its expiry
(a lost connection) is written off, and what comes for it later is handed
out by the next pull, its lease counted from when that request was made.
"""

from __future__ import annotations

import asyncio
import collections
import json
import time

from nats.aio.client import Client as NatsConnection
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

#: How long past a request's expiry its answer may take before it is written off.
ANSWER_GRACE = 2.0
#: A delivery is counted as sent at most this long before it came (network lag).
RECEIPT_MARGIN = 0.1
_STATUS = "Status"
#: The server's answers that end a request: no messages (no-wait), expired,
#: and conflicts (the consumer deleted or changed: the caller asks again).
_ENDS = frozenset({"404", "408", "409"})
_NO_LEADER = "503"


class NoLeader(Exception):
    """Nobody answers for the consumer just now (a leader being elected)."""


class Puller:
    """One queue's pull requests on one connection; one request at a time (the caller locks)."""

    def __init__(self, nc: NatsConnection, stream: str, consumer: str) -> None:
        self._nc = nc
        self._next = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._inbox = nc.new_inbox()
        self._arrived: asyncio.Queue[Msg] = asyncio.Queue()
        self._subscription: Subscription | None = None
        self._held: collections.deque[tuple[Msg, float]] = collections.deque()
        #: When the oldest request written off was made (None: none is).
        self._unanswered_since: float | None = None

    async def _on_message(self, msg: Msg) -> None:
        self._arrived.put_nowait(msg)

    async def pull(self, n: int, expires: float | None, ahead: int = 0) -> list[tuple[Msg, float]]:
        """Up to ``n`` messages, each with the latest time its lease can have
        begun; ``expires``: how long the server may wait for them (None: no
        wait, what is there now). An empty list: none came in time.

        ``ahead`` (a prefetch): when nothing is held, first take up to that
        many that are there now, in one no-wait request, and hold the rest
        for the next pulls; only when there are none, wait as asked."""
        held = self._take_held(n)
        if held:
            return held
        if ahead > n:
            self._held.extend(await self._request(ahead, None))
            held = self._take_held(n)
            if held or expires is None:
                return held
        return await self._request(n, expires)

    async def _request(self, n: int, expires: float | None) -> list[tuple[Msg, float]]:
        """One pull request for up to ``n``, listened to until the server ends it."""
        if self._subscription is None:
            self._subscription = await self._nc.subscribe(self._inbox, cb=self._on_message)
        request: dict[str, object] = {"batch": n}
        if expires is None:
            request["no_wait"] = True
        else:
            request["expires"] = max(1, int(expires * 1e9))
        asked = time.monotonic()
        await self._nc.publish(self._next, json.dumps(request).encode(), reply=self._inbox)
        got: list[tuple[Msg, float]] = []
        try:
            async with asyncio.timeout((expires or 0) + ANSWER_GRACE):
                while len(got) < n:
                    msg = await self._arrived.get()
                    status = (msg.headers or {}).get(_STATUS)
                    if status is None:
                        got.append((msg, max(asked, time.monotonic() - RECEIPT_MARGIN)))
                    elif status == _NO_LEADER:
                        raise NoLeader()
                    elif status in _ENDS:
                        self._unanswered_since = None
                        break
        except TimeoutError:
            self._write_off(asked)
        except asyncio.CancelledError:
            self._write_off(asked)
            self._held.extend(got)  # (taken from the server: the next pull hands them out)
            raise
        return got

    def _write_off(self, asked: float) -> None:
        """Stop waiting for a request the server may still answer: what it
        sends later is handed out by a later pull, its lease counted from ``asked``."""
        if self._unanswered_since is None:
            self._unanswered_since = asked

    def _take_held(self, n: int) -> list[tuple[Msg, float]]:
        """What earlier requests brought that nobody took yet (a prefetch's,
        or a request's written off): handed out first, oldest first."""
        since = self._unanswered_since
        while since is not None and not self._arrived.empty():
            msg = self._arrived.get_nowait()
            if (msg.headers or {}).get(_STATUS) is None:
                self._held.append((msg, since))
        return [self._held.popleft() for _ in range(min(n, len(self._held)))]

    async def close(self) -> None:
        """Give back what is held (released at once, for other consumers), and stop listening."""
        held, self._held = list(self._held), collections.deque()
        for msg, _ in held:
            await msg.nak()
        if held:
            await self._nc.flush()  # (the naks are in the server's hands before the close)
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            await subscription.unsubscribe()
