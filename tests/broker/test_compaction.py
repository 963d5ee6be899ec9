"""Compaction in a real broker: under load nothing is lost, and the file shrinks.

The space of a message that is gone comes back in every path a user meets
(usage.md, "The journal", Compaction): while the broker runs, when it exits
(idle exit, ``stop``, SIGTERM), and when a broker starts on a journal that a
killed one left large. Each test keeps one small message live throughout and
checks that it is still there afterwards.
"""

from __future__ import annotations

import os
import signal
import threading

import pytest
from conftest import gone, wait_until

import brokerq
from brokerq.broker.server import COMPACT_AT_ONCE_MAX_BYTES, COMPACT_MIN_BYTES
from brokerq.protocol import DEFAULT_MAX_MESSAGE_SIZE


def test_compaction_under_load_loses_nothing_and_shrinks_the_file(socket_path: str) -> None:
    journal = socket_path + ".journal"
    body = b"x" * 1000
    total = 3 * COMPACT_MIN_BYTES // len(body)  # well past the compaction threshold
    with brokerq.connect(socket_path) as client:
        q = client.queue("q")
        received: list[bytes] = []

        def consume() -> None:
            consumer = brokerq.connect(socket_path)
            cq = consumer.queue("q")
            while len(received) < total:
                try:
                    received.extend(cq.get_many(100, timeout=10))
                except brokerq.Empty:
                    break
            consumer.close()

        consumer = threading.Thread(target=consume)
        consumer.start()
        sent = []
        for i in range(0, total, 50):
            batch = [b"%08d" % n + body for n in range(i, min(i + 50, total))]
            q.put_many(batch)
            sent += batch
        consumer.join(timeout=60)
        assert not consumer.is_alive()
        assert received == sent  # in order, each exactly once
        grown = os.path.getsize(journal)
        assert grown > COMPACT_MIN_BYTES
        # Housekeeping runs once a second: the drained journal is rewritten small.
        assert wait_until(
            lambda: os.path.getsize(journal) < COMPACT_MIN_BYTES // 10, what="compaction"
        )
        # The compacted journal still has what is live.
        q.put(b"after")
        pid = client.broker_pid
        os.kill(pid, 9)
    with brokerq.connect(socket_path) as client:
        assert client.queue("q").get_many(10, timeout=5) == [b"after"]
        assert not os.path.exists(journal + ".compact")


