"""Scenario 19 of spawn-research.md: a chaos soak with real processes.

Producers put with the blocking client, consumers take with reserve/ack
and with get, while the test SIGKILLs and SIGSTOPs/SIGCONTs, at random,
the broker and the clients (a killed client is started again; the next
client to need a broker spawns one). Throughout, it checks:

* never more than one broker: the broker lock (``/proc/locks``) has at most
  one holder, and at most one ``local-queue-broker`` process of this
  test's socket is alive (a launcher and the broker it forked count once);
* no client is stuck: each one writes a line when an operation begins and
  one when it ends; an operation may take its own wait plus twice the
  client's timeout (one for connecting or spawning, one for the request
  and its retries) plus a grace, time spent stopped not counted (puts pass
  a timeout: without one a put waits for room, so for a stopped broker,
  for ever);

and afterwards, once the chaos stopped and the queue was drained:

* no acknowledged put is lost: each was taken by a get, or delivered by a
  reserve whose ack was sent, or is still in the queue; except, for get
  (at most once), a message taken by a get whose broker died in between
  (G23) or whose consumer died or gave up before reading the reply (G25):
  each missing one must be matched to a get of its own that could have
  lost it, at about the time the queue's order says it was taken;
* nothing is duplicated beyond docs/guarantees.md: a body is taken by get
  at most once, and then by nothing else; by reserve again only after a
  delivery whose ack was not acknowledged (``unknown``, ``lost``, or its
  consumer killed first), each delivery with an attempt of its own; an
  acked or got body is never drained;
* nothing spurious: every body delivered was put, under one id.

The test prints a one-line summary (``pytest -s``). It runs
``BROKERQ_TEST_CHAOS_SECONDS`` (default 20); ``bench/chaos.sh`` runs it
longer. ``BROKERQ_TEST_CHAOS_SEED`` replays a seed's chaos schedule (the
processes' timing still varies).
"""

from __future__ import annotations

import bisect
import contextlib
import json
import math
import os
import random
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import Procs, broker_pids, wait_until
from test_crash import drain, finish, python, sigkill

import brokerq
from brokerq.spawn import lock_holder_pid, lock_path

CHAOS_SECONDS = float(os.environ.get("BROKERQ_TEST_CHAOS_SECONDS", "20"))
QUEUE = "chaos"
#: The clients' timeout: connecting (or spawning), and the grace of each reply.
TIMEOUT = 3.0
#: How long a consumer's get or reserve waits for a message.
WAIT = 0.3
#: The reserve's lease: a consumer stopped longer loses it.
LEASE = 1.5
#: Scheduling slack on a loaded machine, beyond what the client promises.
GRACE = 4.0
ROLES = {"p0": "producer", "p1": "producer", "r0": "reserver", "g0": "getter"}

# One script for every role. Each operation writes a line when it begins
# ("op", t0) and one when it ends ("end": its outcome, t1), monotonic clock.
CLIENT = r"""
import json, os, random, sys, time
import brokerq
from brokerq.client import calls
role, path, queue, name, log_path, stop = sys.argv[1:7]
timeout, wait, lease = map(float, sys.argv[7:10])
client = brokerq.Client(path, timeout=timeout)
q = client.queue(queue)
log = open(log_path, "a", buffering=1)

def begin(op, **fields):
    log.write(json.dumps({"op": op, "t0": time.monotonic(), **fields}) + "\n")

def end(outcome, **fields):
    log.write(json.dumps({"end": outcome, "t1": time.monotonic(), **fields}) + "\n")

i = 0
pid_before = None  # the broker of the last call that got a reply
while not os.path.exists(stop):
    if role == "producer":
        body = f"{name}-{i}"
        i += 1
        begin("put", body=body)
        try:
            # A timeout (for room: the queue has no bound) gives the put a
            # deadline; without one it would wait for a stopped broker for ever.
            msg_id = q.put(body, timeout=wait)
        except brokerq.BrokerqError as exc:
            end("failed", body=body, error=repr(exc))
            continue
        end("acked", body=body, id=msg_id)
    elif role == "reserver":
        begin("reserve")
        try:
            msg = q.reserve(timeout=wait, lease=lease)
        except brokerq.Empty:
            end("empty")
            continue
        except brokerq.BrokerqError as exc:
            end("error", error=repr(exc))
            continue
        end("got", id=msg.id, body=msg.body.decode(), attempt=msg.attempt)
        time.sleep(random.uniform(0.005, 0.05))  # the work (a stop now may outlast the lease)
        begin("ack", id=msg.id, attempt=msg.attempt)
        try:
            msg.ack()
        except brokerq.LeaseLost:
            outcome = "lost"
        except brokerq.BrokerqError:
            outcome = "unknown"
        else:
            outcome = "acked"
        end(outcome, id=msg.id, attempt=msg.attempt)
    else:
        # A get that crossed a broker's death may have lost a message (G23),
        # and so may one that gave up with its reply on the way (G25):
        # "suspect" when it failed, or its reply came from another broker
        # than the last one's.
        begin("get")
        try:
            reply = client.run(calls.get(queue, wait))
        except brokerq.Empty:
            pid = client.broker_pid  # the connection is open: no I/O
            end("empty", suspect=pid != pid_before)
            pid_before = pid
            continue
        except brokerq.BrokerqError as exc:
            end("error", error=repr(exc), suspect=True)
            pid_before = None
            continue
        pid = client.broker_pid
        end("got", id=reply.msg_id, body=reply.body.decode(), suspect=pid != pid_before)
        pid_before = pid
client.close()
print(json.dumps({"name": name}))
"""


