"""The async client against a real broker, under asyncio and trio alike.

Each test is a plain function that runs its ``main`` with ``anyio.run`` on
the backend it is given (pytest-trio's trio_mode and anyio's plugin are
left out of it), bounded by ``fail_after``: a real broker process answers,
so virtual clocks do not apply.
"""

from __future__ import annotations

import contextlib
import gc
import os
import queue as stdlib_queue
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable

import anyio
import pytest
from conftest import gone, wait_until

import brokerq
from brokerq.client.asynchronous import AsyncClient, AsyncQueue


def run(backend: str, main: Callable[[], Awaitable[None]], limit: float = 30) -> None:
    async def bounded() -> None:
        with anyio.fail_after(limit):
            await main()

    anyio.run(bounded, backend=backend)


async def until(q: AsyncQueue, **expected: int) -> dict[str, object]:
    """Poll the queue's stats until each key named has its value; return them."""
    with anyio.fail_after(10):
        while True:
            stats = await q.stats()
            if all(stats[key] == value for key, value in expected.items()):
                return stats
            await anyio.sleep(0.005)


async def settled(q: AsyncQueue) -> dict[str, object]:
    """The queue's stats once the broker has seen every close (no waiter, no lease)."""
    return await until(q, waiters=0, reserved=0)


# -- the API, round trip ---------------------------------------------------------------------------


def test_every_method_round_trips(backend: str, socket_path: str) -> None:
    async def main() -> None:
        async with brokerq.open_async_client(socket_path) as client:
            q = client.queue("q")
            first = await q.put(b"\x00binary\xff")
            assert await q.put("text é") > first
            assert await q.put_nowait(b"three", priority=0) > first
            ids = await q.put_many([b"4", b"5", b"6"], ttl=60)
            assert len(ids) == 3
            assert ids == sorted(ids)
            assert await q.qsize() == 6
            assert not await q.empty()
            assert await q.peek() == b"\x00binary\xff"
            assert await q.get() == b"\x00binary\xff"
            assert await q.get(timeout=1) == "text é".encode()
            assert await q.get_nowait() == b"three"
            assert await q.get_many(2, timeout=1) == [b"4", b"5"]
            assert await q.get_many(5, timeout=0) == [b"6"]
            assert await q.empty()

            await q.put(b"r")
            msg = await q.reserve(timeout=1, lease=5)
            assert (msg.body, msg.attempt) == (b"r", 1)
            before = msg.lease_expires
            await msg.touch(lease=20)
            assert msg.lease_expires > before
            await msg.release()
            msg = await q.reserve(timeout=1)
            assert msg.attempt == 2
            await msg.bury()
            assert (await q.stats())["buried"] == 1
            assert await q.kick(5) == 1
            msg = await q.reserve(timeout=0)
            await msg.ack()
            assert msg.settled

            config = await q.configure(max_deliveries=5, lease=60)
            assert (config["max_deliveries"], config["lease"]) == (5, 60)
            await q.put_many([b"x", b"y"])
            assert await q.purge() == 2
            await q.put(b"z")
            assert sorted(await client.queues()) == ["q"]
            assert await q.delete() == 1
            assert (await client.stats())["pid"] > 0
            assert await client.ping() > 0
            assert await client.stop() is True
            assert await client.stop() is False  # nothing runs now

    run(backend, main)


def test_queue_settings_apply_before_the_first_request(backend: str, socket_path: str) -> None:
    async def main() -> None:
        async with brokerq.open_async_client(socket_path) as client:
            q = client.queue("bounded", maxsize=2, lease=7)
            await q.put(b"1")
            stats = await q.stats()
            assert (stats["maxsize"], stats["lease"]) == (2, 7)

    run(backend, main)


def test_reserve_as_a_context_manager(backend: str, socket_path: str) -> None:
    async def main() -> None:
        async with brokerq.open_async_client(socket_path) as client:
            q = client.queue("q")
            await q.put(b"ok")
            async with q.reserve(timeout=1) as msg:
                assert msg.body == b"ok"
            stats = await q.stats()
            assert (stats["ready"], stats["reserved"]) == (0, 0)  # acked

            await q.put(b"fails")
            with pytest.raises(RuntimeError):
                async with q.reserve(timeout=1) as msg:
                    raise RuntimeError("handler failed")
            again = await q.reserve(timeout=1)  # released: delivered again
            assert (again.body, again.attempt) == (b"fails", 2)
            async with again:
                await again.bury()  # settled inside: the exit does nothing more
            assert (await q.stats())["buried"] == 1

            await q.put(b"cancelled")
            with anyio.move_on_after(0.1):
                async with q.reserve(timeout=1) as msg:
                    await anyio.sleep(10)
            msg = await q.reserve(timeout=1)  # released on the way out
            assert (msg.body, msg.attempt) == (b"cancelled", 2)
            await msg.ack()

    run(backend, main)


