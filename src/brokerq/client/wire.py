"""One connection's rules, sans-IO: a request (:class:`Call`), its frames and
the judging of its reply (:class:`Wire`), and the deadlines of its attempts
(:class:`Attempts`). The drivers bring the sockets and the clock.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Generic, NoReturn, TypeVar

from .. import protocol
from ..errors import (
    BrokerqError,
    BrokerUnavailable,
    LocalProtocolError,
    RemoteProtocolError,
    ShuttingDown,
    VersionMismatch,
    from_code,
)
from ..errors import ConnectionLost as _ConnectionLost

ConnectionLost = _ConnectionLost  # (the clients import brokerq.ConnectionLost from here)

R = TypeVar("R", bound=protocol.Reply)

#: Error codes after which the broker closes the connection (docs/protocol.md).
CLOSING_CODES = frozenset(
    {"bad_frame", "version", "permission", "shutting_down", "overflow", "busy"}
)


class BrokerStopping(ConnectionLost, ShuttingDown):
    """The broker answered ``shutting_down``: it is stopping and did not carry
    the request out. To the clients it is a lost connection (a stop is no
    worse than a crash); since the request was not carried out, even a
    ``task_done`` is sent again."""


@dataclass(frozen=True, slots=True)
class Call(Generic[R]):
    """One request to make: what to send, what to expect back, how long it may take.

    ``wait``: how long the broker may take by the request's own terms (a
    get's timeout; None: for ever; 0: never waits). ``retry``: whether a
    lost connection sends it again; ``resend_refused``: whether a
    :class:`BrokerStopping` refusal does all the same."""

    expect: type[R]
    kind: type[protocol.Request]
    wait: float | None
    fields: dict[str, Any] = field(default_factory=dict)
    retry: bool = True
    resend_refused: bool = False

    def with_timeout(self, timeout: float | None) -> Call[R]:
        return replace(self, wait=timeout, fields={**self.fields, "timeout": timeout})


class Attempts:
    """The deadlines of one call and of its retries after a lost connection:
    the call's ``wait`` plus ``grace`` (the client's timeout; without a
    ``wait``, ``grace`` from the loss), a get asking for what is left of its timeout.
    """

    def __init__(self, call: Call[Any], grace: float, now: float) -> None:
        self.call = call
        self.grace = grace
        self.fields = call.fields  # (copied only if a retry changes its timeout)
        self.deadline = None if call.wait is None else now + call.wait + grace
        timeout = call.fields.get("timeout")
        self.request_deadline = None if timeout is None else now + timeout
        self.retry_until = self.deadline
        self.started = now

    def wait_from(self, now: float) -> float | None:
        """The deadline (None: none) of the reply to a call sent earlier (a
        put in a window), waited for from ``now``: at least ``grace`` from now."""
        if self.deadline is not None:
            self.deadline = max(self.deadline, now + self.grace)
        return self.deadline

    def retry_from(self, began: float) -> None:
        """The caller began to wait for this call, sent earlier, at ``began``:
        it may be sent again until ``grace`` after that at least."""
        if self.retry_until is not None and self.deadline is not None:
            self.retry_until = max(self.retry_until, began + self.grace)

    def start(self, now: float) -> float | None:
        """An attempt begins: how long its exchange may take (None: no bound)."""
        self.started = now
        return None if self.deadline is None else max(self.deadline - now, 0.001)

    def again(self, now: float, cause: ConnectionLost | None = None) -> bool:
        """The attempt lost its connection (``cause``: what said so, maybe a
        :class:`BrokerStopping`): may the call be sent again?"""
        if self.deadline is None and (self.retry_until is None or now - self.started > self.grace):
            # No deadline of its own (it may wait for ever): reconnecting
            # may take the grace, counted from this loss.
            self.retry_until = now + self.grace
        assert self.retry_until is not None
        resend = self.call.retry or (self.call.resend_refused and isinstance(cause, BrokerStopping))
        if not resend or now >= self.retry_until:
            return False
        if self.request_deadline is not None:
            self.fields = self.fields | {"timeout": max(0.0, self.request_deadline - now)}
        return True


class Wire:
    """The sans-IO half of a connection: request ids, frames out, replies in.
    A reply to another request, or of the wrong kind, puts it out of step for
    good: every request waiting on it fails at once too (:meth:`out_of_step`).
    """

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.reader = protocol.FrameReader(protocol.HANDSHAKE_FRAME_LIMIT)
        self.next_id = 1
        self.out = bytearray()
        self.hello: protocol.HelloReply | None = None
        #: Why the connection went out of step (None: it did not).
        self.failure: RemoteProtocolError | None = None

    def greeted(self, hello: protocol.HelloReply) -> None:
        """The broker's hello reply: its limits now apply."""
        self.hello = hello
        self.reader.max_frame_size = hello.max_frame_size

    def encode(self, kind: type[protocol.Request], fields: dict[str, Any]) -> int:
        """Encode one request into :attr:`out`; return its id."""
        request_id = self.next_id
        self.next_id += 1
        self.out.clear()
        protocol.append_frame(self.out, kind(id=request_id, **fields))
        if len(self.out) - protocol.HEADER_SIZE > self.reader.max_frame_size:
            raise LocalProtocolError(
                f"a {kind.__name__} request of {len(self.out)} bytes is over the broker's "
                f"frame limit of {self.reader.max_frame_size}"
            )
        return request_id

    def feed(self, data: bytes) -> None:
        if not data:
            raise ConnectionResetError("the broker closed the connection")
        self.reader.feed(data)

    def next_reply(self) -> protocol.AnyReply | None:
        """The next whole reply received, or None until more bytes come."""
        payload = self.reader.next_frame()
        return None if payload is None else protocol.decode_reply(payload)

    def check(
        self, expect: type[R], request_id: int, reply: protocol.AnyReply, close: Callable[[], None]
    ) -> R:
        """Return ``reply`` if it answers request ``request_id`` as expected,
        else raise its error (or RemoteProtocolError), calling ``close``
        first if the connection cannot be used any more."""
        if reply.id != request_id and not (isinstance(reply, protocol.Error) and reply.id == 0):
            self.fail(f"reply id {reply.id} does not match request {request_id}", close)
        if isinstance(reply, protocol.Error):
            if reply.id == 0 or reply.code in CLOSING_CODES:
                close()  # the broker closes these connections
            if reply.code == "version":
                raise VersionMismatch(reply.message, reply.version)
            if refused(reply):
                raise BrokerStopping(reply.message)
            raise from_code(reply.code, reply.message)
        if not isinstance(reply, expect):
            self.fail(f"expected a {expect.__name__}, got {reply!r}", close)
        return reply

    def fail(self, message: str, close: Callable[[], None]) -> NoReturn:
        """The connection is out of step: keep why, close it, and raise."""
        self.failure = RemoteProtocolError(message)
        close()
        raise self.failure

    def out_of_step(self) -> RemoteProtocolError | None:
        """What a request still waiting raises once the connection went out of
        step (a new error, with the first one's message); None if it did not."""
        if self.failure is None:
            return None
        return RemoteProtocolError(f"the connection went out of step: {self.failure}")

    def timed_out(self, wait: float | None) -> BrokerUnavailable:
        return BrokerUnavailable(
            f"the broker at {self.socket_path} did not answer within {wait or 0:.3g} s"
        )

    def lost(self, exc: BaseException) -> ConnectionLost:
        return ConnectionLost(f"lost the connection to the broker at {self.socket_path}: {exc}")


def refused(reply: protocol.AnyReply) -> bool:
    """Whether ``reply`` is a stopping broker's refusal (:class:`BrokerStopping`)."""
    return isinstance(reply, protocol.Error) and reply.code == ShuttingDown.code


def unreachable(socket_path: str, exc: OSError) -> BrokerUnavailable:
    return BrokerUnavailable(f"cannot reach the broker at {socket_path}: {exc}")


def not_stopped(socket_path: str, timeout: float) -> BrokerUnavailable:
    return BrokerUnavailable(f"the broker at {socket_path} did not exit within {timeout:g} s")


def closed_client() -> BrokerqError:
    return BrokerqError("the client is closed")


def closed_subscription(topic: str, overflowed: bool) -> BrokerqError:
    """What a closed live subscription raises: closed by its owner, or
    dropped by the broker (said once as SubscriberOverflow, then this)."""
    if overflowed:
        return BrokerqError(
            f"the subscription to {topic!r} was dropped by the broker for reading too slowly;"
            " subscribe again"
        )
    return BrokerqError(f"the subscription to {topic!r} is closed")
