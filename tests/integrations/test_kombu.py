"""kombu on brokerq (brokerq.kombu), against a real broker in a temp socket dir:
kombu's own usage patterns, and what brokerq guarantees under them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import Procs, gone, read_line, wait_until
from extras import require

import brokerq

kombu = require("kombu", "kombu")
from kombu import Connection, Consumer, Exchange, Producer, Queue  # noqa: E402

import brokerq.kombu  # noqa: E402  (registers "brokerq://")


@pytest.fixture
def url(socket_path: str) -> str:
    return "brokerq://" + socket_path  # brokerq:///tmp/bq.../b.sock


@pytest.fixture
def conn(url: str) -> Iterator[Any]:
    with Connection(url) as c:
        yield c


def drain(conn: Any, queues: list[Any], n: int, *, no_ack: bool = False, **qos: int) -> list[Any]:
    """``n`` messages taken with a Consumer and drain_events, not acked."""
    got: list[Any] = []
    with Consumer(conn, queues, callbacks=[lambda body, m: got.append(m)], no_ack=no_ack) as c:
        if qos:
            c.qos(**qos)
        while len(got) < n:
            conn.drain_events(timeout=10)
    return got


def nothing_comes(conn: Any, queues: list[Any], wait: float = 0.3) -> bool:
    got: list[Any] = []
    with Consumer(conn, queues, callbacks=[lambda body, m: got.append(m)]):
        try:
            conn.drain_events(timeout=wait)
        except TimeoutError:
            return not got
    return False


def test_producer_and_consumer_with_drain_events(conn: Any, observer: brokerq.Client) -> None:
    exchange = Exchange("jobs", type="direct")
    jobs = Queue("jobs", exchange, routing_key="jobs")
    Producer(conn).publish({"n": 1}, exchange=exchange, routing_key="jobs", declare=[jobs])
    (message,) = drain(conn, [jobs], 1)
    assert message.payload == {"n": 1}
    assert observer.queue("jobs").stats()["reserved"] == 1  # reserved, not taken
    message.ack()
    stats = observer.queue("jobs").stats()
    assert (stats["ready"], stats["reserved"]) == (0, 0)


def test_simple_queue_and_simple_buffer(conn: Any, observer: brokerq.Client) -> None:
    q = conn.SimpleQueue("simple")
    q.put("one")
    q.put("two")
    first = q.get(timeout=5)
    assert first.payload == "one"
    first.ack()
    assert q.get_nowait().payload == "two"  # (unacked: released when the channel closes)
    with pytest.raises(q.Empty):
        q.get(timeout=0.2)
    q.close()
    assert observer.queue("simple").stats()["reserved"] == 1

    buffer = conn.SimpleBuffer("buffer")  # no acks: gone as it is taken
    buffer.put("x")
    assert buffer.get(timeout=5).payload == "x"
    assert observer.queue("buffer").stats()["reserved"] == 0
    assert observer.queue("buffer").qsize() == 0
    buffer.close()


def test_reject_buries_requeue_releases(conn: Any, observer: brokerq.Client) -> None:
    q = conn.SimpleQueue("verbs")
    q.put("a")
    m = q.get(timeout=5)
    assert not m.delivery_info.get("redelivered")
    m.requeue()
    again = q.get(timeout=5)
    assert again.payload == "a"
    assert again.delivery_info["redelivered"]
    assert again.delivery_tag != m.delivery_tag  # a delivery, a tag
    again.reject()  # requeue=False: buried, kept
    assert observer.queue("verbs").stats()["buried"] == 1
    with pytest.raises(q.Empty):
        q.get(timeout=0.2)
    assert observer.queue("verbs").kick() == 1  # brokerq kick brings it back
    back = q.get(timeout=5)
    assert back.payload == "a"
    back.reject(requeue=True)
    q.get(timeout=5).ack()
    assert observer.queue("verbs").stats()["ready"] == 0
    q.close()


def test_a_closed_connection_releases_what_it_did_not_ack(url: str) -> None:
    with Connection(url) as first:
        first.SimpleQueue("held").put("kept")
        held = first.SimpleQueue("held").get(timeout=5)
        assert held.payload == "kept"
    with Connection(url) as second:  # nothing put again: the same message, released
        m = second.SimpleQueue("held").get(timeout=5)
        assert (m.payload, m.delivery_info["redelivered"]) == ("kept", True)
        m.ack()
        with pytest.raises(second.SimpleQueue("held").Empty):
            second.SimpleQueue("held").get(timeout=0.2)


def test_direct_exchange_routes_by_key(conn: Any) -> None:
    exchange = Exchange("direct-x", type="direct")
    red = Queue("red", exchange, routing_key="red")
    blue = Queue("blue", exchange, routing_key="blue")
    producer = Producer(conn, exchange=exchange)
    for q in (red, blue):
        q(conn.default_channel).declare()
    producer.publish("to red", routing_key="red")
    producer.publish("to blue", routing_key="blue")
    producer.publish("to nobody", routing_key="green")
    assert [m.payload for m in drain(conn, [red], 1, no_ack=True)] == ["to red"]
    assert [m.payload for m in drain(conn, [blue], 1, no_ack=True)] == ["to blue"]
    assert nothing_comes(conn, [red, blue])
    conn.default_channel.queue_unbind("red", "direct-x", "red")  # unsubscribed
    conn.default_channel.queue_delete("blue")  # its subscription goes with it
    producer.publish("to red again", routing_key="red")
    producer.publish("to blue again", routing_key="blue")
    assert nothing_comes(conn, [red, blue])


def test_topic_exchange_one_copy_per_matching_queue(url: str, conn: Any) -> None:
    exchange = Exchange("topic-x", type="topic")
    orders = Queue("orders", exchange, routing_key="orders.*")
    europe = Queue("europe", exchange, routing_key="#.eu")
    everything = Queue("everything", exchange, routing_key="#")
    for q in (orders, europe, everything):
        q(conn.default_channel).declare()
    # Bound twice by matching patterns: still one copy.
    conn.default_channel.queue_bind("everything", "topic-x", "orders.#")
    with Connection(url) as producer_conn:  # another connection: bindings from the broker
        producer = Producer(producer_conn, exchange=Exchange("topic-x", type="topic"))
        producer.publish("o-eu", routing_key="orders.eu")
        producer.publish("s-us", routing_key="shipping.us")
    assert [m.payload for m in drain(conn, [orders], 1)] == ["o-eu"]
    assert [m.payload for m in drain(conn, [europe], 1)] == ["o-eu"]
    assert sorted(m.payload for m in drain(conn, [everything], 2)) == ["o-eu", "s-us"]
    assert nothing_comes(conn, [orders, europe, everything])


FANOUT_CONSUMER = textwrap.dedent(
    """
    import sys
    import kombu
    import brokerq.kombu
    url, name = sys.argv[1:]
    exchange = kombu.Exchange("news", type="fanout")
    with kombu.Connection(url) as conn:
        q = conn.SimpleQueue(kombu.Queue(name, exchange))
        print("ready", flush=True)
        m = q.get(timeout=30)
        print(m.payload, flush=True)
        m.ack()
        q.close()
    """
)


def test_fanout_reaches_every_process(url: str, conn: Any, procs: Procs) -> None:
    exchange = Exchange("news", type="fanout")
    mine = Queue("news-here", exchange)
    mine(conn.default_channel).declare()
    other = procs([sys.executable, "-c", FANOUT_CONSUMER, url, "news-there"])
    assert read_line(other, timeout=30) == b"ready\n"
    Producer(conn, exchange=exchange).publish("extra!")
    assert [m.payload for m in drain(conn, [mine], 1)] == ["extra!"]
    assert read_line(other, timeout=30) == b"extra!\n"
    assert other.wait(timeout=30) == 0


def test_priorities_higher_first(conn: Any) -> None:
    q = Queue("prio", max_priority=5)
    q(conn.default_channel).declare()
    producer = Producer(conn)
    for body, priority in (("low", 0), ("high", 9), ("mid", 3), ("top", 5)):
        producer.publish(body, routing_key="prio", priority=priority)
    # x-max-priority 5 clamps 9 to 5: "high" and "top" are equal, put in that order.
    got = [m.payload for m in drain(conn, [q], 4, no_ack=True)]
    assert got == ["high", "top", "mid", "low"]


def test_per_message_and_queue_ttl(conn: Any, observer: brokerq.Client) -> None:
    producer = Producer(conn)
    short = Queue("short-lived", message_ttl=0.2)
    short(conn.default_channel).declare()
    plain = Queue("plain")
    plain(conn.default_channel).declare()
    producer.publish("gone", routing_key="short-lived")
    producer.publish("gone too", routing_key="plain", expiration=0.2)
    producer.publish("stays", routing_key="plain")
    wait_until(lambda: observer.queue("short-lived").qsize() == 0, what="the queue's ttl")
    wait_until(lambda: observer.queue("plain").qsize() == 1, what="the message's ttl")
    assert [m.payload for m in drain(conn, [plain], 1, no_ack=True)] == ["stays"]


HANGING_CONSUMER = textwrap.dedent(
    """
    import sys, time
    import kombu
    import brokerq.kombu
    url, name = sys.argv[1:]
    with kombu.Connection(url) as conn:
        got = []
        consumer = kombu.Consumer(conn, [kombu.Queue(name)], callbacks=[lambda b, m: got.append(b)])
        consumer.qos(prefetch_count=1)
        consumer.consume()
        conn.drain_events(timeout=30)
        print("got", got[0], flush=True)
        time.sleep(60)  # a task that never ends, its message unacked
    """
)


def test_a_killed_consumer_s_message_is_redelivered(
    url: str, conn: Any, procs: Procs, observer: brokerq.Client
) -> None:
    q = conn.SimpleQueue("work")
    for i in range(5):
        q.put(i)
    victim = procs([sys.executable, "-c", HANGING_CONSUMER, url, "work"])
    line = read_line(victim, timeout=30).split()
    assert line[0] == b"got"
    assert observer.queue("work").stats()["reserved"] == 1
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=10)
    got = []
    for _ in range(5):
        m = q.get(timeout=10)
        got.append(m.payload)
        if m.payload == int(line[1]):
            assert m.delivery_info["redelivered"]
        m.ack()
    assert sorted(got) == [0, 1, 2, 3, 4]  # none lost, none twice
    with pytest.raises(q.Empty):
        q.get(timeout=0.2)
    q.close()


def test_a_hung_consumer_s_lease_runs_out_after_the_visibility_timeout(url: str) -> None:
    """A consumer still connected but stuck keeps its message until the
    lease (``visibility_timeout``) runs out; then another consumer gets it."""
    options = {"visibility_timeout": 0.5}
    with Connection(url, transport_options=options) as hung, Connection(url) as other:
        q = hung.SimpleQueue("stuck")
        q.put("task")
        assert q.get(timeout=5).payload == "task"  # never acked
        m = other.SimpleQueue("stuck").get(timeout=10)
        assert (m.payload, m.delivery_info["redelivered"]) == ("task", True)
        m.ack()


def test_the_hub_renews_its_leases_while_it_runs(url: str) -> None:
    """A worker whose loop runs keeps its unacked message past the
    visibility timeout (a long task, an ETA); stopped, it loses it."""
    from kombu.asynchronous import Hub

    hub = Hub()
    got: list[Any] = []
    options = {"visibility_timeout": 0.4}
    with Connection(url, transport_options=options) as worker, Connection(url) as other:
        try:
            worker.register_with_event_loop(hub)
            q = Queue("long")
            with Consumer(worker, [q], callbacks=[lambda body, m: got.append(m)]) as consumer:
                consumer.qos(prefetch_count=1)  # (no reserve waits once it holds one)
                Producer(worker).publish("eta", routing_key="long", declare=[q])
                end = time.monotonic() + 1.5  # over three visibility timeouts
                while time.monotonic() < end:
                    hub.run_once()
                assert [m.payload for m in got] == ["eta"]
                assert nothing_comes(other, [q], wait=0.1)  # still the worker's
                m = other.SimpleQueue("long").get(timeout=10)  # the loop stopped
                assert (m.payload, m.delivery_info["redelivered"]) == ("eta", True)
                m.ack()
        finally:
            hub.close()


def test_prefetch_count_bounds_the_unacked(conn: Any, observer: brokerq.Client) -> None:
    q = Queue("bounded")
    q(conn.default_channel).declare()
    producer = Producer(conn)
    for i in range(5):
        producer.publish(i, routing_key="bounded")
    got: list[Any] = []
    with Consumer(conn, [q], callbacks=[lambda body, m: got.append(m)]) as consumer:
        consumer.qos(prefetch_count=2)
        conn.drain_events(timeout=5)
        conn.drain_events(timeout=5)
        with pytest.raises(TimeoutError):
            conn.drain_events(timeout=0.3)
        assert len(got) == 2
        stats = observer.queue("bounded").stats()
        assert (stats["reserved"], stats["ready"]) == (2, 3)
        got[0].ack()
        conn.drain_events(timeout=5)
        assert len(got) == 3
        assert observer.queue("bounded").stats()["reserved"] == 2
        for m in got[1:]:
            m.ack()


def test_the_broker_stopped_mid_consume_is_reconnected_to(
    url: str, conn: Any, socket_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    q = conn.SimpleQueue("survivor")
    q.put("before")
    held = q.get(timeout=5)  # unacked when the broker stops
    with brokerq.connect(socket_path) as client:
        pid = client.broker_pid
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: gone(pid), what="the broker's exit")
    conn.ensure_connection(max_retries=3)  # kombu's retry path
    held.ack()  # too late: its lease ended with the broker; said in the log, not raised
    assert "delivered again" in caplog.text
    q.put("after")  # a new broker, spawned
    got = []
    for _ in range(2):
        m = q.get(timeout=10)
        got.append((m.payload, m.delivery_info["redelivered"]))
        m.ack()
    # "before" was kept in the journal, and is delivered again: at least once.
    assert sorted(got) == [("after", False), ("before", True)]
    with brokerq.connect(socket_path) as client:
        assert client.broker_pid != pid
    q.close()


def test_the_hub_waits_on_the_socket(conn: Any, socket_path: str) -> None:
    """kombu's event loop (a Celery worker's): the waiting socket is
    registered with the hub; a broker that stops meanwhile is replaced."""
    from kombu.asynchronous import Hub

    hub = Hub()
    got: list[Any] = []
    q = Queue("hubbed")

    def run_until(n: int) -> None:
        deadline = time.monotonic() + 10
        while len(got) < n and time.monotonic() < deadline:
            hub.run_once()

    try:
        conn.register_with_event_loop(hub)
        with Consumer(conn, [q], callbacks=[lambda body, m: got.append(m)]):
            Producer(conn).publish("via the hub", routing_key="hubbed", declare=[q])
            run_until(1)
            assert [m.payload for m in got] == ["via the hub"]
            got[0].ack()
            with brokerq.connect(socket_path) as client:
                pid = client.broker_pid
            os.kill(pid, signal.SIGTERM)
            wait_until(lambda: gone(pid), what="the broker's exit")
            Producer(conn).publish("after a restart", routing_key="hubbed")
            run_until(2)
            assert [m.payload for m in got] == ["via the hub", "after a restart"]
            got[1].ack()
    finally:
        hub.close()


def test_a_channel_given_room_by_an_ack_is_waited_on_at_once(url: str) -> None:
    """A channel at its prefetch_count leaves the wait; the ack that makes
    room starts its own wait at once, not after another channel's parked
    request (here bound to 60 s) comes back: each consuming channel has its
    own poller (a Celery prefork worker stalled a second at a time without)."""
    from kombu.asynchronous import Hub

    hub = Hub()
    got: list[Any] = []
    tasks, control = Queue("tasks"), Queue("control")

    def run_until(n: int) -> None:
        deadline = time.monotonic() + 10
        while len(got) < n and time.monotonic() < deadline:
            hub.run_once()
        assert len(got) >= n, f"{len(got)} of {n} messages within 10 s"

    with Connection(url, transport_options={"wait_bound": 60}) as conn:
        try:
            conn.register_with_event_loop(hub)
            Producer(conn).publish("one", routing_key="tasks", declare=[tasks, control])
            Producer(conn).publish("two", routing_key="tasks")
            with (
                Consumer(conn.channel(), [tasks], callbacks=[lambda b, m: got.append(m)]) as a,
                Consumer(conn.channel(), [control], callbacks=[lambda b, m: got.append(m)]),
            ):
                a.qos(prefetch_count=1)
                run_until(1)
                for _ in range(3):  # the control channel's request parks meanwhile
                    hub.run_once()
                assert len(got) == 1
                got[0].ack()
                run_until(2)
                assert [m.payload for m in got] == ["one", "two"]
                got[1].ack()
        finally:
            hub.close()


def test_urls_and_the_transport_path(socket_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROKERQ_SOCKET", socket_path)  # "brokerq://": brokerq's default socket
    with Connection("brokerq://") as c:
        c.SimpleQueue("named").put("x")
    with brokerq.connect(socket_path) as client:
        assert client.queue("named").qsize() == 1
    script = (
        "import kombu, sys\n"
        "with kombu.Connection(transport='brokerq.kombu:Transport') as c:\n"
        "    q = c.SimpleQueue('named'); m = q.get(timeout=10); print(m.payload); m.ack()\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, timeout=60, check=False
    )
    assert out.stdout == b"x\n", out.stderr.decode()


def test_basic_get_gives_a_body_not_put_by_kombu_as_its_bytes(
    conn: Any, observer: brokerq.Client
) -> None:
    """As every other way in: ``brokerq put``'s body, not kombu's JSON, is raw bytes."""
    channel = conn.default_channel
    for no_ack in (True, False):
        observer.queue("rawget").put(b"raw bytes")
        message = channel.basic_get("rawget", no_ack=no_ack)
        assert message is not None
        assert message.body == b"raw bytes"
        if not no_ack:
            message.ack()
    assert observer.queue("rawget").qsize() == 0


def test_one_wait_on_all_the_consumed_queues(conn: Any, observer: brokerq.Client) -> None:
    """A consumer of several queues waits on all of them with one request
    parked in the broker (a waiter in each queue's line), not by polling."""
    queues = [Queue(name) for name in ("first", "second", "third")]
    got: list[Any] = []
    errors: list[BaseException] = []

    def consume() -> None:
        try:
            conn.drain_events(timeout=20)
        except BaseException as exc:
            errors.append(exc)

    with Consumer(conn, queues, callbacks=[lambda body, m: got.append(m)]):
        waiter = threading.Thread(target=consume)
        waiter.start()
        try:
            wait_until(
                lambda: all(observer.queue(q.name).stats()["waiters"] == 1 for q in queues),
                what="a waiter on each queue",
            )
            observer.queue("third").put(b"raw bytes")  # not kombu's: its body, as bytes
        finally:
            waiter.join(timeout=30)
    assert not errors
    assert not waiter.is_alive()
    assert [(m.delivery_info["routing_key"], m.body) for m in got] == [("third", b"raw bytes")]
    got[0].ack()


def test_an_auto_delete_queue_goes_with_its_consumer(url: str, observer: brokerq.Client) -> None:
    exchange = Exchange("replies", type="direct")
    with Connection(url) as conn:
        q = Queue("reply-1", exchange, routing_key="reply-1", auto_delete=True)
        with Consumer(conn, [q]):
            assert "reply-1" in str(observer.stats()["topics"])
    assert "reply-1" not in str(observer.stats()["topics"])  # the binding went with it


def test_topic_names_and_matching() -> None:
    from brokerq.kombu import routing

    # (exchange, key) pairs that join to the same text get distinct topics
    assert routing.direct_topic("a.b", "c") != routing.direct_topic("a", "b.c")
    odd = "x:y%z\n"
    assert routing.unescape(routing.escape(odd)) == odd
    assert ":" not in routing.direct_topic(odd, odd)
    assert routing.fanout_topic(odd).isprintable()
    pattern = routing.pattern_of(routing.topic_binding("ex", "a.*"), "ex")
    assert pattern == "a.*"
    assert routing.pattern_of(routing.topic_binding("ex2", "a.*"), "ex") is None
    cases = {
        ("a.*", "a.b"): True,
        ("a.*", "a.b.c"): False,
        ("a.#", "a"): True,
        ("a.#", "a.b.c"): True,
        ("#.c", "a.b.c"): True,
        ("#", ""): True,
        ("*.b.#", "a.b"): True,
        ("*", "a.b"): False,
        ("a.b", "a.b"): True,
    }
    for (pattern, key), expected in cases.items():
        assert routing.matches(pattern, key) is expected, (pattern, key)
