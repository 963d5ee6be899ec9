"""brokerq: a local message queue for Unix that needs no daemon.

Name a socket path, enqueue, dequeue; the first client to find no broker
there starts one. Importing this package loads the blocking client only
(no trio, no anyio), so a client starts fast; the async client
(:func:`open_async_client`) is loaded on first use of its names::

    import brokerq

    jobs = brokerq.Queue("jobs")          # default broker, spawned on demand
    jobs.put(b"resize 1.png")
    body = jobs.get(timeout=5)            # raises brokerq.Empty on timeout

A ``nats://`` URL instead of a socket path (or ``$BROKERQ_URL`` when the
code names none) gives the same API on NATS JetStream (:mod:`brokerq.nats`,
docs/nats.md), for work that spans machines; brokerq.nats and nats-py are
imported only then.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any

from .client import blocking as _local
from .client.blocking import Client, Message, Queue, Subscription
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
    )
    from .nats import AsyncNatsClient, NatsClient, NatsQueue

#: Names of the async client (brokerq.client.asynchronous), imported (with anyio) on first use.
_ASYNC_NAMES = frozenset({"AsyncClient", "AsyncMessage", "AsyncQueue", "AsyncSubscription"})

#: The URL schemes of the NATS backend.
_NATS_SCHEMES = ("nats://", "tls://")


def _nats_url(socket: str | os.PathLike[str] | None) -> str | None:
    """The NATS URL a call selects, or None for the local broker.

    A ``socket`` named explicitly wins: a ``nats://`` URL there is NATS, a
    path the local broker. With none named, ``$BROKERQ_URL`` (when set)
    selects NATS, before ``$BROKERQ_SOCKET``: one variable moves an
    application that names no broker.
    """
    if socket is not None:
        text = os.fspath(socket)
        return text if text.startswith(_NATS_SCHEMES) else None
    url = os.environ.get("BROKERQ_URL")
    if not url:
        return None
    if not url.startswith(_NATS_SCHEMES):
        raise InvalidRequest(f"BROKERQ_URL must be a nats:// or tls:// URL, not {url!r}")
    return url


def connect(
    socket: str | os.PathLike[str] | None = None,
    timeout: float = _local.DEFAULT_TIMEOUT,
    *,
    put_window: int | None = None,
    prefetch: int | None = None,
) -> Client | NatsClient:
    """A blocking client, connected now: of the local broker at ``socket`` (a
    path; default ``$BROKERQ_SOCKET`` or the per-user path), or of NATS when
    ``socket`` is a ``nats://`` URL or, naming none, ``$BROKERQ_URL`` is set."""
    url = _nats_url(socket)
    if url is None:
        return _local.connect(socket, timeout, put_window=put_window, prefetch=prefetch)
    from . import nats

    return nats.connect(url, timeout, put_window=put_window, prefetch=prefetch)


def _open_async_client(
    socket: str | os.PathLike[str] | None = None,
    timeout: float = _local.DEFAULT_TIMEOUT,
    *,
    prefetch: int | None = None,
) -> AsyncClient | AsyncNatsClient:
    """An async client (``async with`` connects), routed as :func:`connect`.
    The NATS one runs under asyncio only (nats-py)."""
    url = _nats_url(socket)
    if url is None:
        from .client import asynchronous

        return asynchronous.open_async_client(socket, timeout, prefetch=prefetch)
    from . import nats

    return nats.AsyncNatsClient(url, timeout, prefetch=prefetch)


if TYPE_CHECKING:
    open_async_client = _open_async_client  # (at run time: __getattr__, loading anyio)


def _route_queue(name: str, socket: str | os.PathLike[str] | None) -> NatsQueue | None:
    """``Queue(name)`` with no client: on NATS when ``socket`` is a ``nats://``
    URL or, naming none, ``$BROKERQ_URL`` is set (the hook of
    brokerq.client.blocking.Queue); None: the local broker."""
    url = _nats_url(socket)
    return None if url is None else _nats_queue(url, name)


_local.queue_router = _route_queue

_nats_clients: dict[str, NatsClient] = {}
_nats_clients_lock = threading.Lock()


def _nats_queue(url: str, name: str) -> NatsQueue:
    """One client per URL for ``Queue(name)`` without a client, as the local one per path."""
    from . import nats

    with _nats_clients_lock:
        client = _nats_clients.get(url)
        if client is None or client.closed:
            client = _nats_clients[url] = nats.NatsClient(url)
    return client.queue(name)


def __getattr__(name: str) -> Any:
    if name == "open_async_client":
        # (the async client's module, and anyio, on first use of the name, as before)
        from .client import asynchronous as _async_client  # noqa: F401

        return _open_async_client
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
