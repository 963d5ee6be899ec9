"""Nothing acknowledged is lost on NATS, with processes and servers dying.

Producers and consumers run in processes of their own and log, line by
line with unbuffered writes, what they did: ``put B`` once B's put returned,
``got B`` when B was reserved, ``ack B`` once its ack returned, ``retry B``
or ``ackfail B`` when a call failed. From the logs of everyone (a SIGKILLed
consumer's included: its writes are in the file) the test checks
at-least-once and no more:

* every body whose put returned was delivered and acked;
* a body is delivered twice only where the rule allows it: it was reserved
  by the killed consumer and not acked, or its put or its ack failed (and
  was retried, or the message came back);
* nothing is delivered that was not put.
"""

from __future__ import annotations

import collections
import os
import signal
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import Procs, gone, wait_until
from extras import require
from nats_cluster import Cluster
from nats_server import require_server

import brokerq

require("nats", "nats")
require_server()
from nats_server import running_server  # noqa: E402

PRODUCER = textwrap.dedent(
    """
    import os, sys, time, brokerq
    url, queue, name, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    with brokerq.connect(url) as client:
        q = client.queue(queue)
        for i in range(n):
            body = f"{name}-{i}".encode()
            while True:
                try:
                    q.put(body)
                    break
                except Exception as exc:  # a leader change: put it again
                    os.write(1, b"retry " + body + b"\\n")
                    time.sleep(0.2)
            os.write(1, b"put " + body + b"\\n")
    """
)

CONSUMER = textwrap.dedent(
    """
    import os, sys, time, brokerq
    url, queue, stop = sys.argv[1], sys.argv[2], sys.argv[3]
    with brokerq.connect(url) as client:
        q = client.queue(queue)
        while not os.path.exists(stop):
            try:
                msg = q.reserve(timeout=1)
            except brokerq.Empty:
                continue
            except Exception as exc:  # a leader change: reserve again
                time.sleep(0.2)
                continue
            os.write(1, b"got " + msg.body + b"\\n")
            try:
                msg.ack()
            except Exception:  # it may come back: allowed a second delivery
                os.write(1, b"ackfail " + msg.body + b"\\n")
                continue
            os.write(1, b"ack " + msg.body + b"\\n")
    """
)


@dataclass
class Log:
    """One process's log, parsed: each verb's bodies in order."""

    lines: dict[str, list[str]] = field(default_factory=lambda: collections.defaultdict(list))

    @classmethod
    def read(cls, path: Path) -> Log:
        log = cls()
        for line in path.read_text().splitlines():
            verb, _, body = line.partition(" ")
            log.lines[verb].append(body)
        return log

    def __getitem__(self, verb: str) -> list[str]:
        return self.lines[verb]


@dataclass
class Run:
    """Producers and consumers of one queue, started in ``workdir``."""

    procs: Procs
    workdir: Path
    url: str
    queue: str
    producers: list[Path] = field(default_factory=list)
    consumers: list[Path] = field(default_factory=list)
    pids: dict[Path, int] = field(default_factory=dict)

    @property
    def stop_file(self) -> Path:
        return self.workdir / "stop"

    def _start(self, script: str, log: Path, *args: str) -> None:
        with log.open("wb") as out:
            proc = self.procs(
                [sys.executable, "-c", script, self.url, self.queue, *args], stdout=out
            )
        self.pids[log] = proc.pid

    def start_consumer(self) -> Path:
        log = self.workdir / f"consumer{len(self.consumers)}.log"
        self._start(CONSUMER, log, str(self.stop_file))
        self.consumers.append(log)
        return log

    def start_producer(self, n: int) -> Path:
        log = self.workdir / f"producer{len(self.producers)}.log"
        self._start(PRODUCER, log, f"p{len(self.producers)}", str(n))
        self.producers.append(log)
        return log

    def count(self, log: Path, verb: str) -> int:
        return sum(1 for line in log.read_text().splitlines() if line.startswith(verb + " "))

    def producing(self) -> bool:
        """Whether a producer still runs (a kill then is mid-run, not after)."""
        return not all(gone(self.pids[log]) for log in self.producers)

    def kill(self, log: Path) -> None:
        os.kill(self.pids[log], signal.SIGKILL)
        wait_until(lambda: gone(self.pids[log]), 10, "the killed process to be gone")

    def wait_producers(self, timeout: float) -> set[str]:
        wait_until(
            lambda: all(gone(self.pids[log]) for log in self.producers), timeout, "the producers"
        )
        return {body for log in self.producers for body in Log.read(log)["put"]}

    def uncertain(self, killed: Path | None) -> set[str]:
        """Bodies whose ack may or may not have reached the server: the killed
        consumer's last (killed mid-ack?) and those whose ack raised. Each is
        either acked, or redelivered and acked by another consumer."""
        logs = [Log.read(log) for log in self.consumers]
        bodies = {body for log in logs for body in log["ackfail"]}
        if killed is not None:
            victim = Log.read(killed)
            bodies |= set(victim["got"]) - set(victim["ack"])
        return bodies

    def wait_all_acked(
        self, produced: set[str], killed: Path | None, timeout: float, grace: float
    ) -> None:
        """Until every put body is acked, those whose ack is uncertain given
        ``grace`` (a lease and more) to come back; then stop the consumers."""

        def missing() -> set[str]:
            done = {body for log in self.consumers for body in Log.read(log)["ack"]}
            return produced - done

        try:
            wait_until(lambda: missing() <= self.uncertain(killed), timeout, "every put body acked")
            deadline = time.monotonic() + grace
            while missing() and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            self.stop_file.touch()
            wait_until(
                lambda: all(gone(self.pids[log]) for log in self.consumers), 20, "the consumers"
            )


