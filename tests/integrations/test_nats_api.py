"""The queue API on NATS JetStream (brokerq.nats), against a real nats-server
of this module's own: what holds as on the local broker, and what is refused."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from extras import require
from nats_fixtures import clean_client, module_server  # noqa: F401
from nats_server import NatsServer

import brokerq

nats = require("nats", "nats")
import brokerq.nats  # noqa: E402
from brokerq.nats import naming  # noqa: E402


def test_put_get_in_order_and_empty(client: brokerq.nats.NatsClient) -> None:
    q = client.queue("jobs")
    ids = [q.put(b"a"), q.put("b")]
    assert ids[1] == ids[0] + 1  # put ids are the stream's sequence
    assert q.qsize() == 2
    assert q.get(timeout=5) == b"a"
    assert q.get_nowait() == b"b"
    with pytest.raises(brokerq.Empty):
        q.get_nowait()
    with pytest.raises(brokerq.Empty):
        q.get(timeout=0.3)
    assert q.empty()


def test_reserve_release_ack_count_attempts(client: brokerq.nats.NatsClient) -> None:
    q = client.queue("jobs")
    q.put(b"x")
    m = q.reserve(timeout=5)
    assert (m.body, m.attempt) == (b"x", 1)
    assert q.stats()["reserved"] == 1
    m.release()
    m = q.reserve(timeout=5)
    assert m.attempt == 2
    with m:
        pass  # a clean exit acks
    assert m.settled
    assert q.stats()["reserved"] == 0
    with pytest.raises(brokerq.Empty):
        q.get(timeout=0.3)


def test_a_lease_that_runs_out_redelivers(client: brokerq.nats.NatsClient) -> None:
    q = client.queue("leased", lease=1.0)
    q.put(b"x")
    first = q.reserve(timeout=5)
    again = q.reserve(timeout=5)  # not acked: back after the lease
    assert (again.body, again.attempt) == (b"x", 2)
    with pytest.raises(brokerq.LeaseLost):
        first.ack()
    again.ack()
    with pytest.raises(brokerq.Empty):
        q.get(timeout=1.5)


@pytest.mark.parametrize("verb", ["get", "get_many", "reserve"])
def test_a_message_judged_past_its_lease_is_taken_when_it_comes_back(
    client: brokerq.nats.NatsClient, monkeypatch: pytest.MonkeyPatch, verb: str
) -> None:
    """A redelivery's look among the buried copies may outlast its lease (a
    cluster electing the buried stream's leader): the message may be another
    consumer's by then, so it is not handed out (a get would raise LeaseLost
    at its ack, a reserve give out a lease already gone), and is taken when
    it comes back."""
    from brokerq.nats import burial

    q = client.queue(f"judged-{verb}", lease=1.0)
    q.put(b"x")
    q.reserve(timeout=5).release()  # its next delivery is a redelivery
    looked = []
    real = burial.finish_if_buried

    async def slow_the_first_time(home: object, msg: object) -> bool:
        looked.append(msg)
        if len(looked) == 1:
            await asyncio.sleep(1.5)  # past the 1 s lease
        return await real(home, msg)  # type: ignore[arg-type]

    monkeypatch.setattr(burial, "finish_if_buried", slow_the_first_time)
    if verb == "reserve":
        with q.reserve(timeout=10) as msg:
            assert msg.body == b"x"
    else:
        got = q.get(timeout=10) if verb == "get" else q.get_many(5, timeout=10)
        assert got == (b"x" if verb == "get" else [b"x"])
    assert len(looked) == 2
    with pytest.raises(brokerq.Empty):
        q.get(timeout=1.5)


def test_touch_keeps_the_lease(client: brokerq.nats.NatsClient) -> None:
    q = client.queue("touched", lease=1.0)
    q.put(b"x")
    m = q.reserve(timeout=5)
    for _ in range(3):
        time.sleep(0.5)
        m.touch()
    with pytest.raises(brokerq.Empty):
        q.get(timeout=0.1)  # still leased after 1.5 s
    m.ack()


def test_a_retried_put_with_the_same_key_is_dropped(server: NatsServer) -> None:
    async def main() -> None:
        async with brokerq.nats.AsyncNatsClient(server.url) as c:
            q = c.queue("dedupe")
            await c.ensure("dedupe")
            headers = {"Nats-Msg-Id": "the-same-key"}
            first = await c.js.publish(naming.subject("dedupe"), b"x", headers=headers)
            second = await c.js.publish(naming.subject("dedupe"), b"x", headers=headers)
            assert second.duplicate
            assert second.seq == first.seq
            assert await q.qsize() == 1
            await q.delete()

    asyncio.run(main())


def test_after_max_deliveries_a_message_moves_to_its_dead_letters(
    client: brokerq.nats.NatsClient,
) -> None:
    q = client.queue("jobs", max_deliveries=2)
    q.put(b"bad")
    for attempt in (1, 2):
        m = q.reserve(timeout=5)
        assert m.attempt == attempt
        m.release()
    with pytest.raises(brokerq.Empty):
        q.get(timeout=0.5)
    dead = client.queue("jobs:dead")
    assert dead.get(timeout=5) == b"bad"
    assert dead.qsize() == 0


def test_a_client_dying_mid_move_neither_loses_nor_doubles(server: NatsServer) -> None:
    """The move's first half (the dead-letter publish) made, its ack never
    sent: the message comes back, is moved again, and the second publish
    is dropped as a duplicate: one dead letter."""

    async def main() -> None:
        async with brokerq.nats.AsyncNatsClient(server.url) as c:
            q = c.queue("midmove", max_deliveries=1, lease=1.0)
            await q.put(b"x")
            await q.reserve(timeout=5)  # reserved, then abandoned
            await asyncio.sleep(1.2)  # its lease runs out: the next delivery is its 2nd
            psub = await c.js.pull_subscribe_bind(
                durable=naming.CONSUMER, stream=naming.stream_name("midmove")
            )
            (raw,) = await psub.fetch(1, timeout=5)
            await c.ensure("midmove:dead")
            dead_id = naming.dead_letter_id(raw.metadata.stream, raw.metadata.sequence.stream)
            await c.js.publish(
                naming.subject("midmove:dead"), raw.data, headers={"Nats-Msg-Id": dead_id}
            )
            # ... and the client dies here: no ack. Its lease runs out.
            await psub.unsubscribe()
            with pytest.raises(brokerq.Empty):
                await q.get(timeout=2.5)  # the redelivery is moved, not delivered
            dead = c.queue("midmove:dead")
            assert await dead.qsize() == 1
            assert await dead.get(timeout=1) == b"x"
            await q.delete()
            await dead.delete()

    asyncio.run(main())


def test_delay_and_ttl(client: brokerq.nats.NatsClient) -> None:
    q = client.queue("timed")
    q.put(b"later", delay=1.0)
    with pytest.raises(brokerq.Empty):
        q.get(timeout=0.3)
    started = time.monotonic()
    m = q.reserve(timeout=5)
    assert m.body == b"later"
    assert m.attempt == 1  # its deferral was no attempt
    assert time.monotonic() - started > 0.3
    m.ack()
    q.put(b"gone", ttl=0.2)
    time.sleep(0.4)
    with pytest.raises(brokerq.Empty):
        q.get(timeout=0.5)


def test_many_peek_purge_stats(client: brokerq.nats.NatsClient) -> None:
    q = client.queue("many")
    assert q.put_many([b"1", b"2", b"3"]) == [1, 2, 3]
    assert q.peek() == b"1"
    assert q.get_many(2, timeout=5) == [b"1", b"2"]
    stats = q.stats()
    assert (stats["name"], stats["ready"], stats["reserved"]) == ("many", 1, 0)
    assert stats["max_deliveries"] == 20
    assert q.purge() == 1
    assert q.empty()
    assert "many" in client.queues()


def test_what_cannot_hold_is_refused_naming_feature_and_backend(
    client: brokerq.nats.NatsClient,
) -> None:
    q = client.queue("refused")
    with pytest.raises(brokerq.NotSupported, match="priority is not supported by the NATS"):
        q.put(b"x", priority=1)
    q.put(b"x")
    q.reserve(timeout=5).ack()
    assert 0 < client.ping() < 5  # (a NATS PING's round trip)
    for call in (
        lambda: client.get_any(["refused"], timeout=0),
        lambda: client.reserve_any(["refused"], timeout=0),
        client.stop,
        lambda: client.broker_pid,
    ):
        with pytest.raises(brokerq.NotSupported, match="NATS backend"):
            call()


def test_live_publish_and_subscribe(client: brokerq.nats.NatsClient) -> None:
    with client.subscribe("news") as sub:
        client.publish("news", b"hello")
        assert sub.get(timeout=5) == b"hello"
        with pytest.raises(brokerq.Empty):
            sub.get(timeout=0.1)


def test_async_client_under_asyncio(server: NatsServer) -> None:
    async def main() -> None:
        async with brokerq.open_async_client(server.url) as c:
            assert isinstance(c, brokerq.nats.AsyncNatsClient)
            q = c.queue("async")
            await q.put(b"x")
            async with q.reserve(timeout=5) as m:  # as the local AsyncQueue's
                assert m.body == b"x"
            await q.put(b"y")
            m = await q.reserve(timeout=5)
            assert (m.body, m.attempt) == (b"y", 1)
            await m.release()
            assert await q.get(timeout=5) == b"y"
            assert await q.empty()
            async with c.subscribe("async-news") as sub:
                await c.publish("async-news", b"hello")
                assert await sub.get(timeout=5) == b"hello"
            assert await q.unfinished_tasks() == 1  # the get's task_done is owed
            await q.task_done()
            assert await q.unfinished_tasks() == 0
            with pytest.raises(brokerq.NotSupported, match=r"get_any .* NATS backend"):
                await c.get_any(["async"], timeout=0)
            await q.delete()

    asyncio.run(main())


def test_async_prefetch_hands_out_in_order_and_gives_back_on_close(server: NatsServer) -> None:
    async def main() -> None:
        async with brokerq.open_async_client(server.url, prefetch=8) as c:
            q = c.queue("async-pf")
            await q.put_many([b"%02d" % i for i in range(20)])
            assert [await q.get(timeout=5) for _ in range(5)] == [b"%02d" % i for i in range(5)]
            m = await q.reserve(timeout=5, lease=60)  # (a held one: its lease starts now)
            assert m.body == b"05"
            assert m.lease_expires - time.monotonic() > 55
            await m.ack()
        async with brokerq.open_async_client(server.url) as c:
            q = c.queue("async-pf")
            rest = await q.get_many(20, timeout=5)  # what the closed client held came back
            assert rest == [b"%02d" % i for i in range(6, 20)]
            await q.delete()

    asyncio.run(main())


def test_async_client_under_trio_says_asyncio_only(server: NatsServer) -> None:
    import trio

    async def main() -> None:
        with pytest.raises(brokerq.NotSupported, match="asyncio only"):
            await brokerq.nats.AsyncNatsClient(server.url).connect()

    trio.run(main)


def test_brokerq_url_routes_code_that_names_no_broker(
    server: NatsServer, monkeypatch: pytest.MonkeyPatch, socket_path: str
) -> None:
    monkeypatch.setenv("BROKERQ_URL", server.url)
    with brokerq.connect() as c:
        assert isinstance(c, brokerq.nats.NatsClient)
    q = brokerq.Queue("routed")
    assert isinstance(q, brokerq.nats.NatsQueue)
    q.put(b"x")
    assert q.get(timeout=5) == b"x"
    q.delete()
    q.client.close()  # (the shared client of Queue(name) for this URL)
    # A socket named explicitly wins over BROKERQ_URL.
    local = brokerq.Queue("routed", socket=socket_path)
    assert isinstance(local, brokerq.Queue)
    assert not isinstance(local, brokerq.nats.NatsQueue)
    with brokerq.connect(prefetch=4, put_window=8) as streaming:
        assert isinstance(streaming, brokerq.nats.NatsClient)
        assert (streaming.prefetch, streaming.put_window) == (4, 8)
    local.client.close()
    # A nats:// URL as the socket: NATS, whatever the environment says.
    monkeypatch.delenv("BROKERQ_URL")
    named = brokerq.Queue("routed", socket=server.url)
    assert isinstance(named, brokerq.nats.NatsQueue)
    assert named.qsize() == 0
    named.delete()
    named.client.close()


def test_a_forked_child_gets_its_own_connection(client: brokerq.nats.NatsClient) -> None:
    q = client.queue("forked")
    q.put(b"from parent")
    pid = os.fork()
    if pid == 0:  # the child: the parent's loop thread is not here
        try:
            code = 0 if q.get(timeout=5) == b"from parent" and q.put(b"from child") else 1
        except BaseException:
            code = 2
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert q.get(timeout=5) == b"from child"


def test_a_full_queue_refuses_a_put_until_the_timeout_and_drops_none(
    client: brokerq.nats.NatsClient,
) -> None:
    q = client.queue("bounded", maxsize=2)
    q.put(b"1")
    q.put(b"2")
    with pytest.raises(brokerq.Full):
        q.put_nowait(b"3")
    with pytest.raises(brokerq.Full):
        q.put(b"3", timeout=0.3)
    assert q.get(timeout=5) == b"1"
    q.put(b"3", timeout=5)  # room again
    assert q.get_many(5, timeout=5) == [b"2", b"3"]
    assert q.stats()["maxsize"] == 2


def docs_example() -> str:
    """The producer and consumer of docs/nats.md, "The same code on both"."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "nats.md").read_text()
    section = text.split("## The same code on both", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_docs_example_runs_unchanged_on_a_socket_and_on_nats(
    server: NatsServer, socket_path: str
) -> None:
    """The application code of docs/nats.md, as written, against the local
    broker (BROKERQ_SOCKET) and against NATS (BROKERQ_URL): the same output."""
    code = docs_example()
    outputs = []
    for env in ({"BROKERQ_SOCKET": socket_path}, {"BROKERQ_URL": server.url}):
        done = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        outputs.append(done.stdout)
    assert outputs[0] == outputs[1] == "['photo-0.png', 'photo-1.png', 'photo-2.png']\n"
    with brokerq.nats.connect(server.url) as c:
        assert c.queue("resize").empty()
        c.queue("resize").delete()


def test_the_commands_run_on_nats_with_url_and_refuse_what_it_lacks(
    server: NatsServer, socket_path: str
) -> None:
    from conftest import run_cli

    env = {"BROKERQ_URL": server.url}
    done = run_cli("put", "clijobs", "a", "b", env=env)
    assert (done.returncode, done.stdout) == (0, b"1\n2\n"), done.stderr
    done = run_cli("get", "clijobs", env=env)
    assert (done.returncode, done.stdout) == (0, b"a\n"), done.stderr
    # --url after the command, without the variable, works the same.
    done = run_cli("get", "clijobs", "--json", "--url", server.url)
    assert done.stdout == b'{"id": 2, "queue": "clijobs", "attempt": 1, "body": "b"}\n'
    done = run_cli("get", "clijobs", "--timeout", "0.3", env=env)
    assert done.returncode == 3
    done = run_cli("ping", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"pong from {server.url} in ".encode())
    done = run_cli("stop", env=env)
    assert done.returncode == 1
    assert done.stderr.startswith(b"brokerq: stop")
    assert b"is not supported by the NATS backend" in done.stderr
    assert run_cli("delete", "clijobs", env=env).stdout == b"0\n"
    # A --socket given explicitly wins over BROKERQ_URL: the local broker.
    done = run_cli("--socket", socket_path, "put", "clijobs", "local", env=env)
    assert done.returncode == 0, done.stderr
    with brokerq.nats.connect(server.url) as c:
        assert "clijobs" not in c.queues()
    assert run_cli("get", "clijobs", "--socket", socket_path, env=env).stdout == b"local\n"


@pytest.mark.parametrize(
    ("args", "feature"),
    [
        (["stop"], "stop"),
        (["serve"], "serve"),
        (["get", "a", "b"], "get from several queues"),
    ],
)
def test_a_command_nats_lacks_says_so_in_one_line(
    server: NatsServer, args: list[str], feature: str
) -> None:
    from conftest import run_cli

    done = run_cli(*args, env={"BROKERQ_URL": server.url})
    assert done.returncode == 1
    assert done.stderr.startswith(
        f"brokerq: {feature} is not supported by the NATS backend".encode()
    )
    assert done.stderr.count(b"\n") == 1


def test_get_many_in_batches_returns_each_message_once(client: brokerq.nats.NatsClient) -> None:
    q = client.queue("batches")
    sent = [f"m{i}".encode() for i in range(250)]
    q.put_many(sent)
    got: list[bytes] = []
    while len(got) < len(sent):
        batch = q.get_many(100, timeout=5)
        assert 1 <= len(batch) <= 100
        got += batch
    assert got == sent  # in order, each once
    assert q.stats()["reserved"] == 0
    with pytest.raises(brokerq.Empty):
        q.get_many(10, timeout=0.2)


def test_put_many_on_a_full_queue_puts_what_fits_then_raises_full(
    client: brokerq.nats.NatsClient,
) -> None:
    q = client.queue("bounded-many", maxsize=3)
    with pytest.raises(brokerq.Full):
        q.put_many([b"1", b"2", b"3", b"4", b"5"], timeout=0.3)
    assert q.get_many(10, timeout=5) == [b"1", b"2", b"3"]
    assert q.put_many([b"4", b"5"], timeout=5) == [4, 5]


PREFETCHER = """
import sys, time, brokerq
client = brokerq.connect(sys.argv[1], prefetch=32)
print(client.queue(sys.argv[2]).get(timeout=10).decode(), flush=True)
time.sleep(60)  # (killed before this ends, holding what it prefetched)
"""


def test_a_killed_prefetching_consumer_loses_nothing_it_held(
    client: brokerq.nats.NatsClient,
) -> None:
    """What a prefetch held and never handed out comes back once its lease
    ends: each message is got once (the one handed out is gone for good)."""
    q = client.queue("pfkill", lease=1)
    q.put_many([b"%02d" % i for i in range(20)])
    proc = subprocess.Popen(
        [sys.executable, "-c", PREFETCHER, client.url, "pfkill"], stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline().strip()
        assert first == b"00"
        assert q.stats()["reserved"] == 19  # (held by the prefetch)
    finally:
        proc.kill()
        proc.wait(10)
    rest: list[bytes] = []
    deadline = time.monotonic() + 15
    while len(rest) < 19 and time.monotonic() < deadline:
        rest += q.get_many(19, timeout=5)
    assert [first, *sorted(rest)] == [b"%02d" % i for i in range(20)]
    q.delete()
