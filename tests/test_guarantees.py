"""One test (or a small group) for each guarantee of docs/guarantees.md that
no other test pins down; each docstring starts with the guarantee's number.

Each test runs at the cheapest layer where the guarantee can really break:

* **sans-IO**: a :class:`BrokerCore` whose records go to a real journal file
  (:class:`Disk`). A crash *before* a record is written is a ``write`` that
  raises :class:`Crash` (the core changes nothing before its write returns);
  a crash *after* it is abandoning the core (its descriptor closed, nothing
  flushed or synced) once the method returned, before any reply; the next
  broker replays the file.
* **server**: the trio broker over in-memory streams (as tests/broker/test_server.py),
  with a journal in a temporary directory where it matters. "The broker
  crashes now" is a replay of the journal file as it is at that moment.
* **client**: the blocking client against a scripted fake broker on a Unix
  socket (:class:`FakeBroker`), which can drop a connection at any request:
  that is all a client can see of a broker crash.
* **processes**, only for what lives in the daemon (exit statuses,
  ``--repair``, ``--no-journal``); every wait is bounded, and every process
  started here is ended by its pid.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from conftest import BIN, gone, wait_until
from test_server import Peer as ServerPeer

import brokerq
import brokerq.broker.journal as jmod
from brokerq import protocol
from brokerq.broker.core import KEY_WINDOW, BrokerCore
from brokerq.broker.core.records import AnyRecord, PutRecord
from brokerq.broker.core.state import Message
from brokerq.broker.journal import Journal, JournalFull, journal_path, read_journal
from brokerq.broker.server import Broker, BrokerConfig
from brokerq.errors import Full, LeaseLost
from brokerq.protocol import (
    PROTOCOL_VERSION,
    Ack,
    AckReply,
    Bury,
    BuryReply,
    Configure,
    Error,
    FrameReader,
    Get,
    GetMany,
    GetManyReply,
    GetReply,
    Hello,
    HelloReply,
    Kick,
    KickReply,
    Purge,
    Put,
    PutMany,
    PutManyReply,
    PutReply,
    Release,
    ReleaseReply,
    Reserve,
    ReserveReply,
    Stop,
    StopReply,
    Touch,
    TouchReply,
)
from brokerq.spawn import broker_running

#: The wall-clock time of the sans-IO scenarios.
NOW = 1000.0
SIZE = 1000
BROKER = str(BIN / "local-queue-broker")

blocked = trio.testing.wait_all_tasks_blocked
#: The bound on every server-layer test (trio's clock: virtual under autojump_clock).
WAIT = 10.0


# -- sans-IO: a core, its journal, crashes -------------------------------------------


class Crash(Exception):
    """The broker process dies here: nothing after this point happens."""


def new_core(
    write: Callable[[AnyRecord], None] | None = None, *, max_deliveries: int = 3
) -> BrokerCore:
    return BrokerCore(
        max_message_size=SIZE, max_deliveries=max_deliveries, default_lease=30.0, write=write
    )


def replayed(records: list[AnyRecord], now: float = NOW, *, max_deliveries: int = 3) -> BrokerCore:
    """A fresh core rebuilt from ``records``, as a restarting broker does."""
    core = new_core(max_deliveries=max_deliveries)
    for record in records:
        core.apply(record)
    core.finish_replay(now)
    return core


def _dead_write(record: AnyRecord) -> None:
    raise AssertionError(f"a crashed broker wrote {record!r}")


class Disk:
    """A core writing its records through a real journal file, as a broker does.

    :meth:`die_before` makes a coming write raise :class:`Crash` before it
    reaches the file; :meth:`crash` abandons this broker (its descriptor is
    closed, nothing more is flushed, synced or written); :meth:`restart` is
    the next broker: it replays the file.
    """

    def __init__(
        self, path: str, opened: list[Disk], now: float = NOW, *, max_deliveries: int = 3
    ) -> None:
        self.path = path
        self.opened = opened
        self.max_deliveries = max_deliveries
        self.journal, result = Journal.open(path, "never")
        self.core = replayed(result.records, now, max_deliveries=max_deliveries)
        self.core.write = self.write
        self.writes = 0
        self._die_at: int | None = None
        opened.append(self)

    def write(self, record: AnyRecord) -> None:
        if self._die_at is not None and self.writes + 1 == self._die_at:
            raise Crash(f"the broker died before writing {type(record).__name__}")
        self.journal.append(record)
        self.writes += 1

    def die_before(self, n: int = 1) -> None:
        """Die just before the ``n``-th write from now."""
        self._die_at = self.writes + n

    def crash(self) -> None:
        if self.journal.fd >= 0:
            os.close(self.journal.fd)
            self.journal.fd = -1
        self.core.write = _dead_write

    def restart(self, now: float = NOW) -> Disk:
        self.crash()
        return Disk(self.path, self.opened, now, max_deliveries=self.max_deliveries)


@pytest.fixture
def disk(jdir: str) -> Iterator[Callable[..., Disk]]:
    opened: list[Disk] = []

    def make(max_deliveries: int = 3) -> Disk:
        return Disk(os.path.join(jdir, "b.sock.journal"), opened, max_deliveries=max_deliveries)

    yield make
    for each in opened:
        each.crash()


def _m(msg: Message) -> tuple[int, bytes, int]:
    return (msg.id, msg.body, msg.attempts)


def durable(core: BrokerCore) -> dict[str, Any]:
    """What a restart must find of ``core``: per queue the ready messages in
    order, a leased one counted as ready at its place by id (its lease dies
    with the broker) with its attempts; buried and delayed ones; settings;
    the next id; the window of put keys. Queues holding nothing and with no
    settings of their own are left out."""
    leased = sorted((lease.message for lease in core._leases.values()), key=lambda m: m.id)
    delayed: dict[str, list[tuple[int, bytes, int, float]]] = {}
    for msg, until in core._delayed.values():
        delayed.setdefault(msg.queue, []).append((*_m(msg), until))
    queues: dict[str, Any] = {}
    for name in core.queue_names():
        q = core._queues[name]
        ready = list(q.ready)
        for msg in (m for m in leased if m.queue == name):
            i = 0
            while i < len(ready) and ready[i].id < msg.id:
                i += 1
            ready.insert(i, msg)
        entry = {
            "ready": [_m(m) for m in ready],
            "buried": sorted(_m(m) for m in q.buried.values()),
            "delayed": sorted(delayed.get(name, [])),
            "config": (q.max_deliveries, q.lease),
        }
        if entry["ready"] or entry["buried"] or entry["delayed"] or entry["config"] != (None, None):
            queues[name] = entry
    return {"queues": queues, "next_id": core._next_id, "keys": list(core._keys.items())}


def fingerprint(core: BrokerCore) -> tuple[Any, ...]:
    """Everything a request could change, durable or not."""
    return (
        durable(core),
        sorted((i, x.attempt, x.expires_at, repr(x.owner)) for i, x in core._leases.items()),
        [(n, core.queue_stats(n, NOW)) for n in core.queue_names()],
        core.totals(),
        core.live_bytes,
        [(w.queue, w.lease, [m.id for m in w.messages]) for w in core.all_waiters()],
    )


def ready_ids(core: BrokerCore, name: str = "q") -> list[int]:
    q = core._queues.get(name)
    return [] if q is None else [m.id for m in q.ready]


def ready_of(core: BrokerCore, name: str = "q") -> list[tuple[bytes, int]]:
    q = core._queues.get(name)
    return [] if q is None else [(m.body, m.attempts) for m in q.ready]


def full_disk(record: AnyRecord) -> None:
    raise JournalFull("the journal's disk is full (simulated): nothing was written")


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# -- server: the trio broker over memory streams -----------------------------------------


class Peer(ServerPeer):
    """tests/broker/test_server.py's scripted client, which can also read to the end."""

    async def until_eof(self) -> list[protocol.AnyReply]:
        replies = []
        while True:
            try:
                replies.append(await self.receive())
            except EOFError:
                return replies


class Watched(trio.abc.Stream):
    """The broker's end of a connection; ``on_send`` sees each write as it goes out."""

    def __init__(self, inner: trio.abc.Stream, on_send: Callable[[bytes], None]) -> None:
        self.inner = inner
        self.on_send = on_send

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.on_send(bytes(data))
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def connect(broker: Broker, on_send: Callable[[bytes], None] | None = None) -> Peer:
    client_end, server_end = trio.testing.memory_stream_pair()
    broker.start_connection(server_end if on_send is None else Watched(server_end, on_send))
    peer = Peer(client_end)
    assert isinstance(await peer.call(Hello, version=PROTOCOL_VERSION), HelloReply)
    return peer


def open_journal(path: str, fsync: str) -> Journal:
    journal, _ = Journal.open(path, fsync)
    journal.in_memory = False  # fsync as on a disk, whatever /tmp is
    return journal


def broker_for(journal: Journal | None = None, core: BrokerCore | None = None) -> Broker:
    fsync = "batch" if journal is None else journal.fsync
    config = BrokerConfig(socket_path="/nonexistent/b.sock", max_message_size=SIZE, fsync=fsync)
    return Broker(config, core, journal, clock=trio.current_time)


@contextlib.asynccontextmanager
async def serving(
    journal: Journal | None = None, core: BrokerCore | None = None
) -> AsyncIterator[Broker]:
    broker = broker_for(journal, core)
    with trio.fail_after(WAIT):  # a broken guarantee must fail, not hang
        async with trio.open_nursery() as nursery:
            await nursery.start(broker.serve, None)
            yield broker
            broker.request_stop("test over")


def replay_file(path: str, now: float) -> BrokerCore:
    """The next broker's core if the broker died now: a replay of the file as it is."""
    core = BrokerCore(max_message_size=SIZE)
    for record in read_journal(path).records:
        core.apply(record)
    core.finish_replay(now)
    return core


def next_broker(image: bytes, path: str) -> tuple[Journal, BrokerCore]:
    """The journal and core of a broker started on a journal holding ``image``."""
    with open(path, "wb") as f:
        f.write(image)
    journal, result = Journal.open(path, "never")
    core = BrokerCore(max_message_size=SIZE)
    for record in result.records:
        core.apply(record)
    core.finish_replay(trio.current_time())
    return journal, core


