"""Unfinished tasks on NATS (brokerq/nats/tasks.py), where they differ from the
local broker's or could break: getters and a delete killed by pid between
their steps, consumer processes racing on the count, a failed or cancelled
ack, a cluster losing the count's leader, what is refused.

The behaviour both backends share is in test_nats_backends.py.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Procs, wait_until
from extras import require
from nats_cluster import ELECTION, Cluster
from nats_fixtures import clean_client, kill_once_it_says, module_server  # noqa: F401
from nats_server import NatsServer

import brokerq

nats = require("nats", "nats")
import brokerq.nats  # noqa: E402
from brokerq.nats import tasks  # noqa: E402
from brokerq.nats.aio_message import AsyncNatsMessage  # noqa: E402

#: A getter that says where it is, then waits to be killed there:
#: ``before-ack`` (its get counted, the ack held back) or ``after-ack``
#: (its get returned, its task_done never made).
KILLED_GETTER = textwrap.dedent(
    """
    import asyncio, os, sys, time, brokerq
    from brokerq.nats.aio_message import AsyncNatsMessage
    url, queue, where = sys.argv[1:4]

    async def held_back(self):
        os.write(1, b"counted\\n")
        await asyncio.sleep(3600)

    if where == "before-ack":
        AsyncNatsMessage.ack = held_back
    with brokerq.connect(url) as client:
        body = client.queue(queue).get(timeout=10)
        os.write(1, b"got " + body + b"\\n")
        time.sleep(3600)
    """
)

#: A delete that says when it has forgotten the queue's count, then waits
#: to be killed there, before the stream's deletion.
KILLED_DELETE = textwrap.dedent(
    """
    import asyncio, os, sys, brokerq
    from nats.js.manager import JetStreamManager
    url, queue = sys.argv[1:3]

    async def held_back(self, name):
        os.write(1, b"forgotten\\n")
        await asyncio.sleep(3600)

    JetStreamManager.delete_stream = held_back
    with brokerq.connect(url) as client:
        client.queue(queue).delete()
    """
)

#: A consumer that waits for a word on stdin, then takes messages until
#: none comes for a second, writing each body down before it finishes its
#: task: by ``get`` and ``task_done``, or by ``reserve`` and ``ack``.
WORKER = textwrap.dedent(
    """
    import os, sys, brokerq
    url, queue, mode, out = sys.argv[1:5]
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    with brokerq.connect(url) as client:
        q = client.queue(queue)
        sys.stdin.readline()
        while True:
            try:
                if mode == "get":
                    os.write(fd, q.get(timeout=1) + b"\\n")
                    q.task_done()
                else:
                    msg = q.reserve(timeout=1)
                    os.write(fd, msg.body + b"\\n")
                    msg.ack()
            except brokerq.Empty:
                break
    """
)


@pytest.fixture
def q(client: brokerq.nats.NatsClient) -> Iterator[brokerq.nats.NatsQueue]:
    queue = client.queue("k" + uuid.uuid4().hex[:12])
    yield queue
    queue.delete()


def _kill_at(procs: Procs, server: NatsServer, queue: str, where: str, line: bytes) -> None:
    """Start a KILLED_GETTER, wait until it says ``line``, SIGKILL it by pid."""
    kill_once_it_says(procs, [sys.executable, "-c", KILLED_GETTER, server.url, queue, where], line)


def test_a_getter_killed_between_its_count_and_its_ack_loses_nothing(
    server: NatsServer, q: brokerq.nats.NatsQueue, procs: Procs
) -> None:
    """Its message comes back after the lease and counts again; the dead
    getter's count stays, one unfinished task, as a local getter killed
    before its task_done leaves one: a task_done finishes it."""
    q.configure(lease=1)
    q.put(b"job")
    _kill_at(procs, server, q.name, "before-ack", b"counted\n")
    assert q.unfinished_tasks == 2  # the message, still in the stream, and the count
    assert q.get(timeout=10) == b"job"  # back after its lease: not lost
    q.task_done()
    with pytest.raises(brokerq.JoinTimeout):
        q.join(timeout=0.2)  # the dead getter's task
    q.task_done()
    q.join(timeout=0)
    with pytest.raises(brokerq.Empty):
        q.get_nowait()  # and not doubled


def test_a_getter_killed_before_its_task_done_leaves_its_task_as_locally(
    server: NatsServer, q: brokerq.nats.NatsQueue, procs: Procs
) -> None:
    q.put(b"job")
    _kill_at(procs, server, q.name, "after-ack", b"got job\n")
    assert q.unfinished_tasks == 1
    with pytest.raises(brokerq.Empty):
        q.get(timeout=0.3)  # acked: gone for good
    q.task_done()
    q.join(timeout=0)


def test_a_delete_killed_between_its_two_steps_leaves_the_queue_and_no_stale_count(
    server: NatsServer, q: brokerq.nats.NatsQueue, procs: Procs
) -> None:
    """The count forgotten, the stream not yet deleted: the queue keeps its
    messages, the got one's task is gone as after a delete, and a delete
    run again finishes the work; nothing counted is left for a new queue."""
    q.put_many([b"a", b"b"])
    assert q.get(timeout=5) == b"a"
    args = [sys.executable, "-c", KILLED_DELETE, server.url, q.name]
    kill_once_it_says(procs, args, b"forgotten\n")
    assert q.unfinished_tasks == 1  # b, still in its stream
    assert q.get(timeout=5) == b"b"
    q.task_done()
    with pytest.raises(brokerq.InvalidRequest):
        q.task_done()  # a's count went with the delete's first step
    assert q.delete() == 0
    q.put(b"c")
    assert q.unfinished_tasks == 1


def test_a_join_returns_once_consumer_processes_have_done_every_task(
    server: NatsServer, q: brokerq.nats.NatsQueue, procs: Procs, tmp_path: Path
) -> None:
    """Four getters race on the count (compare-and-set) beside a reserver;
    join returns only once every body is written down, and no change of
    the count is lost: it ends at 0, and task_done has nothing left."""
    n = 60
    q.put_many([b"%d" % i for i in range(n)])
    modes = ["get", "get", "get", "get", "reserve"]
    outs = [tmp_path / f"{i}-{mode}" for i, mode in enumerate(modes)]
    workers = [
        procs(
            [sys.executable, "-c", WORKER, server.url, q.name, mode, str(out)],
            stdin=subprocess.PIPE,
        )
        for mode, out in zip(modes, outs, strict=True)
    ]
    with pytest.raises(brokerq.JoinTimeout):
        q.join(timeout=0.2)  # the workers wait for the word
    for worker in workers:
        assert worker.stdin is not None
        worker.stdin.write(b"go\n")
        worker.stdin.flush()
    q.join(timeout=60)
    done = [line for out in outs if out.exists() for line in out.read_text().splitlines()]
    assert sorted(done, key=int) == [str(i) for i in range(n)]
    assert q.unfinished_tasks == 0
    with pytest.raises(brokerq.InvalidRequest):
        q.task_done()
    for worker in workers:
        assert worker.wait(timeout=30) == 0, worker.stderr


def test_a_get_whose_ack_fails_or_is_cancelled_gives_its_count_back(
    server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The body is not returned, so no task_done will come for it: the
    message (back in the stream after its lease) is its only task."""

    async def lease_lost(self: AsyncNatsMessage) -> None:
        raise brokerq.LeaseLost("the lease ran out")

    async def held_back(self: AsyncNatsMessage) -> None:
        await asyncio.sleep(3600)

    async def main() -> None:
        async with brokerq.nats.AsyncNatsClient(server.url) as c:
            q = c.queue("ackfails")
            await q.put_many([b"a", b"b"])
            with monkeypatch.context() as patch:
                patch.setattr(AsyncNatsMessage, "ack", lease_lost)
                with pytest.raises(brokerq.LeaseLost):
                    await q.get(timeout=5)
                with pytest.raises(brokerq.LeaseLost):
                    await q.get_many(2, timeout=5)
                patch.setattr(AsyncNatsMessage, "ack", held_back)
                with pytest.raises(TimeoutError):  # a get given up during its ack
                    await asyncio.wait_for(q.get(timeout=5), 0.5)
            assert await q.tasks.outstanding() == 0
            assert await q.unfinished_tasks() == 2
            await q.delete()

    asyncio.run(main())


