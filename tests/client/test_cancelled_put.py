"""A put (or put_many) of the async client cancelled while it waits for room
(issue 16, item 5; docs/guarantees.md G58): when the call raises the
cancellation, the broker has withdrawn the put, and it is never enqueued;
if the broker made it first, the call returns its ids instead. Either way
the queue holds the message exactly as many times as the call says.

The races are forced, not hoped for: the broker is held at a pause point
(:mod:`brokerq.pause`) while the test cancels the call, and
``wait_all_tasks_blocked`` tells when the client has done what it does on
a cancellation; only then is the broker let go. On both backends. The
last test pins the broker's side (protocol.md 4, "End of a connection")
with a broker in this process.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import anyio
import pytest
import trio
import trio.testing
from test_async_client import run, until
from test_server import connect
from test_spawn_races import Pause

import brokerq
from brokerq import pause
from brokerq.broker.journal import Journal
from brokerq.broker.server import Broker, BrokerConfig
from brokerq.client.asynchronous import AsyncQueue
from brokerq.protocol import Configure, Get, GetReply, Put, PutReply

#: What each op puts; the queue is full with as many others.
BODIES = {"put": [b"x"], "put_many": [b"x", b"y"]}
FILLERS = [b"1", b"2"]


@pytest.fixture(params=list(BODIES))
def op(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def hold(sock_dir: str, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], Pause]:
    """Arm one broker pause point; the broker this test spawns inherits it."""

    def arm(point: str) -> Pause:
        held = Pause(sock_dir, point)
        monkeypatch.setenv(pause.ENV, held.spec)
        return held

    return arm


async def full_queue(client: brokerq.AsyncClient, op: str) -> tuple[AsyncQueue, list[bytes]]:
    """A queue with room for as many messages as ``op`` puts, and that many in it."""
    fillers = FILLERS[: len(BODIES[op])]
    q = client.queue("q", maxsize=len(fillers))
    await q.put_many(fillers)
    return q, fillers


async def put(q: AsyncQueue, op: str) -> list[int]:
    """The op, waiting for room as long as it takes."""
    if op == "put":
        return [await q.put(BODIES[op][0])]
    return await q.put_many(BODIES[op])


async def left_in(q: AsyncQueue) -> list[bytes]:
    """What the queue holds (taken), once no put waits for room any more."""
    stats = await q.stats()
    assert stats["putters"] == 0, stats
    try:
        return await q.get_many(10, timeout=0)
    except brokerq.Empty:
        return []


@pytest.mark.parametrize("point", ["broker.put_room", "broker.put_admitted"])
def test_a_put_cancelled_as_room_comes_returns_its_ids(
    backend: str, op: str, point: str, socket_path: str, hold: Callable[[str], Pause]
) -> None:
    """A get makes room for the waiting put; the broker is held before it
    admits the put (``broker.put_room``: the cancellation comes first) or
    just after (``broker.put_admitted``: the put is made first), and the
    call is cancelled meanwhile. The broker has not read the end of the
    put's connection when it admits it: the put is made, so the call must
    return its ids, and the queue holds its bodies once."""
    held = hold(point)

    async def main() -> None:
        async with brokerq.open_async_client(socket_path) as client:
            q, fillers = await full_queue(client, op)
            scope = anyio.CancelScope()
            made: list[list[int]] = []
            taken: list[bytes] = []

            async def putter() -> None:
                with scope:
                    made.append(await put(q, op))

            async def make_room() -> None:
                taken.extend(await client.queue("q").get_many(len(fillers), timeout=0))

            async with anyio.create_task_group() as tg:
                tg.start_soon(putter)
                await until(q, putters=1)
                tg.start_soon(make_room)
                await anyio.to_thread.run_sync(held.wait)
                scope.cancel()
                await anyio.wait_all_tasks_blocked()  # the client has met the cancellation
                held.release()
            assert taken == fillers
            left = await left_in(q)
            assert left == BODIES[op], "the put was made: the queue holds it once"
            assert made, "the put was made, yet the call raised the cancellation"
            assert len(made[0]) == len(BODIES[op])
            assert not scope.cancelled_caught

    run(backend, main)


def test_a_cancelled_put_raises_only_once_the_broker_withdrew_it(
    backend: str, op: str, socket_path: str, hold: Callable[[str], Pause]
) -> None:
    """The broker is held once it has read the end of the cancelled put's
    connection, before it withdraws the put: the call must not have
    returned yet. Once it raises the cancellation, no put waits, and room
    made at once admits nothing."""
    held = hold("broker.put_abandoned")

    async def main() -> None:
        async with brokerq.open_async_client(socket_path) as client:
            q, fillers = await full_queue(client, op)
            scope = anyio.CancelScope()
            made: list[list[int]] = []
            returned: list[bool] = []

            async def putter() -> None:
                try:
                    with scope:
                        made.append(await put(q, op))
                finally:
                    returned.append(True)

            async with anyio.create_task_group() as tg:
                tg.start_soon(putter)
                await until(q, putters=1)
                scope.cancel()
                await anyio.to_thread.run_sync(held.wait)
                await anyio.wait_all_tasks_blocked()
                returned_early = bool(returned)
                held.release()
            assert not returned_early, "the call raised before the broker withdrew the put"
            assert scope.cancelled_caught
            assert not made
            # Withdrawn before the call raised: no put waits, so the room
            # made now admits nothing.
            assert (await q.stats())["putters"] == 0
            assert await q.get_many(len(fillers), timeout=0) == fillers
            assert await left_in(q) == []

    run(backend, main)


def test_a_cancelled_put_the_broker_does_not_settle_in_time_raises_unavailable(
    backend: str, socket_path: str, hold: Callable[[str], Pause]
) -> None:
    """The broker is held before it withdraws the cancelled put, past the
    client's timeout: the call cannot say whether the put was made, so it
    raises BrokerUnavailable rather than the cancellation."""
    held = hold("broker.put_abandoned")

    async def main() -> None:
        async with brokerq.open_async_client(socket_path) as client:
            q, _ = await full_queue(client, "put")
            scope = anyio.CancelScope()
            errors: list[brokerq.BrokerUnavailable] = []

            async def putter() -> None:
                with scope:
                    try:
                        await put(q, "put")
                    except brokerq.BrokerUnavailable as exc:
                        errors.append(exc)

            client.timeout = 1.0  # (bounds the withdrawal)
            async with anyio.create_task_group() as tg:
                tg.start_soon(putter)
                await until(q, putters=1)
                scope.cancel()
                await anyio.to_thread.run_sync(held.wait)
            held.release()
            client.timeout = 10
            assert errors, "the call raised the cancellation, not knowing"
            assert "may have been enqueued" in str(errors[0])
            await until(q, putters=0)
            assert await left_in(q) == [b"1"]

    run(backend, main)


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
