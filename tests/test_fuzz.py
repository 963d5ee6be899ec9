"""Property-based tests: the frame decoder, the core against a model, the broker's frames.

Three parts, all on hypothesis:

1. **The frame decoder.** Any bytes, cut anywhere, through
   :class:`~brokerq.protocol.FrameReader` and ``decode_request`` /
   ``decode_reply``: only frames, ``InvalidRequestFrame`` or
   ``RemoteProtocolError``, never another exception; valid frames built
   from the protocol's Structs survive any split and decode back equal.
2. **The core against a reference model** (:class:`CoreMachine`): puts,
   gets, reserves, get_any and reserve_any (waiters on several queues),
   lease verbs, kicks, waiters, timers, undelivered
   replies and closed connections, driven in random order; after every
   step the core must agree with a model that is plain lists and dicts:
   FIFO within priority, fair handoff, no message lost or duplicated,
   ``queue_stats`` counts, and replaying the journal records the core
   wrote rebuilds the same ready, delayed and buried messages.
3. **The broker's frame handling**: ``bench/fuzz_frames.py`` (random and
   mutated byte streams over several connections of an in-process broker)
   for a bounded time, and hypothesis streams through the same checks.

The profile keeps CI fast; ``HYPOTHESIS_PROFILE=long`` (or
``BROKERQ_TEST_FUZZ_SECONDS`` for part 3) runs longer.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import msgspec.inspect as mi
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from brokerq import protocol
from brokerq.broker.core import DEAD_SUFFIX, LIVE_OVERHEAD, BrokerCore
from brokerq.broker.core.state import QUEUE_LEASE, Lease, Message, Waiter
from brokerq.errors import LeaseLost, RemoteProtocolError
from brokerq.protocol import FrameReader, InvalidRequestFrame

settings.register_profile(
    "ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "long", max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)
#: The tests with settings of their own run this many times longer under "long".
SCALE = 25 if PROFILE == "long" else 1

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------
# 1. The frame decoder

#: Small, so that hypothesis reaches the over-the-limit path too.
FRAME_LIMIT = 4096


def _any_value() -> st.SearchStrategy[Any]:
    """Any MessagePack value that decodes back equal (no NaN, no surrogates)."""
    scalars = (
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**64 - 1)
        | st.floats(allow_nan=False)
        | st.text(max_size=20)
        | st.binary(max_size=20)
    )
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
        max_leaves=8,
    )


def _strategy_for(t: mi.Type) -> st.SearchStrategy[Any]:
    """Values of a msgspec type, as they survive a MessagePack round trip."""
    match t:
        case mi.IntType():
            return st.integers(-(2**63), 2**64 - 1)
        case mi.FloatType():
            return st.floats(allow_nan=False)
        case mi.StrType():
            return st.text(max_size=40)
        case mi.BytesType():
            return st.binary(max_size=200)
        case mi.BoolType():
            return st.booleans()
        case mi.NoneType():
            return st.none()
        case mi.UnionType(types=types):
            return st.one_of(*(_strategy_for(u) for u in types))
        case mi.ListType(item_type=item):
            return st.lists(_strategy_for(item), max_size=5)
        case mi.DictType(key_type=key, value_type=value):
            return st.dictionaries(_strategy_for(key), _strategy_for(value), max_size=4)
        case mi.AnyType():
            return _any_value()
    raise AssertionError(f"no strategy for {t!r}")  # pragma: no cover


def struct_strategy(cls: type[msgspec.Struct]) -> st.SearchStrategy[Any]:
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    return st.builds(cls, **{f.name: _strategy_for(f.type) for f in info.fields})


# Id 0 is reserved (protocol.md 2, "Request ids"): a valid request has another.
requests = st.one_of(*(struct_strategy(cls) for cls in protocol.AnyRequest.__args__)).map(
    lambda r: msgspec.structs.replace(r, id=1) if r.id == 0 else r
)
replies = st.one_of(*(struct_strategy(cls) for cls in protocol.AnyReply.__args__))


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets (any order, duplicates allowed)."""
    points = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


def frames_of(chunks: list[bytes], limit: int = FRAME_LIMIT) -> tuple[list[bytes], bool]:
    """Feed ``chunks`` one by one; the payloads, and whether the stream was refused."""
    reader = FrameReader(limit)
    payloads: list[bytes] = []
    for chunk in chunks:
        reader.feed(chunk)
        try:
            while (payload := reader.next_frame()) is not None:
                payloads.append(payload)
        except RemoteProtocolError:
            return payloads, True  # a length over the limit: the stream is done
    return payloads, False


