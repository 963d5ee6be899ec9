"""A queue's durable subscription to a topic on NATS (brokerq/nats/topics.py):
what no consumer sees is kept, a server restart loses nothing acknowledged,
a client SIGKILLed between two steps leaves a safe state, and the commands."""

from __future__ import annotations

import asyncio
import signal
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from conftest import Procs, run_cli, wait_until
from extras import require
from nats_fixtures import kill_once_it_says, own_server  # noqa: F401
from nats_server import NatsServer, require_server, start_server

import brokerq

require("nats", "nats")
require_server()
import brokerq.nats  # noqa: E402
from brokerq.nats import naming, topics  # noqa: E402


def restart(server: NatsServer) -> NatsServer:
    """Stop ``server`` by its pid (SIGTERM) and start it again on the same
    port and storage, as an operator's restart; ``stop()`` the new one."""
    server.process.send_signal(signal.SIGTERM)
    server.process.wait(10)
    again = start_server(port=server.port, store_dir=server.store_dir)
    try:
        wait_until(lambda: _answers(again.url), 20, "the restarted server's JetStream")
    except BaseException:
        again.stop()
        raise
    return again


def _answers(url: str) -> bool:
    try:
        with brokerq.nats.connect(url, timeout=2) as c:
            c.queues()
        return True
    except brokerq.BrokerqError:
        return False


def name(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:8]


def test_publishes_while_no_consumer_runs_are_all_on_each_subscribed_queue(
    server: NatsServer,
) -> None:
    topic, queues = name("news"), [name("audit"), name("mail")]
    with brokerq.nats.connect(server.url) as c:
        for q in queues:
            c.queue(q).subscribe(topic)
    # Another client, later, publishes while nobody consumes.
    with brokerq.nats.connect(server.url) as c:
        assert [c.publish(topic, f"n{i}".encode()) for i in range(20)] == [2] * 20
    with brokerq.nats.connect(server.url) as c:
        for q in queues:
            assert c.queue(q).get_many(50, timeout=5) == [f"n{i}".encode() for i in range(20)]
        assert c.topics() == {topic: sorted(queues)}
        # The subscriptions' stream is not a queue.
        assert naming.SUBSCRIPTIONS_STREAM not in str(c.queues())


def test_a_server_restart_loses_nothing_acknowledged_and_copies_nothing_twice(
    server: NatsServer,
) -> None:
    with brokerq.nats.connect(server.url) as c:
        q = c.queue("kept")
        q.subscribe("events")
        assert [c.publish("events", f"e{i}".encode()) for i in range(5)] == [1] * 5
        assert q.get_many(2, timeout=5) == [b"e0", b"e1"]  # taken before the restart
    server = restart(server)
    try:
        with brokerq.nats.connect(server.url) as c:
            q = c.queue("kept")
            assert q.get_many(10, timeout=5) == [b"e2", b"e3", b"e4"]  # once each
            assert c.publish("events", b"after") == 1  # still subscribed
            assert q.get_many(10, timeout=5) == [b"after"]
            with pytest.raises(brokerq.Empty):
                q.get(timeout=0.5)
    finally:
        server.stop()


def test_a_copy_sent_again_under_its_key_is_dropped(server: NatsServer) -> None:
    """A publish whose reply was lost sends its copies again with the same
    key: each queue keeps one."""

    async def main() -> None:
        async with brokerq.nats.AsyncNatsClient(server.url) as c:
            q = c.queue("once")
            await q.subscribe("t")
            headers = {"Nats-Msg-Id": "one-publish"}
            assert await topics.publish(c, "t", b"x", headers) == 1
            assert await topics.publish(c, "t", b"x", headers) == 1  # (acknowledged: a duplicate)
            assert await q.get_many(10, timeout=2) == [b"x"]
            assert await c.topics() == {"t": ["once"]}
            assert await q.unsubscribe("t") is True
            assert await c.topics() == {}

    asyncio.run(main())


