"""The durable path: a preallocated journal and the group commit, in a broker.

In-process brokers (as in test_server.py) on a journal in /tmp, and one
spawned broker with ``--data-dir``, which preallocates as a user's does.
"""

from __future__ import annotations

import os
import threading

import pytest
import trio
from test_server import connect

import brokerq
from brokerq.broker.journal import Journal, in_memory_filesystem, read_journal
from brokerq.broker.server import COMPACT_MIN_BYTES, Broker, BrokerConfig
from brokerq.protocol import Put, PutReply, Stats, StatsReply


def open_journal(path: str) -> Journal:
    journal, _ = Journal.open(path, "batch", preallocate=True)
    journal.in_memory = False  # sync as on a disk, whatever /tmp is
    return journal


async def test_stats_journal_bytes_is_the_written_size_not_the_allocated_one(jdir: str) -> None:
    path = os.path.join(jdir, "j")
    journal = open_journal(path)
    broker = Broker(BrokerConfig(socket_path="/nonexistent/b.sock"), journal=journal)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(broker.serve, None)
            peer = await connect(broker)
            for i in range(20):
                assert isinstance(await peer.call(Put, queue="q", body=b"m%d" % i), PutReply)
            stats = await peer.call(Stats)
            assert isinstance(stats, StatsReply)
            written = stats.stats["journal_bytes"]
            assert written == journal.size == read_journal(path).end
            assert os.path.getsize(path) == journal.allocated > COMPACT_MIN_BYTES > written
            # The compaction trigger counts the records too, not the file's size.
            assert not broker._should_compact()
            broker.request_stop("test over")
    finally:
        journal.close()


async def test_one_sync_covers_every_put_that_arrived_while_the_last_ran(
    jdir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Group commit: while a sync runs, puts of other connections are written;
    once it ends, one more sync covers them all, and only then are they answered."""
    journal = open_journal(os.path.join(jdir, "j"))
    broker = Broker(BrokerConfig(socket_path="/nonexistent/b.sock"), journal=journal)
    real_sync = journal.sync
    syncing, release = threading.Event(), threading.Event()
    covered: list[int] = []

    def sync() -> int:  # a slow disk: the first sync takes until released
        synced = real_sync()
        covered.append(synced)
        if len(covered) == 1:
            syncing.set()
            release.wait(10)
        return synced

    monkeypatch.setattr(journal, "sync", sync)
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(broker.serve, None)
                first = await connect(broker)
                others = [await connect(broker) for _ in range(3)]
                await first.send(Put(id=1, queue="q", body=b"first"))
                await trio.to_thread.run_sync(syncing.wait, 10)
                for n, peer in enumerate(others):
                    await peer.send(Put(id=10 + n, queue="q", body=b"other"))
                await trio.testing.wait_all_tasks_blocked()
                written = journal.written
                assert covered == [journal.synced]
                assert journal.synced < written
                release.set()
                assert isinstance(await first.receive(), PutReply)
                for peer in others:
                    assert isinstance(await peer.receive(), PutReply)
                assert covered[1:] == [written]  # one more sync, covering all three
                broker.request_stop("test over")
    finally:
        journal.close()


def test_a_broker_with_a_data_dir_preallocates_and_reports_its_records(
    socket_path: str, sock_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = os.path.join(sock_dir, "data")
    os.mkdir(data_dir)
    if in_memory_filesystem(data_dir):
        pytest.skip("the data directory is on a tmpfs: no sync, no preallocation")
    monkeypatch.setenv("BROKERQ_DATA_DIR", data_dir)
    with brokerq.connect(socket_path) as client:
        queue = client.queue("q")
        for i in range(30):
            queue.put(b"durable %d" % i)
        stats = client.stats()
        assert stats["fsync"] == "batch"
        journal = stats["journal"]
        assert stats["journal_bytes"] == read_journal(journal).end
        assert os.path.getsize(journal) > stats["journal_bytes"]  # the zero tail
        client.stop()
    assert [m.body for m in replayed(journal)] == [b"durable %d" % i for i in range(30)]


def test_a_broker_that_does_not_sync_does_not_preallocate(
    socket_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BROKERQ_FSYNC", "never")
    with brokerq.connect(socket_path) as client:
        client.queue("q").put(b"x")
        stats = client.stats()
        assert os.path.getsize(stats["journal"]) == stats["journal_bytes"]
        client.stop()


def replayed(path: str) -> list[brokerq.broker.core.Message]:
    from brokerq.broker.core import BrokerCore

    core = BrokerCore(max_message_size=1000, max_deliveries=3, default_lease=30.0)
    for record in read_journal(path).records:
        core.apply(record)
    core.finish_replay(0.0)
    return list(core._queues["q"].ready)
