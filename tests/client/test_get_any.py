"""get_any and reserve_any, the multi-queue wait, in both clients.

First the sans-IO half (the request built, the reply mapped, an older
broker's ``bad_request`` turned into NotSupported), then a real broker:
the order rule, the wait on every queue at once, leases, lost connections
and cancellation. An "older broker" is the real broker with the two ops
taken out of its request decoder, in its own process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable

import anyio
import pytest
from conftest import Procs, gone, run_cli, wait_until

import brokerq
from brokerq import protocol
from brokerq.client import api, calls

# -- sans-IO: the request and the reply ------------------------------------------------------------


def sent(call: calls.Call[protocol.R]) -> protocol.AnyRequest:
    """The request ``call`` puts on the wire, decoded as the broker decodes it."""
    wire = calls.Wire("/nowhere")
    wire.encode(call.kind, call.fields)
    return protocol.decode_request(bytes(wire.out)[protocol.HEADER_SIZE :])


def test_get_any_sends_the_queues_in_their_order() -> None:
    call = calls.get_any(iter(["high", "low", "jobs:dead"]), 2.5)
    assert call.wait == 2.5
    assert call.retry
    request = sent(call)
    assert isinstance(request, protocol.GetAny)
    assert (request.queues, request.timeout) == (["high", "low", "jobs:dead"], 2.5)


def test_reserve_any_sends_its_lease() -> None:
    request = sent(calls.reserve_any(("a", "b"), None, 60))
    assert isinstance(request, protocol.ReserveAny)
    assert (request.queues, request.timeout, request.lease) == (["a", "b"], None, 60)


@pytest.mark.parametrize(
    "queues",
    ["ab", b"ab", [], ["a", "a"], [f"q{i}" for i in range(65)], ["a", ""], ["a", 1], 7],
    ids=["str", "bytes", "none", "twice", "65", "empty_name", "not_a_name", "not_iterable"],
)
def test_a_bad_list_of_queues_is_refused_before_anything_is_sent(queues: object) -> None:
    with pytest.raises(brokerq.InvalidRequest):
        calls.get_any(queues, None)
    with pytest.raises(brokerq.InvalidRequest):
        calls.reserve_any(queues, None, None)


def test_bad_timeouts_and_leases_are_refused() -> None:
    with pytest.raises(brokerq.InvalidRequest):
        calls.get_any(["a"], -1)
    with pytest.raises(brokerq.InvalidRequest):
        calls.reserve_any(["a"], None, 0)
    assert len(calls.get_any([f"q{i}" for i in range(64)], 0).fields["queues"]) == 64


def test_the_reply_maps_to_the_queue_name_and_the_body() -> None:
    op = api.get_any(["a", "b"], 0)
    assert op.result(protocol.GetAnyReply(id=1, queue="b", msg_id=7, body=b"x")) == ("b", b"x")


def test_an_older_brokers_bad_request_is_not_supported() -> None:
    """An error reply read off the wire, as the broker writes it."""
    wire = calls.Wire("/nowhere")
    request_id = wire.encode(protocol.GetAny, calls.get_any(["a", "b"], 0).fields)
    refusal = protocol.Error(id=request_id, code="bad_request", message="unknown op 'get_any'")
    wire.feed(protocol.encode_frame(refusal))
    reply = wire.next_reply()
    assert reply is not None
    unknown = pytest.raises(brokerq.NotSupported, match=r"does not support get_any \(multi-queue")
    with unknown, calls.supported("get_any", "multi-queue wait"):
        wire.check(protocol.GetAnyReply, request_id, reply, lambda: None)
    assert issubclass(brokerq.NotSupported, brokerq.BrokerqError)
    # Any other error goes through as it is.
    with pytest.raises(brokerq.Empty), calls.supported("get_any", "multi-queue wait"):
        raise brokerq.Empty("nothing")


# -- a real broker: the blocking client ------------------------------------------------------------


def waiting_on(client: brokerq.Client, *names: str, waiters: int = 1) -> None:
    for name in names:
        wait_until(lambda n=name: client.queue(n).stats()["waiters"] == waiters, what="a wait")


def test_the_first_queue_in_the_list_that_has_a_message_gives_it(
    socket_path: str, observer: brokerq.Client
) -> None:
    observer.queue("low").put(b"l")
    observer.queue("high").put(b"h")
    with brokerq.connect(socket_path) as client:
        assert client.get_any(["high", "low"], timeout=0) == ("high", b"h")
        assert client.get_any(["high", "low"], timeout=0) == ("low", b"l")
        with pytest.raises(brokerq.Empty):
            client.get_any(["high", "low"], timeout=0)
        with pytest.raises(brokerq.Empty):
            client.get_any(["high", "low"], timeout=0.1)
    # Taken as a get takes: the task stays for a task_done.
    assert observer.queue("high").stats()["unfinished_tasks"] == 1


def test_a_wait_on_several_queues_is_served_by_any_of_them(
    socket_path: str, observer: brokerq.Client
) -> None:
    got: list[tuple[str, bytes]] = []
    with brokerq.connect(socket_path) as client:
        waiter = threading.Thread(target=lambda: got.append(client.get_any(["a", "b"], 20)))
        waiter.start()
        waiting_on(observer, "a", "b")
        observer.queue("b").put(b"to b")
        waiter.join(timeout=20)
        assert got == [("b", b"to b")]
        waiting_on(observer, "a", "b", waiters=0)  # gone from every line once served


def test_a_waiter_on_several_queues_takes_its_turn_in_each_line(
    socket_path: str, observer: brokerq.Client
) -> None:
    """Parked first, the multi-queue waiter is the longest waiter on "a":
    the first message on "a" is its, the next one the plain get's."""
    many: list[tuple[str, bytes]] = []
    one: list[bytes] = []
    with brokerq.connect(socket_path) as first, brokerq.connect(socket_path) as second:
        t1 = threading.Thread(target=lambda: many.append(first.get_any(["b", "a"], 20)))
        t1.start()
        waiting_on(observer, "a", "b")
        t2 = threading.Thread(target=lambda: one.append(second.queue("a").get(timeout=20)))
        t2.start()
        waiting_on(observer, "a", waiters=2)
        observer.queue("a").put_many([b"1", b"2"])
        t1.join(timeout=20)
        t2.join(timeout=20)
    assert (many, one) == ([("a", b"1")], [b"2"])