def test_a_full_queue_misses_the_copy_as_on_the_local_broker(server: NatsServer) -> None:
    with brokerq.nats.connect(server.url) as c:
        small, big = c.queue("small", maxsize=1), c.queue("big")
        small.subscribe("t")
        big.subscribe("t")
        assert c.publish("t", b"1") == 2
        assert c.publish("t", b"2") == 1  # small is full: not counted, not waited for
        assert small.get_many(10, timeout=2) == [b"1"]
        assert big.get_many(10, timeout=2) == [b"1", b"2"]


def test_a_deleted_queue_subscribes_no_more(server: NatsServer) -> None:
    with brokerq.nats.connect(server.url) as c:
        q = c.queue("gone")
        q.subscribe("t")
        q.subscribe("u")
        q.delete()
        assert c.topics() == {}
        assert c.publish("t", b"x") == 0
        assert "gone" not in c.queues()  # a publish does not make it again


def test_bad_input_is_an_invalid_request(server: NatsServer) -> None:
    with brokerq.nats.connect(server.url) as c:
        q = c.queue("fine")
        for bad in ("", "a:b", "tab\there", 5):
            with pytest.raises(brokerq.InvalidRequest):
                q.subscribe(bad)  # type: ignore[arg-type]
            with pytest.raises(brokerq.InvalidRequest):
                q.unsubscribe(bad)  # type: ignore[arg-type]
            with pytest.raises(brokerq.InvalidRequest):
                c.publish(bad, b"x")  # type: ignore[arg-type]
        for ttl in (0, -1, "5"):
            with pytest.raises(brokerq.InvalidRequest):
                c.publish("t", b"x", ttl=ttl)  # type: ignore[arg-type]
        with pytest.raises(brokerq.InvalidRequest):
            c.queue("x" * 300).subscribe("t")  # its stream's name would be too long
        assert c.topics() == {}


#: A client that subscribes queues to a topic, or publishes to it, with the
#: step named in argv[3] paused: it says "paused" and waits to be SIGKILLed.
PAUSED = textwrap.dedent(
    """
    import asyncio, sys
    import brokerq.nats
    from brokerq.nats import topics

    url, topic, step, *queues = sys.argv[1:]

    async def pause(*args, **kwargs):
        print("paused", flush=True)
        await asyncio.sleep(3600)

    async def main():
        async with brokerq.nats.AsyncNatsClient(url) as c:
            if step == "subscribe":  # the queue made, its record not written
                topics._ensure_registry = pause
                await c.queue(queues[0]).subscribe(topic)
            else:  # the first queue's copy made, the second's not
                copy, first_done = topics.copy, asyncio.Event()

                async def one_then_pause(host, queue, data, headers):
                    if queue == queues[1]:
                        await first_done.wait()
                        await pause()
                    made = await copy(host, queue, data, headers)
                    first_done.set()
                    return made

                topics.copy = one_then_pause
                await c.publish(topic, b"midway")

    asyncio.run(main())
    """
)


def _kill_when_paused(procs: Procs, url: str, *args: str) -> None:
    kill_once_it_says(procs, [sys.executable, "-c", PAUSED, url, *args], b"paused\n")


def test_a_publisher_killed_between_two_copies_doubles_none_and_keeps_the_subscriptions(
    server: NatsServer, procs: Procs
) -> None:
    with brokerq.nats.connect(server.url) as c:
        first, second = c.queue("first"), c.queue("second")
        first.subscribe("t")
        second.subscribe("t")
        _kill_when_paused(procs, server.url, "t", "publish", "first", "second")
        # Not acknowledged, so not promised: one copy made, none doubled.
        assert first.get_many(10, timeout=2) == [b"midway"]
        with pytest.raises(brokerq.Empty):
            second.get(timeout=0.5)
        assert c.topics() == {"t": ["first", "second"]}
        assert c.publish("t", b"next") == 2


def test_a_subscriber_killed_before_its_record_leaves_the_queue_unsubscribed(
    server: NatsServer, procs: Procs
) -> None:
    _kill_when_paused(procs, server.url, "t", "subscribe", "half")
    with brokerq.nats.connect(server.url) as c:
        assert "half" in c.queues()  # the first step: made, and empty
        assert c.publish("t", b"lost to nobody") == 0  # not subscribed: nothing promised
        half = c.queue("half")
        half.subscribe("t")  # done again, whole
        assert c.publish("t", b"kept") == 1
        assert half.get_many(10, timeout=2) == [b"kept"]


