"""A client's settings, its put keys and the put window of a blocking client, sans-IO."""

from __future__ import annotations

import itertools
import math
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from .. import protocol, validation
from ..errors import InvalidRequest
from .wire import Attempts, Call, Wire, refused


class PutKeys:
    """Put keys: an 8-byte random prefix per client (and process), then a counter."""

    def __init__(self) -> None:
        self.prefix = os.urandom(8)
        self.counter = itertools.count()

    def take(self, n: int) -> list[bytes]:
        prefix, counter = self.prefix, self.counter
        return [prefix + next(counter).to_bytes(8, "big") for _ in range(n)]


PUT_WINDOW_VARIABLE = "BROKERQ_PUT_WINDOW"


def put_window(value: int | None) -> int:
    """``value``, or with None ``$BROKERQ_PUT_WINDOW`` (unset or empty: 0, off)."""
    return _count_setting(value, "put_window", PUT_WINDOW_VARIABLE, "puts")


#: A client's timeout: the deadline for connecting, and each reply's grace.
DEFAULT_TIMEOUT = 10.0


def client_timeout(timeout: float) -> tuple[float, bool]:
    """A client's ``timeout`` as (the grace every reply gets, whether it may
    start a broker). 0 is the ``_nowait`` form of connecting: only a broker
    already running is used; its replies get the default grace."""
    if not validation.is_number(timeout) or not 0 <= timeout < math.inf:
        raise InvalidRequest(
            f"timeout must be a number of seconds >= 0 (0: only a running broker), not {timeout!r}"
        )
    if timeout == 0:
        return DEFAULT_TIMEOUT, False
    return float(timeout), True


PREFETCH_VARIABLE = "BROKERQ_PREFETCH"


def prefetch(value: int | None) -> int:
    """``value``, or with None ``$BROKERQ_PREFETCH`` (unset or empty: 0, off)."""
    return _count_setting(value, "prefetch", PREFETCH_VARIABLE, "messages")


def _count_setting(value: int | None, name: str, variable: str, unit: str) -> int:
    """An opt-in count (0: off): ``value``, else the environment's; InvalidRequest if bad."""
    if value is None:
        name, raw = variable, os.environ.get(variable, "").strip()
        try:
            value = int(raw) if raw else 0
        except ValueError:
            raise InvalidRequest(f"{name} must be a whole number of {unit}, not {raw!r}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{name} is a number of {unit}, not {value!r}")
    if value < 0:
        raise InvalidRequest(f"{name} must be 0 or more, not {value}")
    return value


@dataclass(slots=True)
class Unacknowledged:
    """A put (or put_many) sent in a window whose reply has not been read,
    and the id of the request that last carried it."""

    attempts: Attempts
    request_id: int = 0


class PutWindow:
    """The puts of one thread sent without waiting for their replies, in order:
    the first :attr:`sent` went out on :attr:`conn`, a new connection gets all again."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.pending: deque[Unacknowledged] = deque()
        self.conn: object = None
        self.sent = 0
        self._latest: float | None = 0.0  # the latest reply deadline; None: for ever

    def __len__(self) -> int:
        return len(self.pending)

    def add(self, call: Call[protocol.PutReply] | Call[protocol.PutManyReply], now: float) -> None:
        attempts = Attempts(call, self.grace, now)
        if attempts.deadline is None or self._latest is None:
            self._latest = None
        else:
            self._latest = max(self._latest, attempts.deadline)
        self.pending.append(Unacknowledged(attempts))

    def encode_unsent(self, conn: object, wire: Wire, now: float) -> bytes | bytearray:
        """The frames of the puts not yet sent on ``conn``, encoded on ``wire``.
        They count as sent from now on: if sending fails, the connection is
        lost or closed, and a new one gets them all again."""
        if conn is not self.conn:
            self.conn = conn
            self.sent = 0
        unsent = len(self.pending) - self.sent
        if unsent == 0:
            return b""
        entries = list(itertools.islice(reversed(self.pending), unsent))
        entries.reverse()  # (the last ``unsent``, without walking the whole window)
        out = bytearray()
        for entry in entries:
            entry.request_id = wire.encode(entry.attempts.call.kind, entry.attempts.fields)
            entry.attempts.start(now)
            out += wire.out
        self.sent = len(self.pending)
        return out

    def send_deadline(self, now: float) -> float | None:
        """How long sending may block: the broker reads on once it has answered
        the puts ahead, so the latest of their reply deadlines, and at least
        ``grace`` from now (None: no bound)."""
        return None if self._latest is None else max(self._latest, now + self.grace)

    def reply_deadline(self, now: float) -> float | None:
        """The deadline of the first put's reply, waited for from ``now``."""
        return self.pending[0].attempts.wait_from(now)

    def answered(
        self, reply: protocol.AnyReply, wire: Wire, close: Callable[[], None]
    ) -> protocol.Reply:
        """The reply to the first put: it leaves the window (acknowledged, or
        its error raised, as :meth:`Wire.check` does), unless a stopping
        broker refused it: not carried out, it stays, to be sent again."""
        head = self.pending[0]
        if reply.id == head.request_id and not refused(reply):
            self.pending.popleft()
            self.sent -= 1
            if not self.pending:
                self._latest = 0.0
        expect: type[protocol.Reply] = head.attempts.call.expect
        return wire.check(expect, head.request_id, reply, close)

    def lost(self, began: float, now: float) -> bool:
        """The connection was lost (the caller began to wait at ``began``):
        may every put be sent again (:meth:`Attempts.again`)?"""
        self.conn = None
        self.sent = 0
        allowed = True
        for entry in self.pending:
            entry.attempts.retry_from(began)
            allowed = entry.attempts.again(now) and allowed
        return allowed
