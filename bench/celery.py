"""Celery with brokerq as its broker beside Celery with Redis, in one run.

    .bench-venv/bin/python bench/celery.py [--tasks N] [--latency-tasks M] [--prefork]

The venv needs celery, redis-py and brokerq (``pip install celery redis``
and ``pip install --no-deps -e .``), and ``redis-server`` on the PATH.

For each broker this starts its own server (brokerq: a broker of our own
with its defaults, journal included, as a Celery user gets it; Redis: a
``redis-server`` on a Unix socket, no persistence, as a cache or a
development box runs it), each in a fresh ``/tmp`` directory, and one
Celery worker (``--pool solo``; ``--prefork`` adds a run with ``--pool
prefork -c 2``), results off (``ignore_result``) and Celery's other
defaults (prefetch multiplier 4, acks on receipt). Then:

* **throughput**: the worker idle and ready, this process enqueues N no-op
  tasks (default 5,000) as fast as ``apply_async`` goes; tasks/s is N over
  the time from the first enqueue until the last task started, and until
  the last one finished. The enqueue rate alone is shown too.
* **latency**: M tasks (default 1,000) one at a time, each carrying
  ``time.time()`` at its enqueue; the worker records ``time.time()`` at the
  task's start, and the next task is sent once the worker has recorded the
  last. p50 and p99 of start minus enqueue.

The worker records each task's times by appending one line to a file, so
what is measured is the broker and kombu's transport, not a result
backend. Each figure's ratio brokerq / redis is printed beside it:
throughput above 1 and latency below 1 mean brokerq is faster. The ratio is
the claim (../shared/bench/README.md: the same machine, the same run);
the absolute figures are context. JSON goes to
``bench-results/celery-<date>-<time>.json``, with the longest gap between
two consecutive task starts of the throughput phase (a worker that
stalled, waiting out a poll instead of being woken, shows there).

Every process started here (brokers, redis-server, workers and their pool
children) is ended by its pid, and every directory removed, also on an
error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import benchlib  # bench/ is sys.path[0] when this file runs as a script

HERE = os.path.dirname(os.path.abspath(__file__))
# This file is named celery.py: with bench/ first on the path, ``import
# celery`` would import this file again instead of Celery.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]

import celery  # noqa: E402
import kombu  # noqa: E402

ROOT = os.path.dirname(HERE)
#: Seconds a worker may take to start, a phase to finish, a process to stop.
START_TIMEOUT = 60.0
PHASE_TIMEOUT = 300.0
STOP_TIMEOUT = 10.0
WARM_UP = 200
QUEUE = "bench"


# -- the app, in both the worker and this process -----------------------------


#: Where the worker records its tasks (set in the worker process), and its
#: fd there, opened by each pool process on its first task.
RECORD = {"path": "", "fd": -1}


def noop(sent: float) -> None:
    """The task: nothing, but one line with when it was sent, started, ended."""
    started = time.time()
    if RECORD["fd"] == -1:
        RECORD["fd"] = os.open(RECORD["path"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.write(int(RECORD["fd"]), f"{sent!r} {started!r} {time.time()!r}\n".encode())


def make_app(broker_url: str) -> celery.Celery:
    """The benchmark's app: one no-op task, results off."""
    if broker_url.startswith("brokerq:"):
        import brokerq.kombu  # noqa: F401 - registers the transport
    app = celery.Celery("bench", broker=broker_url)
    app.conf.update(
        task_ignore_result=True,
        task_default_queue=QUEUE,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
    )
    app.task(name="bench.noop")(noop)
    return app


def worker_main(broker_url: str, record_path: str, pool: str) -> None:
    """Run as the worker process (``bench/celery.py --worker ...``)."""
    RECORD["path"] = record_path
    app = make_app(broker_url)
    # Logging every task would cost more than the broker: warnings only, and
    # the start is told by a file.
    ready = celery.signals.worker_ready
    ready.connect(lambda **_: Path(record_path + ".ready").touch(), weak=False)
    options = ["worker", "-Q", QUEUE, "--pool", pool, "-l", "warning"]
    options += ["-c", "2"] if pool == "prefork" else []
    options += ["--without-mingle", "--without-gossip", "--without-heartbeat"]
    app.worker_main(options)