def framed(payloads: list[bytes]) -> bytes:
    return b"".join(protocol.HEADER.pack(len(p)) + p for p in payloads)


def check_request(payload: bytes) -> None:
    request_id: object = 0
    try:
        request = protocol.decode_request(payload)
    except InvalidRequestFrame as exc:
        request_id = exc.request_id
    except RemoteProtocolError:
        pass
    else:
        assert isinstance(request, protocol.Request)
    assert isinstance(request_id, int)


def check_reply(payload: bytes) -> None:
    try:
        reply = protocol.decode_reply(payload)
    except RemoteProtocolError:
        pass
    else:
        assert isinstance(reply, protocol.Reply)


#: Garbage that looks like requests: maps with a real op and random fields.
TAGS = [cls.__struct_config__.tag for cls in protocol.AnyReply.__args__]
FIELDS = sorted(
    {f.name for cls in protocol.AnyRequest.__args__ for f in mi.type_info(cls).fields}  # type: ignore[attr-defined]
)
lookalikes = st.dictionaries(
    st.sampled_from([*FIELDS, "op", "id"]) | st.text(max_size=6), _any_value(), max_size=6
).flatmap(
    lambda d: (
        st.sampled_from([*TAGS, "nope", 7]).map(lambda op: {**d, "op": op}) | st.just(d)
    )  # no op at all
)
payloads = st.one_of(
    st.binary(max_size=100),
    lookalikes.map(msgspec.msgpack.encode),
    requests.map(msgspec.msgpack.encode).flatmap(  # a valid request, damaged
        lambda b: st.tuples(st.integers(0, max(len(b) - 1, 0)), st.binary(max_size=3)).map(
            lambda cut: b[: cut[0]] + cut[1] + b[cut[0] + 1 :]
        )
    ),
)


@given(
    data=st.binary(max_size=300) | st.lists(payloads, max_size=5).map(framed),
    cuts=st.lists(st.integers(0, 10_000), max_size=8),
)
def test_any_bytes_in_any_split_decode_to_frames_or_protocol_errors(
    data: bytes, cuts: list[int]
) -> None:
    payloads_, refused = frames_of(split(data, cuts))
    whole, refused_whole = frames_of([data])
    assert (payloads_, refused) == (whole, refused_whole)  # the split changes nothing
    for payload in payloads_:
        check_request(payload)
        check_reply(payload)


def decoded_after_split(
    frames: Sequence[protocol.Request | protocol.Reply],
    cuts: list[int],
    decode: Callable[[bytes], protocol.Request | protocol.Reply],
) -> list[protocol.Request | protocol.Reply]:
    """``frames`` encoded in a row, cut at ``cuts``, read back and decoded."""
    out = bytearray()
    for frame in frames:
        protocol.append_frame(out, frame)
    payloads_, refused = frames_of(split(bytes(out), cuts), protocol.max_frame_size(1000))
    assert not refused
    return [decode(p) for p in payloads_]


@given(frames=st.lists(requests, max_size=6), cuts=st.lists(st.integers(0, 10_000), max_size=12))
def test_valid_requests_survive_any_split(frames: list[protocol.Request], cuts: list[int]) -> None:
    assert decoded_after_split(frames, cuts, protocol.decode_request) == frames


@given(frames=st.lists(replies, max_size=6), cuts=st.lists(st.integers(0, 10_000), max_size=12))
def test_valid_replies_survive_any_split(frames: list[protocol.Reply], cuts: list[int]) -> None:
    assert decoded_after_split(frames, cuts, protocol.decode_reply) == frames


@given(frame=requests)
def test_a_request_with_id_0_is_refused_with_id_0(frame: protocol.Request) -> None:
    payload = msgspec.msgpack.encode(msgspec.structs.replace(frame, id=0))
    with pytest.raises(InvalidRequestFrame) as refused:
        protocol.decode_request(payload)
    assert refused.value.request_id == 0


@given(frame=requests, junk=st.binary(min_size=1, max_size=4))
def test_a_request_with_junk_after_its_map_is_refused(frame: protocol.Request, junk: bytes) -> None:
    payload = msgspec.msgpack.encode(frame) + junk
    with pytest.raises((InvalidRequestFrame, RemoteProtocolError)):
        protocol.decode_request(payload)


# ---------------------------------------------------------------------------
# 2. The core against a reference model