# -- client: a scripted fake broker ---------------------------------------------------------

Answer = Callable[[protocol.AnyRequest, int], protocol.AnyReply | None]


class FakeBroker:
    """Listens at the socket path and answers each request (hello aside) with
    ``answer(request, n)`` (``n`` counts requests from 1), or, for None,
    closes the connection unanswered: what a client sees of a broker that
    died before it replied. Records ``(connection number, request)``."""

    def __init__(self, path: str, answer: Answer) -> None:
        self.answer = answer
        self.requests: list[tuple[int, protocol.AnyRequest]] = []
        self.stopping = False
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(16)
        self.sock.settimeout(0.05)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stopping = True
        self.thread.join(timeout=10)
        self.sock.close()

    def _run(self) -> None:
        number = 0
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            number += 1
            with conn:
                conn.settimeout(5)
                with contextlib.suppress(OSError):
                    self._serve(conn, number)

    def _serve(self, conn: socket.socket, number: int) -> None:
        reader = FrameReader(1 << 24)
        while True:
            while (payload := reader.next_frame()) is None:
                data = conn.recv(65536)
                if not data:
                    return
                reader.feed(data)
            request = protocol.decode_request(payload)
            if isinstance(request, Hello):
                reply: protocol.AnyReply | None = HelloReply(
                    id=request.id,
                    version=PROTOCOL_VERSION,
                    server="fake",
                    pid=os.getpid(),
                    max_message_size=SIZE,
                    max_frame_size=protocol.max_frame_size(SIZE),
                )
            else:
                self.requests.append((number, request))
                reply = self.answer(request, len(self.requests))
                if reply is None:
                    return
            conn.sendall(protocol.encode_frame(reply))


@pytest.fixture
def fake_broker(socket_path: str) -> Iterator[Callable[[Answer], FakeBroker]]:
    started: list[FakeBroker] = []

    def start(answer: Answer) -> FakeBroker:
        fake = FakeBroker(socket_path, answer)
        started.append(fake)
        return fake

    yield start
    for fake in started:
        fake.close()


def good_reply(request: protocol.AnyRequest) -> protocol.AnyReply:
    """What a broker that executed ``request`` answers (message id 7, body b"x")."""
    match request:
        case Put():
            return PutReply(id=request.id, msg_id=7)
        case PutMany(bodies=bodies):
            return PutManyReply(id=request.id, msg_ids=list(range(7, 7 + len(bodies))))
        case Get():
            return GetReply(id=request.id, msg_id=7, body=b"x")
        case GetMany():
            return GetManyReply(id=request.id, msg_ids=[7], bodies=[b"x"])
        case Reserve():
            return ReserveReply(id=request.id, msg_id=7, body=b"x", attempt=1, lease=30.0)
        case Kick():
            return KickReply(id=request.id, count=1)
        case Ack():
            return AckReply(id=request.id)
        case Release():
            return ReleaseReply(id=request.id)
        case Bury():
            return BuryReply(id=request.id)
        case Touch():
            return TouchReply(id=request.id, lease=30.0)
    raise AssertionError(f"no scripted reply for {request!r}")


def lose_first(n: int, pause: float = 0.0) -> Answer:
    """Close the connection on the first ``n`` requests (after ``pause`` s), then answer."""

    def answer(request: protocol.AnyRequest, count: int) -> protocol.AnyReply | None:
        if count <= n:
            time.sleep(pause)
            return None
        return good_reply(request)

    return answer


# -- processes -------------------------------------------------------------------------------


def serving_at(socket_path: str) -> bool:
    return os.path.exists(socket_path) and broker_running(socket_path)