# -- tasks sharing a client ------------------------------------------------------------------------


def test_a_waiting_get_does_not_hold_up_a_put(backend: str, socket_path: str) -> None:
    async def main() -> None:
        async with brokerq.open_async_client(socket_path) as client:
            q = client.queue("q")
            got: list[bytes] = []

            async def consume() -> None:
                got.append(await q.get(timeout=10))

            async with anyio.create_task_group() as tg:
                tg.start_soon(consume)
                tg.start_soon(consume)

                await until(q, waiters=2)
                with anyio.fail_after(2):  # the puts do not queue behind the gets
                    await q.put(b"a")
                    await q.put(b"b")
            assert sorted(got) == [b"a", b"b"]

    run(backend, main)


def test_many_tasks_share_one_client(backend: str, socket_path: str) -> None:
    async def main() -> None:
        async with brokerq.open_async_client(socket_path) as client:
            q = client.queue("q")
            got: list[bytes] = []

            async def produce(t: int) -> None:
                for i in range(20):
                    await q.put(b"%d-%d" % (t, i))

            async def consume() -> None:
                while len(got) < 160:
                    with contextlib.suppress(brokerq.Empty):
                        got.extend(await q.get_many(7, timeout=0.2))

            async with anyio.create_task_group() as tg:
                for t in range(8):
                    tg.start_soon(produce, t)
                for _ in range(3):
                    tg.start_soon(consume)
            assert sorted(got) == sorted(b"%d-%d" % (t, i) for t in range(8) for i in range(20))

    run(backend, main)


# -- cancellation ----------------------------------------------------------------------------------


def test_a_cancelled_waiting_get_loses_nothing(backend: str, socket_path: str) -> None:
    async def main() -> None:
        async with brokerq.open_async_client(socket_path) as client:
            q = client.queue("q")
            with anyio.move_on_after(0.2) as scope:
                await q.get()
            assert scope.cancelled_caught
            with anyio.move_on_after(0.2):
                await q.get_many(3, timeout=5)
            await settled(q)
            await q.put(b"kept")
            # Another consumer (here a blocking client) finds it.
            with brokerq.connect(socket_path) as other:
                assert other.queue("q").get(timeout=5) == b"kept"

    run(backend, main)


def test_a_get_cancelled_after_the_hand_over_gives_the_message_back(
    backend: str, socket_path: str
) -> None:
    """Cancel a waiting get right as a put hands it the message, many times:
    every message put is then got exactly once, by a get that returned it or
    from the queue afterwards.

    The put comes from a thread (a blocking client) while the event loop is
    held with a blocking sleep, so the consumer cannot read the reply before
    the cancellation: "before" cancels around the hand-over, "handed" only
    once the broker reports the message delivered (its reply is then in the
    consumer's socket, unread), "free" lets the loop run first.
    """
    tries = 60

    async def main() -> None:
        async with brokerq.open_async_client(socket_path) as client:
            q = client.queue("q")
            blocking = brokerq.connect(socket_path)
            producer = blocking.queue("q")
            got: list[bytes] = []
            left: list[bytes] = []
            for i in range(tries):
                mode = ("before", "handed", "free")[i % 3]
                scope = anyio.CancelScope()

                async def consume(scope: anyio.CancelScope = scope) -> None:
                    with scope:
                        got.append(await q.get(timeout=10))

                async with anyio.create_task_group() as tg:
                    tg.start_soon(consume)

                    await until(q, waiters=1)
                    delivered = (await q.stats())["delivered_total"]
                    put = threading.Thread(target=producer.put, args=(b"m%d" % i,))
                    put.start()
                    if mode == "before":
                        time.sleep(random.uniform(0, 0.002))  # holds the loop
                    elif mode == "handed":
                        handed_over = delivered + 1
                        wait_until(lambda: producer.stats()["delivered_total"] == handed_over)  # noqa: B023
                    else:
                        await anyio.sleep(random.uniform(0, 0.002))
                    scope.cancel()
                await anyio.to_thread.run_sync(put.join)
                await settled(q)
                while True:
                    try:
                        left += await q.get_many(100, timeout=0)
                    except brokerq.Empty:
                        break
            assert sorted(got + left) == sorted(b"m%d" % i for i in range(tries))
            blocking.close()

    run(backend, main, limit=90)