def test_the_topic_commands_run_under_url(server: NatsServer) -> None:
    env = {"BROKERQ_URL": server.url}
    done = run_cli("subscribe", "news", "--queue", "audit", env=env)
    assert (done.returncode, done.stderr) == (0, b"")
    done = run_cli("publish", "news", "one", "two", env=env)
    assert (done.returncode, done.stdout) == (0, b"1\n1\n"), done.stderr
    done = run_cli("topics", env=env)
    assert done.returncode == 0, done.stderr
    header, row = done.stdout.decode().splitlines()
    assert header.split()[:2] == ["topic", "queues"]
    assert row.split()[:2] == ["news", "audit"]
    assert run_cli("get", "audit", env=env).stdout == b"one\n"
    assert run_cli("unsubscribe", "news", "--queue", "audit", env=env).returncode == 0
    done = run_cli("unsubscribe", "news", "--queue", "audit", env=env)
    assert done.returncode == 1
    assert done.stderr == b"brokerq: queue 'audit' does not subscribe to 'news'\n"
    assert run_cli("publish", "news", "three", env=env).stdout == b"0\n"
    assert run_cli("get", "audit", env=env).stdout == b"two\n"  # the copies stay


def test_consume_runs_under_url_as_locally(server: NatsServer, tmp_path: Path) -> None:
    env = {"BROKERQ_URL": server.url}
    with brokerq.nats.connect(server.url) as c:
        c.queue("work").put_many([b"a", b"b", b"c"])
        c.queue("fails").put(b"bad")
    out = tmp_path / "out"
    script = f'cat >> {out}; echo " $BROKERQ_ATTEMPT $BROKERQ_QUEUE $BROKERQ_URL" >> {out}'
    done = run_cli("consume", "work", "--idle-exit", "0.5", "--", "sh", "-c", script, env=env)
    assert (done.returncode, done.stderr) == (0, b""), done.stderr
    assert out.read_text().splitlines() == [f"{body} 1 work {server.url}" for body in "abc"]
    done = run_cli(
        "consume",
        "fails",
        "--max-attempts",
        "2",
        "--idle-exit",
        "1",
        "--retry-delay",
        "0.1",
        "--",
        "false",
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert b"(attempt 2 of 2): exit status 1; buried" in done.stderr
    with brokerq.nats.connect(server.url) as c:
        assert c.queue("fails").stats()["buried"] == 1
        assert c.queue("fails").kick() == 1
        assert c.queue("fails").get(timeout=5) == b"bad"
    # A lease of the command's own, as locally.
    with brokerq.nats.connect(server.url) as c:
        c.queue("work").put(b"d")
    done = run_cli("consume", "work", "--lease", "99", "--idle-exit", "0.5", "--", "true", env=env)
    assert (done.returncode, done.stderr) == (0, b""), done.stderr


def test_on_a_cluster_a_leader_s_loss_loses_no_acknowledged_copy_and_doubles_none() -> None:
    """Three nodes, every stream with three replicas: the node leading the
    subscriptions' stream is SIGKILLed mid-run; publishes wait for a new
    leader and go on, and every one acknowledged is in each queue once."""
    from nats_cluster import ELECTION, Cluster

    with Cluster() as cluster, brokerq.connect(cluster.url + "?replicas=3", ELECTION) as client:
        queues = [client.queue("c1"), client.queue("c2")]
        for q in queues:
            q.subscribe("t")
        acked, failed = set(), set()
        for i in range(60):
            if i == 20:
                cluster.kill_leader(naming.SUBSCRIPTIONS_STREAM)
            body = f"m{i}".encode()
            try:
                assert client.publish("t", body) == 2
                acked.add(body)
            except brokerq.BrokerUnavailable:
                failed.add(body)  # (not acknowledged: in a queue once, or not at all)
        print("publishes not acknowledged through the election:", len(failed))
        assert len(acked) >= 50, failed
        for q in queues:
            got = q.get_many(100, timeout=10)
            while len(got) < len(acked):
                got += q.get_many(100, timeout=10)
            assert len(got) == len(set(got))
            assert acked <= set(got) <= acked | failed
