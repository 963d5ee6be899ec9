"""The exceptions of brokerq's public API (docs/usage.md, "Errors").

Every error that leaves the public API is a :class:`BrokerqError`. An error
the broker reports on the wire carries a stable ``code`` (docs/protocol.md);
:data:`BY_CODE` maps each to the exception a client raises for it.
"""

from __future__ import annotations

import queue as _stdlib_queue
from typing import Any, ClassVar


class BrokerqError(Exception):
    """Base class of every error brokerq raises; a subclass names its wire
    ``code`` as a class keyword, or inherits its parent's."""

    code: ClassVar[str] = "error"

    def __init_subclass__(cls, code: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if code is not None:
            cls.code = code


class Empty(BrokerqError, _stdlib_queue.Empty, code="empty"):
    """No message within the timeout; also a queue.Empty, so ``except queue.Empty:`` works."""


class Full(BrokerqError, _stdlib_queue.Full, code="full"):
    """The queue stayed full until the timeout; also a queue.Full."""


class QueueFull(Full):
    """The queue is at its maxsize or max_bytes: the put may wait for room.
    The core raises it; on the wire it is ``full``, so a client raises plain Full."""


class MessageTooLarge(BrokerqError, code="too_large"):
    """A body is larger than the broker's ``max_message_size``."""


class InvalidRequest(BrokerqError, ValueError, code="invalid"):
    """An argument was refused: a bad queue name, a negative timeout, ..."""


class BrokerUnavailable(BrokerqError, code="unavailable"):
    """No broker could be reached or started within the deadline."""


class ConnectionLost(BrokerUnavailable):
    """The broker closed the connection or died (EOF, ECONNRESET, EPIPE): the
    request may or may not have taken effect (docs/guarantees.md)."""


class BrokerBusy(BrokerUnavailable, code="busy"):
    """The broker already serves its ``--max-connections`` and refused this connection."""


class PermissionDenied(BrokerqError, code="permission"):
    """The socket directory is unsafe, or the peer runs as another user."""


class ProtocolError(BrokerqError, code="protocol"):
    """The protocol was broken; see the two sides below."""


class LocalProtocolError(ProtocolError, code="bad_request"):
    """This side misused the protocol (as judged by itself or by the peer)."""


class RemoteProtocolError(ProtocolError, code="bad_frame"):
    """The peer sent bytes that are not a valid frame or reply."""


class VersionMismatch(ProtocolError, code="version"):
    """The broker speaks another protocol version (``broker_version``, None if
    it did not say). A client retires an *older* broker and starts its own
    (docs/protocol.md, "Versioning rules"); for a newer one it raises this."""

    def __init__(self, message: str, broker_version: int | None = None) -> None:
        super().__init__(message)
        self.broker_version = broker_version


class LeaseLost(BrokerqError, code="lease_lost"):
    """A lease verb came after the lease ran out (the message was redelivered)."""


class ShuttingDown(BrokerUnavailable, code="shutting_down"):
    """The broker is stopping and takes no new work."""


class SubscriberOverflow(BrokerqError, code="overflow"):
    """A live subscriber fell too far behind the publishers and was dropped."""


class JoinTimeout(BrokerqError, TimeoutError, code="timeout"):
    """``join(timeout=...)`` ran out before the queue's tasks were all done."""


class InternalError(BrokerqError, code="internal"):
    """The broker hit a bug; its log has the details."""


class NotSupported(BrokerqError):
    """What the backend cannot do, named: a broker older than this client that
    refused a request it does not know (a ``bad_request`` to ``get_any``, say:
    ``brokerq stop`` makes way for this version's), or a feature the NATS
    backend lacks (docs/nats.md). Raised by the client, not sent on the wire."""


#: The exception a client raises for each wire code. ``bad_frame`` (the broker's
#: RemoteProtocolError) means it judged *our* bytes bad, as ``bad_request`` does.
# fmt: off
BY_CODE: dict[str, type[BrokerqError]] = {
    cls.code: cls
    for cls in (
        Empty, Full, MessageTooLarge, InvalidRequest, LeaseLost, PermissionDenied,
        LocalProtocolError, VersionMismatch, ShuttingDown, BrokerBusy, SubscriberOverflow,
        JoinTimeout, InternalError,
    )
}
# fmt: on
BY_CODE["bad_frame"] = LocalProtocolError


def from_code(code: str, message: str) -> BrokerqError:
    """The exception for an error reply; unknown codes become a BrokerqError."""
    return BY_CODE.get(code, BrokerqError)(message)
