"""The blocking client against a real broker: API contract, threads, fork."""

from __future__ import annotations

import os
import queue as stdlib_queue
import threading
import time
from collections.abc import Iterator

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
    with pytest.raises(TypeError):
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
