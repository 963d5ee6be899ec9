"""The put window: pipelined puts in the blocking client (docs/usage.md,
"Pipelined puts (put window)"; docs/guarantees.md G48).

Real brokers throughout, each on its own short socket directory
(``socket_path``: a spawned broker with a journal, killed by conftest.py
afterwards). Every wait is bounded (``wait_until``, thread joins with a
timeout, pytest-timeout); the one plain sleep checks that a put at a full
window is still waiting.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest
from conftest import gone, wait_until
from test_crash import drain

import brokerq
from brokerq.client import calls

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def client(socket_path: str) -> Iterator[brokerq.Client]:
    with brokerq.connect(socket_path, put_window=8) as c:
        yield c


def unacknowledged(client: brokerq.Client) -> int:
    """The calling thread's windowed puts whose replies were not read yet."""
    lane = getattr(client._local, "lane", None)
    window: calls.PutWindow | None = None if lane is None else lane.window
    return 0 if window is None else len(window)


def test_windowed_puts_return_0_and_flush_makes_them_acknowledged_in_order_once(
    client: brokerq.Client, observer: brokerq.Client
) -> None:
    q = client.queue("q")
    bodies = [b"m%03d" % i for i in range(100)]
    for body in bodies:
        assert q.put(body) == 0
        assert 1 <= unacknowledged(client) <= 8
    assert client.flush() is None
    assert unacknowledged(client) == 0
    assert observer.queue("q").qsize() == 100
    assert observer.queue("q").stats()["put_total"] == 100
    assert drain(observer.queue("q")) == bodies
    assert q.flush() is None  # nothing outstanding: returns at once


def test_put_window_0_is_the_plain_put(socket_path: str) -> None:
    with brokerq.connect(socket_path, put_window=0) as client:
        q = client.queue("q")
        first = q.put(b"a")
        assert first >= 1
        assert q.put(b"b") == first + 1
        assert unacknowledged(client) == 0
        client.flush()  # a no-op without a window
        assert q.get_many(5, timeout=0) == [b"a", b"b"]


def test_a_get_on_the_same_thread_flushes_first(client: brokerq.Client) -> None:
    q = client.queue("q")
    for body in (b"a", b"b", b"c"):
        q.put(body)
    assert unacknowledged(client) == 3
    assert q.get(timeout=0) == b"a"  # the windowed puts were read (and made) first
    assert unacknowledged(client) == 0
    assert q.get_many(5, timeout=0) == [b"b", b"c"]


def test_stats_flushes_first(client: brokerq.Client) -> None:
    q = client.queue("q")
    q.put(b"a")
    q.put(b"b")
    assert unacknowledged(client) == 2
    assert q.stats()["ready"] == 2
    assert unacknowledged(client) == 0
    q.put(b"c")
    assert client.stats()["put_total"] == 3
    assert q.get_many(10, timeout=0) == [b"a", b"b", b"c"]


def test_put_many_is_windowed_a_frame_at_a_time(client: brokerq.Client) -> None:
    q = client.queue("q")
    q.put(b"a")
    assert q.put_many([b"b", b"c", b"d"]) == [0, 0, 0]  # one frame: one put of the window
    assert unacknowledged(client) == 2
    big = [bytes([i]) * 4_000_000 for i in range(5)]  # 20 MB: two frames (16 MiB limit)
    assert q.put_many(big) == [0] * 5
    assert unacknowledged(client) == 4
    client.flush()
    assert unacknowledged(client) == 0
    assert q.stats()["put_total"] == 9
    assert q.get_many(4, timeout=0) == [b"a", b"b", b"c", b"d"]
    assert [q.get(timeout=0) for _ in big] == big


def test_close_flushes_then_closes(socket_path: str, observer: brokerq.Client) -> None:
    client = brokerq.connect(socket_path, put_window=100)
    q = client.queue("q")
    for i in range(50):
        q.put(b"%d" % i)
    assert unacknowledged(client) == 50
    client.close()
    assert observer.queue("q").qsize() == 50
    with pytest.raises(brokerq.BrokerqError, match="closed"):
        client.flush()
    with brokerq.connect(socket_path, put_window=4) as other:  # __exit__ flushes too
        other.queue("r").put(b"x")
    assert observer.queue("r").qsize() == 1


def test_close_raises_the_error_a_flush_read_and_closes_all_the_same(
    socket_path: str, observer: brokerq.Client
) -> None:
    client = brokerq.connect(socket_path, put_window=4)
    q = client.queue("small", maxsize=1)
    q.put(b"a")
    q.put_nowait(b"b")  # Full, read by close
    q.put(b"c")  # Full too, never read: dropped with the connection
    with pytest.raises(brokerq.Full):
        client.close()
    with pytest.raises(brokerq.BrokerqError, match="closed"):
        q.put(b"d")
    assert client._connections == []
    assert observer.queue("small").get_many(5, timeout=0) == [b"a"]


