"""task_done(), join() and unfinished_tasks, as queue.Queue has them, shared by every process.

The count's rules are tested on the core (time passed in), then replayed
from the records the core wrote; the wire ops on the trio broker over
in-memory streams (as tests/broker/test_server.py); the clients and the command
against real brokers and processes, in short private socket directories.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
import trio
import trio.testing
from conftest import BIN, Procs, run_cli
from test_async_client import run
from test_cli import Brokerq, ok, one_error_line
from test_crash import sigkill
from test_server import connect

import brokerq
from brokerq.broker.core import BrokerCore
from brokerq.broker.core.records import AnyRecord, DeleteRecord, PutRecord, UnfinishedRecord
from brokerq.broker.server import Broker, BrokerConfig
from brokerq.client.calls import ConnectionLost
from brokerq.errors import InvalidRequest
from brokerq.protocol import (
    Ack,
    Error,
    GetMany,
    GetManyReply,
    Join,
    JoinReply,
    Ping,
    PingReply,
    Put,
    PutMany,
    Reserve,
    ReserveReply,
    Stats,
    StatsReply,
    TaskDone,
    TaskDoneReply,
)

# -- the core: every rule ------------------------------------------------------------------------


class Recorded:
    """A core whose records are kept, to be replayed into a fresh one."""

    def __init__(self) -> None:
        self.records: list[AnyRecord] = []
        self.core = new_core(self.records.append)

    def replayed(self, now: float = 0.0) -> BrokerCore:
        return replay(self.records, now)


def new_core(write: object = None) -> BrokerCore:
    return BrokerCore(max_message_size=1000, max_deliveries=2, write=write)  # type: ignore[arg-type]


def replay(records: list[AnyRecord], now: float = 0.0) -> BrokerCore:
    core = new_core()
    for record in records:
        core.apply(record)
    core.finish_replay(now)
    return core


@pytest.fixture
def rec() -> Recorded:
    return Recorded()


def counts(core: BrokerCore, *names: str) -> list[int]:
    return [core.unfinished(name) for name in names]


def check_replay(rec: Recorded, *names: str, now: float = 0.0) -> None:
    """The records written so far rebuild the same counts, and so does a snapshot."""
    want = counts(rec.core, *names)
    assert counts(rec.replayed(now), *names) == want
    assert counts(replay(rec.core.snapshot(), now), *names) == want


def test_a_put_adds_a_task_and_a_get_leaves_it_for_task_done(rec: Recorded) -> None:
    core = rec.core
    assert core.unfinished("q") == 0
    core.put("q", b"a", now=0)
    core.put_many("q", [b"b", b"c"], now=0)
    assert core.unfinished("q") == 3
    assert len(core.get_nowait("q", 2)) == 2
    assert core.unfinished("q") == 3  # got, not yet done
    assert core.task_done("q") == 2
    assert core.task_done("q", 2) == 0
    assert core.queue_stats("q", now=0)["unfinished_tasks"] == 0
    check_replay(rec, "q")


def test_a_retried_put_adds_no_task(rec: Recorded) -> None:
    core = rec.core
    core.put("q", b"a", now=0, key=b"k")
    core.put("q", b"a again", now=0, key=b"k")
    assert core.unfinished("q") == 1
    check_replay(rec, "q")


def test_too_many_task_done_raise_value_error_and_change_nothing(rec: Recorded) -> None:
    core = rec.core
    with pytest.raises(InvalidRequest) as info:
        core.task_done("never")
    assert isinstance(info.value, ValueError)
    assert core.queue_names() == []  # not created
    core.put("q", b"a", now=0)
    written = len(rec.records)
    with pytest.raises(ValueError, match="too many times"):
        core.task_done("q", 2)
    with pytest.raises(InvalidRequest):
        core.task_done("q", 0)
    with pytest.raises(InvalidRequest):
        core.task_done("", 1)
    assert len(rec.records) == written
    assert core.unfinished("q") == 1


def test_task_done_may_come_before_the_get_as_the_stdlib_allows(rec: Recorded) -> None:
    core = rec.core
    core.put_many("q", [b"a", b"b"], now=0)
    core.task_done("q", 2)
    assert core.unfinished("q") == 0
    assert len(core.get_nowait("q", 2)) == 2
    assert core.unfinished("q") == 0
    with pytest.raises(InvalidRequest):
        core.task_done("q")
    check_replay(rec, "q")


def test_a_message_that_leaves_before_its_get_never_leaves_a_debt(rec: Recorded) -> None:
    """task_done ran ahead (count 0 with messages held); a purge, an ack or a
    ttl then takes them: the count stays at 0, so the next put is waited for."""
    core = rec.core
    core.put_many("q", [b"a", b"b", b"c"], now=0)
    core.put("q", b"short", now=0, ttl=5)
    core.task_done("q", 4)
    msg = core.reserve_nowait("q", now=1)
    assert msg is not None
    core.ack(msg.id, msg.attempts)
    core.tick(10)  # the ttl runs out
    assert core.purge("q") == 2
    assert core.unfinished("q") == 0
    core.put("q", b"next", now=11)
    assert core.unfinished("q") == 1
    check_replay(rec, "q", now=11)


def test_an_ack_is_the_task_done_of_a_reserve(rec: Recorded) -> None:
    core = rec.core
    core.put_many("q", [b"a", b"b"], now=0)
    msg = core.reserve_nowait("q", now=0)
    assert msg is not None
    assert core.unfinished("q") == 2
    core.ack(msg.id, msg.attempts)
    assert core.unfinished("q") == 1
    check_replay(rec, "q")


def test_an_ack_as_a_get_leaves_the_task_for_task_done(rec: Recorded) -> None:
    """The async client's get that waits is a reserve and such an ack."""
    core = rec.core
    core.put("q", b"a", now=0)
    msg = core.reserve_nowait("q", now=0)
    assert msg is not None
    core.ack(msg.id, msg.attempts, as_get=True)
    assert core.queue_stats("q", now=0)["reserved"] == 0
    assert core.unfinished("q") == 1
    check_replay(rec, "q")
    core.task_done("q")
    check_replay(rec, "q")


