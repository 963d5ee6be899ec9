"""Topics (fan-out): the core's registry and copies, then the broker's live feeds.

Core tests drive :class:`BrokerCore` directly; broker tests use in-memory
streams with virtual time, as in test_server.py. The clients and the CLI
are tested over real sockets in test_client.py, test_async_client.py and
test_cli.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.testing
from test_server import Peer, connect

from brokerq import protocol
from brokerq.broker.core import BrokerCore
from brokerq.broker.core.records import AnyRecord
from brokerq.broker.server import Broker, BrokerConfig
from brokerq.errors import InvalidRequest, MessageTooLarge
from brokerq.protocol import (
    Error,
    Event,
    Get,
    GetReply,
    Hello,
    HelloReply,
    Ping,
    PingReply,
    Publish,
    PublishReply,
    Stats,
    StatsReply,
    Subscribe,
    SubscribeReply,
    Unsubscribe,
    UnsubscribeReply,
)


@pytest.fixture
def core() -> BrokerCore:
    return BrokerCore(max_message_size=1000)


def ready_bodies(core: BrokerCore, queue: str) -> list[bytes]:
    return [m.body for m in core.get_nowait(queue, 100)]


# -- the core ----------------------------------------------------------------


def test_publish_without_subscribers_goes_nowhere(core: BrokerCore) -> None:
    assert core.publish("events", b"x", now=0) == (0, [], [])
    assert core.queue_names() == []


def test_each_subscriber_queue_gets_a_copy_of_later_publishes(core: BrokerCore) -> None:
    core.publish("events", b"before", now=0)
    assert core.subscribe("events", "a")
    assert core.subscribe("events", "b")
    assert not core.subscribe("events", "a")  # already: nothing changes
    copies, live, _ = core.publish("events", b"one", now=0)
    core.publish("events", b"two", now=0)
    assert (copies, live) == (2, [])
    assert ready_bodies(core, "a") == [b"one", b"two"]
    assert ready_bodies(core, "b") == [b"one", b"two"]


def test_unsubscribe_stops_the_copies(core: BrokerCore) -> None:
    core.subscribe("events", "a")
    assert core.unsubscribe("events", "a")
    assert not core.unsubscribe("events", "a")
    assert core.publish("events", b"x", now=0)[0] == 0
    assert core.topics.stats() == {}


def test_a_copy_goes_to_a_waiting_dequeuer(core: BrokerCore) -> None:
    core.subscribe("events", "a")
    waiter = core.wait("a")
    _, _, woken = core.publish("events", b"x", now=0)
    assert woken == [waiter]
    assert [m.body for m in waiter.messages] == [b"x"]


def test_a_full_subscriber_queue_misses_the_copy_and_it_is_counted(core: BrokerCore) -> None:
    core.subscribe("events", "small")
    core.subscribe("events", "big")
    core.configure("small", maxsize=1)
    assert core.publish("events", b"1", now=0)[0] == 2
    assert core.publish("events", b"2", now=0)[0] == 1  # "small" is full: never waits
    assert ready_bodies(core, "small") == [b"1"]
    assert ready_bodies(core, "big") == [b"1", b"2"]
    stats = core.topics.stats()["events"]
    assert stats["published_total"] == 2
    assert stats["dropped_total"] == 1


def test_priority_and_ttl_apply_to_every_copy(core: BrokerCore) -> None:
    core.subscribe("events", "a")
    core.publish("events", b"low", now=0)
    core.publish("events", b"high", now=0, priority=5)
    core.publish("events", b"short", now=0, ttl=1)
    core.tick(now=2)
    assert ready_bodies(core, "a") == [b"high", b"low"]


def test_a_retried_publish_makes_only_the_missing_copies(core: BrokerCore) -> None:
    core.subscribe("events", "a")
    assert core.publish("events", b"x", now=0, key=b"k" * 16)[0] == 1
    core.subscribe("events", "b")
    core.publish("events", b"x", now=0, key=b"k" * 16)  # "a" has its copy already
    assert ready_bodies(core, "a") == [b"x"]
    assert ready_bodies(core, "b") == [b"x"]


def test_live_subscribers_are_returned_to_the_io_layer(core: BrokerCore) -> None:
    first, second = object(), object()
    core.watch("events", first)
    core.watch("events", second)
    core.watch("other", first)
    assert core.publish("events", b"x", now=0)[1] == [first, second]
    assert core.unwatch("events", second)
    assert not core.unwatch("events", second)
    core.unwatch_all(first)
    assert core.publish("events", b"x", now=0)[1] == []
    assert core.topics.stats() == {}


def test_deleting_a_queue_ends_its_subscriptions(core: BrokerCore) -> None:
    core.subscribe("events", "a")
    core.delete_queue("a", now=0)
    assert core.publish("events", b"x", now=0)[0] == 0


@pytest.mark.parametrize(
    ("topic", "queue"), [("", "a"), ("bad\n", "a"), ("x:y", "a"), ("events", "a:dead")]
)
def test_bad_names_are_refused(core: BrokerCore, topic: str, queue: str) -> None:
    with pytest.raises(InvalidRequest):
        core.subscribe(topic, queue)


def test_bad_publishes_are_refused(core: BrokerCore) -> None:
    with pytest.raises(InvalidRequest):
        core.publish("a:b", b"x", now=0)
    with pytest.raises(MessageTooLarge):
        core.publish("events", b"x" * 1001, now=0)


def replayed(records: list[AnyRecord]) -> BrokerCore:
    core = BrokerCore(max_message_size=1000)
    for record in records:
        core.apply(record)
    core.finish_replay(now=0)
    return core


def test_subscriptions_and_copies_survive_a_replay() -> None:
    records: list[AnyRecord] = []
    a = BrokerCore(max_message_size=1000, write=records.append)
    a.subscribe("events", "a")
    a.subscribe("events", "b")
    a.subscribe("other", "b")
    a.unsubscribe("other", "b")
    a.publish("events", b"x", now=0)
    a.subscribe("gone", "c")
    a.delete_queue("c", now=0)
    b = replayed(records)
    assert b.topics.subscriptions() == [("events", "a"), ("events", "b")]
    assert ready_bodies(b, "a") == [b"x"]
    # A snapshot of the replayed state rebuilds the same subscriptions.
    assert replayed(b.snapshot()).topics.subscriptions() == [("events", "a"), ("events", "b")]


def test_a_live_subscription_is_not_journaled() -> None:
    records: list[AnyRecord] = []
    a = BrokerCore(max_message_size=1000, write=records.append)
    a.watch("events", object())
    a.publish("events", b"x", now=0)
    assert records == []


# -- the broker: live subscribers over in-memory streams ----------------------


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    b = Broker(
        BrokerConfig(
            socket_path="/nonexistent/b.sock", max_message_size=1000, subscriber_buffer=4000
        ),
        clock=trio.current_time,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(b.serve, None)
        yield b
        b.request_stop("test over")


async def subscribe(peer: Peer, topic: str, **fields: Any) -> int:
    rid = peer.rid()
    await peer.send(Subscribe(id=rid, topic=topic, **fields))
    reply = await peer.receive()
    assert reply == SubscribeReply(id=rid)
    return rid


async def publish(peer: Peer, topic: str, body: bytes) -> PublishReply:
    reply = await peer.call(Publish, topic=topic, body=body)
    assert isinstance(reply, PublishReply)
    return reply


async def test_live_subscribers_get_every_publish_in_order(broker: Broker) -> None:
    subscribers = [await connect(broker) for _ in range(3)]
    ids = [await subscribe(s, "events") for s in subscribers]
    publisher = await connect(broker)
    for body in (b"1", b"2", b"3"):
        assert await publish(publisher, "events", body) == PublishReply(
            id=publisher.next_id, copies=0, live=3
        )
    for subscriber, rid in zip(subscribers, ids, strict=True):
        got = [await subscriber.receive() for _ in range(3)]
        assert got == [Event(id=rid, topic="events", body=b) for b in (b"1", b"2", b"3")]


async def test_durable_and_live_subscribers_together(broker: Broker) -> None:
    live = await connect(broker)
    await subscribe(live, "events")
    peer = await connect(broker)
    await subscribe(peer, "events", queue="jobs")
    reply = await publish(peer, "events", b"x")
    assert (reply.copies, reply.live) == (1, 1)
    got = await peer.call(Get, queue="jobs", timeout=0)
    assert isinstance(got, GetReply)
    assert got.body == b"x"
    assert isinstance(await live.receive(), Event)


async def test_a_live_subscriber_can_still_make_requests(broker: Broker) -> None:
    subscriber = await connect(broker)
    rid = await subscribe(subscriber, "events")
    await publish(await connect(broker), "events", b"x")
    assert await subscriber.receive() == Event(id=rid, topic="events", body=b"x")
    assert isinstance(await subscriber.call(Ping), PingReply)
    reply = await subscriber.call(Unsubscribe, topic="events")
    assert reply == UnsubscribeReply(id=subscriber.next_id, found=True)
    assert (await publish(await connect(broker), "events", b"y")).live == 0


async def test_a_subscriber_that_leaves_is_forgotten(broker: Broker) -> None:
    subscriber = await connect(broker)
    await subscribe(subscriber, "events")
    await subscriber.stream.aclose()
    publisher = await connect(broker)
    with trio.fail_after(5):
        while (await publish(publisher, "events", b"x")).live:
            await trio.sleep(0.01)
    stats = await publisher.call(Stats)
    assert isinstance(stats, StatsReply)
    assert stats.stats["topics"] == {}  # the topic went with its last subscriber


async def test_a_slow_live_subscriber_is_dropped_with_an_overflow_error(
    broker: Broker, autojump_clock: trio.abc.Clock
) -> None:
    # A lockstep stream buffers nothing: every send waits for the reader.
    client_end, server_end = trio.testing.lockstep_stream_pair()
    broker.start_connection(server_end)
    slow = Peer(client_end)
    assert isinstance(await slow.call(Hello, version=protocol.PROTOCOL_VERSION), HelloReply)
    await subscribe(slow, "events")
    fast = await connect(broker)
    fast_id = await subscribe(fast, "events")
    publisher = await connect(broker)
    sent = 0
    # "slow" reads nothing meanwhile; "fast" keeps up. Neither holds up the publisher.
    with trio.fail_after(60):
        while sent < 40:
            await publish(publisher, "events", b"x" * 200)
            sent += 1
            assert await fast.receive() == Event(id=fast_id, topic="events", body=b"x" * 200)
    frames = []
    with trio.fail_after(60):
        while True:
            try:
                frames.append(await slow.receive())
            except EOFError:
                break
    events = [f for f in frames if isinstance(f, Event)]
    (error,) = [f for f in frames if isinstance(f, Error)]
    assert error.code == "overflow"
    assert frames[-1] is error
    assert 0 < len(events) < sent
    stats = await publisher.call(Stats)
    assert isinstance(stats, StatsReply)
    assert stats.stats["topics"]["events"]["live"] == 1  # only "fast" is left


async def test_a_dropped_live_subscriber_that_reads_nothing_is_closed_after_the_grace(
    broker: Broker, autojump_clock: trio.abc.Clock
) -> None:
    """Its writer is blocked sending what it never reads: the overflow gives
    that send OVERFLOW_GRACE_SECONDS, then the connection is closed."""
    from brokerq.broker.connection import OVERFLOW_GRACE_SECONDS

    client_end, server_end = trio.testing.lockstep_stream_pair()
    broker.start_connection(server_end)
    silent = Peer(client_end)
    assert isinstance(await silent.call(Hello, version=protocol.PROTOCOL_VERSION), HelloReply)
    await subscribe(silent, "events")
    publisher = await connect(broker)
    with trio.fail_after(60):
        while (await publish(publisher, "events", b"x" * 200)).live:
            pass  # until the subscriber is dropped
    assert broker.connections == 2
    with trio.fail_after(OVERFLOW_GRACE_SECONDS + 5):
        while broker.connections == 2:
            await trio.sleep(0.5)
    assert broker.connections == 1  # the publisher's


async def test_one_publish_larger_than_the_buffer_still_reaches_a_reader() -> None:
    b = Broker(
        BrokerConfig(
            socket_path="/nonexistent/b.sock", max_message_size=1000, subscriber_buffer=10
        ),
        clock=trio.current_time,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(b.serve, None)
        subscriber = await connect(b)
        rid = await subscribe(subscriber, "events")
        publisher = await connect(b)
        for body in (b"y" * 900, b"z" * 900):
            await publish(publisher, "events", body)
            assert await subscriber.receive() == Event(id=rid, topic="events", body=body)
        b.request_stop("test over")


async def test_topic_errors_keep_the_connection(broker: Broker) -> None:
    peer = await connect(broker)
    for request in (
        Publish(id=7, topic="a:b", body=b"x"),
        Subscribe(id=8, topic="", queue="q"),
        Subscribe(id=9, topic="t", queue="q:dead"),
        Publish(id=10, topic="t", body=b"x" * 1001),
    ):
        await peer.send(request)
        reply = await peer.receive()
        assert isinstance(reply, Error)
        assert reply.id == request.id
    assert isinstance(await peer.call(Ping), PingReply)


def test_protocol_round_trip_of_topic_frames() -> None:
    for frame in (
        Publish(id=1, topic="t", body=b"\0x", key=b"k" * 16, priority=3, ttl=2.5),
        Subscribe(id=2, topic="t"),
        Subscribe(id=3, topic="t", queue="q"),
        Unsubscribe(id=4, topic="t", queue="q"),
    ):
        assert protocol.decode_request(protocol.encode_frame(frame)[4:]) == frame
    for reply in (
        PublishReply(id=1, copies=2, live=1),
        SubscribeReply(id=2),
        UnsubscribeReply(id=4, found=False),
        Event(id=2, topic="t", body=b"\0"),
    ):
        assert protocol.decode_reply(protocol.encode_frame(reply)[4:]) == reply