def test_the_window_bound_holds_while_the_broker_does_not_answer(
    client: brokerq.Client, observer: brokerq.Client
) -> None:
    """Window 4, broker stopped: four puts return at once, the fifth waits
    for a reply (never five unacknowledged); once the broker runs again it
    goes on, and everything arrives once, in order."""
    client.put_window = 4
    q = client.queue("q")
    done: list[int] = []
    most: list[int] = []
    failed: list[BaseException] = []

    def produce() -> None:
        try:
            client.connection()  # this thread's connection, greeted before the stop
            ready.set()
            assert go.wait(10)
            for i in range(10):
                q.put(b"%d" % i)
                done.append(i)
                most.append(unacknowledged(client))
            client.flush()
        except BaseException as exc:  # reported to the test thread
            failed.append(exc)

    ready, go = threading.Event(), threading.Event()
    thread = threading.Thread(target=produce)
    thread.start()
    assert ready.wait(10)
    pid = observer.broker_pid
    os.kill(pid, signal.SIGSTOP)
    try:
        go.set()
        wait_until(lambda: len(done) == 4, what="four puts to return")
        time.sleep(0.3)
        assert len(done) == 4  # the fifth waits for the first reply
    finally:
        os.kill(pid, signal.SIGCONT)
    thread.join(timeout=20)
    assert not thread.is_alive()
    assert not failed, failed
    assert max(most) <= 4
    assert drain(observer.queue("q")) == [b"%d" % i for i in range(10)]


def test_a_window_past_the_brokers_pipeline_limit_does_not_deadlock(
    socket_path: str, observer: brokerq.Client
) -> None:
    """5000 unread puts (the broker answers 1000 before it waits for its
    replies to be read): sending reads the replies that come meanwhile, so
    neither side waits for the other for ever."""
    bodies = [b"%05d" % i + b"x" * 1000 for i in range(5000)]
    with brokerq.connect(socket_path, timeout=5, put_window=5000) as client:
        q = client.queue("q")
        for body in bodies:
            q.put(body)
        client.flush()
    assert drain(observer.queue("q")) == bodies


def test_an_error_reply_surfaces_at_flush_and_later_puts_were_made(
    client: brokerq.Client, observer: brokerq.Client
) -> None:
    q = client.queue("small", maxsize=2)
    other = client.queue("other")
    q.put(b"a")
    q.put(b"b")
    q.put_nowait(b"c")  # no room: its reply is Full, read later
    other.put(b"after")
    with pytest.raises(brokerq.Full):
        client.flush()
    assert unacknowledged(client) == 1  # the put after the error is still in the window
    client.flush()
    assert unacknowledged(client) == 0
    # The connection is still in step: plain requests work on it.
    assert q.get_many(5, timeout=0) == [b"a", b"b"]
    assert other.get(timeout=0) == b"after"
    assert observer.queue("small").stats()["put_total"] == 2


def test_an_error_read_at_a_full_window_is_raised_by_that_put_which_is_not_sent(
    socket_path: str, observer: brokerq.Client
) -> None:
    with brokerq.connect(socket_path, put_window=1) as client:
        q = client.queue("small", maxsize=1)
        q.put(b"a")
        q.put_nowait(b"b")  # Full, not read yet
        with pytest.raises(brokerq.Full):
            client.queue("other").put(b"never sent")
        client.flush()
        assert unacknowledged(client) == 0
    assert observer.queue("small").get_many(5, timeout=0) == [b"a"]
    assert observer.queue("other").qsize() == 0


