"""What a consumer does with a fetched message: the decisions, given the time.

Sans-IO: the headers, JetStream's delivery count and the clock go in, a
:class:`Verdict` comes out; :mod:`.aio` carries it out. Kept apart so the
rules are tested without a server (tests/integrations/test_nats_unit.py).

Delay and ttl are headers (``Bq-Not-Before``, ``Bq-Expires``: unix seconds)
honoured here, on the consumer side, so servers before 2.11 (which have no
per-message TTL or scheduling) behave as the local broker does.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

NOT_BEFORE = "Bq-Not-Before"
EXPIRES = "Bq-Expires"
MSG_ID = "Nats-Msg-Id"
DEFAULT_MAX_DELIVERIES = 20  # the local broker's default (broker/config.py)
DEFAULT_LEASE = 30.0  # the local broker's default lease, seconds


class Action(enum.Enum):
    DELIVER = "deliver"  # hand it to the caller
    DEFER = "defer"  # not due yet: nak with the remaining delay
    EXPIRE = "expire"  # its ttl ran out: ack it away, never deliver it
    DEAD = "dead"  # out of deliveries: move to <queue>:dead, then ack


@dataclass(frozen=True)
class Verdict:
    action: Action
    #: For DEFER: the seconds until it is due.
    delay: float = 0.0


def put_headers(key: str, now: float, delay: float, ttl: float | None) -> dict[str, str]:
    """A put's headers: its key (JetStream drops a second put with the same
    key within the stream's duplicate window), and its delay and ttl as
    absolute times, so they hold whichever consumer sees the message."""
    headers = {MSG_ID: key}
    if delay > 0:
        headers[NOT_BEFORE] = repr(now + delay)
    if ttl is not None:
        headers[EXPIRES] = repr(now + delay + ttl)
    return headers


def _time(headers: Mapping[str, str] | None, name: str) -> float | None:
    value = (headers or {}).get(name)
    try:
        return None if value is None else float(value)
    except ValueError:
        return None  # not ours to judge: a message put by another program


def judge(
    headers: Mapping[str, str] | None,
    num_delivered: int,
    max_deliveries: int,
    now: float,
    *,
    dead_letters: bool = True,
) -> Verdict:
    """The verdict on a message JetStream delivered for the ``num_delivered``-th time.

    Order matters: an expired message is dropped before anything else (as
    the local broker drops it rather than dead-lettering it); a message not
    yet due is deferred and never dead-lettered (its early deliveries are
    not attempts: only those made when it was due count, see
    :func:`attempt`); a due message past ``max_deliveries`` moves to the
    dead letters (``dead_letters`` is False on a ``:dead`` queue itself).
    """
    expires = _time(headers, EXPIRES)
    if expires is not None and expires <= now:
        return Verdict(Action.EXPIRE)
    not_before = _time(headers, NOT_BEFORE)
    if not_before is not None and not_before > now:
        return Verdict(Action.DEFER, not_before - now)
    if dead_letters and attempt(headers, num_delivered) > max_deliveries:
        return Verdict(Action.DEAD)
    return Verdict(Action.DELIVER)


def attempt(headers: Mapping[str, str] | None, num_delivered: int) -> int:
    """The attempt a delivery is (1 on the first), as the local Message's ``attempt``.

    A delayed message is usually seen once before it is due and deferred;
    that delivery is not an attempt, so one is taken off (JetStream counts
    it, and keeps no other count we could use). So a delayed message gets
    at most one attempt more than ``max_deliveries`` (when it was first seen
    already due), or fewer (when clients' clocks disagree and it is deferred
    twice): it reaches its dead letters a little early or late, never lost.
    """
    early = 1 if _time(headers, NOT_BEFORE) is not None and num_delivered > 1 else 0
    return max(1, num_delivered - early)


def fetch_wait(remaining: float | None, chunk: float = 5.0) -> float:
    """How long one pull request waits: the time left, at most ``chunk`` (a
    wait for ever is a loop of bounded pulls, so a lost connection is seen)."""
    return chunk if remaining is None else max(0.001, min(chunk, remaining))