QUEUES = ["a", "b"]
ALL_QUEUES = [*QUEUES, *(q + DEAD_SUFFIX for q in QUEUES)]
OWNERS = ["c1", "c2"]
MAX_DELIVERIES = 3
DEFAULT_LEASE = 10.0


@dataclass
class MMessage:
    id: int
    queue: str
    body: bytes
    priority: int
    attempts: int = 0


@dataclass
class MLease:
    msg_id: int
    attempt: int
    expires_at: float
    seq: int  # timer order: ties in time fire in the order the timers were set
    owner: str | None
    core: Lease | None = None  # the core's own, once the step is done


@dataclass(eq=False)
class MWaiter:
    core: Waiter
    queue: str
    lease: float | None  # None: a get; 0.0 (QUEUE_LEASE): a reserve_any's, the queue's
    owner: str | None
    queues: tuple[str, ...] = ()  # a wait_any's: it waits in each of these lines

    @property
    def lines(self) -> tuple[str, ...]:
        return self.queues or (self.queue,)


@dataclass(eq=False)
class Pending:
    """Messages taken for one reply that is not written yet (get or reserve)."""

    kind: str
    ids: list[int]
    messages: list[Message] = field(default_factory=list)  # the core's, once the step is done
    leases: list[MLease] = field(default_factory=list)
    waiter: MWaiter | None = None  # set if a waiter was handed them