def test_reserve_any_gives_a_message_of_the_queue_it_came_from(
    socket_path: str, observer: brokerq.Client
) -> None:
    observer.queue("b").put_many([b"x", b"y", b"z"])
    with brokerq.connect(socket_path) as client:
        msg = client.reserve_any(["a", "b"], timeout=5, lease=60)
        assert (msg.queue.name, msg.body, msg.attempt) == ("b", b"x", 1)
        assert isinstance(msg.queue, brokerq.Queue)
        assert msg.queue.client is client
        msg.touch()
        msg.release()
        with client.reserve_any(["a", "b"], timeout=5) as again:
            assert (again.body, again.attempt) == (b"x", 2)  # acked on leaving the block
        client.reserve_any(["b"], timeout=5).bury()
        assert observer.queue("b").stats()["buried"] == 1
        with pytest.raises(RuntimeError), client.reserve_any(["a", "b"], timeout=5):
            raise RuntimeError("the block failed")  # released: it comes back
        assert client.queue("b").get_many(5, timeout=0) == [b"z"]
        with pytest.raises(brokerq.Empty):
            client.reserve_any(["a", "b"], timeout=0)


def test_a_lease_of_reserve_any_that_runs_out_delivers_the_message_again(
    socket_path: str,
) -> None:
    with brokerq.connect(socket_path) as client:
        client.queue("b").put(b"job")
        first = client.reserve_any(["a", "b"], timeout=5, lease=0.2)
        again = client.reserve_any(["a", "b"], timeout=10)
        assert (again.id, again.body, again.attempt) == (first.id, b"job", 2)
        with pytest.raises(brokerq.LeaseLost):
            first.ack()
        again.ack()


CONSUMER = """\
import sys, brokerq
msg = brokerq.connect(sys.argv[1]).reserve_any(["a", "b"], timeout=20)
print(msg.queue.name, msg.id, flush=True)
sys.stdin.read()  # and is killed here, holding the lease
"""


def test_a_consumer_killed_holding_a_message_gives_it_back(
    socket_path: str, observer: brokerq.Client, procs: Procs
) -> None:
    msg_id = observer.queue("b").put(b"job")
    consumer = procs([sys.executable, "-c", CONSUMER, socket_path], stdin=subprocess.PIPE)
    assert consumer.stdout is not None
    assert consumer.stdout.readline().split() == [b"b", str(msg_id).encode()]
    consumer.kill()
    consumer.wait(timeout=10)
    msg = observer.reserve_any(["a", "b"], timeout=10)
    assert (msg.id, msg.body, msg.attempt) == (msg_id, b"job", 2)
    msg.ack()