# -- the processes ---------------------------------------------------------------


def op_limit(op: str) -> float:
    """How long one operation may take (not counting time stopped)."""
    return {"reserve": WAIT, "get": WAIT, "put": WAIT}.get(op, 0.0) + 2 * TIMEOUT + GRACE


@dataclass
class Client:
    """One incarnation of a client process, and what its log said so far."""

    slot: str
    incarnation: int
    proc: subprocess.Popen[bytes]
    log: Path
    started: float
    stopped_at: float | None = None
    stops: list[tuple[float, float]] = field(default_factory=list)
    offset: int = 0
    partial: bytes = b""
    op: str | None = "start"  # the operation in progress, if any
    holding: bool = False  # a reserver between its reserve's reply and its ack's
    since: float = 0.0
    slowest: float = 0.0
    killed_at: float | None = None

    @property
    def role(self) -> str:
        return ROLES[self.slot]

    @property
    def name(self) -> str:
        return f"{self.slot}.{self.incarnation}"

    def stopped_during(self, start: float, end: float) -> float:
        """Seconds this process spent stopped between ``start`` and ``end``."""
        spans = [*self.stops]
        if self.stopped_at is not None:
            spans.append((self.stopped_at, end))
        return sum(max(0.0, min(b, end) - max(a, start)) for a, b in spans)

    def read_log(self) -> None:
        """Follow the log: which operation is in progress, since when."""
        try:
            with self.log.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        for line in lines:
            entry = json.loads(line)
            self.holding = entry.get("end") == "got" or entry.get("op") == "ack"
            if "op" in entry:
                self.op, self.since = entry["op"], entry["t0"]
            else:
                took = entry["t1"] - self.since - self.stopped_during(self.since, entry["t1"])
                self.slowest = max(self.slowest, took)
                self.op = None

    def check_progress(self, now: float) -> None:
        if self.op is None or self.killed_at is not None:
            return
        took = now - self.since - self.stopped_during(self.since, now)
        limit = op_limit(self.op)
        assert took <= limit, (
            f"client {self.name} (pid {self.proc.pid}) stuck in {self.op!r} for {took:.1f} s "
            f"(limit {limit:g} s); log tail: {self.log.read_text()[-600:]}"
        )


