"""brokerq: a local message queue for Unix that needs no daemon.

Name a socket path, enqueue, dequeue; the first client to find no broker
there starts one. Importing this package loads the blocking client only
(no trio), so a client starts fast::

    import brokerq

    jobs = brokerq.Queue("jobs")          # default broker, spawned on demand
    jobs.put(b"resize 1.png")
    body = jobs.get(timeout=5)            # raises brokerq.Empty on timeout
"""

from __future__ import annotations

__version__ = "0.1.0"

from .client import Client, Message, Queue, connect
from .errors import (
    BrokerqError,
    BrokerUnavailable,
    Empty,
    Full,
    InternalError,
    InvalidRequest,
    LeaseLost,
    LocalProtocolError,
    MessageTooLarge,
    PermissionDenied,
    ProtocolError,
    RemoteProtocolError,
    ShuttingDown,
    VersionMismatch,
)
from .spawn import default_socket_path

__all__ = [
    "BrokerUnavailable",
    "BrokerqError",
    "Client",
    "Empty",
    "Full",
    "InternalError",
    "InvalidRequest",
    "LeaseLost",
    "LocalProtocolError",
    "Message",
    "MessageTooLarge",
    "PermissionDenied",
    "ProtocolError",
    "Queue",
    "RemoteProtocolError",
    "ShuttingDown",
    "VersionMismatch",
    "__version__",
    "connect",
    "default_socket_path",
]
