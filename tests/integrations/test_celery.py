"""Celery on brokerq, for real: ``celery worker`` processes, solo and prefork.

The workers are real ``celery -A celery_app worker`` processes (the app is
tests/integrations/celery_app.py), started in a private socket directory
with ``broker_url = "brokerq://<socket>"`` and the ``rpc://`` result
backend; this process sends them tasks through the same app. Two workers
are shared by the tests that leave them as they found them (a module
fixture: starting a worker costs seconds): a solo one and a prefork one
with two children, each consuming ``celery`` and a queue named after its
pool, so a test can aim at either pool. The tests that need a worker
started late (priorities) or killed (acks_late) start their own.

Every worker is ended by its pid: SIGTERM (Celery's warm shutdown), then
SIGKILL to it and to its pool children after a bound. A failing test
shows the logs of the workers. Without Celery installed the module is
skipped, with how to install it; under CI (``CI=true``) that is a failure,
since CI must run these tests (tests/integrations/extras.py).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from conftest import BIN, kill_brokers, reap_children, wait_until
from extras import require

require("kombu", "kombu")
celery = require("celery", "test")  # the test extra has Celery

HERE = Path(__file__).resolve().parent
CELERY = str(BIN / "celery")
#: Seconds a worker may take to start, a task to come back, a worker to stop.
START_TIMEOUT = 60.0
RESULT_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
POOLS = ["solo", "prefork"]


def descendants(pid: int) -> list[int]:
    """``pid``'s children, their children and so on, from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if stat[0] not in ("Z", "X"):
                    parents[int(entry.name)] = int(stat[1])
    found: list[int] = []
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, ppid in parents.items() if ppid == parent]
        found += children
        frontier += children
    return found


def celery_env(socket_path: str) -> dict[str, str]:
    """The environment of a ``celery -A celery_app`` command on the broker at
    ``socket_path``: no BROKERQ_* setting of ours, celery_app importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKERQ_")}
    env["CELERY_BROKERQ_SOCKET"] = socket_path
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    return env


class Worker:
    """One ``celery worker`` process of ours, its log in the test's directory."""

    def __init__(self, directory: str, socket_path: str, name: str, pool: str, queues: str):
        self.name = f"{name}@bqtest"
        self.log_path = Path(directory, f"{name}.log")
        command = [CELERY, "-A", "celery_app", "worker", "-n", self.name, "-Q", queues]
        command += ["--pool", pool, *(["-c", "2"] if pool == "prefork" else [])]
        # mingle and gossip (the workers' own chatter) only slow the start here.
        command += ["--without-mingle", "--without-gossip", "-l", "info"]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=directory,
                env=celery_env(socket_path),
            )
        self.pool_pids: list[int] = []

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self) -> None:
        """Until the worker says it is ready (it consumes its queues then)."""

        def ready() -> bool:
            assert self.proc.poll() is None, f"{self.name} exited:\n{self.log()}"
            return " ready." in self.log()

        wait_until(ready, START_TIMEOUT, f"{self.name} to be ready; its log:\n{self.log()}")
        self.pool_pids = descendants(self.pid)

    def runs(self, pid: int) -> bool:
        """Whether ``pid`` is this worker or one of its pool processes."""
        return pid == self.pid or pid in self.pool_pids

    def kill(self) -> None:
        """SIGKILL the worker and its pool children (as a crash would end them)."""
        self.end(descendants(self.pid))

    def end(self, children: list[int]) -> None:
        """SIGKILL the worker, then ``children``; wait for it, reap them.

        The worker is killed through ``proc`` (a no-op once it has been
        waited for: its pid may be another process's by then); its children
        are ours to reap once it is dead, so their pids stay theirs."""
        self.proc.kill()
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=STOP_TIMEOUT)
        reap_children()  # its children, reparented to this subreaper

    def stop(self) -> None:
        """SIGTERM (warm shutdown), then SIGKILL after ``STOP_TIMEOUT`` s."""
        if self.proc.poll() is not None:
            return
        children = descendants(self.pid)
        self.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=STOP_TIMEOUT)
        self.end(children)


