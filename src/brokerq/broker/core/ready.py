"""The ready messages of one queue: higher priority first, then by id
(arrival order); a message that comes back returns to its place by id.

Per priority in use, a :class:`_Level`: new messages append to a deque (their
ids only grow), messages that come back go to a heap by id, and the head is
the lower id of the two. So put and get are O(1), a message coming back
O(log r); an expired one is taken out lazily: its id is noted and its entry
dropped when it reaches the head. (A deque's ``insert`` and ``remove`` in
the middle walk it: a delayed message landing in a queue of a million
stalled the broker for seconds; bench/growth.py.)
"""

from __future__ import annotations

import bisect
import heapq
import operator
from collections import deque
from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar


class _Ready(Protocol):
    id: int
    priority: int


M = TypeVar("M", bound=_Ready)


class _Level(Generic[M]):
    __slots__ = ("back", "fresh", "live")

    def __init__(self) -> None:
        self.fresh: deque[M] = deque()  # new messages, ids ascending
        self.back: list[tuple[int, M]] = []  # a heap of (id, message) come back
        self.live = 0  # messages here not removed


class ReadyList(Generic[M]):
    __slots__ = ("_count", "_levels", "_order", "_removed")

    def __init__(self) -> None:
        self._levels: dict[int, _Level[M]] = {}
        self._order: list[int] = []  # the negated priorities in use, ascending
        self._count = 0
        self._removed: set[int] = set()  # ids taken out whose entries remain

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[M]:
        """Every message, in delivery order."""
        removed = self._removed
        for negated in self._order:
            level = self._levels[-negated]
            if not level.back and not removed:
                yield from level.fresh
                continue
            merged = heapq.merge(
                level.fresh, (m for _, m in sorted(level.back)), key=operator.attrgetter("id")
            )
            yield from (m for m in merged if m.id not in removed)

    def _add(self, priority: int, count: int) -> _Level[M]:
        """The level of ``priority`` (made if new), with ``count`` messages more."""
        level = self._levels.get(priority)
        if level is None:
            level = self._levels[priority] = _Level()
            bisect.insort(self._order, -priority)
        level.live += count
        self._count += count
        return level

    def append(self, msg: M) -> None:
        """A new message: the last of its priority."""
        self.extend([msg], msg.priority)

    def extend(self, messages: list[M], priority: int) -> None:
        """New messages of one ``priority``, in id order: the last of it."""
        if messages:
            self._add(priority, len(messages)).fresh.extend(messages)

    def insert(self, msg: M) -> None:
        """A message that comes back (never a removed one): to its place by id."""
        level = self._add(msg.priority, 1)
        if not level.back and (not level.fresh or msg.id > level.fresh[-1].id):
            level.fresh.append(msg)
        else:
            heapq.heappush(level.back, (msg.id, msg))

    def head(self) -> M:
        """The next message to deliver (the list must not be empty)."""
        level = self._levels[-self._order[0]]
        if not level.back and not self._removed:
            return level.fresh[0]
        return self._head_of(level)[0]

    def popleft(self) -> M:
        priority = -self._order[0]
        level = self._levels[priority]
        if (level.back or self._removed) and self._head_of(level)[1]:
            msg = heapq.heappop(level.back)[1]
        else:
            msg = level.fresh.popleft()
        self._gone(priority, 1)
        return msg

    def popleft_many(self, count: int) -> None:
        """Drop the first ``count`` messages: without a ``popleft`` each when they
        are new messages of the first priority, as they usually are."""
        if self._order and not self._removed:
            priority = -self._order[0]
            level = self._levels[priority]
            fresh = level.fresh
            if not level.back and count <= len(fresh):
                for _ in range(count):
                    fresh.popleft()
                self._gone(priority, count)
                return
        for _ in range(count):
            self.popleft()

    def _head_of(self, level: _Level[M]) -> tuple[M, bool]:
        """The first live message of ``level``, and whether it is in ``back``
        (dropping entries of removed messages on the way)."""
        removed = self._removed
        fresh, back = level.fresh, level.back
        while fresh and fresh[0].id in removed:
            removed.discard(fresh.popleft().id)
        while back and back[0][0] in removed:
            removed.discard(heapq.heappop(back)[0])
        if back and (not fresh or back[0][0] < fresh[0].id):
            return back[0][1], True
        return fresh[0], False

    def remove(self, msg: M) -> None:
        """Take out a message that is here, from anywhere (it expired)."""
        self._removed.add(msg.id)
        self._gone(msg.priority, 1)

    def clear(self) -> None:
        self._levels.clear()
        self._order.clear()
        self._removed.clear()
        self._count = 0

    def _gone(self, priority: int, count: int) -> None:
        """``count`` messages of ``priority`` left; a level left empty goes."""
        level = self._levels[priority]
        level.live -= count
        self._count -= count
        if level.live:
            return
        del self._levels[priority]
        self._order.remove(-priority)
        if self._removed:  # what is left there is removed: forget those ids
            self._removed.difference_update(m.id for m in level.fresh)
            self._removed.difference_update(i for i, _ in level.back)