def test_release_and_a_lease_that_runs_out_change_nothing(rec: Recorded) -> None:
    core = rec.core
    core.configure("q", max_deliveries=5)
    core.put("q", b"a", now=0)
    msg = core.reserve_nowait("q", now=0, lease=1)
    assert msg is not None
    core.release(msg.id, msg.attempts, now=0, delay=3)
    assert core.unfinished("q") == 1
    core.tick(3)
    msg = core.reserve_nowait("q", now=3, lease=1)
    assert msg is not None
    core.tick(10)  # the lease runs out: back to ready
    assert core.queue_stats("q", now=10)["ready"] == 1
    assert core.unfinished("q") == 1
    check_replay(rec, "q", now=10)


def test_purge_and_ttl_finish_their_tasks(rec: Recorded) -> None:
    core = rec.core
    core.put_many("q", [b"a", b"b"], now=0)
    core.put("q", b"ready, dies", now=0, ttl=5)
    core.put("q", b"delayed, dies", now=0, delay=10, ttl=5)
    assert core.unfinished("q") == 4
    core.tick(6)  # both ttls run out
    assert core.queue_stats("q", now=6)["expired_total"] == 2
    assert core.unfinished("q") == 2
    check_replay(rec, "q", now=6)
    assert core.purge("q") == 2
    assert core.unfinished("q") == 0
    check_replay(rec, "q", now=6)


