"""Crashes: brokers killed with SIGKILL, consumers killed, leases that run out.

What is promised (design.md §2): a put is acknowledged only once its record
is in the journal, so a broker killed with SIGKILL and respawned by the next
client has every acknowledged message; a reserved message comes back when
its consumer's connection closes or its lease runs out, and moves to
``<q>:dead`` after ``max_deliveries``; an acked message, or one taken with
``get``, never comes back.

Real processes throughout. Every test has its own short socket directory
(``sock_dir``, whose brokers conftest.py kills afterwards); subprocesses
are started through :func:`procs`, which stops and waits for them. Every
wait is bounded: a condition polled against a deadline, or a subprocess
timeout. The one plain sleep paces the soak's kills (a kill every ~1.5 s is
the load being tested, not a synchronisation).

Brokers are reaped by pid with ``os.waitpid(pid)`` (the test process is a
child subreaper, so a daemonized broker is its child); nothing here calls
``waitpid(-1)`` while a subprocess of the test still runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Procs, broker_pids, gone, read_line, run_cli, wait_until

import brokerq
from brokerq.spawn import broker_running, lock_holder_pid

# -- helpers ---------------------------------------------------------------


def sigkill(pid: int, timeout: float = 10.0) -> None:
    """SIGKILL a broker and wait until it is gone (and its lock is free)."""
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: gone(pid), timeout, f"broker {pid} to die")


def kill_broker_of(client: brokerq.Client) -> int:
    """SIGKILL the broker ``client`` talks to; returns its pid."""
    pid = client.broker_pid
    sigkill(pid)
    return pid


def serving_broker(socket_path: str, sock_dir: str, killed: list[int]) -> int:
    """The pid of the broker that holds the lock now (from the lock file)."""

    def current() -> int | None:
        pid = lock_holder_pid(socket_path)
        if pid is None or pid in killed or not broker_running(socket_path):
            return None
        return pid if pid in broker_pids(sock_dir) else None

    return wait_until(current, what="a broker to hold the lock")


def drain(queue: brokerq.Queue) -> list[bytes]:
    """Every ready body of ``queue``, in order, with get_many (at-most-once)."""
    bodies: list[bytes] = []
    while True:
        try:
            bodies += queue.get_many(500, timeout=0)
        except brokerq.Empty:
            return bodies


def count_lines(path: str) -> int:
    try:
        return Path(path).read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def lines_grow(path: str, by: int) -> None:
    """Wait until a worker has written ``by`` more lines to ``path``."""
    base = count_lines(path)
    wait_until(lambda: count_lines(path) >= base + by, what=f"{path} to grow by {by} lines")


def python(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", code, *args]


def finish(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> Any:
    """Wait for a worker that was told to stop; its JSON summary (last stdout line)."""
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err.decode()
    return json.loads(out.decode().splitlines()[-1])


# -- 1. acknowledged puts survive a SIGKILL ----------------------------------------------------


def test_acknowledged_puts_survive_sigkill_in_order_exactly_once(socket_path: str) -> None:
    bodies = [f"m{i:03d}".encode() for i in range(200)]
    with brokerq.connect(socket_path) as client:
        queue = client.queue("q")
        ids = [queue.put(body) for body in bodies]  # each one returned: acknowledged
        assert ids == sorted(set(ids))
        pid = kill_broker_of(client)
    with brokerq.connect(socket_path) as client:
        assert client.broker_pid != pid
        queue = client.queue("q")
        assert drain(queue) == bodies
        assert queue.stats()["ready"] == 0


# -- 2. a producer while the broker is killed again and again ------------------------------------

# Puts numbered bodies until the stop file appears; each body is written to
# the acked file only after its put returned. A put that raises is counted
# (it may or may not have been enqueued). Last line of stdout: a summary.
PRODUCER = r"""
import json, os, sys
import brokerq
path, queue, prefix, acked, stop = sys.argv[1:6]
client = brokerq.Client(path, timeout=20)
q = client.queue(queue)
failed = []
i = 0
with open(acked, "a", buffering=1) as log:
    while not os.path.exists(stop):
        body = f"{prefix}-{i}"
        i += 1
        try:
            q.put(body)
        except brokerq.BrokerqError as exc:
            failed.append(f"{body}: {exc!r}")
            continue
        log.write(body + "\n")