class CoreMachine(RuleBasedStateMachine):
    """Drives a BrokerCore and a model side by side (see the module doc)."""

    @initialize()
    def start(self) -> None:
        self.records: list[Any] = []
        self.core = BrokerCore(
            max_message_size=64,
            max_deliveries=MAX_DELIVERIES,
            default_lease=DEFAULT_LEASE,
            write=self.records.append,
        )
        self.now = 1000.0
        self.seq = 0
        self.next_id = 1
        self.msgs: dict[int, MMessage] = {}
        self.ready: dict[str, list[int]] = {q: [] for q in ALL_QUEUES}
        self.buried: dict[str, list[int]] = {q: [] for q in ALL_QUEUES}
        self.delayed: dict[int, tuple[float, int]] = {}
        self.leases: dict[int, MLease] = {}
        self.waiters: dict[str, list[MWaiter]] = {q: [] for q in ALL_QUEUES}
        self.pending: list[Pending] = []
        self.got: set[int] = set()
        self.acked: set[int] = set()
        self.ended: set[tuple[int, int]] = set()  # (id, attempt) of leases that ended
        self.counters = {
            q: {"put_total": 0, "delivered_total": 0, "dead_lettered_total": 0} for q in ALL_QUEUES
        }
        self.new_leases: list[MLease] = []

    # -- the model's own moves ---------------------------------------------

    def _key(self, msg_id: int) -> tuple[int, int]:
        return (-self.msgs[msg_id].priority, msg_id)

    def _timer(self) -> int:
        self.seq += 1
        return self.seq

    def _lease(self, msg_id: int, length: float | None, owner: str | None) -> MLease:
        msg = self.msgs[msg_id]
        msg.attempts += 1
        length = DEFAULT_LEASE if length is None else length
        held = MLease(msg_id, msg.attempts, self.now + length, self._timer(), owner)
        self.leases[msg_id] = held
        self.new_leases.append(held)
        return held

    def _make_ready(self, queue: str, msg_id: int) -> list[MWaiter]:
        """Back among the ready ones at its place, then to the longest waiters."""
        self.ready[queue].append(msg_id)
        self.ready[queue].sort(key=self._key)
        served = []
        while self.ready[queue] and self.waiters[queue]:
            waiter = self._longest_waiter(queue)
            self._deliver(queue, self.ready[queue].pop(0), waiter)
            served.append(waiter)
        return served

    def _longest_waiter(self, queue: str) -> MWaiter:
        """Served, a waiter leaves every line it waits in (a wait_any's: several)."""
        waiter = self.waiters[queue][0]
        for line in waiter.lines:
            self.waiters[line].remove(waiter)
        return waiter

    def _deliver(self, queue: str, msg_id: int, waiter: MWaiter) -> None:
        self.counters[queue]["delivered_total"] += 1
        pending = Pending("get" if waiter.lease is None else "reserve", [msg_id], waiter=waiter)
        if waiter.lease is not None:
            pending.leases.append(self._lease(msg_id, waiter.lease or None, waiter.owner))
        self.pending.append(pending)

    def _end_lease(self, held: MLease, delay: float) -> list[MWaiter]:
        """A delivery that ended without an ack: retry, delay or dead-letter."""
        del self.leases[held.msg_id]
        self.ended.add((held.msg_id, held.attempt))
        msg = self.msgs[held.msg_id]
        if not msg.queue.endswith(DEAD_SUFFIX) and msg.attempts >= MAX_DELIVERIES:
            self.counters[msg.queue]["dead_lettered_total"] += 1
            msg.queue += DEAD_SUFFIX
            return self._make_ready(msg.queue, msg.id)
        if delay > 0:
            self.delayed[msg.id] = (self.now + delay, self._timer())
            return []
        return self._make_ready(msg.queue, msg.id)

    def _after(self, woken: list[Any], served: list[MWaiter]) -> None:
        """The step is done: the core woke the waiters the model served, in order."""
        assert [w.core for w in served] == list(woken)
        for held in self.new_leases:
            held.core = self.core.lease_of(held.msg_id)
            assert held.core is not None
            assert (held.core.attempt, held.core.expires_at) == (held.attempt, held.expires_at)
        self.new_leases = []
        for pending in self.pending:
            if pending.waiter is not None and not pending.messages:
                pending.messages = list(pending.waiter.core.messages)
                assert [m.id for m in pending.messages] == pending.ids

    # -- enqueue -------------------------------------------------------------

    @rule(
        queue=st.sampled_from(QUEUES),
        bodies=st.lists(st.binary(max_size=8), min_size=1, max_size=3),
        priority=st.sampled_from([0, 0, 1, -1, 5]),
        delay=st.sampled_from([0.0, 0.0, 0.0, 1.0, 2.5]),
    )
    def put_many(self, queue: str, bodies: list[bytes], priority: int, delay: float) -> None:
        if len(bodies) == 1:
            msg_id, waiter = self.core.put(
                queue, bodies[0], self.now, priority=priority, delay=delay
            )
            ids, woken = [msg_id], [] if waiter is None else [waiter]
        else:
            ids, woken = self.core.put_many(queue, bodies, self.now, priority=priority, delay=delay)
        expected = list(range(self.next_id, self.next_id + len(bodies)))
        assert ids == expected
        self.next_id += len(bodies)
        self.counters[queue]["put_total"] += len(bodies)
        handoff = delay == 0 and not self.ready[queue]
        served = []
        for msg_id, body in zip(ids, bodies, strict=True):
            self.msgs[msg_id] = MMessage(msg_id, queue, body, priority)
            if delay:
                self.delayed[msg_id] = (self.now + delay, self._timer())
            elif handoff and self.waiters[queue]:
                waiter = self._longest_waiter(queue)
                self._deliver(queue, msg_id, waiter)
                served.append(waiter)
            else:
                self.ready[queue].append(msg_id)
                self.ready[queue].sort(key=self._key)
        self._after(woken, served)

    # -- dequeue -------------------------------------------------------------

    @rule(queue=st.sampled_from(ALL_QUEUES), n=st.integers(1, 3))
    def get_nowait(self, queue: str, n: int) -> None:
        taken = self.core.get_nowait(queue, n)
        expected, self.ready[queue] = self.ready[queue][:n], self.ready[queue][n:]
        assert [m.id for m in taken] == expected
        assert [m.body for m in taken] == [self.msgs[i].body for i in expected]
        self.counters[queue]["delivered_total"] += len(taken)
        if taken:
            self.pending.append(Pending("get", expected, taken))

    @rule(
        queue=st.sampled_from(ALL_QUEUES),
        lease=st.sampled_from([None, 1.0, 4.0]),
        owner=st.sampled_from(OWNERS),
    )
    def reserve_nowait(self, queue: str, lease: float | None, owner: str) -> None:
        msg = self.core.reserve_nowait(queue, self.now, lease, owner=owner)
        if not self.ready[queue]:
            assert msg is None
            return
        msg_id = self.ready[queue].pop(0)
        assert msg is not None
        assert (msg.id, msg.body) == (msg_id, self.msgs[msg_id].body)
        self.counters[queue]["delivered_total"] += 1
        held = self._lease(msg_id, lease, owner)
        assert msg.attempts == held.attempt
        self.pending.append(Pending("reserve", [msg_id], [msg], [held]))
        self._after([], [])

    @rule(
        queue=st.sampled_from(ALL_QUEUES),
        lease=st.sampled_from([None, None, 1.0, 4.0]),
        owner=st.sampled_from(OWNERS),
    )
    def wait(self, queue: str, lease: float | None, owner: str) -> None:
        if self.ready[queue]:
            return  # only when nothing is ready (the core asserts it)
        waiter = self.core.wait(queue, lease=lease, owner=owner)
        self.waiters[queue].append(MWaiter(waiter, queue, lease, owner))

    @rule(
        queues=st.lists(st.sampled_from(ALL_QUEUES), min_size=1, max_size=3, unique=True),
        lease=st.sampled_from([None, QUEUE_LEASE, 1.0]),
        owner=st.sampled_from(OWNERS),
    )
    def take_any(self, queues: list[str], lease: float | None, owner: str) -> None:
        """get_any / reserve_any answered at once: the first queue in the list with a message."""
        msg = self.core.take_any(queues, self.now, lease, owner)
        first = next((q for q in queues if self.ready[q]), None)
        if first is None:
            assert msg is None
            return
        msg_id = self.ready[first].pop(0)
        assert msg is not None
        assert (msg.id, msg.queue) == (msg_id, first)
        self.counters[first]["delivered_total"] += 1
        if lease is None:
            self.pending.append(Pending("get", [msg_id], [msg]))
        else:
            held = self._lease(msg_id, lease or None, owner)
            self.pending.append(Pending("reserve", [msg_id], [msg], [held]))
        self._after([], [])

    @rule(
        queues=st.lists(st.sampled_from(ALL_QUEUES), min_size=1, max_size=3, unique=True),
        lease=st.sampled_from([None, QUEUE_LEASE, 1.0]),
        owner=st.sampled_from(OWNERS),
    )
    def wait_any(self, queues: list[str], lease: float | None, owner: str) -> None:
        if any(self.ready[q] for q in queues):
            return  # only when nothing is ready on any (the core asserts it)
        waiter = self.core.wait_any(queues, lease=lease, owner=owner)
        model = MWaiter(waiter, queues[0], lease, owner, tuple(queues))
        for queue in queues:
            self.waiters[queue].append(model)

    @precondition(lambda self: any(self.waiters.values()))
    @rule(data=st.data())
    def cancel_wait(self, data: st.DataObject) -> None:
        waiting = list(dict.fromkeys(w for q in ALL_QUEUES for w in self.waiters[q]))
        waiter = data.draw(st.sampled_from(waiting))
        assert self.core.cancel_wait(waiter.core, self.now) == []
        for line in waiter.lines:
            self.waiters[line].remove(waiter)

    # -- replies that carry messages --------------------------------------------

    @precondition(lambda self: self.pending)
    @rule(data=st.data())
    def reply_written(self, data: st.DataObject) -> None:
        pending = data.draw(st.sampled_from(self.pending))
        self.pending.remove(pending)
        if pending.kind == "get":
            self.got.update(m.id for m in pending.messages)

    @precondition(lambda self: self.pending)
    @rule(data=st.data())
    def reply_failed(self, data: st.DataObject) -> None:
        """The reply could not be written: the messages go back (undeliver)."""
        pending = data.draw(st.sampled_from(self.pending))
        self.pending.remove(pending)
        if pending.kind == "get":
            woken = self.core.undeliver(pending.messages, self.now)
        else:
            cores: list[Lease | None] = [held.core for held in pending.leases]
            woken = self.core.undeliver(pending.messages, self.now, cores)
        self._after(woken, self._undo(pending))

    @precondition(lambda self: any(p.waiter is not None for p in self.pending))
    @rule(data=st.data())
    def cancel_served_wait(self, data: st.DataObject) -> None:
        """A waiter's task ends (timeout, peer gone) after it was handed a message
        (maybe after that lease ran out and the message went to another)."""
        pending = data.draw(st.sampled_from([p for p in self.pending if p.waiter is not None]))
        self.pending.remove(pending)
        assert pending.waiter is not None
        woken = self.core.cancel_wait(pending.waiter.core, self.now)
        self._after(woken, self._undo(pending))

    def _undo(self, pending: Pending) -> list[MWaiter]:
        """Take back what one reply handed out: only deliveries that still stand."""
        served: list[MWaiter] = []
        for i, msg_id in enumerate(pending.ids):
            queue = self.msgs[msg_id].queue
            if pending.kind == "reserve":
                held = pending.leases[i]
                if self.leases.get(msg_id) is not held:
                    continue  # that lease already ended: nothing to undo
                del self.leases[msg_id]
                self.msgs[msg_id].attempts -= 1
            self.counters[queue]["delivered_total"] -= 1
            served += self._make_ready(queue, msg_id)
        return served

    # -- lease verbs -------------------------------------------------------------

    @precondition(lambda self: self.leases)
    @rule(data=st.data(), verb=st.sampled_from(["ack", "release", "release", "bury"]))
    def lease_verb(self, data: st.DataObject, verb: str) -> None:
        held = self.leases[data.draw(st.sampled_from(sorted(self.leases)))]
        msg = self.msgs[held.msg_id]
        woken: list[Waiter] = []
        served: list[MWaiter] = []
        if verb == "ack":
            self.core.ack(msg.id, held.attempt)
            del self.leases[msg.id]
            self.ended.add((msg.id, held.attempt))
            self.acked.add(msg.id)
        elif verb == "bury":
            self.core.bury(msg.id, held.attempt)
            del self.leases[msg.id]
            self.ended.add((msg.id, held.attempt))
            self.buried[msg.queue].append(msg.id)
        else:
            delay = data.draw(st.sampled_from([0.0, 0.0, 1.5]))
            woken = self.core.release(msg.id, held.attempt, self.now, delay)
            served = self._end_lease(held, delay)
        self._after(woken, served)

    @precondition(lambda self: self.ended)
    @rule(data=st.data(), verb=st.sampled_from(["ack", "release", "bury"]))
    def late_verb(self, data: st.DataObject, verb: str) -> None:
        """A verb naming an attempt whose lease ended is refused and changes nothing."""
        current = {(h.msg_id, h.attempt) for h in self.leases.values()}
        stale = sorted(self.ended - current)
        if not stale:
            return
        msg_id, attempt = data.draw(st.sampled_from(stale))
        call: Callable[[], object] = {
            "ack": lambda: self.core.ack(msg_id, attempt),
            "release": lambda: self.core.release(msg_id, attempt, self.now),
            "bury": lambda: self.core.bury(msg_id, attempt),
        }[verb]
        records = len(self.records)
        with pytest.raises(LeaseLost):
            call()
        assert len(self.records) == records

    @rule(owner=st.sampled_from(OWNERS))
    def close(self, owner: str) -> None:
        """The connection ``owner`` closed: every lease it holds ends."""
        woken = self.core.release_owned(owner, self.now)
        served: list[MWaiter] = []
        for msg_id in sorted(self.leases):
            held = self.leases.get(msg_id)
            if held is not None and held.owner == owner:
                served += self._end_lease(held, 0)
        self._after(woken, served)

    @rule(queue=st.sampled_from(ALL_QUEUES), n=st.integers(1, 3))
    def kick(self, queue: str, n: int) -> None:
        count, woken = self.core.kick(queue, n, self.now)
        served: list[MWaiter] = []
        kicked = 0
        if queue.endswith(DEAD_SUFFIX):
            target = queue[: -len(DEAD_SUFFIX)]
            while kicked < n and (self.buried[queue] or self.ready[queue]):
                source = self.buried[queue] or self.ready[queue]
                msg = self.msgs[source.pop(0)]
                msg.queue, msg.attempts = target, 0
                served += self._make_ready(target, msg.id)
                kicked += 1
        else:
            while kicked < n and self.buried[queue]:
                served += self._make_ready(queue, self.buried[queue].pop(0))
                kicked += 1
        assert count == kicked
        self._after(woken, served)

    # -- time ------------------------------------------------------------------

    @rule(dt=st.sampled_from([0.5, 1.0, 1.5, 4.0, 11.0]))
    def tick(self, dt: float) -> None:
        self.now += dt
        woken = self.core.tick(self.now)
        served: list[MWaiter] = []
        while True:
            due = [(h.expires_at, h.seq, h.msg_id, True) for h in self.leases.values()]
            due += [(until, seq, i, False) for i, (until, seq) in self.delayed.items()]
            due = [d for d in due if d[0] <= self.now]
            if not due:
                break
            _, _, msg_id, is_lease = min(due)
            if is_lease:
                served += self._end_lease(self.leases[msg_id], 0)
            else:
                del self.delayed[msg_id]
                served += self._make_ready(self.msgs[msg_id].queue, msg_id)
        self._after(woken, served)

    # -- invariants -------------------------------------------------------------

    def _core_queue(self, name: str) -> Any:
        return self.core._queues.get(name)

    @invariant()
    def fifo_within_priority_and_fair_handoff(self) -> None:
        for name in ALL_QUEUES:
            q = self._core_queue(name)
            ready = [] if q is None else [m.id for m in q.ready]
            waiters = [] if q is None else list(q.waiters)
            assert ready == self.ready[name], name
            assert ready == sorted(ready, key=self._key)
            assert waiters == [w.core for w in self.waiters[name]], name
            assert not (ready and waiters), f"{name}: ready messages and waiters at once"

    @invariant()
    def no_message_lost_or_duplicated(self) -> None:
        places: dict[str, set[int]] = {
            "ready": {i for ids in self.ready.values() for i in ids},
            "delayed": set(self.delayed),
            "reserved": set(self.leases),
            "buried": {i for ids in self.buried.values() for i in ids},
            "got": self.got,
            "taken": {i for p in self.pending if p.kind == "get" for i in p.ids},
            "acked": self.acked,
        }
        total = sum(len(ids) for ids in places.values())
        union = set().union(*places.values())
        assert total == len(union), f"a message is in two places: {places}"
        assert union == set(self.msgs), f"lost: {set(self.msgs) - union}"
        # The core holds exactly the live ones, each once, with its attempts.
        held: list[Message] = [lease.message for lease in self.core._leases.values()]
        held += [msg for msg, _ in self.core._delayed.values()]
        for name in ALL_QUEUES:
            q = self._core_queue(name)
            if q is not None:
                held += [*q.ready, *q.buried.values()]
        live = places["ready"] | places["delayed"] | places["reserved"] | places["buried"]
        assert sorted(m.id for m in held) == sorted(live)
        for msg in held:
            model = self.msgs[msg.id]
            assert (msg.queue, msg.attempts, msg.body) == (model.queue, model.attempts, model.body)
        assert self.core.live_bytes == sum(len(m.body) + LIVE_OVERHEAD for m in held)

    @invariant()
    def stats_match(self) -> None:
        for name in ALL_QUEUES:
            stats = self.core.queue_stats(name, self.now)
            expected = {
                "ready": len(self.ready[name]),
                "delayed": sum(1 for i in self.delayed if self.msgs[i].queue == name),
                "reserved": sum(1 for i in self.leases if self.msgs[i].queue == name),
                "buried": len(self.buried[name]),
                "waiters": len(self.waiters[name]),
                "bytes": sum(
                    len(self.msgs[i].body)
                    for i in [
                        *self.ready[name],
                        *self.buried[name],
                        *self.delayed,
                        *self.leases,
                    ]
                    if self.msgs[i].queue == name
                ),
                **self.counters[name],
            }
            assert {k: stats[k] for k in expected} == expected, name

    @invariant()
    def journal_replay_rebuilds_the_state(self) -> None:
        """Replay what the core wrote: reserved come back ready, as after a crash."""
        replayed = BrokerCore(
            max_message_size=64, max_deliveries=MAX_DELIVERIES, default_lease=DEFAULT_LEASE
        )
        for record in self.records:
            replayed.apply(record)
        replayed.finish_replay(self.now)
        assert replayed._next_id == self.next_id
        due = [i for i, (until, _) in self.delayed.items() if until <= self.now]
        for name in ALL_QUEUES:
            q = replayed._queues.get(name)
            ready = [] if q is None else [(m.id, m.attempts) for m in q.ready]
            back = [*self.ready[name], *self.leases, *due]
            expected = sorted((i for i in back if self.msgs[i].queue == name), key=self._key)
            assert ready == [(i, self.msgs[i].attempts) for i in expected], name
            buried = [] if q is None else sorted(q.buried)
            assert buried == sorted(self.buried[name]), name
            later = sum(
                1
                for i, (t, _) in self.delayed.items()
                if t > self.now and self.msgs[i].queue == name
            )
            assert (0 if q is None else q.delayed) == later, name


CoreMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("BROKERQ_TEST_STATEFUL_EXAMPLES", 300 * SCALE)),
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_core_against_a_model = CoreMachine.TestCase


def test_cancelling_a_served_waiter_after_its_lease_ran_out_leaves_the_next_lease_alone() -> None:
    """G29/G35: undoing a delivery whose lease already ended touches nothing.

    Found while writing the model (fixed in 507fc99): a reserve waiter is
    handed a message with a short lease; the lease runs out and the message
    goes to another consumer (attempt 2); then the first waiter's task ends
    (peer gone) and cancels its wait. The core took the *second* consumer's
    lease back and counted its attempt down, so the next delivery was
    attempt 2 again, and the second consumer's late ack removed a message
    that a third consumer held.
    """
    core = BrokerCore(max_message_size=100)
    first = core.wait("q", lease=1.0, owner="A")
    core.put("q", b"x", now=0)
    assert [m.attempts for m in first.messages] == [1]
    core.tick(now=2)  # A's lease ran out: the message is ready again
    second = core.reserve_nowait("q", now=2, lease=30, owner="B")
    assert second is not None
    assert second.attempts == 2
    core.cancel_wait(first, now=2)  # A's task ends late
    lease = core.lease_of(second.id)
    assert lease is not None
    assert (lease.owner, lease.attempt) == ("B", 2)