# -- servers and workers, each ended by its pid -------------------------------


def redis_version() -> str:
    out = subprocess.run(["redis-server", "--version"], capture_output=True, check=False)
    return out.stdout.decode().split()[2] if out.returncode == 0 else "?"


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A redis-server of our own on a Unix socket: yields the broker URL."""
    directory = tempfile.mkdtemp(prefix="bqr", dir="/tmp")
    socket_path = os.path.join(directory, "r.sock")
    command = ["redis-server", "--port", "0", "--unixsocket", socket_path]
    command += ["--save", "", "--appendonly", "no", "--dir", directory]
    with open(os.path.join(directory, "log"), "wb") as log:
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    try:
        wait_for(lambda: os.path.exists(socket_path), START_TIMEOUT, "redis-server")
        yield f"redis+socket://{socket_path}"
    finally:
        end(proc, signal.SIGTERM)
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def brokerq_server() -> Iterator[str]:
    with benchlib.Broker() as broker:
        yield f"brokerq://{broker.socket_path}"


def descendants(pid: int) -> list[int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                parents[int(entry.name)] = int(
                    (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
                )
    found, frontier = [], [pid]
    while frontier:
        children = [c for c, p in parents.items() if p == frontier[-1]]
        frontier.pop()
        found += children
        frontier += children
    return found


def end(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """``sig`` to ``proc``, then SIGKILL to it and its children after a bound."""
    if proc.poll() is not None:
        return
    children = descendants(proc.pid)
    proc.send_signal(sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=STOP_TIMEOUT)
    proc.kill()  # a no-op once waited for: its pid may be another's by then
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()


@contextlib.contextmanager
def worker(broker_url: str, record_path: str, pool: str) -> Iterator[None]:
    log_path = record_path + ".log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", broker_url, record_path, pool],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env={k: v for k, v in os.environ.items() if not k.startswith("BROKERQ_")},
        )
    try:

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"the worker exited:\n{Path(log_path).read_text()[-3000:]}")
            return os.path.exists(record_path + ".ready")

        wait_for(ready, START_TIMEOUT, "the worker")
        yield
    finally:
        end(proc, signal.SIGTERM)


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


# -- the measures --------------------------------------------------------------


class Record:
    """The worker's record file, read as it grows: one line per task run."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lines: list[bytes] = []
        self.offset = 0

    def read(self) -> int:
        """How many tasks have been recorded by now."""
        with contextlib.suppress(FileNotFoundError), open(self.path, "rb") as file:
            file.seek(self.offset)
            data = file.read()
            complete = data[: data.rfind(b"\n") + 1]
            self.offset += len(complete)
            self.lines += complete.splitlines()
        return len(self.lines)

    def wait(self, total: int, timeout: float, what: str) -> None:
        wait_for(lambda: self.read() >= total, timeout, what)

    def times(self, first: int, last: int) -> list[tuple[float, float, float]]:
        """(sent, started, finished) of the tasks recorded first..last-1."""
        return [
            (float(sent), float(started), float(finished))
            for sent, started, finished in (line.split() for line in self.lines[first:last])
        ]