def test_a_get_any_waiting_while_the_broker_is_killed_is_sent_again(socket_path: str) -> None:
    got: list[tuple[str, bytes]] = []
    with brokerq.connect(socket_path) as client, brokerq.connect(socket_path) as other:
        first = client.broker_pid
        waiter = threading.Thread(target=lambda: got.append(client.get_any(["a", "b"], 30)))
        waiter.start()
        waiting_on(other, "a", "b")
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: gone(first), what="the broker to die")
        other.queue("b").put(b"after")  # reconnects (starting a new broker)
        waiter.join(timeout=30)
        assert got == [("b", b"after")]
        assert other.broker_pid != first  # (its connection is the new one)


# -- an older broker -------------------------------------------------------------------------------

OLDER_BROKER = """\
import sys, typing
import msgspec
from brokerq import protocol as p
known = [kind for kind in p.AnyRequest.__args__ if kind not in (p.GetAny, p.ReserveAny)]
p._request_decoder = msgspec.msgpack.Decoder(typing.Union[tuple(known)])
from brokerq.broker.daemon import main
main()
"""


def older_broker(procs: Procs, socket_path: str) -> subprocess.Popen[bytes]:
    """A broker in the foreground that knows neither get_any nor reserve_any."""
    proc = procs([sys.executable, "-c", OLDER_BROKER, socket_path])
    wait_until(lambda: os.path.exists(socket_path) or proc.poll() is not None, what="listen")
    assert proc.poll() is None
    return proc


def test_an_older_broker_raises_not_supported_and_serves_on(procs: Procs, socket_path: str) -> None:
    older_broker(procs, socket_path)
    with brokerq.connect(socket_path) as client:
        client.queue("a").put(b"kept")
        with pytest.raises(brokerq.NotSupported, match=r"get_any .* older than this client"):
            client.get_any(["a", "b"], timeout=1)
        with pytest.raises(brokerq.NotSupported, match="reserve_any"):
            client.reserve_any(["a", "b"], timeout=1)
        assert client.queue("a").get(timeout=1) == b"kept"  # the same connection, still good


def test_an_older_broker_raises_not_supported_to_the_async_client(
    backend: str, procs: Procs, socket_path: str
) -> None:
    older_broker(procs, socket_path)

    async def main() -> None:
        async with brokerq.open_async_client(socket_path) as client:
            with pytest.raises(brokerq.NotSupported, match="get_any"):
                await client.get_any(["a", "b"], timeout=1)
            with pytest.raises(brokerq.NotSupported, match="reserve_any"):
                await client.reserve_any(["a", "b"], timeout=1)
            with pytest.raises(brokerq.NotSupported, match="reserve_any"):
                async with client.reserve_any(["a", "b"], timeout=1):
                    pass
            await client.queue("a").put(b"x")
            assert await client.queue("a").get(timeout=1) == b"x"

    run(backend, main)


# -- a real broker: the async client ---------------------------------------------------------------


def run(backend: str, main: Callable[[], Awaitable[None]], limit: float = 60) -> None:
    async def bounded() -> None:
        with anyio.fail_after(limit):
            await main()

    anyio.run(bounded, backend=backend)


async def waits(client: brokerq.AsyncClient, *names: str, waiters: int = 1) -> None:
    with anyio.fail_after(10):
        for name in names:
            while (await client.queue(name).stats())["waiters"] != waiters:
                await anyio.sleep(0.005)


def test_async_get_any_and_reserve_any(backend: str, socket_path: str) -> None:
    async def main() -> None:
        async with brokerq.open_async_client(socket_path) as client:
            await client.queue("low").put(b"l")
            await client.queue("high").put(b"h")
            assert await client.get_any(["high", "low"], timeout=0) == ("high", b"h")
            assert await client.get_any(["high", "low"]) == ("low", b"l")
            with pytest.raises(brokerq.Empty):
                await client.get_any(["high", "low"], timeout=0.1)
            got: list[tuple[str, bytes]] = []
            async with anyio.create_task_group() as tg:

                async def consume() -> None:
                    got.append(await client.get_any(["high", "low"], timeout=20))

                tg.start_soon(consume)
                await waits(client, "high", "low")
                await client.queue("low").put(b"waited for")
            assert got == [("low", b"waited for")]

            await client.queue("low").put_many([b"1", b"2"])
            msg = await client.reserve_any(["high", "low"], timeout=5, lease=60)
            assert (msg.queue.name, msg.body, msg.attempt) == ("low", b"1", 1)
            assert isinstance(msg.queue, brokerq.AsyncQueue)
            await msg.touch()
            await msg.release()
            async with client.reserve_any(["high", "low"], timeout=5) as again:
                assert (again.body, again.attempt) == (b"1", 2)
            assert again.settled  # acked by the block
            with pytest.raises(RuntimeError):
                async with client.reserve_any(["high", "low"], timeout=5) as failed:
                    raise RuntimeError("the block failed")
            assert failed.body == b"2"
            taken = await client.reserve_any(["low"], timeout=5)
            assert (taken.body, taken.attempt) == (b"2", 2)  # released by the failed block
            await taken.bury()
            assert (await client.queue("low").stats())["buried"] == 1

    run(backend, main)


