"""The journal's records: every change to the broker's durable state.

The core writes one record *before* it changes anything (write-ahead), so a
record that failed to reach the file leaves the state untouched; replaying
them in order (:meth:`~brokerq.broker.core.BrokerCore.apply`) rebuilds every
queue. Records are MessagePack arrays whose first element names the kind
(``array_like``: compact; new kinds may be added, and fields only appended,
with defaults).
"""

from __future__ import annotations

from typing import TypeAlias

import msgspec


class Record(msgspec.Struct, frozen=True, array_like=True, tag_field="k"):
    pass


class PutRecord(Record, frozen=True, tag="p"):
    """Messages enqueued (one put, or a put_many in order).

    A put that went straight to waiting dequeuers says so in the same
    record, so the put and its handoff are one write: ``taken`` were
    removed by a get, ``leased`` were reserved (their first attempt).
    """

    queue: str
    ids: list[int]
    bodies: list[bytes]
    at: float  # wall-clock time of the put
    keys: list[bytes] | None = None  # client keys, for dropping retried puts
    attempts: int = 0  # deliveries so far (snapshots of reserved messages)
    taken: list[int] | None = None
    leased: list[int] | None = None
    priority: int = 0
    not_before: float = 0.0  # wall clock; delayed until then (0: ready at once)
    expires_at: float = 0.0  # wall clock; dropped if still waiting then (0: never)
    #: A message a get had taken, back because its reply was not written: not
    #: a new task (its put counted it already, and a get leaves the count as it is).
    returned: bool = False


class DeleteRecord(Record, frozen=True, tag="d"):
    """Messages gone for good: taken by get (``got``: each still an unfinished
    task until a ``task_done``), acked, purged, expired (tasks finished)."""

    ids: list[int]
    got: bool = False


class AttemptsRecord(Record, frozen=True, tag="a"):
    """A message's delivery count (set when it is reserved)."""

    id: int
    attempts: int


class StateRecord(Record, frozen=True, tag="s"):
    """A message becomes ready, buried, or delayed until ``until`` (wall clock)."""

    id: int
    state: str  # "ready" | "buried" | "delayed"
    until: float = 0.0


class MoveRecord(Record, frozen=True, tag="m"):
    """A message moves to another queue (dead-lettered, or kicked back), ready."""

    id: int
    queue: str
    attempts: int = 0


class ConfigRecord(Record, frozen=True, tag="c"):
    """A queue's own settings (None: the broker's default)."""

    queue: str
    max_deliveries: int | None = None
    lease: float | None = None
    maxsize: int = 0  # messages held, in every state (0: unlimited)
    max_bytes: int = 0  # body bytes held, in every state (0: unlimited)


class DropQueueRecord(Record, frozen=True, tag="x"):
    """A queue deleted: its messages (each named in a DeleteRecord before) and settings."""

    queue: str


class KeysRecord(Record, frozen=True, tag="k"):
    """The window of recent put keys and the ids they were given (snapshots)."""

    keys: list[bytes]
    ids: list[int]


class NextIdRecord(Record, frozen=True, tag="n"):
    """The next message id to hand out (snapshots: ids never repeat)."""

    next_id: int


class SubscribeRecord(Record, frozen=True, tag="t"):
    """A queue's durable subscription to a topic begins (or ends: ``on`` false)."""

    topic: str
    queue: str
    on: bool = True


class UnfinishedRecord(Record, frozen=True, tag="u"):
    """A queue's count of unfinished tasks is now ``count``: written by
    ``task_done`` and by snapshots. Between two of them replay derives the
    count from the other records (see BrokerCore.apply)."""

    queue: str
    count: int


AnyRecord: TypeAlias = (
    PutRecord
    | DeleteRecord
    | AttemptsRecord
    | StateRecord
    | MoveRecord
    | ConfigRecord
    | DropQueueRecord
    | KeysRecord
    | NextIdRecord
    | SubscribeRecord
    | UnfinishedRecord
)