def test_a_reserved_message_keeps_its_lease_while_other_requests_are_cancelled(
    backend: str, socket_path: str
) -> None:
    async def main() -> None:
        async with brokerq.open_async_client(socket_path) as client:
            q = client.queue("q")
            await q.put(b"held")
            msg = await q.reserve(timeout=1)
            for _ in range(3):  # each closes the connection it was waiting on
                with anyio.move_on_after(0.05):
                    await client.queue("other").get()
            stats = await q.stats()
            assert (stats["reserved"], stats["ready"]) == (1, 0)
            await msg.ack()  # no LeaseLost: its connection was never closed

    run(backend, main)


def test_a_dropped_unsettled_message_gives_back_its_connection(
    backend: str, socket_path: str
) -> None:
    async def main() -> None:
        async with brokerq.open_async_client(socket_path) as client:
            q = client.queue("q", lease=0.2)
            await q.put(b"dropped")
            idle = len(client._idle)
            msg = await q.reserve(timeout=1)
            assert msg.body == b"dropped"
            assert len(client._idle) == idle - 1  # the message holds it
            del msg
            gc.collect()
            assert len(client._idle) == idle  # given back to the pool
            # Its lease runs out and it is delivered again.
            again = await q.reserve(timeout=5)
            assert (again.body, again.attempt) == (b"dropped", 2)
            await again.ack()

    run(backend, main)


def test_a_put_waiting_for_room_can_be_cancelled(backend: str, socket_path: str) -> None:
    async def main() -> None:
        async with brokerq.open_async_client(socket_path) as client:
            q = client.queue("bounded", maxsize=1)
            await q.put(b"1")
            with anyio.move_on_after(0.2) as scope:
                await q.put(b"never")  # waits for room, for ever
            assert scope.cancelled_caught

            await until(q, putters=0)
            async with anyio.create_task_group() as tg:

                async def make_room() -> None:
                    await until(q, putters=1)  # the put below is waiting for room
                    assert await client.queue("bounded").get(timeout=5) == b"1"

                tg.start_soon(make_room)
                await q.put(b"2", timeout=5)  # waits until make_room takes "1"
            assert await q.get_many(5, timeout=0) == [b"2"]

    run(backend, main)


def test_a_get_is_shielded_once_the_message_is_taken(backend: str, socket_path: str) -> None:
    """A cancellation that is already pending does not lose a ready message:
    the get returns it, and the cancellation lands at the next checkpoint."""

    async def main() -> None:
        async with brokerq.open_async_client(socket_path) as client:
            q = client.queue("q")
            await q.put(b"ready")
            got: list[bytes] = []
            with anyio.CancelScope() as scope:
                scope.cancel()
                got.append(await q.get(timeout=5))
                await anyio.sleep(0)  # the checkpoint where it lands
                got.append(b"not reached")
            assert got == [b"ready"]
            assert (await settled(q))["ready"] == 0

    run(backend, main)


# -- the broker goes away --------------------------------------------------------------------------


def test_a_broker_killed_mid_get(backend: str, socket_path: str) -> None:
    async def main() -> None:
        async with brokerq.open_async_client(socket_path) as client:
            q = client.queue("q")
            await q.put(b"kept")  # journaled: a new broker has it
            first = (await client.stats())["pid"]
            assert await q.get(timeout=1) == b"kept"
            got: list[bytes] = []
            async with anyio.create_task_group() as tg:

                async def consume() -> None:
                    got.append(await q.get(timeout=20))

                tg.start_soon(consume)

                await until(q, waiters=1)
                os.kill(first, signal.SIGKILL)
                await anyio.to_thread.run_sync(wait_until, lambda: gone(first))
                await q.put(b"after")  # reconnects (starting a new broker)
            assert got == [b"after"]
            assert (await client.stats())["pid"] != first

    run(backend, main)


def test_the_client_spawns_the_broker(backend: str, socket_path: str) -> None:
    assert not os.path.exists(socket_path)

    async def main() -> None:
        async with brokerq.open_async_client(socket_path, timeout=5) as client:
            assert os.path.exists(socket_path)
            assert client.max_message_size is not None
            await client.queue("q").put(b"x")
        with brokerq.connect(socket_path) as blocking:
            assert blocking.queue("q").get(timeout=5) == b"x"

    run(backend, main)


