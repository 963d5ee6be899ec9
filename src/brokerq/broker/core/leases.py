"""Leases, timers and expiry: reserve's verbs, dead letters, ttls, delays.

Every lease verb names the delivery attempt, so a late ack for an attempt
whose lease already ran out is refused (LeaseLost). Timers are one heap,
entries checked lazily when they come due: a stale one is just popped.
"""

from __future__ import annotations

import contextlib
import heapq
import math

from ...errors import Full, InvalidRequest, LeaseLost
from ...validation import validate_queue_name
from .base import DEAD_SUFFIX, TIMER_RETRY_SECONDS, CoreBase
from .records import DeleteRecord, MoveRecord, StateRecord
from .state import Expiry, Lease, Message, Waiter


class Leases(CoreBase):
    def lease_of(self, msg_id: int) -> Lease | None:
        return self._leases.get(msg_id)

    def _lease_for(self, msg_id: int, attempt: int) -> Lease:
        lease = self._leases.get(msg_id)
        if lease is None or lease.attempt != attempt:
            raise LeaseLost(
                f"message {msg_id} attempt {attempt} is not leased (its lease ran out, "
                "or it was acked, released or buried)"
            )
        return lease

    def ack(self, msg_id: int, attempt: int, *, as_get: bool = False) -> None:
        """The message was handled: gone, its task done (``as_get``: left for a
        task_done, as a get's; the async client's waiting get is a reserve and an ack)."""
        lease = self._lease_for(msg_id, attempt)
        q = self._queue(lease.message.queue)
        self._write(DeleteRecord(ids=[msg_id], got=as_get))
        self._drop_lease(q, lease)
        self._forget(q, lease.message)
        if not as_get:
            self._finished(q)

    def release(self, msg_id: int, attempt: int, now: float, delay: float = 0) -> list[Waiter]:
        if not 0 <= delay < math.inf:
            raise InvalidRequest(f"delay must be a finite number >= 0, not {delay}")
        return self._end_lease(self._lease_for(msg_id, attempt), now, delay)

    def bury(self, msg_id: int, attempt: int) -> None:
        lease = self._lease_for(msg_id, attempt)
        q = self._queue(lease.message.queue)
        self._write(StateRecord(id=msg_id, state="buried"))
        self._drop_lease(q, lease)
        q.buried[msg_id] = lease.message
        self._finished(q)

    def touch(self, msg_id: int, attempt: int, now: float, lease: float | None = None) -> float:
        held = self._lease_for(msg_id, attempt)
        if lease is not None:
            held.length = lease
        held.expires_at = now + held.length
        self._add_timer(held.expires_at, held)
        return held.expires_at

    def release_owned(self, owner: object, now: float) -> list[Waiter]:
        """Everything ``owner`` (a closed connection) held goes back; on a full
        disk, a lease that cannot end now stays until its timer tries again."""
        woken: list[Waiter] = []
        for msg_id in sorted(self._owned.get(owner, ())):
            with contextlib.suppress(Full):
                woken += self._end_lease(self._leases[msg_id], now, 0)
        return woken

    def _end_lease(self, lease: Lease, now: float, delay: float) -> list[Waiter]:
        """A delivery that ended without an ack: retry, delay, or dead-letter."""
        msg = lease.message
        q = self._queue(msg.queue)
        if msg.expires_at <= now:  # its ttl ran out while it was leased
            self._write(DeleteRecord(ids=[msg.id]))
            self._drop_lease(q, lease)
            self._expired(q, msg)
            return []
        limit = q.max_deliveries or self.max_deliveries
        if not q.name.endswith(DEAD_SUFFIX) and msg.attempts >= limit:
            dead = self._queue(q.name + DEAD_SUFFIX)
            self._write(MoveRecord(id=msg.id, queue=dead.name, attempts=msg.attempts))
            self._drop_lease(q, lease)
            self._finished(q)
            q.dead_lettered_total += 1
            return self._move(msg, q, dead, msg.attempts, now)
        if delay > 0:
            self._write(StateRecord(id=msg.id, state="delayed", until=now + delay))
            self._drop_lease(q, lease)
            self._delay(q, msg, now + delay)
            return []
        self._write(StateRecord(id=msg.id, state="ready"))
        self._drop_lease(q, lease)
        return self._make_ready(q, msg, now)

    def kick(self, name: str, n: int, now: float) -> tuple[int, list[Waiter]]:
        """Return up to ``n`` buried messages to ready; on ``<q>:dead``, move
        them back to ``<q>`` with their delivery count reset."""
        validate_queue_name(name)
        if n < 1:
            raise InvalidRequest(f"kick needs n >= 1, not {n}")
        q = self._queues.get(name)
        if q is None:
            return 0, []
        woken: list[Waiter] = []
        kicked = 0
        if name.endswith(DEAD_SUFFIX):
            target = self._queue(name[: -len(DEAD_SUFFIX)])
            while kicked < n and (q.buried or q.ready):
                msg = next(iter(q.buried.values())) if q.buried else q.ready.head()
                self._write(MoveRecord(id=msg.id, queue=target.name, attempts=0))
                if q.buried:
                    del q.buried[msg.id]
                else:
                    q.ready.popleft()
                    self._finished(q)  # (a buried one's task was finished when it was buried)
                woken += self._move(msg, q, target, 0, now)
                kicked += 1
            return kicked, woken
        while kicked < n and q.buried:
            msg_id = next(iter(q.buried))
            self._write(StateRecord(id=msg_id, state="ready"))
            q.unfinished += 1
            woken += self._make_ready(q, q.buried.pop(msg_id), now)
            kicked += 1
        return kicked, woken

    def next_deadline(self) -> float | None:
        """When :meth:`tick` next has work (maybe a stale entry: then it just pops it)."""
        return self._timers[0][0] if self._timers else None

    def tick(self, now: float) -> list[Waiter]:
        """Fire the timers due; on a full disk, the one that could not write
        (and all after it) a second later."""
        woken: list[Waiter] = []
        timers = self._timers
        while timers and timers[0][0] <= now:
            when, _, item = heapq.heappop(timers)
            try:
                woken += self._fire(item, when, now)
            except Full:
                if isinstance(item, Lease):
                    item.expires_at = now + TIMER_RETRY_SECONDS
                self._add_timer(now + TIMER_RETRY_SECONDS, item)
                break
        return woken

    def _fire(self, item: Lease | Message | Expiry, when: float, now: float) -> list[Waiter]:
        if isinstance(item, Lease):
            if self._holds(item) and item.expires_at == when:
                return self._end_lease(item, now, 0)
        elif isinstance(item, Expiry):
            self._expire(item.message)
        else:
            entry = self._delayed.get(item.id)
            if entry is not None and entry[1] <= when:
                del self._delayed[item.id]
                q = self._queue(item.queue)
                q.delayed -= 1
                return self._make_ready(q, item, now)
        return []

    def _expire(self, msg: Message) -> None:
        """Drop ``msg`` if it waits (ready or delayed); a leased one goes when
        its lease ends, a prefetched one if it comes back; a buried one is kept."""
        if not msg.alive or msg.id in self._leases or msg.id in self._prefetched:
            return
        q = self._queue(msg.queue)
        if msg.id in q.buried:
            return
        self._write(DeleteRecord(ids=[msg.id]))
        if msg.id in self._delayed:
            del self._delayed[msg.id]
            q.delayed -= 1
        else:
            q.ready.remove(msg)
        self._expired(q, msg)
