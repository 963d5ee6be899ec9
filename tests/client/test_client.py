"""The blocking client against a real broker: API contract, threads, fork."""

from __future__ import annotations

import math
import os
import queue as stdlib_queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import wait_until

import brokerq
from brokerq.testing import private_broker


@pytest.fixture
def client(socket_path: str) -> Iterator[brokerq.Client]:
    with brokerq.connect(socket_path) as c:
        yield c


def test_round_trip_bytes_and_str(client: brokerq.Client) -> None:
    q = client.queue("q")
    first = q.put(b"\x00binary\xff")
    second = q.put("text é")
    assert second > first
    assert q.get(timeout=1) == b"\x00binary\xff"
    assert q.get_nowait() == "text é".encode()


def test_empty_is_a_stdlib_queue_empty(client: brokerq.Client) -> None:
    q = client.queue("q")
    with pytest.raises(stdlib_queue.Empty):
        q.get_nowait()
    start = time.monotonic()
    with pytest.raises(brokerq.Empty):
        q.get(timeout=0.2)
    assert time.monotonic() - start >= 0.19
    with pytest.raises(brokerq.Empty):
        q.peek()
    with pytest.raises(brokerq.Empty):
        q.get_many(5, timeout=0)


def test_bad_arguments_raise_typed_errors(client: brokerq.Client) -> None:
    q = client.queue("q")
    with pytest.raises(brokerq.InvalidRequest):
        q.get(timeout=-1)
    with pytest.raises(brokerq.InvalidRequest):
        q.get_many(0)
    with pytest.raises(brokerq.InvalidRequest):
        q.put(12)  # type: ignore[arg-type]
    with pytest.raises(brokerq.InvalidRequest):
        client.queue("")
    with pytest.raises(brokerq.InvalidRequest):
        client.queue("q:dead").put(b"x")
    assert q.put(b"still fine")


def test_message_too_large_is_refused_before_sending() -> None:
    with private_broker(max_message_size=100) as client:
        q = client.queue("q")
        with pytest.raises(brokerq.MessageTooLarge):
            q.put(b"x" * 101)
        with pytest.raises(brokerq.MessageTooLarge):
            q.put_many([b"ok"] * 50 + [b"x" * 101])  # no chunk of it is sent
        q.put(b"x" * 100)
        assert q.stats()["ready"] == 1


def test_put_many_splits_into_frames_that_fit() -> None:
    with private_broker(max_message_size=1000) as client:
        q = client.queue("q")
        bodies = [b"%04d" % i + b"x" * 296 for i in range(50)]  # 15 kB in all
        ids = q.put_many(bodies)
        assert len(ids) == 50
        assert ids == sorted(ids)
        got: list[bytes] = []
        while len(got) < 50:
            got += q.get_many(50, timeout=1)
        assert got == bodies


def test_get_many_waits_for_the_first_only(client: brokerq.Client) -> None:
    q = client.queue("q")
    q.put_many([b"1", b"2", b"3"])
    assert q.get_many(2, timeout=0) == [b"1", b"2"]
    assert q.get_many(10, timeout=1) == [b"3"]


def test_inspection(client: brokerq.Client) -> None:
    q = client.queue("q")
    q.put(b"head")
    q.put(b"tail")
    assert q.peek() == b"head"
    assert q.qsize() == 2
    assert not q.empty()
    stats = q.stats()
    assert (stats["name"], stats["ready"], stats["bytes"]) == ("q", 2, 8)
    assert client.queues() == ["q"]
    assert q.purge() == 2
    assert q.empty()
    assert client.stats()["pid"] == client.broker_pid
    assert client.ping() > 0


def test_queue_without_client_uses_the_shared_default(socket_path: str) -> None:
    q = brokerq.Queue("q", socket=socket_path)
    q.put(b"x")
    assert brokerq.Queue("q", socket=socket_path).client is q.client
    assert q.get(timeout=1) == b"x"
    q.client.close()


