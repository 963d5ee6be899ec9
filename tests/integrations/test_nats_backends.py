"""The queue API both backends share, one test body each, run against the
local broker (a socket path) and against NATS JetStream (a nats:// URL).

The same assertions hold on both, so a user moving an application from one
to the other by changing its target meets no silent difference; what the
NATS backend cannot do is refused with NotSupported (tested at the end).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import run_cli, wait_until
from extras import require
from nats_server import require_server

import brokerq

require("nats", "nats")
require_server()
from nats_server import running_server  # noqa: E402


@pytest.fixture(scope="module")
def nats_url() -> Iterator[str]:
    """One nats-server for the module; each test uses queues of its own."""
    with running_server() as server:
        yield server.url


@pytest.fixture(params=["local", "nats"])
def backend(request: pytest.FixtureRequest) -> str:
    """Which backend the test runs on (overrides conftest's anyio backend)."""
    return str(request.param)


@pytest.fixture
def target(backend: str, request: pytest.FixtureRequest) -> str:
    """What ``brokerq.connect`` is given: a socket path or a NATS URL."""
    if backend == "local":
        return str(request.getfixturevalue("socket_path"))
    return str(request.getfixturevalue("nats_url"))


def connect(target: str) -> brokerq.Client:
    """``brokerq.connect(target)``, checked to have picked the backend the
    target names (a URL taken for a socket path would spawn a local broker
    and test it twice)."""
    client = brokerq.connect(target)
    is_nats = type(client).__module__.startswith("brokerq.nats")
    if is_nats != target.startswith("nats://"):
        client.close()
        raise AssertionError(f"brokerq.connect({target!r}) gave {client!r}")
    return client


@pytest.fixture
def client(target: str) -> Iterator[brokerq.Client]:
    with connect(target) as c:
        yield c


@pytest.fixture
def q(client: brokerq.Client) -> brokerq.Queue:
    """A queue of this test alone (the NATS server is shared by the module)."""
    return client.queue("t" + uuid.uuid4().hex[:12])


def drain(q: brokerq.Queue) -> list[bytes]:
    got = []
    while True:
        try:
            got.append(q.get_nowait())
        except brokerq.Empty:
            return got


def test_put_then_get_in_fifo_order(q: brokerq.Queue) -> None:
    ids = [q.put(b"m%d" % i) for i in range(20)]
    assert all(isinstance(i, int) for i in ids)
    assert [q.get(timeout=5) for _ in range(20)] == [b"m%d" % i for i in range(20)]


def test_get_times_out_with_empty_and_get_nowait_does_not_wait(q: brokerq.Queue) -> None:
    started = time.monotonic()
    with pytest.raises(brokerq.Empty):
        q.get(timeout=0.3)
    assert time.monotonic() - started >= 0.25
    with pytest.raises(brokerq.Empty):
        q.get_nowait()
    q.put(b"x")
    assert wait_until(lambda: not q.empty(), 5, "the put to show")
    assert q.get_nowait() == b"x"


def test_a_put_after_a_no_wait_get_is_ready_for_every_consumer(
    client: brokerq.Client, target: str
) -> None:
    """A get that found nothing leaves no request behind in the broker to
    take the next put for nobody: another client gets that put at once."""
    name = "nw" + uuid.uuid4().hex[:8]
    mine = client.queue(name)
    with connect(target) as other_client:
        other = other_client.queue(name)
        for i in range(30):
            with pytest.raises(brokerq.Empty):
                mine.get_nowait()
            mine.put(b"%d" % i)
            assert other.qsize() == 1
            assert other.get(timeout=5) == b"%d" % i


def test_put_many_and_get_many(q: brokerq.Queue) -> None:
    ids = q.put_many([b"a", b"b", b"c", b"d", b"e"])
    assert len(set(ids)) == 5
    first = q.get_many(3, timeout=5)
    assert first == [b"a", b"b", b"c"]
    rest = q.get_many(10, timeout=1)
    assert rest == [b"d", b"e"]
    with pytest.raises(brokerq.Empty):
        q.get_many(2, timeout=0.2)


def test_reserve_then_ack_takes_it_for_good(q: brokerq.Queue) -> None:
    q.configure(lease=1)
    q.put(b"job")
    msg = q.reserve(timeout=5)
    assert (msg.body, msg.attempt) == (b"job", 1)
    msg.ack()
    time.sleep(1.5)  # past the lease: an acked message does not come back
    with pytest.raises(brokerq.Empty):
        q.get_nowait()


def test_release_redelivers_with_the_next_attempt(q: brokerq.Queue) -> None:
    q.put(b"job")
    first = q.reserve(timeout=5)
    first.release()
    again = q.reserve(timeout=5)
    assert (again.body, again.attempt) == (b"job", 2)
    again.ack()


def test_a_lease_running_out_redelivers(q: brokerq.Queue) -> None:
    q.configure(lease=1)
    q.put(b"job")
    first = q.reserve(timeout=5)
    assert first.attempt == 1
    with pytest.raises(brokerq.Empty):
        q.get_nowait()  # leased: not ready
    again = q.reserve(timeout=10)  # once the lease has run out
    assert (again.body, again.attempt) == (b"job", 2)
    again.ack()


def test_touch_keeps_the_lease(q: brokerq.Queue) -> None:
    q.configure(lease=1)
    q.put(b"job")
    msg = q.reserve(timeout=5)
    for _ in range(4):  # 2 s held, twice the lease, renewed every half lease
        time.sleep(0.5)
        msg.touch()
    with pytest.raises(brokerq.Empty):
        q.get_nowait()  # still leased: not redelivered
    msg.ack()
    with pytest.raises(brokerq.Empty):
        q.get(timeout=1.5)


def test_qsize_empty_purge_and_peek(q: brokerq.Queue) -> None:
    assert q.empty()
    assert q.qsize() == 0
    q.put_many([b"a", b"b", b"c"])
    wait_until(lambda: q.qsize() == 3, 5, "qsize 3")
    assert not q.empty()
    assert q.peek() == b"a"
    assert q.qsize() == 3  # peek takes nothing
    assert q.purge() == 3
    assert q.empty()
    with pytest.raises(brokerq.Empty):
        q.get_nowait()


def test_a_delayed_message_comes_once_due(q: brokerq.Queue) -> None:
    q.put(b"later", delay=1)
    q.put(b"now")
    assert q.get(timeout=5) == b"now"
    with pytest.raises(brokerq.Empty):
        q.get_nowait()
    started = time.monotonic()
    assert q.get(timeout=10) == b"later"
    assert time.monotonic() - started >= 0.5


def test_an_expired_message_is_dropped(q: brokerq.Queue) -> None:
    q.put(b"stale", ttl=0.3)
    q.put(b"fresh")
    time.sleep(0.8)
    assert drain(q) == [b"fresh"]


def test_past_max_deliveries_a_message_moves_to_dead(
    client: brokerq.Client, q: brokerq.Queue
) -> None:
    q.configure(max_deliveries=2)
    q.put(b"poison")
    for attempt in (1, 2):
        msg = q.reserve(timeout=5)
        assert (msg.body, msg.attempt) == (b"poison", attempt)
        msg.release()
    # Not delivered a third time. (On NATS the move to :dead is made by the
    # consumer that fetches it next: this get.)
    with pytest.raises(brokerq.Empty):
        q.get_nowait()
    dead = client.queue(q.name + ":dead")
    assert dead.get(timeout=10) == b"poison"
    with pytest.raises(brokerq.Empty):
        dead.get_nowait()  # moved once, not twice


def test_a_put_window_returns_at_once_and_flush_acknowledges(target: str) -> None:
    name = "pw" + uuid.uuid4().hex[:8]
    with brokerq.connect(target, put_window=16) as client:
        q = client.queue(name)
        assert [q.put(b"%d" % i) for i in range(50)] == [0] * 50
        client.flush()
        assert q.qsize() == 50
        q.put(b"last")  # (a get settles the thread's window first: it sees this put)
        assert q.get_many(100, timeout=5) == [b"%d" % i for i in range(50)] + [b"last"]


def test_a_refused_windowed_put_raises_from_the_flush_and_the_rest_stand(target: str) -> None:
    name = "pwf" + uuid.uuid4().hex[:8]
    with brokerq.connect(target, put_window=8) as client:
        q = client.queue(name, maxsize=2)
        for body in (b"a", b"b", b"c", b"d"):
            q.put_nowait(body)
        with pytest.raises(brokerq.Full):
            client.flush()
        with pytest.raises(brokerq.Full):
            client.flush()
        client.flush()
        assert q.qsize() == 2
        assert q.get_many(10, timeout=5) == [b"a", b"b"]


def test_prefetching_consumers_take_every_message_once_in_order(target: str) -> None:
    name = "pf" + uuid.uuid4().hex[:8]
    with connect(target) as producer:
        producer.queue(name).put_many([b"%03d" % i for i in range(100)])
    with brokerq.connect(target, prefetch=16) as client:
        q = client.queue(name)
        got = [q.get(timeout=5) for _ in range(50)]
        got += q.get_many(10, timeout=5)
        assert got == [b"%03d" % i for i in range(60)]
        with q.reserve(timeout=5) as msg:  # (locally a stream of its own: any message)
            got.append(msg.body)
    # What the closed client held went back at once, for the next consumer.
    with connect(target) as other:
        rest = other.queue(name).get_many(100, timeout=5)
    assert sorted(got + rest) == [b"%03d" % i for i in range(100)]
    assert len(got + rest) == 100


def test_a_lease_of_its_own_shorter_than_the_queues_ends_first(
    client: brokerq.Client, target: str
) -> None:
    name = "ls" + uuid.uuid4().hex[:8]
    q = client.queue(name, lease=30)
    q.put(b"job")
    msg = q.reserve(timeout=5, lease=1)
    assert msg.lease_expires - time.monotonic() <= 1
    with connect(target) as other_client:
        again = other_client.queue(name).reserve(timeout=10)  # once the 1 s ran out
        assert (again.body, again.attempt) == (b"job", 2)
        with pytest.raises(brokerq.LeaseLost):
            msg.ack()
        again.ack()


def test_a_lease_of_its_own_longer_than_the_queues_is_kept(
    client: brokerq.Client, target: str
) -> None:
    name = "ll" + uuid.uuid4().hex[:8]
    q = client.queue(name, lease=1)
    q.put(b"job")
    msg = q.reserve(timeout=5, lease=4)
    with connect(target) as other_client:
        other = other_client.queue(name)
        with pytest.raises(brokerq.Empty):
            other.reserve(timeout=2.5)  # past the queue's lease: still held
        msg.touch(lease=3)  # from now, for 3 s
        with pytest.raises(brokerq.Empty):
            other.reserve(timeout=2)
        msg.ack()
        assert other.qsize() == 0


def producer(target: str, queue: str, n: int) -> None:
    """An application's producer: it knows only where its broker is."""
    with connect(target) as client:
        jobs = client.queue(queue)
        for i in range(n):
            jobs.put(b"job %d" % i)


def consumer(target: str, queue: str, n: int) -> list[bytes]:
    """An application's consumer: reserve, work, ack (release on failure)."""
    done = []
    with connect(target) as client:
        jobs = client.queue(queue)
        while len(done) < n:
            with jobs.reserve(timeout=10) as msg:
                done.append(msg.body)
    return done


def test_the_same_application_code_runs_on_either_backend(target: str) -> None:
    queue = "app" + uuid.uuid4().hex[:8]
    producer(target, queue, 50)
    assert consumer(target, queue, 50) == [b"job %d" % i for i in range(50)]
    with connect(target) as client:
        assert client.queue(queue).empty()


def test_brokerq_url_selects_nats_for_code(
    nats_url: str, sock_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = "url" + uuid.uuid4().hex[:8]
    # Were the URL ignored, the default broker would be used: make that one
    # this test's own (its runtime dir is the test's), not the user's.
    monkeypatch.setenv("XDG_RUNTIME_DIR", sock_dir)
    monkeypatch.setenv("BROKERQ_URL", nats_url)
    with brokerq.connect() as client:
        assert type(client).__module__.startswith("brokerq.nats"), client
        client.queue(queue).put(b"from code")
    with connect(nats_url) as client:
        assert client.queue(queue).get(timeout=5) == b"from code"
    assert not os.path.exists(os.path.join(sock_dir, "brokerq")), "a local broker was used"


def test_brokerq_url_and_url_option_select_nats_for_commands(
    nats_url: str, sock_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = "cli" + uuid.uuid4().hex[:8]
    monkeypatch.setenv("XDG_RUNTIME_DIR", sock_dir)  # as above
    monkeypatch.setenv("BROKERQ_URL", nats_url)
    for body in ("first", "second"):
        put = run_cli("put", queue, body)
        assert put.returncode == 0, put.stderr
    got = run_cli("get", "-n", "2", "--timeout", "5", queue)
    assert got.returncode == 0, got.stderr
    assert got.stdout == b"first\nsecond\n"
    # --url, without the environment variable
    monkeypatch.delenv("BROKERQ_URL")
    put = run_cli("--url", nats_url, "put", queue, "by --url")
    assert put.returncode == 0, put.stderr
    with connect(nats_url) as client:
        assert client.queue(queue).get(timeout=5) == b"by --url"
    assert not os.path.exists(os.path.join(sock_dir, "brokerq")), "a local broker was used"


def test_an_explicit_socket_wins_over_brokerq_url(
    socket_path: str, nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BROKERQ_URL", nats_url)
    with brokerq.connect(socket_path) as client:
        assert isinstance(client, brokerq.Client)
        client.queue("jobs").put(b"local")
        put = run_cli("--socket", socket_path, "put", "jobs", "local too")
        assert put.returncode == 0, put.stderr
        assert client.queue("jobs").get_many(2, timeout=5) == [b"local", b"local too"]
    with connect(nats_url) as client, pytest.raises(brokerq.Empty):
        client.queue("jobs").get_nowait()


#: What the NATS backend refuses: (a word the refusal must name, the call).
REFUSED: list[tuple[str, Callable[[Any, Any], object]]] = [
    ("priority", lambda c, q: q.put(b"urgent", priority=5)),
    ("priority", lambda c, q: q.put_many([b"urgent"], priority=5)),
    ("priority", lambda c, q: c.publish("news", b"urgent", priority=5)),
]


@pytest.mark.parametrize(("feature", "call"), REFUSED, ids=[f for f, _ in REFUSED])
def test_what_nats_cannot_do_is_refused_naming_feature_and_backend(
    nats_url: str, feature: str, call: Callable[[Any, Any], object]
) -> None:
    with connect(nats_url) as client:
        q = client.queue("no" + uuid.uuid4().hex[:8])
        q.put(b"job")
        with pytest.raises(brokerq.NotSupported) as refused:
            call(client, q)
        text = str(refused.value)
        assert feature in text, text
        assert "NATS" in text, text
        # Refused means nothing happened: the queue holds its one message.
        assert q.get(timeout=5) == b"job"
        with pytest.raises(brokerq.Empty):
            q.get_nowait()


def test_a_missing_nats_server_skips_saying_how_to_install_and_fails_under_ci(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import nats_server

    monkeypatch.setattr(nats_server, "server_binary", lambda: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install nats-server"):
        require_server()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true and nats-server is not installed"):
        require_server()


# A queue's durable subscription to a topic (brokerq/nats/topics.py on NATS).


def topic() -> str:
    """A topic of this test alone (the NATS server is shared by the module)."""
    return "news" + uuid.uuid4().hex[:8]


def test_a_subscribed_queue_gets_every_later_publish_and_only_those(
    client: brokerq.Client, q: brokerq.Queue
) -> None:
    news = topic()
    assert client.publish(news, b"before") == 0  # nobody subscribes: gone
    q.subscribe(news)
    q.subscribe(news)  # (once is enough: still one copy per publish)
    assert [client.publish(news, b"p%d" % i) for i in range(5)] == [1] * 5
    assert drain(q) == [b"p%d" % i for i in range(5)]


def test_unsubscribe_ends_it_and_the_copies_stay(client: brokerq.Client, q: brokerq.Queue) -> None:
    news = topic()
    q.subscribe(news)
    assert client.publish(news, b"kept") == 1
    assert q.unsubscribe(news) is True
    assert q.unsubscribe(news) is False
    assert client.publish(news, b"after") == 0
    assert drain(q) == [b"kept"]


def test_each_subscribed_queue_gets_a_copy(client: brokerq.Client) -> None:
    news = topic()
    queues = [client.queue("t" + uuid.uuid4().hex[:12]) for _ in range(3)]
    for each in queues:
        each.subscribe(news)
    assert client.publish(news, b"x") == 3
    assert [drain(each) for each in queues] == [[b"x"]] * 3


def test_a_live_subscriber_and_a_queue_both_get_it(
    backend: str, client: brokerq.Client, q: brokerq.Queue
) -> None:
    news = topic()
    q.subscribe(news)
    with client.subscribe(news) as live:
        reached = client.publish(news, b"both")
        assert live.get(timeout=5) == b"both"
    # NATS does not say how many live subscribers a publish reached (docs/nats.md).
    assert reached == (2 if backend == "local" else 1)
    assert drain(q) == [b"both"]


def test_a_publish_ttl_applies_to_the_copies(client: brokerq.Client, q: brokerq.Queue) -> None:
    news = topic()
    q.subscribe(news)
    assert client.publish(news, b"stale soon", ttl=0.2) == 1
    assert client.publish(news, b"fresh", ttl=60) == 1
    time.sleep(0.5)
    assert drain(q) == [b"fresh"]


def test_a_full_subscribed_queue_misses_the_copy(client: brokerq.Client, q: brokerq.Queue) -> None:
    news = topic()
    q.configure(maxsize=1)
    q.subscribe(news)
    assert client.publish(news, b"1") == 1
    assert client.publish(news, b"2") == 0  # full: not waited for, not counted
    assert drain(q) == [b"1"]


def test_delete_ends_the_queue_s_subscriptions(client: brokerq.Client, q: brokerq.Queue) -> None:
    news = topic()
    q.subscribe(news)
    q.delete()
    assert client.publish(news, b"x") == 0


def test_a_topic_with_the_broker_s_colon_is_refused(q: brokerq.Queue) -> None:
    for call in (q.subscribe, q.unsubscribe):
        with pytest.raises(brokerq.InvalidRequest):
            call("a:b")


# Buried messages: bury and kick.


def test_a_buried_message_waits_for_a_kick_the_earliest_buried_first(q: brokerq.Queue) -> None:
    q.put_many([b"a", b"b", b"c"])
    for body in (b"a", b"b"):
        msg = q.reserve(timeout=5)
        assert msg.body == body
        msg.bury()
    assert q.stats()["buried"] == 2
    assert q.get(timeout=5) == b"c"
    with pytest.raises(brokerq.Empty):
        q.get(timeout=0.3)  # buried: not delivered
    assert q.kick() == 1
    assert q.get(timeout=5) == b"a"
    assert q.kick(10) == 1
    assert q.get(timeout=5) == b"b"
    assert q.kick(10) == 0
    stats = q.stats()
    assert (stats["ready"], stats["reserved"], stats["buried"]) == (0, 0, 0)


def test_a_buried_message_is_settled(q: brokerq.Queue) -> None:
    q.put(b"x")
    with q.reserve(timeout=5) as msg:
        msg.bury()  # (no ack on the way out)
    with pytest.raises(brokerq.LeaseLost):
        msg.bury()  # once is all
    q.put(b"y")
    acked = q.reserve(timeout=5)
    acked.ack()
    with pytest.raises(brokerq.LeaseLost):
        acked.bury()  # an acked message is not buried after all
    assert q.stats()["buried"] == 1


def test_purge_leaves_buried_messages_and_delete_removes_them(q: brokerq.Queue) -> None:
    q.put_many([b"buried", b"ready"])
    q.reserve(timeout=5).bury()
    assert q.purge() == 1
    assert q.stats()["buried"] == 1
    assert q.delete() == 1
    assert q.kick() == 0


@pytest.mark.parametrize("n", [0, -1, 1.5, "2"])
def test_a_kick_needs_a_count_of_one_or_more(
    client: brokerq.Client, q: brokerq.Queue, n: Any
) -> None:
    with pytest.raises(brokerq.InvalidRequest):
        q.kick(n)
    with pytest.raises(brokerq.InvalidRequest):
        client.queue(q.name + ":dead").kick(n)


def test_the_kick_command(q: brokerq.Queue, target: str) -> None:
    q.put(b"x")
    q.reserve(timeout=5).bury()
    where = ["--url", target] if target.startswith("nats://") else ["--socket", target]
    done = run_cli(*where, "kick", q.name, "-n", "5")
    assert (done.returncode, done.stdout) == (0, b"1\n"), done.stderr
    assert q.get(timeout=5) == b"x"


def _dead_letters(client: brokerq.Client, q: brokerq.Queue, bodies: list[bytes]) -> brokerq.Queue:
    """``bodies`` put to ``q`` (one delivery each) and failed into ``q:dead``."""
    limited = client.queue(q.name, max_deliveries=1)
    limited.put_many(bodies)
    for _ in bodies:
        limited.reserve(timeout=5).release()
    with pytest.raises(brokerq.Empty):
        limited.get(timeout=0.5)  # (on NATS the fetch after the last attempt moves them)
    dead = client.queue(q.name + ":dead")
    assert wait_until(lambda: dead.qsize() == len(bodies), 5, "the dead letters")
    return dead


def test_a_kick_on_dead_letters_sends_them_back_buried_first_attempts_reset(
    client: brokerq.Client, q: brokerq.Queue
) -> None:
    dead = _dead_letters(client, q, [b"a", b"b", b"c"])
    buried = dead.reserve(timeout=5)
    assert buried.body == b"a"
    buried.bury()
    assert dead.kick(2) == 2  # the buried one first, then the next ready one
    assert [q.get(timeout=5), q.get(timeout=5)] == [b"a", b"b"]
    assert dead.kick(10) == 1
    msg = q.reserve(timeout=5)
    assert (msg.body, msg.attempt) == (b"c", 1)
    msg.ack()
    assert dead.kick() == 0
    assert (dead.qsize(), dead.stats()["buried"]) == (0, 0)


# -- unfinished tasks: task_done, join, unfinished_tasks ----------------------------------------


def test_a_get_leaves_its_task_for_task_done_and_too_many_are_refused(q: brokerq.Queue) -> None:
    assert q.unfinished_tasks == 0
    q.put_many([b"a", b"b", b"c"])
    assert q.unfinished_tasks == 3
    assert q.get(timeout=5) == b"a"
    assert q.get_many(5, timeout=5) == [b"b", b"c"]
    assert (q.unfinished_tasks, q.stats()["unfinished_tasks"]) == (3, 3)
    q.task_done()
    q.task_done(2)
    assert q.unfinished_tasks == 0
    with pytest.raises(brokerq.InvalidRequest, match="too many times"):
        q.task_done()
    with pytest.raises(brokerq.InvalidRequest, match="n >= 1"):
        q.task_done(0)
    assert q.unfinished_tasks == 0


def test_an_ack_is_a_reserves_task_done_and_a_release_changes_nothing(q: brokerq.Queue) -> None:
    q.configure(lease=1)
    q.put_many([b"a", b"b"])
    q.reserve(timeout=5).release()
    assert q.unfinished_tasks == 2
    q.reserve(timeout=5)  # its lease runs out: back, still a task
    time.sleep(1.2)
    assert q.unfinished_tasks == 2
    for _ in range(2):
        q.reserve(timeout=5).ack()
    assert q.unfinished_tasks == 0
    q.join(timeout=0)


def test_purge_finishes_the_tasks_of_what_it_drops(q: brokerq.Queue) -> None:
    q.put_many([b"a", b"b", b"c"])
    assert q.get(timeout=5) == b"a"
    assert q.purge() == 2
    assert q.unfinished_tasks == 1  # the got one waits for its task_done
    q.task_done()
    q.join(timeout=0)


def test_a_dead_letter_is_a_task_of_the_dead_queue(
    client: brokerq.Client, q: brokerq.Queue
) -> None:
    q.configure(max_deliveries=1)
    q.put(b"bad")
    q.reserve(timeout=5).release()
    with pytest.raises(brokerq.Empty):
        q.get(timeout=0.3)  # (on NATS, the fetch past max_deliveries moves it)
    dead = client.queue(q.name + ":dead")
    assert (q.unfinished_tasks, dead.unfinished_tasks) == (0, 1)
    assert dead.get(timeout=5) == b"bad"
    dead.task_done()
    dead.join(timeout=0)
    dead.delete()


def test_join_waits_for_the_last_task_done_and_times_out_with_join_timeout(
    target: str, q: brokerq.Queue
) -> None:
    q.put_many([b"a", b"b"])
    with pytest.raises(brokerq.JoinTimeout) as late:
        q.join(timeout=0.2)
    assert isinstance(late.value, TimeoutError)
    with pytest.raises(brokerq.InvalidRequest, match="timeout"):
        q.join(timeout=-1)

    def work() -> None:
        with connect(target) as other:
            theirs = other.queue(q.name)
            for _ in range(2):
                theirs.get(timeout=5)
                time.sleep(0.1)
                theirs.task_done()

    worker = threading.Thread(target=work)
    worker.start()
    started = time.monotonic()
    q.join(timeout=20)
    assert time.monotonic() - started >= 0.15  # not before the last task_done
    worker.join(timeout=20)
    assert q.unfinished_tasks == 0


def test_delete_forgets_the_tasks(q: brokerq.Queue) -> None:
    q.put_many([b"a", b"b"])
    assert q.get(timeout=5) == b"a"
    assert q.delete() == 1
    assert q.unfinished_tasks == 0
    q.join(timeout=0)
    with pytest.raises(brokerq.InvalidRequest):
        q.task_done()  # the got one's count went with the queue
    q.put(b"again")
    assert q.unfinished_tasks == 1


def test_the_async_queue_counts_the_same(target: str) -> None:
    name = "a" + uuid.uuid4().hex[:12]

    async def main() -> None:
        async with brokerq.open_async_client(target) as c:
            q = c.queue(name)
            await q.put_many([b"a", b"b"])
            assert await q.unfinished_tasks() == 2
            assert await q.get(timeout=5) == b"a"
            async with q.reserve(timeout=5):
                pass
            assert await q.unfinished_tasks() == 1
            with pytest.raises(brokerq.JoinTimeout):
                await q.join(timeout=0.1)
            await q.task_done()
            await q.join(timeout=5)
            await q.delete()

    asyncio.run(main())


def test_brokerq_join_exits_0_when_done_and_3_on_timeout(
    target: str, backend: str, q: brokerq.Queue
) -> None:
    where = ["--url" if backend == "nats" else "--socket", target]
    assert run_cli(*where, "join", q.name).returncode == 0  # nothing to do
    q.put(b"a")
    late = run_cli(*where, "join", q.name, "--timeout", "0.2")
    assert late.returncode == 3, late.stderr
    assert late.stderr.decode().strip() == (
        f"brokerq: the tasks of {q.name!r} were not all done within 0.2 s"
    )
    assert q.get(timeout=5) == b"a"
    waiting = run_cli(*where, "join", q.name, "--timeout", "0")
    assert waiting.returncode == 3, waiting.stderr
    q.task_done()
    done = run_cli(*where, "join", q.name, "--timeout", "5")
    assert done.returncode == 0, done.stderr


def test_brokerq_get_leaves_its_task_for_a_task_done(client: brokerq.Client, target: str) -> None:
    name = "cg" + uuid.uuid4().hex[:8]
    q = client.queue(name)
    q.put(b"job")
    where = "--url" if target.startswith("nats://") else "--socket"
    done = run_cli(where, target, "get", name)
    assert (done.returncode, done.stdout) == (0, b"job\n"), done.stderr
    assert q.unfinished_tasks == 1
    q.task_done()
    assert q.unfinished_tasks == 0
