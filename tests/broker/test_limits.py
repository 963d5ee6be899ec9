"""Limits that keep one bad client from hurting the others (issue 7, part 3).

Each limit is shown to hold, and the other clients to be served meanwhile:
the connection cap (``busy``), the frame and hello deadline, the cap on
pipelined requests (backpressure), and the per-queue and total byte caps.
Most run over in-memory streams with virtual time; the last few start real
brokers to check the options and their ``BROKERQ_*`` variables.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from conftest import BIN, Procs, wait_until
from test_server import Peer

import brokerq
from brokerq import protocol
from brokerq.broker.connection import Connection
from brokerq.broker.core import LIVE_OVERHEAD, BrokerCore, limits
from brokerq.broker.server import REFUSE_LINGER_SECONDS, Broker, BrokerConfig
from brokerq.client import calls
from brokerq.errors import BY_CODE, BrokerBusy, BrokerUnavailable, Full, QueueFull
from brokerq.protocol import (
    Error,
    FrameReader,
    Get,
    GetReply,
    Hello,
    HelloReply,
    Peek,
    PeekReply,
    Ping,
    PingReply,
    Publish,
    Put,
    PutReply,
    Stats,
    StatsReply,
    Subscribe,
)

NOW = 1_000_000.0


# -- helpers -------------------------------------------------------------------


@asynccontextmanager
async def serving(**options: Any) -> AsyncIterator[Broker]:
    """A broker serving in-memory connections, with these BrokerConfig options."""
    options.setdefault("max_message_size", 1000)
    broker = Broker(BrokerConfig(socket_path="/nonexistent/b.sock", **options), clock=time_now)
    async with trio.open_nursery() as nursery:
        await nursery.start(broker.serve, None)
        yield broker
        broker.request_stop("test over")


def time_now() -> float:
    return trio.current_time()


async def connect(broker: Broker, greet: bool = True, capacity: int | None = None) -> Peer:
    """A client connection; ``capacity`` bounds each direction's buffer like a socket's."""
    if capacity is None:
        client_end, server_end = trio.testing.memory_stream_pair()
        peer = Peer(client_end)
        broker.start_connection(server_end)
    else:
        to_broker, to_client = Pipe(capacity), Pipe(capacity)
        peer = Peer(PipeEnd(to_client, to_broker))  # type: ignore[arg-type]
        broker.start_connection(PipeEnd(to_broker, to_client))
    if greet:
        reply = await peer.call(Hello, version=protocol.PROTOCOL_VERSION)
        assert isinstance(reply, HelloReply)
    return peer


def frame(request: protocol.AnyRequest) -> bytes:
    return protocol.encode_frame(request)


def connection_of(broker: Broker, count: int = 1) -> list[Connection]:
    live = list(broker._live)
    assert len(live) == count
    return live


async def assert_served(peer: Peer) -> None:
    """``peer`` still gets answers."""
    reply = await peer.call(Ping)
    assert isinstance(reply, PingReply)
    assert reply.id == peer.next_id


async def closed_with(peer: Peer, code: str) -> Error:
    """The broker sent ``peer`` one error of ``code`` (id 0), then closed."""
    reply = await peer.receive()
    assert isinstance(reply, Error), reply
    assert (reply.id, reply.code) == (0, code)
    assert await peer.at_eof()
    return reply


class Pipe:
    """One direction of an in-memory socket: a buffer of at most ``capacity`` bytes.

    A writer blocks while it is full, as on a socket whose peer does not
    read; trio's memory streams never block a writer, which would hide
    exactly the backpressure these tests are about.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.buffer = bytearray()
        self.eof = False  # the writer closed
        self.gone = False  # the reader closed
        self._changed = trio.Event()

    def notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()
        view = memoryview(bytes(data))
        while view:
            if self.gone or self.eof:
                raise trio.BrokenResourceError("the reader is gone")
            room = self.capacity - len(self.buffer)
            if room <= 0:
                await self._changed.wait()
                continue
            self.buffer += view[:room]
            view = view[room:]
            self.notify()

    async def read(self, max_bytes: int | None) -> bytes:
        await trio.lowlevel.checkpoint()
        while not self.buffer:
            if self.eof or self.gone:
                return b""
            await self._changed.wait()
        size = len(self.buffer) if max_bytes is None else min(max_bytes, len(self.buffer))
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        self.notify()
        return data