def process_state(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of ``pid``, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    state, ppid = stat.rsplit(")", 1)[1].split()[:2]
    return state, int(ppid)


def live_brokers(sock_dir: str) -> list[int]:
    """This test's broker processes that are alive, launchers counted with their broker."""
    live = {}
    for pid in broker_pids(sock_dir):
        found = process_state(pid)
        if found is not None and found[0] not in ("Z", "X"):
            live[pid] = found[1]
    return [pid for pid, ppid in live.items() if ppid not in live]


def lock_holders(path: str) -> int:
    """How many locks /proc/locks shows held on the file ``path``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return 0
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    held = 0
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if len(fields) > 5 and fields[1] != "->" and fields[5] == device:
            held += 1
    return held


# -- the test ----------------------------------------------------------------------


class Chaos:
    def __init__(self, socket_path: str, sock_dir: str, procs: Procs, seed: str) -> None:
        self.socket_path = socket_path
        self.sock_dir = Path(sock_dir)
        self.procs = procs
        self.rng = random.Random(seed)
        self.stop_producers = self.sock_dir / "stop-producers"
        self.stop_consumers = self.sock_dir / "stop-consumers"
        self.clients: dict[str, Client] = {}
        self.retired: list[Client] = []
        self.counts = dict.fromkeys(
            ["broker kills", "broker stops", "long broker stops", "client kills", "client stops"],
            0,
        )
        self.broker_stop: tuple[int, float, bool] | None = None  # (pid, SIGCONT due, long)
        self.client_conts: dict[str, float] = {}
        self.brokers_seen: set[int] = set()
        self.max_brokers = 0
        self.max_holders = 0
        self.getter_kills: list[float] = []

    def start(self, slot: str, incarnation: int = 0) -> None:
        name = f"{slot}.{incarnation}"
        log = self.sock_dir / f"{name}.log"
        stop = self.stop_producers if ROLES[slot] == "producer" else self.stop_consumers
        args = [ROLES[slot], self.socket_path, QUEUE, name, str(log), str(stop)]
        args += [str(TIMEOUT), str(WAIT), str(LEASE)]
        proc = self.procs(python(CLIENT, *args))
        now = time.monotonic()
        self.clients[slot] = Client(slot, incarnation, proc, log, now, since=now)

    def check(self) -> None:
        """The invariants that hold at every moment."""
        brokers = live_brokers(str(self.sock_dir))
        holders = lock_holders(lock_path(self.socket_path))
        # /proc/locks is read a page at a time, each page a snapshot of its
        # own: a lock let go and taken again meanwhile (a broker stopping,
        # the next one starting) can be counted twice across pages. Two
        # brokers holding the lock would hold it for their lives, so a count
        # over 1 is read again before it fails the test.
        for _ in range(3):
            if holders <= 1:
                break
            holders = lock_holders(lock_path(self.socket_path))
        serving = self.serving_broker()
        if serving is not None:
            self.brokers_seen.add(serving)
        self.max_brokers = max(self.max_brokers, len(brokers))
        self.max_holders = max(self.max_holders, holders)
        assert len(brokers) <= 1, f"more than one broker at once: {brokers}"
        assert holders <= 1, f"{holders} holders of the broker lock at once"
        now = time.monotonic()
        for client in self.clients.values():
            client.read_log()
            client.check_progress(now)
            told = self.stop_producers if client.role == "producer" else self.stop_consumers
            if client.proc.poll() is not None and client.killed_at is None and not told.exists():
                _, err = client.proc.communicate()
                raise AssertionError(f"client {client.name} exited: {err.decode()[-2000:]}")

    def serving_broker(self) -> int | None:
        """The broker that holds the lock now (it wrote its pid there), if any."""
        pid = lock_holder_pid(self.socket_path)
        return pid if pid is not None and pid in broker_pids(str(self.sock_dir)) else None

    def act(self) -> None:
        """One random blow."""
        action = self.rng.choices(
            ["kill broker", "stop broker", "kill client", "stop client"], [3, 2, 2, 3]
        )[0]
        now = time.monotonic()
        if action == "kill broker":
            pid = self.serving_broker()
            # A stopped broker is killed now and then; never in a long stop,
            # which is there to make the clients time out.
            stop = self.broker_stop
            if stop is not None and stop[0] == pid and (stop[2] or self.rng.random() > 0.3):
                pid = None
            if pid is not None:
                sigkill(pid)
                self.counts["broker kills"] += 1
                if self.broker_stop and self.broker_stop[0] == pid:
                    self.broker_stop = None
        elif action == "stop broker":
            pid = self.serving_broker()
            if pid is not None and self.broker_stop is None:
                long = self.rng.random() < 0.25  # long enough for the clients to time out
                pause = TIMEOUT + self.rng.uniform(0.2, 1.5) if long else self.rng.uniform(0.05, 1)
                os.kill(pid, signal.SIGSTOP)
                self.broker_stop = (pid, now + pause, long)
                self.counts["broker stops"] += 1
                self.counts["long broker stops"] += long
        elif action == "kill client":
            client = self.clients[self.rng.choice(sorted(self.clients))]
            client.proc.kill()
            client.proc.wait(timeout=10)
            client.killed_at = now
            if client.stopped_at is not None:
                client.stops.append((client.stopped_at, now))
                client.stopped_at = None
            self.client_conts.pop(client.slot, None)
            if client.role == "getter":
                self.getter_kills.append(now)
            self.retired.append(client)
            self.counts["client kills"] += 1
            self.start(client.slot, client.incarnation + 1)
        else:
            running = [s for s, c in sorted(self.clients.items()) if c.stopped_at is None]
            reserver = self.clients["r0"]
            if reserver.holding and reserver.stopped_at is None and self.rng.random() < 0.5:
                # Stopped while it holds a lease, for longer than the lease.
                client, pause = reserver, LEASE + self.rng.uniform(0.3, 1.5)
            elif running:
                client = self.clients[self.rng.choice(running)]
                pause = self.rng.uniform(0.1, LEASE + 1.0)
            else:
                return
            os.kill(client.proc.pid, signal.SIGSTOP)
            client.stopped_at = now
            self.client_conts[client.slot] = now + pause
            self.counts["client stops"] += 1

    def continue_due(self, now: float, everyone: bool = False) -> None:
        if self.broker_stop and (everyone or self.broker_stop[1] <= now):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.broker_stop[0], signal.SIGCONT)
            self.broker_stop = None
        for slot, due in list(self.client_conts.items()):
            if everyone or due <= now:
                client = self.clients[slot]
                os.kill(client.proc.pid, signal.SIGCONT)
                assert client.stopped_at is not None
                client.stops.append((client.stopped_at, time.monotonic()))
                client.stopped_at = None
                del self.client_conts[slot]

    def run(self, seconds: float) -> float:
        for slot in ROLES:
            self.start(slot)
        start = time.monotonic()
        next_blow = start + 1.0  # let them all get going first
        while (now := time.monotonic()) < start + seconds:
            self.check()
            self.continue_due(now)
            if now >= next_blow:
                self.act()
                next_blow = time.monotonic() + self.rng.uniform(0.15, 0.6)
            time.sleep(0.02)
        self.continue_due(time.monotonic(), everyone=True)
        # The chaos is over: every client must still make progress, and end.
        self.stop_producers.touch()
        for slot in ("p0", "p1"):
            self.finish(slot)
        self.stop_consumers.touch()
        for slot in ("r0", "g0"):
            self.finish(slot)
        return time.monotonic() - start

    def finish(self, slot: str) -> None:
        client = self.clients[slot]
        deadline = time.monotonic() + op_limit("reserve") + 10
        while client.proc.poll() is None:
            self.check()
            assert time.monotonic() < deadline, f"client {client.name} did not stop"
            time.sleep(0.02)
        finish(client.proc)
        client.read_log()
        client.killed_at = time.monotonic()  # done: no more progress expected
        self.retired.append(client)


@dataclass
class Delivery:
    kind: str  # "get" or "reserve"
    msg_id: int
    t0: float
    t1: float
    attempt: int = 0
    outcome: str = "none"  # reserve: acked, unknown, lost, none (killed before it ended)


def read_logs(clients: list[Client]) -> dict[str, Any]:
    """What every client incarnation did, from its log."""
    tried: dict[str, float] = {}
    acked: dict[str, tuple[int, float]] = {}
    failed: list[str] = []
    deliveries: dict[str, list[Delivery]] = {}
    suspects: list[tuple[float, float]] = []
    counts = {"get": 0, "empty": 0, "errors": 0}
    for client in clients:
        lines = []
        for line in client.log.read_text().splitlines():
            with contextlib.suppress(ValueError):  # a line cut short by SIGKILL
                lines.append(json.loads(line))
        begun: dict[str, Any] = {}
        current: Delivery | None = None
        for entry in lines:
            if "op" in entry:
                begun = entry
                if entry["op"] == "put":  # it may be there, whatever comes next
                    tried[entry["body"]] = entry["t0"]
                continue
            outcome = entry["end"]
            if begun.get("op") == "put":
                if outcome == "acked":
                    acked[entry["body"]] = (entry["id"], entry["t1"])
                else:
                    failed.append(entry["error"])
            elif begun.get("op") in ("get", "reserve"):
                if entry.get("suspect"):
                    suspects.append((begun["t0"], entry["t1"]))
                if outcome in ("empty", "error"):
                    counts["empty" if outcome == "empty" else "errors"] += 1
                    continue
                kind = begun["op"]
                delivery = Delivery(kind, entry["id"], begun["t0"], entry["t1"])
                delivery.attempt = entry.get("attempt", 0)
                if kind == "get":
                    delivery.outcome = "got"
                    counts["get"] += 1
                deliveries.setdefault(entry["body"], []).append(delivery)
                current = delivery
            elif begun.get("op") == "ack":
                assert current is not None
                assert (current.msg_id, current.attempt) == (entry["id"], entry["attempt"])
                current.outcome = outcome
    return {
        "tried": tried,
        "acked": acked,
        "failed": failed,
        "deliveries": deliveries,
        "suspects": suspects,
        "counts": counts,
    }


def verify(seen: dict[str, Any], drained: list[str], getter_kills: list[float]) -> dict[str, int]:
    """The after-the-fact checks (see the module doc); returns figures for the summary."""
    tried, acked = seen["tried"], seen["acked"]
    deliveries: dict[str, list[Delivery]] = seen["deliveries"]
    problems: list[str] = []

    # Nothing spurious, one id per body.
    for body in [*deliveries, *drained]:
        if body not in tried:
            problems.append(f"{body!r} was delivered but never put")
    for body, ds in deliveries.items():
        ids = {d.msg_id for d in ds} | ({acked[body][0]} if body in acked else set())
        if len(ids) != 1:
            problems.append(f"{body!r} under several ids: {sorted(ids)}")

    # Duplicates only as guarantees.md allows.
    if len(drained) != len(set(drained)):
        problems.append("a body was drained twice")
    drained_set = set(drained)
    redelivered = 0
    for body, ds in deliveries.items():
        gets = [d for d in ds if d.kind == "get"]
        reserves = sorted((d for d in ds if d.kind == "reserve"), key=lambda d: d.attempt)
        confirmed = [d for d in reserves if d.outcome == "acked"]
        redelivered += int(len(ds) + (body in drained_set) > 1)
        if len({d.attempt for d in reserves}) != len(reserves):
            problems.append(f"{body!r}: one attempt delivered twice: {reserves}")
        if gets:
            if len(gets) > 1:
                problems.append(f"{body!r}: got twice (get is at most once): {ds}")
            if confirmed:
                problems.append(f"{body!r}: got after (or before) an acked delivery: {ds}")
            if any(d.t0 > gets[0].t1 for d in reserves):
                problems.append(f"{body!r}: reserved after it was got: {ds}")
            if body in drained_set:
                problems.append(f"{body!r}: got, yet still in the queue")
        else:
            if confirmed and confirmed[-1] is not reserves[-1]:
                problems.append(f"{body!r}: delivered again after an acked delivery: {ds}")
            if confirmed and body in drained_set:
                problems.append(f"{body!r}: acked, yet still in the queue: {ds}")

    # No acknowledged put lost, but for what a get may lose (G23, G25): each
    # missing message must be matched to a get that could have lost it, one
    # each, at about the time the queue's order says it was taken (between
    # the deliveries of the next lower and next higher ids, give or take).
    settled = {
        body
        for body, ds in deliveries.items()
        if any(d.kind == "get" or d.outcome in ("acked", "unknown", "none") for d in ds)
    }
    missing = set(acked) - settled - drained_set
    first: dict[int, tuple[float, float]] = {}
    for ds in deliveries.values():
        for d in ds:
            if d.msg_id not in first or d.t0 < first[d.msg_id][0]:
                first[d.msg_id] = (d.t0, d.t1)
    delivered_ids = sorted(first)
    windows = []
    for body in missing:
        msg_id = acked[body][0]
        i = bisect.bisect(delivered_ids, msg_id)
        start = first[delivered_ids[i - 1]][0] - 1.0 if i > 0 else -math.inf
        end = first[delivered_ids[i]][1] + 1.0 if i < len(delivered_ids) else math.inf
        windows.append((end, start, body))
    chances = [(t - op_limit("get"), t, "killed") for t in getter_kills]
    chances += [(t0, t1, "crossed") for t0, t1 in seen["suspects"]]
    chances.sort(key=lambda c: c[1])
    causes = {"killed": 0, "crossed": 0}
    unexplained = []
    for end, start, body in sorted(windows):
        match = next((c for c in chances if c[1] >= start and c[0] <= end), None)
        if match is None:
            unexplained.append(body)
        else:
            chances.remove(match)
            causes[match[2]] += 1
    if unexplained:
        problems.append(
            f"{len(unexplained)} acknowledged puts lost, e.g. {sorted(unexplained)[:5]} "
            f"({len(missing)} missing; {len(seen['suspects'])} gets across a broker's death "
            f"and {len(getter_kills)} getter kills could lose one each)"
        )
    assert not problems, "\n".join(problems[:20])
    return {
        "missing": len(missing),
        "suspects": len(seen["suspects"]),
        "redelivered": redelivered,
        "getter kills": len(getter_kills),
        **{f"lost: {cause}": n for cause, n in causes.items()},
    }


def test_s19_chaos_soak_one_broker_no_stuck_client_no_acked_message_lost(
    socket_path: str, sock_dir: str, procs: Procs, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Redeliveries are many here (killed and stopped consumers): no dead letters.
    monkeypatch.setenv("BROKERQ_MAX_DELIVERIES", "1000000")
    seed = os.environ.get("BROKERQ_TEST_CHAOS_SEED") or f"{random.randrange(1 << 32):08x}"
    chaos = Chaos(socket_path, sock_dir, procs, seed)
    try:
        duration = chaos.run(CHAOS_SECONDS)
    except BaseException:
        print(f"\ns19 chaos seed {seed} failed; counts so far: {chaos.counts}")
        raise

    with brokerq.connect(socket_path, timeout=10) as drainer:
        queue, dead = drainer.queue(QUEUE), drainer.queue(QUEUE + ":dead")
        # The consumers are gone: their leases went back when they closed.
        wait_until(lambda: queue.stats()["reserved"] == 0, what="the leases to be released")
        drained = [body.decode() for body in [*drain(queue), *drain(dead)]]
    chaos.check()  # still one broker (the one that served the drain)

    clients = chaos.retired
    seen = read_logs(clients)
    figures = verify(seen, drained, chaos.getter_kills)
    deliveries = [d for ds in seen["deliveries"].values() for d in ds]
    reserves = [d for d in deliveries if d.kind == "reserve"]
    outcomes = {o: sum(1 for d in reserves if d.outcome == o) for o in ("acked", "unknown", "lost")}
    slowest = max(c.slowest for c in clients)
    counts = chaos.counts
    print(
        f"\ns19 chaos: {duration:.1f} s, seed {seed}: "
        f"broker kills {counts['broker kills']}, broker stops {counts['broker stops']} "
        f"({counts['long broker stops']} past the clients' timeout), "
        f"client kills {counts['client kills']}, client stops {counts['client stops']}; "
        f"brokers {len(chaos.brokers_seen)}; puts acked {len(seen['acked'])}, "
        f"failed {len(seen['failed'])}; got {seen['counts']['get']}, reserved {len(reserves)} "
        f"(acked {outcomes['acked']}, ack unknown {outcomes['unknown']}, "
        f"lease lost {outcomes['lost']}); redelivered {figures['redelivered']}; "
        f"drained {len(drained)}; lost by get {figures['missing']} "
        f"(matched to {figures['lost: killed']} of {figures['getter kills']} getter kills and "
        f"{figures['lost: crossed']} of {figures['suspects']} gets that crossed a broker's "
        f"death or gave up: G23, G25); at most {chaos.max_brokers} broker, "
        f"{chaos.max_holders} lock holder; slowest op {slowest:.1f} s "
        f"(limit {op_limit('reserve'):g} s)"
    )
    # The chaos did what it says.
    assert counts["broker kills"] >= CHAOS_SECONDS / 10
    assert counts["client kills"] >= 1
    assert len(seen["acked"]) >= 100
    assert outcomes["acked"] + seen["counts"]["get"] >= 50