# -- errors ----------------------------------------------------------------------------------------


def test_errors(backend: str, socket_path: str) -> None:
    async def main() -> None:
        async with brokerq.open_async_client(socket_path) as client:
            q = client.queue("q")
            with pytest.raises(stdlib_queue.Empty):
                await q.get_nowait()
            start = time.monotonic()
            with pytest.raises(brokerq.Empty):
                await q.get(timeout=0.2)
            assert time.monotonic() - start >= 0.19
            with pytest.raises(brokerq.Empty):
                await q.get_many(3, timeout=0.1)
            with pytest.raises(brokerq.Empty):
                await q.peek()
            with pytest.raises(brokerq.Empty):
                await q.reserve(timeout=0)

            with pytest.raises(brokerq.InvalidRequest):
                client.queue("")
            with pytest.raises(brokerq.InvalidRequest):
                await client.queue("q:dead").put(b"x")
            with pytest.raises(brokerq.InvalidRequest):
                await q.get(timeout=-1)
            with pytest.raises(brokerq.InvalidRequest):
                await q.get_many(0)
            with pytest.raises(brokerq.InvalidRequest):
                await q.put(12)  # type: ignore[arg-type]

            bounded = client.queue("bounded", maxsize=1)
            await bounded.put(b"1")
            with pytest.raises(stdlib_queue.Full):
                await bounded.put_nowait(b"2")
            start = time.monotonic()
            with pytest.raises(brokerq.Full):
                await bounded.put(b"2", timeout=0.2)
            assert time.monotonic() - start >= 0.19
            with pytest.raises(brokerq.Full):
                await bounded.put_many([b"2", b"3"], timeout=0.1)

            await q.put(b"m")
            msg = await q.reserve(timeout=1)
            await msg.ack()
            with pytest.raises(brokerq.LeaseLost):
                await msg.ack()
            assert await q.put(b"still fine")

        with pytest.raises(brokerq.BrokerqError, match="closed"):
            await q.put(b"x")
        with pytest.raises(brokerq.BrokerqError, match="closed"):
            await client.ping()

    run(backend, main)


def test_message_too_large(backend: str, socket_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROKERQ_MAX_MESSAGE_SIZE", "1000")  # reaches the spawned broker

    async def main() -> None:
        async with brokerq.open_async_client(socket_path) as client:
            assert client.max_message_size == 1000
            q = client.queue("q")
            with pytest.raises(brokerq.MessageTooLarge):
                await q.put(b"x" * 1001)
            with pytest.raises(brokerq.MessageTooLarge):
                await q.put_many([b"ok"] * 5 + [b"x" * 1001])  # nothing of it is sent
            assert await q.empty()
            bodies = [b"%04d" % i + b"x" * 296 for i in range(20)]  # several frames
            assert len(await q.put_many(bodies)) == 20
            got: list[bytes] = []
            while len(got) < 20:
                got += await q.get_many(20, timeout=1)
            assert got == bodies

    run(backend, main)


def test_closing_the_client_ends_a_waiting_get(backend: str, socket_path: str) -> None:
    async def main() -> None:
        client = AsyncClient(socket_path)
        q = client.queue("q")
        failed: list[BaseException] = []

        async def consume() -> None:
            try:
                await q.get(timeout=20)
            except brokerq.BrokerqError as exc:
                failed.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)

            await until(q, waiters=1)
            await client.aclose()
        assert len(failed) == 1
        assert "closed" in str(failed[0])

    run(backend, main)


def test_stop_without_a_broker(backend: str, socket_path: str) -> None:
    async def main() -> None:
        client = brokerq.AsyncClient(socket_path, timeout=2)
        assert await client.stop() is False
        assert not os.path.exists(socket_path)
        await client.aclose()

    run(backend, main)


# -- topics ----------------------------------------------------------------------------------------


async def live_count(client: AsyncClient, topic: str) -> int:
    topics: dict[str, dict[str, int]] = (await client.stats())["topics"]
    return topics.get(topic, {}).get("live", 0)