class PipeEnd(trio.abc.Stream):
    def __init__(self, incoming: Pipe, outgoing: Pipe) -> None:
        self.incoming = incoming
        self.outgoing = outgoing

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.outgoing.write(data)

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self.incoming.read(max_bytes)

    async def aclose(self) -> None:
        self.outgoing.eof = True
        self.incoming.gone = True
        self.outgoing.notify()
        self.incoming.notify()
        await trio.lowlevel.checkpoint()


# -- 1. the connection cap -------------------------------------------------------


async def test_a_connection_past_the_maximum_gets_busy_and_others_go_on(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with serving(max_connections=2) as broker:
        first, second = await connect(broker), await connect(broker)
        third = await connect(broker, greet=False)
        # Answered at once, before its hello: the client reads why, then EOF.
        error = await third.receive()
        assert isinstance(error, Error)
        assert (error.id, error.code) == (0, "busy")
        assert "--max-connections" in error.message
        await third.send(Hello(id=1, version=protocol.PROTOCOL_VERSION))  # read and dropped
        assert await third.at_eof()
        # The two it serves never noticed.
        put = await first.call(Put, queue="q", body=b"kept")
        assert isinstance(put, PutReply)
        got = await second.call(Get, queue="q", timeout=0)
        assert isinstance(got, GetReply)
        assert got.body == b"kept"
        stats = await first.call(Stats)
        assert isinstance(stats, StatsReply)
        assert stats.stats["connections"] == 2
        assert stats.stats["max_connections"] == 2
        assert stats.stats["busy_total"] == 1
        # Once one leaves, a new connection is served.
        await first.stream.aclose()
        await trio.testing.wait_all_tasks_blocked()
        fourth = await connect(broker)
        await assert_served(fourth)
        await assert_served(second)


async def test_a_refused_connection_lingers_briefly_then_is_closed(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A client that never reads nor closes is let go after a moment."""
    async with serving(max_connections=1) as broker:
        kept = await connect(broker)
        start = trio.current_time()
        silent = await connect(broker, greet=False)
        assert (await silent.receive()).code == "busy"  # type: ignore[union-attr]
        assert await silent.at_eof()
        assert trio.current_time() - start == pytest.approx(REFUSE_LINGER_SECONDS)
        await assert_served(kept)


async def test_a_flood_of_refused_connections_is_closed_at_once(
    mock_clock: trio.testing.MockClock,
) -> None:
    """Past REFUSE_LINGER_MAX lingering refusals, one more is closed at once
    (the clock stands still here: no refusal can end by its linger's timeout)."""
    from brokerq.broker.server import REFUSE_LINGER_MAX

    async with serving(max_connections=1) as broker:
        kept = await connect(broker)
        flood = []
        for _ in range(REFUSE_LINGER_MAX + 5):
            flood.append(await connect(broker, greet=False))
            await trio.testing.wait_all_tasks_blocked()  # refused in this order
        assert broker._lingering == REFUSE_LINGER_MAX
        start = trio.current_time()
        for peer in flood[REFUSE_LINGER_MAX:]:  # no linger: busy, then EOF at once
            assert (await peer.receive()).code == "busy"  # type: ignore[union-attr]
            assert await peer.at_eof()
        assert trio.current_time() == start
        await assert_served(kept)
        for peer in flood[:REFUSE_LINGER_MAX]:
            await peer.stream.aclose()
        await trio.testing.wait_all_tasks_blocked()
        assert broker._lingering == 0
        assert broker.busy_total == len(flood)
        mock_clock.autojump_threshold = 0  # let the broker's stop take its grace


def test_busy_is_a_closing_error_that_the_clients_raise_as_brokerbusy() -> None:
    assert BY_CODE["busy"] is BrokerBusy
    assert issubclass(BrokerBusy, BrokerUnavailable)
    assert brokerq.BrokerBusy is BrokerBusy
    assert "busy" in calls.CLOSING_CODES
    wire = calls.Wire("/x.sock")
    request_id = wire.encode(protocol.Hello, {"version": protocol.PROTOCOL_VERSION})
    wire.feed(protocol.encode_frame(Error(id=0, code="busy", message="full up")))
    reply = wire.next_reply()
    assert reply is not None
    closed = []
    with pytest.raises(BrokerBusy, match="full up"):
        wire.check(protocol.HelloReply, request_id, reply, lambda: closed.append(True))
    assert closed == [True]


# -- 2. the frame deadline ---------------------------------------------------------


async def test_a_frame_begun_and_never_finished_is_cut(autojump_clock: trio.abc.Clock) -> None:
    async with serving(frame_timeout=30.0) as broker:
        slow, other = await connect(broker), await connect(broker)
        data = frame(Put(id=5, queue="q", body=b"x" * 100))
        start = trio.current_time()
        await slow.send_raw(data[:20])
        error = await closed_with(slow, "bad_frame")
        assert trio.current_time() - start == pytest.approx(30.0)
        assert "30 s" in error.message
        await assert_served(other)
        assert broker.connections == 1
        assert broker.core.totals()["put_total"] == 0


async def test_a_frame_finished_within_the_deadline_is_served(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with serving(frame_timeout=30.0) as broker:
        peer = await connect(broker)
        data = frame(Put(id=5, queue="q", body=b"x" * 100))
        await peer.send_raw(data[:3])  # not even the whole length prefix
        await trio.sleep(20)
        await peer.send_raw(data[3:50])
        await trio.sleep(9.9)
        await peer.send_raw(data[50:])
        reply = await peer.receive()
        assert isinstance(reply, PutReply)
        assert reply.id == 5
        await assert_served(peer)


async def test_dribbling_bytes_does_not_move_the_deadline(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The deadline counts from the frame's first byte, not from the latest."""
    async with serving(frame_timeout=30.0) as broker:
        peer = await connect(broker)
        data = frame(Put(id=5, queue="q", body=b"x" * 100))
        start = trio.current_time()

        async def dribble() -> None:
            for i in range(len(data) - 1):
                await peer.send_raw(data[i : i + 1])
                await trio.sleep(5)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(dribble)
            await closed_with(peer, "bad_frame")
            nursery.cancel_scope.cancel()
        assert trio.current_time() - start == pytest.approx(30.0)
        assert broker.connections == 0


async def test_frames_streamed_across_reads_are_never_cut(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A client that keeps sending, with a frame always half-received at
    each pause, is served for as long as it goes on (no frame takes long)."""
    async with serving(frame_timeout=30.0) as broker:
        peer = await connect(broker)
        stream = b"".join(frame(Ping(id=100 + i)) for i in range(40))
        size = len(frame(Ping(id=100)))
        chunk = size * 3 // 2 + 1  # never on a frame boundary for long
        start = trio.current_time()
        for offset in range(0, len(stream), chunk):
            await peer.send_raw(stream[offset : offset + chunk])
            await trio.sleep(20)
        assert trio.current_time() - start > 10 * 30.0
        replies = [await peer.receive() for _ in range(40)]
        assert [r.id for r in replies] == [100 + i for i in range(40)]
        await assert_served(peer)


async def test_an_idle_connection_is_never_timed_out(autojump_clock: trio.abc.Clock) -> None:
    async with serving(frame_timeout=30.0) as broker:
        peer = await connect(broker)
        await assert_served(peer)
        await trio.sleep(10 * 3600)
        await assert_served(peer)
        assert broker.connections == 1


async def test_a_waiting_get_is_not_timed_out(autojump_clock: trio.abc.Clock) -> None:
    async with serving(frame_timeout=30.0) as broker:
        consumer, producer = await connect(broker), await connect(broker)
        await consumer.send(Get(id=9, queue="q"))
        await trio.sleep(3600)
        await producer.call(Put, queue="q", body=b"late")
        reply = await consumer.receive()
        assert isinstance(reply, GetReply)
        assert reply.body == b"late"


@pytest.mark.parametrize("sent", [0, 3, 10])
async def test_a_connection_that_never_says_hello_is_cut(
    autojump_clock: trio.abc.Clock, sent: int
) -> None:
    async with serving(frame_timeout=30.0) as broker:
        other = await connect(broker)
        peer = await connect(broker, greet=False)
        start = trio.current_time()
        await peer.send_raw(frame(Hello(id=1, version=protocol.PROTOCOL_VERSION))[:sent])
        error = await closed_with(peer, "bad_frame")
        assert "hello" in error.message
        assert trio.current_time() - start == pytest.approx(30.0)
        await assert_served(other)


async def test_the_hello_deadline_counts_from_the_connection(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Bytes of a hello do not buy time, and a hello in time is served."""
    async with serving(frame_timeout=30.0) as broker:
        late = await connect(broker, greet=False)
        hello = frame(Hello(id=1, version=protocol.PROTOCOL_VERSION))
        await trio.sleep(29)
        await late.send_raw(hello[:5])
        await closed_with(late, "bad_frame")
        prompt = await connect(broker, greet=False)
        await trio.sleep(29)
        await prompt.send_raw(hello)
        assert isinstance(await prompt.receive(), HelloReply)
        await trio.sleep(3600)
        await assert_served(prompt)


async def test_frame_timeout_off(autojump_clock: trio.abc.Clock) -> None:
    async with serving(frame_timeout=math.inf) as broker:
        peer = await connect(broker, greet=False)
        await trio.sleep(3600)
        await peer.send(Hello(id=1, version=protocol.PROTOCOL_VERSION))
        assert isinstance(await peer.receive(), HelloReply)
        data = frame(Ping(id=2))
        await peer.send_raw(data[:4])
        await trio.sleep(3600)
        await peer.send_raw(data[4:])
        assert isinstance(await peer.receive(), PingReply)
        stats = await peer.call(Stats)
        assert isinstance(stats, StatsReply)
        assert stats.stats["frame_timeout_s"] is None


# -- 3. pipelined requests: backpressure ---------------------------------------------


async def test_a_client_that_floods_without_reading_is_held_up_by_its_socket(
    autojump_clock: trio.abc.Clock,
) -> None:
    capacity = 1024
    async with serving(max_pipelined=10) as broker:
        flooder = await connect(broker, capacity=capacity)
        reply_size = len(protocol.encode_frame(PutReply(id=1000, msg_id=1000)))
        count = 2000
        requests = [Put(id=1000 + i, queue="flood", body=b"x") for i in range(count)]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(flooder.send, *requests)  # blocks: nobody reads the replies
            await trio.sleep(3600)
            # The broker answered what the client's socket buffers hold, no more.
            (conn,) = connection_of(broker)
            answered = broker.core.totals()["put_total"]
            assert answered <= capacity // reply_size + 10 + 1
            assert len(conn.out) <= 10 * reply_size
            assert conn.reader.buffered <= capacity + limits.REPLY_BUFFER
            # Meanwhile another client is served as usual.
            other = await connect(broker)
            await other.call(Put, queue="q", body=b"other")
            got = await other.call(Get, queue="q", timeout=0)
            assert isinstance(got, GetReply)
            assert got.body == b"other"
            assert broker.core.totals()["put_total"] == answered + 1
            # The flooder reads: every reply comes, in order.
            replies = [await flooder.receive() for _ in range(count)]
        assert [r.id for r in replies] == [1000 + i for i in range(count)]
        assert all(isinstance(r, PutReply) for r in replies)
        assert broker.core.queue_stats("flood", 0)["ready"] == count


async def test_big_replies_are_written_before_more_are_made(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Small requests with big replies (peeks of a big message) cannot make
    the broker build up replies it cannot send."""
    size = 512 * 1024
    async with serving(max_message_size=size) as broker:
        producer = await connect(broker)
        assert isinstance(await producer.call(Put, queue="big", body=b"b" * size), PutReply)
        peeker = await connect(broker, capacity=64 * 1024)
        count = 100  # 50 MiB of replies for 3 KiB of requests
        await peeker.send(*(Peek(id=10 + i, queue="big") for i in range(count)))
        await trio.sleep(3600)
        conn = next(c for c in broker._live if isinstance(c.stream, PipeEnd))
        assert conn.reader.buffered  # the later peeks wait, unanswered
        assert len(conn.out) <= limits.REPLY_BUFFER + broker.max_frame_size
        await assert_served(producer)
        replies = [await peeker.receive() for _ in range(count)]
        assert [r.id for r in replies] == [10 + i for i in range(count)]
        assert all(isinstance(r, PeekReply) and len(r.body) == size for r in replies)


@pytest.mark.parametrize("max_pipelined", [1, 7, 1000])
async def test_pipelined_requests_keep_their_order_across_batches(max_pipelined: int) -> None:
    async with serving(max_pipelined=max_pipelined) as broker:
        peer = await connect(broker)
        await peer.send(*(Put(id=100 + i, queue="q", body=b"%d" % i) for i in range(50)))
        await peer.send(*(Get(id=1000 + i, queue="q", timeout=0) for i in range(50)))
        puts = [await peer.receive() for _ in range(50)]
        gets = [await peer.receive() for _ in range(50)]
        assert [r.id for r in puts] == [100 + i for i in range(50)]
        assert [r.body for r in gets if isinstance(r, GetReply)] == [b"%d" % i for i in range(50)]


# -- 4. byte caps ----------------------------------------------------------------------


def make_core(**caps: int) -> BrokerCore:
    return BrokerCore(max_message_size=1000, **caps)


#: What the total cap counts per message beyond its body.
PER_MESSAGE = LIVE_OVERHEAD


def assert_held_adds_up(core: BrokerCore) -> None:
    """``live_bytes`` (what max_total_bytes counts) is every body held, plus
    LIVE_OVERHEAD per message held, over every queue."""
    stats = [core.queue_stats(name, NOW) for name in core.queue_names()]
    held = sum(q["ready"] + q["delayed"] + q["reserved"] + q["buried"] for q in stats)
    body = sum(q["bytes"] for q in stats)
    assert body == core.totals()["bytes"]
    assert core.live_bytes == body + PER_MESSAGE * held


def test_max_queue_bytes_bounds_queues_without_max_bytes_of_their_own() -> None:
    core = make_core(max_queue_bytes=100)
    core.put("q", b"a" * 60, NOW)
    with pytest.raises(QueueFull):
        core.put("q", b"b" * 50, NOW)
    core.put("q", b"c" * 40, NOW)  # exactly full: the queue cap counts bodies only
    assert core.queue_config("q")["max_bytes"] == 100
    # A batch over the cap can never fit: Full at once, not a wait.
    with pytest.raises(Full) as raised:
        core.put_many("other", [b"d" * 60, b"e" * 60], NOW)
    assert not isinstance(raised.value, QueueFull)
    # A queue's own max_bytes wins, larger or smaller.
    core.configure("own", max_bytes=500)
    core.put("own", b"f" * 400, NOW)
    assert core.queue_config("own")["max_bytes"] == 500
    core.configure("own", max_bytes=0)  # back to the broker's default
    with pytest.raises(QueueFull):
        core.put("own", b"g", NOW)
    # Taking messages makes room.
    core.get_nowait("q")
    core.put("q", b"h" * 60, NOW)
    assert_held_adds_up(core)


def test_max_total_bytes_refuses_puts_at_once_over_every_queue() -> None:
    core = make_core(max_total_bytes=3 * PER_MESSAGE + 100)
    core.put("a", b"a" * 60, NOW)
    core.put("b", b"b" * 30, NOW)
    with pytest.raises(Full) as raised:
        core.put("c", b"c" * 20, NOW)
    assert not isinstance(raised.value, QueueFull)  # it does not wait for room
    assert "max_total_bytes" in str(raised.value)
    with pytest.raises(Full):
        core.put_many("c", [b"c" * 5, b"c" * 5], NOW)  # 10 bytes, but two messages
    core.put("c", b"c" * 10, NOW)  # exactly full
    assert core.live_bytes == core.max_total_bytes
    assert core.queue_stats("c", NOW)["put_total"] == 1
    with pytest.raises(Full):
        core.put("c", b"", NOW)  # an empty body still takes room
    # Any queue's consumer makes room for every queue's producers.
    (msg,) = core.get_nowait("a")
    core.put("c", b"c" * 60, NOW)
    # A message handed straight to a waiter is not held: it needs no room.
    waiter = core.wait("w", token=None)
    core.put("w", b"w" * 50, NOW)
    assert waiter.messages[0].body == b"w" * 50
    # Messages that come back are never refused (the cap may be passed then).
    core.undeliver([msg], NOW)
    assert core.live_bytes == 4 * PER_MESSAGE + 160
    assert_held_adds_up(core)
    with pytest.raises(Full):
        core.put("d", b"d", NOW)
    core.delete_queue("c", NOW)  # two messages, 70 bytes
    core.put("d", b"d", NOW)
    assert_held_adds_up(core)


def test_held_bytes_follow_every_way_a_message_goes() -> None:
    core = make_core(max_total_bytes=10_000)
    core.put("q", b"1" * 10, NOW, ttl=5)
    core.put("q", b"2" * 20, NOW, delay=5)
    core.put("q", b"3" * 30, NOW)
    msg = core.reserve_nowait("q", NOW, lease=1, owner="me")
    assert msg is not None
    core.tick(NOW + 6)  # the ttl, the delay and the lease all come due
    assert_held_adds_up(core)
    held = core.reserve_nowait("q", NOW + 6, lease=1, owner="me")
    assert held is not None
    core.bury(held.id, held.attempts)
    core.kick("q", 1, NOW + 6)
    for got in core.get_nowait("q", 10):
        core.undeliver([got], NOW + 6)
    assert_held_adds_up(core)
    core.purge("q")
    assert core.live_bytes == 0
    assert_held_adds_up(core)


def test_a_publish_copy_over_the_caps_is_dropped() -> None:
    core = make_core(max_total_bytes=2 * PER_MESSAGE + 100, max_queue_bytes=80)
    core.subscribe("t", "a")
    core.subscribe("t", "b")
    assert core.publish("t", b"x" * 45, NOW)[0] == 2
    copies, _, _ = core.publish("t", b"y" * 20, NOW)
    assert copies == 0  # over the total for both
    core.get_nowait("b")
    copies, _, _ = core.publish("t", b"z" * 40, NOW)
    assert copies == 1  # a would pass its 80 bytes; b takes it
    assert core.topics.stats()["t"]["dropped_total"] == 3
    assert_held_adds_up(core)


async def test_broker_per_queue_cap_makes_puts_wait_and_total_cap_fails_them(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with serving(max_queue_bytes=300, max_total_bytes=2 * PER_MESSAGE + 500) as broker:
        producer, consumer, other = [await connect(broker) for _ in range(3)]
        assert isinstance(await producer.call(Put, queue="q", body=b"a" * 200), PutReply)
        # The per-queue default: a put waits for room, as on a bounded queue.
        await producer.send(Put(id=50, queue="q", body=b"b" * 200, timeout=None))
        await trio.sleep(3600)
        assert broker.core.queue_stats("q", 0)["putters"] == 1
        got = await consumer.call(Get, queue="q", timeout=0)
        assert isinstance(got, GetReply)
        admitted = await producer.receive()
        assert isinstance(admitted, PutReply)
        assert admitted.id == 50
        # The total: full at once, even for a put that would wait.
        assert isinstance(await other.call(Put, queue="r", body=b"c" * 250), PutReply)
        start = trio.current_time()
        refused = await other.call(Put, queue="s", body=b"d" * 100, timeout=None)
        assert isinstance(refused, Error)
        assert refused.code == "full"
        assert trio.current_time() == start
        # Everyone goes on: a consumer makes room for every queue.
        assert isinstance(await consumer.call(Get, queue="r", timeout=0), GetReply)
        assert isinstance(await other.call(Put, queue="s", body=b"d" * 100), PutReply)
        stats = await other.call(Stats)
        assert isinstance(stats, StatsReply)
        assert stats.stats["max_queue_bytes"] == 300
        assert stats.stats["max_total_bytes"] == 2 * PER_MESSAGE + 500
        assert stats.stats["bytes"] == 300
        assert stats.stats["held_bytes"] == 2 * PER_MESSAGE + 300
        q = await other.call(Stats, queue="never-used")
        assert isinstance(q, StatsReply)
        assert q.stats["max_bytes"] == 300  # the default in force


async def test_publish_over_the_total_is_not_an_error(autojump_clock: trio.abc.Clock) -> None:
    async with serving(max_total_bytes=PER_MESSAGE + 100) as broker:
        peer = await connect(broker)
        await peer.call(Subscribe, topic="t", queue="sub")
        assert (await peer.call(Publish, topic="t", body=b"x" * 80)).copies == 1  # type: ignore[union-attr]
        assert (await peer.call(Publish, topic="t", body=b"x" * 80)).copies == 0  # type: ignore[union-attr]
        await assert_served(peer)


def test_default_total_cap_is_a_gib_or_a_quarter_of_the_ram() -> None:
    ram = limits.physical_memory()
    expected = limits.TOTAL_BYTES_CEILING if ram is None else min(2**30, ram // 4)
    assert limits.default_max_total_bytes() == expected
    assert BrokerConfig(socket_path="/x").max_total_bytes == expected


# -- real brokers: the options and their environment variables -------------------------------


@pytest.fixture
def env_limits(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    settings = {
        "BROKERQ_MAX_CONNECTIONS": "2",
        "BROKERQ_FRAME_TIMEOUT": "0.5",
        "BROKERQ_MAX_PIPELINED": "17",
        "BROKERQ_MAX_QUEUE_BYTES": "600",
        "BROKERQ_MAX_TOTAL_BYTES": "1200",
        "BROKERQ_JOURNAL": "0",
    }
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    return settings


def raw_connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)
    return sock


def raw_replies(sock: socket.socket) -> list[protocol.AnyReply]:
    """Every frame the broker sends until it closes the connection."""
    reader = FrameReader(2**32)
    replies: list[protocol.AnyReply] = []
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            return replies
        reader.feed(data)
        while (payload := reader.next_frame()) is not None:
            replies.append(protocol.decode_reply(payload))


def test_limits_from_the_spawning_environment(socket_path: str, env_limits: dict[str, str]) -> None:
    with brokerq.connect(socket_path) as first:
        stats = first.stats()
        assert stats["max_connections"] == 2
        assert stats["frame_timeout_s"] == 0.5
        assert stats["max_pipelined"] == 17
        assert stats["max_queue_bytes"] == 600
        assert stats["max_total_bytes"] == 1200
        queue = first.queue("q")
        queue.put(b"a" * 500)
        with pytest.raises(brokerq.Full):
            queue.put_nowait(b"b" * 200)  # the queue's default cap: it would wait
        first.queue("r").put(b"c" * 400)
        with pytest.raises(brokerq.Full):
            first.queue("s").put(b"d" * 200)  # the total: at once, no timeout needed

        # A frame begun and left unfinished is cut after 0.5 s; the others go on.
        stalled = raw_connect(socket_path)
        try:
            stalled.sendall(frame(Hello(id=1, version=protocol.PROTOCOL_VERSION)))
            stalled.sendall(frame(Ping(id=2))[:6])
            start = time.monotonic()
            replies = raw_replies(stalled)
            assert 0.4 < time.monotonic() - start < 5
        finally:
            stalled.close()
        assert isinstance(replies[0], HelloReply)
        assert isinstance(replies[1], Error)
        assert replies[1].code == "bad_frame"
        assert queue.get(timeout=5) == b"a" * 500

        # Two connections are served (first's, and second's); a third is busy.
        with brokerq.connect(socket_path) as second:
            wait_until(lambda: first.stats()["connections"] == 2, what="two connections")
            start = time.monotonic()
            with pytest.raises(brokerq.BrokerBusy, match="max-connections"):
                brokerq.connect(socket_path, timeout=5)
            assert time.monotonic() - start < 2
            assert second.queue("r").get(timeout=5) == b"c" * 400
        wait_until(lambda: first.stats()["connections"] == 1, what="the second to close")
        with brokerq.connect(socket_path) as third:
            third.ping()
        assert first.stats()["busy_total"] == 1


def test_limits_on_the_command_line(socket_path: str, procs: Procs) -> None:
    proc = procs(
        [
            str(BIN / "local-queue-broker"),
            socket_path,
            "--no-journal",
            "--max-connections",
            "5",
            "--frame-timeout",
            "0",
            "--max-pipelined",
            "3",
            "--max-queue-bytes",
            "0",
            "--max-total-bytes",
            "0",
        ]
    )
    wait_until(lambda: os.path.exists(socket_path), what="the broker to listen")
    with brokerq.connect(socket_path) as client:
        stats = client.stats()
        assert stats["pid"] == proc.pid
        assert stats["max_connections"] == 5
        assert stats["frame_timeout_s"] is None
        assert stats["max_pipelined"] == 3
        assert stats["max_queue_bytes"] == 0
        assert stats["max_total_bytes"] == 0
        assert client.queue("q").stats()["max_bytes"] == 0
        # Pipelined past --max-pipelined: all answered, in order.
        sock = raw_connect(socket_path)
        try:
            out = frame(Hello(id=1, version=protocol.PROTOCOL_VERSION))
            out += b"".join(frame(Ping(id=10 + i)) for i in range(50))
            sock.sendall(out)
            sock.shutdown(socket.SHUT_WR)
            replies = raw_replies(sock)
        finally:
            sock.close()
        assert [r.id for r in replies] == [1, *range(10, 60)]
        client.stop()
    assert proc.wait(timeout=10) == 0


def test_broker_help_lists_every_limit() -> None:
    result = subprocess.run(
        [str(BIN / "local-queue-broker"), "--help"],
        capture_output=True,
        timeout=30,
        check=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    text = result.stdout.decode()
    for option in (
        "--max-connections",
        "--frame-timeout",
        "--max-pipelined",
        "--max-queue-bytes",
        "--max-total-bytes",
    ):
        assert option in text