def test_what_the_count_cannot_do_is_refused(q: brokerq.nats.NatsQueue) -> None:
    q.put_many([b"a", b"b"])
    msg = q.reserve(timeout=5)
    with pytest.raises(brokerq.NotSupported, match=r"task_done .* NATS backend"):
        q.task_done()  # a reserved message's task ends with its ack
    msg.ack()
    for bad in (0, -1, 1.5, "1", True):
        with pytest.raises(brokerq.InvalidRequest):
            q.task_done(bad)  # type: ignore[arg-type]
    for timeout in (-1, "1", True, float("nan")):
        with pytest.raises(brokerq.InvalidRequest):
            q.join(timeout=timeout)  # type: ignore[arg-type]
    assert q.unfinished_tasks == 1


def test_the_count_lives_outside_the_queues(client: brokerq.nats.NatsClient) -> None:
    """The bucket is a stream, but no queue; a queue made again after a
    delete starts at 0 even if it was deleted with gets outstanding."""
    q = client.queue("counted")
    q.put(b"a")
    assert q.get(timeout=5) == b"a"
    assert "counted" in client.queues()
    assert not any(name.startswith(tasks.BUCKET) for name in client.queues())
    q.delete()
    q.put(b"b")
    assert q.unfinished_tasks == 1
    q.delete()