def test_publish_to_durable_and_live_subscribers(backend: str, socket_path: str) -> None:
    async def main() -> None:
        async with brokerq.open_async_client(socket_path) as client:
            assert await client.publish("events", b"nowhere") == 0
            queues = [client.queue("a"), client.queue("b")]
            for q in queues:
                await q.subscribe("events")
            bodies = [b"m%d" % i for i in range(30)]
            async with client.subscribe("events") as one:
                two = await client.subscribe("events")
                assert "events" in repr(two)
                for body in bodies:
                    assert await client.publish("events", body) == 4
                assert await client.publish("events", "text é") == 4
                got: list[bytes] = []
                async for body in one:
                    got.append(body)
                    if len(got) == len(bodies) + 1:
                        break
                assert got == [*bodies, "text é".encode()]
                assert [await two.get(timeout=5) for _ in got] == got
                with pytest.raises(brokerq.Empty):
                    await two.get(timeout=0)
                with pytest.raises(brokerq.InvalidRequest):
                    await two.get(timeout=-1)
                await two.aclose()
                with pytest.raises(
                    brokerq.BrokerqError, match="subscription to 'events' is closed"
                ):
                    await two.get(timeout=0)
            with pytest.raises(brokerq.BrokerqError, match="closed"):
                await one.get(timeout=0)
            for q in queues:
                assert await q.get_many(100, timeout=1) == got
            with anyio.fail_after(10):
                while await live_count(client, "events"):
                    await anyio.sleep(0.005)
            assert await client.publish("events", b"only the queues") == 2

            assert await queues[0].unsubscribe("events") is True
            assert await queues[0].unsubscribe("events") is False
            assert await client.publish("events", b"one queue") == 1
            assert await queues[1].get_many(10, timeout=1) == [b"only the queues", b"one queue"]
            assert await queues[0].get_many(10, timeout=1) == [b"only the queues"]

            with pytest.raises(brokerq.InvalidRequest):
                await client.publish("a:b", b"x")
            with pytest.raises(brokerq.InvalidRequest):
                await client.subscribe("")
            with pytest.raises(brokerq.InvalidRequest):
                await queues[0].subscribe("a:b")

    run(backend, main)


def test_a_live_subscription_sees_only_later_publishes(backend: str, socket_path: str) -> None:
    async def main() -> None:
        async with brokerq.open_async_client(socket_path) as client:
            sub = client.subscribe("events")  # not in effect until awaited or entered
            assert await client.publish("events", b"before") == 0
            async with sub:
                assert await client.publish("events", b"after") == 1
                assert await sub.get(timeout=5) == b"after"
                with pytest.raises(brokerq.Empty):
                    await sub.get(timeout=0.1)

    run(backend, main)


def test_a_cancelled_subscription_get_loses_nothing(backend: str, socket_path: str) -> None:
    async def main() -> None:
        async with (
            brokerq.open_async_client(socket_path) as client,
            client.subscribe("events") as sub,
        ):
            with anyio.move_on_after(0.2) as scope:
                await sub.get()
            assert scope.cancelled_caught
            with anyio.move_on_after(0.1) as scope:
                await sub.get(timeout=10)
            assert scope.cancelled_caught
            assert await client.publish("events", b"later") == 1  # still subscribed
            assert await sub.get(timeout=5) == b"later"

            # Publishes from a thread while gets are cancelled at random
            # points: each body is returned once, in order.
            bodies = [b"p%d" % i for i in range(300)]

            def publish_all() -> None:
                with brokerq.connect(socket_path) as publisher:
                    for body in bodies:
                        publisher.publish("events", body)

            got: list[bytes] = []
            async with anyio.create_task_group() as tg:
                tg.start_soon(anyio.to_thread.run_sync, publish_all)
                while len(got) < len(bodies):
                    with anyio.move_on_after(random.uniform(0, 0.002)):
                        got.append(await sub.get(timeout=10))
            assert got == bodies

    run(backend, main)


def test_a_live_subscription_comes_back_after_the_broker_is_killed(
    backend: str, socket_path: str
) -> None:
    async def main() -> None:
        async with brokerq.open_async_client(socket_path) as client:
            first = (await client.stats())["pid"]
            async with client.subscribe("events") as sub:
                got: list[bytes] = []
                async with anyio.create_task_group() as tg:

                    async def consume() -> None:
                        got.append(await sub.get(timeout=20))

                    tg.start_soon(consume)
                    os.kill(first, signal.SIGKILL)
                    await anyio.to_thread.run_sync(wait_until, lambda: gone(first))
                    with anyio.fail_after(10):  # the waiting get subscribes again
                        while await live_count(client, "events") != 1:
                            await anyio.sleep(0.005)
                    assert await client.publish("events", b"after") == 1
                assert got == [b"after"]
            assert (await client.stats())["pid"] != first

    run(backend, main)