def test_default_socket_from_the_environment(
    socket_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BROKERQ_SOCKET", socket_path)
    with brokerq.connect() as client:
        assert client.socket_path == socket_path


def test_a_blocked_get_does_not_hold_up_other_threads(client: brokerq.Client) -> None:
    q = client.queue("q")
    results: list[bytes] = []
    consumer = threading.Thread(target=lambda: results.append(q.get(timeout=10)))
    consumer.start()
    deadline = time.monotonic() + 5
    while q.stats()["waiters"] != 1:  # this thread's own connection answers meanwhile
        assert time.monotonic() < deadline
        time.sleep(0.005)
    q.put(b"from another thread")
    consumer.join(timeout=10)
    assert results == [b"from another thread"]


def test_many_threads_share_one_client(client: brokerq.Client) -> None:
    q = client.queue("q")

    def produce(t: int) -> None:
        for i in range(50):
            q.put(b"%d-%d" % (t, i))

    threads = [threading.Thread(target=produce, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    got = set(q.get_many(1000, timeout=1))
    while len(got) < 400:
        got |= set(q.get_many(1000, timeout=1))
    assert got == {b"%d-%d" % (t, i) for t in range(8) for i in range(50)}


def test_forked_child_opens_its_own_connection(client: brokerq.Client) -> None:
    q = client.queue("q")
    q.put(b"before fork")
    parent_conn = client.connection()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit code
        code = 1
        try:
            conn = client.connection()
            ok = conn is not parent_conn and q.get(timeout=5) == b"before fork"
            q.put(b"from child")
            code = 0 if ok else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # The parent's connection was not disturbed by the child.
    assert client.connection() is parent_conn
    assert q.get(timeout=5) == b"from child"


def test_closed_client_raises(socket_path: str) -> None:
    client = brokerq.connect(socket_path)
    client.close()
    with pytest.raises(brokerq.BrokerqError, match="closed"):
        client.queue("q").put(b"x")


def test_a_put_after_the_broker_went_is_retried_on_a_new_one(socket_path: str) -> None:
    client = brokerq.connect(socket_path)
    q = client.queue("q")
    q.put(b"x")
    first = client.broker_pid
    other = brokerq.connect(socket_path)
    assert other.stop()
    # The connection to the stopped broker is gone; the put reconnects,
    # which starts a new broker, and the journal kept "x".
    q.put(b"y")
    assert client.broker_pid != first
    assert q.get_many(5, timeout=1) == [b"x", b"y"]
    client.close()
    other.close()


def test_stop_without_a_broker_returns_false(socket_path: str) -> None:
    client = brokerq.Client(socket_path, timeout=2)
    start = time.monotonic()
    assert client.stop() is False
    assert time.monotonic() - start < 1
    assert not os.path.exists(socket_path)


def test_connect_timeout_when_the_broker_is_stopped(socket_path: str) -> None:
    import signal

    first = brokerq.connect(socket_path)
    pid = first.broker_pid
    os.kill(pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        with pytest.raises(brokerq.BrokerUnavailable):
            brokerq.connect(socket_path, timeout=0.5)
        assert time.monotonic() - start < 3
    except BaseException:
        os.kill(pid, signal.SIGCONT)
        raise
    client = brokerq.Client(socket_path, timeout=0.5)
    try:
        with pytest.raises(brokerq.BrokerUnavailable):
            client.stop()  # a broker that holds its lock is not "not running"
    finally:
        os.kill(pid, signal.SIGCONT)
    # No second broker was started.
    assert first.ping() > 0
    assert first.broker_pid == pid
    first.close()


def test_priority_delay_and_ttl(client: brokerq.Client) -> None:
    q = client.queue("q")
    q.put(b"low", priority=-1)
    q.put_many([b"a", b"b"])
    q.put(b"urgent", priority=10)
    q.put(b"later", delay=1.0)
    q.put(b"brief", ttl=0.05)
    wait_until(lambda: q.stats()["expired_total"] == 1, what="the broker to drop the ttl'd one")
    assert q.get_many(10, timeout=0) == [b"urgent", b"a", b"b", b"low"]
    assert q.get(timeout=5) == b"later"
    assert q.stats()["expired_total"] == 1
    with pytest.raises(brokerq.InvalidRequest):
        q.put(b"x", delay=-1)


def test_a_bounded_queue(client: brokerq.Client) -> None:
    import queue as stdlib_queue

    q = client.queue("bounded", maxsize=2)
    assert q.stats()["maxsize"] == 2
    q.put(b"1")
    q.put_nowait(b"2")
    with pytest.raises(stdlib_queue.Full):
        q.put_nowait(b"3")
    start = time.monotonic()
    with pytest.raises(brokerq.Full):
        q.put(b"3", timeout=0.2)
    assert time.monotonic() - start >= 0.19
    threading.Timer(0.2, lambda: client.queue("bounded").get(timeout=5)).start()
    q.put(b"3", timeout=5)  # blocks until the timer's get makes room
    assert q.get_many(5, timeout=1) == [b"2", b"3"]


# -- topics ----------------------------------------------------------------------------------------


def topic_stats(client: brokerq.Client, topic: str) -> dict[str, Any]:
    """The broker's stats of ``topic``; {} while nothing subscribes to it."""
    topics: dict[str, dict[str, Any]] = client.stats()["topics"]
    return topics.get(topic, {})


def test_publish_reaches_every_subscriber_in_order(client: brokerq.Client) -> None:
    queues = [client.queue(name) for name in ("a", "b", "c")]
    for q in queues:
        q.subscribe("events")
    q.subscribe("events")  # again: nothing changes
    assert client.publish("events", b"first") == 3
    bodies = [b"m%d" % i for i in range(50)] + ["text é".encode()]
    with client.subscribe("events") as one, client.subscribe("events") as two:
        for body in bodies[:-1]:
            assert client.publish("events", body) == 5
        assert client.publish("events", "text é") == 5  # str is sent as UTF-8
        assert [one.get(timeout=5) for _ in bodies] == bodies
        assert [body for _, body in zip(bodies, two, strict=False)] == bodies  # iteration
        for sub in (one, two):
            with pytest.raises(brokerq.Empty):
                sub.get(timeout=0)
    for q in queues:
        assert q.get_many(100, timeout=1) == [b"first", *bodies]
    # The broker forgets the closed live subscriptions; the queues stay subscribed.
    wait_until(lambda: topic_stats(client, "events")["live"] == 0, what="the live ones to go")
    stats = topic_stats(client, "events")
    assert stats["queues"] == ["a", "b", "c"]
    assert (stats["published_total"], stats["dropped_total"]) == (1 + len(bodies), 0)
    assert client.publish("events", b"last") == 3


def test_a_publish_without_subscribers_goes_nowhere(client: brokerq.Client) -> None:
    assert client.publish("nobody", b"lost") == 0
    assert client.queues() == []
    assert client.stats()["topics"] == {}
    with client.subscribe("nobody") as sub, pytest.raises(brokerq.Empty):
        sub.get(timeout=0.1)  # nothing was kept for it


def test_publish_options_apply_to_every_copy(client: brokerq.Client) -> None:
    q = client.queue("q")
    q.subscribe("events")
    client.publish("events", b"low")
    client.publish("events", b"urgent", priority=5)
    client.publish("events", b"brief", ttl=0.05)
    wait_until(lambda: q.stats()["expired_total"] == 1, what="the broker to drop the ttl'd one")
    assert q.get_many(10, timeout=0) == [b"urgent", b"low"]


def test_a_live_subscription_sees_only_publishes_after_subscribe_returned(
    client: brokerq.Client,
) -> None:
    assert client.publish("events", b"before") == 0
    # A publisher thread runs on while the subscription starts: each publish
    # reached it (count 1) or not (count 0), and it receives exactly those
    # that did, a run without a gap, in order.
    reached: list[tuple[bytes, int]] = []
    subscribed = threading.Event()
    stop = threading.Event()

    def publish() -> None:
        with brokerq.connect(client.socket_path) as publisher:
            i = 0
            while not stop.is_set():
                body = b"p%d" % i
                reached.append((body, publisher.publish("events", body)))
                i += 1
                if subscribed.is_set() and sum(n for _, n in reached) >= 20:
                    stop.set()

    thread = threading.Thread(target=publish)
    thread.start()
    try:
        wait_until(lambda: len(reached) >= 5, what="some publishes before the subscription")
        sub = client.subscribe("events")
        published_before = len(reached)
        subscribed.set()
        thread.join(timeout=20)
    finally:
        stop.set()
        thread.join(timeout=20)
    assert not thread.is_alive()
    with sub:
        expected = [body for body, n in reached if n == 1]
        assert all(n == 1 for _, n in reached[published_before + 1 :])  # after subscribe()
        assert [n for _, n in reached] == sorted(n for _, n in reached)  # 0s, then 1s
        assert [sub.get(timeout=5) for _ in expected] == expected
        with pytest.raises(brokerq.Empty):
            sub.get(timeout=0)


def test_a_durable_subscription_survives_a_broker_kill(socket_path: str) -> None:
    import signal

    from conftest import gone

    with brokerq.connect(socket_path) as client:
        audit = client.queue("audit")
        audit.subscribe("events")
        assert client.publish("events", b"before") == 1
        assert client.publish("events", b"also before") == 1
        assert audit.get(timeout=1) == b"before"
        first = client.broker_pid
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: gone(first), what="the broker to die")
        # The publish reconnects (starting a new broker), which replayed the
        # subscription from the journal.
        assert client.publish("events", b"after") == 1
        assert client.broker_pid != first
        assert audit.get_many(10, timeout=1) == [b"also before", b"after"]
        assert topic_stats(client, "events")["queues"] == ["audit"]


def test_a_slow_live_subscriber_raises_subscriber_overflow(
    socket_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BROKERQ_SUBSCRIBER_BUFFER", str(64 * 1024))  # reaches the spawned broker
    bodies = [b"%04d" % i + b"x" * 1020 for i in range(1000)]  # 1 MiB in all
    with brokerq.connect(socket_path) as client, brokerq.connect(socket_path) as publisher:
        assert client.stats()["subscriber_buffer"] == 64 * 1024
        slow = client.subscribe("events")  # never read while the publishes go on
        fast_got: list[bytes] = []

        def read_fast(fast: brokerq.Subscription) -> None:
            with fast:
                fast_got.extend(fast.get(timeout=20) for _ in bodies)

        reader = threading.Thread(target=read_fast, args=(client.subscribe("events"),))
        reader.start()
        # The publisher is never held up by the slow one: every publish is
        # answered at once, and the slow subscriber stops counting once dropped.
        counts = [publisher.publish("events", body) for body in bodies]
        reader.join(timeout=30)
        assert not reader.is_alive()
        assert fast_got == bodies
        assert counts[0] == 2
        assert counts[-1] == 1
        assert counts == sorted(counts, reverse=True)

        # Its first read drains what the socket held; the broker then sends
        # the rest of what it was writing, and the overflow error, and closes
        # the connection: all of that waits unread before the next reads.
        got = [slow.get(timeout=10)]
        wait_until(lambda: client.stats()["connections"] == 2, what="the broker to drop it")
        with pytest.raises(brokerq.SubscriberOverflow, match="behind"):  # noqa: PT012
            while True:
                got.append(slow.get(timeout=10))
        assert 0 < len(got) < len(bodies)
        assert got == bodies[: len(got)]  # what came before the drop, in order
        with pytest.raises(brokerq.BrokerqError, match="'events' was dropped by the broker"):
            slow.get(timeout=0)  # dropped: nothing more comes, and it does not reconnect
        slow.close()
        assert topic_stats(client, "events") == {}


def test_what_came_before_an_overflow_is_read_before_it_raises(
    socket_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large publishes, then the subscriber reads: every body sent before the
    broker dropped it comes first, in order (the last may have been cut off
    half-way, in the same read as the error), then SubscriberOverflow."""
    # Room for a few 40 KiB publishes, so that what is in flight when the
    # subscriber is dropped fits in its socket once it reads.
    monkeypatch.setenv("BROKERQ_SUBSCRIBER_BUFFER", str(256 * 1024))
    bodies = [b"%04d" % i + b"x" * (40 * 1024) for i in range(100)]  # 4 MiB in all
    with brokerq.connect(socket_path) as client:
        slow = client.subscribe("events")
        counts = [client.publish("events", bodies[0])]
        # The feed's writer has run once: when it runs next is up to trio's
        # scheduler (it waits for the publisher's connection to yield, seen
        # to take 7 publishes), which decides how much more is sent.
        got = [slow.get(timeout=10)]
        counts += [client.publish("events", body) for body in bodies[1:]]
        assert counts[0] == 1
        assert counts[-1] == 0  # dropped, so no longer counted
        with pytest.raises(brokerq.SubscriberOverflow):  # noqa: PT012
            while True:
                got.append(slow.get(timeout=10))
        assert got == bodies[: len(got)]
        assert sum(counts) >= len(got)
        wait_until(lambda: client.stats()["connections"] == 1, what="the broker to drop it")
        with pytest.raises(brokerq.BrokerqError, match="dropped by the broker"):
            slow.get(timeout=0)


def test_a_live_subscription_comes_back_after_the_broker_is_killed(socket_path: str) -> None:
    import signal

    from conftest import gone

    with brokerq.connect(socket_path) as client, client.subscribe("events") as sub:
        assert client.publish("events", b"one") == 1
        assert sub.get(timeout=5) == b"one"
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(sub.get(timeout=20)))
        reader.start()
        first = client.broker_pid
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: gone(first), what="the broker to die")
        # The waiting get reconnects by itself (starting a new broker, or
        # finding the one this client's stats start) and subscribes again.
        wait_until(
            lambda: topic_stats(client, "events").get("live") == 1,
            what="the subscription to come back",
        )
        assert client.broker_pid != first
        assert client.publish("events", b"two") == 1
        reader.join(timeout=20)
        assert got == [b"two"]


def test_subscription_get_timeouts(client: brokerq.Client) -> None:
    with client.subscribe("events") as sub:
        with pytest.raises(stdlib_queue.Empty):
            sub.get(timeout=0)
        start = time.monotonic()
        with pytest.raises(brokerq.Empty):
            sub.get(timeout=0.2)
        assert time.monotonic() - start >= 0.19
        with pytest.raises(brokerq.InvalidRequest):
            sub.get(timeout=-1)
        client.publish("events", b"x")
        client.publish("events", b"y")

        def take_nowait() -> bytes | None:
            try:
                return sub.get(timeout=0)  # only what has arrived
            except brokerq.Empty:
                return None

        assert wait_until(take_nowait, what="the first publish to arrive") == b"x"
        assert sub.get(timeout=5) == b"y"


def test_a_closed_subscription_raises(client: brokerq.Client) -> None:
    sub = client.subscribe("events")
    assert "events" in repr(sub)
    assert client.publish("events", b"unread") == 1
    sub.close()
    with pytest.raises(brokerq.BrokerqError, match="the subscription to 'events' is closed"):
        sub.get(timeout=0)
    with pytest.raises(brokerq.BrokerqError, match="the subscription to 'events' is closed"):
        next(iter(sub))
    sub.close()  # twice is fine
    wait_until(lambda: topic_stats(client, "events") == {}, what="the broker to forget it")
    assert client.publish("events", b"nobody") == 0
    with client.subscribe("events") as again:
        pass
    with pytest.raises(brokerq.BrokerqError, match="the subscription to 'events' is closed"):
        again.get(timeout=0)


@pytest.mark.parametrize("topic", ["", "a:b", "tab\there", "x" * 256])
def test_an_invalid_topic_raises_invalid_request(client: brokerq.Client, topic: str) -> None:
    with pytest.raises(brokerq.InvalidRequest):
        client.publish(topic, b"x")
    with pytest.raises(brokerq.InvalidRequest):
        client.subscribe(topic)
    with pytest.raises(brokerq.InvalidRequest):
        client.queue("q").subscribe(topic)
    with pytest.raises(brokerq.InvalidRequest):
        client.queue("q").unsubscribe(topic)
    with pytest.raises(ValueError, match="topic name"):  # InvalidRequest is one
        client.publish(topic, b"x")
    with pytest.raises(brokerq.InvalidRequest):
        client.queue("q:dead").subscribe("events")  # a queue to put to
    assert client.stats()["topics"] == {}
    assert client.publish("fine", b"x") == 0


def test_a_publish_over_the_size_limit_raises_message_too_large() -> None:
    with private_broker(max_message_size=100) as client:
        q = client.queue("q")
        q.subscribe("events")
        with pytest.raises(brokerq.MessageTooLarge):
            client.publish("events", b"x" * 101)
        with pytest.raises(brokerq.InvalidRequest):
            client.publish("events", 12)  # type: ignore[arg-type]
        assert q.stats()["ready"] == 0
        assert client.publish("events", b"x" * 100) == 1
        assert q.get(timeout=1) == b"x" * 100


def test_unsubscribe(client: brokerq.Client) -> None:
    q = client.queue("audit")
    assert q.unsubscribe("events") is False  # none
    q.subscribe("events")
    assert client.publish("events", b"kept") == 1
    assert q.unsubscribe("events") is True
    assert q.unsubscribe("events") is False
    assert client.publish("events", b"not copied") == 0
    assert q.get_many(10, timeout=0) == [b"kept"]  # copies made before it stay
    q.subscribe("events")
    assert q.delete() == 0  # deleting the queue ends its subscriptions
    assert client.publish("events", b"gone") == 0


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda c: c.queue(b"jobs"), "queue name must be a str"),
        (lambda c: brokerq.Queue(123, client=c), "queue name must be a str"),
        (lambda c: c.queue("q").get(timeout="1"), "timeout must be a number"),
        (lambda c: c.queue("q").get(timeout=True), "timeout must be a number"),
        (lambda c: c.queue("q").reserve(timeout="1"), "timeout must be a number"),
        (lambda c: c.queue("q").get(timeout=-1), "timeout must be a number >= 0"),
        (lambda c: c.queue("q").put(b"x", priority=1.5), "priority must be a whole number"),
        (lambda c: c.queue("q").put(b"x", priority=True), "priority must be a whole number"),
        (lambda c: c.queue("q").put(b"x", delay="2"), "delay must be a number"),
        (lambda c: c.queue("q").put_many([b"x"], ttl="a"), "ttl must be a number"),
        (lambda c: c.queue("q").get_many("3"), "whole number n >= 1"),
        (lambda c: c.publish(b"topic", b"x"), "topic name must be a str"),
        (lambda c: c.publish("topic", 12), "a message body is bytes or str"),
        (lambda c: c.queue("q").put(12), "a message body is bytes or str"),
        (lambda c: c.queue("q").put_many(b"abc"), "an iterable of bodies, not bytes"),
        (lambda c: c.queue("q").put_many(3), "an iterable of bodies, not int"),
        (lambda c: c.queue("q").reserve(timeout=0, lease="5"), "lease must be a finite number"),
        (lambda c: c.queue("q").reserve(timeout=0, lease=-1), "lease must be a finite number"),
        (lambda c: c.queue("q").configure(lease="5"), "lease must be a finite number"),
        (lambda c: c.queue("q").configure(maxsize=-1), "maxsize must be a whole number >= 0"),
        (lambda c: c.queue("q").configure(max_deliveries=1.5), "max_deliveries must be a whole"),
        (lambda c: c.queue("q", max_bytes="1k"), "max_bytes must be a whole number"),
        (lambda c: c.queue("q").kick("2"), "n must be a whole number"),
        (lambda c: brokerq.connect(c.socket_path, timeout=-1), "timeout must be a number of sec"),
        (lambda c: brokerq.connect(c.socket_path, timeout="1"), "timeout must be a number of sec"),
        (lambda c: brokerq.Client(c.socket_path, timeout=math.nan), "timeout must be a number"),
    ],
)
def test_an_argument_of_the_wrong_type_is_an_invalid_request(
    client: brokerq.Client, call: Any, words: str
) -> None:
    """Every error brokerq raises is a BrokerqError: a wrong type too (an
    InvalidRequest, also a ValueError), never an AttributeError or a
    TypeError from inside, nor a value quietly converted (priority 1.5)."""
    with pytest.raises(brokerq.InvalidRequest, match=words) as refused:
        call(client)
    assert isinstance(refused.value, ValueError)
    assert "nil" not in str(refused.value)  # a word of the wire, not of Python
    assert client.queue("q").qsize() == 0  # nothing was put


def test_a_lease_verb_with_an_argument_of_the_wrong_type_is_an_invalid_request(
    client: brokerq.Client,
) -> None:
    q = client.queue("q")
    q.put(b"x")
    msg = q.reserve(timeout=5)
    with pytest.raises(brokerq.InvalidRequest, match="delay must be a number of seconds >= 0"):
        msg.release(delay="1")  # type: ignore[arg-type]
    with pytest.raises(brokerq.InvalidRequest, match="delay must be a number of seconds >= 0"):
        msg.release(delay=-1)
    with pytest.raises(brokerq.InvalidRequest, match="lease must be a finite number"):
        msg.touch(lease=math.inf)
    msg.ack()  # the lease was untouched by the refused calls
    assert q.stats()["reserved"] == 0


def test_timeout_0_connects_only_to_a_running_broker(sock_dir: str) -> None:
    """0 is the ``_nowait`` form, as for a get: no broker is started or
    waited for; a running one is used (its replies get the default grace)."""
    path = os.path.join(sock_dir, "b.sock")
    started = time.monotonic()
    with pytest.raises(brokerq.BrokerUnavailable, match="no broker is running"):
        brokerq.connect(path, timeout=0)
    assert time.monotonic() - started < 2
    assert not os.path.exists(path)  # none was started
    with brokerq.connect(path) as running:
        with brokerq.connect(path, timeout=0) as nowait:
            assert nowait.timeout == brokerq.client.blocking.DEFAULT_TIMEOUT
            nowait.queue("q").put(b"x")
            assert running.queue("q").get(timeout=5) == b"x"
        running.stop()