def test_a_leased_message_whose_ttl_ran_out_finishes_when_its_lease_ends(rec: Recorded) -> None:
    core = rec.core
    core.put("q", b"x", now=0, ttl=5)
    msg = core.reserve_nowait("q", now=1, lease=10)
    assert msg is not None
    core.tick(6)
    assert core.unfinished("q") == 1  # still leased
    core.tick(12)
    assert core.queue_stats("q", now=12)["expired_total"] == 1
    assert core.unfinished("q") == 0
    check_replay(rec, "q", now=12)


def test_bury_finishes_a_task_and_kick_brings_it_back(rec: Recorded) -> None:
    core = rec.core
    core.put_many("q", [b"a", b"b"], now=0)
    for _ in range(2):
        msg = core.reserve_nowait("q", now=0)
        assert msg is not None
        core.bury(msg.id, msg.attempts)
    assert core.unfinished("q") == 0
    check_replay(rec, "q")
    assert core.kick("q", 1, now=1)[0] == 1
    assert core.unfinished("q") == 1
    check_replay(rec, "q", now=1)


def test_a_dead_letter_counts_in_its_dead_queue_and_kicked_back_in_its_own(
    rec: Recorded,
) -> None:
    core = rec.core
    core.put_many("q", [b"a", b"b", b"c"], now=0)
    for t in (0, 10):  # max_deliveries 2: two leases run out, then :dead
        msg = core.reserve_nowait("q", now=t, lease=1)
        assert msg is not None
        core.tick(t + 2)
    assert core.queue_stats("q:dead", now=20)["ready"] == 1
    assert counts(core, "q", "q:dead") == [2, 1]
    check_replay(rec, "q", "q:dead", now=20)
    # A dead letter buried there is no task of either; kicked back, one of q.
    msg = core.reserve_nowait("q:dead", now=20)
    assert msg is not None
    core.bury(msg.id, msg.attempts)
    assert counts(core, "q", "q:dead") == [2, 0]
    assert core.kick("q:dead", 5, now=21)[0] == 1
    assert counts(core, "q", "q:dead") == [3, 0]
    check_replay(rec, "q", "q:dead", now=21)
    # A ready dead letter kicked back moves its task.
    core.put("x", b"d", now=30)
    for t in (30, 40):
        msg = core.reserve_nowait("x", now=t, lease=1)
        assert msg is not None
        core.release(msg.id, msg.attempts, now=t)
    assert counts(core, "x", "x:dead") == [0, 1]
    assert core.kick("x:dead", 1, now=50)[0] == 1
    assert counts(core, "x", "x:dead") == [1, 0]
    check_replay(rec, "q", "q:dead", "x", "x:dead", now=50)


def test_a_get_whose_reply_was_not_written_leaves_the_count_as_it_was(rec: Recorded) -> None:
    core = rec.core
    core.put_many("q", [b"a", b"b"], now=0)
    taken = core.get_nowait("q", 2)
    core.task_done("q")
    core.undeliver(taken, now=1)  # the reply never went out: both back
    assert core.queue_stats("q", now=1)["ready"] == 2
    assert core.unfinished("q") == 1
    check_replay(rec, "q", now=1)
    put_back = [r for r in rec.records if isinstance(r, PutRecord) and r.returned]
    assert len(put_back) == 2


def test_a_waiter_that_leaves_after_the_handoff_leaves_the_count_as_it_was(
    rec: Recorded,
) -> None:
    core = rec.core
    waiter = core.wait("q")
    core.put("q", b"a", now=0)  # handed to the waiter, in the put's record
    assert core.unfinished("q") == 1
    core.cancel_wait(waiter, now=1)
    assert core.unfinished("q") == 1
    check_replay(rec, "q", now=1)
    assert len(core.get_nowait("q")) == 1
    core.task_done("q")
    check_replay(rec, "q", now=1)


def test_a_get_is_journaled_as_got_the_other_removals_not(rec: Recorded) -> None:
    core = rec.core
    core.put_many("q", [b"a", b"b"], now=0)
    core.get_nowait("q")
    core.purge("q")
    deletes = [r for r in rec.records if isinstance(r, DeleteRecord)]
    assert [d.got for d in deletes] == [True, False]


