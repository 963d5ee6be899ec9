"""The broker's side of withdrawing a put that waits for room
(docs/protocol.md, section 4, "End of a connection"): a put admitted before
the broker read the end of its half-closed connection has its reply written
before the close, however long its fsync takes.
"""

from __future__ import annotations

import os

import pytest
import trio
import trio.testing
from test_server import connect

from brokerq.journal import Journal
from brokerq.protocol import Configure, Get, GetReply, Put, PutReply
from brokerq.server import Broker, BrokerConfig


async def test_a_half_closed_put_admitted_is_answered_before_the_close(
    sock_dir: str, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.abc.Clock
) -> None:
    """Protocol.md 4, "End of a connection": a put admitted before the broker
    read the end of its (half-closed) connection gets its reply before the
    close, even when that reply waits for an fsync longer than the grace a
    closing connection gets for it."""
    syncing = trio.Event()
    disk = trio.Event()
    real_wait_synced = Broker.wait_synced

    async def slow_disk(self: Broker, lsn: int) -> None:
        syncing.set()
        await disk.wait()
        await real_wait_synced(self, lsn)

    journal, _ = Journal.open(os.path.join(sock_dir, "j"), "batch")
    journal.in_memory = False  # group commit even where /tmp is a tmpfs
    b = Broker(BrokerConfig(socket_path="/nonexistent/b.sock"), journal=journal)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(b.serve, None)
            producer, consumer = await connect(b), await connect(b)
            await consumer.call(Configure, queue="q", maxsize=1)
            assert isinstance(await consumer.call(Put, queue="q", body=b"1"), PutReply)
            await producer.send(Put(id=7, queue="q", body=b"x", timeout=None))
            await trio.testing.wait_all_tasks_blocked()  # it waits for room
            monkeypatch.setattr(Broker, "wait_synced", slow_disk)
            got = await consumer.call(Get, queue="q", timeout=0)  # room: "x" is admitted
            assert isinstance(got, GetReply)
            await syncing.wait()
            await producer.stream.send_eof()
            await trio.sleep(10)  # (virtual time) far past the closing connection's grace
            disk.set()
            reply = await producer.receive()
            assert isinstance(reply, PutReply)
            assert reply.id == 7
            assert await producer.at_eof()
            b.request_stop("the test is done")
    finally:
        monkeypatch.undo()
        journal.close()
