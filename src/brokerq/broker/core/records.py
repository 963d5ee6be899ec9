"""The journal's records: every change to the broker's durable state, written
before the change. MessagePack arrays whose first element names the kind:
new kinds may be added, and fields only appended, with defaults."""

from __future__ import annotations

from typing import TypeAlias

import msgspec


class Record(msgspec.Struct, frozen=True, array_like=True, tag_field="k"): ...


class PutRecord(Record, frozen=True, tag="p"):
    """Messages enqueued, in order; a put that went straight to waiting
    dequeuers says so here, in one write: ``taken`` by a get, ``leased`` reserved."""

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
    returned: bool = False  # a got message back, its reply not written: not a new task


class DeleteRecord(Record, frozen=True, tag="d"):
    """Messages gone for good: taken by get (``got``: each still an unfinished
    task until a ``task_done``), acked, purged, expired (tasks finished)."""

    ids: list[int]
    got: bool = False


class AttemptsRecord(Record, frozen=True, tag="a"):  # a delivery count (set on reserve)
    id: int
    attempts: int


class StateRecord(Record, frozen=True, tag="s"):  # a message ready, buried, or delayed
    id: int
    state: str  # "ready" | "buried" | "delayed"
    until: float = 0.0  # delayed until then (wall clock)


class MoveRecord(Record, frozen=True, tag="m"):  # to another queue, ready (dead letters, kick)
    id: int
    queue: str
    attempts: int = 0


class ConfigRecord(Record, frozen=True, tag="c"):  # a queue's own settings (None: the default)
    queue: str
    max_deliveries: int | None = None
    lease: float | None = None
    maxsize: int = 0  # messages held, in every state (0: unlimited)
    max_bytes: int = 0  # body bytes held, in every state (0: unlimited)


class DropQueueRecord(Record, frozen=True, tag="x"):  # a queue deleted (its messages before)
    queue: str


class KeysRecord(Record, frozen=True, tag="k"):  # recent put keys and their ids (snapshots)
    keys: list[bytes]
    ids: list[int]


class NextIdRecord(Record, frozen=True, tag="n"):  # the next id (snapshots: ids never repeat)
    next_id: int


class SubscribeRecord(Record, frozen=True, tag="t"):  # a queue's subscription begins or ends
    topic: str
    queue: str
    on: bool = True


class UnfinishedRecord(Record, frozen=True, tag="u"):
    """A queue's unfinished tasks are now ``count`` (task_done, snapshots);
    between two of them replay derives the count from the other records."""

    queue: str
    count: int


# fmt: off
AnyRecord: TypeAlias = (
    PutRecord | DeleteRecord | AttemptsRecord | StateRecord | MoveRecord | ConfigRecord |
    DropQueueRecord | KeysRecord | NextIdRecord | SubscribeRecord | UnfinishedRecord
)
# fmt: on
