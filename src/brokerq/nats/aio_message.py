"""A reserved message on JetStream, and the reserve that yields it.

Its lease is the consumer's ack wait, counted here from no later than the
server counts it (see :mod:`.pulling`), so a verb let through
finds the lease alive; one after it ran out raises LeaseLost and is not
sent (the message may be another consumer's by then).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Coroutine, Generator, Sequence
from typing import Any, Protocol

from nats.aio.client import Client as NatsConnection
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from .. import validation
from ..client.calls import settle_on_async_exit
from ..errors import LeaseLost, NotSupported
from . import burial
from .failures import lacks, translate_errors


class _Client(Protocol):
    timeout: float

    @property
    def nc(self) -> NatsConnection: ...

    @property
    def js(self) -> JetStreamContext: ...


class _Tasks(Protocol):
    async def acked_as_got(
        self, acks: Sequence[Callable[[], Awaitable[None]]]
    ) -> list[BaseException | None]: ...


class MessageHome(Protocol):
    """What a message needs of its queue (:class:`brokerq.nats.AsyncNatsQueue`)."""

    name: str

    @property
    def client(self) -> _Client: ...

    @property
    def tasks(self) -> _Tasks: ...


def not_supported(feature: str, why: str) -> NotSupported:
    return lacks(feature, why)


@translate_errors
class AsyncNatsMessage:
    """A reserved message. Its lease is the consumer's ack wait, or one of its
    own (``reserve(lease=)``, ``touch(lease=)``), kept by :meth:`_keep_lease`."""

    def __init__(
        self,
        queue: MessageHome,
        msg: Msg,
        attempt: int,
        ack_wait: float,
        since: float,
        *,
        lease: float | None = None,
    ) -> None:
        self.queue = queue
        self._msg = msg
        self.id = int(msg.metadata.sequence.stream)
        self.body = bytes(msg.data)
        self.attempt = attempt
        self._ack_wait = ack_wait
        self.lease = ack_wait if lease is None else lease
        self.lease_expires = since + self.lease  # (since: see pulling.py)
        self.settled = False
        self._keeper: asyncio.Task[None] | None = None
        if self.lease != ack_wait:
            self._keeper = asyncio.get_running_loop().create_task(self._keep_lease())

    async def _keep_lease(self) -> None:
        """A lease of its own, longer or shorter than the server's ack wait:
        kept alive there by an in-progress signal every third of the ack wait,
        and ended by a release when it runs out unsettled, so the message comes
        back then, as the local broker's. If this client dies meanwhile the
        ack wait brings the message back, as it does every message of a dead
        consumer. (The blocking client's loop runs between calls: driving.py.)"""
        while not self.settled:
            left = self.lease_expires - time.monotonic()
            with contextlib.suppress(Exception):  # (a lost connection: the ack wait decides)
                if left <= 0:
                    await self._msg.nak()
                    return
                await asyncio.sleep(min(left, self._ack_wait / 3))
                if not self.settled and time.monotonic() < self.lease_expires:
                    await self._msg.in_progress()

    def _settle(self) -> None:
        self.settled = True
        if self._keeper is not None:
            self._keeper.cancel()

    def __repr__(self) -> str:
        where = f"attempt {self.attempt} of {self.queue.name!r}"
        return f"<brokerq.nats.AsyncNatsMessage {self.id} {where}>"

    def _check_lease(self) -> None:
        """A verb after the lease ran out: the message may be another's now."""
        if time.monotonic() >= self.lease_expires:
            raise LeaseLost(f"the lease of message {self.id} of {self.queue.name!r} ran out")

    async def ack(self) -> None:
        self._check_lease()
        await self._msg.ack_sync(timeout=self.queue.client.timeout)
        self._settle()

    async def ack_as_get(self) -> None:
        """Ack it as a get takes its message: its task is left for a
        ``task_done`` (tasks.py), as the local ``ack(as_get=True)`` leaves it."""
        (failed,) = await self.queue.tasks.acked_as_got([self.ack])
        if failed is not None:
            raise failed

    async def release(self, delay: float = 0) -> None:
        self._check_lease()
        nak = b"-NAK" + (b' {"delay": %d}' % int(delay * 1e9) if delay else b"")
        await self._confirmed(nak)
        self._settle()

    async def _confirmed(self, verb: bytes) -> None:
        """Send an ack verb as a request: the server's reply says it took
        effect (a released message is ready again; a lease renewed), as the
        local broker's reply does, rather than a publish that may still be
        on its way when this returns."""
        client = self.queue.client
        await client.nc.request(self._msg.reply, verb, timeout=client.timeout)

    async def bury(self) -> None:
        """Set it aside until a kick (:mod:`.burial`: a copy, then the ack)."""
        if self.settled:
            raise LeaseLost(f"message {self.id} of {self.queue.name!r} was settled already")
        self._check_lease()
        await burial.bury(self.queue, self._msg)
        self._settle()

    async def touch(self, lease: float | None = None) -> None:
        """The lease starts again now, for ``lease`` seconds if given (else as long as before)."""
        validation.validate_lease(lease)
        self._check_lease()
        sent = time.monotonic()
        await self._confirmed(b"+WPI")
        if lease is not None:
            self.lease = lease
        self.lease_expires = sent + self.lease
        if self.lease != self._ack_wait and (self._keeper is None or self._keeper.done()):
            self._keeper = asyncio.get_running_loop().create_task(self._keep_lease())

    async def __aenter__(self) -> AsyncNatsMessage:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        await settle_on_async_exit(self, failed=exc_type is not None)


class NatsReserving:
    """What :meth:`AsyncNatsQueue.reserve` returns: awaited, or with ``async with``."""

    def __init__(self, reserving: Coroutine[Any, Any, AsyncNatsMessage]) -> None:
        self._reserving = reserving
        self.message: AsyncNatsMessage | None = None

    def __await__(self) -> Generator[Any, None, AsyncNatsMessage]:
        return self._reserving.__await__()

    async def __aenter__(self) -> AsyncNatsMessage:
        self.message = await self._reserving
        return self.message

    async def __aexit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        assert self.message is not None
        await self.message.__aexit__(exc_type)