def test_publish_adds_a_task_to_every_subscriber_queue(rec: Recorded) -> None:
    core = rec.core
    core.subscribe("events", "audit")
    core.subscribe("events", "mail")
    core.publish("events", b"x", now=0)
    assert counts(core, "audit", "mail") == [1, 1]
    check_replay(rec, "audit", "mail")


def test_admitted_puts_add_their_tasks(rec: Recorded) -> None:
    core = rec.core
    core.configure("q", maxsize=1)
    core.put("q", b"a", now=0)
    putter = core.wait_put("q", [b"b"], None, {})
    assert core.unfinished("q") == 1
    core.get_nowait("q")
    assert core.admit_freed(now=1) == [putter]
    assert core.unfinished("q") == 2
    check_replay(rec, "q", now=1)


def test_delete_forgets_the_tasks_and_wakes_the_joins(rec: Recorded) -> None:
    core = rec.core
    core.put_many("q", [b"a", b"b"], now=0)
    core.get_nowait("q")
    joiner = core.wait_join("q")
    assert core.joins_done() == []
    assert core.delete_queue("q", now=1)[0] == 1
    assert core.unfinished("q") == 0
    assert core.joins_done() == [joiner]
    assert joiner.done
    check_replay(rec, "q", now=1)
    with pytest.raises(InvalidRequest):
        core.task_done("q")  # a consumer's late task_done: the tasks went with the queue


def test_joins_are_done_once_the_count_reaches_zero(rec: Recorded) -> None:
    core = rec.core
    core.put("q", b"a", now=0)
    first, second = core.wait_join("q"), core.wait_join("q")
    other = core.wait_join("r")  # a queue with nothing to do is done at once
    gone = core.wait_join("q")
    core.cancel_join(gone)
    assert set(core.all_waiters()) == {first, second, other}
    assert core.joins_done() == [other]
    core.get_nowait("q")
    assert core.joins_done() == []
    core.task_done("q")
    assert core.joins_done() == [first, second]
    assert first.done
    assert second.done
    assert not gone.done
    assert core.joins_done() == []
    assert core.all_waiters() == []


# -- replay: the records rebuild the count -------------------------------------------------------


def test_the_journal_scenario_replays_to_the_same_counts() -> None:
    """tests/broker/test_journal.py's scenario touches every kind of record."""
    from test_journal import NOW, scenario

    rec = Recorded()
    scenario(rec.core)
    names = rec.core.queue_names()
    assert sum(counts(rec.core, *names)) > 0
    check_replay(rec, *names, now=NOW)


def test_a_snapshot_and_the_records_after_it_rebuild_the_count(rec: Recorded) -> None:
    """As a compaction writes them: the snapshot, then the tail."""
    core = rec.core
    core.put_many("q", [b"a", b"b", b"c"], now=0)
    core.task_done("q", 3)  # a count below the messages held
    snapshot = core.snapshot()
    assert UnfinishedRecord(queue="q", count=0) in snapshot
    tail_start = len(rec.records)
    core.get_nowait("q")
    core.put("q", b"d", now=1)
    tail = rec.records[tail_start:]
    assert replay([*snapshot, *tail], now=1).unfinished("q") == core.unfinished("q") == 1


def test_messages_whose_ttl_ran_out_between_brokers_are_counted_once(rec: Recorded) -> None:
    """A broker that drops a message at start (its ttl ran out while none ran)
    writes that ahead of its first record: a later replay must not take the
    task away a second time, after the count that broker wrote."""
    rec.core.put("q", b"dies", now=0, ttl=5)
    rec.core.put_many("q", [b"a", b"b"], now=0)
    second = rec.replayed(now=100)  # the next broker
    assert second.unfinished("q") == 2
    second.write = rec.records.append
    assert second.task_done("q") == 1
    assert rec.replayed(now=200).unfinished("q") == 1
    # And a broker that wrote nothing before it died leaves the drop to the next.
    quiet = Recorded()
    quiet.core.put("q", b"dies", now=0, ttl=5)
    quiet.core.put("q", b"stays", now=0)
    assert quiet.replayed(now=100).unfinished("q") == 1
    assert quiet.replayed(now=200).unfinished("q") == 1