class Cluster:
    """The module's socket directory, its broker and the workers started in it."""

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="bqc", dir="/tmp")
        self.socket_path = os.path.join(self.directory, "b.sock")
        self.workers: list[Worker] = []
        self.files = 0

    def start(self, name: str, pool: str, queues: str) -> Worker:
        worker = Worker(self.directory, self.socket_path, name, pool, queues)
        self.workers.append(worker)
        return worker

    def file(self) -> str:
        """A fresh path for a task to record its runs in."""
        self.files += 1
        return os.path.join(self.directory, f"runs{self.files}.txt")

    def celery(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        """Run ``celery -A celery_app <args>`` on the cluster's broker, to its end."""
        return subprocess.run(
            [CELERY, "-A", "celery_app", *args],
            capture_output=True,
            cwd=self.directory,
            env=celery_env(self.socket_path),
            timeout=60,
            check=False,
        )

    def show_logs(self) -> None:
        for worker in self.workers:
            print(f"---- {worker.name} (pid {worker.pid}) ----\n{worker.log()[-8000:]}")

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        kill_brokers(self.directory)
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    made = Cluster()
    try:
        yield made
    finally:
        made.close()


@pytest.fixture(scope="module")
def app(cluster: Cluster) -> Iterator[celery.Celery]:
    """The test app in this process, for sending, on the cluster's broker."""
    import celery_app

    celery_app.app.conf.broker_url = f"brokerq://{cluster.socket_path}"
    yield celery_app.app
    celery_app.app.close()


@pytest.fixture(scope="module")
def tasks(app: celery.Celery) -> ModuleType:
    import celery_app

    return celery_app


@pytest.fixture(scope="module")
def shared_workers(cluster: Cluster, app: celery.Celery) -> dict[str, Worker]:
    """A solo and a prefork worker for the tests that leave them running."""
    workers = {pool: cluster.start(f"shared-{pool}", pool, f"celery,{pool}") for pool in POOLS}
    for worker in workers.values():
        worker.wait_ready()
    return workers


@pytest.fixture(autouse=True)
def _logs_on_failure(cluster: Cluster) -> Iterator[None]:
    """Print the workers' logs after each test: pytest shows them if it failed."""
    yield
    cluster.show_logs()


@pytest.mark.parametrize("pool", POOLS)
def test_a_task_returns_its_result(
    pool: str, tasks: ModuleType, shared_workers: dict[str, Worker]
) -> None:
    results = [tasks.add.apply_async((i, 100), queue=pool) for i in range(20)]
    assert [r.get(timeout=RESULT_TIMEOUT) for r in results] == [i + 100 for i in range(20)]


@pytest.mark.parametrize("pool", POOLS)
def test_a_failing_task_is_retried_until_it_succeeds(
    pool: str, tasks: ModuleType, cluster: Cluster, shared_workers: dict[str, Worker]
) -> None:
    path = cluster.file()
    result = tasks.flaky.apply_async((path, 3), queue=pool)
    assert result.get(timeout=RESULT_TIMEOUT) == 4
    assert tasks.lines(path) == ["run 0", "run 1", "run 2", "run 3"]


def test_countdown_and_eta_hold_a_task_back(
    tasks: ModuleType, shared_workers: dict[str, Worker]
) -> None:
    sent = time.time()
    later = tasks.now.apply_async(countdown=1.5)
    eta = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=1.5)
    at_eta = tasks.now.apply_async(eta=eta)
    # (only lower bounds: when a task may run, never how soon it must)
    assert later.get(timeout=RESULT_TIMEOUT) >= sent + 1.5
    assert at_eta.get(timeout=RESULT_TIMEOUT) >= eta.timestamp()


@pytest.mark.parametrize("pool", POOLS)
def test_a_group_gathers_every_result(
    pool: str, tasks: ModuleType, shared_workers: dict[str, Worker]
) -> None:
    job = celery.group(tasks.add.s(i, i).set(queue=pool) for i in range(10))
    assert job.apply_async().get(timeout=RESULT_TIMEOUT) == [2 * i for i in range(10)]