@pytest.mark.parametrize("replies_lost", [False, True], ids=["replies-kept", "replies-lost"])
def test_windowed_puts_outstanding_at_a_sigkill_are_there_once_in_order(
    socket_path: str, replies_lost: bool
) -> None:
    """G48: the broker is killed with 60 unacknowledged puts: 30 it executed
    (their records are in the journal), 30 it never read (it was stopped).
    flush sends the unacknowledged ones again, same keys, in order, to a new
    broker: each is there exactly once, in order.

    With ``replies_lost`` the replies the killed broker wrote are thrown away
    unread, as if it had died between each record and its reply (G14), so
    all 60 are sent again: without the re-sending the last 30 would be
    missing, with new keys the first 30 would be there twice."""
    bodies = [b"m%03d" % i for i in range(60)]
    with brokerq.connect(socket_path, put_window=100) as client:
        q = client.queue("q")
        for body in bodies[:30]:
            assert q.put(body) == 0
        with brokerq.connect(socket_path) as observer:
            # Executed, and so in the journal, but not acknowledged to `client`.
            wait_until(lambda: observer.queue("q").qsize() == 30, what="30 puts executed")
            pid = observer.broker_pid
        os.kill(pid, signal.SIGSTOP)
        for body in bodies[30:]:  # never read by that broker
            assert q.put(body) == 0
        assert unacknowledged(client) == 60
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: gone(pid), what=f"broker {pid} to die")
        if replies_lost:
            sock = client.connection().sock  # non-blocking; the peer is gone
            while True:
                try:
                    if not sock.recv(1 << 20):
                        break  # the end of the stream: every reply is gone
                except ConnectionResetError:
                    continue  # reported once (the killed broker left requests unread)
        client.flush()  # reconnects, spawns a broker that replays the journal, re-sends
        assert unacknowledged(client) == 0
        assert client.broker_pid != pid
    with brokerq.connect(socket_path) as after:
        queue = after.queue("q")
        assert queue.stats()["put_total"] == 30  # the new broker enqueued only the 30 unseen
        assert drain(queue) == bodies


def test_each_thread_has_its_own_window(client: brokerq.Client, observer: brokerq.Client) -> None:
    q = client.queue("q")
    q.put(b"main")
    seen: list[int] = []
    failed: list[BaseException] = []

    def produce(n: int) -> None:
        try:
            for i in range(20):
                q.put(b"%d-%d" % (n, i))
            seen.append(unacknowledged(client))
            client.flush()  # flushes this thread's window only
            seen.append(unacknowledged(client))
        except BaseException as exc:
            failed.append(exc)

    threads = [threading.Thread(target=produce, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert not failed, failed
    assert sorted(seen) == [0, 0, 0, 0, 8, 8, 8, 8]
    assert unacknowledged(client) == 1  # main's put is still its own to flush
    client.flush()
    got = drain(observer.queue("q"))
    assert sorted(got) == sorted(
        [b"main"] + [b"%d-%d" % (n, i) for n in range(4) for i in range(20)]
    )
    for n in range(4):  # each thread's puts in its order
        mine = [b for b in got if b.startswith(b"%d-" % n)]
        assert mine == [b"%d-%d" % (n, i) for i in range(20)]


def test_a_forked_child_starts_with_no_outstanding_puts(
    client: brokerq.Client, observer: brokerq.Client
) -> None:
    q = client.queue("q")
    q.put(b"parent 1")
    q.put(b"parent 2")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit code
        code = 1
        try:
            client.flush()  # not the parent's puts: nothing to read
            q.put(b"child")
            ok = unacknowledged(client) == 1  # its own put only
            client.flush()
            code = 0 if ok and unacknowledged(client) == 0 else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert unacknowledged(client) == 2
    client.flush()  # the parent reads its own replies, in step
    assert sorted(drain(observer.queue("q"))) == [b"child", b"parent 1", b"parent 2"]


def test_put_window_from_the_environment(socket_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert brokerq.Client(socket_path).put_window == 0
    monkeypatch.setenv("BROKERQ_PUT_WINDOW", "16")
    assert brokerq.Client(socket_path).put_window == 16
    assert brokerq.Client(socket_path, put_window=0).put_window == 0  # explicit wins
    monkeypatch.setenv("BROKERQ_PUT_WINDOW", "")
    assert brokerq.Client(socket_path).put_window == 0
    for bad in ("x", "1.5", "-1"):
        monkeypatch.setenv("BROKERQ_PUT_WINDOW", bad)
        with pytest.raises(ValueError, match="BROKERQ_PUT_WINDOW"):
            brokerq.Client(socket_path)
        with pytest.raises(ValueError, match="BROKERQ_PUT_WINDOW"):
            brokerq.connect(socket_path)
    monkeypatch.delenv("BROKERQ_PUT_WINDOW")
    with pytest.raises(ValueError, match="put_window"):
        brokerq.Client(socket_path, put_window=-1)
    assert not os.path.exists(socket_path)  # nothing was started for any of this


def test_a_window_from_the_environment_pipelines(
    socket_path: str, monkeypatch: pytest.MonkeyPatch, observer: brokerq.Client
) -> None:
    monkeypatch.setenv("BROKERQ_PUT_WINDOW", "4")
    with brokerq.connect(socket_path) as client:
        assert client.queue("q").put(b"x") == 0
        assert unacknowledged(client) == 1
    assert observer.queue("q").qsize() == 1
