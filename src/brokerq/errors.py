"""The exceptions of brokerq's public API (docs/usage.md, "Errors").

Every error that leaves the public API is a :class:`BrokerqError`; no bare
``OSError`` or msgspec error escapes. An error the broker reports on the
wire carries a stable ``code`` (docs/protocol.md); :data:`BY_CODE` maps each
to the exception a client raises for it.
"""

from __future__ import annotations

import queue as _stdlib_queue


class BrokerqError(Exception):
    """Base class of every error brokerq raises."""

    code = "error"


class Empty(BrokerqError, _stdlib_queue.Empty):
    """No message arrived within the timeout (or the queue is empty); also a
    :class:`queue.Empty`, so ``except queue.Empty:`` code works."""

    code = "empty"


class Full(BrokerqError, _stdlib_queue.Full):
    """The queue stayed full until the timeout. Also a :class:`queue.Full`."""

    code = "full"


class QueueFull(Full):
    """The queue is at its maxsize or max_bytes: the put may wait for room.

    The broker's core raises it; on the wire it is ``full``, so a client
    raises plain :class:`Full` (as for the broker's total limit and a full
    disk); ``except Full`` catches both.
    """


class MessageTooLarge(BrokerqError):
    """A body is larger than the broker's ``max_message_size``."""

    code = "too_large"


class InvalidRequest(BrokerqError, ValueError):
    """An argument was refused: a bad queue name, a negative timeout, ...
    Also a :class:`ValueError`, since that is what it is."""

    code = "invalid"


class BrokerUnavailable(BrokerqError):
    """No broker could be reached or started within the deadline."""

    code = "unavailable"


class ConnectionLost(BrokerUnavailable):
    """The broker closed the connection or died (EOF, ECONNRESET, EPIPE).

    The request may or may not have taken effect. The clients send it again
    on a new connection where that is safe (docs/guarantees.md); this
    escapes at once from the lease verbs and ``task_done``, never sent again,
    and from the others once those tries failed too.
    """


class BrokerBusy(BrokerUnavailable):
    """The broker already serves its ``--max-connections``: it answered this
    connection ``busy`` and closed it. Close idle clients, or raise the limit."""

    code = "busy"


class PermissionDenied(BrokerqError):
    """The socket directory is unsafe, or the peer runs as another user."""

    code = "permission"


class ProtocolError(BrokerqError):
    """The protocol was broken; see the two sides below."""

    code = "protocol"


class LocalProtocolError(ProtocolError):
    """This side misused the protocol (as judged by itself or by the peer)."""

    code = "bad_request"


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that are not a valid frame or reply."""

    code = "bad_frame"


class VersionMismatch(ProtocolError):
    """The broker speaks another protocol version (``broker_version``, None if
    it did not say). A client retires an *older* broker and starts its own
    (docs/protocol.md, "Versioning rules"); for a newer one it raises this."""

    code = "version"

    def __init__(self, message: str, broker_version: int | None = None) -> None:
        super().__init__(message)
        self.broker_version = broker_version


class LeaseLost(BrokerqError):
    """A lease verb came after the lease ran out (the message was redelivered)."""

    code = "lease_lost"


class ShuttingDown(BrokerUnavailable):
    """The broker is stopping and takes no new work."""

    code = "shutting_down"


class SubscriberOverflow(BrokerqError):
    """A live subscriber fell too far behind the publishers and was dropped
    (the broker holds a bounded buffer for each). What was published
    meanwhile is not replayed: a durable (queue) subscription keeps it."""

    code = "overflow"


class JoinTimeout(BrokerqError, TimeoutError):
    """``join(timeout=...)`` ran out before the queue's tasks were all done.
    Also the builtin :class:`TimeoutError`, as a timed-out wait usually is."""

    code = "timeout"


class InternalError(BrokerqError):
    """The broker hit a bug; its log has the details."""

    code = "internal"


#: The exception a client raises for each wire code. ``bad_request`` and
#: ``bad_frame`` both mean the broker judged *our* bytes bad: a local
#: protocol error (``bad_frame`` is the code of the RemoteProtocolError
#: the broker raised, from its side, for them).
BY_CODE: dict[str, type[BrokerqError]] = {
    cls.code: cls
    for cls in (
        Empty,
        Full,
        MessageTooLarge,
        InvalidRequest,
        LeaseLost,
        PermissionDenied,
        LocalProtocolError,
        VersionMismatch,
        ShuttingDown,
        BrokerBusy,
        SubscriberOverflow,
        JoinTimeout,
        InternalError,
    )
}
BY_CODE["bad_frame"] = LocalProtocolError


def from_code(code: str, message: str) -> BrokerqError:
    """The exception for an error reply; unknown codes become a BrokerqError."""
    return BY_CODE.get(code, BrokerqError)(message)
