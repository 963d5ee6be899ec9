"""Prefetching consumers (docs/usage.md, "Prefetching consumers";
docs/protocol.md 5.25-5.27; docs/guarantees.md G53-G57).

Three levels: the core (plain method calls), the trio broker over in-memory
streams with virtual time (test_server's fixtures), and real brokers with
the blocking and the async client, consumer processes killed by pid.
Every wait is bounded (``wait_until``, ``read_line``, pytest-timeout).
"""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import threading
import time
from typing import Any

import anyio
import pytest
import trio
from conftest import Procs, read_line, wait_until
from test_crash import kill_broker_of
from test_server import Peer, connect

import brokerq
from brokerq import protocol
from brokerq.broker.core import BrokerCore
from brokerq.broker.server import Broker
from brokerq.client import calls
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


# -- real brokers: the blocking client -----------------------------------------------------------

CONSUMER = textwrap.dedent(
    """
    import sys, time, brokerq
    path, queue, mode, prefetch, count = sys.argv[1:6]
    client = brokerq.connect(path, prefetch=int(prefetch))
    q = client.queue(queue)
    done = 0
    while count == "all" or done < int(count):
        if mode == "get":
            body = q.get(timeout=30)
        else:
            msg = q.reserve(timeout=30, lease=60)
            body = msg.body
            if body.endswith(b"ack"):
                msg.ack()
        sys.stdout.write(body.decode() + "\\n")  # handed to the application
        sys.stdout.flush()
        done += 1
    sys.stdout.write("idle\\n")
    sys.stdout.flush()
    time.sleep(600)
    """
)


def start_consumer(
    procs: Procs, path: str, queue: str, *, mode: str, prefetch: int, count: str
) -> Any:
    return procs([sys.executable, "-c", CONSUMER, path, queue, mode, str(prefetch), count])


def sigkill(proc: Any) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def stats_of(client: brokerq.Client, queue: str) -> dict[str, Any]:
    return client.queue(queue).stats()


def drain(q: brokerq.Queue) -> list[bytes]:
    """Every message of ``q``, once the broker has seen its streams end."""
    wait_until(lambda: q.stats()["streams"] == 0, what="the streams' end")
    got = []
    while True:
        try:
            got.append(q.get(timeout=0.5))
        except brokerq.Empty:
            return got