def test_compaction_keeps_live_messages(socket_path: str) -> None:
    journal = socket_path + ".journal"
    body = b"y" * 2000
    with brokerq.connect(socket_path) as client:
        q = client.queue("q")
        keep = client.queue("keep")
        keep.put_many([b"k%d" % i for i in range(100)])
        for _ in range(2 * COMPACT_MIN_BYTES // len(body) // 50 + 1):
            q.put_many([body] * 50)
            while True:
                try:
                    q.get_many(50, timeout=0)
                except brokerq.Empty:
                    break
        assert wait_until(
            lambda: os.path.getsize(journal) < COMPACT_MIN_BYTES // 2, what="compaction"
        )
        os.kill(client.broker_pid, 9)
    with brokerq.connect(socket_path) as client:
        assert client.queue("keep").get_many(1000, timeout=5) == [b"k%d" % i for i in range(100)]
        assert client.queue("q").stats()["ready"] == 0


# -- the space of one huge message ---------------------------------------------------

#: One message of the default --max-message-size (16 MiB): the issue's case.
HUGE = b"h" * DEFAULT_MAX_MESSAGE_SIZE


def journal_size(socket_path: str) -> int:
    return os.path.getsize(socket_path + ".journal")


def put_one_to_keep(socket_path: str, body: bytes = b"kept") -> None:
    with brokerq.connect(socket_path) as client:
        client.queue("keep").put(body)


def put_and_get_a_huge_one(client: brokerq.Client) -> None:
    """16 MiB put and got again: gone, but in the journal until it is compacted."""
    q = client.queue("huge")
    q.put(HUGE)
    assert q.get(timeout=10) == HUGE


def wait_gone(pid: int) -> None:
    wait_until(lambda: gone(pid), timeout=20, what=f"broker {pid} to exit")


def assert_kept(socket_path: str, body: bytes = b"kept") -> None:
    """The next broker (the one running, or a new one) still has the live message."""
    with brokerq.connect(socket_path) as client:
        assert client.queue("keep").get(timeout=5) == body
        assert client.queue("huge").stats()["ready"] == 0
    assert not os.path.exists(socket_path + ".journal.compact")


def test_the_space_of_a_huge_message_comes_back_while_the_broker_runs(socket_path: str) -> None:
    put_one_to_keep(socket_path)
    with brokerq.connect(socket_path) as client:
        pid = client.broker_pid
        put_and_get_a_huge_one(client)
        # The client stays connected: the broker neither exits nor restarts.
        assert wait_until(lambda: journal_size(socket_path) < COMPACT_MIN_BYTES, what="compaction")
        assert client.queue("keep").stats()["ready"] == 1
        assert client.broker_pid == pid
        os.kill(pid, signal.SIGKILL)  # what the running broker compacted is what replays
    wait_gone(pid)
    assert_kept(socket_path)


@pytest.mark.parametrize("exit_by", ["idle exit", "stop", "SIGTERM"])
def test_the_space_of_a_huge_message_comes_back_when_the_broker_exits(
    socket_path: str, monkeypatch: pytest.MonkeyPatch, exit_by: str
) -> None:
    """The broker exits right after the get: it compacts before it exits."""
    monkeypatch.setenv("BROKERQ_IDLE_EXIT", "1" if exit_by == "idle exit" else "0")
    put_one_to_keep(socket_path)
    with brokerq.connect(socket_path) as client:
        pid = client.broker_pid
        put_and_get_a_huge_one(client)
        if exit_by == "stop":
            assert client.stop()
        elif exit_by == "SIGTERM":
            os.kill(pid, signal.SIGTERM)
    wait_gone(pid)
    assert journal_size(socket_path) < COMPACT_MIN_BYTES
    assert_kept(socket_path)


def leave_a_large_journal(socket_path: str) -> None:
    """A broker SIGKILLed right after the get: nothing could compact the journal.

    (Its housekeeping might compact in the instant between the get and the
    kill; then the next broker is killed the same way.)
    """
    for _ in range(3):
        with brokerq.connect(socket_path) as client:
            pid = client.broker_pid
            put_and_get_a_huge_one(client)
            os.kill(pid, signal.SIGKILL)
        wait_gone(pid)
        if journal_size(socket_path) > len(HUGE):
            return
    raise AssertionError("every broker compacted before it was killed")


def test_a_broker_that_starts_on_a_journal_left_large_compacts_it_before_it_serves(
    socket_path: str,
) -> None:
    put_one_to_keep(socket_path)
    leave_a_large_journal(socket_path)
    with brokerq.connect(socket_path) as client:
        # The hello was answered: the journal was compacted before it.
        assert journal_size(socket_path) < COMPACT_MIN_BYTES
        assert client.queue("keep").stats()["ready"] == 1
    assert_kept(socket_path)


def test_a_broker_that_starts_on_a_journal_left_large_with_much_live_compacts_it_serving(
    socket_path: str,
) -> None:
    """Past COMPACT_AT_ONCE_MAX_BYTES live, the compaction at start runs while it serves."""
    keep = b"k" * (COMPACT_AT_ONCE_MAX_BYTES + 1024 * 1024)
    put_one_to_keep(socket_path, keep)
    leave_a_large_journal(socket_path)
    with brokerq.connect(socket_path) as client:
        assert client.queue("keep").stats()["ready"] == 1  # served at once
        assert wait_until(
            lambda: journal_size(socket_path) < len(keep) + COMPACT_MIN_BYTES,
            what="compaction",
        )
    assert_kept(socket_path, keep)
