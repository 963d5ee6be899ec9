"""The broker's state as a plain object: queues, waiters, leases, timers.

Theory of operation
-------------------
:class:`BrokerCore` knows nothing of trio, sockets, files or clocks. The I/O
layer calls its methods and passes the current wall-clock time in; every
method changes the state completely before it returns, so there is never an
``await`` in the middle of a state change.

**Write-ahead.** Every change is first described as a journal record
(:mod:`brokerq.records`) and handed to the ``write`` callable the I/O layer
gave the core; only if that returns does the state change. A write that
fails (a full disk) therefore fails the request and changes nothing.
:meth:`BrokerCore.apply` replays records at start.

**Order and fairness.** Each queue holds its ready messages in id order,
which is their arrival order; a message that comes back (released, its
lease expired, its reply not written) returns to its place by id, so order
is kept. Dequeuers that wait (:class:`Waiter`) are kept in the order they
began to wait. A queue never has both: a message that arrives while someone
waits is handed straight to the longest waiter, and a dequeuer only waits
when nothing is ready, so no newcomer can overtake a waiter.

**Leases.** ``reserve`` hands a message out under a lease: it stays the
broker's until acked. A lease that runs out, a release, or the close of the
connection that holds it (its ``owner``) puts the message back; after
``max_deliveries`` deliveries without an ack it moves to ``<queue>:dead``.
Every lease verb names the delivery attempt, so a late ack for an attempt
whose lease already ran out is refused (:class:`~brokerq.errors.LeaseLost`).

**Timers** (lease expiries, delayed messages) are data: one heap, entries
checked lazily when they come due (:meth:`tick`); no task per message.

**Unfinished tasks** (``task_done``, ``join``: queue.Queue's count, per
queue, shared by every client). A put adds one task per message; a
``task_done`` takes ``n`` away, refused past the count; a get leaves the
count as it is (its consumer owes a ``task_done``); any other way a message
leaves (acked, purged, expired, buried, dead-lettered out of the queue)
finishes its task, and one that comes back from outside (kicked, a dead
letter arriving) adds one. Those removals never take the count below 0: a
``task_done`` may have come for a message before anyone got it (the stdlib
allows that), and a count of 0 then must not turn into a debt that hides
the next put from a ``join``. Parked joins (:class:`~brokerq.state.Joiner`)
are checked by :meth:`joins_done`, which the I/O layer calls after every
change.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import msgspec

from ..errors import Full, InvalidRequest, LeaseLost, MessageTooLarge, QueueFull
from ..protocol import MESSAGE_OVERHEAD, validate_lease, validate_queue_name
from .records import (
    AnyRecord,
    AttemptsRecord,
    ConfigRecord,
    DeleteRecord,
    DropQueueRecord,
    KeysRecord,
    MoveRecord,
    NextIdRecord,
    PutRecord,
    StateRecord,
    SubscribeRecord,
    UnfinishedRecord,
)
from .state import Expiry, Joiner, Lease, Message, Putter, QueueState, Stream, Waiter
from .topics import Topics

DEAD_SUFFIX = ":dead"
#: How many recent put keys are remembered to drop retried puts.
KEY_WINDOW = 100_000
MIN_PRIORITY = -(2**31)
MAX_PRIORITY = 2**31 - 1
#: When a timer's journal write fails for a full disk, it is tried again this much later.
TIMER_RETRY_SECONDS = 1.0
#: Bytes counted per live message beyond its body, to size the journal.
LIVE_OVERHEAD = 64


class BrokerCore:
    """All queues of one broker, driven by method calls (see module doc)."""

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
        """Write ``record``; on a full disk, keep it to write before the next one.

        For changes that must happen whatever the disk says (a message whose
        reply could not be sent goes back, a lease that ended lets go): the
        memory state changes now, and the journal catches up as soon as there
        is room (every later write first writes what is owed, in order).
        """
        try:
            self._write(record)
        except Full:
            self._owed.append(record)

    # -- enqueue ---------------------------------------------------------

    def put(
        self,
        name: str,
        body: bytes,
        now: float,
        key: bytes | None = None,
        **options: Any,
    ) -> tuple[int, Waiter | None]:
        """Enqueue ``body``; return its id and the waiter it went to, if any.

        A ``key`` seen recently (a retried put) returns the first put's id
        and enqueues nothing. ``options`` as for :meth:`put_many`.
        """
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

        ``priority``: higher is delivered first (FIFO within a priority).
        ``delay``: seconds before the messages become ready. ``ttl``: seconds
        after which a message still waiting (ready or delayed) is dropped.
        """
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
            if len(body) > self.max_message_size:
                raise MessageTooLarge(
                    f"a body of {len(body)} bytes is over max_message_size {self.max_message_size}"
                )
        ids: list[int] = []
        new: list[tuple[int, bytes, bytes | None]] = []
        next_id = self._next_id
        for i, body in enumerate(bodies):
            key = None if keys is None else keys[i] or None  # b"": no key
            seen = None if key is None else self._keys.get(key)
            if seen is not None:
                ids.append(seen)
                continue
            ids.append(next_id)
            new.append((next_id, body, key))
            next_id += 1
        if not new:
            return ids, []
        q = self._queue(name)
        # The longest waiters get the first messages, in the same write
        # (unless the messages are delayed, or others of a higher priority wait).
        ready_now = delay == 0 and not q.ready and not q.streams  # (streams: below)
        waiters = list(itertools.islice(q.waiters, len(new))) if ready_now else []
        handoffs = list(zip([n[0] for n in new], waiters, strict=False))
        taken = sum(1 for _, w in handoffs if w.lease is None)  # they need no room
        if self.max_total_bytes:
            self._check_total(new[taken:])
        if q.maxsize or self._max_bytes(q):
            self._check_room(q, new[taken:], admitting)
        until = now + delay
        expires_at = math.inf if ttl is None else now + ttl
        bodies = [n[1] for n in new]
        # A body taken by a waiting get in this same record is never live
        # after a replay, so it is not written: a 64 KiB body handed straight
        # to a consumer costs the journal a few bytes. (A reply that cannot
        # be written puts its message back with the body, core.undeliver.)
        for i, (_, waiter) in enumerate(handoffs):
            if waiter.lease is None:
                bodies[i] = b""
        self._write(
            PutRecord(
                queue=name,
                ids=[n[0] for n in new],
                bodies=bodies,
                at=now,
                keys=None if keys is None else [n[2] or b"" for n in new],
                taken=[i for i, w in handoffs if w.lease is None] or None,
                leased=[i for i, w in handoffs if w.lease is not None] or None,
                priority=priority,
                not_before=until if delay else 0.0,
                expires_at=0.0 if ttl is None else expires_at,
            )
        )
        self._next_id = next_id
        if keys is not None:
            self._remember_keys(new)
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
            self._deliver(q, msg, waiter, now, journaled=True)
        if delay:  # (then no waiter was handed anything)
            for msg in messages:
                self._delay(q, msg, until)
        else:
            q.ready.extend(messages[len(waiters) :], priority)
        if q.streams:
            waiters = waiters + self._serve_line(q, now)
        return ids, waiters

    def _max_bytes(self, q: QueueState) -> int:
        """The body bytes ``q`` may hold: its own max_bytes, else the broker's default."""
        return q.max_bytes or self.max_queue_bytes

    def _check_total(self, new: list[tuple[int, bytes, bytes | None]]) -> None:
        """Raise Full (not QueueFull: it does not wait) if ``new`` would take
        what the broker holds (``live_bytes``) past ``max_total_bytes``."""
        size = sum(len(n[1]) + LIVE_OVERHEAD for n in new)
        if size and self.live_bytes + size > self.max_total_bytes:
            raise Full(
                f"the broker holds {self.live_bytes} bytes of messages: {size} more would "
                f"pass its limit of {self.max_total_bytes} (max_total_bytes)"
            )

    def _check_room(
        self, q: QueueState, new: list[tuple[int, bytes, bytes | None]], admitting: bool
    ) -> None:
        """Raise QueueFull unless ``new`` fits in ``q`` now (and no putter is ahead)."""
        count, size = len(new), sum(len(n[1]) for n in new)
        max_bytes = self._max_bytes(q)
        if (q.maxsize and count > q.maxsize) or (max_bytes and size > max_bytes):
            raise Full(
                f"{count} message(s) of {size} bytes can never fit in {q.name!r} "
                f"(maxsize {q.maxsize or 'unlimited'}, max_bytes {max_bytes or 'unlimited'})"
            )
        held = len(q.ready) + q.delayed + q.reserved + len(q.buried) + q.prefetched
        fits = (not q.maxsize or held + count <= q.maxsize) and (
            not max_bytes or q.bytes + size <= max_bytes
        )
        if not fits or (q.putters and not admitting):
            raise QueueFull(f"queue {q.name!r} is full")

    def _has_room(self, name: str, size: int) -> bool:
        """Whether one more message of ``size`` bytes fits in queue ``name`` now."""
        if self.max_total_bytes and self.live_bytes + size + LIVE_OVERHEAD > self.max_total_bytes:
            return False
        q = self._queues.get(name)
        if q is None:
            return not self.max_queue_bytes or size <= self.max_queue_bytes
        if q.putters:
            return False
        held = len(q.ready) + q.delayed + q.reserved + len(q.buried) + q.prefetched
        max_bytes = self._max_bytes(q)
        return (not q.maxsize or held < q.maxsize) and (
            not max_bytes or q.bytes + size <= max_bytes
        )

    def wait_put(
        self,
        name: str,
        bodies: list[bytes],
        keys: list[bytes] | None,
        options: dict[str, Any],
        token: object = None,
    ) -> Putter:
        """Park a put that did not fit (QueueFull) at the back of the putters' line."""
        putter = Putter(name, bodies, keys, options, token)
        self._queue(name).putters[putter] = None
        return putter

    def cancel_put(self, putter: Putter, now: float) -> list[Putter | Waiter]:
        """Withdraw a parked put (timeout, disconnect); the next may fit now."""
        q = self._queue(putter.queue)
        q.putters.pop(putter, None)
        return self.admit_putters(q.name, now)

    def admit_putters(self, name: str, now: float) -> list[Putter | Waiter]:
        """Enqueue parked puts, in order, while the first one fits.

        Returns the putters admitted and the waiters their messages went to.
        """
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

    def _remember_keys(self, new: list[tuple[int, bytes, bytes | None]]) -> None:
        """:meth:`_remember_key` for each new message's key, if it has one."""
        known, order = self._keys, self._key_order
        for msg_id, _, key in new:
            if key is not None:
                if key not in known:
                    order.append(key)
                known[key] = msg_id
        while len(order) > KEY_WINDOW:
            del known[order.popleft()]

    def _remember_key(self, key: bytes, msg_id: int) -> None:
        if key not in self._keys:
            self._key_order.append(key)
        self._keys[key] = msg_id
        if len(self._key_order) > KEY_WINDOW:
            del self._keys[self._key_order.popleft()]

    # -- dequeue ---------------------------------------------------------

    def get_nowait(self, name: str, n: int = 1, max_bytes: int | None = None) -> list[Message]:
        """Remove and return up to ``n`` ready messages (maybe none).

        ``max_bytes`` bounds the batch's encoded size (each body plus
        :data:`~brokerq.protocol.MESSAGE_OVERHEAD`) so it fits in one reply
        frame; the first message is always taken.
        """
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
        body_bytes = 0
        for msg in taken:
            msg.alive = False
            body_bytes += len(msg.body)
        self._forgot(q, body_bytes, len(taken))
        q.delivered_total += len(taken)
        return taken

    def reserve_nowait(
        self, name: str, now: float, lease: float | None = None, owner: object = None
    ) -> Message | None:
        """Lease the head message of ``name`` to ``owner``, or None if none is ready."""
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
        """Park a dequeuer at the back of the line. Call only when nothing is ready.

        ``lease`` not None makes it a reserve: what it is handed comes leased.
        """
        validate_queue_name(name)
        q = self._queue(name)
        assert not q.ready, "wait() while messages are ready would break fair handoff"
        waiter = Waiter(name, token, lease, owner)
        q.waiters[waiter] = None
        return waiter

    def cancel_wait(self, waiter: Waiter, now: float) -> list[Waiter]:
        """Withdraw a waiter; messages already handed to it go back to the head.

        Returns the waiters those messages went to instead (to be woken).
        """
        q = self._queues.get(waiter.queue)
        if q is None:  # pragma: no cover - queues are never dropped while waited on
            return []
        q.waiters.pop(waiter, None)
        messages, waiter.messages = waiter.messages, []
        # The leases handed to this waiter, not those the messages hold now:
        # one may have run out and the message gone to another consumer since.
        leases, waiter.leases = waiter.leases, []
        return self.undeliver(messages, now, None if waiter.lease is None else leases)

    def leases_of(self, messages: list[Message]) -> list[Lease | None]:
        """The leases these messages hold now (to undo exactly these deliveries later)."""
        return [self._leases.get(m.id) for m in messages]

    def undeliver(
        self, messages: list[Message], now: float, leases: list[Lease | None] | None = None
    ) -> list[Waiter]:
        """Take back messages whose reply was never written; they return to
        their place at the head of their queue. For a reserve, ``leases`` are
        the leases that reply handed out: each is dropped and its attempt not
        counted, unless it already ended (expired, and maybe delivered to
        someone else since). Returns the waiters they went to."""
        woken: list[Waiter] = []
        for i, msg in enumerate(messages):
            q = self._queue(msg.queue)
            if leases is not None:
                lease = self._leases.get(msg.id)
                if lease is None or lease is not leases[i]:
                    continue  # that delivery already ended: nothing to undo
                self._write_or_owe(AttemptsRecord(id=msg.id, attempts=msg.attempts - 1))
                q.delivered_total -= 1
                msg.attempts -= 1
                self._drop_lease(q, lease)
            else:
                self._write_or_owe(_put_record_of(msg, msg.attempts, returned=True))
                q.delivered_total -= 1
                msg.alive = True
                q.bytes += len(msg.body)
                self.live_bytes += len(msg.body) + LIVE_OVERHEAD
            woken += self._make_ready(q, msg, now)
        return woken

    def _deliver(
        self, q: QueueState, msg: Message, waiter: Waiter, now: float, journaled: bool = False
    ) -> None:
        """Hand ``msg`` (already off the ready list) to ``waiter``.

        ``journaled``: the record that says so was already written (a put's).
        """
        if type(waiter) is Stream:
            self._offer(q, msg, waiter)
            return
        if waiter.lease is not None:
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
            served.append(waiter)
        return served

    def _make_ready(self, q: QueueState, msg: Message, now: float) -> list[Waiter]:
        """Put ``msg`` back among the ready ones, at its place by id."""
        q.ready.insert(msg)
        return self._hand_to_waiters(q, now)

    def admit_freed(self, now: float) -> list[Putter | Waiter]:
        """Admit parked puts of every queue that had room freed since the last call."""
        woken: list[Putter | Waiter] = []
        while self.freed:
            woken += self.admit_putters(self.freed.pop(), now)
        return woken

    def _forget(self, q: QueueState, msg: Message) -> None:
        msg.alive = False
        self._forgot(q, len(msg.body), 1)

    def _forgot(self, q: QueueState, body_bytes: int, count: int) -> None:
        """``count`` messages of ``q`` with ``body_bytes`` in all are gone for good."""
        if q.putters:
            self.freed.add(q.name)
        q.bytes -= body_bytes
        self.live_bytes -= body_bytes + LIVE_OVERHEAD * count

    @staticmethod
    def _finished(q: QueueState, count: int = 1) -> None:
        """``count`` messages left ``q`` other than by a get: their tasks are
        done (never below 0, see the module doc; replay clamps the same way)."""
        q.unfinished = max(0, q.unfinished - count)

    # -- streams (consume): prefetching consumers ------------------------------

    def consume(
        self,
        name: str,
        prefetch: int,
        now: float,
        *,
        lease: float | None = None,
        reserve: bool = False,
        token: object = None,
        owner: object = None,
        stream_id: int = 0,
    ) -> tuple[Stream, list[Waiter]]:
        """Open a stream on ``name``: a waiter with ``prefetch`` credits at the
        back of the line (see :class:`~brokerq.state.Stream`). Returns it and
        the waiters served (itself, if messages were ready).

        A message delivered to it is not removed, nor leased: it stays the
        broker's (ready, in the journal) until :meth:`taken`, which removes it
        (get mode) or leases it to ``owner`` for the stream's lease (reserve
        mode: ``lease``, else the queue's, else the broker's), and returns the
        credit; :meth:`cancel_stream` gives back what was not taken.
        """
        validate_queue_name(name)
        if isinstance(prefetch, bool) or prefetch < 1:
            raise InvalidRequest(f"prefetch must be 1 or more, not {prefetch}")
        validate_lease(lease)
        q = self._queue(name)
        length = (lease or q.lease or self.default_lease) if reserve else None
        stream = Stream(name, prefetch, length, token=token, owner=owner, stream_id=stream_id)
        q.streams += 1
        q.waiters[stream] = None
        return stream, self._serve_line(q, now)

    def _offer(self, q: QueueState, msg: Message, stream: Stream) -> None:
        """Deliver ``msg`` (off the ready list) to ``stream``: held, not removed."""
        stream.credit -= 1
        stream.held.append(msg)
        stream.messages.append(msg)
        self._prefetched[msg.id] = msg
        q.prefetched += 1

    def _serve_line(self, q: QueueState, now: float) -> list[Waiter]:
        """Serve the line of a queue with streams after a change that is made
        whatever happens here (a put, which hands nothing over in its own
        record when streams wait; a taken; a stream's end). On a full disk
        (a plain get's removal record) the messages wait, ready, for the
        next change of the queue."""
        try:
            return self._hand_to_waiters(q, now)
        except Full:
            return []

    def taken(self, stream: Stream, n: int, now: float) -> list[Waiter]:
        """The client took the first ``n`` messages delivered to ``stream`` and
        not taken yet: get mode removes them (as a get does), reserve mode
        leases each to the stream's owner. Their credit comes back: the
        stream rejoins the back of the line if it had left it. Returns the
        waiters served.

        The client has handed them out already, so this happens whatever
        the disk says: a record a full disk refuses is written before the
        next one (``_write_or_owe``). Messages that went meanwhile (their
        queue deleted) only give their credit back.
        """
        if isinstance(n, bool) or not 1 <= n <= len(stream.held):
            raise InvalidRequest(
                f"taken {n} of stream {stream.stream_id}, which has "
                f"{len(stream.held)} message(s) delivered and not taken"
            )
        q = self._queue(stream.queue)
        held = stream.held
        messages = [held.popleft() for _ in range(n)]
        live = [m for m in messages if m.alive]
        for msg in live:
            del self._prefetched[msg.id]
        q.prefetched -= len(live)
        if stream.length is None:
            if live:
                self._write_or_owe(DeleteRecord(ids=[m.id for m in live], got=True))
            for msg in live:
                self._forget(q, msg)
            q.delivered_total += len(live)
        else:
            for msg in live:
                self._write_or_owe(AttemptsRecord(id=msg.id, attempts=msg.attempts + 1))
                self._lease(q, msg, now, stream.length, stream.owner, journaled=True)
                q.delivered_total += 1
        stream.credit += n
        if stream.active and stream not in q.waiters:
            q.waiters[stream] = None
        return self._serve_line(q, now)

    def cancel_stream(self, stream: Stream, now: float) -> tuple[int, list[Waiter]]:
        """End ``stream``: it leaves the line, and every message delivered to
        it and not taken goes back to its place (nothing was written for
        them: the journal has them ready all along); one whose ttl ran out
        meanwhile is dropped. Leases of messages it had taken stay (they are
        its owner's, as a reserve's). Returns how many went back, and the
        waiters served."""
        if not stream.active:
            return 0, []
        stream.active = False
        q = self._queue(stream.queue)
        q.waiters.pop(stream, None)
        q.streams -= 1
        held = [m for m in stream.held if m.alive]
        stream.held.clear()
        stream.messages = []
        returned = 0
        for msg in held:
            del self._prefetched[msg.id]
            q.prefetched -= 1
            if msg.expires_at <= now:  # its ttl ran out while it was prefetched
                self._write_or_owe(DeleteRecord(ids=[msg.id]))
                self._forget(q, msg)
                self._finished(q)
                q.expired_total += 1
                continue
            returned += 1
            q.ready.insert(msg)
        return returned, self._serve_line(q, now)

    # -- leases ----------------------------------------------------------------

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
        length = lease if lease is not None else (q.lease or self.default_lease)
        if not journaled:
            self._write(AttemptsRecord(id=msg.id, attempts=msg.attempts + 1))
        msg.attempts += 1
        held = Lease(msg, owner, now, length)
        self._leases[msg.id] = held
        self._owned.setdefault(owner, set()).add(msg.id)
        q.reserved += 1
        self._add_timer(held.expires_at, held)
        return held

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

    def _drop_lease(self, q: QueueState, lease: Lease) -> None:
        del self._leases[lease.message.id]
        owned = self._owned.get(lease.owner)
        if owned is not None:
            owned.discard(lease.message.id)
            if not owned:
                del self._owned[lease.owner]
        q.reserved -= 1

    def ack(self, msg_id: int, attempt: int, *, as_get: bool = False) -> None:
        """The message was handled: it is gone for good, and its task done.

        ``as_get``: it goes as a get takes it, its task left for a
        task_done (the async client's get that had to wait is a reserve
        and an ack on the wire).
        """
        lease = self._lease_for(msg_id, attempt)
        q = self._queue(lease.message.queue)
        self._write(DeleteRecord(ids=[msg_id], got=as_get))
        self._drop_lease(q, lease)
        self._forget(q, lease.message)
        if not as_get:
            self._finished(q)

    def release(self, msg_id: int, attempt: int, now: float, delay: float = 0) -> list[Waiter]:
        """Give the message back: to its place at the head, or after ``delay`` seconds."""
        if not 0 <= delay < math.inf:
            raise InvalidRequest(f"delay must be a finite number >= 0, not {delay}")
        lease = self._lease_for(msg_id, attempt)
        return self._end_lease(lease, now, delay)

    def bury(self, msg_id: int, attempt: int) -> None:
        """Set the message aside (kept, not delivered) until kicked."""
        lease = self._lease_for(msg_id, attempt)
        msg = lease.message
        q = self._queue(msg.queue)
        self._write(StateRecord(id=msg_id, state="buried"))
        self._drop_lease(q, lease)
        q.buried[msg_id] = msg
        self._finished(q)

    def touch(self, msg_id: int, attempt: int, now: float, lease: float | None = None) -> float:
        """Extend a lease (by its own length, or ``lease`` seconds); returns the new expiry."""
        held = self._lease_for(msg_id, attempt)
        if lease is not None:
            held.length = lease
        held.expires_at = now + held.length
        self._add_timer(held.expires_at, held)
        return held.expires_at

    def release_owned(self, owner: object, now: float) -> list[Waiter]:
        """Everything ``owner`` (a closed connection) held goes back.

        On a full disk a lease that cannot be ended now stays until it runs
        out (its timer tries again); the others still go back.
        """
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
            self._forget(q, msg)
            self._finished(q)
            q.expired_total += 1
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

    def _move(
        self, msg: Message, src: QueueState, dst: QueueState, attempts: int, now: float
    ) -> list[Waiter]:
        """``msg`` (already out of ``src``'s lists, its task there settled by
        the caller) joins ``dst`` as ready: a new task of ``dst``."""
        src.bytes -= len(msg.body)
        if src.putters:
            self.freed.add(src.name)
        msg.queue, msg.attempts = dst.name, attempts
        dst.bytes += len(msg.body)
        dst.unfinished += 1
        return self._make_ready(dst, msg, now)

    def _delay(self, q: QueueState, msg: Message, until: float) -> None:
        self._delayed[msg.id] = (msg, until)
        q.delayed += 1
        self._add_timer(until, msg)

    def kick(self, name: str, n: int, now: float) -> tuple[int, list[Waiter]]:
        """Return up to ``n`` buried messages to ready; on ``<q>:dead``, move
        messages back to ``<q>`` with their delivery count reset."""
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

        ``maxsize`` and ``max_bytes`` count every message the queue holds
        (ready, delayed, reserved, buried); 0 means unlimited (``max_bytes``
        0: the broker's ``max_queue_bytes``, itself 0 by default). Lowering them
        below what the queue holds keeps every message; puts wait for room.
        """
        validate_queue_name(name)
        if max_deliveries is not None and max_deliveries < 1:
            raise InvalidRequest(f"max_deliveries must be >= 1, not {max_deliveries}")
        if lease is not None and not 0 < lease < math.inf:
            raise InvalidRequest(f"lease must be a finite number > 0, not {lease}")
        for limit, value in (("maxsize", maxsize), ("max_bytes", max_bytes)):
            if value is not None and value < 0:
                raise InvalidRequest(f"{limit} must be >= 0 (0: unlimited), not {value}")
        q = self._queues.get(name) or QueueState(name)
        changes = {
            "max_deliveries": max_deliveries,
            "lease": lease,
            "maxsize": maxsize,
            "max_bytes": max_bytes,
        }
        record = msgspec.structs.replace(
            _config_record_of(q), **{k: v for k, v in changes.items() if v is not None}
        )
        self._write(record)
        self._configure(record)
        return self.queue_config(name)

    def _configure(self, record: ConfigRecord) -> None:
        q = self._queue(record.queue)
        q.max_deliveries, q.lease = record.max_deliveries, record.lease
        q.maxsize, q.max_bytes = record.maxsize, record.max_bytes

    def queue_config(self, name: str) -> dict[str, Any]:
        q = self._queues.get(name) or QueueState(name)
        return {
            "max_deliveries": q.max_deliveries or self.max_deliveries,
            "lease": q.lease or self.default_lease,
            "maxsize": q.maxsize,
            "max_bytes": self._max_bytes(q),
        }

    # -- timers ----------------------------------------------------------------

    def _add_timer(self, when: float, item: Lease | Message | Expiry) -> None:
        heapq.heappush(self._timers, (when, next(self._timer_seq), item))

    def next_deadline(self) -> float | None:
        """When :meth:`tick` next has work (maybe a stale entry: then it just pops it)."""
        return self._timers[0][0] if self._timers else None

    def tick(self, now: float) -> list[Waiter]:
        """Expire leases and ttls, and release delayed messages, that are due.

        On a full disk the timer that could not write is tried again a
        second later, and the rest wait for it.
        """
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
            if self._leases.get(item.message.id) is item and item.expires_at == when:
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
        """Drop ``msg`` if its ttl ran out while it waited (ready or delayed).

        A leased message is dropped when its lease ends; a buried one is kept.
        """
        if not msg.alive or msg.id in self._leases or msg.id in self._prefetched:
            return  # (a prefetched one is dropped if it comes back: cancel_stream)
        q = self._queue(msg.queue)
        if msg.id in q.buried:
            return
        self._write(DeleteRecord(ids=[msg.id]))
        if msg.id in self._delayed:
            del self._delayed[msg.id]
            q.delayed -= 1
        else:
            q.ready.remove(msg)
        self._forget(q, msg)
        self._finished(q)
        q.expired_total += 1

    # -- inspection ------------------------------------------------------

    def peek(self, name: str) -> Message | None:
        validate_queue_name(name)
        q = self._queues.get(name)
        if q is None or not q.ready:
            return None
        return q.ready.head()

    def purge(self, name: str) -> int:
        """Drop every ready message of ``name``; return how many."""
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
        """Delete a queue: every message it holds (ready, delayed, reserved,
        buried), its settings and its unfinished tasks. Returns how many
        messages went.

        Dequeuers and puts waiting on it go on waiting on the queue of that
        name, now empty; a lease on one of its messages is gone (a late ack
        gets ``lease_lost``).
        """
        validate_queue_name(name)
        q = self._queues.get(name)
        if q is None:
            if self.topics.has_queue(name):  # subscribed, never used: drop that
                self._write(DropQueueRecord(queue=name))
                self.topics.drop_queue(name)
            return 0, []
        held = [*q.ready, *q.buried.values()]
        held += [lease.message for lease in self._leases.values() if lease.message.queue == name]
        held += [msg for msg, _ in self._delayed.values() if msg.queue == name]
        held += [msg for msg in self._prefetched.values() if msg.queue == name]
        if held:
            self._write(DeleteRecord(ids=[m.id for m in held]))
        self._write(DropQueueRecord(queue=name))
        self.topics.drop_queue(name)
        for msg in held:
            lease = self._leases.get(msg.id)
            if lease is not None:
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

    # -- unfinished tasks: task_done and join ----------------------------

    def unfinished(self, name: str) -> int:
        """The unfinished tasks of queue ``name`` (0 for a queue never used)."""
        validate_queue_name(name)
        q = self._queues.get(name)
        return 0 if q is None else q.unfinished

    def task_done(self, name: str, n: int = 1) -> int:
        """``n`` tasks of ``name`` are done; returns how many are left.

        More than the count is refused (InvalidRequest, a ValueError, as
        queue.Queue raises ValueError) and changes nothing. Written as the
        new count, so that replay cannot drift from it.
        """
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
        """Park a join on ``name`` (the I/O layer parks one only while the
        queue has unfinished tasks; :meth:`joins_done` says when it has none)."""
        validate_queue_name(name)
        joiner = Joiner(name, token)
        self._joiners.setdefault(name, {})[joiner] = None
        return joiner

    def cancel_join(self, joiner: Joiner) -> None:
        """Withdraw a parked join (done, timed out, its connection gone)."""
        joiners = self._joiners.get(joiner.queue)
        if joiners is not None:
            joiners.pop(joiner, None)
            if not joiners:
                del self._joiners[joiner.queue]

    def joins_done(self) -> list[Joiner]:
        """The parked joins whose queue has no unfinished task now: each is
        marked done and leaves the line (the I/O layer wakes them). Costs
        nothing while nobody joins; else one look per queue joined."""
        if not self._joiners:
            return []
        done: list[Joiner] = []
        queues = self._queues
        for name in [n for n in self._joiners if n not in queues or not queues[n].unfinished]:
            for joiner in self._joiners.pop(name):
                joiner.done = True
                done.append(joiner)
        return done

    # -- topics ----------------------------------------------------------

    def subscribe(self, topic: str, queue: str) -> bool:
        """Give ``queue`` a copy of every later publish to ``topic`` (journaled).

        Returns False if it was subscribed already (nothing is written).
        """
        validate_queue_name(topic, what="topic", for_put=True)
        validate_queue_name(queue, for_put=True)
        if self.topics.subscribes(topic, queue):
            return False
        self._write(SubscribeRecord(topic=topic, queue=queue))
        self.topics.add_queue(topic, queue)
        return True

    def unsubscribe(self, topic: str, queue: str) -> bool:
        """End ``queue``'s subscription to ``topic``; False if it had none."""
        validate_queue_name(topic, what="topic", for_put=True)
        validate_queue_name(queue, for_put=True)
        if not self.topics.subscribes(topic, queue):
            return False
        self._write(SubscribeRecord(topic=topic, queue=queue, on=False))
        return self.topics.remove_queue(topic, queue)

    def watch(self, topic: str, token: object) -> None:
        """Make ``token`` (a connection) a live subscriber of ``topic``."""
        validate_queue_name(topic, what="topic", for_put=True)
        self.topics.add_live(topic, token)

    def unwatch(self, topic: str, token: object) -> bool:
        validate_queue_name(topic, what="topic", for_put=True)
        return self.topics.remove_live(topic, token)

    def unwatch_all(self, token: object) -> None:
        self.topics.remove_live_everywhere(token)

    def publish(
        self,
        topic: str,
        body: bytes,
        now: float,
        key: bytes | None = None,
        *,
        priority: int = 0,
        ttl: float | None = None,
    ) -> tuple[int, list[object], list[Waiter]]:
        """Copy ``body`` to every subscriber of ``topic``.

        Each subscriber queue gets an ordinary put (its waiters are served
        as for any put); a queue that is full (``maxsize``/``max_bytes``)
        does not get this copy, and the topic's ``dropped_total`` counts it:
        a publish never waits. Returns the number of copies enqueued, the
        live subscribers' tokens (the I/O layer sends them the body), and
        the waiters woken.

        With a ``key``, each copy is put with a key derived from it and the
        queue's name, so a retried publish makes only the copies that are
        still missing.
        """
        validate_queue_name(topic, what="topic", for_put=True)
        if len(body) > self.max_message_size:
            raise MessageTooLarge(
                f"a body of {len(body)} bytes is over max_message_size {self.max_message_size}"
            )
        found = self.topics.get(topic)
        if found is None:
            return 0, [], []
        found.published_total += 1
        copies, woken = 0, []
        for name in list(found.queues):
            if not self._has_room(name, len(body)):
                found.dropped_total += 1
                continue
            copy_key = None if key is None else [key + b"@" + name.encode()]
            _, served = self.put_many(name, [body], now, copy_key, priority=priority, ttl=ttl)
            woken += served
            copies += 1
        return copies, list(found.live), woken

    def queue_names(self) -> list[str]:
        return sorted(self._queues)

    def queue_stats(self, name: str, now: float) -> dict[str, Any]:
        """The stats of one queue (all zero for a queue never used)."""
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
        """Sums over every queue, for the broker's stats."""
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
        """Every parked dequeuer, put and join (a stopping broker wakes them all)."""
        parked: list[Waiter | Putter | Joiner] = []
        for q in self._queues.values():
            parked += q.waiters
            parked += q.putters
        for joiners in self._joiners.values():
            parked += joiners
        return parked

    def snapshot_size(self) -> int:
        """Roughly the bytes a snapshot takes: live messages and the key window."""
        return self.live_bytes + 24 * len(self._keys)

    def holds_messages(self) -> bool:
        """True while any message is held, in any state."""
        return self.live_bytes > 0

    def _queue(self, name: str) -> QueueState:
        q = self._queues.get(name)
        if q is None:
            q = self._queues[name] = QueueState(name)
        return q

    # -- recovery ----------------------------------------------------------------

    def apply(self, record: AnyRecord) -> None:
        """Replay one journal record (before serving; see :meth:`finish_replay`)."""
        if self._replayed is None:
            self._replayed = {}
        live = self._replayed
        match record:
            case PutRecord(queue=queue, ids=ids, bodies=bodies, at=at, keys=keys):
                taken = set(record.taken or ())
                leased = set(record.leased or ())
                if not record.returned:
                    self._replay_tasks(queue, len(ids))
                for i, (msg_id, body) in enumerate(zip(ids, bodies, strict=True)):
                    if keys and keys[i]:
                        self._remember_key(keys[i], msg_id)
                    self._next_id = max(self._next_id, msg_id + 1)
                    if msg_id not in taken:
                        attempts = record.attempts + (msg_id in leased)
                        expires_at = record.expires_at or math.inf
                        msg = Message(
                            msg_id,
                            queue,
                            body,
                            at,
                            attempts,
                            priority=record.priority,
                            expires_at=expires_at,
                        )
                        if record.not_before:
                            live[msg_id] = (msg, "delayed", record.not_before)
                        else:
                            live[msg_id] = (msg, "ready", 0)
            case DeleteRecord(ids=ids, got=got):
                for msg_id in ids:
                    entry = live.pop(msg_id, None)
                    if entry is not None and not got and entry[1] != "buried":
                        self._replay_tasks(entry[0].queue, -1)  # (read before it went)
            case AttemptsRecord(id=msg_id, attempts=attempts) if msg_id in live:
                live[msg_id][0].attempts = attempts
            case StateRecord(id=msg_id, state=state, until=until) if msg_id in live:
                msg, before, _ = live[msg_id]
                if (before == "buried") != (state == "buried"):  # buried, or kicked
                    self._replay_tasks(msg.queue, 1 if before == "buried" else -1)
                live[msg_id] = (msg, state, until)
            case MoveRecord(id=msg_id, queue=queue, attempts=attempts) if msg_id in live:
                msg, before, _ = live[msg_id]
                if before != "buried":
                    self._replay_tasks(msg.queue, -1)
                self._replay_tasks(queue, 1)
                msg.queue, msg.attempts = queue, attempts
                live[msg_id] = (msg, "ready", 0)
            case UnfinishedRecord(queue=queue, count=count):
                self._replayed_tasks[queue] = count
            case ConfigRecord():
                self._configure(record)
            case DropQueueRecord(queue=queue):
                self._queues.pop(queue, None)
                self._replayed_tasks.pop(queue, None)
                self.topics.drop_queue(queue)
            case SubscribeRecord(topic=topic, queue=queue, on=on):
                if on:
                    self.topics.add_queue(topic, queue)
                else:
                    self.topics.remove_queue(topic, queue)
            case KeysRecord(keys=keys, ids=ids):
                for key, msg_id in zip(keys, ids, strict=True):
                    self._remember_key(key, msg_id)
            case NextIdRecord(next_id=next_id):
                self._next_id = max(self._next_id, next_id)

    def _replay_tasks(self, queue: str, change: int) -> None:
        """Replay a change to ``queue``'s unfinished tasks (clamped at 0, as
        :meth:`_finished` does)."""
        tasks = self._replayed_tasks
        tasks[queue] = max(0, tasks.get(queue, 0) + change)

    def finish_replay(self, now: float) -> int:
        """Build the queues from the replayed records; returns how many messages came back.

        Messages that were reserved when the broker stopped are ready again
        (their leases died with it), with their delivery counts. Messages
        whose ttl ran out while no broker ran are dropped, and the record
        that says so is written ahead of this broker's first record: the
        unfinished tasks they took with them are then counted at this
        point by every later replay too, not after the records this broker
        writes.
        """
        live, self._replayed = self._replayed or {}, None
        restored = 0
        dropped: list[int] = []
        for msg_id in sorted(live):
            msg, state, until = live[msg_id]
            q = self._queue(msg.queue)
            if msg.expires_at <= now and state != "buried":
                dropped.append(msg_id)  # its ttl ran out while no broker ran
                self._replay_tasks(msg.queue, -1)
                continue
            restored += 1
            if msg.expires_at < math.inf:
                self._add_timer(msg.expires_at, Expiry(msg))
            q.bytes += len(msg.body)
            self.live_bytes += len(msg.body) + LIVE_OVERHEAD
            if state == "buried":
                q.buried[msg_id] = msg
            elif state == "delayed" and until > now:
                self._delay(q, msg, until)
            else:
                q.ready.append(msg)
        if dropped:
            self._owed.append(DeleteRecord(ids=dropped))
        tasks, self._replayed_tasks = self._replayed_tasks, {}
        for name, count in tasks.items():
            if count:
                self._queue(name).unfinished = count
        return restored

    def snapshot(self) -> list[AnyRecord]:
        """Records that rebuild the current state (for compaction)."""
        records: list[AnyRecord] = [NextIdRecord(next_id=self._next_id)]
        leased: dict[str, list[Message]] = {}
        for lease in self._leases.values():
            leased.setdefault(lease.message.queue, []).append(lease.message)
        delayed: dict[str, list[Message]] = {}
        for msg, _ in self._delayed.values():
            delayed.setdefault(msg.queue, []).append(msg)
        prefetched: dict[str, list[Message]] = {}  # ready, as far as the journal knows
        for msg in self._prefetched.values():
            prefetched.setdefault(msg.queue, []).append(msg)
        for q in self._queues.values():
            if q.max_deliveries is not None or q.lease is not None or q.maxsize or q.max_bytes:
                records.append(_config_record_of(q))
            held = [*q.ready, *q.buried.values(), *leased.get(q.name, ()), *delayed.get(q.name, ())]
            held += prefetched.get(q.name, ())
            records += [_put_record_of(msg, msg.attempts) for msg in held]
            records += [StateRecord(id=msg_id, state="buried") for msg_id in q.buried]
            if q.unfinished or len(q.ready) + q.delayed + q.reserved + q.prefetched:
                # After the puts above, which count a task each: the count as it is.
                records.append(UnfinishedRecord(queue=q.name, count=q.unfinished))
        records += [
            StateRecord(id=msg.id, state="delayed", until=until)
            for msg, until in self._delayed.values()
        ]
        records += [SubscribeRecord(topic=t, queue=q) for t, q in self.topics.subscriptions()]
        if self._keys:
            order = list(self._key_order)
            records.append(KeysRecord(keys=order, ids=[self._keys[k] for k in order]))
        return records


def _put_record_of(msg: Message, attempts: int = 0, *, returned: bool = False) -> PutRecord:
    """The record that brings ``msg`` back as it is (ready, by default);
    ``returned``: a message a get had taken, back (not a new task)."""
    return PutRecord(
        queue=msg.queue,
        ids=[msg.id],
        bodies=[msg.body],
        at=msg.enqueued_at,
        attempts=attempts,
        priority=msg.priority,
        expires_at=0.0 if msg.expires_at == math.inf else msg.expires_at,
        returned=returned,
    )


def _config_record_of(q: QueueState) -> ConfigRecord:
    return ConfigRecord(
        queue=q.name,
        max_deliveries=q.max_deliveries,
        lease=q.lease,
        maxsize=q.maxsize,
        max_bytes=q.max_bytes,
    )
