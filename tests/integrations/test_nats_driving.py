"""The blocking NATS client's loop (brokerq.nats.driving): run by the caller
when free, handed over when not, serviced when idle.

The first tests drive plain coroutines (no server); the last ones use a
real nats-server: many threads sharing one client, a connection left idle
past the server's ping limit, Ctrl-C in the middle of a wait.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from conftest import wait_until
from extras import require

require("nats", "nats")
from nats_server import require_server, running_server  # noqa: E402

import brokerq  # noqa: E402
from brokerq.nats.driving import IDLE_TICK, Driver  # noqa: E402


@pytest.fixture
def driver() -> Iterator[Driver]:
    d = Driver()
    try:
        yield d
    finally:
        d.close(5)


async def where() -> int:
    await asyncio.sleep(0)
    return threading.get_ident()


def test_a_call_on_a_free_loop_runs_in_the_callers_thread(driver: Driver) -> None:
    assert driver.run(where(), 5) == threading.get_ident()


def test_a_call_while_another_thread_runs_the_loop_is_handed_over(driver: Driver) -> None:
    started = threading.Event()
    release = asyncio.Event()

    async def long_call() -> int:
        started.set()
        await release.wait()
        return threading.get_ident()

    holder: list[int] = []
    t = threading.Thread(target=lambda: holder.append(driver.run(long_call(), 10)))
    t.start()
    assert started.wait(5)

    # The loop runs in t: this call runs there too, and ends the long one.
    async def second() -> int:
        release.set()
        return threading.get_ident()

    assert driver.run(second(), 5) == t.ident
    t.join(5)
    assert holder == [t.ident]


def test_calls_from_many_threads_all_complete(driver: Driver) -> None:
    results: list[int] = []
    lock = threading.Lock()

    async def work(i: int) -> int:
        await asyncio.sleep(0.001 * (i % 3))
        return i

    def worker(base: int) -> None:
        for i in range(base, base + 200):
            value = driver.run(work(i), 10)
            with lock:
                results.append(value)

    threads = [threading.Thread(target=worker, args=(k * 1000,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == sorted(k * 1000 + i for k in range(8) for i in range(200))


def test_a_call_from_inside_another_loop_is_handed_to_the_service_thread(driver: Driver) -> None:
    async def caller_in_a_loop() -> int:
        return driver.run(where(), 5)

    assert asyncio.run(caller_in_a_loop()) == driver._service.ident


def test_a_handed_over_call_returns_when_done_not_at_the_next_idle_pass(
    driver: Driver,
) -> None:
    """The service thread runs the loop for a handed-over call until its
    result is with the waiting thread: not until its next idle pass."""

    async def calls_from_inside_a_loop() -> float:
        started = time.monotonic()
        for _ in range(100):
            driver.run(where(), 5)
        return time.monotonic() - started

    # (waiting for a pass each, 100 calls would take about 100 * IDLE_TICK / 2)
    assert asyncio.run(calls_from_inside_a_loop()) < 100 * IDLE_TICK / 4


def test_a_call_past_its_wait_is_cancelled_and_raises(driver: Driver) -> None:
    cancelled = threading.Event()

    async def forever() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    started = time.monotonic()
    with pytest.raises(brokerq.BrokerUnavailable, match=r"did not answer within 0\.2 s"):
        driver.run(forever(), 0.2)
    assert time.monotonic() - started < 5
    assert cancelled.is_set()
    assert driver.run(where(), 5) == threading.get_ident()  # usable after


def test_the_loop_runs_while_no_call_does(driver: Driver) -> None:
    """What is scheduled between calls (nats-py's pings, reconnects) still runs."""
    ran = threading.Event()
    driver.loop.call_soon_threadsafe(ran.set)
    assert ran.wait(IDLE_TICK * 20)
    timer = threading.Event()
    driver.loop.call_soon_threadsafe(driver.loop.call_later, 0.1, timer.set)
    assert timer.wait(IDLE_TICK * 20)


# -- with a real server -------------------------------------------------------


@pytest.fixture(scope="module")
def nats_url() -> Iterator[str]:
    require_server()
    # A server that drops a client missing two pings a second apart.
    with running_server(config='ping_interval: "1s"\nping_max: 2\n') as server:
        yield server.url


def test_threads_sharing_a_client_each_get_every_message_once(nats_url: str) -> None:
    name = "drv" + uuid.uuid4().hex[:8]
    got: list[bytes] = []
    lock = threading.Lock()
    with brokerq.connect(nats_url) as client:
        q = client.queue(name)

        def consume() -> None:
            while True:
                try:
                    body = q.get(timeout=2)
                except brokerq.Empty:
                    return
                with lock:
                    got.append(body)

        consumers = [threading.Thread(target=consume) for _ in range(4)]
        for t in consumers:
            t.start()
        producers = [
            threading.Thread(target=lambda k=k: [q.put(b"%d-%d" % (k, i)) for i in range(100)])
            for k in range(4)
        ]
        for t in producers:
            t.start()
        for t in producers + consumers:
            t.join(60)
    assert sorted(got) == sorted(b"%d-%d" % (k, i) for k in range(4) for i in range(100))


def test_an_idle_client_keeps_its_connection(nats_url: str) -> None:
    """The server drops a client that misses its pings (here after ~3 s):
    between calls the loop still answers them, so no reconnect happens."""
    with brokerq.connect(nats_url) as client:
        q = client.queue("idle" + uuid.uuid4().hex[:8])
        q.put(b"before")
        time.sleep(5)
        q.put(b"after")
        assert [q.get(timeout=5), q.get(timeout=5)] == [b"before", b"after"]
        nc = client._current().client.nc
        assert nc.stats["reconnects"] == 0


CTRL_C = """
import sys, brokerq
client = brokerq.connect(sys.argv[1])
q = client.queue(sys.argv[2])
q.stats()
print("waiting", flush=True)
try:
    q.get()
except KeyboardInterrupt:
    print("interrupted", flush=True)
q.put(b"still works")
print(q.get(timeout=5).decode(), flush=True)
client.close()
"""


def test_ctrl_c_in_a_wait_interrupts_it_and_leaves_the_client_usable(nats_url: str) -> None:
    name = "cc" + uuid.uuid4().hex[:8]
    proc = subprocess.Popen(
        [sys.executable, "-c", CTRL_C, nats_url, name], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "waiting"
        with brokerq.connect(nats_url) as watcher:  # the get's pull request is waiting
            q = watcher.queue(name)
            wait_until(lambda: q.stats()["waiters"] >= 1, 10, "the get to wait")
        os.kill(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=20)
        assert out.split() == ["interrupted", "still", "works"]
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