def test_the_count_goes_through_a_real_journal_file(tmp_path: Path) -> None:
    from brokerq.broker.journal import Journal, read_journal

    path = str(tmp_path / "j")
    journal, _ = Journal.open(path, "never")
    core = new_core(journal.append)
    core.put_many("q", [b"a", b"b", b"c"], now=0)
    core.get_nowait("q", 2)
    core.task_done("q")
    journal.close()
    assert replay(read_journal(path).records).unfinished("q") == 2


# -- the wire: task_done and join on the trio broker (in-memory streams, virtual time) -----------


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    b = Broker(
        BrokerConfig(socket_path="/nonexistent/b.sock", max_message_size=1000, max_deliveries=1),
        clock=trio.current_time,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(b.serve, None)
        yield b
        b.request_stop("test over")


async def parked(broker: Broker, count: int) -> None:
    """Wait until the broker has ``count`` joins (and nothing else) parked."""
    await trio.testing.wait_all_tasks_blocked()
    assert len(broker.core.all_waiters()) == count


async def test_a_join_returns_when_another_connection_marks_the_last_task_done(
    broker: Broker,
) -> None:
    producer, consumer, joiner = [await connect(broker) for _ in range(3)]
    assert isinstance(await joiner.call(Join, queue="q"), JoinReply)  # nothing to do
    await producer.call(PutMany, queue="q", bodies=[b"a", b"b"])
    assert isinstance(await consumer.call(GetMany, queue="q", n=2, timeout=0), GetManyReply)
    await joiner.send(Join(id=50, queue="q"), Ping(id=51))  # the ping waits behind the join
    await parked(broker, 1)
    assert await consumer.call(TaskDone, queue="q") == TaskDoneReply(
        id=consumer.next_id, unfinished=1
    )
    await parked(broker, 1)
    assert await consumer.call(TaskDone, queue="q") == TaskDoneReply(
        id=consumer.next_id, unfinished=0
    )
    assert await joiner.receive() == JoinReply(id=50)
    assert isinstance(await joiner.receive(), PingReply)
    stats = await producer.call(Stats, queue="q")
    assert isinstance(stats, StatsReply)
    assert stats.stats["unfinished_tasks"] == 0


async def test_every_join_on_the_queue_is_answered(broker: Broker) -> None:
    peer = await connect(broker)
    joiners = [await connect(broker) for _ in range(3)]
    await peer.call(Put, queue="q", body=b"a")
    for j in joiners:
        await j.send(Join(id=9, queue="q", timeout=60))
    other = await connect(broker)
    await other.send(Join(id=9, queue="other:dead"))  # answered at once
    assert await other.receive() == JoinReply(id=9)
    await parked(broker, 3)
    msg = await peer.call(Reserve, queue="q", timeout=0)
    assert isinstance(msg, ReserveReply)
    await peer.call(Ack, msg_id=msg.msg_id, attempt=msg.attempt)  # an ack is a task_done
    for j in joiners:
        assert await j.receive() == JoinReply(id=9)
    assert broker.core.all_waiters() == []


async def test_a_join_times_out_with_its_own_error_code(
    broker: Broker, autojump_clock: trio.abc.Clock
) -> None:
    peer = await connect(broker)
    await peer.call(Put, queue="q", body=b"a")
    now = await peer.call(Join, queue="q", timeout=0)
    assert isinstance(now, Error)
    assert now.code == "timeout"
    start = trio.current_time()
    late = await peer.call(Join, queue="q", timeout=2.5)
    assert isinstance(late, Error)
    assert late.code == "timeout"
    assert trio.current_time() - start == pytest.approx(2.5)
    assert broker.core.all_waiters() == []  # withdrawn
    for bad in (-1.0, math.nan):
        refused = await peer.call(Join, queue="q", timeout=bad)
        assert isinstance(refused, Error)
        assert refused.code == "invalid"
    assert isinstance(await peer.call(Ping), PingReply)  # the connection goes on


async def test_task_done_errors_leave_the_connection_open(broker: Broker) -> None:
    peer = await connect(broker)
    await peer.call(Put, queue="q", body=b"a")
    for fields in ({"n": 2}, {"n": 0}, {"queue": ""}):
        reply = await peer.call(TaskDone, **{"queue": "q", **fields})
        assert isinstance(reply, Error)
        assert reply.code == "invalid"
    assert await peer.call(TaskDone, queue="q") == TaskDoneReply(id=peer.next_id, unfinished=0)


async def test_a_join_whose_connection_closes_is_withdrawn(broker: Broker) -> None:
    peer, gone = await connect(broker), await connect(broker)
    await peer.call(Put, queue="q", body=b"a")
    await gone.send(Join(id=2, queue="q"))
    await parked(broker, 1)
    await gone.stream.aclose()
    await parked(broker, 0)


async def test_a_stopping_broker_answers_a_join_with_shutting_down(broker: Broker) -> None:
    peer, joiner = await connect(broker), await connect(broker)
    await peer.call(Put, queue="q", body=b"a")
    await joiner.send(Join(id=2, queue="q"))
    await parked(broker, 1)
    broker.request_stop("test")
    reply = await joiner.receive()
    assert isinstance(reply, Error)
    assert reply.code == "shutting_down"
    assert await joiner.at_eof()


async def test_timers_wake_joins(broker: Broker, autojump_clock: trio.abc.Clock) -> None:
    peer, joiner = await connect(broker), await connect(broker)
    await peer.call(Put, queue="q", body=b"a", ttl=5)
    start = trio.current_time()
    assert isinstance(await joiner.call(Join, queue="q", timeout=60), JoinReply)
    assert trio.current_time() - start == pytest.approx(5, abs=0.1)  # the ttl ran out
    # A lease that runs out on the last attempt moves the message to q:dead.
    await peer.call(Put, queue="q", body=b"b")
    assert isinstance(await peer.call(Reserve, queue="q", timeout=0, lease=3), ReserveReply)
    assert isinstance(await joiner.call(Join, queue="q", timeout=60), JoinReply)
    assert broker.core.unfinished("q:dead") == 1


async def test_a_closing_connection_wakes_joins(broker: Broker) -> None:
    """Its leases end: on their last attempt the messages go to q:dead."""
    peer, consumer, joiner = [await connect(broker) for _ in range(3)]
    await peer.call(Put, queue="q", body=b"a")
    assert isinstance(await consumer.call(Reserve, queue="q", timeout=0), ReserveReply)
    await joiner.send(Join(id=2, queue="q"))
    await parked(broker, 1)
    await consumer.stream.aclose()
    assert await joiner.receive() == JoinReply(id=2)


# -- the clients, against real brokers and processes ---------------------------------------------

GET_CONSUMER = """
import sys, brokerq
q = brokerq.connect(sys.argv[1]).queue("jobs")
sys.stdin.readline()  # the word to start
with open(sys.argv[2], "a") as out:
    while True:
        try:
            body = q.get(timeout=0.5)
        except brokerq.Empty:
            break
        out.write(body.decode() + "\\n")
        out.flush()
        q.task_done()
"""

RESERVE_CONSUMER = """
import sys, brokerq
q = brokerq.connect(sys.argv[1]).queue("jobs")
sys.stdin.readline()
with open(sys.argv[2], "a") as out:
    while True:
        try:
            msg = q.reserve(timeout=0.5)
        except brokerq.Empty:
            break
        out.write(msg.body.decode() + "\\n")
        out.flush()
        msg.ack()
"""


def test_join_returns_once_consumer_processes_have_done_every_task(
    socket_path: str, sock_dir: str, procs: Procs
) -> None:
    """A producer puts N; two consumer processes (get + task_done, reserve +
    ack) work; join() returns only after the last is done. Each consumer
    writes down a message before it marks it done."""
    n = 40
    with brokerq.connect(socket_path) as client:
        q = client.queue("jobs")
        q.put_many([b"%d" % i for i in range(n)])
        assert q.unfinished_tasks == n
        outs = [os.path.join(sock_dir, name) for name in ("got", "reserved")]
        workers = [
            procs([sys.executable, "-c", code, socket_path, out], stdin=subprocess.PIPE)
            for code, out in zip((GET_CONSUMER, RESERVE_CONSUMER), outs, strict=True)
        ]
        with pytest.raises(brokerq.JoinTimeout) as info:
            q.join(timeout=0.2)  # the consumers wait for the word
        assert isinstance(info.value, TimeoutError)
        assert isinstance(info.value, brokerq.BrokerqError)
        for worker in workers:
            assert worker.stdin is not None
            worker.stdin.write(b"go\n")
            worker.stdin.flush()
        q.join(timeout=30)
        done = [line for out in outs for line in Path(out).read_text().splitlines()]
        assert sorted(done, key=int) == [str(i) for i in range(n)]
        assert q.unfinished_tasks == 0
        for worker in workers:
            assert worker.wait(timeout=20) == 0


def test_the_count_survives_a_broker_sigkill_and_respawn(socket_path: str) -> None:
    with brokerq.connect(socket_path) as client:
        q = client.queue("jobs")
        q.put_many([b"a", b"b", b"c", b"d", b"e"])
        assert q.get_many(2) == [b"a", b"b"]
        q.task_done()  # a done; b's owed
        with q.reserve() as msg:  # c acked
            assert msg.body == b"c"
        assert q.reserve().body == b"d"  # leased when the broker dies
        assert q.unfinished_tasks == 3  # b, d, e
        first = client.broker_pid
        sigkill(first)
        assert q.unfinished_tasks == 3  # asked of the next broker, which replayed the journal
        assert client.broker_pid != first
        with pytest.raises(brokerq.JoinTimeout):
            q.join(timeout=0.1)
        q.task_done()  # b
        assert q.get_many(5) == [b"d", b"e"]  # d came back
        q.task_done(2)
        q.join(timeout=5)
        with pytest.raises(ValueError, match="too many times"):
            q.task_done()


def test_a_task_done_whose_connection_was_lost_raises_and_is_not_sent_again(
    socket_path: str,
) -> None:
    with brokerq.connect(socket_path) as client:
        q = client.queue("jobs")
        q.put(b"a")
        assert q.get() == b"a"
        sigkill(client.broker_pid)
        with pytest.raises(ConnectionLost):
            q.task_done()
        assert q.unfinished_tasks == 1  # the broker died before it: not counted, nor resent
        q.task_done()
        q.join(timeout=5)


def test_a_join_waiting_when_the_broker_dies_waits_on_the_next_one(socket_path: str) -> None:
    with brokerq.connect(socket_path) as client:
        q = client.queue("jobs")
        q.put(b"a")
        returned = threading.Event()
        failed: list[BaseException] = []

        def join() -> None:
            try:
                q.join(timeout=30)  # its own thread: its own connection
            except BaseException as exc:
                failed.append(exc)
            returned.set()

        thread = threading.Thread(target=join)
        thread.start()
        try:
            time.sleep(0.2)  # (it waits in the broker by now, or soon will: both are fine)
            sigkill(client.broker_pid)
            assert q.unfinished_tasks == 1
            assert not returned.wait(0.3)  # asked again of the next broker, still waiting
            assert q.get() == b"a"
            q.task_done()
            assert returned.wait(10)
        finally:
            thread.join(timeout=30)
        assert failed == []


def test_the_async_client(backend: str, socket_path: str) -> None:
    async def main() -> None:
        async with brokerq.open_async_client(socket_path) as client:
            q = client.queue("jobs")
            await q.join(timeout=0)  # nothing to do
            await q.put_many([b"a", b"b", b"c"])
            assert await q.unfinished_tasks() == 3
            with pytest.raises(brokerq.JoinTimeout):
                await q.join(timeout=0.1)
            joined = anyio.Event()

            async def join() -> None:
                await q.join()
                joined.set()

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(join)
                assert await q.get() == b"a"
                await q.task_done()
                async with q.reserve() as msg:  # acked: its task is done
                    assert msg.body == b"b"
                assert await q.get_many(5) == [b"c"]
                await anyio.sleep(0.05)
                assert not joined.is_set()
                await q.task_done()
            assert await q.unfinished_tasks() == 0
            with pytest.raises(brokerq.InvalidRequest):
                await q.task_done()
            # A get that had to wait (a reserve and an ack on the wire) still owes its task_done.
            async with anyio.create_task_group() as tasks:

                async def put_later() -> None:
                    await anyio.sleep(0.1)
                    await q.put(b"d")

                tasks.start_soon(put_later)
                assert await q.get(timeout=10) == b"d"
            assert await q.unfinished_tasks() == 1
            # A cancelled join changes nothing.
            with anyio.move_on_after(0.1):
                await q.join()
            await q.task_done()
            await q.join(timeout=5)

    run(backend, main)


# -- the command ---------------------------------------------------------------------------------


def test_brokerq_join_exits_0_when_the_work_is_done_and_3_on_timeout(socket_path: str) -> None:
    brokerq_cli = Brokerq(socket_path)
    assert ok(brokerq_cli("join", "jobs")) == ""  # nothing to do
    ok(brokerq_cli("put", "jobs", "a", "b"))
    late = brokerq_cli("join", "jobs", "--timeout", "0.2")
    assert late.exit_code == 3
    assert one_error_line(late) == "brokerq: the tasks of 'jobs' were not all done within 0.2 s"
    with brokerq.connect(socket_path) as client:
        q = client.queue("jobs")
        assert q.get() == b"a"
        with q.reserve() as msg:
            assert msg.body == b"b"
        assert brokerq_cli("join", "jobs", "--timeout", "0").exit_code == 3
        q.task_done()
    assert ok(brokerq_cli("join", "jobs", "--timeout", "5")) == ""
    assert brokerq_cli("join", "jobs", "--timeout", "-1").exit_code == 2


def test_a_script_waits_with_brokerq_join_for_a_batch_to_finish(
    socket_path: str, procs: Procs
) -> None:
    """Enqueue a batch, start a consumer (brokerq consume acks each message
    whose command succeeds), wait with brokerq join."""
    env = {**os.environ, "BROKERQ_SOCKET": socket_path}
    assert run_cli("put", "jobs", *(f"job {i}" for i in range(5)), env=env).returncode == 0
    waiting = procs([str(BIN / "brokerq"), "join", "jobs", "--timeout", "30"], env=env)
    time.sleep(0.2)
    assert waiting.poll() is None  # the batch is not done yet
    consumer = procs(
        [str(BIN / "brokerq"), "consume", "jobs", "-j", "2", "--idle-exit", "0", "--", "cat"],
        env=env,
    )
    assert waiting.wait(timeout=30) == 0
    out, _ = consumer.communicate(timeout=30)
    assert consumer.returncode == 0
    assert sorted(re.findall(r"job \d", out.decode())) == [f"job {i}" for i in range(5)]
