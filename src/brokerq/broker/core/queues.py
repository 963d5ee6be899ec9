"""Put and get, waiting dequeuers and putters, settings. A put goes straight
to the longest waiters, in its own record; one that does not fit waits."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from typing import Any

import msgspec

from ...errors import Full, InvalidRequest, QueueFull
from ...protocol import MESSAGE_OVERHEAD
from ...validation import validate_queue_list, validate_queue_name
from .base import LIVE_OVERHEAD, CoreBase, config_record_of, put_record_of
from .records import AttemptsRecord, DeleteRecord, DropQueueRecord, PutRecord
from .state import Expiry, Joiner, Lease, Message, Putter, QueueState, Waiter

MIN_PRIORITY = -(2**31)
MAX_PRIORITY = 2**31 - 1


class Queues(CoreBase):
    def put(
        self, name: str, body: bytes, now: float, key: bytes | None = None, **options: Any
    ) -> tuple[int, Waiter | None]:
        """Enqueue ``body``; return its id and the waiter it went to, if any."""
        ids, woken = self.put_many(name, [body], now, None if key is None else [key], **options)
        return ids[0], woken[0] if woken else None

    def put_many(
        self,
        name: str,
        bodies: Iterable[bytes],
        now: float,
        keys: list[bytes] | None = None,
        *,
        priority: int = 0,
        delay: float = 0.0,
        ttl: float | None = None,
        admitting: bool = False,
    ) -> tuple[list[int], list[Waiter]]:
        """Enqueue several bodies in order, all or none; return ids and woken waiters.
        A ``key`` seen recently (a retried put) gives the first put's id."""
        bodies = list(bodies)
        validate_queue_name(name, for_put=True)
        if keys is not None and len(keys) != len(bodies):
            raise InvalidRequest(f"{len(keys)} keys for {len(bodies)} bodies")
        if not MIN_PRIORITY <= priority <= MAX_PRIORITY:
            raise InvalidRequest(f"priority must be within ±2**31, not {priority}")
        if not 0 <= delay < math.inf:
            raise InvalidRequest(f"delay must be a finite number >= 0, not {delay}")
        if ttl is not None and not 0 < ttl < math.inf:
            raise InvalidRequest(f"ttl must be a finite number > 0, or None, not {ttl}")
        for body in bodies:
            self._check_size(body)
        ids: list[int] = []
        new: list[tuple[int, bytes, bytes | None]] = []
        for i, body in enumerate(bodies):
            key = None if keys is None else keys[i] or None  # b"": no key
            seen = None if key is None else self._keys.get(key)
            if seen is None:
                seen = self._next_id + len(new)
                new.append((seen, body, key))
            ids.append(seen)
        if not new:
            return ids, []
        q = self._queue(name)
        # The longest waiters get the first messages, in the same write
        # (unless the messages are delayed, or others of a higher priority wait).
        ready_now = delay == 0 and not q.ready and not q.streams  # (streams: below)
        waiters = list(itertools.islice(q.waiters, len(new))) if ready_now else []
        got = [i for i, w in enumerate(waiters) if w.lease is None]  # they need no room
        if self.max_total_bytes or q.maxsize or self._max_bytes(q):
            rest = new[len(got) :]
            if error := self._no_room(q, len(rest), sum(len(n[1]) for n in rest), admitting):
                raise error
        until = now + delay
        expires_at = math.inf if ttl is None else now + ttl
        # A body taken by a waiting get in this same record is never live
        # after a replay, so it is not written (undeliver writes it if the
        # reply cannot be sent).
        bodies = [n[1] for n in new]
        for i in got:
            bodies[i] = b""
        self._write(
            PutRecord(
                queue=name,
                ids=[n[0] for n in new],
                bodies=bodies,
                at=now,
                keys=None if keys is None else [n[2] or b"" for n in new],
                taken=[new[i][0] for i in got] or None,
                leased=[new[i][0] for i, w in enumerate(waiters) if w.lease is not None] or None,
                priority=priority,
                not_before=until if delay else 0.0,
                expires_at=0.0 if ttl is None else expires_at,
            )
        )
        self._next_id += len(new)
        if keys is not None:
            self._remember_keys((n[2], n[0]) for n in new)
        # (Once per put_many, not per message, where that can be: a batch of
        # 100 small messages is mostly this loop's bookkeeping.)
        messages = [
            Message(msg_id, name, body, now, priority=priority, expires_at=expires_at)
            for msg_id, body, _ in new
        ]
        size = sum(len(n[1]) for n in new)
        q.put_total += len(new)
        q.bytes += size
        self.live_bytes += size + LIVE_OVERHEAD * len(new)
        q.unfinished += len(new)
        if ttl is not None:
            for msg in messages:
                self._add_timer(expires_at, Expiry(msg))
        for msg, waiter in zip(messages, waiters, strict=False):  # the handoffs the record names
            del q.waiters[waiter]
            if waiter.queues:
                self._leave_lines(waiter)
            self._deliver(q, msg, waiter, now, journaled=True)
        if delay:  # (then no waiter was handed anything)
            for msg in messages:
                self._delay(q, msg, until)
        else:
            q.ready.extend(messages[len(waiters) :], priority)
        if q.streams:
            waiters = waiters + self._serve_line(q, now)
        return ids, waiters

    def _no_room(
        self, q: QueueState, count: int, size: int, admitting: bool = False
    ) -> Full | None:
        """What a put of ``count`` messages of ``size`` body bytes to ``q``
        meets now: Full (the broker's ``max_total_bytes``, which no put waits
        for, or more than ``q`` can ever hold), QueueFull (no room yet, or
        putters wait ahead of one not ``admitting``), or None."""
        total = size + LIVE_OVERHEAD * count
        if self.max_total_bytes and count and self.live_bytes + total > self.max_total_bytes:
            return Full(
                f"the broker holds {self.live_bytes} bytes of messages: {total} more would "
                f"pass its limit of {self.max_total_bytes} (max_total_bytes)"
            )
        max_bytes = self._max_bytes(q)
        if not (q.maxsize or max_bytes):
            return None
        if (q.maxsize and count > q.maxsize) or (max_bytes and size > max_bytes):
            return Full(
                f"{count} message(s) of {size} bytes can never fit in {q.name!r} "
                f"(maxsize {q.maxsize or 'unlimited'}, max_bytes {max_bytes or 'unlimited'})"
            )
        fits = (not q.maxsize or q.held + count <= q.maxsize) and (
            not max_bytes or q.bytes + size <= max_bytes
        )
        if fits and (admitting or not q.putters):
            return None
        return QueueFull(f"queue {q.name!r} is full")

    def _has_room(self, name: str, size: int) -> bool:
        q = self._queues.get(name) or QueueState(name)
        return not q.putters and self._no_room(q, 1, size) is None

    def wait_put(
        self,
        name: str,
        bodies: list[bytes],
        keys: list[bytes] | None,
        options: dict[str, Any],
        token: object = None,
    ) -> Putter:
        """Park a put that did not fit (QueueFull) at the back of the line."""
        putter = Putter(name, bodies, keys, options, token)
        self._queue(name).putters[putter] = None
        return putter

    def cancel_put(self, putter: Putter, now: float) -> list[Putter | Waiter]:
        """Withdraw a parked put (timeout, disconnect); the next may fit now."""
        self._queue(putter.queue).putters.pop(putter, None)
        return self.admit_putters(putter.queue, now)

    def admit_putters(self, name: str, now: float) -> list[Putter | Waiter]:
        """Enqueue parked puts, in order, while the first one fits; returns
        the putters admitted and the waiters served."""
        q = self._queues.get(name)
        woken: list[Putter | Waiter] = []
        while q is not None and q.putters:
            putter = next(iter(q.putters))
            try:
                ids, served = self.put_many(
                    name, putter.bodies, now, putter.keys, admitting=True, **putter.options
                )
            except Full:  # no room yet (or a full disk): it stays first in line
                break
            del q.putters[putter]
            putter.ids = ids
            woken += [putter, *served]
        return woken

    def admit_freed(self, now: float) -> list[Putter | Waiter]:
        """Admit parked puts of every queue that had room freed since the last call."""
        woken: list[Putter | Waiter] = []
        while self.freed:
            woken += self.admit_putters(self.freed.pop(), now)
        return woken

    def get_nowait(self, name: str, n: int = 1, max_bytes: int | None = None) -> list[Message]:
        """Remove and return up to ``n`` ready messages (maybe none), of at
        most ``max_bytes`` encoded (to fit one reply frame) but the first."""
        validate_queue_name(name)
        q = self._queues.get(name)
        if q is None or not q.ready:
            return []
        taken: list[Message] = []
        size = 0
        ready = q.ready
        for msg in itertools.islice(ready, min(n, len(ready))):  # n may be over sys.maxsize
            cost = len(msg.body) + MESSAGE_OVERHEAD
            if taken and max_bytes is not None and size + cost > max_bytes:
                break
            taken.append(msg)
            size += cost
        self._write(DeleteRecord(ids=[m.id for m in taken], got=True))
        ready.popleft_many(len(taken))
        for msg in taken:
            msg.alive = False
        self._forgot(q, size - MESSAGE_OVERHEAD * len(taken), len(taken))
        q.delivered_total += len(taken)
        return taken

    def reserve_nowait(
        self, name: str, now: float, lease: float | None = None, owner: object = None
    ) -> Message | None:
        validate_queue_name(name)
        q = self._queues.get(name)
        if q is None or not q.ready:
            return None
        msg = q.ready.head()
        self._lease(q, msg, now, lease, owner)
        q.ready.popleft()
        q.delivered_total += 1
        return msg

    def wait(
        self, name: str, token: object = None, lease: float | None = None, owner: object = None
    ) -> Waiter:
        """Park a dequeuer (a reserve if ``lease`` is not None) at the back of the line."""
        validate_queue_name(name)
        q = self._queue(name)
        assert not q.ready, "wait() while messages are ready would break fair handoff"
        waiter = Waiter(name, token, lease, owner)
        q.waiters[waiter] = None
        return waiter

    def take_any(
        self, names: list[str], now: float, lease: float | None = None, owner: object = None
    ) -> Message | None:
        """A get_any (``lease`` None) or reserve_any (QUEUE_LEASE: the queue's):
        the head of the first of ``names`` with a message ready, or None."""
        validate_queue_list(names)
        for name in names:
            q = self._queues.get(name)
            if q is not None and q.ready:
                if lease is None:
                    return self.get_nowait(name)[0]
                return self.reserve_nowait(name, now, lease, owner)
        return None

    def wait_any(
        self,
        names: list[str],
        token: object = None,
        lease: float | None = None,
        owner: object = None,
    ) -> Waiter:
        """Park a get_any or reserve_any at the back of each of its queues' lines."""
        validate_queue_list(names)
        lines = [self._queue(name) for name in names]
        assert not any(q.ready for q in lines), "wait_any() while messages are ready"
        waiter = Waiter(names[0], token, lease, owner, tuple(names))
        for q in lines:
            q.waiters[waiter] = None
        return waiter

    def cancel_wait(self, waiter: Waiter, now: float) -> list[Waiter]:
        """Withdraw a waiter; messages already handed to it go back to the head."""
        self._queue(waiter.queue).waiters.pop(waiter, None)
        if waiter.queues:
            self._leave_lines(waiter)
        messages, waiter.messages = waiter.messages, []
        # The leases handed to this waiter, not those the messages hold now:
        # one may have run out and the message gone to another consumer since.
        leases, waiter.leases = waiter.leases, []
        return self.undeliver(messages, now, None if waiter.lease is None else leases)

    def leases_of(self, messages: list[Message]) -> list[Lease | None]:
        return [self._leases.get(m.id) for m in messages]

    def undeliver(
        self, messages: list[Message], now: float, leases: list[Lease | None] | None = None
    ) -> list[Waiter]:
        """Take back messages whose reply was never written, to their place. For
        a reserve, ``leases`` are those the reply handed out: each is undone
        unless it already ended (expired, maybe redelivered since)."""
        woken: list[Waiter] = []
        for i, msg in enumerate(messages):
            q = self._queue(msg.queue)
            if leases is not None:
                if not self._holds(leases[i]):
                    continue  # that delivery already ended: nothing to undo
                self._write_or_owe(AttemptsRecord(id=msg.id, attempts=msg.attempts - 1))
                msg.attempts -= 1
                self._drop_lease(q, self._leases[msg.id])
            else:
                self._write_or_owe(put_record_of(msg, returned=True))
                msg.alive = True
                q.bytes += len(msg.body)
                self.live_bytes += len(msg.body) + LIVE_OVERHEAD
            q.delivered_total -= 1
            woken += self._make_ready(q, msg, now)
        return woken

    def configure(
        self,
        name: str,
        *,
        max_deliveries: int | None = None,
        lease: float | None = None,
        maxsize: int | None = None,
        max_bytes: int | None = None,
    ) -> dict[str, Any]:
        """Change a queue's own settings; None leaves a setting as it is.
        Lowered below what the queue holds, maxsize and max_bytes keep every message."""
        validate_queue_name(name)
        if max_deliveries is not None and max_deliveries < 1:
            raise InvalidRequest(f"max_deliveries must be >= 1, not {max_deliveries}")
        if lease is not None and not 0 < lease < math.inf:
            raise InvalidRequest(f"lease must be a finite number > 0, not {lease}")
        for limit, value in (("maxsize", maxsize), ("max_bytes", max_bytes)):
            if value is not None and value < 0:
                raise InvalidRequest(f"{limit} must be >= 0 (0: unlimited), not {value}")
        changes = {
            "max_deliveries": max_deliveries,
            "lease": lease,
            "maxsize": maxsize,
            "max_bytes": max_bytes,
        }
        record = msgspec.structs.replace(
            config_record_of(self._queues.get(name) or QueueState(name)),
            **{k: v for k, v in changes.items() if v is not None},
        )
        self._write(record)
        self._configure(record)
        return self.queue_config(name)

    def queue_config(self, name: str) -> dict[str, Any]:
        q = self._queues.get(name) or QueueState(name)
        return {
            "max_deliveries": q.max_deliveries or self.max_deliveries,
            "lease": q.lease or self.default_lease,
            "maxsize": q.maxsize,
            "max_bytes": self._max_bytes(q),
        }

    def peek(self, name: str) -> Message | None:
        validate_queue_name(name)
        q = self._queues.get(name)
        return None if q is None or not q.ready else q.ready.head()

    def purge(self, name: str) -> int:
        validate_queue_name(name)
        q = self._queues.get(name)
        if q is None or not q.ready:
            return 0
        self._write(DeleteRecord(ids=[m.id for m in q.ready]))
        for msg in q.ready:
            self._forget(q, msg)
        count = len(q.ready)
        q.ready.clear()
        self._finished(q, count)
        return count

    def delete_queue(self, name: str, now: float) -> tuple[int, list[Putter | Waiter]]:
        """Delete a queue's messages, settings and unfinished tasks; those who
        wait on it go on waiting on the (now empty) queue of that name."""
        validate_queue_name(name)
        q = self._queues.get(name)
        if q is None:
            if self.topics.has_queue(name):  # subscribed, never used: drop that
                self._write(DropQueueRecord(queue=name))
                self.topics.remove_everywhere(name)
            return 0, []
        held = [*q.ready, *q.buried.values()]
        held += [msg for msg in self._off_the_lists() if msg.queue == name]
        if held:
            self._write(DeleteRecord(ids=[m.id for m in held]))
        self._write(DropQueueRecord(queue=name))
        self.topics.remove_everywhere(name)
        for msg in held:
            if (lease := self._leases.get(msg.id)) is not None:
                self._drop_lease(q, lease)
            if self._delayed.pop(msg.id, None) is not None:
                q.delayed -= 1
            if self._prefetched.pop(msg.id, None) is not None:
                q.prefetched -= 1  # (the stream skips it: it is not alive)
            self._forget(q, msg)
        q.ready.clear()
        q.buried.clear()
        q.maxsize = q.max_bytes = q.unfinished = 0  # its tasks went with it: joins return
        q.max_deliveries = q.lease = None
        woken: list[Putter | Waiter] = []
        if q.waiters or q.putters or q.streams:  # (streams keep their queue)
            woken = self.admit_putters(name, now)
        else:
            del self._queues[name]
        return len(held), woken

    def queue_names(self) -> list[str]:
        return sorted(self._queues)

    def queue_stats(self, name: str, now: float) -> dict[str, Any]:
        validate_queue_name(name)
        q = self._queues.get(name) or QueueState(name)
        oldest = min((m.enqueued_at for m in itertools.islice(q.ready, 64)), default=None)
        return {
            "name": name,
            "ready": len(q.ready),
            "delayed": q.delayed,
            "reserved": q.reserved,
            "buried": len(q.buried),
            "waiters": len(q.waiters),
            "putters": len(q.putters),
            "bytes": q.bytes,
            "put_total": q.put_total,
            "delivered_total": q.delivered_total,
            "expired_total": q.expired_total,
            "dead_lettered_total": q.dead_lettered_total,
            "oldest_ready_age_s": None if oldest is None else max(0.0, now - oldest),
            "unfinished_tasks": q.unfinished,
            "streams": q.streams,
            "prefetched": q.prefetched,
            **self.queue_config(name),
        }

    def totals(self) -> dict[str, int]:
        queues = self._queues.values()
        return {
            "queues": len(self._queues),
            "ready": sum(len(q.ready) for q in queues),
            "reserved": len(self._leases),
            "waiters": sum(len(q.waiters) for q in queues),
            "bytes": sum(q.bytes for q in queues),
            "put_total": sum(q.put_total for q in queues),
            "delivered_total": sum(q.delivered_total for q in queues),
        }

    def all_waiters(self) -> list[Waiter | Putter | Joiner]:
        """Every parked dequeuer, put and join (a stopping broker wakes them)."""
        parked: dict[Waiter | Putter | Joiner, None] = {}  # (one waiting on several: once)
        for q in self._queues.values():
            parked.update(dict.fromkeys([*q.waiters, *q.putters]))
        for joiners in self._joiners.values():
            parked.update(dict.fromkeys(joiners))
        return list(parked)

    def snapshot_size(self) -> int:
        """Roughly the bytes a snapshot takes."""
        return self.live_bytes + 24 * len(self._keys)

    def holds_messages(self) -> bool:
        return self.live_bytes > 0
