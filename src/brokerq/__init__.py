"""brokerq: a local message queue for Unix that needs no daemon.

Name a socket path, enqueue, dequeue; the first client to find no broker
there starts one. Importing this package loads the blocking client only
(no trio, no anyio), so a client starts fast; the async client
(:func:`open_async_client`) is loaded on first use of its names::

    import brokerq

    jobs = brokerq.Queue("jobs")          # default broker, spawned on demand
    jobs.put(b"resize 1.png")
    body = jobs.get(timeout=5)            # raises brokerq.Empty on timeout
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .client.blocking import Client, Message, Queue, Subscription, connect
from .errors import (
    BrokerBusy,
    BrokerqError,
    BrokerUnavailable,
    ConnectionLost,
    Empty,
    Full,
    InternalError,
    InvalidRequest,
    JoinTimeout,
    LeaseLost,
    LocalProtocolError,
    MessageTooLarge,
    NotSupported,
    PermissionDenied,
    ProtocolError,
    QueueFull,
    RemoteProtocolError,
    ShuttingDown,
    SubscriberOverflow,
    VersionMismatch,
)
from .spawn import default_socket_path
from .version import __version__

if TYPE_CHECKING:
    from .client.asynchronous import (
        AsyncClient,
        AsyncMessage,
        AsyncQueue,
        AsyncSubscription,
        open_async_client,
    )

#: Names of the async client (brokerq.client.asynchronous), imported (with anyio) on first use.
_ASYNC_NAMES = frozenset(
    {"AsyncClient", "AsyncMessage", "AsyncQueue", "AsyncSubscription", "open_async_client"}
)


def __getattr__(name: str) -> Any:
    if name in _ASYNC_NAMES:
        from .client import asynchronous as async_client

        return getattr(async_client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AsyncClient",
    "AsyncMessage",
    "AsyncQueue",
    "AsyncSubscription",
    "BrokerBusy",
    "BrokerUnavailable",
    "BrokerqError",
    "Client",
    "ConnectionLost",
    "Empty",
    "Full",
    "InternalError",
    "InvalidRequest",
    "JoinTimeout",
    "LeaseLost",
    "LocalProtocolError",
    "Message",
    "MessageTooLarge",
    "NotSupported",
    "PermissionDenied",
    "ProtocolError",
    "Queue",
    "QueueFull",
    "RemoteProtocolError",
    "ShuttingDown",
    "SubscriberOverflow",
    "Subscription",
    "VersionMismatch",
    "__version__",
    "connect",
    "default_socket_path",
    "open_async_client",
]
