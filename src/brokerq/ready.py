"""The ready messages of one queue, in delivery order.

Higher priority first; within a priority, by message id, which is arrival
order (as POSIX message queues do). A message that comes back (released,
its lease ran out, its reply was never written) returns to its place by
id, so order is kept.

One deque per priority in use, and the priorities in use kept sorted: a
new message appends to its deque, the head is the first message of the
highest priority, so put and get are O(1) plus O(p) when a priority level
appears or empties (p levels in use, usually one). A message put back
searches its deque from the front, where it almost always belongs.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar


class _Ready(Protocol):
    id: int
    priority: int


M = TypeVar("M", bound=_Ready)


class ReadyList(Generic[M]):
    __slots__ = ("_count", "_levels", "_order")

    def __init__(self) -> None:
        self._levels: dict[int, deque[M]] = {}
        self._order: list[int] = []  # the negated priorities in use, ascending
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._count > 0

    def __iter__(self) -> Iterator[M]:
        """Every message, in delivery order."""
        for negated in self._order:
            yield from self._levels[-negated]

    def _level(self, priority: int) -> deque[M]:
        level = self._levels.get(priority)
        if level is None:
            level = self._levels[priority] = deque()
            bisect.insort(self._order, -priority)
        return level

    def append(self, msg: M) -> None:
        """A new message: the last of its priority."""
        self._level(msg.priority).append(msg)
        self._count += 1

    def insert(self, msg: M) -> None:
        """A message that comes back: to its place by id within its priority."""
        level = self._level(msg.priority)
        if not level or msg.id > level[-1].id:
            level.append(msg)
        else:
            i = 0
            while level[i].id < msg.id:
                i += 1
            level.insert(i, msg)
        self._count += 1

    def head(self) -> M:
        """The next message to deliver (the list must not be empty)."""
        return self._levels[-self._order[0]][0]

    def popleft(self) -> M:
        priority = -self._order[0]
        level = self._levels[priority]
        msg = level.popleft()
        self._count -= 1
        if not level:
            self._drop_level(priority)
        return msg

    def remove(self, msg: M) -> None:
        """Take out a message from anywhere (it expired)."""
        level = self._levels[msg.priority]
        level.remove(msg)
        self._count -= 1
        if not level:
            self._drop_level(msg.priority)

    def clear(self) -> None:
        self._levels.clear()
        self._order.clear()
        self._count = 0

    def _drop_level(self, priority: int) -> None:
        del self._levels[priority]
        self._order.remove(-priority)
