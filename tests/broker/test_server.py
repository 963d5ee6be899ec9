"""The trio broker over in-memory streams, with virtual time (autojump_clock).

No sockets here: ``Broker.handle_stream`` serves any trio Stream, so each
test connects clients through ``trio.testing.memory_stream_pair``.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from typing import Any

import pytest
import trio
import trio.testing

from brokerq import protocol
from brokerq.broker.server import Broker, BrokerConfig
from brokerq.protocol import (
    Ack,
    AckReply,
    Error,
    FrameReader,
    Get,
    GetMany,
    GetManyReply,
    GetReply,
    Hello,
    HelloReply,
    Peek,
    PeekReply,
    Ping,
    PingReply,
    Put,
    PutMany,
    PutManyReply,
    PutReply,
    Release,
    ReleaseReply,
    Reserve,
    ReserveReply,
    Stats,
    StatsReply,
    Stop,
    StopReply,
)


class Peer:
    """A scripted client on one in-memory connection."""

    def __init__(self, stream: trio.testing.StapledStream[Any, Any]) -> None:
        self.stream = stream
        self.reader = FrameReader(1 << 30)
        self.next_id = 1

    async def send(self, *frames: protocol.AnyRequest) -> None:
        out = bytearray()
        for frame in frames:
            protocol.append_frame(out, frame)
        await self.stream.send_all(out)

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def receive(self) -> protocol.AnyReply:
        while (payload := self.reader.next_frame()) is None:
            data = await self.stream.receive_some()
            if not data:
                raise EOFError
            self.reader.feed(data)
        return protocol.decode_reply(payload)

    async def at_eof(self) -> bool:
        return await self.stream.receive_some() == b""

    def rid(self) -> int:
        self.next_id += 1
        return self.next_id

    async def call(self, kind: type[protocol.Request], **fields: Any) -> protocol.AnyReply:
        await self.send(kind(id=self.rid(), **fields))  # type: ignore[arg-type]
        return await self.receive()


async def connect(broker: Broker, greet: bool = True) -> Peer:
    client_end, server_end = trio.testing.memory_stream_pair()
    broker.start_connection(server_end)
    peer = Peer(client_end)
    if greet:
        reply = await peer.call(Hello, version=protocol.PROTOCOL_VERSION)
        assert isinstance(reply, HelloReply)
    return peer


async def test_hello_reports_limits(broker: Broker) -> None:
    peer = await connect(broker, greet=False)
    reply = await peer.call(Hello, version=1, client="t")
    assert isinstance(reply, HelloReply)
    assert reply.version == 1
    assert reply.max_message_size == 1000
    assert reply.max_frame_size == 1000 + protocol.FRAME_OVERHEAD
    assert reply.server.startswith("brokerq ")


async def test_put_then_get(broker: Broker) -> None:
    peer = await connect(broker)
    put = await peer.call(Put, queue="q", body=b"hello")
    assert isinstance(put, PutReply)
    got = await peer.call(Get, queue="q", timeout=0)
    assert got == GetReply(id=peer.next_id, msg_id=put.msg_id, body=b"hello")


async def test_pipelined_requests_are_answered_in_order(broker: Broker) -> None:
    peer = await connect(broker)
    await peer.send(*(Put(id=100 + i, queue="q", body=b"%d" % i) for i in range(200)))
    await peer.send(*(Get(id=1000 + i, queue="q", timeout=0) for i in range(200)))
    puts = [await peer.receive() for _ in range(200)]
    gets = [await peer.receive() for _ in range(200)]
    assert [r.id for r in puts] == [100 + i for i in range(200)]
    assert [r.id for r in gets] == [1000 + i for i in range(200)]
    assert [r.body for r in gets if isinstance(r, GetReply)] == [b"%d" % i for i in range(200)]


async def test_get_times_out_with_empty(broker: Broker, autojump_clock: trio.abc.Clock) -> None:
    peer = await connect(broker)
    start = trio.current_time()
    reply = await peer.call(Get, queue="q", timeout=5)
    assert isinstance(reply, Error)
    assert reply.code == "empty"
    assert trio.current_time() - start == pytest.approx(5)
    assert broker.core.queue_stats("q", 0)["waiters"] == 0


async def test_get_timeout_zero_does_not_wait(broker: Broker) -> None:
    peer = await connect(broker)
    reply = await peer.call(Get, queue="q", timeout=0)
    assert isinstance(reply, Error)
    assert reply.code == "empty"


async def test_blocking_get_is_woken_by_a_put(
    broker: Broker, autojump_clock: trio.abc.Clock
) -> None:
    consumer = await connect(broker)
    producer = await connect(broker)
    await consumer.send(Get(id=7, queue="q", timeout=None))
    await trio.testing.wait_all_tasks_blocked()
    await trio.sleep(3600)
    await producer.call(Put, queue="q", body=b"late")
    reply = await consumer.receive()
    assert isinstance(reply, GetReply)
    assert (reply.id, reply.body) == (7, b"late")


async def test_fair_handoff_longest_waiter_first(broker: Broker) -> None:
    waiters = [await connect(broker) for _ in range(5)]
    for i, peer in enumerate(waiters):
        await peer.send(Get(id=i + 1, queue="q"))
        await trio.testing.wait_all_tasks_blocked()
    producer = await connect(broker)
    for i in range(5):
        await producer.call(Put, queue="q", body=b"m%d" % i)
    for i, peer in enumerate(waiters):
        reply = await peer.receive()
        assert isinstance(reply, GetReply)
        assert reply.body == b"m%d" % i


async def test_waiter_that_disconnects_is_removed_and_loses_nothing(broker: Broker) -> None:
    gone = await connect(broker)
    await gone.send(Get(id=1, queue="q"))
    await trio.testing.wait_all_tasks_blocked()
    assert broker.core.queue_stats("q", 0)["waiters"] == 1
    await gone.stream.aclose()
    await trio.testing.wait_all_tasks_blocked()
    assert broker.core.queue_stats("q", 0)["waiters"] == 0
    other = await connect(broker)
    await other.call(Put, queue="q", body=b"kept")
    reply = await other.call(Get, queue="q", timeout=0)
    assert isinstance(reply, GetReply)
    assert reply.body == b"kept"


async def test_reply_that_cannot_be_written_puts_the_message_back(broker: Broker) -> None:
    deaf = await connect(broker)
    await deaf.send(Get(id=1, queue="q"))
    await trio.testing.wait_all_tasks_blocked()
    # The client stops reading but its half of the connection still sends,
    # so the broker only notices when it writes the reply.
    await deaf.stream.receive_stream.aclose()
    other = await connect(broker)
    await other.call(Put, queue="q", body=b"first")
    await other.call(Put, queue="q", body=b"second")
    await trio.testing.wait_all_tasks_blocked()
    got = [await other.call(Get, queue="q", timeout=0) for _ in range(2)]
    assert [r.body for r in got if isinstance(r, GetReply)] == [b"first", b"second"]
    assert broker.core.queue_stats("q", 0)["delivered_total"] == 2


async def test_immediate_reply_that_cannot_be_written_puts_the_message_back(
    broker: Broker,
) -> None:
    other = await connect(broker)
    await other.call(Put, queue="q", body=b"m")
    deaf = await connect(broker)
    await deaf.stream.receive_stream.aclose()
    await deaf.send(Get(id=1, queue="q", timeout=0))
    await trio.testing.wait_all_tasks_blocked()
    reply = await other.call(Peek, queue="q")
    assert isinstance(reply, PeekReply)
    assert reply.body == b"m"


async def test_a_message_for_a_gone_waiter_goes_to_the_next(broker: Broker) -> None:
    deaf = await connect(broker)
    await deaf.send(Get(id=1, queue="q"))
    await trio.testing.wait_all_tasks_blocked()
    patient = await connect(broker)
    await patient.send(Get(id=1, queue="q"))
    await trio.testing.wait_all_tasks_blocked()
    await deaf.stream.receive_stream.aclose()
    producer = await connect(broker)
    await producer.call(Put, queue="q", body=b"only")
    reply = await patient.receive()
    assert isinstance(reply, GetReply)
    assert reply.body == b"only"


async def test_get_many(broker: Broker, autojump_clock: trio.abc.Clock) -> None:
    peer = await connect(broker)
    reply = await peer.call(PutMany, queue="q", bodies=[b"a", b"b", b"c"])
    assert isinstance(reply, PutManyReply)
    assert len(reply.msg_ids) == 3
    got = await peer.call(GetMany, queue="q", n=2, timeout=0)
    assert isinstance(got, GetManyReply)
    assert got.bodies == [b"a", b"b"]
    got = await peer.call(GetMany, queue="q", n=5, timeout=0)
    assert isinstance(got, GetManyReply)
    assert got.bodies == [b"c"]
    # Blocking: waits for the first, then takes what is ready.
    consumer = await connect(broker)
    await consumer.send(GetMany(id=9, queue="q", n=10, timeout=60))
    await trio.testing.wait_all_tasks_blocked()
    await peer.send(PutMany(id=50, queue="q", bodies=[b"x", b"y"]))
    got = await consumer.receive()
    assert isinstance(got, GetManyReply)
    assert got.bodies == [b"x", b"y"]


@pytest.mark.parametrize("size", [0, 1, 1000])
async def test_get_many_reply_fits_in_a_frame(broker: Broker, size: int) -> None:
    peer = await connect(broker)
    count = 20_000 if size < 1000 else 200
    batch = 1000 if size < 1000 else 50  # each put_many must fit in a frame too
    for start in range(0, count, batch):
        reply = await peer.call(
            PutMany, queue="q", bodies=[b"x" * size] * min(batch, count - start)
        )
        assert isinstance(reply, PutManyReply)
    got_total = 0
    while got_total < count:
        got = await peer.call(GetMany, queue="q", n=count, timeout=0)
        assert isinstance(got, GetManyReply)
        assert len(protocol.encode_frame(got)) - 4 <= broker.max_frame_size
        got_total += len(got.bodies)
    assert got_total == count


async def test_get_many_refill_after_waiting_fits_in_a_frame(broker: Broker) -> None:
    consumer = await connect(broker)
    await consumer.send(GetMany(id=9, queue="q", n=1000, timeout=None))
    await trio.testing.wait_all_tasks_blocked()
    producer = await connect(broker)
    for _ in range(4):
        await producer.send(PutMany(id=1, queue="q", bodies=[b"y" * 1000] * 50))
    got = await consumer.receive()
    assert isinstance(got, GetManyReply)
    assert len(protocol.encode_frame(got)) - 4 <= broker.max_frame_size
    assert 1 < len(got.bodies) < 200


@pytest.mark.parametrize(
    ("request_frame", "code"),
    [
        (Put(id=5, queue="q", body=b"x" * 1001), "too_large"),
        (Put(id=5, queue="q:dead", body=b"x"), "invalid"),
        (Put(id=5, queue="", body=b"x"), "invalid"),
        (Get(id=5, queue="q", timeout=-1), "invalid"),
        (Get(id=5, queue="q", timeout=math.nan), "invalid"),
        (GetMany(id=5, queue="q", n=0), "invalid"),
        (Peek(id=5, queue="q"), "empty"),
        (Hello(id=5, version=1), "bad_request"),
    ],
)
async def test_request_errors_keep_the_connection(
    broker: Broker, request_frame: protocol.AnyRequest, code: str
) -> None:
    peer = await connect(broker)
    await peer.send(request_frame)
    reply = await peer.receive()
    assert isinstance(reply, Error)
    assert (reply.id, reply.code) == (5, code)
    assert isinstance(await peer.call(Ping), PingReply)


async def test_unknown_op_and_wrong_types_get_bad_request(broker: Broker) -> None:
    import msgspec

    peer = await connect(broker)
    for obj in ({"op": "frobnicate", "id": 41}, {"op": "put", "id": 42, "queue": 1, "body": b""}):
        payload = msgspec.msgpack.encode(obj)
        await peer.send_raw(struct.pack(">I", len(payload)) + payload)
        reply = await peer.receive()
        assert isinstance(reply, Error)
        assert (reply.id, reply.code) == (obj["id"], "bad_request")
    assert isinstance(await peer.call(Ping), PingReply)


async def test_garbage_closes_only_that_connection(broker: Broker) -> None:
    bystander = await connect(broker)
    await bystander.call(Put, queue="q", body=b"safe")
    attacker = await connect(broker)
    await attacker.send_raw(b"\x00\x00\x00\x03\xc1\xc1\xc1")
    reply = await attacker.receive()
    assert isinstance(reply, Error)
    assert (reply.id, reply.code) == (0, "bad_frame")
    assert await attacker.at_eof()
    got = await bystander.call(Get, queue="q", timeout=0)
    assert isinstance(got, GetReply)
    assert got.body == b"safe"


async def test_oversized_length_closes_the_connection(broker: Broker) -> None:
    attacker = await connect(broker)
    await attacker.send_raw(b"\xff\xff\xff\xff")
    reply = await attacker.receive()
    assert isinstance(reply, Error)
    assert reply.code == "bad_frame"
    assert await attacker.at_eof()


async def test_handshake_frame_limit_before_hello(broker: Broker) -> None:
    attacker = await connect(broker, greet=False)
    await attacker.send_raw(struct.pack(">I", protocol.HANDSHAKE_FRAME_LIMIT + 1))
    reply = await attacker.receive()
    assert isinstance(reply, Error)
    assert reply.code == "bad_frame"


async def test_first_request_must_be_hello(broker: Broker) -> None:
    peer = await connect(broker, greet=False)
    reply = await peer.call(Put, queue="q", body=b"x")
    assert isinstance(reply, Error)
    assert reply.code == "bad_request"
    assert await peer.at_eof()
    assert broker.core.queue_names() == []


async def test_version_mismatch_is_refused(broker: Broker) -> None:
    peer = await connect(broker, greet=False)
    reply = await peer.call(Hello, version=99)
    assert isinstance(reply, Error)
    assert reply.code == "version"
    assert "99" in reply.message
    assert await peer.at_eof()


async def test_stats(broker: Broker) -> None:
    peer = await connect(broker)
    await peer.call(Put, queue="q", body=b"abc")
    reply = await peer.call(Stats, queue="q")
    assert isinstance(reply, StatsReply)
    assert reply.stats["ready"] == 1
    assert reply.stats["bytes"] == 3
    reply = await peer.call(Stats)
    assert isinstance(reply, StatsReply)
    assert reply.stats["connections"] == 1
    assert reply.stats["queues"] == 1
    assert reply.stats["idle_exit_s"] == 300


async def test_stats_of_a_broker_that_never_idles_out_is_plain_json() -> None:
    import json

    b = Broker(BrokerConfig(socket_path="/nonexistent/b.sock", idle_exit=math.inf))
    assert b.stats()["idle_exit_s"] is None
    json.dumps(b.stats(), allow_nan=False)


async def test_stop_answers_then_wakes_waiters_with_shutting_down() -> None:
    b = Broker(BrokerConfig(socket_path="/nonexistent/b.sock"))
    async with trio.open_nursery() as nursery:
        await nursery.start(b.serve, None)
        waiter = await connect(b)
        await waiter.send(Get(id=3, queue="q"))
        await trio.testing.wait_all_tasks_blocked()
        stopper = await connect(b)
        assert isinstance(await stopper.call(Stop), StopReply)
        reply = await waiter.receive()
        assert isinstance(reply, Error)
        assert (reply.id, reply.code) == (3, "shutting_down")
    # serve() returned: the broker is done.


# -- leases ---------------------------------------------------------------------


async def test_reserve_and_ack(broker: Broker) -> None:
    peer = await connect(broker)
    await peer.call(Put, queue="q", body=b"job")
    got = await peer.call(Reserve, queue="q", timeout=0, lease=10)
    assert isinstance(got, ReserveReply)
    assert (got.body, got.attempt, got.lease) == (b"job", 1, 10)
    assert isinstance(await peer.call(Ack, msg_id=got.msg_id, attempt=1), AckReply)
    late = await peer.call(Ack, msg_id=got.msg_id, attempt=1)
    assert isinstance(late, Error)
    assert late.code == "lease_lost"


async def test_blocked_reserve_is_woken_by_a_put(broker: Broker) -> None:
    consumer = await connect(broker)
    await consumer.send(Reserve(id=4, queue="q"))
    await trio.testing.wait_all_tasks_blocked()
    producer = await connect(broker)
    await producer.call(Put, queue="q", body=b"m")
    got = await consumer.receive()
    assert isinstance(got, ReserveReply)
    assert (got.id, got.body, got.attempt) == (4, b"m", 1)
    assert got.lease == pytest.approx(30, abs=1)
    assert broker.core.queue_stats("q", 0)["reserved"] == 1


async def test_closing_the_connection_releases_its_leases(broker: Broker) -> None:
    holder = await connect(broker)
    await holder.call(Put, queue="q", body=b"m")
    first = await holder.call(Reserve, queue="q", timeout=0)
    assert isinstance(first, ReserveReply)
    other = await connect(broker)
    await other.send(Reserve(id=9, queue="q"))
    await trio.testing.wait_all_tasks_blocked()
    await holder.stream.aclose()
    again = await other.receive()
    assert isinstance(again, ReserveReply)
    assert (again.msg_id, again.attempt) == (first.msg_id, 2)


async def test_an_expired_lease_is_delivered_again(
    broker: Broker, autojump_clock: trio.abc.Clock
) -> None:
    slow = await connect(broker)
    await slow.call(Put, queue="q", body=b"m")
    first = await slow.call(Reserve, queue="q", timeout=0, lease=5)
    assert isinstance(first, ReserveReply)
    other = await connect(broker)
    start = trio.current_time()
    again = await other.call(Reserve, queue="q", timeout=60)
    assert isinstance(again, ReserveReply)
    assert trio.current_time() - start == pytest.approx(5)
    assert again.attempt == 2
    late = await slow.call(Release, msg_id=first.msg_id, attempt=1)
    assert isinstance(late, Error)
    assert late.code == "lease_lost"
    assert isinstance(await other.call(Release, msg_id=again.msg_id, attempt=2), ReleaseReply)


async def test_puts_wait_for_one_shared_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil
    import tempfile

    from brokerq.broker.journal import Journal

    directory = tempfile.mkdtemp(dir="/tmp")
    syncs: list[int] = []
    real_sync = Journal.sync

    def counting_sync(self: Journal) -> int:
        syncs.append(self.written)
        return real_sync(self)

    monkeypatch.setattr(Journal, "sync", counting_sync)
    journal, _ = Journal.open(f"{directory}/j", "batch")
    b = Broker(BrokerConfig(socket_path="/nonexistent/b.sock"), journal=journal)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(b.serve, None)
            peers = [await connect(b) for _ in range(10)]
            for i, peer in enumerate(peers):
                await peer.send(*(Put(id=j, queue="q", body=b"%d" % i) for j in range(1, 21)))
            for peer in peers:
                replies = [await peer.receive() for _ in range(20)]
                assert all(isinstance(r, PutReply) for r in replies)
            assert journal.synced == journal.written
            assert 1 <= len(syncs) < 200  # far fewer fsyncs than puts
            b.request_stop("test over")
    finally:
        journal.close()
        shutil.rmtree(directory)


# -- journal failures ------------------------------------------------------------


@pytest.fixture
def journal_dir() -> Iterator[str]:
    import shutil
    import tempfile

    directory = tempfile.mkdtemp(dir="/tmp")
    yield directory
    shutil.rmtree(directory)


async def test_a_full_disk_fails_the_put_and_acknowledges_nothing(
    journal_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import os

    import brokerq.broker.journal
    from brokerq.broker.journal import Journal

    journal, _ = Journal.open(f"{journal_dir}/j", "batch")
    b = Broker(BrokerConfig(socket_path="/nonexistent/b.sock"), journal=journal)
    async with trio.open_nursery() as nursery:
        await nursery.start(b.serve, None)
        peer = await connect(b)
        assert isinstance(await peer.call(Put, queue="q", body=b"kept"), PutReply)

        def no_space(fd: int, data: object) -> int:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(brokerq.broker.journal.os, "write", no_space)
        refused = await peer.call(Put, queue="q", body=b"lost")
        assert isinstance(refused, Error)
        assert refused.code == "full"
        assert "full" in refused.message
        monkeypatch.undo()
        assert b.failure is None  # a full disk is not fatal
        got = await peer.call(GetMany, queue="q", n=10, timeout=0)
        assert isinstance(got, GetManyReply)
        assert got.bodies == [b"kept"]
        b.request_stop("test over")
    journal.close()


async def test_a_failed_fsync_is_fatal(journal_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import os

    import brokerq.broker.journal
    from brokerq.broker.journal import Journal

    journal, _ = Journal.open(f"{journal_dir}/j", "batch")
    b = Broker(BrokerConfig(socket_path="/nonexistent/b.sock"), journal=journal)

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    async with trio.open_nursery() as nursery:
        await nursery.start(b.serve, None)
        peer = await connect(b)
        monkeypatch.setattr(brokerq.broker.journal.os, "fsync", eio)
        reply = await peer.call(Put, queue="q", body=b"x")
        assert isinstance(reply, Error)  # never acknowledged
        assert reply.code == "internal"
        # serve() returns: the broker stops, and the daemon exits non-zero.
    assert b.failure is not None
    assert "fsync failed" in b.failure
    monkeypatch.undo()
    journal.close()


async def test_puts_behind_one_waiting_for_its_fsync_are_handled_meanwhile(
    journal_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Group commit does not stop the connection: while the first put's fsync
    hangs, the put pipelined behind it is read, made, and handed to a waiting
    consumer; both replies then come, in order, once the fsync is done."""
    import threading

    from brokerq.broker.journal import Journal

    journal, _ = Journal.open(f"{journal_dir}/j", "batch")
    journal.in_memory = False  # group commit even where /tmp is a tmpfs
    b = Broker(BrokerConfig(socket_path="/nonexistent/b.sock"), journal=journal)
    syncing, release = threading.Event(), threading.Event()
    real_sync = journal.sync

    def slow_sync() -> int:
        syncing.set()
        release.wait(10)
        return real_sync()

    monkeypatch.setattr(journal, "sync", slow_sync)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(b.serve, None)
            producer, consumer = await connect(b), await connect(b)
            await producer.send(Put(id=10, queue="q", body=b"first"))
            await trio.to_thread.run_sync(syncing.wait, 10)  # its fsync has begun, and hangs
            await consumer.send(Get(id=20, queue="q", timeout=None))
            got = await consumer.receive()  # delivered before its fsync (G18)
            assert isinstance(got, GetReply)
            assert got.body == b"first"
            await consumer.send(Get(id=21, queue="q", timeout=None))
            await producer.send(Put(id=11, queue="q", body=b"second"))
            got = await consumer.receive()
            assert isinstance(got, GetReply)
            assert got.body == b"second"
            with trio.move_on_after(0.1):
                await producer.receive()
                pytest.fail("a put was acknowledged before its fsync")
            release.set()
            replies = [await producer.receive(), await producer.receive()]
            assert [(type(r), r.id) for r in replies] == [(PutReply, 10), (PutReply, 11)]
            b.request_stop("the test is done")
    monkeypatch.undo()
    journal.close()