client.close()
print(json.dumps({"attempted": i, "failed": failed}))
"""


def numbered(body: bytes, prefix: str) -> int:
    head, _, number = body.decode().rpartition("-")
    assert head == prefix, f"{body!r} was not put by producer {prefix!r}"
    return int(number)


def test_producer_loses_and_duplicates_nothing_across_repeated_kills(
    socket_path: str, sock_dir: str, procs: Procs
) -> None:
    acked_file = os.path.join(sock_dir, "acked")
    stop = os.path.join(sock_dir, "stop")
    producer = procs(python(PRODUCER, socket_path, "q", "p", acked_file, stop))
    killed: list[int] = []
    for _ in range(4):
        # The interval between kills: the producer got 50 more puts through
        # (to the broker spawned after the last kill, after the first round).
        lines_grow(acked_file, 50)
        pid = serving_broker(socket_path, sock_dir, killed)
        sigkill(pid)
        killed.append(pid)
    lines_grow(acked_file, 50)
    Path(stop).touch()
    summary = finish(producer)

    acked = Path(acked_file).read_text().split()
    with brokerq.connect(socket_path) as client:
        assert client.broker_pid not in killed
        drained = drain(client.queue("q"))
    numbers = [numbered(body, "p") for body in drained]
    # Never twice, and in put order (FIFO: ids only grow, across respawns too).
    assert numbers == sorted(set(numbers))
    # Nothing that was not put (a put that raised may or may not be there).
    assert all(n < summary["attempted"] for n in numbers)
    # No acknowledged put lost.
    missing = set(acked) - {body.decode() for body in drained}
    assert not missing, f"{len(missing)} acknowledged puts lost, e.g. {sorted(missing)[:5]}"
    assert len(acked) + len(summary["failed"]) == summary["attempted"]
    assert len(acked) >= 250


# -- 3. a consumer killed while it holds a message ------------------------------------------------

# Reserves one message with a long lease, says which, and holds it until
# killed (reading stdin, which the test never closes before the kill).
HOLDER = r"""
import sys
import brokerq
client = brokerq.connect(sys.argv[1])
msg = client.queue(sys.argv[2]).reserve(timeout=10, lease=30)
print(msg.id, msg.attempt, msg.body.decode(), flush=True)
sys.stdin.read()
"""


def test_killed_consumer_releases_its_message_at_once(socket_path: str, procs: Procs) -> None:
    with brokerq.connect(socket_path) as client:
        queue = client.queue("q")
        msg_id = queue.put(b"job")
        holder = procs(python(HOLDER, socket_path, "q"), stdin=subprocess.PIPE)
        assert read_line(holder).split() == [str(msg_id).encode(), b"1", b"job"]
        stats = queue.stats()
        assert (stats["reserved"], stats["ready"]) == (1, 0)
        holder.kill()
        holder.wait(timeout=10)
        start = time.monotonic()
        msg = queue.reserve(timeout=10, lease=30)
        waited = time.monotonic() - start
        assert (msg.id, msg.body, msg.attempt) == (msg_id, b"job", 2)
        assert waited < 5, f"redelivered after {waited:.2f} s: the lease (30 s) ran out?"
        msg.ack()
        with pytest.raises(brokerq.Empty):
            queue.get_nowait()


# -- 4. what was acked or got stays gone ----------------------------------------------------------


def test_acked_and_got_messages_do_not_come_back_after_sigkill(socket_path: str) -> None:
    with brokerq.connect(socket_path) as client:
        queue = client.queue("q")
        queue.put(b"acked")
        queue.put(b"taken")
        queue.put(b"kept")  # shows that the journal was replayed at all
        msg = queue.reserve(timeout=5)
        assert msg.body == b"acked"
        msg.ack()
        assert queue.get(timeout=5) == b"taken"
        pid = kill_broker_of(client)
    with brokerq.connect(socket_path) as client:
        assert client.broker_pid != pid
        queue = client.queue("q")
        assert queue.get_nowait() == b"kept"
        with pytest.raises(brokerq.Empty):
            queue.get_nowait()
        stats = queue.stats()
        assert (stats["ready"], stats["reserved"], stats["buried"], stats["delayed"]) == (
            0,
            0,
            0,
            0,
        )


# -- 5. lease expiry ---------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["BROKERQ_LEASE", "reserve(lease=)"])
def test_expired_lease_redelivers_and_late_ack_is_refused(
    socket_path: str, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    if how == "BROKERQ_LEASE":
        monkeypatch.setenv("BROKERQ_LEASE", "0.5")  # passed on to the spawned broker
        lease = None
    else:
        lease = 0.5
    with brokerq.connect(socket_path) as client:
        queue = client.queue("q")
        msg_id = queue.put(b"slow")
        first = queue.reserve(timeout=5, lease=lease)
        start = time.monotonic()
        assert (first.id, first.attempt) == (msg_id, 1)
        second = queue.reserve(timeout=10, lease=30)  # waits for the lease to run out
        waited = time.monotonic() - start
        assert (second.id, second.body, second.attempt) == (msg_id, b"slow", 2)
        assert 0.3 < waited < 5
        with pytest.raises(brokerq.LeaseLost):
            first.ack()
        with pytest.raises(brokerq.LeaseLost):
            first.touch()
        # The late ack removed nothing: attempt 2 is still leased, and
        # comes back once more when released.
        stats = queue.stats()
        assert (stats["reserved"], stats["ready"]) == (1, 0)
        second.release()
        third = queue.reserve(timeout=5, lease=30)
        assert (third.id, third.body, third.attempt) == (msg_id, b"slow", 3)
        third.ack()
        with pytest.raises(brokerq.Empty):
            queue.get_nowait()


# -- 6. dead letters and buried messages -----------------------------------------------------------


def deliver_until_dead(queue: brokerq.Queue, msg_id: int, attempts: int) -> None:
    for attempt in range(1, attempts + 1):
        msg = queue.reserve(timeout=5)
        assert (msg.id, msg.attempt) == (msg_id, attempt)
        msg.release()


def test_dead_letters_survive_sigkill_and_kick_back(socket_path: str) -> None:
    with brokerq.connect(socket_path) as client:
        queue = client.queue("q", max_deliveries=2)
        dead = client.queue("q:dead")
        msg_id = queue.put(b"poison")
        deliver_until_dead(queue, msg_id, 2)
        with pytest.raises(brokerq.Empty):
            queue.get_nowait()
        stats = queue.stats()
        assert (stats["dead_lettered_total"], stats["ready"], stats["reserved"]) == (1, 0, 0)
        assert dead.stats()["ready"] == 1
        pid = kill_broker_of(client)

    with brokerq.connect(socket_path) as client:
        assert client.broker_pid != pid
        queue = client.queue("q")
        dead = client.queue("q:dead")
        assert queue.stats()["max_deliveries"] == 2  # the setting survived too
        assert queue.stats()["ready"] == 0
        assert dead.stats()["ready"] == 1
        assert dead.peek() == b"poison"
        assert dead.kick(10) == 1
        assert dead.stats()["ready"] == 0
        # Back in "q", counting from 1 again, and the limit still applies.
        deliver_until_dead(queue, msg_id, 2)
        assert dead.stats()["ready"] == 1
        assert queue.kick(10) == 0  # nothing buried in "q"

    result = run_cli("--socket", socket_path, "kick", "q:dead")
    assert (result.returncode, result.stdout, result.stderr) == (0, b"1\n", b"")
    with brokerq.connect(socket_path) as client:
        msg = client.queue("q").reserve(timeout=5)
        assert (msg.id, msg.body, msg.attempt) == (msg_id, b"poison", 1)
        msg.ack()
        assert client.queue("q:dead").stats()["ready"] == 0
    result = run_cli("--socket", socket_path, "kick", "q:dead")
    assert (result.returncode, result.stdout, result.stderr) == (0, b"0\n", b"")


def test_buried_message_stays_buried_across_sigkill_until_kicked(socket_path: str) -> None:
    with brokerq.connect(socket_path) as client:
        queue = client.queue("q")
        msg_id = queue.put(b"later")
        queue.reserve(timeout=5).bury()
        with pytest.raises(brokerq.Empty):
            queue.get_nowait()
        stats = queue.stats()
        assert (stats["buried"], stats["ready"], stats["reserved"]) == (1, 0, 0)
        pid = kill_broker_of(client)
    with brokerq.connect(socket_path) as client:
        assert client.broker_pid != pid
        queue = client.queue("q")
        with pytest.raises(brokerq.Empty):
            queue.get_nowait()
        stats = queue.stats()
        assert (stats["buried"], stats["ready"], stats["reserved"]) == (1, 0, 0)
        assert queue.kick() == 1
        msg = queue.reserve(timeout=5)
        assert (msg.id, msg.body, msg.attempt) == (msg_id, b"later", 2)
        msg.ack()
        assert queue.stats()["buried"] == 0


# -- 7. reserve as a context manager -----------------------------------------------------------


def fail_inside_reserve(queue: brokerq.Queue, seen: list[tuple[int, int]]) -> None:
    with queue.reserve(timeout=5) as msg:
        seen.append((msg.id, msg.attempt))
        raise RuntimeError("handler failed")


def test_reserve_context_manager_acks_or_releases(socket_path: str) -> None:
    with brokerq.connect(socket_path) as client:
        queue = client.queue("q")
        queue.put(b"fine")
        with queue.reserve(timeout=5) as msg:
            assert msg.body == b"fine"
        with pytest.raises(brokerq.Empty):
            queue.get_nowait()
        assert queue.stats()["reserved"] == 0

        msg_id = queue.put(b"boom")
        seen: list[tuple[int, int]] = []
        with pytest.raises(RuntimeError, match="handler failed"):
            fail_inside_reserve(queue, seen)
        assert seen == [(msg_id, 1)]
        again = queue.reserve(timeout=5)
        assert (again.id, again.body, again.attempt) == (msg_id, b"boom", 2)
        again.ack()
        with pytest.raises(brokerq.Empty):
            queue.get_nowait()


# -- 8. the journal in an explicit data directory -----------------------------------------------


def test_journal_in_data_dir_survives_sigkill(
    socket_path: str, sock_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = os.path.join(sock_dir, "data")
    monkeypatch.setenv("BROKERQ_DATA_DIR", data_dir)
    with brokerq.connect(socket_path) as client:
        queue = client.queue("q")
        queue.put_many([b"a", b"b", b"c"])
        # Its name within the data dir is the broker's to choose.
        journal = client.stats()["journal"]
        assert os.path.dirname(journal) == data_dir
        assert os.path.basename(journal).endswith(".journal")
        assert os.path.getsize(journal) > 0
        assert not os.path.lexists(socket_path + ".journal")
        pid = kill_broker_of(client)
    with brokerq.connect(socket_path) as client:
        assert client.broker_pid != pid
        assert client.stats()["journal"] == journal
        assert drain(client.queue("q")) == [b"a", b"b", b"c"]
    assert not os.path.lexists(socket_path + ".journal")


# -- 9. every fsync mode survives SIGKILL (the page cache does) -----------------------------------


@pytest.mark.parametrize("mode", ["never", "batch", "always"])
def test_every_fsync_mode_survives_sigkill(
    socket_path: str, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    monkeypatch.setenv("BROKERQ_FSYNC", mode)
    bodies = [f"{mode}-{i}".encode() for i in range(50)]
    with brokerq.connect(socket_path) as client:
        assert client.stats()["fsync"] == mode
        queue = client.queue("q")
        for body in bodies:
            queue.put(body)
        pid = kill_broker_of(client)
    with brokerq.connect(socket_path) as client:
        assert client.broker_pid != pid
        assert drain(client.queue("q")) == bodies


@pytest.mark.parametrize(
    ("where", "asked", "expected"),
    [
        ("beside_socket", None, "never"),
        ("data_dir", None, "batch"),
        ("beside_socket", "always", "always"),  # an explicit --fsync wins
        ("data_dir", "never", "never"),
    ],
)
def test_the_default_fsync_of_each_place_survives_sigkill(  # noqa: PLR0917 (fixtures, parameters)
    socket_path: str,
    sock_dir: str,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
    asked: str | None,
    expected: str,
) -> None:
    """G52: by default the journal beside the socket is not fsynced (a
    broker crash loses nothing all the same) and one in --data-dir is
    fsynced per group of puts; an explicit --fsync wins either way."""
    if where == "data_dir":
        monkeypatch.setenv("BROKERQ_DATA_DIR", os.path.join(sock_dir, "data"))
    if asked is not None:
        monkeypatch.setenv("BROKERQ_FSYNC", asked)
    bodies = [f"{where}-{i}".encode() for i in range(50)]
    with brokerq.connect(socket_path) as client:
        stats = client.stats()
        assert stats["fsync"] == expected
        assert stats["journal"].startswith(
            os.path.join(sock_dir, "data") if where == "data_dir" else socket_path
        )
        queue = client.queue("q")
        queue.put_many(bodies[:10])
        for body in bodies[10:]:
            queue.put(body)
        pid = kill_broker_of(client)
    with brokerq.connect(socket_path) as client:
        assert client.broker_pid != pid
        assert drain(client.queue("q")) == bodies


# -- 10. a bounded soak: producers, consumers, a broker killed every ~1.5 s ------------------------

# Reserves and acks until the stop file appears. Each delivery is written
# after the ack was tried: [msg id, body, attempt, broker pid, outcome],
# outcome "acked" (the ack's reply came), "unknown" (the connection was
# lost before the reply: the ack may or may not have been applied) or
# "lost" (LeaseLost). Last line of stdout: a summary.
CONSUMER = r"""
import json, os, sys
import brokerq
path, queue, log_path, stop = sys.argv[1:5]
client = brokerq.Client(path, timeout=20)
q = client.queue(queue)
errors = []
with open(log_path, "a", buffering=1) as log:
    while not os.path.exists(stop):
        try:
            msg = q.reserve(timeout=0.2)
        except brokerq.Empty:
            continue
        except brokerq.BrokerqError as exc:
            errors.append(f"reserve: {exc!r}")
            continue
        pid = client.broker_pid  # of the connection that delivered it
        try:
            msg.ack()
        except brokerq.LeaseLost:
            outcome = "lost"
        except brokerq.BrokerUnavailable:
            outcome = "unknown"
        else:
            outcome = "acked"
        log.write(json.dumps([msg.id, msg.body.decode(), msg.attempt, pid, outcome]) + "\n")