def test_deliveries_read_with_the_consume_reply_are_not_left_unread(
    socket_path: str, observer: brokerq.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The consume reply and the first deliveries after it may arrive in one
    read. The deliveries must go to the buffer then: they are in no socket
    any more, and with its credit spent the broker sends no more. Forced
    here: the client reads only once the reply, and the deliveries of puts
    made after it, are all in its socket (the bug this pins stalled the
    10,000 test about one run in ten)."""
    original = brokerq.client.blocking.Connection.send_reading

    def send_then_let_everything_arrive(
        conn: brokerq.client.blocking.Connection, data: bytes | bytearray, deadline: float | None
    ) -> None:
        original(conn, data, deadline)
        request = protocol.decode_request(bytes(data[4:]))
        if isinstance(request, protocol.Consume):
            reply = len(protocol.encode_frame(protocol.ConsumeReply(id=request.id, lease=0.0)))
            wait_until(lambda: unread_bytes(conn.sock) == reply, what="the reply in the socket")
            observer.queue("q").put_many([b"a", b"b", b"c"])
            deliveries = [
                protocol.StreamDelivery(id=request.id, msg_id=i, body=body, attempt=1)
                for i, body in enumerate([b"a", b"b", b"c"], start=1)
            ]
            size = reply + sum(len(protocol.encode_frame(d)) for d in deliveries)
            wait_until(lambda: unread_bytes(conn.sock) == size, what="the deliveries too")

    monkeypatch.setattr(
        brokerq.client.blocking.Connection, "send_reading", send_then_let_everything_arrive
    )
    with brokerq.connect(socket_path, prefetch=3) as consumer:
        mine = consumer.queue("q")
        assert [mine.get(timeout=2) for _ in range(3)] == [b"a", b"b", b"c"]


def unread_bytes(sock: Any) -> int:
    """How many bytes wait in the receive queue of ``sock`` (FIONREAD)."""
    import fcntl
    import struct
    import termios

    return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0])


def test_a_prefetching_consumer_gets_10000_messages_once_in_order(
    socket_path: str, observer: brokerq.Client
) -> None:
    bodies = [b"%05d" % i for i in range(10_000)]

    def produce() -> None:
        with brokerq.connect(socket_path, put_window=64) as producer:
            q = producer.queue("q")
            for body in bodies:
                q.put(body)

    thread = threading.Thread(target=produce)
    with brokerq.connect(socket_path, prefetch=64) as consumer:
        q = consumer.queue("q")
        thread.start()
        got = [q.get(timeout=10) for _ in bodies]
        thread.join(timeout=30)
        assert got == bodies
        # A taken frame has no reply: the broker may read the last few after
        # the observer's stats request, on its own connection.
        wait_until(lambda: observer.queue("q").stats()["prefetched"] == 0, what="the last takes")
        with pytest.raises(brokerq.Empty):
            q.get_nowait()
    stats = wait_until(lambda: (s := stats_of(observer, "q"))["streams"] == 0 and s)
    assert (stats["ready"], stats["delivered_total"], stats["put_total"]) == (0, 10_000, 10_000)


def test_two_prefetching_consumers_split_a_queue_none_lost_or_duplicated(
    socket_path: str, observer: brokerq.Client
) -> None:
    bodies = [b"%05d" % i for i in range(4_000)]
    got: dict[int, list[bytes]] = {0: [], 1: []}
    stop = threading.Event()

    def consume(i: int) -> None:
        with brokerq.connect(socket_path, prefetch=16) as consumer:
            q = consumer.queue("q")
            while not stop.is_set():
                try:
                    got[i] += q.get_many(7, timeout=0.05) if i else [q.get(timeout=0.05)]
                except brokerq.Empty:
                    continue

    threads = [threading.Thread(target=consume, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    q = observer.queue("q")
    for start in range(0, len(bodies), 100):
        q.put_many(bodies[start : start + 100])
    wait_until(lambda: len(got[0]) + len(got[1]) == len(bodies), what="every message")
    stop.set()
    for thread in threads:
        thread.join(timeout=10)
    assert sorted(got[0] + got[1]) == bodies  # none lost, none twice
    assert got[0] == sorted(got[0])  # each in order
    assert got[1] == sorted(got[1])
    assert got[0]
    assert got[1]  # both had a share (round robin)


def test_closing_gives_back_what_was_buffered_in_order(
    socket_path: str, observer: brokerq.Client
) -> None:
    observer.queue("q").put_many([b"%d" % i for i in range(10)])
    with brokerq.connect(socket_path, prefetch=4) as consumer:
        assert consumer.queue("q").get(timeout=5) == b"0"
        wait_until(lambda: stats_of(observer, "q")["prefetched"] == 4)
    assert drain(observer.queue("q")) == [b"%d" % i for i in range(1, 10)]


def test_a_killed_consumers_buffered_messages_go_to_another_in_order(
    socket_path: str, observer: brokerq.Client, procs: Procs
) -> None:
    bodies = [b"%03d" % i for i in range(100)]
    observer.queue("q").put_many(bodies)
    child = start_consumer(procs, socket_path, "q", mode="get", prefetch=16, count="5")
    handed = [read_line(child).strip() for _ in range(5)]
    assert read_line(child) == b"idle\n"
    assert handed == bodies[:5]
    wait_until(lambda: stats_of(observer, "q")["prefetched"] == 16)
    sigkill(child)
    # Every buffered one, not taken, comes back at its place; none handed out does.
    assert drain(observer.queue("q")) == bodies[5:]


def test_a_consumer_killed_at_any_moment_loses_at_most_the_one_in_its_hand(
    socket_path: str, observer: brokerq.Client, procs: Procs
) -> None:
    bodies = [b"%04d" % i for i in range(3000)]
    observer.queue("q").put_many(bodies)
    child = start_consumer(procs, socket_path, "q", mode="get", prefetch=64, count="all")
    for _ in range(200):
        read_line(child)
    sigkill(child)  # mid-stream: takens in flight, deliveries buffered
    assert child.stdout is not None
    printed = [line for line in child.stdout.read().split(b"\n") if line and line != b"idle"]
    handed = [b"%04d" % i for i in range(200)] + printed
    rest = drain(observer.queue("q"))
    assert rest == sorted(rest)
    assert not set(handed) & set(rest)  # nothing handed out came back (at most once)
    missing = set(bodies) - set(handed) - set(rest)
    assert len(missing) <= 1  # at most the one taken and not yet printed
    assert len(handed) == len(set(handed))


def test_a_broker_crash_keeps_the_buffered_messages_in_the_journal(
    socket_path: str, observer: brokerq.Client
) -> None:
    observer.queue("q").put_many([b"%d" % i for i in range(10)])
    with brokerq.connect(socket_path, prefetch=4) as consumer:
        q = consumer.queue("q")
        assert q.get(timeout=5) == b"0"
        # The broker has read the taken of b"0" (G55: until then a crash
        # leaves it ready, to be delivered again): 0 is gone, and its credit
        # came back as one more delivery.
        wait_until(lambda: (s := stats_of(observer, "q"))["ready"] == 5 and s["prefetched"] == 4)
        kill_broker_of(observer)
        # Delivered, never taken, never removed: the next broker has them
        # ready, in order; the stream opens again on it.
        assert [q.get(timeout=10) for _ in range(9)] == [b"%d" % i for i in range(1, 10)]


def test_reserve_mode_a_killed_consumers_unacked_and_buffered_come_back(
    socket_path: str, observer: brokerq.Client, procs: Procs
) -> None:
    bodies = [b"0-ack", b"1-ack", b"2-hold", b"3-ack"] + [b"%d" % i for i in range(4, 20)]
    observer.queue("q").put_many(bodies)
    child = start_consumer(procs, socket_path, "q", mode="reserve", prefetch=8, count="4")
    assert [read_line(child).strip() for _ in range(4)] == bodies[:4]
    assert read_line(child) == b"idle\n"
    stats = wait_until(lambda: (s := stats_of(observer, "q"))["prefetched"] == 8 and s)
    assert stats["reserved"] == 1  # "2-hold", leased to the consumer
    sigkill(child)
    wait_until(lambda: stats_of(observer, "q")["streams"] == 0, what="the stream's end")
    with brokerq.connect(socket_path, prefetch=4) as other:
        q = other.queue("q")
        again = []
        while True:
            try:
                with q.reserve(timeout=0.5) as msg:
                    again.append((msg.body, msg.attempt))
            except brokerq.Empty:
                break
    assert again[0] == (b"2-hold", 2)  # its lease ended with the consumer: attempt 2
    assert again[1:] == [(body, 1) for body in bodies[4:]]  # buffered, never leased


def test_reserve_mode_a_buffered_message_is_never_handed_out_stale(
    socket_path: str, observer: brokerq.Client
) -> None:
    observer.queue("q").put_many([b"a", b"b", b"c"])
    with brokerq.connect(socket_path, prefetch=4) as consumer:
        q = consumer.queue("q")
        first = q.reserve(timeout=5, lease=0.5)
        wait_until(lambda: stats_of(observer, "q")["prefetched"] == 2)
        time.sleep(1.0)  # longer than the lease: a lease begun at delivery would be gone
        second = q.reserve(timeout=5, lease=0.5)
        assert second.body == b"b"
        assert second.attempt == 1
        assert second.lease_expires - time.monotonic() > 0.4  # it begins now
        second.ack()  # not LeaseLost
        with pytest.raises(brokerq.LeaseLost):
            first.ack()  # its lease ran out while it was in the hand
        third = q.reserve(timeout=5, lease=0.5)
        assert (third.body, third.attempt) == (b"c", 1)
        third.release()
        again = [q.reserve(timeout=5, lease=0.5) for _ in range(2)]
        assert sorted((m.body, m.attempt) for m in again) == [(b"a", 2), (b"c", 2)]
        for msg in again:
            msg.ack()
    assert stats_of(observer, "q")["bytes"] == 0


def test_reserve_from_another_thread_acks_all_the_same(
    socket_path: str, observer: brokerq.Client
) -> None:
    observer.queue("q").put_many([b"a", b"b"])
    with brokerq.connect(socket_path, prefetch=2) as consumer:
        msg = consumer.queue("q").reserve(timeout=5)
        errors: list[BaseException] = []

        def settle() -> None:
            try:
                msg.ack()
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        thread = threading.Thread(target=settle)
        thread.start()
        thread.join(timeout=20)
        assert not errors
    assert drain(observer.queue("q")) == [b"b"]


def test_a_forked_child_opens_a_stream_of_its_own(
    socket_path: str, observer: brokerq.Client
) -> None:
    observer.queue("q").put_many([b"%d" % i for i in range(10)])
    with brokerq.connect(socket_path, prefetch=4) as consumer:
        q = consumer.queue("q")
        assert q.get(timeout=5) == b"0"
        wait_until(lambda: stats_of(observer, "q")["prefetched"] == 4)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                os.write(write_end, q.get(timeout=5))
            finally:
                os._exit(0)
        os.close(write_end)
        try:
            assert os.read(read_end, 100) == b"5"  # the first not buffered by the parent
        finally:
            os.close(read_end)
            os.waitpid(pid, 0)  # the child exits within its get's timeout
        assert q.get(timeout=5) == b"1"  # the parent's stream goes on


def test_prefetch_from_the_environment(socket_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert brokerq.Client(socket_path).prefetch == 0
    monkeypatch.setenv("BROKERQ_PREFETCH", "64")
    assert brokerq.Client(socket_path).prefetch == 64
    assert brokerq.Client(socket_path, prefetch=0).prefetch == 0  # explicit wins
    from brokerq.client.asynchronous import AsyncClient

    assert AsyncClient(socket_path).prefetch == 64
    monkeypatch.setenv("BROKERQ_PREFETCH", " ")
    assert brokerq.Client(socket_path).prefetch == 0
    for bad in ("x", "1.5", "-1"):
        monkeypatch.setenv("BROKERQ_PREFETCH", bad)
        with pytest.raises(ValueError, match="BROKERQ_PREFETCH"):
            brokerq.Client(socket_path)
        with pytest.raises(ValueError, match="BROKERQ_PREFETCH"):
            brokerq.connect(socket_path)
        with pytest.raises(ValueError, match="BROKERQ_PREFETCH"):
            brokerq.open_async_client(socket_path)
    monkeypatch.delenv("BROKERQ_PREFETCH")
    for bad_value in (-1, True, 1.5):
        with pytest.raises(ValueError, match="prefetch"):
            brokerq.Client(socket_path, prefetch=bad_value)  # type: ignore[arg-type]
    assert calls.prefetch(None) == 0
    assert not os.path.exists(socket_path)  # nothing was started for any of this


def test_the_environment_alone_turns_streaming_on(
    socket_path: str, monkeypatch: pytest.MonkeyPatch, observer: brokerq.Client
) -> None:
    monkeypatch.setenv("BROKERQ_PREFETCH", "8")
    observer.queue("q").put_many([b"a", b"b", b"c"])
    with brokerq.connect(socket_path) as consumer:
        assert consumer.queue("q").get(timeout=5) == b"a"
        stats = wait_until(lambda: (s := stats_of(observer, "q"))["prefetched"] == 2 and s)
        assert stats["streams"] == 1


# -- real brokers: the async client ------------------------------------------------------------


async def until_prefetched(observer: brokerq.Client, queue: str, n: int) -> None:
    while stats_of(observer, queue)["prefetched"] != n:
        await anyio.sleep(0.01)


def run_async(backend: str, main: Any, limit: float = 30) -> None:
    async def bounded() -> None:
        with anyio.fail_after(limit):
            await main()

    anyio.run(bounded, backend=backend)


def test_async_prefetch_gets_reserves_and_loses_nothing_to_a_cancel(
    backend: str, socket_path: str, observer: brokerq.Client
) -> None:
    async def main() -> None:
        async with brokerq.open_async_client(socket_path, prefetch=8) as client:
            q = client.queue("q")
            await q.put_many([b"%d" % i for i in range(20)])
            assert await q.get(timeout=5) == b"0"
            assert await q.get_many(3, timeout=5) == [b"1", b"2", b"3"]
            assert await q.get_nowait() == b"4"
            got = [await q.get(timeout=5) for _ in range(15)]
            assert got == [b"%d" % i for i in range(5, 20)]
            with anyio.move_on_after(0.2):
                await q.get()  # cancelled while it waits: takes nothing
            await q.put(b"after")
            assert await q.get(timeout=5) == b"after"
            # Two tasks wait on one stream: each gets one, none twice.
            results: list[bytes] = []

            async def one() -> None:
                results.append(await q.get(timeout=5))

            async with anyio.create_task_group() as tg:
                tg.start_soon(one)
                tg.start_soon(one)
                await anyio.wait_all_tasks_blocked()
                assert results == []  # both wait
                await q.put_many([b"x", b"y"])
            assert sorted(results) == [b"x", b"y"]
            r = client.queue("r")
            await r.put_many([b"a", b"b", b"c"])
            async with r.reserve(timeout=5, lease=5) as msg:
                assert (msg.body, msg.attempt) == (b"a", 1)
            second = await r.reserve(timeout=5, lease=5)
            await second.touch()
            await second.release()
            # "b" came back, to this stream again, behind "c" it had buffered.
            third = await r.reserve(timeout=5, lease=5)
            assert (third.body, third.attempt) == (b"c", 1)
            await third.ack()
            await until_prefetched(observer, "r", 1)
        # Closing gave back what was buffered: "b", not taken again.
        assert drain(observer.queue("r")) == [b"b"]

    run_async(backend, main)


def test_async_closing_gives_back_the_buffered(
    backend: str, socket_path: str, observer: brokerq.Client
) -> None:
    observer.queue("q").put_many([b"%d" % i for i in range(6)])

    async def main() -> None:
        async with brokerq.open_async_client(socket_path, prefetch=3) as client:
            assert await client.queue("q").get(timeout=5) == b"0"

    run_async(backend, main)
    assert drain(observer.queue("q")) == [b"%d" % i for i in range(1, 6)]
