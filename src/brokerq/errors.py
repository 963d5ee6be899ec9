"""The exceptions of brokerq's public API.

Every error that leaves the public API is a :class:`BrokerqError`; no bare
``OSError`` or msgspec error escapes. Errors that the broker reports on the
wire carry a stable string code (see ``docs/protocol.md``); :data:`BY_CODE`
maps each code to the exception a client raises for it.
"""

from __future__ import annotations

import queue as _stdlib_queue


class BrokerqError(Exception):
    """Base class of every error brokerq raises."""

    code = "error"


class Empty(BrokerqError, _stdlib_queue.Empty):
    """No message arrived within the timeout (or the queue is empty).

    Also a :class:`queue.Empty`, so ``except queue.Empty:`` code works.
    """

    code = "empty"


class Full(BrokerqError, _stdlib_queue.Full):
    """The queue stayed full until the timeout. Also a :class:`queue.Full`."""

    code = "full"


class QueueFull(Full):
    """The queue is at its maxsize or max_bytes: the put may wait for room.

    The broker's core raises it, and the broker answers it with the wire
    code ``full``, so a client raises plain :class:`Full` for it (as for the
    broker's total limit and a full disk); ``except Full`` catches both.
    """


class MessageTooLarge(BrokerqError):
    """A body is larger than the broker's ``max_message_size``."""

    code = "too_large"


class InvalidRequest(BrokerqError, ValueError):
    """An argument was refused: a bad queue name, a negative timeout, ...

    Also a :class:`ValueError`, since that is what it is.
    """

    code = "invalid"


class BrokerUnavailable(BrokerqError):
    """No broker could be reached or started within the deadline."""

    code = "unavailable"


class ConnectionLost(BrokerUnavailable):
    """The broker closed the connection or died (EOF, ECONNRESET, EPIPE).

    The request may or may not have taken effect. The clients send a
    request again on a new connection where that is safe, within their
    ``timeout`` (see docs/guarantees.md); this escapes at once from those
    never sent again (``ack``, ``release``, ``bury``, ``touch``,
    ``task_done``), and from the others once those tries failed too.
    """


class BrokerBusy(BrokerUnavailable):
    """The broker already serves its maximum of connections (``--max-connections``).

    It answered this connection with ``busy`` and closed it; the ones it
    serves are unaffected. Close idle clients, or start the broker with a
    higher ``--max-connections``.
    """

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
    """The broker speaks another protocol version than this client.

    ``broker_version`` is the version the broker said it speaks (None if it
    did not say). A client that finds an *older* broker retires it and
    starts its own (see docs/protocol.md, "Versioning rules"); a newer
    broker is left alone and this error is raised.
    """

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
    """A live subscriber fell too far behind the publishers and was dropped.

    The broker keeps a bounded buffer of publishes per live subscriber; when
    a subscriber reads too slowly to keep it under the bound, the broker
    discards it, sends this error and closes the connection. Publishes made
    meanwhile are not replayed: use a durable (queue) subscription for that.
    """

    code = "overflow"


class JoinTimeout(BrokerqError, TimeoutError):
    """``join(timeout=...)`` ran out before the queue's tasks were all done.

    Also the builtin :class:`TimeoutError` (so an ``OSError`` too), as a
    timed-out wait usually is; the stdlib's ``queue.Queue.join`` has no
    timeout to copy.
    """

    code = "timeout"


class InternalError(BrokerqError):
    """The broker hit a bug; its log has the details."""

    code = "internal"


BY_CODE: dict[str, type[BrokerqError]] = {
    "empty": Empty,
    "full": Full,
    "too_large": MessageTooLarge,
    "invalid": InvalidRequest,
    "permission": PermissionDenied,
    # Both mean the broker judged *our* bytes bad: a local protocol error.
    "bad_request": LocalProtocolError,
    "bad_frame": LocalProtocolError,
    "version": VersionMismatch,
    "lease_lost": LeaseLost,
    "shutting_down": ShuttingDown,
    "overflow": SubscriberOverflow,
    "busy": BrokerBusy,
    "timeout": JoinTimeout,
    "internal": InternalError,
}


def from_code(code: str, message: str) -> BrokerqError:
    """The exception for an error reply; unknown codes become a BrokerqError."""
    cls = BY_CODE.get(code, BrokerqError)
    return cls(message)