def test_on_a_cluster_the_count_is_replicated_and_outlives_its_leader() -> None:
    """The bucket has the client's replicas; its leader killed, a task_done
    waits for the next one and counts right: the count was the quorum's.
    (An acked message may count a moment longer: its stream drops it once
    the ack went through the consumer's replicas, so the counts are awaited.)"""
    with Cluster() as cluster, brokerq.connect(cluster.url + "?replicas=3", ELECTION) as client:
        q = client.queue("r3tasks")
        q.put_many([b"a", b"b", b"c"])
        assert q.get_many(2, timeout=10) == [b"a", b"b"]
        wait_until(lambda: q.unfinished_tasks == 3, 10, "the acked messages to leave")
        assert cluster.stream_replicas(tasks.KV_STREAM) == 3
        cluster.kill_leader(tasks.KV_STREAM)
        # A client new to the bucket looks it up in the election, and waits it out.
        with brokerq.connect(cluster.url + "?replicas=3", ELECTION) as fresh:
            assert fresh.queue("r3tasks").unfinished_tasks == 3
        q.task_done(2)
        wait_until(lambda: q.unfinished_tasks == 1, 10, "the count of one task")
        with pytest.raises(brokerq.InvalidRequest):
            q.task_done(2)
        q.reserve(timeout=10).ack()
        q.join(timeout=10)


def test_a_join_timing_out_in_a_thread_sharing_the_client_raises_join_timeout(
    q: brokerq.nats.NatsQueue,
) -> None:
    """Its call waits for the loop another thread runs: its own JoinTimeout
    (a TimeoutError) is not taken for the wait on that loop running out."""
    q.put(b"a")

    def long_join() -> None:
        with pytest.raises(brokerq.JoinTimeout):
            q.join(timeout=1.5)

    other = threading.Thread(target=long_join)
    other.start()
    time.sleep(0.2)  # (the other thread runs the loop now)
    with pytest.raises(brokerq.JoinTimeout):
        q.join(timeout=0.2)
    other.join(timeout=20)
