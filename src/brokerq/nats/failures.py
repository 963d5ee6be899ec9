"""nats-py's exceptions as brokerq's: a caller catches the same errors on both backends.

A timeout or a lost connection is :class:`~brokerq.BrokerUnavailable` /
:class:`~brokerq.ConnectionLost` (the request may or may not have taken
effect, as on the local broker: a put is then retried with its key by
:mod:`.aio_queue` itself); a body over the server's max_payload is
:class:`~brokerq.MessageTooLarge`; any other JetStream refusal is a
:class:`~brokerq.BrokerqError` that says what the server said.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import nats.errors
import nats.js.errors

from ..errors import BrokerqError, BrokerUnavailable, ConnectionLost, MessageTooLarge, NotSupported

C = TypeVar("C", bound=type)
T = TypeVar("T")

_LOST = (
    nats.errors.ConnectionClosedError,
    nats.errors.NoServersError,
    nats.errors.StaleConnectionError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.ConnectionDrainingError,
)


#: No stream answered: it does not exist, or it has no leader just now.
NO_STREAM = (
    nats.errors.NoRespondersError,
    nats.js.errors.NoStreamResponseError,  # (nats-py's name for no responders to a publish)
)
#: No answer (a reconnect, a leader being elected) or no responder just now.
UNANSWERED = (
    TimeoutError,
    nats.errors.TimeoutError,
    nats.js.errors.ServiceUnavailableError,
    *NO_STREAM,
)

#: How long one request waits for its answer before it is sent again.
ATTEMPT = 2.0


async def asked_again(
    request: Callable[[], Awaitable[T]], within: float, attempt: float = ATTEMPT
) -> T:
    """``request()``, each attempt given ``attempt`` seconds, made again while
    no answer comes (UNANSWERED), for ``within`` seconds; then
    BrokerUnavailable, from the last attempt's error (asyncio's TimeoutError
    is no brokerq error). For a read, or a write whose second time changes
    nothing more (sent under one id, or the same record again)."""
    give_up = time.monotonic() + within
    while True:
        try:
            return await asyncio.wait_for(request(), attempt)
        except UNANSWERED as exc:
            if time.monotonic() >= give_up:
                raise BrokerUnavailable(f"NATS did not answer in time: {exc!r}") from exc
        await asyncio.sleep(0.05)


def brokerq_error(exc: nats.errors.Error) -> BrokerqError:
    """The brokerq exception that says what ``exc`` means to a caller."""
    if isinstance(exc, _LOST):
        return ConnectionLost(f"the connection to NATS was lost: {exc}")
    if isinstance(exc, nats.errors.TimeoutError):
        return BrokerUnavailable(f"NATS did not answer in time: {exc}")
    if isinstance(exc, nats.errors.MaxPayloadError):
        return MessageTooLarge(f"the body is over the NATS server's max_payload: {exc}")
    return BrokerqError(f"NATS refused the request: {exc}")


def _translating(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(method)
    async def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return await method(*args, **kwargs)
        except nats.errors.Error as exc:
            raise brokerq_error(exc) from exc

    return call


def translate_errors(cls: C) -> C:
    """Wrap every public coroutine method of ``cls`` so that it raises brokerq's errors."""
    for name, member in list(vars(cls).items()):
        if not name.startswith("_") and inspect.iscoroutinefunction(member):
            setattr(cls, name, _translating(member))
    return cls


def lacks(feature: str, why: str | None = None) -> NotSupported:
    """The refusal of what the NATS backend does not do, naming the feature and the backend."""
    because = f" ({why})" if why else ""
    return NotSupported(f"{feature} is not supported by the NATS backend{because}")