def test_inspect_ping_is_answered_by_every_worker(
    cluster: Cluster, shared_workers: dict[str, Worker]
) -> None:
    # A fanout exchange carries the ping to every worker; each answers on
    # the caller's reply queue.
    answer = cluster.celery("inspect", "ping", "--json", "--timeout", "5")
    output = answer.stdout.decode(errors="replace")
    assert answer.returncode == 0, output + answer.stderr.decode(errors="replace")
    replies = json.loads(output.strip().splitlines()[-1])
    assert replies == {w.name: {"ok": "pong"} for w in shared_workers.values()}


def test_purge_empties_a_queue(app: celery.Celery, tasks: ModuleType, cluster: Cluster) -> None:
    for i in range(5):
        tasks.add.apply_async((i, i), queue="nobody")  # no worker consumes it

    def waiting() -> int:
        with app.connection_for_write() as connection:
            return int(connection.default_channel.queue_declare("nobody").message_count)

    assert waiting() == 5
    purge = cluster.celery("purge", "-f", "-Q", "nobody")
    output = (purge.stdout + purge.stderr).decode(errors="replace")
    assert purge.returncode == 0, output
    assert "Purged 5 messages" in output, output
    assert waiting() == 0


def test_tasks_queued_before_the_worker_starts_run_highest_priority_first(
    tasks: ModuleType, cluster: Cluster
) -> None:
    path = cluster.file()
    priorities = [3, 0, 9, 5, 1, 7]
    results = [
        tasks.run_log.apply_async((path, f"p{p}"), queue="prio", priority=p) for p in priorities
    ]
    worker = cluster.start("prio", "solo", "prio")
    try:
        worker.wait_ready()
        assert [r.get(timeout=RESULT_TIMEOUT) for r in results] == [f"p{p}" for p in priorities]
        ran = [line.split()[0] for line in tasks.lines(path)]
        assert ran == [f"p{p}" for p in sorted(priorities, reverse=True)]
    finally:
        worker.stop()


def test_acks_late_task_of_a_killed_worker_runs_again_on_another(
    tasks: ModuleType, cluster: Cluster, app: Any
) -> None:
    """At-least-once through Celery: the worker running an acks_late task is
    SIGKILLed (its pool children too); the broker sees its connection close,
    takes the unacked task back at once, and the other worker runs it."""
    workers = [cluster.start("crash-prefork", "prefork", "crash")]
    workers.append(cluster.start("crash-solo", "solo", "crash"))
    try:
        for worker in workers:
            worker.wait_ready()
        path = cluster.file()
        result = tasks.crash_once.apply_async((path,), queue="crash")
        first = wait_until(lambda: tasks.lines(path), RESULT_TIMEOUT, "the task to start")
        pid = int(first[0].split()[1])
        (running,) = [w for w in workers if w.runs(pid)]
        (other,) = [w for w in workers if w is not running]
        running.kill()
        assert result.get(timeout=RESULT_TIMEOUT) == "done after 2 starts"
        starts = tasks.lines(path)
        assert len(starts) == 2, starts
        assert other.runs(int(starts[1].split()[1])), (starts, other.pid, other.pool_pids)
    finally:
        for worker in workers:
            worker.stop()


def test_workers_and_producers_carry_on_after_a_broker_crash(
    tasks: ModuleType, cluster: Cluster, shared_workers: dict[str, Worker]
) -> None:
    """The broker is SIGKILLed under running workers: the next client starts
    another, which replays the journal, and everyone reconnects by itself.
    (Last in the module: it changes the broker under the shared workers.)"""
    assert tasks.add.apply_async((1, 1), queue="solo").get(timeout=RESULT_TIMEOUT) == 2
    assert kill_brokers(cluster.directory), "no broker was running"
    results = [tasks.add.apply_async((i, 1), queue=pool) for pool in POOLS for i in range(3)]
    assert [r.get(timeout=RESULT_TIMEOUT) for r in results] == [1, 2, 3] * 2
    for worker in shared_workers.values():
        assert worker.proc.poll() is None, f"{worker.name} exited"
