"""What every concern of the core shares: the state, the write-ahead of
journal records, and the handoff of a message to a waiter and back."""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator

from ...errors import Full, MessageTooLarge
from .records import AnyRecord, AttemptsRecord, ConfigRecord, DeleteRecord, PutRecord
from .state import Expiry, Joiner, Lease, Message, QueueState, Stream, Topics, Waiter

DEAD_SUFFIX = ":dead"
#: How many recent put keys are remembered to drop retried puts.
KEY_WINDOW = 100_000
#: When a timer's journal write fails for a full disk, it is tried again this much later.
TIMER_RETRY_SECONDS = 1.0
#: Bytes counted per live message beyond its body, to size the journal.
LIVE_OVERHEAD = 64


class CoreBase:
    def __init__(
        self,
        *,
        max_message_size: int,
        max_deliveries: int = 20,
        default_lease: float = 30.0,
        write: Callable[[AnyRecord], None] | None = None,
        max_queue_bytes: int = 0,
        max_total_bytes: int = 0,
    ) -> None:
        self.max_message_size = max_message_size
        self.max_deliveries = max_deliveries
        self.default_lease = default_lease
        self.write = write
        #: The max_bytes of a queue without one of its own (0: unlimited).
        self.max_queue_bytes = max_queue_bytes
        #: The most ``live_bytes`` held over every queue (0: unlimited); a put over it is Full.
        self.max_total_bytes = max_total_bytes
        #: What every message held takes: its body and LIVE_OVERHEAD.
        self.live_bytes = 0
        self._queues: dict[str, QueueState] = {}
        self._next_id = 1
        # Recent put keys: a dict to look up, a deque for their age (both O(1);
        # an OrderedDict's popitem is several times slower on this hot path).
        self._keys: dict[bytes, int] = {}
        self._key_order: deque[bytes] = deque()
        self._leases: dict[int, Lease] = {}
        self._owned: dict[object, set[int]] = {}
        self._delayed: dict[int, tuple[Message, float]] = {}
        #: Messages delivered to streams and not taken yet, by id (see consume).
        self._prefetched: dict[int, Message] = {}
        self._timers: list[tuple[float, int, Lease | Message | Expiry]] = []
        self._timer_seq = itertools.count()
        self._replayed: dict[int, tuple[Message, str, float]] | None = None
        #: Each queue's unfinished tasks as the records replayed so far say.
        self._replayed_tasks: dict[str, int] = {}
        self._owed: deque[AnyRecord] = deque()
        #: Parked joins by queue, in the order they began to wait.
        self._joiners: dict[str, dict[Joiner, None]] = {}
        #: Queues where room was freed while puts wait (see admit_freed).
        self.freed: set[str] = set()
        self.topics = Topics()

    def _write(self, record: AnyRecord) -> None:
        if self.write is not None:
            while self._owed:  # records a full disk refused must go first, in order
                self.write(self._owed[0])
                self._owed.popleft()
            self.write(record)

    def _write_or_owe(self, record: AnyRecord) -> None:
        """Write ``record``, or on a full disk keep it to write before the next
        one: for changes made whatever the disk says (a reply that could not
        be sent, a lease that ended), the journal catches up when it can."""
        try:
            self._write(record)
        except Full:
            self._owed.append(record)

    def _queue(self, name: str) -> QueueState:
        return self._queues.get(name) or self._queues.setdefault(name, QueueState(name))

    def _max_bytes(self, q: QueueState) -> int:
        return q.max_bytes or self.max_queue_bytes

    def _check_size(self, body: bytes) -> None:
        if len(body) > self.max_message_size:
            raise MessageTooLarge(
                f"a body of {len(body)} bytes is over max_message_size {self.max_message_size}"
            )

    def _remember_keys(self, pairs: Iterable[tuple[bytes | None, int]]) -> None:
        known, order = self._keys, self._key_order
        for key, msg_id in pairs:
            if key:
                if key not in known:
                    order.append(key)
                known[key] = msg_id
        while len(order) > KEY_WINDOW:
            del known[order.popleft()]

    def _deliver(
        self, q: QueueState, msg: Message, waiter: Waiter, now: float, journaled: bool = False
    ) -> None:
        """Hand ``msg`` (already off the ready list) to ``waiter``; ``journaled``:
        the record that says so was already written (a put's)."""
        if type(waiter) is Stream:  # offered, not removed nor leased (see consume)
            waiter.credit -= 1
            waiter.held.append(msg)
            waiter.messages.append(msg)
            self._prefetched[msg.id] = msg
            q.prefetched += 1
            return
        if waiter.lease is not None:  # a reserve's (QUEUE_LEASE: the queue's lease)
            lease = self._lease(q, msg, now, waiter.lease, waiter.owner, journaled=journaled)
            waiter.leases.append(lease)
        else:
            if not journaled:
                self._write(DeleteRecord(ids=[msg.id], got=True))
            self._forget(q, msg)
        q.delivered_total += 1
        waiter.messages.append(msg)

    def _hand_to_waiters(self, q: QueueState, now: float) -> list[Waiter]:
        served: list[Waiter] = []
        while q.ready and q.waiters:
            waiter = next(iter(q.waiters))
            self._deliver(q, q.ready.head(), waiter, now)  # may raise: nothing moved yet
            q.ready.popleft()
            if type(waiter) is Stream and waiter.credit:
                q.waiters.move_to_end(waiter)  # round robin: to the back of the line
            else:
                del q.waiters[waiter]
                if waiter.queues:
                    self._leave_lines(waiter)
            served.append(waiter)
        return served

    def _leave_lines(self, waiter: Waiter) -> None:
        """A waiter on several queues, served, cancelled or gone, leaves every
        line it waits in: no other queue may hand it a message too."""
        for name in waiter.queues:
            q = self._queues.get(name)
            if q is not None:
                q.waiters.pop(waiter, None)

    def _make_ready(self, q: QueueState, msg: Message, now: float) -> list[Waiter]:
        q.ready.insert(msg)
        return self._hand_to_waiters(q, now)

    def _serve_line(self, q: QueueState, now: float) -> list[Waiter]:
        """Serve the line after a change made whatever happens here; on a full
        disk the messages wait, ready, for the queue's next change."""
        try:
            return self._hand_to_waiters(q, now)
        except Full:
            return []

    def _forget(self, q: QueueState, msg: Message) -> None:
        msg.alive = False
        self._forgot(q, len(msg.body), 1)

    def _forgot(self, q: QueueState, body_bytes: int, count: int) -> None:
        if q.putters:
            self.freed.add(q.name)
        q.bytes -= body_bytes
        self.live_bytes -= body_bytes + LIVE_OVERHEAD * count

    @staticmethod
    def _finished(q: QueueState, count: int = 1) -> None:
        """Tasks done by messages leaving other than by a get (never below 0, see tasks.py)."""
        q.unfinished = max(0, q.unfinished - count)

    def _expired(self, q: QueueState, msg: Message) -> None:
        self._forget(q, msg)
        self._finished(q)
        q.expired_total += 1

    def _move(
        self, msg: Message, src: QueueState, dst: QueueState, attempts: int, now: float
    ) -> list[Waiter]:
        """``msg`` (out of ``src``'s lists, its task there settled) joins ``dst``: a new task."""
        src.bytes -= len(msg.body)
        if src.putters:
            self.freed.add(src.name)
        msg.queue, msg.attempts = dst.name, attempts
        dst.bytes += len(msg.body)
        dst.unfinished += 1
        return self._make_ready(dst, msg, now)

    def _lease(
        self,
        q: QueueState,
        msg: Message,
        now: float,
        lease: float | None,
        owner: object,
        *,
        journaled: bool = False,
    ) -> Lease:
        """``lease`` None or QUEUE_LEASE (0.0): the queue's (a lease asked for is > 0)."""
        length = lease or q.lease or self.default_lease
        if not journaled:
            self._write(AttemptsRecord(id=msg.id, attempts=msg.attempts + 1))
        msg.attempts += 1
        held = Lease(msg, msg.attempts, owner, length, now + length)
        self._leases[msg.id] = held
        self._owned.setdefault(owner, set()).add(msg.id)
        q.reserved += 1
        self._add_timer(held.expires_at, held)
        return held

    def _holds(self, lease: Lease | None) -> bool:
        return lease is not None and self._leases.get(lease.message.id) is lease

    def _drop_lease(self, q: QueueState, lease: Lease) -> None:
        del self._leases[lease.message.id]
        owned = self._owned.get(lease.owner)
        if owned is not None:
            owned.discard(lease.message.id)
            if not owned:
                del self._owned[lease.owner]
        q.reserved -= 1

    def _add_timer(self, when: float, item: Lease | Message | Expiry) -> None:
        heapq.heappush(self._timers, (when, next(self._timer_seq), item))

    def _delay(self, q: QueueState, msg: Message, until: float) -> None:
        self._delayed[msg.id] = (msg, until)
        q.delayed += 1
        self._add_timer(until, msg)

    def _off_the_lists(self) -> Iterator[Message]:
        yield from (lease.message for lease in self._leases.values())
        yield from (msg for msg, _ in self._delayed.values())
        yield from self._prefetched.values()

    def _configure(self, record: ConfigRecord) -> None:
        q = self._queue(record.queue)
        q.max_deliveries, q.lease = record.max_deliveries, record.lease
        q.maxsize, q.max_bytes = record.maxsize, record.max_bytes


def put_record_of(msg: Message, *, returned: bool = False) -> PutRecord:
    """The record that brings ``msg`` back as it is, ready (``returned``: not a new task)."""
    return PutRecord(
        queue=msg.queue,
        ids=[msg.id],
        bodies=[msg.body],
        at=msg.enqueued_at,
        attempts=msg.attempts,
        priority=msg.priority,
        expires_at=0.0 if msg.expires_at == math.inf else msg.expires_at,
        returned=returned,
    )


def config_record_of(q: QueueState) -> ConfigRecord:
    return ConfigRecord(q.name, q.max_deliveries, q.lease, q.maxsize, q.max_bytes)