async def test_max_pipelined_holds_while_replies_wait_for_their_fsync(
    journal_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--max-pipelined counts replies waiting for a group commit too: with 2,
    the third pipelined put is not read until the first two are answered."""
    import threading

    from brokerq.broker.journal import Journal

    journal, _ = Journal.open(f"{journal_dir}/j", "batch")
    journal.in_memory = False  # group commit even where /tmp is a tmpfs
    b = Broker(BrokerConfig(socket_path="/nonexistent/b.sock", max_pipelined=2), journal=journal)
    syncing, release = threading.Event(), threading.Event()
    real_sync = journal.sync

    def slow_sync() -> int:
        syncing.set()
        release.wait(10)
        return real_sync()

    monkeypatch.setattr(journal, "sync", slow_sync)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(b.serve, None)
            producer, observer = await connect(b), await connect(b)
            await producer.send(*(Put(id=i, queue="q", body=b"m") for i in (10, 11, 12)))
            await trio.to_thread.run_sync(syncing.wait, 10)
            await trio.testing.wait_all_tasks_blocked()
            stats = await observer.call(Stats, queue="q")
            assert isinstance(stats, StatsReply)
            assert stats.stats["ready"] == 2  # the third waits, unread
            release.set()
            replies = [await producer.receive() for _ in range(3)]
            assert [r.id for r in replies] == [10, 11, 12]
            b.request_stop("the test is done")
    monkeypatch.undo()
    journal.close()


# -- priority, delay, ttl ---------------------------------------------------------


async def test_a_delayed_put_wakes_a_waiter_when_due(
    broker: Broker, autojump_clock: trio.abc.Clock
) -> None:
    consumer = await connect(broker)
    await consumer.send(Get(id=3, queue="q", timeout=None))
    await trio.testing.wait_all_tasks_blocked()
    producer = await connect(broker)
    start = trio.current_time()
    await producer.call(Put, queue="q", body=b"later", delay=30)
    got = await consumer.receive()
    assert isinstance(got, GetReply)
    assert got.body == b"later"
    assert trio.current_time() - start == pytest.approx(30)


async def test_ttl_and_priority_over_the_wire(
    broker: Broker, autojump_clock: trio.abc.Clock
) -> None:
    peer = await connect(broker)
    await peer.call(Put, queue="q", body=b"low")
    await peer.call(Put, queue="q", body=b"brief", priority=5, ttl=10)
    await peer.call(Put, queue="q", body=b"high", priority=5)
    await trio.sleep(11)
    got = await peer.call(GetMany, queue="q", n=10, timeout=0)
    assert isinstance(got, GetManyReply)
    assert got.bodies == [b"high", b"low"]
    stats = await peer.call(Stats, queue="q")
    assert isinstance(stats, StatsReply)
    assert stats.stats["expired_total"] == 1
    bad = await peer.call(Put, queue="q", body=b"x", ttl=-1.0)
    assert isinstance(bad, Error)
    assert bad.code == "invalid"


# -- bounded queues --------------------------------------------------------------


async def test_a_blocked_put_waits_for_room_then_times_out_with_full(
    broker: Broker, autojump_clock: trio.abc.Clock
) -> None:
    from brokerq.protocol import Configure, ConfigureReply

    peer = await connect(broker)
    assert isinstance(await peer.call(Configure, queue="q", maxsize=1), ConfigureReply)
    await peer.call(Put, queue="q", body=b"1")
    refused = await peer.call(Put, queue="q", body=b"2", timeout=0)
    assert isinstance(refused, Error)
    assert refused.code == "full"
    start = trio.current_time()
    late = await peer.call(Put, queue="q", body=b"2", timeout=5)
    assert isinstance(late, Error)
    assert late.code == "full"
    assert trio.current_time() - start == pytest.approx(5)
    assert broker.core.queue_stats("q", 0)["putters"] == 0
    # Room frees while a put waits: it goes in, in order.
    producer = await connect(broker)
    await producer.send(Put(id=7, queue="q", body=b"2"))
    await trio.testing.wait_all_tasks_blocked()
    assert broker.core.queue_stats("q", 0)["putters"] == 1
    got = await peer.call(Get, queue="q", timeout=0)
    assert isinstance(got, GetReply)
    assert got.body == b"1"
    admitted = await producer.receive()
    assert isinstance(admitted, PutReply)
    assert admitted.id == 7
    got = await peer.call(Get, queue="q", timeout=0)
    assert isinstance(got, GetReply)
    assert got.body == b"2"


async def test_a_putter_that_disconnects_puts_nothing(broker: Broker) -> None:
    from brokerq.protocol import Configure

    peer = await connect(broker)
    await peer.call(Configure, queue="q", maxsize=1)
    await peer.call(Put, queue="q", body=b"1")
    gone = await connect(broker)
    await gone.send(Put(id=3, queue="q", body=b"never"))
    await trio.testing.wait_all_tasks_blocked()
    await gone.stream.aclose()
    await trio.testing.wait_all_tasks_blocked()
    assert broker.core.queue_stats("q", 0)["putters"] == 0
    await peer.call(Get, queue="q", timeout=0)
    assert isinstance(await peer.call(Get, queue="q", timeout=0), Error)