def test_a_cancelled_waiting_get_any_or_reserve_any_loses_nothing(
    backend: str, socket_path: str
) -> None:
    async def main() -> None:
        async with brokerq.open_async_client(socket_path) as client:
            with anyio.move_on_after(0.2) as scope:
                await client.get_any(["a", "b"])
            assert scope.cancelled_caught
            with anyio.move_on_after(0.2) as scope:
                await client.reserve_any(["a", "b"], timeout=10)
            assert scope.cancelled_caught
            await waits(client, "a", "b", waiters=0)  # gone from both lines
            await client.queue("b").put(b"kept")
            with brokerq.connect(socket_path) as other:
                assert other.get_any(["a", "b"], timeout=5) == ("b", b"kept")

    run(backend, main)


def test_a_get_any_cancelled_around_the_hand_over_loses_no_message(
    backend: str, socket_path: str
) -> None:
    """Cancel a waiting get_any as a put (from a thread) hands it a message,
    with the event loop held or free: every message is got exactly once,
    by the get_any that returned it or from its queue afterwards."""
    tries = 30

    async def main() -> None:
        async with brokerq.open_async_client(socket_path) as client:
            got: list[bytes] = []
            left: list[bytes] = []
            with brokerq.connect(socket_path) as producer:
                for i in range(tries):
                    scope = anyio.CancelScope()
                    queue = ("a", "b")[i % 2]

                    async def consume(scope: anyio.CancelScope = scope) -> None:
                        with scope:
                            got.append((await client.get_any(["a", "b"], timeout=10))[1])

                    async with anyio.create_task_group() as tg:
                        tg.start_soon(consume)
                        await waits(client, "a", "b")
                        put = threading.Thread(target=producer.queue(queue).put, args=(b"m%d" % i,))
                        put.start()
                        if i % 3 == 0:
                            put.join()  # the loop held: the reply is unread
                        else:
                            await anyio.sleep(0.001 * (i % 3))
                        scope.cancel()
                    await anyio.to_thread.run_sync(put.join)
                    await waits(client, "a", "b", waiters=0)
                    for name in ("a", "b"):
                        while (await client.queue(name).stats())["reserved"]:
                            await anyio.sleep(0.005)
                        with contextlib.suppress(brokerq.Empty):
                            left += await client.queue(name).get_many(100, timeout=0)
            assert sorted(got + left) == sorted(b"m%d" % i for i in range(tries))

    run(backend, main, limit=120)


def test_an_async_get_any_waiting_while_the_broker_is_killed_is_sent_again(
    backend: str, socket_path: str
) -> None:
    async def main() -> None:
        async with brokerq.open_async_client(socket_path) as client:
            first = (await client.stats())["pid"]
            got: list[tuple[str, bytes]] = []
            async with anyio.create_task_group() as tg:

                async def consume() -> None:
                    got.append(await client.get_any(["a", "b"], timeout=30))

                tg.start_soon(consume)
                await waits(client, "a", "b")
                os.kill(first, signal.SIGKILL)
                await anyio.to_thread.run_sync(wait_until, lambda: gone(first))
                await client.queue("a").put(b"after")  # reconnects (starting a new broker)
            assert got == [("a", b"after")]
            assert (await client.stats())["pid"] != first

    run(backend, main)


def test_brokerq_get_of_several_queues_from_an_older_broker_says_so(
    procs: Procs, socket_path: str
) -> None:
    older_broker(procs, socket_path)
    with brokerq.connect(socket_path) as client:
        client.queue("a").put(b"x")
    several = run_cli("--socket", socket_path, "get", "a", "b", "--timeout", "1")
    assert several.returncode == 1
    assert b"does not support reserve_any (multi-queue wait)" in several.stderr
    one = run_cli("--socket", socket_path, "get", "a", "--timeout", "1")  # as ever
    assert (one.returncode, one.stdout) == (0, b"x\n")