@contextlib.contextmanager
def foreground(args: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    """A process started here, killed by its pid (if still running) and reaped."""
    proc = subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


# == Across all operations ==================================================================

COME_BACK = [
    "released",
    "lease ran out",
    "holder's connection closed",
    "get reply not written",
    "reserve reply not written",
    "kicked from buried",
    "moved to :dead",
    "kicked from :dead",
]


@pytest.mark.parametrize("how", COME_BACK)
def test_g01_a_message_that_comes_back_takes_its_place_by_id(how: str) -> None:
    """G1: ready messages go out in id order, ids increasing in put order (across
    queues); a message that comes back, whichever way, takes its place by id."""
    core = new_core(max_deliveries=1 if "dead" in how else 3)
    ids = [core.put("q", b"m%d" % i, NOW)[0] for i in range(4)]
    other, _ = core.put("other", b"o", NOW)
    assert ids == sorted(ids)
    assert other > ids[-1]
    first, second, third, last = ids
    # Take the first three off "q", then give them back out of id order:
    # steps[i] gives back the i-th one taken, unless said otherwise.
    steps: list[Callable[[], object]]
    if how in ("released", "moved to :dead", "kicked from :dead"):
        msgs = [core.reserve_nowait("q", NOW) for _ in range(3)]
        steps = [lambda m=m: core.release(m.id, m.attempts, NOW) for m in msgs]
    elif how == "lease ran out":
        for length in (10, 30, 20):
            assert core.reserve_nowait("q", NOW, lease=length) is not None
        steps = [lambda t=t: core.tick(NOW + t) for t in (10, 30, 20)]
    elif how == "holder's connection closed":
        for owner in "abc":
            assert core.reserve_nowait("q", NOW, owner=owner) is not None
        steps = [lambda o=o: core.release_owned(o, NOW) for o in "abc"]
    elif how == "get reply not written":
        taken = [core.get_nowait("q") for _ in range(3)]
        steps = [lambda t=t: core.undeliver(t, NOW) for t in taken]
    elif how == "reserve reply not written":
        msgs = [core.reserve_nowait("q", NOW) for _ in range(3)]
        leases = [core.leases_of([m]) for m in msgs if m is not None]
        steps = [
            lambda m=m, x=x: core.undeliver([m], NOW, x) for m, x in zip(msgs, leases, strict=True)
        ]
    else:  # kicked from buried: a kick takes buried messages in the order they were buried
        msgs = [core.reserve_nowait("q", NOW) for _ in range(3)]
        for m in (msgs[0], msgs[2], msgs[1]):
            assert m is not None
            core.bury(m.id, 1)
        steps = [lambda: core.kick("q", 1, NOW)] * 3
    if how != "kicked from buried":
        steps = [steps[0], steps[2], steps[1]]
    returned = [first, third, second]
    watched, stay = ("q:dead", []) if how == "moved to :dead" else ("q", [last])
    if how == "kicked from :dead":
        for step in steps:  # to q:dead, out of order: they line up there by id
            step()
        assert ready_ids(core, "q:dead") == [first, second, third]
        steps = [lambda: core.kick("q:dead", 1, NOW)] * 3
        returned = [first, second, third]
    assert ready_ids(core, watched) == stay
    back: list[int] = []
    for step, msg_id in zip(steps, returned, strict=True):
        step()
        back.append(msg_id)
        assert ready_ids(core, watched) == sorted([*back, *stay]), how
    assert [m.id for m in core.get_nowait(watched, 10)] == sorted([*back, *stay])


async def test_g02_waiters_are_served_in_the_order_they_began_to_wait(
    autojump_clock: trio.abc.Clock,
) -> None:
    """G2: waiting get, get_many and reserve requests are served in the order
    they began to wait; one that times out or disconnects leaves the line
    without taking a message."""
    async with serving() as broker:
        line = []
        for request in (
            Get(id=10, queue="q", timeout=None),
            GetMany(id=11, queue="q", n=5, timeout=None),
            Get(id=12, queue="q", timeout=5),  # times out
            Reserve(id=13, queue="q", timeout=None),
            Get(id=14, queue="q", timeout=None),  # disconnects
            Get(id=15, queue="q", timeout=None),
        ):
            peer = await connect(broker)
            await peer.send(request)
            await blocked()
            line.append(peer)
        getter, many, impatient, reserver, leaver, last = line
        timed_out = await impatient.receive()  # the clock jumps 5 s
        assert isinstance(timed_out, Error)
        assert (timed_out.id, timed_out.code) == (12, "empty")
        await leaver.stream.aclose()
        await blocked()
        assert broker.core.queue_stats("q", 0)["waiters"] == 4
        producer = await connect(broker)
        ids = []
        for i in range(4):
            reply = await producer.call(Put, queue="q", body=b"m%d" % i)
            ids.append(reply.msg_id)
        got = [await peer.receive() for peer in (getter, many, reserver, last)]
        assert isinstance(got[0], GetReply)
        assert (got[0].id, got[0].msg_id) == (10, ids[0])
        assert isinstance(got[1], GetManyReply)
        assert (got[1].id, got[1].msg_ids) == (11, [ids[1]])
        assert isinstance(got[2], ReserveReply)
        assert (got[2].id, got[2].msg_id, got[2].attempt) == (13, ids[2], 1)
        assert isinstance(got[3], GetReply)
        assert (got[3].id, got[3].msg_id) == (15, ids[3])
        stats = broker.core.queue_stats("q", 0)
        assert (stats["waiters"], stats["ready"], stats["delivered_total"]) == (0, 0, 4)


@pytest.mark.parametrize("fsync", ["never", "batch", "always"])
async def test_g03_every_answered_change_is_in_the_journal_before_its_reply(
    jdir: str, fsync: str
) -> None:
    """G3: whatever --fsync says, every answered request's record was written
    before its reply: a broker crash the moment any reply is received loses
    no answered change (the next broker's replay has it)."""
    path = os.path.join(jdir, "j")
    journal = open_journal(path, fsync)
    try:
        async with serving(journal) as broker:
            peer = await connect(broker)
            count = 0

            def check() -> None:
                nonlocal count
                # The broker dies now: the next one replays the file as it is.
                assert durable(replay_file(path, broker.clock())) == durable(broker.core)
                count += 1

            async def answered(kind: type[protocol.Request], **fields: Any) -> Any:
                reply = await peer.call(kind, **fields)
                assert not isinstance(reply, Error), reply
                check()
                return reply

            await answered(Put, queue="q", body=b"a", key=b"ka")
            await answered(PutMany, queue="q", bodies=[b"b", b"c", b"d", b"e", b"f"], keys=None)
            await answered(Get, queue="q", timeout=0)
            await answered(GetMany, queue="q", n=1, timeout=0)
            r = await answered(Reserve, queue="q", timeout=0)
            await answered(Ack, msg_id=r.msg_id, attempt=r.attempt)
            r = await answered(Reserve, queue="q", timeout=0, lease=100.0)
            await answered(Release, msg_id=r.msg_id, attempt=r.attempt)
            r = await answered(Reserve, queue="q", timeout=0)
            await answered(Release, msg_id=r.msg_id, attempt=r.attempt, delay=500.0)
            r = await answered(Reserve, queue="q", timeout=0)
            await answered(Bury, msg_id=r.msg_id, attempt=r.attempt)
            await answered(Kick, queue="q", n=1)
            await answered(Configure, queue="q", max_deliveries=2, lease=60.0)
            r = await answered(Reserve, queue="q", timeout=0)  # its 2nd delivery: the last
            await answered(Release, msg_id=r.msg_id, attempt=r.attempt)  # to q:dead
            assert broker.core.queue_stats("q:dead", 0)["ready"] == 1
            await answered(Kick, queue="q:dead", n=1)
            await answered(Purge, queue="q")
            # A waiting get, served by a put: the handoff's record too.
            waiting = await connect(broker)
            await waiting.send(Get(id=50, queue="w", timeout=None))
            await blocked()
            await answered(Put, queue="w", body=b"handed")
            assert isinstance(await waiting.receive(), GetReply)
            check()
            assert count == 20
    finally:
        journal.close()


async def test_g04_a_stop_keeps_every_message_in_the_journal(jdir: str) -> None:
    """G4: a stop keeps every message in the journal: ready, reserved (its
    lease ends: back to its place, or to :dead after its last attempt),
    buried, delayed, dead-lettered; waiting requests get shutting_down."""
    path = os.path.join(jdir, "j")
    journal = open_journal(path, "batch")
    broker = broker_for(journal)
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            await nursery.start(broker.serve, None)
            peer = await connect(broker)
            await peer.call(Configure, queue="d", max_deliveries=1)
            reply = await peer.call(
                PutMany, queue="q", bodies=[b"buried", b"delayed", b"reserved", b"ready"]
            )
            buried, delayed, reserved, ready = reply.msg_ids
            r = await peer.call(Reserve, queue="q", timeout=0)
            assert isinstance(await peer.call(Bury, msg_id=r.msg_id, attempt=1), BuryReply)
            r = await peer.call(Reserve, queue="q", timeout=0)
            await peer.call(Release, msg_id=r.msg_id, attempt=1, delay=1000.0)
            until = broker.core._delayed[delayed][1]
            dead = (await peer.call(Put, queue="d", body=b"dead")).msg_id
            r = await peer.call(Reserve, queue="d", timeout=0)
            await peer.call(Release, msg_id=r.msg_id, attempt=1)  # its last attempt: to d:dead
            last = (await peer.call(Put, queue="d", body=b"last attempt")).msg_id
            holder = await connect(broker)  # holds two leases when the broker stops
            assert (await holder.call(Reserve, queue="q", timeout=0)).msg_id == reserved
            assert (await holder.call(Reserve, queue="d", timeout=0)).msg_id == last
            waiter = await connect(broker)
            await waiter.send(Get(id=9, queue="empty", timeout=None))
            await blocked()
            assert isinstance(await peer.call(Stop), StopReply)
            stopped = await waiter.receive()
            assert isinstance(stopped, Error)
            assert (stopped.id, stopped.code) == (9, "shutting_down")
    journal.close()
    after = replay_file(path, until - 500.0)
    state = durable(after)["queues"]
    assert state["q"]["ready"] == [(reserved, b"reserved", 1), (ready, b"ready", 0)]
    assert state["q"]["buried"] == [(buried, b"buried", 1)]
    assert state["q"]["delayed"] == [(delayed, b"delayed", 1, until)]
    assert state["d"]["ready"] == []
    assert state["d:dead"]["ready"] == [(dead, b"dead", 1), (last, b"last attempt", 1)]
    msg = after.reserve_nowait("q", until)
    assert msg is not None
    assert (msg.id, msg.attempts) == (reserved, 2)


def test_g05_a_restart_restores_every_state_and_starts_the_counters_at_zero(
    disk: Callable[..., Disk],
) -> None:
    """G5: a replay restores ready messages in id order, buried ones buried,
    delayed ones until their due time (ready at once if it passed), reserved
    ones ready with their attempts, the queue's settings, the put keys; new
    ids go on above every id in the journal; stats counters start at 0."""
    d = disk()
    core = d.core
    core.configure("q", max_deliveries=5, lease=7.0)
    ids = [core.put("q", b"m%d" % i, NOW, key=b"k%d" % i)[0] for i in range(6)]
    m0, m1, m2, m3, m4, m5 = ids
    assert [m.id for m in core.get_nowait("q")] == [m0]
    held = core.reserve_nowait("q", NOW)  # m1: reserved at the crash
    buried = core.reserve_nowait("q", NOW)
    late = core.reserve_nowait("q", NOW)
    due = core.reserve_nowait("q", NOW)
    assert [m.id for m in (held, buried, late, due) if m] == [m1, m2, m3, m4]
    core.bury(m2, 1)
    core.release(m3, 1, NOW, delay=100)
    core.release(m4, 1, NOW, delay=5)
    top, _ = core.put("z", b"top", NOW)  # the highest id, then gone
    assert core.get_nowait("z")[0].id == top

    after = d.restart(now=NOW + 10).core
    stats = after.queue_stats("q", NOW + 10)
    counters = ("put_total", "delivered_total", "expired_total", "dead_lettered_total")
    assert [stats[c] for c in counters] == [0, 0, 0, 0]
    assert (after.totals()["put_total"], after.totals()["delivered_total"]) == (0, 0)
    assert [(m.id, m.attempts) for m in after._queues["q"].ready] == [(m1, 1), (m4, 1), (m5, 0)]
    assert list(after._queues["q"].buried) == [m2]
    assert after._delayed[m3][1] == NOW + 100
    assert after.queue_config("q") == {
        "max_deliveries": 5,
        "lease": 7.0,
        "maxsize": 0,
        "max_bytes": 0,
    }
    after.tick(NOW + 99.9)
    assert ready_ids(after) == [m1, m4, m5]
    after.tick(NOW + 100)
    assert ready_ids(after) == [m1, m3, m4, m5]
    before = after.totals()
    assert after.put("q", b"again", NOW, key=b"k0") == (m0, None)  # consumed, still known
    assert after.totals() == before
    assert after.put("q", b"new", NOW)[0] == top + 1


@pytest.mark.parametrize("fsync", ["batch", "always"])
async def test_g06_a_put_is_answered_only_once_an_fsync_covered_it(jdir: str, fsync: str) -> None:
    """G6: under --fsync batch and always, a put's (and a put_many's) reply goes
    out only after an fsync covered its record, even for a put whose key was
    seen (its reply waits for the first put's fsync): it survives a power loss."""
    path = os.path.join(jdir, "j")
    journal = open_journal(path, fsync)
    ends: dict[int, int] = {}  # message id -> journal bytes once its record was written
    problems: list[str] = []
    checked = 0

    def on_send(data: bytes) -> None:  # runs in the broker, as each reply is written
        nonlocal checked
        reader = FrameReader(1 << 30)
        reader.feed(data)
        while (payload := reader.next_frame()) is not None:
            reply = protocol.decode_reply(payload)
            if isinstance(reply, PutReply | PutManyReply):
                ids = reply.msg_ids if isinstance(reply, PutManyReply) else [reply.msg_id]
                checked += len(ids)
                for msg_id in ids:
                    if journal.synced < ends[msg_id]:
                        problems.append(f"{reply!r} sent before its record was fsynced")

    try:
        async with serving(journal) as broker:
            write = broker.core.write
            assert write is not None

            def tracking(record: AnyRecord) -> None:
                write(record)
                if isinstance(record, PutRecord):
                    for msg_id in record.ids:
                        ends[msg_id] = journal.written

            broker.core.write = tracking
            peers = [await connect(broker, on_send) for _ in range(3)]
            for n, peer in enumerate(peers):
                puts = [
                    Put(id=i, queue="q", body=b"%d.%d" % (n, i), key=b"k%d" % i)
                    for i in range(1, 6)
                ]
                await peer.send(*puts, PutMany(id=6, queue="q", bodies=[b"x", b"y"]))
            for peer in peers:
                for _ in range(6):
                    assert isinstance(await peer.receive(), PutReply | PutManyReply)
    finally:
        journal.close()
    assert checked == 3 * 7
    assert not problems, problems[:3]


def test_g06_under_fsync_always_every_change_survives_a_power_loss(
    jdir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """G6: under --fsync always every change (a get's removal, an ack, a
    release, a bury, a kick, ...) is fsynced before the call returns, hence
    before its reply: a power loss right after any of them loses nothing."""
    path = os.path.join(jdir, "b.sock.journal")
    synced = 0

    class SyncTracking:
        def __getattr__(self, name: str) -> Any:
            return getattr(os, name)

        def fsync(self, fd: int) -> None:
            nonlocal synced
            os.fsync(fd)
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and st.st_ino == os.stat(path).st_ino:
                synced = st.st_size

    monkeypatch.setattr(jmod, "os", SyncTracking())
    monkeypatch.setattr(jmod, "in_memory_filesystem", lambda path: False)
    journal, _ = Journal.open(path, "always")
    core = new_core(journal.append, max_deliveries=2)
    lost_power = os.path.join(jdir, "after-power-loss")
    checks = 0

    def power_loss() -> None:
        nonlocal checks
        with open(lost_power, "wb") as f:
            f.write(read_bytes(path)[:synced])  # only what an fsync covered is left
        after = new_core(max_deliveries=2)
        for record in read_journal(lost_power).records:
            after.apply(record)
        after.finish_replay(NOW)
        assert durable(after) == durable(core)
        checks += 1

    held: list[Message] = []

    def lease() -> None:
        msg = core.reserve_nowait("q", NOW, lease=5)
        assert msg is not None
        held.append(msg)

    def verb(name: str, **kwargs: Any) -> Callable[[], object]:
        def call() -> object:
            msg = held[-1]
            return getattr(core, name)(msg.id, msg.attempts, **kwargs)

        return call

    try:
        steps: list[Callable[[], object]] = [
            lambda: core.put("q", b"a", NOW, key=b"ka"),
            lambda: core.put_many("q", [b"b", b"c", b"d", b"e", b"f", b"g"], NOW),
            lambda: core.get_nowait("q"),
            lambda: core.get_nowait("q", 1),
            lease,
            verb("ack"),
            lease,
            verb("release", now=NOW),
            lease,
            verb("release", now=NOW),  # its last attempt: to q:dead
            lease,
            verb("release", now=NOW, delay=100),
            lease,
            verb("bury"),
            lambda: core.kick("q", 1, NOW),
            lambda: core.kick("q:dead", 1, NOW),
            lambda: core.configure("q", lease=9.0),
            lease,
            lambda: core.tick(NOW + 5),  # a lease runs out
            lambda: core.purge("q"),
        ]
        for step in steps:
            step()
            power_loss()
    finally:
        journal.close()
    assert checks == len(steps)


def test_g07_a_journal_damaged_in_the_middle_stops_the_broker_until_repair(
    socket_path: str,
) -> None:
    """G7: a damaged record followed by valid records to the end of the file:
    the broker refuses to start (exit status 1, the file left alone) until
    --repair, which cuts the journal at the damage, losing what follows."""
    path = journal_path(socket_path, None)
    journal, _ = Journal.open(path, "never")
    core = new_core(journal.append)
    for body in (b"one", b"two!", b"three", b"four"):
        core.put("q", body, NOW)
    journal.close()
    data = bytearray(read_bytes(path))
    data[data.index(b"two!")] ^= 0xFF
    with open(path, "wb") as f:
        f.write(data)

    refused = subprocess.run(
        [BROKER, socket_path, "--idle-exit", "0"], capture_output=True, timeout=30, check=False
    )
    assert refused.returncode == 1, refused.stderr.decode()
    assert b"corrupt" in refused.stderr
    assert b"--repair" in refused.stderr
    assert read_bytes(path) == bytes(data)
    assert not broker_running(socket_path)

    with foreground([BROKER, socket_path, "--repair", "--idle-exit", "0"]) as repaired:
        wait_until(lambda: serving_at(socket_path), what="the repaired broker to serve")
        with brokerq.Client(socket_path, timeout=10) as client:
            assert client.broker_pid == repaired.pid
            assert client.queue("q").get_many(10, timeout=0) == [b"one"]
            assert client.stop()
        assert repaired.wait(timeout=10) == 0


# -- G9: a full disk ----------------------------------------------------------------------


def _g09_core() -> tuple[BrokerCore, int]:
    """Messages in every state, and a waiting get; returns the core and a leased id."""
    core = new_core()
    core.configure("d", max_deliveries=1)
    core.put_many("q", [b"buried", b"leased"], NOW)
    msg = core.reserve_nowait("q", NOW, owner="h")
    assert msg is not None
    core.bury(msg.id, 1)
    msg = core.reserve_nowait("q", NOW, lease=10, owner="h")
    assert msg is not None
    core.put_many("q", [b"r1", b"r2", b"r3"], NOW, keys=[b"k1", b"k2", b"k3"])
    core.put("d", b"dead", NOW)
    dead = core.reserve_nowait("d", NOW)
    assert dead is not None
    core.release(dead.id, 1, NOW)
    core.wait("w")
    return core, msg.id


FULL_DISK_REQUESTS: dict[str, Callable[[BrokerCore, int], object]] = {
    "put": lambda c, leased: c.put("q", b"new", NOW, key=b"k-new"),
    "put handed to a waiter": lambda c, leased: c.put("w", b"new", NOW),
    "put_many": lambda c, leased: c.put_many("q", [b"x", b"y"], NOW, keys=[b"kx", b"ky"]),
    "get": lambda c, leased: c.get_nowait("q"),
    "get_many": lambda c, leased: c.get_nowait("q", 3),
    "reserve": lambda c, leased: c.reserve_nowait("q", NOW, owner="o"),
    "ack": lambda c, leased: c.ack(leased, 1),
    "release": lambda c, leased: c.release(leased, 1, NOW),
    "release with a delay": lambda c, leased: c.release(leased, 1, NOW, delay=5),
    "bury": lambda c, leased: c.bury(leased, 1),
    "kick": lambda c, leased: c.kick("q", 1, NOW),
    "kick from :dead": lambda c, leased: c.kick("d:dead", 1, NOW),
    "configure": lambda c, leased: c.configure("q", max_deliveries=7),
    "purge": lambda c, leased: c.purge("q"),
}


@pytest.mark.parametrize(
    "request_kind",
    list(FULL_DISK_REQUESTS),
)
def test_g09_a_request_whose_record_cannot_be_written_changes_nothing(request_kind: str) -> None:
    """G9: a request whose record cannot be written for a full disk fails with
    brokerq.Full and changes nothing; once there is room it goes through."""
    core, leased = _g09_core()
    before = fingerprint(core)
    core.write = full_disk
    with pytest.raises(brokerq.Full):
        FULL_DISK_REQUESTS[request_kind](core, leased)
    assert fingerprint(core) == before
    core.write = None  # room again
    FULL_DISK_REQUESTS[request_kind](core, leased)
    assert fingerprint(core) != before


def test_g09_full_is_raised_as_brokerq_full_and_not_retried(
    fake_broker: Callable[[Answer], FakeBroker], socket_path: str
) -> None:
    """G9: the error `full` reaches the caller as brokerq.Full, and the client
    does not send the request again."""
    fake = fake_broker(lambda request, n: Error(id=request.id, code="full", message="disk full"))
    with brokerq.Client(socket_path, timeout=5) as client, pytest.raises(brokerq.Full):
        client.queue("q").put(b"x")
    assert len(fake.requests) == 1


# -- G10: journal failures ---------------------------------------------------------------


async def test_g10_a_failed_group_commit_answers_no_put_and_stops_the_broker(jdir: str) -> None:
    """G10: an fsync failure under --fsync batch: the puts waiting for it get no
    reply (their connection is closed), waiting requests get shutting_down,
    the broker stops; the next broker replays whatever the journal holds."""
    path = os.path.join(jdir, "j")
    journal = open_journal(path, "batch")
    broker = broker_for(journal)
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            await nursery.start(broker.serve, None)
            waiter = await connect(broker)
            await waiter.send(Get(id=7, queue="other", timeout=None))
            await blocked()
            producer = await connect(broker)

            def eio() -> int:
                journal._fail("fsync failed: [Errno 5] Input/output error (simulated)")
                raise AssertionError("unreachable")

            journal.sync = eio  # type: ignore[method-assign]
            await producer.send(Put(id=3, queue="q", body=b"unsynced"))
            frames = await producer.until_eof()
            assert all(frame.id != 3 for frame in frames), frames  # no reply to the put
            assert all(isinstance(frame, Error) and frame.code == "internal" for frame in frames)
            stopped = await waiter.receive()
            assert isinstance(stopped, Error)
            assert (stopped.id, stopped.code) == (7, "shutting_down")
    assert broker.failure is not None
    assert "fsync failed" in broker.failure
    journal.close()
    # Written, never synced, never acknowledged: the next broker has it (the page cache did).
    assert ready_of(replay_file(path, NOW)) == [(b"unsynced", 0)]


async def test_g10_a_failed_write_answers_internal_and_acknowledges_nothing_more(
    jdir: str,
) -> None:
    """G10: any other journal write failure: the request gets `internal`, no
    later request that needs the journal is acknowledged, waiting requests
    get shutting_down, the broker stops; the journal keeps what it held."""
    path = os.path.join(jdir, "j")
    journal = open_journal(path, "never")
    broker = broker_for(journal)
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            await nursery.start(broker.serve, None)
            peer = await connect(broker)
            await peer.call(PutMany, queue="q", bodies=[b"a", b"b", b"c"])
            r = await peer.call(Reserve, queue="q", timeout=0, lease=100.0)
            buried = await peer.call(Reserve, queue="q", timeout=0)
            assert isinstance(await peer.call(Bury, msg_id=buried.msg_id, attempt=1), BuryReply)
            waiter = await connect(broker)
            await waiter.send(Get(id=7, queue="other", timeout=None))
            await blocked()

            def eio_once(record: AnyRecord) -> None:
                broker.core.write = journal.append
                journal._fail("write failed: [Errno 5] Input/output error (simulated)")

            broker.core.write = eio_once
            await peer.send(
                Get(id=20, queue="q", timeout=0),
                Put(id=21, queue="q", body=b"d"),
                PutMany(id=22, queue="q", bodies=[b"e"]),
                Reserve(id=23, queue="q", timeout=0),
                Ack(id=24, msg_id=r.msg_id, attempt=r.attempt),
                Kick(id=25, queue="q", n=1),
                Configure(id=26, queue="q", lease=5.0),
            )
            replies = {frame.id: frame for frame in await peer.until_eof()}
            first = replies[20]
            assert isinstance(first, Error)
            assert first.code == "internal"
            for request_id in range(21, 27):
                reply = replies.get(request_id)
                assert reply is None or isinstance(reply, Error), reply
            stopped = await waiter.receive()
            assert isinstance(stopped, Error)
            assert (stopped.id, stopped.code) == (7, "shutting_down")
    assert broker.failure is not None
    journal.close()
    after = replay_file(path, NOW)
    assert ready_of(after) == [(b"a", 1), (b"c", 0)]
    assert list(after._queues["q"].buried) == [buried.msg_id]
    assert after.queue_config("q")["lease"] == 30.0


FAILING_BROKER = r"""
import errno, os, sys
import brokerq.broker.journal

flag = sys.argv[2]


class DiskThatFails:
    def __getattr__(self, name):
        return getattr(os, name)

    def write(self, fd, data):
        if os.path.exists(flag):
            raise OSError(errno.EIO, "Input/output error (simulated)")
        return os.write(fd, data)


brokerq.broker.journal.os = DiskThatFails()
from brokerq.broker.daemon import main

main([sys.argv[1], "--idle-exit", "0"])
"""


def test_g10_after_a_journal_failure_the_broker_exits_1_and_the_next_replays(
    socket_path: str, sock_dir: str
) -> None:
    """G10: after a journal write failure the broker answers `internal`
    (InternalError) and exits with status 1; the next broker replays the
    journal."""
    flag = os.path.join(sock_dir, "fail")
    with foreground([sys.executable, "-c", FAILING_BROKER, socket_path, flag]) as failing:
        wait_until(lambda: serving_at(socket_path), what="the broker to serve")
        with brokerq.Client(socket_path, timeout=10) as client:
            assert client.broker_pid == failing.pid
            queue = client.queue("q")
            queue.put(b"kept")
            Path(flag).touch()
            with pytest.raises(brokerq.InternalError):
                queue.put(b"refused")
        assert failing.wait(timeout=10) == 1
    os.unlink(flag)
    with brokerq.connect(socket_path) as client:
        assert client.broker_pid != failing.pid
        assert client.queue("q").get_many(10, timeout=0) == [b"kept"]


@pytest.mark.parametrize("end", ["stop", "crash"])
def test_g11_without_a_journal_a_stop_or_crash_loses_every_message_and_key(
    socket_path: str, sock_dir: str, monkeypatch: pytest.MonkeyPatch, end: str
) -> None:
    """G11: with --no-journal a stop or a crash loses every message the broker
    held, and the put-key window with them."""
    monkeypatch.setenv("BROKERQ_JOURNAL", "0")  # reaches the spawned brokers
    with brokerq.connect(socket_path) as client:
        assert client.stats()["journal"] is None
        client.call(PutReply, Put, 0, queue="q", body=b"x", key=b"the key")
        client.queue("q").put(b"y")
        pid = client.broker_pid
        if end == "stop":
            assert client.stop()
        else:
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda: gone(pid), what=f"broker {pid} to die")
    assert not [name for name in os.listdir(sock_dir) if "journal" in name]
    with brokerq.connect(socket_path) as client:
        assert client.broker_pid != pid
        queue = client.queue("q")
        with pytest.raises(brokerq.Empty):
            queue.get_nowait()
        client.call(PutReply, Put, 0, queue="q", body=b"x", key=b"the key")
        assert queue.stats()["ready"] == 1  # the key was forgotten: enqueued again


# == put ====================================================================================


async def test_g12_a_producer_that_dies_before_its_put_is_sent_enqueues_nothing(
    jdir: str,
) -> None:
    """G12: a put the producer did not get out in full (it died first)
    enqueues nothing and writes nothing; its key stays unknown."""
    path = os.path.join(jdir, "j")
    journal = open_journal(path, "never")
    try:
        async with serving(journal) as broker:
            producer = await connect(broker)
            written = journal.written
            frame = protocol.encode_frame(Put(id=2, queue="q", body=b"never", key=b"k"))
            await producer.stream.send_all(frame[:-1])
            await producer.stream.aclose()
            await blocked()
            assert broker.core.queue_names() == []
            assert journal.written == written
            other = await connect(broker)
            put = await other.call(Put, queue="q", body=b"sent", key=b"k")
            assert isinstance(put, PutReply)
            assert ready_of(broker.core) == [(b"sent", 0)]
    finally:
        journal.close()


def test_g13_a_put_whose_connection_broke_is_sent_again_with_the_same_key(
    fake_broker: Callable[[Answer], FakeBroker], socket_path: str
) -> None:
    """G13: a broker that went before answering: the client sends the put
    again, with the same key, on a new connection, and returns the id the
    broker that executed it answered."""
    fake = fake_broker(lose_first(2))
    with brokerq.Client(socket_path, timeout=5) as client:
        queue = client.queue("q")
        assert queue.put(b"x") == 7
        assert queue.put(b"y") == 7
    puts = [(conn, request) for conn, request in fake.requests]
    assert all(isinstance(request, Put) for _, request in puts)
    assert len({conn for conn, _ in puts}) == 3  # the first put: three connections
    keys = [request.key for _, request in puts if isinstance(request, Put)]
    assert keys[0]
    assert keys[:3] == [keys[0]] * 3
    assert keys[3] != keys[0]  # the next put: a fresh key


def test_g13_a_put_is_sent_again_until_the_clients_timeout_always_with_its_key(
    fake_broker: Callable[[Answer], FakeBroker], socket_path: str
) -> None:
    """G13, G16: the put is sent again until the client's timeout after the
    call began, then raises BrokerUnavailable; every try carried the same key,
    so the put was enqueued once or not at all."""
    fake = fake_broker(lambda request, n: None)
    with brokerq.Client(socket_path, timeout=0.5) as client:
        client.connection()
        start = time.monotonic()
        with pytest.raises(brokerq.BrokerUnavailable):
            client.queue("q").put(b"x")
        took = time.monotonic() - start
    assert 0.5 <= took < 3
    assert len(fake.requests) >= 2
    assert len({request.key for _, request in fake.requests if isinstance(request, Put)}) == 1


async def test_g14_a_put_retried_after_a_crash_after_its_record_gets_the_first_id(
    jdir: str,
) -> None:
    """G14: the broker dies after writing a put's record, before the client
    read the reply: the next broker replays the record and its key, answers
    the retry (same key) with the first id, and enqueues nothing more."""
    path = os.path.join(jdir, "j")
    journal = open_journal(path, "never")
    try:
        async with serving(journal) as broker:
            producer = await connect(broker)
            await producer.send(Put(id=2, queue="q", body=b"once", key=b"key-1"))
            await blocked()  # the record is written (and the reply, which nobody reads)
            image = read_bytes(path)  # the broker dies now
    finally:
        journal.close()
    journal, core = next_broker(image, os.path.join(jdir, "next"))
    try:
        (first_id,) = ready_ids(core)
        async with serving(journal, core) as broker:
            retry = await connect(broker)
            reply = await retry.call(Put, queue="q", body=b"once", key=b"key-1")
            assert isinstance(reply, PutReply)
            assert reply.msg_id == first_id
            assert ready_of(broker.core) == [(b"once", 0)]
            assert broker.core.queue_stats("q", 0)["put_total"] == 0
    finally:
        journal.close()


def test_g15_the_last_100000_keys_are_remembered_broker_wide_across_restarts() -> None:
    """G15: a put whose key is among the last 100,000 accepted (broker-wide,
    across restarts and compactions) gets the remembered id and enqueues
    nothing, even if that message was consumed; after 100,000 other keyed
    puts it is enqueued again."""
    assert KEY_WINDOW == 100_000
    records: list[AnyRecord] = []
    core = new_core(records.append)
    first, _ = core.put("a", b"first", NOW, key=b"first")
    assert [m.id for m in core.get_nowait("a")] == [first]  # consumed since
    others = 0
    while others < KEY_WINDOW - 1:  # 99,999 other keys, on another queue
        n = min(10_000, KEY_WINDOW - 1 - others)
        core.put_many("b", [b""] * n, NOW, keys=[b"o%d" % (others + i) for i in range(n)])
        others += n
    for each in (core, replayed(records), replayed(core.snapshot())):
        before = each.totals()
        assert each.put("c", b"retried", NOW, key=b"first") == (first, None)
        assert each.totals() == before
    core.put("b", b"", NOW, key=b"one more")  # the 100,000th other key
    for each in (core, replayed(records), replayed(core.snapshot())):
        again, _ = each.put("c", b"retried", NOW, key=b"first")
        assert again != first
        assert each.queue_stats("c", NOW)["ready"] == 1


async def test_g16_a_put_whose_producer_died_after_sending_is_enqueued_at_most_once(
    jdir: str,
) -> None:
    """G16: a producer that dies after sending its put (on each of its tries)
    has enqueued the message once or not at all."""
    path = os.path.join(jdir, "j")
    journal = open_journal(path, "never")
    try:
        async with serving(journal) as broker:
            for _ in range(3):  # each try on a connection the producer dies on
                producer = await connect(broker)
                await producer.send(Put(id=2, queue="q", body=b"maybe", key=b"k-maybe"))
                await producer.stream.aclose()
                await blocked()
            assert ready_of(broker.core) == [(b"maybe", 0)]
            assert broker.core.queue_stats("q", 0)["put_total"] == 1
            assert ready_of(replay_file(path, NOW)) == [(b"maybe", 0)]
    finally:
        journal.close()


async def test_g18_under_fsync_batch_a_message_may_be_delivered_before_its_fsync(
    jdir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """G18: under --fsync batch a waiting consumer gets a message while the
    fsync that covers its put is still to come, hence before the put is
    answered. (A permission, not a promise: this pins what happens.)"""
    gate = trio.Event()
    real_wait_synced = Broker.wait_synced

    async def slow_disk(self: Broker, lsn: int) -> None:
        await gate.wait()
        await real_wait_synced(self, lsn)

    monkeypatch.setattr(Broker, "wait_synced", slow_disk)
    path = os.path.join(jdir, "j")
    journal = open_journal(path, "batch")
    try:
        async with serving(journal) as broker:
            consumer = await connect(broker)
            await consumer.send(Get(id=5, queue="q", timeout=None))
            await blocked()
            producer = await connect(broker)
            await producer.send(Put(id=6, queue="q", body=b"early"))
            got = await consumer.receive()
            assert isinstance(got, GetReply)
            assert got.body == b"early"
            assert journal.synced < journal.written  # its put is not fsynced, not answered
            gate.set()
            reply = await producer.receive()
            assert isinstance(reply, PutReply)
            assert reply.msg_id == got.msg_id
            assert journal.synced == journal.written
    finally:
        journal.close()


# == put_many ===============================================================================


def test_g19_a_put_many_is_one_record_all_or_none(jdir: str) -> None:
    """G19: a put_many is one record: a crash anywhere in its write leaves all
    its messages or none, in list order; each body's key makes a retry of the
    request after a restart enqueue nothing."""
    path = os.path.join(jdir, "b.sock.journal")
    journal, _ = Journal.open(path, "never")
    written: list[AnyRecord] = []

    def write(record: AnyRecord) -> None:
        journal.append(record)
        written.append(record)

    core = new_core(write)
    core.put("q", b"before", NOW)
    start = journal.size
    keys = [b"ka", b"kb", b"kc"]
    ids, _ = core.put_many("q", [b"a", b"b", b"c"], NOW, keys=keys)
    end = journal.size
    journal.close()
    assert len(written) == 2  # one record for the whole request
    data = read_bytes(path)
    torn = os.path.join(jdir, "torn")
    for cut in range(start, end + 1):
        with open(torn, "wb") as f:
            f.write(data[:cut])
        after = replayed(read_journal(torn).records)
        want = [b"before", b"a", b"b", b"c"] if cut == end else [b"before"]
        assert [body for body, _ in ready_of(after)] == want, cut
    after = replayed(read_journal(path).records)
    assert after.put_many("q", [b"a", b"b", b"c"], NOW, keys=keys) == (ids, [])
    assert len(ready_ids(after)) == 4


async def test_g19_the_messages_of_a_put_many_join_the_queue_together_in_order() -> None:
    """G19: the messages of one put_many join the queue in list order with no
    other message between them, whatever other producers send meanwhile."""
    async with serving() as broker:
        peers = [await connect(broker) for _ in range(3)]
        for n, peer in enumerate(peers):
            await peer.send(
                *(
                    PutMany(id=i, queue="q", bodies=[b"%d.%d.%d" % (n, i, j) for j in range(3)])
                    if i % 2
                    else Put(id=i, queue="q", body=b"%d.%d.0" % (n, i))
                    for i in range(1, 9)
                )
            )
        for peer in peers:
            for _ in range(8):
                assert isinstance(await peer.receive(), PutReply | PutManyReply)
        got = await peers[0].call(GetMany, queue="q", n=1000, timeout=0)
        assert isinstance(got, GetManyReply)
        parsed = [tuple(int(x) for x in body.split(b".")) for body in got.bodies]
        assert len(parsed) == 3 * (4 * 3 + 4)
        i = 0
        while i < len(parsed):
            n, request, _ = parsed[i]
            size = 3 if request % 2 else 1
            assert parsed[i : i + size] == [(n, request, j) for j in range(size)], parsed
            i += size


def test_g19_a_retried_put_many_carries_the_same_key_for_each_body(
    fake_broker: Callable[[Answer], FakeBroker], socket_path: str
) -> None:
    """G19: each body of a put_many carries its own key, and a retried request
    carries the same keys, so G13 holds for each request as for a put."""
    fake = fake_broker(lose_first(1))
    with brokerq.Client(socket_path, timeout=5) as client:
        assert client.queue("q").put_many([b"a", b"b", b"c"]) == [7, 8, 9]
    sent = [request for _, request in fake.requests]
    assert len(sent) == 2
    first, retry = sent
    assert isinstance(first, PutMany)
    assert isinstance(retry, PutMany)
    assert first.keys is not None
    assert len(set(first.keys)) == 3
    assert all(first.keys)
    assert retry.keys == first.keys
    assert retry.bodies == first.bodies == [b"a", b"b", b"c"]


@pytest.mark.parametrize("failure", ["full", "connection lost"])
def test_g20_a_split_put_many_that_fails_midway_sent_each_earlier_request_once(
    fake_broker: Callable[[Answer], FakeBroker], socket_path: str, failure: str
) -> None:
    """G20: the client splits a large put_many into requests sent one after
    another; when one fails the call raises, and the requests before it were
    each sent (and enqueued) exactly once, the ones after it never."""

    def answer(request: protocol.AnyRequest, n: int) -> protocol.AnyReply | None:
        if n == 1:
            return good_reply(request)
        if failure == "full":
            return Error(id=request.id, code="full", message="disk full")
        return None

    fake = fake_broker(answer)
    bodies = [b"%03d" % i + b"x" * 297 for i in range(9)]  # 3 per request under 1,000 bytes
    expected = brokerq.Full if failure == "full" else brokerq.BrokerUnavailable
    with brokerq.Client(socket_path, timeout=0.5) as client, pytest.raises(expected):
        client.queue("q").put_many(bodies)
    sent = [request for _, request in fake.requests]
    assert all(isinstance(request, PutMany) for request in sent)
    assert sent[0].bodies == bodies[:3]  # type: ignore[union-attr]
    assert all(request.bodies == bodies[3:6] for request in sent[1:])  # type: ignore[union-attr]
    if failure == "full":
        assert len(sent) == 2  # not retried
    else:
        assert len(sent) >= 2  # retried, the same keys, until the client's timeout
        assert all(request.keys == sent[1].keys for request in sent[1:])  # type: ignore[union-attr]


# == get and get_many =======================================================================


def test_g22_a_get_that_dies_before_its_removal_record_leaves_the_messages(
    disk: Callable[..., Disk],
) -> None:
    """G22: the broker dies before writing a get's removal record: the
    messages stay in their queue, in order, and come back with the next broker."""
    d = disk()
    d.core.put_many("q", [b"a", b"b", b"c"], NOW)
    d.die_before(1)
    with pytest.raises(Crash):
        d.core.get_nowait("q", 2)
    assert ready_of(d.restart().core) == [(b"a", 0), (b"b", 0), (b"c", 0)]


@pytest.mark.parametrize("op", ["get", "get_many", "reserve"])
def test_g22_a_get_whose_connection_broke_asks_again_with_what_is_left_of_its_timeout(
    fake_broker: Callable[[Answer], FakeBroker], socket_path: str, op: str
) -> None:
    """G22, G27: the connection broke before the reply: the client asks again,
    on a new connection, with what is left of its timeout (a reserve with the
    same lease)."""
    fake = fake_broker(lose_first(1, pause=0.3))
    with brokerq.Client(socket_path, timeout=5) as client:
        queue = client.queue("q")
        if op == "get":
            assert queue.get(timeout=2.0) == b"x"
        elif op == "get_many":
            assert queue.get_many(3, timeout=2.0) == [b"x"]
        else:
            msg = queue.reserve(timeout=2.0, lease=12.0)
            assert (msg.id, msg.attempt) == (7, 1)
    (conn1, first), (conn2, retry) = fake.requests
    assert conn1 != conn2
    assert type(first) is type(retry)
    assert isinstance(first, Get | GetMany | Reserve)
    assert isinstance(retry, Get | GetMany | Reserve)
    assert first.timeout == 2.0
    assert retry.timeout is not None
    assert 0 < retry.timeout <= 2.0 - 0.3
    if isinstance(first, Reserve):
        assert isinstance(retry, Reserve)
        assert retry.lease == first.lease == 12.0


@pytest.mark.parametrize("n", [1, 3])
def test_g23_a_get_whose_removal_record_was_written_is_lost_in_a_crash(
    disk: Callable[..., Disk], n: int
) -> None:
    """G23: the broker dies after writing a get's removal record, before the
    reply: the message is lost (at-most-once)."""
    d = disk()
    d.core.put_many("q", [b"a", b"b", b"c", b"d"], NOW)
    assert len(d.core.get_nowait("q", n)) == n  # the record is written; no reply yet
    after = d.restart().core
    assert [body for body, _ in ready_of(after)] == [b"a", b"b", b"c", b"d"][n:]


async def test_g24_a_get_many_reply_that_cannot_be_written_puts_the_messages_back(
    jdir: str,
) -> None:
    """G24: the broker cannot write a reply carrying messages (the consumer's
    connection is broken): they go back to their place at the head of their
    queue, in the journal too."""
    path = os.path.join(jdir, "j")
    journal = open_journal(path, "never")
    try:
        async with serving(journal) as broker:
            producer = await connect(broker)
            await producer.call(PutMany, queue="q", bodies=[b"a", b"b", b"c", b"d"])
            deaf = await connect(broker)
            await deaf.stream.receive_stream.aclose()
            await deaf.send(GetMany(id=2, queue="q", n=2, timeout=0))
            await blocked()
            assert ready_of(broker.core) == [(b"a", 0), (b"b", 0), (b"c", 0), (b"d", 0)]
            assert durable(replay_file(path, broker.clock())) == durable(broker.core)
            got = await producer.call(GetMany, queue="q", n=10, timeout=0)
            assert got.bodies == [b"a", b"b", b"c", b"d"]
    finally:
        journal.close()


@pytest.mark.parametrize("kind", ["get", "reserve"])
async def test_g24_an_unwritable_reply_puts_the_message_back_even_on_a_full_disk(
    jdir: str, kind: str
) -> None:
    """G24 (and G29 for a reserve): the message of a reply that cannot be
    written goes back to its place, the lease dropped, even if the disk is
    full at that moment (G9: a full disk is no journal failure)."""
    path = os.path.join(jdir, "j")
    journal = open_journal(path, "never")
    try:
        async with serving(journal) as broker:
            deaf = await connect(broker)
            request = Get if kind == "get" else Reserve
            await deaf.send(request(id=2, queue="q", timeout=None))
            await blocked()
            await deaf.stream.receive_stream.aclose()  # its reply cannot be written
            full = False

            def write(record: AnyRecord) -> None:
                nonlocal full
                if full:
                    full_disk(record)
                journal.append(record)
                if isinstance(record, PutRecord):
                    full = True  # the disk fills up with the put's record

            broker.core.write = write
            producer = await connect(broker)
            assert isinstance(await producer.call(Put, queue="q", body=b"m"), PutReply)
            await blocked()
            full = False  # room again
            assert broker.core.totals()["reserved"] == 0
            assert ready_of(broker.core) == [(b"m", 0)]
    finally:
        journal.close()


async def test_g25_a_reply_written_to_the_socket_counts_as_delivered(jdir: str) -> None:
    """G25: once the broker wrote a get's reply to the socket, a consumer that
    closes (or dies) before reading it has lost the message."""
    path = os.path.join(jdir, "j")
    journal = open_journal(path, "never")
    try:
        async with serving(journal) as broker:
            producer = await connect(broker)
            await producer.call(PutMany, queue="q", bodies=[b"a", b"b"])
            consumer = await connect(broker)
            await consumer.send(Get(id=2, queue="q", timeout=0))
            await blocked()  # the reply is written...
            await consumer.stream.aclose()  # ...and never read
            await blocked()
            assert ready_of(broker.core) == [(b"b", 0)]
            assert broker.core.queue_stats("q", 0)["delivered_total"] == 1
            assert ready_of(replay_file(path, NOW)) == [(b"b", 0)]
    finally:
        journal.close()


# == reserve and ack ========================================================================


def test_g27_a_reserve_that_dies_before_its_record_leaves_the_message_ready(
    disk: Callable[..., Disk],
) -> None:
    """G27: the broker dies before writing a reserve's delivery record: the
    message stays ready, its attempt not counted."""
    d = disk()
    d.core.put_many("q", [b"a", b"b"], NOW)
    d.die_before(1)
    with pytest.raises(Crash):
        d.core.reserve_nowait("q", NOW)
    after = d.restart().core
    assert ready_of(after) == [(b"a", 0), (b"b", 0)]
    msg = after.reserve_nowait("q", NOW)
    assert msg is not None
    assert (msg.body, msg.attempts) == (b"a", 1)


@pytest.mark.parametrize("how", ["reserve", "waiting reserve served by a put"])
def test_g28_a_reserve_whose_record_was_written_counts_its_attempt_after_a_crash(
    disk: Callable[..., Disk], how: str
) -> None:
    """G28: the broker dies after writing the delivery record, before the reply
    was received: the next broker has the message ready with that attempt
    counted, so its next delivery is one attempt higher."""
    d = disk()
    if how == "reserve":
        d.core.put_many("q", [b"a", b"b"], NOW)
        msg = d.core.reserve_nowait("q", NOW, owner="c")
    else:
        waiter = d.core.wait("q", lease=30.0, owner="c")
        d.core.put_many("q", [b"a", b"b"], NOW)
        (msg,) = waiter.messages
    assert msg is not None
    assert (msg.body, msg.attempts) == (b"a", 1)
    after = d.restart().core
    assert ready_of(after) == [(b"a", 1), (b"b", 0)]
    again = after.reserve_nowait("q", NOW)
    assert again is not None
    assert (again.body, again.attempts) == (b"a", 2)


@pytest.mark.parametrize("waiting", [False, True], ids=["immediate", "waiting"])
async def test_g29_a_reserve_reply_that_cannot_be_written_drops_the_lease_uncounted(
    jdir: str, waiting: bool
) -> None:
    """G29: the broker cannot write a reserve's reply: the lease is dropped,
    the attempt not counted (in the journal too), the message back at its place."""
    path = os.path.join(jdir, "j")
    journal = open_journal(path, "never")
    try:
        async with serving(journal) as broker:
            producer = await connect(broker)
            deaf = await connect(broker)
            if waiting:
                await deaf.send(Reserve(id=2, queue="q", timeout=None))
                await blocked()
                await deaf.stream.receive_stream.aclose()
                await producer.call(PutMany, queue="q", bodies=[b"a", b"b"])
            else:
                await producer.call(PutMany, queue="q", bodies=[b"a", b"b"])
                await deaf.stream.receive_stream.aclose()
                await deaf.send(Reserve(id=2, queue="q", timeout=0))
            await blocked()
            assert broker.core.totals()["reserved"] == 0
            assert ready_of(broker.core) == [(b"a", 0), (b"b", 0)]
            assert durable(replay_file(path, broker.clock())) == durable(broker.core)
            again = await producer.call(Reserve, queue="q", timeout=0)
            assert isinstance(again, ReserveReply)
            assert (again.body, again.attempt) == (b"a", 1)
    finally:
        journal.close()


@pytest.mark.parametrize("how", ["connection closed", "lease ran out"])
def test_g30_a_lease_that_ends_brings_the_message_back_then_moves_it_to_dead(how: str) -> None:
    """G30: when a lease ends (its connection closed, it ran out) the message
    goes back to its place by id, delivered again one attempt higher; after
    max_deliveries attempts it moves to <queue>:dead and stays there (a :dead
    queue never moves messages on) until consumed, purged or kicked."""
    core = new_core(max_deliveries=3)
    ids, _ = core.put_many("q", [b"a", b"b", b"c"], NOW)
    a, b, c = ids
    t = NOW

    def end_lease(owner: str) -> None:
        if how == "connection closed":
            core.release_owned(owner, t)
        else:
            core.tick(t + 10)

    for attempt in (1, 2, 3):
        msg = core.reserve_nowait("q", t, lease=10, owner=f"c{attempt}")
        assert msg is not None
        assert (msg.id, msg.attempts) == (a, attempt)
        assert core.lease_of(a) is not None
        end_lease(f"c{attempt}")
        t += 20
        if attempt < 3:
            assert ready_ids(core) == [a, b, c]
    assert ready_ids(core) == [b, c]
    assert ready_of(core, "q:dead") == [(b"a", 3)]
    assert core.queue_stats("q", t)["dead_lettered_total"] == 1
    for attempt in range(4, 9):  # past any limit: it stays in q:dead
        msg = core.reserve_nowait("q:dead", t, lease=10, owner=f"c{attempt}")
        assert msg is not None
        assert (msg.id, msg.attempts) == (a, attempt)
        end_lease(f"c{attempt}")
        t += 20
        assert ready_ids(core, "q:dead") == [a]
    assert "q:dead:dead" not in core.queue_names()
    assert core.purge("q:dead") == 1


def test_g31_a_crash_while_reserved_keeps_the_message_in_its_queue(
    disk: Callable[..., Disk],
) -> None:
    """G31: the broker crashes while a message is reserved: the next broker has
    it ready with its attempt count, not moved to :dead, so it is delivered up
    to max_deliveries times plus once for each such crash."""
    d = disk()
    d.core.configure("q", max_deliveries=2)
    msg_id, _ = d.core.put("q", b"m", NOW)
    msg = d.core.reserve_nowait("q", NOW)
    assert msg is not None
    d.core.release(msg_id, 1, NOW)
    msg = d.core.reserve_nowait("q", NOW)  # attempt 2: the last, held at the crash
    assert msg is not None
    assert msg.attempts == 2
    for crash in (1, 2):
        d = d.restart()
        assert ready_of(d.core) == [(b"m", 1 + crash)]
        assert ready_of(d.core, "q:dead") == []
        msg = d.core.reserve_nowait("q", NOW)
        assert msg is not None
        assert msg.attempts == 2 + crash  # one more delivery for each crash
    d.core.release(msg_id, 4, NOW)  # a lease that ends (no crash): moved on now
    assert ready_of(d.core, "q:dead") == [(b"m", 4)]


def test_g32_an_ack_that_dies_before_its_record_leaves_the_message_to_come_back(
    disk: Callable[..., Disk],
) -> None:
    """G32: the broker dies before writing an ack's record: the message comes
    back with the next broker and is delivered again."""
    d = disk()
    msg_id, _ = d.core.put("q", b"m", NOW)
    assert d.core.reserve_nowait("q", NOW) is not None
    d.die_before(1)
    with pytest.raises(Crash):
        d.core.ack(msg_id, 1)
    after = d.restart().core
    assert ready_of(after) == [(b"m", 1)]
    again = after.reserve_nowait("q", NOW)
    assert again is not None
    assert (again.id, again.attempts) == (msg_id, 2)


@pytest.mark.parametrize("verb", ["ack", "release", "bury", "touch"])
def test_g32_a_lease_verb_whose_connection_broke_raises_and_is_not_retried(
    fake_broker: Callable[[Answer], FakeBroker], socket_path: str, verb: str
) -> None:
    """G32, G33, G37: a lease verb whose connection broke before the reply
    raises BrokerUnavailable and is not sent again."""
    fake = fake_broker(lambda request, n: good_reply(request) if n == 1 else None)
    with brokerq.Client(socket_path, timeout=5) as client:
        msg = client.queue("q").reserve(timeout=0)
        with pytest.raises(brokerq.BrokerUnavailable):
            getattr(msg, verb)()
    assert [type(request) for _, request in fake.requests] == [
        Reserve,
        {"ack": Ack, "release": Release, "bury": Bury, "touch": Touch}[verb],
    ]


def test_g33_an_ack_whose_record_was_written_removes_the_message_despite_a_crash(
    disk: Callable[..., Disk],
) -> None:
    """G33: the broker dies after writing an ack's record (before the reply):
    the message is gone for good."""
    d = disk()
    msg_id, _ = d.core.put("q", b"acked", NOW)
    d.core.put("q", b"other", NOW)
    assert d.core.reserve_nowait("q", NOW) is not None
    d.core.ack(msg_id, 1)
    after = d.restart().core
    assert ready_of(after) == [(b"other", 0)]


@pytest.mark.parametrize(
    "ahead",
    [
        "nothing",
        "a request still waiting for a message",
        "a get that found a message",
    ],
)
async def test_g33_an_ack_sent_in_full_before_the_consumer_died_is_carried_out(
    jdir: str, ahead: str
) -> None:
    """G33: an ack the consumer sent in full before dying is carried out,
    unless a request ahead of it on that connection was still waiting for a
    message, or was answered with a message that could not be written (then
    the lease ends with the connection: the message comes back)."""
    path = os.path.join(jdir, "j")
    journal = open_journal(path, "never")
    try:
        async with serving(journal) as broker:
            producer = await connect(broker)
            await producer.call(Put, queue="q", body=b"m")
            await producer.call(Put, queue="other", body=b"o")
            consumer = await connect(broker)
            held = await consumer.call(Reserve, queue="q", timeout=0)
            assert isinstance(held, ReserveReply)
            frames: list[protocol.AnyRequest] = []
            if ahead == "a request still waiting for a message":
                frames.append(Reserve(id=90, queue="empty", timeout=None))
            elif ahead == "a get that found a message":
                frames.append(Get(id=90, queue="other", timeout=0))
            frames.append(Ack(id=91, msg_id=held.msg_id, attempt=held.attempt))
            await consumer.send(*frames)
            await consumer.stream.aclose()  # the consumer dies
            await blocked()
            now = broker.clock()
            if ahead != "nothing":
                assert ready_of(broker.core) == [(b"m", 1)]
            else:
                assert ready_of(broker.core) == []
                assert broker.core.lease_of(held.msg_id) is None
                assert ready_of(replay_file(path, now)) == []
    finally:
        journal.close()


ENDINGS = ["lease ran out", "connection closed", "acked", "released", "buried", "broker restarted"]
LEASE_VERBS: dict[str, Callable[[BrokerCore, int], object]] = {
    "ack": lambda core, msg_id: core.ack(msg_id, 1),
    "release": lambda core, msg_id: core.release(msg_id, 1, NOW + 12),
    "bury": lambda core, msg_id: core.bury(msg_id, 1),
    "touch": lambda core, msg_id: core.touch(msg_id, 1, NOW + 12),
}


@pytest.mark.parametrize("verb", list(LEASE_VERBS))
@pytest.mark.parametrize("ending", ENDINGS)
def test_g35_a_late_lease_verb_is_refused_and_changes_nothing(ending: str, verb: str) -> None:
    """G35: an ack, release, bury or touch naming an attempt whose lease ended
    (ran out, connection closed, acked, released, buried, broker restarted)
    is refused with LeaseLost and changes nothing; a late ack never removes
    the message delivered again."""
    records: list[AnyRecord] = []
    core = new_core(records.append)
    msg_id, _ = core.put("q", b"m", NOW)
    core.put("q", b"n", NOW)
    assert core.reserve_nowait("q", NOW, lease=10, owner="first") is not None
    if ending == "lease ran out":
        core.tick(NOW + 10)
    elif ending == "connection closed":
        core.release_owned("first", NOW)
    elif ending == "acked":
        core.ack(msg_id, 1)
    elif ending == "released":
        core.release(msg_id, 1, NOW)
    elif ending == "buried":
        core.bury(msg_id, 1)
    else:
        core = replayed(records)
    if msg_id in ready_ids(core):  # delivered again, to another consumer
        again = core.reserve_nowait("q", NOW + 11, lease=100, owner="second")
        assert again is not None
        assert (again.id, again.attempts) == (msg_id, 2)
    before = fingerprint(core)
    with pytest.raises(LeaseLost):
        LEASE_VERBS[verb](core, msg_id)
    assert fingerprint(core) == before


# == release and bury (b): a verb whose record was never written ==================================


def _unwritten_lease_verb(make_disk: Callable[..., Disk], verb: str, then: str) -> None:
    d = make_disk()
    msg_id, _ = d.core.put("q", b"m", NOW)
    other, _ = d.core.put("q", b"n", NOW)
    assert d.core.reserve_nowait("q", NOW, lease=10, owner="holder") is not None
    lease = d.core.lease_of(msg_id)
    before = fingerprint(d.core)

    def call() -> None:
        if verb == "release":
            d.core.release(msg_id, 1, NOW, delay=5)
        else:
            d.core.bury(msg_id, 1)

    if then == "next broker":
        d.die_before(1)
        with pytest.raises(Crash):
            call()
        core = d.restart().core
    else:
        d.core.write = full_disk  # the record cannot be written
        with pytest.raises(Full):
            call()
        d.core.write = d.write
        core = d.core
        assert fingerprint(core) == before
        assert core.lease_of(msg_id) is lease  # the lease as it was
        if then == "lease runs out":
            core.tick(NOW + 9.9)
            assert core.lease_of(msg_id) is lease
            core.tick(NOW + 10)
        else:
            core.release_owned("holder", NOW + 1)
    assert [(m.id, m.attempts) for m in core._queues["q"].ready] == [(msg_id, 1), (other, 0)]
    again = core.reserve_nowait("q", NOW + 20)
    assert again is not None
    assert (again.id, again.attempts) == (msg_id, 2)


@pytest.mark.parametrize("then", ["lease runs out", "connection closes", "next broker"])
def test_g36_a_release_never_written_leaves_the_lease_as_it_was(
    disk: Callable[..., Disk], then: str
) -> None:
    """G36: a release whose record was never written leaves the lease as it
    was: the message comes back when the lease runs out or its connection
    closes, or with the next broker."""
    _unwritten_lease_verb(disk, "release", then)


@pytest.mark.parametrize("kind", ["delay 0", "delay > 0", "last attempt"])
def test_g37_a_release_whose_record_was_written_holds_across_a_crash(
    disk: Callable[..., Disk], kind: str
) -> None:
    """G37: once a release's record is written (reply received or not), the
    message is back at its place by id (delay 0), delayed until its due time,
    which survives a restart (delay > 0), or in <queue>:dead (last attempt)."""
    d = disk(max_deliveries=1 if kind == "last attempt" else 3)
    ids, _ = d.core.put_many("q", [b"a", b"b", b"c"], NOW)
    a, b, c = ids
    assert d.core.reserve_nowait("q", NOW) is not None
    assert d.core.reserve_nowait("q", NOW) is not None
    d.core.release(b, 1, NOW, delay=50 if kind == "delay > 0" else 0)
    after = d.restart(now=NOW + 1).core  # "a" was still reserved: it comes back too
    if kind == "delay 0":
        assert ready_ids(after) == [a, b, c]
    elif kind == "delay > 0":
        assert ready_ids(after) == [a, c]
        assert after._delayed[b][1] == NOW + 50
        after.tick(NOW + 49.9)
        assert ready_ids(after) == [a, c]
        after.tick(NOW + 50)
        assert ready_ids(after) == [a, b, c]
    else:
        assert ready_ids(after) == [a, c]
        assert ready_of(after, "q:dead") == [(b"b", 1)]


@pytest.mark.parametrize("then", ["lease runs out", "connection closes", "next broker"])
def test_g38_a_bury_never_written_leaves_the_lease_as_it_was(
    disk: Callable[..., Disk], then: str
) -> None:
    """G38: a bury whose record was never written leaves the lease as it was
    (as G36)."""
    _unwritten_lease_verb(disk, "bury", then)


def test_g39_a_buried_message_is_kept_out_of_every_delivery_until_kicked(
    disk: Callable[..., Disk],
) -> None:
    """G39: a buried message (even at its last attempt: burying never moves it
    to :dead) is kept, never delivered, peeked or purged, across crashes and
    restarts, until a kick."""
    d = disk(max_deliveries=1)
    msg_id, _ = d.core.put("q", b"m", NOW)
    msg = d.core.reserve_nowait("q", NOW)
    assert msg is not None
    d.core.bury(msg_id, 1)  # attempt 1 of 1: its last

    def still_buried(core: BrokerCore) -> None:
        assert core.peek("q") is None
        assert core.get_nowait("q", 10) == []
        assert core.reserve_nowait("q", NOW) is None
        assert core.purge("q") == 0
        core.tick(NOW + 1e6)
        assert list(core._queues["q"].buried) == [msg_id]
        assert ready_ids(core, "q:dead") == []
        assert core.queue_stats("q:dead", NOW)["buried"] == 0

    still_buried(d.core)
    for _ in range(2):
        d = d.restart()
        still_buried(d.core)
    assert d.core.kick("q", 5, NOW)[0] == 1
    assert [m.body for m in d.core.get_nowait("q")] == [b"m"]


@pytest.mark.parametrize(
    ("source", "failure"),
    [
        ("buried", "crash"),
        ("buried", "full disk"),
        (":dead", "crash"),
        (":dead", "full disk"),
    ],
)
def test_g40_a_kick_moves_each_message_with_its_own_record(
    disk: Callable[..., Disk], source: str, failure: str
) -> None:
    """G40: a kick writes one record per message moved: a buried message becomes
    ready at its place by id; one of <queue>:dead moves to <queue>, ready at
    its place by id, attempts reset. A crash (or a full disk, G9) in the
    middle of a kick leaves the messages moved so far moved, the others where
    they were."""
    d = disk(max_deliveries=1 if source == ":dead" else 3)
    ids, _ = d.core.put_many("q", [b"a", b"b", b"c", b"d", b"e"], NOW)
    a, b, c, dd, e = ids
    for _ in range(4):
        assert d.core.reserve_nowait("q", NOW) is not None
    kicked = "q"
    if source == "buried":
        for msg_id in (a, c, dd):
            d.core.bury(msg_id, 1)
        d.core.release(b, 1, NOW)
        assert ready_ids(d.core) == [b, e]
    else:
        for msg_id in (a, c, dd):
            d.core.release(msg_id, 1, NOW)  # their last attempt: to q:dead
        d.core.ack(b, 1)
        kicked = "q:dead"
        assert ready_ids(d.core) == [e]
        assert ready_ids(d.core, "q:dead") == [a, c, dd]
    writes = d.writes
    if failure == "crash":
        d.die_before(2)
        with pytest.raises(Crash):
            d.core.kick(kicked, 3, NOW)
        core = d.restart().core
    else:
        real_write = d.write

        def fills_up(record: AnyRecord) -> None:
            if d.writes > writes:
                full_disk(record)
            real_write(record)

        d.core.write = fills_up
        with pytest.raises(brokerq.Full):
            d.core.kick(kicked, 3, NOW)
        d.core.write = real_write
        core = d.core
        assert durable(replayed(read_journal(d.path).records)) == durable(core)
    assert d.writes == writes + 1
    left = [c, dd]
    if source == "buried":
        assert ready_ids(core) == [a, b, e]
        assert list(core._queues["q"].buried) == left
    else:
        assert ready_of(core) == [(b"a", 0), (b"e", 0)]
        assert ready_ids(core, "q:dead") == left
    count, _ = core.kick(kicked, 10, NOW)
    assert count == 2
    assert ready_ids(core) == ([a, b, c, dd, e] if source == "buried" else [a, c, dd, e])
    if source == ":dead":
        assert [attempts for _, attempts in ready_of(core)] == [0, 0, 0, 0]


def test_g41_a_kick_whose_reply_was_lost_is_sent_again(
    fake_broker: Callable[[Answer], FakeBroker], socket_path: str
) -> None:
    """G41: a kick whose reply was not received is sent again, with the same n,
    on a new connection (so up to n more messages may move)."""
    fake = fake_broker(lose_first(1))
    with brokerq.Client(socket_path, timeout=5) as client:
        assert client.queue("q").kick(3) == 1
    (conn1, first), (conn2, retry) = fake.requests
    assert conn1 != conn2
    assert first == retry
    assert isinstance(first, Kick)
    assert first.n == 3