def wait_one(record: Record, total: int) -> None:
    """Until the worker recorded task number ``total``: polled often, as the
    next task waits for it (the latency is measured by the worker, not here)."""
    deadline = time.monotonic() + PHASE_TIMEOUT
    while record.read() < total:
        if time.monotonic() > deadline:
            raise RuntimeError(f"task {total} not recorded within {PHASE_TIMEOUT} s")
        time.sleep(0.0002)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def measure(broker_url: str, pool: str, n: int, m: int) -> dict[str, float]:
    """Both phases through one worker on ``broker_url``: the figures."""
    directory = tempfile.mkdtemp(prefix="bqw", dir="/tmp")
    record = Record(os.path.join(directory, "record"))
    app = make_app(broker_url)
    noop = app.tasks["bench.noop"]
    try:
        with worker(broker_url, record.path, pool):
            for _ in range(WARM_UP):
                noop.apply_async((time.time(),))
            record.wait(WARM_UP, PHASE_TIMEOUT, "the warm-up tasks")

            start = time.time()
            for _ in range(n):
                noop.apply_async((time.time(),))
            enqueued = time.time() - start
            record.wait(WARM_UP + n, PHASE_TIMEOUT, "the throughput tasks")
            burst = record.times(WARM_UP, WARM_UP + n)
            starts = sorted(started for _, started, _ in burst)

            done = WARM_UP + n
            for _ in range(m):
                noop.apply_async((time.time(),))
                done += 1
                wait_one(record, done)
            waits = [started - sent for sent, started, _ in record.times(WARM_UP + n, done)]
    finally:
        app.close()
        shutil.rmtree(directory, ignore_errors=True)
    return {
        "enqueue_per_s": n / enqueued,
        "started_per_s": n / (max(t[1] for t in burst) - start),
        "finished_per_s": n / (max(t[2] for t in burst) - start),
        "latency_p50_ms": 1000 * statistics.median(waits),
        "latency_p99_ms": 1000 * percentile(waits, 0.99),
        # Not in the table: a stall (a wait for a poll's timeout) shows here.
        "longest_start_gap_ms": 1000 * max(b - a for a, b in itertools.pairwise(starts)),
    }


# -- the run -------------------------------------------------------------------

#: Each figure, its label, and whether more is better.
FIGURES = [
    ("enqueue_per_s", "enqueue, tasks/s", True),
    ("started_per_s", "tasks/s to the last start", True),
    ("finished_per_s", "tasks/s to the last finish", True),
    ("latency_p50_ms", "enqueue-to-start p50, ms", False),
    ("latency_p99_ms", "enqueue-to-start p99, ms", False),
]
BROKERS = {"brokerq": brokerq_server, "redis": redis_server}


def table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    rows = ["| pool | figure | brokerq | redis | brokerq / redis |", "|---|---|---:|---:|---:|"]
    for pool, by_broker in results.items():
        for key, label, more_is_better in FIGURES:
            ours, theirs = (by_broker.get(name, {}).get(key, math.nan) for name in BROKERS)
            better = "higher" if more_is_better else "lower"
            rows.append(
                f"| {pool} | {label} | {ours:,.2f} | {theirs:,.2f} | "
                f"{ours / theirs:.2f}x ({better} is better) |"
            )
    return "\n".join(rows)


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        worker_main(*sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=5000, help="no-op tasks for throughput")
    parser.add_argument("--latency-tasks", type=int, default=1000, help="one-at-a-time tasks")
    parser.add_argument("--prefork", action="store_true", help="also a prefork -c 2 worker")
    parser.add_argument("--brokers", default="brokerq,redis", help="which of brokerq,redis")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench-results"))
    args = parser.parse_args()
    brokers = {name: BROKERS[name] for name in args.brokers.split(",")}
    pools = ["solo", "prefork"] if args.prefork else ["solo"]
    load_before = os.getloadavg()
    results: dict[str, dict[str, dict[str, float]]] = {}
    for pool in pools:
        results[pool] = {}
        for name, server in brokers.items():
            print(f"{pool} worker, {name} ...", file=sys.stderr, flush=True)
            with server() as broker_url:
                results[pool][name] = measure(broker_url, pool, args.tasks, args.latency_tasks)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    os.makedirs(args.out, exist_ok=True)
    out_path = os.path.join(args.out, f"celery-{stamp}.json")
    document = {
        "benchmark": "bench/celery.py",
        "parameters": {"tasks": args.tasks, "latency_tasks": args.latency_tasks, "pools": pools},
        "results": results,
        "ratios_brokerq_over_redis": {
            pool: {key: r["brokerq"][key] / r["redis"][key] for key, _, _ in FIGURES}
            for pool, r in results.items()
            if len(r) == len(BROKERS)
        },
        **benchlib.run_facts(
            load_before,
            celery=celery.__version__,
            kombu=kombu.__version__,
            **{"redis-server": redis_version()},
        ),
    }
    with open(out_path, "w") as file:
        json.dump(document, file, indent=2)
    print(table(results))
    print(f"\n{args.tasks} tasks, {args.latency_tasks} for latency; {out_path}")


if __name__ == "__main__":
    main()
