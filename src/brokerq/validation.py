"""The rules of values both wings check: names, timeouts, leases, counts.

The client checks a request's arguments before it sends anything (a typed
error at the call, not a reply from the broker); the broker checks the same
fields of every frame it reads, whatever client sent them. Both raise
:class:`~brokerq.errors.InvalidRequest`, which the broker answers with an
``invalid`` error frame (docs/protocol.md, "Errors").
"""

from __future__ import annotations

import math
from typing import Final

from .errors import InvalidRequest

MAX_QUEUE_NAME_BYTES: Final = 255
#: The most queues one get_any or reserve_any waits on.
MAX_QUEUES_PER_WAIT: Final = 64


def is_number(value: object) -> bool:
    """An int or a float, and not a bool (which Python counts as an int)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def validate_count(value: object, what: str, *, least: int = 0) -> None:
    """Raise InvalidRequest unless ``value`` is a whole number >= ``least``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise InvalidRequest(f"{what} must be a whole number >= {least}, not {value!r}")


def validate_timeout(timeout: float | None) -> None:
    """Raise InvalidRequest unless ``timeout`` is None or a number >= 0 (not NaN)."""
    if timeout is not None and not is_number(timeout):
        raise InvalidRequest(f"timeout must be a number of seconds, not {timeout!r}")
    if timeout is not None and not timeout >= 0:
        raise InvalidRequest(f"timeout must be a number >= 0 (absent: for ever), not {timeout!r}")


def validate_lease(lease: float | None) -> None:
    """Raise InvalidRequest unless ``lease`` is None (the default) or a finite number > 0."""
    if lease is not None and not (is_number(lease) and 0 < lease < math.inf):
        raise InvalidRequest(
            f"lease must be a finite number of seconds > 0 (or absent: the default), not {lease!r}"
        )


def validate_queue_list(names: object) -> None:
    """Raise InvalidRequest unless ``names`` is a list of 1 to
    :data:`MAX_QUEUES_PER_WAIT` distinct queue names (as a get's)."""
    if not isinstance(names, list) or not 1 <= len(names) <= MAX_QUEUES_PER_WAIT:
        raise InvalidRequest(f"queues must be a list of 1 to {MAX_QUEUES_PER_WAIT} names")
    for name in names:
        validate_queue_name(name)
    if len(set(names)) != len(names):
        raise InvalidRequest("queues names a queue twice")


def validate_queue_name(name: str, *, for_put: bool = False, what: str = "queue") -> None:
    """Raise InvalidRequest unless ``name`` is a usable queue (or topic) name.
    A ``:`` is the broker's (``jobs:dead``): never put (or published) to."""
    if not isinstance(name, str):
        raise InvalidRequest(f"{what} name must be a str, not {type(name).__name__} {name!r}")
    if not name:
        raise InvalidRequest(f"{what} name is empty")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_QUEUE_NAME_BYTES:
        raise InvalidRequest(f"{what} name is over {MAX_QUEUE_NAME_BYTES} bytes")
    if not name.isprintable():
        raise InvalidRequest(f"{what} name {name!r} has a non-printable character")
    if for_put and ":" in name:
        raise InvalidRequest(f"{what} name {name!r}: ':' is reserved to the broker")