def check_at_least_once(run: Run, produced: set[str], killed: Path | None) -> dict[str, int]:
    """The rule, from every log; returns how many duplicates each reason explains."""
    logs = {log: Log.read(log) for log in run.consumers}
    put_logs = [Log.read(log) for log in run.producers]
    retried = {body for log in put_logs for body in log["retry"]}
    ack_failed = {body for log in logs.values() for body in log["ackfail"]}
    killed_unacked: set[str] = set()
    if killed is not None:
        killed_unacked = set(logs[killed]["got"]) - set(logs[killed]["ack"])
    deliveries = collections.Counter(body for log in logs.values() for body in log["got"])
    acked = {body for log in logs.values() for body in log["ack"]}

    # A body acked by no one must be one whose ack was uncertain, acked then:
    # no_message_left() checks that the stream holds none of them.
    lost = produced - acked - run.uncertain(killed)
    assert not lost, f"lost: {sorted(lost)[:10]}"
    assert set(deliveries) <= produced | retried, "delivered what was never put"
    reasons = collections.Counter[str]()
    for body, times in deliveries.items():
        if times == 1:
            continue
        if body in killed_unacked and times == 2:
            reasons["killed consumer's unacked"] += 1
        elif body in ack_failed or body in retried:
            reasons["failed ack or retried put"] += 1
        else:
            raise AssertionError(f"{body} delivered {times} times with no reason")
    return dict(reasons)


#: The cluster test's lease: longer than a leader election, so that a message
#: whose consumer waits out the election is not redelivered meanwhile.
LEASE = 10


def no_message_left(url: str, queue: str) -> None:
    """No message is left, ready or leased (every lease has run out by now)."""
    with brokerq.connect(url) as client:
        q = client.queue(queue)
        with pytest.raises(brokerq.Empty):
            q.get(timeout=1)
        assert q.stats()["ready"] == 0


@pytest.fixture
def nats_url() -> Iterator[str]:
    with running_server() as server:
        yield server.url


def test_10000_messages_exactly_once_with_a_consumer_sigkilled(
    nats_url: str, procs: Procs, sock_dir: str
) -> None:
    queue = "crash" + uuid.uuid4().hex[:8]
    with brokerq.connect(nats_url) as client:
        client.queue(queue).configure(lease=3)  # the killed one's message back soon
    run = Run(procs, Path(sock_dir), nats_url, queue)
    victim = run.start_consumer()
    run.start_consumer()
    run.start_consumer()
    for _ in range(2):
        run.start_producer(5000)
    wait_until(lambda: run.count(victim, "ack") >= 1000, 60, "the victim to ack 1000")
    assert run.producing()
    run.kill(victim)
    produced = run.wait_producers(60)
    assert len(produced) == 10_000
    run.wait_all_acked(produced, victim, 60, grace=5)
    reasons = check_at_least_once(run, produced, victim)
    print("duplicates by reason:", reasons)
    assert set(reasons) <= {"killed consumer's unacked"}, reasons
    assert reasons.get("killed consumer's unacked", 0) <= 1  # it reserves one at a time
    no_message_left(nats_url, queue)


def test_r3_cluster_loses_no_acknowledged_put_when_the_stream_leader_dies(
    procs: Procs, sock_dir: str
) -> None:
    from brokerq.nats import naming

    queue = "r3" + uuid.uuid4().hex[:8]
    with Cluster() as cluster:
        # Every node named (a client fails over to any), streams made with 3 replicas.
        url = cluster.url + "?replicas=3"
        with brokerq.connect(url) as client:
            client.queue(queue).configure(lease=LEASE)  # its stream made
        stream = naming.stream_name(queue)
        assert cluster.stream_replicas(stream) == 3
        run = Run(procs, Path(sock_dir), url, queue)
        for _ in range(2):
            run.start_consumer()
        for _ in range(2):
            run.start_producer(1500)
        wait_until(lambda: run.count(run.consumers[0], "ack") >= 300, 60, "acks before the kill")
        assert run.producing()
        started = time.monotonic()
        leader = cluster.kill_leader(stream)
        produced = run.wait_producers(60)
        assert len(produced) == 3000
        run.wait_all_acked(produced, None, 60, grace=LEASE + 3)
        print("duplicates by reason:", check_at_least_once(run, produced, None))
        assert cluster.stream_leader(stream) != leader
        assert time.monotonic() - started < 150
        no_message_left(url, queue)