def test_a_slow_live_subscriber_raises_subscriber_overflow(
    backend: str, socket_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BROKERQ_SUBSCRIBER_BUFFER", str(64 * 1024))  # reaches the spawned broker
    bodies = [b"%04d" % i + b"x" * 1020 for i in range(1000)]

    async def main() -> None:
        async with brokerq.open_async_client(socket_path) as client:
            assert (await client.stats())["subscriber_buffer"] == 64 * 1024
            slow = await client.subscribe("events")  # not read while the publishes go on
            fast_got: list[bytes] = []
            counts: list[int] = []

            async def read_fast(fast: brokerq.AsyncSubscription) -> None:
                async with fast:
                    async for body in fast:
                        fast_got.append(body)
                        if len(fast_got) == len(bodies):
                            return

            async with anyio.create_task_group() as tg:
                tg.start_soon(read_fast, await client.subscribe("events"))
                with anyio.fail_after(20):  # the slow subscriber never holds it up
                    for body in bodies:
                        counts.append(await client.publish("events", body))
            assert fast_got == bodies
            assert (counts[0], counts[-1]) == (2, 1)
            assert counts == sorted(counts, reverse=True)

            got: list[bytes] = []
            with pytest.raises(brokerq.SubscriberOverflow):  # noqa: PT012
                while True:
                    got.append(await slow.get(timeout=10))
            assert 0 < len(got) < len(bodies)
            assert got == bodies[: len(got)]
            with pytest.raises(brokerq.BrokerqError, match="dropped by the broker"):
                await slow.get(timeout=0)
            await slow.aclose()

    run(backend, main)


def test_what_came_before_an_overflow_is_read_before_it_raises(
    backend: str, socket_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Room for a few publishes; the first read before the rest (see test_client.py).
    monkeypatch.setenv("BROKERQ_SUBSCRIBER_BUFFER", str(256 * 1024))
    bodies = [b"%04d" % i + b"x" * (40 * 1024) for i in range(100)]  # large: see test_client.py

    async def main() -> None:
        async with (
            brokerq.open_async_client(socket_path) as client,
            client.subscribe("events") as slow,
        ):
            counts = [await client.publish("events", bodies[0])]
            got = [await slow.get(timeout=10)]
            counts += [await client.publish("events", body) for body in bodies[1:]]
            assert (counts[0], counts[-1]) == (1, 0)
            with pytest.raises(brokerq.SubscriberOverflow):  # noqa: PT012
                while True:
                    got.append(await slow.get(timeout=10))
            assert got == bodies[: len(got)]
            with pytest.raises(brokerq.BrokerqError, match="dropped by the broker"):
                await slow.get(timeout=0)

    run(backend, main)


# -- imports ---------------------------------------------------------------------------------------

NO_ANYIO = r"""
import sys
import brokerq
loaded = [m for m in ("trio", "anyio", "brokerq.client.asynchronous") if m in sys.modules]
assert not loaded, f"after import: {loaded}"
assert callable(brokerq.open_async_client)
assert "anyio" in sys.modules
print("ok")
"""


def test_import_brokerq_does_not_import_anyio() -> None:
    done = subprocess.run(
        [sys.executable, "-c", NO_ANYIO], capture_output=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == b"ok\n"
    assert brokerq.AsyncQueue is AsyncQueue
    with pytest.raises(AttributeError):
        _ = brokerq.NoSuchName


def test_timeout_0_connects_only_to_a_running_broker(backend: str, socket_path: str) -> None:
    async def main() -> None:
        with pytest.raises(brokerq.InvalidRequest, match="timeout must be a number"):
            brokerq.open_async_client(socket_path, timeout=-1)
        with pytest.raises(brokerq.BrokerUnavailable, match="no broker is running"):
            async with brokerq.open_async_client(socket_path, timeout=0):
                pass
        assert not os.path.exists(socket_path)  # none was started
        async with brokerq.open_async_client(socket_path) as running:
            async with brokerq.open_async_client(socket_path, timeout=0) as nowait:
                await nowait.queue("q").put(b"x")
                assert await running.queue("q").get(timeout=5) == b"x"
            await running.stop()

    run(backend, main)
