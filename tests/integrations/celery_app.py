"""The Celery app that tests/integrations/test_celery.py runs real workers of.

``celery -A celery_app worker`` imports this module in every worker process
(and the test imports it to send tasks), so everything a worker needs comes
from here and from the environment the test gives it:

* ``CELERY_BROKERQ_SOCKET``: the broker's socket path; the broker URL is
  ``brokerq://<path>`` (the default per-user broker if unset, as a Celery
  user would write ``brokerq://``). ``import brokerq.kombu`` registers the
  ``brokerq`` transport name with kombu, the one line an app adds.
* results over ``rpc://``: replies travel back through the broker itself
  (a reply queue per client), so the tests need nothing but brokerq.

The tasks are what the tests count and order things with. Those that
leave a trace append one line to a file: small ``O_APPEND`` writes are
atomic, so several workers (and a worker killed mid-task) share a file
without losing or mixing lines.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery
from kombu import Exchange, Queue

import brokerq.kombu  # noqa: F401 - registers the "brokerq" transport with kombu

SOCKET = os.environ.get("CELERY_BROKERQ_SOCKET", "")

app = Celery("celery_app", broker=f"brokerq://{SOCKET}", backend="rpc://")

#: The queue of the priority test: its own, so that the shared workers (who
#: consume ``celery``) never take its tasks before the test's own worker starts.
PRIORITY_QUEUE = Queue(
    "prio", Exchange("prio"), routing_key="prio", queue_arguments={"x-max-priority": 10}
)

app.conf.update(
    task_queues=[Queue("celery", Exchange("celery"), routing_key="celery"), PRIORITY_QUEUE],
    task_default_queue="celery",
    # One message at a time per pool process: the order the broker hands
    # tasks out in is the order they run in (the priority test needs it), and
    # a killed worker held no more than its running task.
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    result_expires=300,
)


def record(path: str, line: str) -> None:
    """Append ``line`` to the file at ``path`` in one write."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def lines(path: str) -> list[str]:
    """The lines ``record`` appended to ``path`` so far (none if no file yet)."""
    try:
        with open(path) as file:
            return file.read().splitlines()
    except FileNotFoundError:
        return []


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task
def now() -> float:
    """When the task ran (the countdown test compares it with when it was sent)."""
    return time.time()


@app.task
def run_log(path: str, tag: str) -> str:
    """Record that the task ran (``tag pid``): the runs are counted across workers."""
    record(path, f"{tag} {os.getpid()}")
    return tag


@app.task(bind=True, max_retries=10)
def flaky(self: Any, path: str, failures: int) -> int:
    """Fail ``failures`` times (each retried through the broker), then
    succeed: returns how many runs it took."""
    record(path, f"run {self.request.retries}")
    if self.request.retries < failures:
        raise self.retry(countdown=0.1)
    return len(lines(path))


@app.task(acks_late=True)
def crash_once(path: str) -> str:
    """Record its start (with the pid of the process running it), then on the
    first run wait until the test kills the worker; a later run completes.

    acks_late: the message is acked after the task returns, so a worker
    killed before that leaves it unacked, and the broker, seeing the
    worker's connection close, delivers it again."""
    runs = len(lines(path))
    record(path, f"start {os.getpid()} {os.getppid()}")
    if runs == 0:
        time.sleep(120)  # killed here
    return f"done after {runs + 1} starts"