client.close()
print(json.dumps({"errors": errors}))
"""

#: Short in CI; bench/soak.sh runs it for longer (BROKERQ_TEST_SOAK_SECONDS).
SOAK_SECONDS = float(os.environ.get("BROKERQ_TEST_SOAK_SECONDS", "9"))
KILL_EVERY = 1.5


def test_soak_producers_consumers_and_broker_kills(
    socket_path: str, sock_dir: str, procs: Procs
) -> None:
    stop_producers = os.path.join(sock_dir, "stop-producers")
    stop_consumers = os.path.join(sock_dir, "stop-consumers")
    put_logs = {f"p{k}": os.path.join(sock_dir, f"p{k}.acked") for k in range(2)}
    ack_logs = [os.path.join(sock_dir, f"c{k}.acks") for k in range(2)]
    producers = {
        prefix: procs(python(PRODUCER, socket_path, "soak", prefix, log, stop_producers))
        for prefix, log in put_logs.items()
    }
    consumers = [
        procs(python(CONSUMER, socket_path, "soak", log, stop_consumers)) for log in ack_logs
    ]
    logs = [*put_logs.values(), *ack_logs]

    def all_went_on() -> None:
        """Every producer and consumer got something through (to the live broker)."""
        base = [count_lines(log) for log in logs]
        wait_until(
            lambda: all(count_lines(log) > n for log, n in zip(logs, base, strict=True)),
            what="every producer and consumer to go on",
        )

    killed: list[int] = []
    start = time.monotonic()
    next_kill = start + KILL_EVERY
    while next_kill < start + SOAK_SECONDS:
        all_went_on()
        time.sleep(max(0.0, next_kill - time.monotonic()))  # pacing, not synchronisation
        pid = serving_broker(socket_path, sock_dir, killed)
        sigkill(pid)
        killed.append(pid)
        next_kill += KILL_EVERY
    all_went_on()

    Path(stop_producers).touch()
    put_summaries = {prefix: finish(proc) for prefix, proc in producers.items()}
    Path(stop_consumers).touch()
    ack_summaries = [finish(proc) for proc in consumers]

    with brokerq.connect(socket_path) as client:
        assert client.broker_pid not in killed
        queue = client.queue("soak")
        # The consumers' connections are closed; wait until the broker has
        # taken back whatever they still held, then take the rest.
        wait_until(lambda: queue.stats()["reserved"] == 0, what="the leases to be released")
        drained = [body.decode() for body in drain(queue)]

    acknowledged_puts = {
        body for log in put_logs.values() for body in Path(log).read_text().split()
    }
    deliveries: dict[str, list[tuple[int, int, int, str]]] = {}
    for log in ack_logs:
        for line in Path(log).read_text().splitlines():
            msg_id, body, attempt, pid, outcome = json.loads(line)
            deliveries.setdefault(body, []).append((attempt, msg_id, pid, outcome))

    # The check. Delivery is at-least-once, and an ack is a request like any
    # other: if the broker is killed after the consumer sent it, the consumer
    # cannot know whether it was applied ("unknown"). So:
    #
    # (a) no loss: every acknowledged put was delivered and acked (its
    #     outcome "acked", or "unknown": an unknown ack of a message that
    #     never came back was applied), or is still in the queue;
    # (b) nothing spurious: every delivered or drained body was put by a
    #     producer (maybe by a put that raised: it may or may not be there);
    # (c) duplicates only across a broker kill: a body delivered more than
    #     once was delivered each time by a different broker, every delivery
    #     but the last by a broker this test killed, with its ack "unknown"
    #     (an ack whose reply came is durable: that message never comes
    #     back); each delivery has its own attempt number, and the id is the
    #     same each time. A body is drained at most once, and only if no
    #     ack of it was confirmed.
    problems: list[str] = []
    settled = {
        body
        for body, ds in deliveries.items()
        if any(outcome in ("acked", "unknown") for *_, outcome in ds)
    }
    lost = acknowledged_puts - settled - set(drained)
    if lost:
        problems.append(f"(a) {len(lost)} acknowledged puts lost, e.g. {sorted(lost)[:5]}")

    for body in [*deliveries, *drained]:
        prefix, _, number = body.rpartition("-")
        if prefix not in put_summaries or not int(number) < put_summaries[prefix]["attempted"]:
            problems.append(f"(b) {body!r} was never put")

    if len(drained) != len(set(drained)):
        problems.append("(c) a body was drained twice")
    for body, ds in deliveries.items():
        ds.sort()
        attempts = [d[0] for d in ds]
        if len(set(attempts)) != len(attempts):
            problems.append(f"(c) {body!r}: an attempt delivered twice: {ds}")
        if len({d[1] for d in ds}) != 1:
            problems.append(f"(c) {body!r}: delivered under different ids: {ds}")
        if len({d[2] for d in ds}) != len(ds):
            problems.append(f"(c) {body!r}: delivered twice by one broker: {ds}")
        for _, _, pid, outcome in ds[:-1]:
            if outcome != "unknown" or pid not in killed:
                problems.append(f"(c) {body!r}: redelivered after {outcome} by {pid}: {ds}")
        if any(outcome == "lost" for *_, outcome in ds):
            problems.append(f"(c) {body!r}: a lease ran out (30 s) during the soak: {ds}")
        if ds[-1][3] == "acked" and body in drained:
            problems.append(f"(c) {body!r}: acked, yet still in the queue: {ds}")
    assert not problems, "\n".join(problems[:20])

    # The soak did what it says: kills happened, work went through each time.
    assert len(killed) >= 4
    assert len(acknowledged_puts) >= 100
    assert sum(1 for ds in deliveries.values() for d in ds if d[3] == "acked") >= 100
    failed_puts = [f for s in put_summaries.values() for f in s["failed"]]
    reserve_errors = [e for s in ack_summaries for e in s["errors"]]
    assert not failed_puts, failed_puts[:5]
    assert not reserve_errors, reserve_errors[:5]
