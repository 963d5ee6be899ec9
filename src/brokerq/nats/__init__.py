"""brokerq's queue API on NATS JetStream, for work that spans machines (docs/nats.md).

``brokerq.connect("nats://host:4222")`` (or ``$BROKERQ_URL``) gives a
:class:`NatsClient`; ``brokerq.open_async_client("nats://...")`` an
:class:`AsyncNatsClient` (asyncio only). The same queue verbs as the local
broker; what JetStream cannot give raises ``brokerq.NotSupported``.
Needs nats-py: ``pip install 'brokerq[nats]'``.
"""

from __future__ import annotations

from .aio import AsyncNatsClient, AsyncNatsSubscription
from .aio_message import AsyncNatsMessage
from .aio_queue import AsyncNatsQueue
from .blocking import NatsClient, NatsMessage, NatsQueue, NatsSubscription, connect

__all__ = [
    "AsyncNatsClient",
    "AsyncNatsMessage",
    "AsyncNatsQueue",
    "AsyncNatsSubscription",
    "NatsClient",
    "NatsMessage",
    "NatsQueue",
    "NatsSubscription",
    "connect",
]
