"""Prefetching consumers (docs/usage.md, "Prefetching consumers";
docs/protocol.md 5.25-5.27; docs/guarantees.md G52-G56).

Three levels: the core (plain method calls), the trio broker over in-memory
streams with virtual time (test_server's fixtures), and real brokers with
the blocking and the async client, consumer processes killed by pid.
Every wait is bounded (``wait_until``, ``read_line``, pytest-timeout).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
from test_server import Peer, connect

import brokerq
from brokerq import protocol
from brokerq.core import BrokerCore
from brokerq.protocol import (
    Ack,
    AckReply,
    Cancel,
    CancelReply,
    Consume,
    ConsumeReply,
    Error,
    Get,
    GetReply,
    Ping,
    PingReply,
    Put,
    PutMany,
    PutManyReply,
    PutReply,
    Stats,
    StatsReply,
    StreamDelivery,
    Taken,
)
from brokerq.server import Broker, BrokerConfig

pytestmark = pytest.mark.timeout(60)


# -- the core ---------------------------------------------------------------------------------


def make_core() -> BrokerCore:
    return BrokerCore(max_message_size=1000)


def bodies_of(messages: Any) -> list[bytes]:
    return [m.body for m in messages]


def test_core_a_stream_takes_up_to_its_credit_and_taken_gives_it_back() -> None:
    core = make_core()
    core.put_many("q", [b"%d" % i for i in range(5)], 0.0)
    stream, served = core.consume("q", 3, 0.0)
    assert served == [stream] * 3
    assert bodies_of(stream.messages) == [b"0", b"1", b"2"]
    assert stream.credit == 0
    stats = core.queue_stats("q", 0.0)
    assert (stats["ready"], stats["prefetched"], stats["streams"], stats["waiters"]) == (2, 3, 1, 0)
    stream.messages = []  # (sent)
    assert core.taken(stream, 2, 0.0) == [stream, stream]  # two credits back: two more
    assert bodies_of(stream.messages) == [b"3", b"4"]
    assert bodies_of(stream.held) == [b"2", b"3", b"4"]
    stats = core.queue_stats("q", 0.0)
    assert (stats["ready"], stats["prefetched"], stats["delivered_total"]) == (0, 3, 2)
    with pytest.raises(brokerq.InvalidRequest):
        core.taken(stream, 4, 0.0)  # more than it holds
    core.taken(stream, 1, 0.0)
    assert core.queue_stats("q", 0.0)["waiters"] == 1  # credit again: back in line
    core.put("q", b"5", 0.0)
    assert bodies_of(stream.held) == [b"3", b"4", b"5"]


def test_core_two_streams_and_a_plain_get_share_one_line_round_robin() -> None:
    core = make_core()
    first, _ = core.consume("q", 10, 0.0)
    getter = core.wait("q")
    second, _ = core.consume("q", 10, 0.0)
    _, woken = core.put_many("q", [b"%d" % i for i in range(7)], 0.0)
    # In line: first, getter, second. Each stream goes to the back after a
    # message while it has credit; the plain get is served once and leaves:
    # 0 first (back of the line), 1 getter (gone), then second and first by turns.
    assert bodies_of(first.held) == [b"0", b"3", b"5"]
    assert bodies_of(getter.messages) == [b"1"]
    assert bodies_of(second.held) == [b"2", b"4", b"6"]
    assert woken[:3] == [first, getter, second]


def test_core_a_stream_without_credit_leaves_the_line_until_taken() -> None:
    core = make_core()
    stream, _ = core.consume("q", 1, 0.0)
    core.put("q", b"a", 0.0)
    assert stream.credit == 0
    core.put("q", b"b", 0.0)  # no credit: it stays ready
    assert core.queue_stats("q", 0.0)["ready"] == 1
    plain = core.get_nowait("q")  # nobody waits in line: a plain get takes it
    assert bodies_of(plain) == [b"b"]
    waiting = core.wait("q")
    core.taken(stream, 1, 0.0)  # back in line, behind the plain waiter
    core.put_many("q", [b"c", b"d"], 0.0)
    assert bodies_of(waiting.messages) == [b"c"]
    assert bodies_of(stream.held) == [b"d"]


def test_core_cancel_gives_back_the_untaken_in_order_at_the_head() -> None:
    core = make_core()
    core.put_many("q", [b"%d" % i for i in range(6)], 0.0)
    stream, _ = core.consume("q", 4, 0.0)
    core.taken(stream, 1, 0.0)  # "0" is the client's; "4" delivered in its place
    assert bodies_of(stream.held) == [b"1", b"2", b"3", b"4"]
    returned, _ = core.cancel_stream(stream, 0.0)
    assert returned == 4
    stats = core.queue_stats("q", 0.0)
    assert (stats["ready"], stats["prefetched"], stats["streams"]) == (5, 0, 0)
    assert bodies_of(core.get_nowait("q", 10)) == [b"1", b"2", b"3", b"4", b"5"]
    assert core.cancel_stream(stream, 0.0) == (0, [])  # once


def test_core_cancel_hands_the_returned_to_the_waiters_in_line() -> None:
    core = make_core()
    core.put_many("q", [b"a", b"b"], 0.0)
    stream, _ = core.consume("q", 2, 0.0)
    waiter = core.wait("q")
    _, woken = core.cancel_stream(stream, 0.0)
    assert woken == [waiter]
    assert bodies_of(waiter.messages) == [b"a"]
    assert core.queue_stats("q", 0.0)["ready"] == 1


def test_core_reserve_mode_leases_at_taken_and_the_lease_ends_as_a_reserves() -> None:
    core = make_core()
    core.put_many("q", [b"a", b"b"], 0.0)
    owner = object()
    stream, _ = core.consume("q", 2, 0.0, lease=5.0, reserve=True, owner=owner)
    assert stream.length == 5.0
    assert core.queue_stats("q", 0.0)["reserved"] == 0  # no lease while prefetched
    core.taken(stream, 1, 10.0)  # the lease starts now
    a = stream.messages[0]
    assert a.attempts == 1
    lease = core.lease_of(a.id)
    assert lease is not None
    assert lease.expires_at == 15.0
    assert core.queue_stats("q", 10.0)["reserved"] == 1
    core.ack(a.id, 1)
    # The lease of the other one, taken, runs out: it comes back (attempt counted).
    core.taken(stream, 1, 20.0)
    b = stream.messages[1]
    assert core.tick(26.0) == [stream]  # b's lease ran out: back, to the stream
    assert b.attempts == 1  # counted at its taken
    assert list(stream.held) == [b]


def test_core_reserve_mode_credit_returns_at_taken_and_a_release_redelivers() -> None:
    core = make_core()
    core.put("q", b"a", 0.0)
    stream, _ = core.consume("q", 1, 0.0, reserve=True, owner="conn")
    msg = stream.messages.pop()
    core.taken(stream, 1, 0.0)
    assert stream.credit == 1  # the lease is the owner's, as a reserve's
    woken = core.release(msg.id, 1, 0.0)
    assert woken == [stream]  # back to the stream, as the next attempt
    assert stream.held[0] is msg
    assert core.queue_stats("q", 0.0)["prefetched"] == 1
    core.release_owned("conn", 0.0)  # nothing leased now: nothing to end


def test_core_untaken_messages_are_in_the_snapshot_and_a_delete() -> None:
    core = make_core()
    core.put_many("q", [b"a", b"b", b"c"], 0.0)
    stream, _ = core.consume("q", 2, 0.0)
    rebuilt = make_core()
    for record in core.snapshot():
        rebuilt.apply(record)
    rebuilt.finish_replay(0.0)
    assert bodies_of(rebuilt.get_nowait("q", 10)) == [b"a", b"b", b"c"]
    count, _ = core.delete_queue("q", 0.0)
    assert count == 3
    assert core.queue_stats("q", 0.0)["prefetched"] == 0
    core.taken(stream, 2, 0.0)  # gone meanwhile: only the credit comes back
    assert core.queue_stats("q", 0.0)["bytes"] == 0


def test_core_a_prefetched_message_past_its_ttl_is_dropped_when_it_comes_back() -> None:
    core = make_core()
    core.put("q", b"short", 0.0, ttl=1.0)
    core.put("q", b"long", 0.0)
    stream, _ = core.consume("q", 5, 0.0)
    core.tick(2.0)  # its ttl ran out while prefetched: kept for now
    assert len(stream.held) == 2
    returned, _ = core.cancel_stream(stream, 2.0)
    assert returned == 1
    stats = core.queue_stats("q", 2.0)
    assert (stats["ready"], stats["expired_total"]) == (1, 1)


def test_core_a_bounded_queue_counts_prefetched_messages() -> None:
    core = make_core()
    core.configure("q", maxsize=2)
    core.put_many("q", [b"a", b"b"], 0.0)
    core.consume("q", 2, 0.0)
    with pytest.raises(brokerq.Full):
        core.put("q", b"c", 0.0)


# -- the broker, over in-memory streams --------------------------------------------------------


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    b = Broker(
        BrokerConfig(socket_path="/nonexistent/b.sock", max_message_size=1000),
        clock=trio.current_time,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(b.serve, None)
        yield b
        b.request_stop("test over")


async def frames_until(peer: Peer, kind: type[protocol.Reply]) -> tuple[list[Any], Any]:
    """Frames received until one of ``kind``: the deliveries before it, and it."""
    deliveries = []
    while True:
        frame = await peer.receive()
        if isinstance(frame, StreamDelivery):
            deliveries.append(frame)
        elif isinstance(frame, kind):
            return deliveries, frame
        else:
            raise AssertionError(f"unexpected {frame!r}")


async def deliveries(peer: Peer, n: int) -> list[StreamDelivery]:
    got = []
    while len(got) < n:
        frame = await peer.receive()
        assert isinstance(frame, StreamDelivery), frame
        got.append(frame)
    return got


async def test_broker_streams_deliveries_in_order_and_a_ping_has_them_all(broker: Broker) -> None:
    producer = await connect(broker)
    consumer = await connect(broker)
    reply = await producer.call(PutMany, queue="q", bodies=[b"%d" % i for i in range(5)])
    assert isinstance(reply, PutManyReply)
    await consumer.send(Consume(id=50, queue="q", prefetch=3))
    early, consumed = await frames_until(consumer, ConsumeReply)
    assert consumed.id == 50
    assert consumed.lease == 0.0
    rest = await deliveries(consumer, 3 - len(early))
    got = early + rest
    assert [d.body for d in got] == [b"0", b"1", b"2"]
    assert {d.id for d in got} == {50}
    assert [d.attempt for d in got] == [1, 1, 1]
    await consumer.send(Taken(id=50, n=2))  # no reply; two credits back
    await consumer.send(Ping(id=51))
    more, _ = await frames_until(consumer, PingReply)
    assert [d.body for d in more] == [b"3", b"4"]  # sent ahead of the ping's reply
    await producer.call(Put, queue="q", body=b"5")
    await consumer.send(Taken(id=50, n=1))
    (late,) = await deliveries(consumer, 1)
    assert late.body == b"5"
    stats = await producer.call(Stats, queue="q")
    assert isinstance(stats, StatsReply)
    assert stats.stats["prefetched"] == 3
    assert stats.stats["delivered_total"] == 3


async def test_broker_cancel_returns_the_untaken_in_order(broker: Broker) -> None:
    producer = await connect(broker)
    consumer = await connect(broker)
    await producer.call(PutMany, queue="q", bodies=[b"a", b"b", b"c", b"d"])
    await consumer.send(Consume(id=7, queue="q", prefetch=3))
    early, _ = await frames_until(consumer, ConsumeReply)
    await deliveries(consumer, 3 - len(early))
    await consumer.send(Taken(id=7, n=1), Cancel(id=8, stream=7))
    more, cancelled = await frames_until(consumer, CancelReply)
    # "d", handed over at the taken, may or may not have been sent before
    # the cancel ended the stream: it went back with the others either way.
    assert [d.body for d in more] in ([], [b"d"])
    assert cancelled.returned == 3
    other = await connect(broker)
    for body in (b"b", b"c", b"d"):
        reply = await other.call(Get, queue="q", timeout=0)
        assert isinstance(reply, GetReply)
        assert reply.body == body


async def test_broker_a_closed_connection_gives_back_the_untaken(broker: Broker) -> None:
    producer = await connect(broker)
    consumer = await connect(broker)
    await producer.call(PutMany, queue="q", bodies=[b"a", b"b", b"c"])
    await consumer.send(Consume(id=2, queue="q", prefetch=2))
    early, _ = await frames_until(consumer, ConsumeReply)
    await deliveries(consumer, 2 - len(early))
    await consumer.send(Taken(id=2, n=1))  # sent, then the client goes at once
    await consumer.stream.aclose()
    with trio.fail_after(5):
        while True:
            stats = await producer.call(Stats, queue="q")
            assert isinstance(stats, StatsReply)
            if stats.stats["streams"] == 0:
                break
            await trio.sleep(0.01)
    assert stats.stats["ready"] == 2  # "a" was taken; "b" back at its place
    reply = await producer.call(Get, queue="q", timeout=0)
    assert isinstance(reply, GetReply)
    assert reply.body == b"b"


async def test_broker_a_bad_taken_is_an_error_with_id_0_and_the_end(broker: Broker) -> None:
    consumer = await connect(broker)
    await consumer.send(Consume(id=3, queue="q", prefetch=2))
    await frames_until(consumer, ConsumeReply)
    await consumer.send(Taken(id=3, n=1))  # nothing was delivered
    error = await consumer.receive()
    assert isinstance(error, Error)
    assert (error.id, error.code) == (0, "bad_request")
    assert await consumer.at_eof()


async def test_broker_consume_checks_its_fields(broker: Broker) -> None:
    consumer = await connect(broker)
    for fields in (
        {"prefetch": 0},
        {"prefetch": 1, "mode": "peek"},
        {"prefetch": 1, "mode": "reserve", "lease": 0.0},
        {"prefetch": 1, "queue": ""},
    ):
        reply = await consumer.call(Consume, **{"queue": "q", **fields})
        assert isinstance(reply, Error)
        assert reply.code == "invalid"
    reply = await consumer.call(Cancel, stream=12345)
    assert isinstance(reply, Error)
    assert reply.code == "invalid"
    assert isinstance(await consumer.call(Ping), PingReply)  # still open


async def test_broker_reserve_mode_leases_at_taken_and_acks_on_the_stream(
    broker: Broker, autojump_clock: trio.abc.Clock
) -> None:
    producer = await connect(broker)
    consumer = await connect(broker)
    await producer.call(PutMany, queue="q", bodies=[b"a", b"b"])
    await consumer.send(Consume(id=9, queue="q", prefetch=2, mode="reserve", lease=2.0))
    early, consumed = await frames_until(consumer, ConsumeReply)
    assert consumed.lease == 2.0
    a, b = early + await deliveries(consumer, 2 - len(early))
    await trio.sleep(5)  # prefetched, not leased: no lease runs out
    await consumer.send(Taken(id=9, n=1))
    reply = await consumer.call(Ack, msg_id=a.msg_id, attempt=a.attempt)
    assert isinstance(reply, AckReply)
    await consumer.send(Taken(id=9, n=1))
    await trio.sleep(3)  # the lease of "b" runs out: back to the stream, attempt 2
    (again,) = await deliveries(consumer, 1)
    assert (again.msg_id, again.body, again.attempt) == (b.msg_id, b"b", 2)


async def test_broker_plain_requests_go_on_beside_a_stream(broker: Broker) -> None:
    consumer = await connect(broker)
    await consumer.send(Consume(id=4, queue="q", prefetch=1))
    await frames_until(consumer, ConsumeReply)
    reply = await consumer.call(Put, queue="other", body=b"x")
    assert isinstance(reply, PutReply)
    await consumer.send(Put(id=99, queue="q", body=b"y"))
    (delivery,), reply = await frames_until(consumer, PutReply)  # made before the reply
    assert delivery.body == b"y"
    assert reply.id == 99
