"""Unfinished tasks: ``task_done`` and ``join``, queue.Queue's count per queue.

A get leaves the count as it is (its consumer owes a ``task_done``); any
other way out finishes the task. Those never take the count below 0: a
``task_done`` may have come before anyone got the message (the stdlib allows
that), and a 0 then must not turn into a debt that hides the next put from a join.
"""

from __future__ import annotations

from ...errors import InvalidRequest
from ...validation import validate_queue_name
from .base import CoreBase
from .records import UnfinishedRecord
from .state import Joiner


class Tasks(CoreBase):
    def unfinished(self, name: str) -> int:
        validate_queue_name(name)
        q = self._queues.get(name)
        return 0 if q is None else q.unfinished

    def task_done(self, name: str, n: int = 1) -> int:
        """``n`` tasks done; returns how many are left. Written as the new
        count, so that replay cannot drift from it."""
        validate_queue_name(name)
        if n < 1:
            raise InvalidRequest(f"task_done needs n >= 1, not {n}")
        q = self._queues.get(name)
        count = 0 if q is None else q.unfinished
        if q is None or n > count:
            raise InvalidRequest(
                f"task_done() called too many times: queue {name!r} has {count} "
                f"unfinished task(s), not {n}"
            )
        self._write(UnfinishedRecord(queue=name, count=count - n))
        q.unfinished = count - n
        return q.unfinished

    def wait_join(self, name: str, token: object = None) -> Joiner:
        """Park a join (only while ``name`` has unfinished tasks)."""
        validate_queue_name(name)
        joiner = Joiner(name, token)
        self._joiners.setdefault(name, {})[joiner] = None
        return joiner

    def cancel_join(self, joiner: Joiner) -> None:
        joiners = self._joiners.get(joiner.queue, {})
        joiners.pop(joiner, None)
        if not joiners:
            self._joiners.pop(joiner.queue, None)

    def joins_done(self) -> list[Joiner]:
        """The parked joins whose queue has no unfinished task now, marked done
        and out of the line; called after every change, so free while nobody joins."""
        if not self._joiners:
            return []
        done: list[Joiner] = []
        queues = self._queues
        for name in [n for n in self._joiners if n not in queues or not queues[n].unfinished]:
            for joiner in self._joiners.pop(name):
                joiner.done = True
                done.append(joiner)
        return done