# ---------------------------------------------------------------------------
# 3. The broker's frame handling

FUZZ_SECONDS = float(os.environ.get("BROKERQ_TEST_FUZZ_SECONDS", "12"))


def _load_fuzz_frames() -> Any:
    spec = importlib.util.spec_from_file_location("fuzz_frames", ROOT / "bench" / "fuzz_frames.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_frames"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


fuzz_frames = _load_fuzz_frames()


def test_broker_survives_random_and_mutated_frames_for_a_bounded_time() -> None:
    """bench/fuzz_frames.py for a few seconds: no crash, good frames, a good client served."""
    seed = os.environ.get("BROKERQ_TEST_FUZZ_SEED", "ci")
    result = fuzz_frames.run(FUZZ_SECONDS, seed, connections=4)
    print(f"fuzz_frames seed {seed}: inputs tried: {result.inputs}, crashes: {len(result.crashes)}")
    assert not result.crashes, "\n\n".join(result.crashes[:3])
    assert result.inputs >= 300
    assert result.good_rounds >= 100
    # It reached past the handshake and into the queues.
    for op in ("hello", "put_many", "reserve", "error:bad_frame", "error:bad_request"):
        assert result.replies[op] > 0, op


@settings(max_examples=60 * SCALE, deadline=None)
@given(
    streams=st.lists(
        st.lists(
            st.one_of(
                requests.filter(lambda r: not isinstance(r, protocol.Stop)).map(
                    protocol.encode_frame
                ),
                payloads.map(lambda p: protocol.HEADER.pack(len(p)) + p),
                st.binary(max_size=12),
            ),
            max_size=6,
        ).map(b"".join),
        min_size=1,
        max_size=3,
    ),
    greet=st.booleans(),
)
def test_broker_survives_hypothesis_streams(streams: list[bytes], greet: bool) -> None:
    """Hypothesis streams (shrunk to the smallest on failure) on connections at once."""
    hello = protocol.encode_frame(protocol.Hello(id=1, version=protocol.PROTOCOL_VERSION))
    result = fuzz_frames.Result()

    async def main() -> None:
        broker = fuzz_frames.new_broker()
        with fuzz_frames.ErrorLog(result, lambda: "hypothesis"):
            async with trio.open_nursery() as nursery:
                await nursery.start(broker.serve, None)
                async with trio.open_nursery() as clients:
                    for i, data in enumerate(streams):
                        stream = hello + data if greet else data
                        clients.start_soon(fuzz_frames.send_stream, broker, stream, f"#{i}", result)
                broker.request_stop("over")

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert not result.crashes, result.crashes


# -- bugs the fuzzers found, kept as plain tests ------------------------------------


def test_found_get_many_with_n_over_sys_maxsize_is_served() -> None:
    """get_many with n >= 2**63 made itertools.islice raise: an ``internal`` error."""
    core = BrokerCore(max_message_size=100)
    core.put("q", b"a", now=0)
    assert [m.body for m in core.get_nowait("q", 2**64 - 1)] == [b"a"]


def test_found_a_blocking_get_behind_a_pipelined_reply_sees_a_put_made_meanwhile() -> None:
    """A get that found nothing wrote the replies before it, and another
    connection's put ran meanwhile: the get then parked while a message was
    ready (core.wait's assertion: an ``internal`` error, or a get waiting
    beside a ready message)."""
    from test_server import connect

    async def main() -> list[Any]:
        broker = fuzz_frames.new_broker()
        async with trio.open_nursery() as nursery:
            await nursery.start(broker.serve, None)
            getter = await connect(broker)
            putter = await connect(broker)
            await getter.send(protocol.Ping(id=10), protocol.Get(id=11, queue="q"))
            await putter.send(protocol.Put(id=50, queue="q", body=b"m"))
            replies = [await getter.receive(), await getter.receive()]
            broker.request_stop("over")
        return replies

    # Trio runs the tasks of a batch in a random order: the race shows one time in two.
    for _ in range(20):
        ping, got = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
        assert isinstance(ping, protocol.PingReply)
        assert isinstance(got, protocol.GetReply), got
        assert got.body == b"m"
