"""The direct hand-over: a parked get or reserve gets its reply written by
the task that handed it a message (connection.Connection.hand_over), over
real sockets. The order and fairness of handoffs are tested in test_core,
test_server and test_guarantees; these check the reply itself on each path:
whole at once, in parts (a body larger than the socket takes), and for a
reserve, with its lease."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

from conftest import wait_until

import brokerq

T = TypeVar("T")


def in_thread(fn: Callable[[], T]) -> Callable[[], T]:
    """Run ``fn`` in a thread now; the returned callable joins it and gives its result."""
    result: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # handed to the test's thread
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()

    def join() -> T:
        thread.join(timeout=30)
        assert not thread.is_alive()
        if errors:
            raise errors[0]
        return result[0]

    return join


def wait_for_waiters(queue: brokerq.Queue, n: int) -> None:
    wait_until(lambda: queue.stats()["waiters"] >= n, what=f"{n} gets to park")


def test_a_parked_get_gets_a_small_message_whole(socket_path: str) -> None:
    with brokerq.connect(socket_path) as client:
        q = client.queue("q")
        got = in_thread(lambda: q.get(timeout=20))
        wait_for_waiters(q, 1)
        q.put(b"small")
        assert got() == b"small"
        assert q.stats()["ready"] == 0


def test_a_parked_get_gets_a_body_larger_than_the_socket_takes(socket_path: str) -> None:
    """The hand-over writes what the socket takes; the parked task the rest."""
    body = bytes(range(256)) * 32768  # 8 MiB: many times a socket's buffer
    with brokerq.connect(socket_path) as client:
        q = client.queue("big")
        got = in_thread(lambda: q.get(timeout=20))
        wait_for_waiters(q, 1)
        q.put(body)
        assert got() == body
        q.put(b"next")  # the connection is still in step
        assert q.get(timeout=5) == b"next"


def test_a_parked_reserve_gets_its_lease_and_attempt(socket_path: str) -> None:
    with brokerq.connect(socket_path) as client:
        q = client.queue("r")
        held = in_thread(lambda: q.reserve(timeout=20, lease=30))
        wait_for_waiters(q, 1)
        msg_id = q.put(b"job")
        msg = held()
        assert (msg.id, msg.body, msg.attempt) == (msg_id, b"job", 1)
        assert 25 < msg.lease_expires - time.monotonic() <= 30
        assert q.stats()["reserved"] == 1
        msg.ack()
        assert q.stats()["reserved"] == 0


def test_a_released_message_is_handed_to_the_next_parked_consumer(socket_path: str) -> None:
    with brokerq.connect(socket_path) as client:
        q = client.queue("rel")
        q.put(b"job")
        first = q.reserve(timeout=5)
        second = in_thread(lambda: q.reserve(timeout=20))
        wait_for_waiters(q, 1)
        first.release()
        again = second()
        assert (again.body, again.attempt) == (b"job", 2)
        again.ack()


def test_parked_gets_are_served_longest_waiter_first(socket_path: str) -> None:
    with brokerq.connect(socket_path) as client:
        q = client.queue("fair")
        joins = []
        for n in range(1, 4):
            joins.append(in_thread(lambda: q.get(timeout=20)))
            wait_for_waiters(q, n)
        for body in (b"1", b"2", b"3"):
            q.put(body)
        assert [join() for join in joins] == [b"1", b"2", b"3"]
