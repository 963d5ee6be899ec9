"""Compaction in a real broker: under load nothing is lost, and the file shrinks."""

from __future__ import annotations

import os
import threading

from conftest import wait_until

import brokerq
from brokerq.server import COMPACT_MIN_BYTES


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
