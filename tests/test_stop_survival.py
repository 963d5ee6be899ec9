"""A stop is no worse than a crash for workers (docs/guarantees.md G58).

A broker that stops (``brokerq stop``, SIGTERM, an idle exit, a journal
failure) answers the requests it will not carry out with ``shutting_down``.
Waiting consumers take that as a lost connection: they reconnect (waiting
for the old broker to exit, then starting a new one if no other client
did) and carry on, as after a ``kill -9``. Each test makes a consumer wait
in a real broker, stops it with ``brokerq stop``, and checks that a message
put after the stop (to the next broker) reaches the consumer; the puts
refused by the stopping broker are sent again and enqueued exactly once.

Every wait is on an observable condition (the broker's stats, a line of
output, a pause point), bounded; processes are ended by pid (``procs``,
``sock_dir``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import BIN, Procs, gone, read_line, run_cli, wait_until
from test_guarantees import FakeBroker, good_reply

import brokerq
from brokerq import protocol
from brokerq.protocol import Ack, Error, Put, TaskDone, TaskDoneReply

BROKERQ = str(BIN / "brokerq")
BROKER = str(BIN / "local-queue-broker")
BACKENDS = ["asyncio", "trio"]


def waiting(client: brokerq.Client, queue: str, key: str = "waiters", count: int = 1) -> bool:
    """Whether ``count`` requests wait on ``queue`` now (``putters``: puts)."""
    return bool(client.queue(queue).stats()[key] == count)


def live(client: brokerq.Client, topic: str) -> int:
    """The live subscribers of ``topic`` on the broker serving now."""
    info = client.stats().get("topics", {}).get(topic)
    return 0 if info is None else int(info["live"])


def stop(socket_path: str, pid: int) -> None:
    """``brokerq stop``: it exits 0, saying nothing, once broker ``pid`` is gone."""
    result = run_cli("--socket", socket_path, "stop")
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")
    wait_until(lambda: gone(pid), what=f"broker {pid} to exit")


def ended(proc: subprocess.Popen[bytes], timeout: float = 30) -> tuple[int, bytes]:
    """``proc``'s exit status and what it wrote on stderr, once it exited."""
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


class Worker(threading.Thread):
    """Runs ``work`` in a thread; :meth:`result` is what it returned (or raises)."""

    def __init__(self, work: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.work = work
        self.outcome: tuple[str, Any] | None = None

    def run(self) -> None:
        try:
            self.outcome = ("returned", self.work())
        except BaseException as exc:
            self.outcome = ("raised", exc)

    def result(self, timeout: float = 20) -> Any:
        self.join(timeout)
        assert self.outcome is not None, "the worker is still waiting"
        how, value = self.outcome
        if how == "raised":
            raise value
        return value


# -- the command line ---------------------------------------------------------------------


def test_a_waiting_brokerq_get_survives_a_stop(socket_path: str, procs: Procs) -> None:
    with brokerq.connect(socket_path) as client:
        first = client.broker_pid
        get = procs([BROKERQ, "--socket", socket_path, "get", "jobs"])
        wait_until(lambda: waiting(client, "jobs"), what="brokerq get to wait")
        stop(socket_path, first)
        client.queue("jobs").put(b"after the stop")
        assert read_line(get, timeout=20) == b"after the stop\n"
        assert ended(get) == (0, b"")
        assert client.broker_pid != first


def test_a_waiting_brokerq_consume_survives_a_stop(
    socket_path: str, sock_dir: str, procs: Procs
) -> None:
    out = Path(sock_dir, "out")
    out.mkdir()
    save = ["sh", "-c", 'cat > "$D/$BROKERQ_MESSAGE_ID"']
    with brokerq.connect(socket_path) as client:
        first = client.broker_pid
        consume = procs(
            [
                BROKERQ,
                "--socket",
                socket_path,
                "consume",
                "jobs",
                "--max-messages",
                "1",
                "--",
                *save,
            ],
            env={**os.environ, "D": str(out)},
        )
        wait_until(lambda: waiting(client, "jobs"), what="consume to wait")
        stop(socket_path, first)
        msg_id = client.queue("jobs").put(b"after the stop")
        assert ended(consume) == (0, b"")
        assert (out / str(msg_id)).read_bytes() == b"after the stop"
        stats = client.queue("jobs").stats()
        assert (stats["ready"], stats["reserved"]) == (0, 0)  # acked


def test_a_brokerq_subscribe_survives_a_stop(socket_path: str, procs: Procs) -> None:
    with brokerq.connect(socket_path) as client:
        first = client.broker_pid
        sub = procs([BROKERQ, "--socket", socket_path, "subscribe", "news", "-n", "1"])
        wait_until(lambda: live(client, "news") == 1, what="brokerq subscribe to subscribe")
        stop(socket_path, first)
        wait_until(lambda: live(client, "news") == 1, what="it to subscribe again")
        assert client.broker_pid != first
        assert client.publish("news", b"after the stop") == 1
        assert read_line(sub, timeout=20) == b"after the stop\n"
        assert sub.wait(timeout=10) == 0


class Pause:
    """A pause point of :mod:`brokerq.pause`, armed by :attr:`spec` in a
    process's BROKERQ_TEST_PAUSE (test_spawn_races.py has the full story)."""

    def __init__(self, directory: str, point: str) -> None:
        self.point = point
        self.fifo = os.path.join(directory, point)
        os.mkfifo(self.fifo, 0o600)
        self.spec = f"{point}={self.fifo}"

    def wait(self) -> int:
        """Wait until a process is held at the point; its pid."""
        reached = Path(self.fifo + ".reached")
        line = wait_until(
            lambda: reached.read_text() if reached.exists() else "",
            what=f"a process at {self.point}",
        )
        pid, point = line.split()
        assert point == self.point
        return int(pid)

    def release(self) -> None:
        fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.write(fd, b"g")
        finally:
            os.close(fd)


def test_brokerq_stop_waits_for_its_broker_not_for_the_next(
    socket_path: str, sock_dir: str, procs: Procs
) -> None:
    """A consumer that reconnects may start the next broker as soon as the old
    one exits; ``brokerq stop`` returns all the same (it does not wait for no
    broker to run), here while that consumer holds the lock to start one."""
    locked = Pause(sock_dir, "client.locked")
    stop_sent = Pause(sock_dir, "client.stop_sent")
    with brokerq.connect(socket_path) as client:
        first = client.broker_pid
        sub = procs(
            [BROKERQ, "--socket", socket_path, "subscribe", "news", "-n", "1"],
            env={**os.environ, "BROKERQ_TEST_PAUSE": locked.spec},
        )
        wait_until(lambda: live(client, "news") == 1, what="brokerq subscribe to subscribe")
        stopping = procs(
            [BROKERQ, "--socket", socket_path, "--connect-timeout", "5", "stop"],
            env={**os.environ, "BROKERQ_TEST_PAUSE": stop_sent.spec},
        )
        assert stop_sent.wait() == stopping.pid
        # The old broker exits; the subscriber takes the lock to start the next.
        assert locked.wait() == sub.pid
        wait_until(lambda: gone(first), what=f"broker {first} to exit")
        stop_sent.release()
        assert ended(stopping) == (0, b"")
        locked.release()
        wait_until(lambda: live(client, "news") == 1, what="it to subscribe again")
        assert client.publish("news", b"after the stop") == 1
        assert read_line(sub, timeout=20) == b"after the stop\n"
        assert sub.wait(timeout=10) == 0


# -- the blocking client ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["get", "get_many", "reserve", "prefetch"])
def test_a_waiting_python_consumer_survives_a_stop(socket_path: str, kind: str) -> None:
    with (
        brokerq.connect(socket_path, prefetch=4 if kind == "prefetch" else 0) as worker,
        brokerq.connect(socket_path) as other,
    ):
        jobs = worker.queue("jobs")
        first = worker.broker_pid

        def work() -> Any:
            if kind == "get":
                return jobs.get(timeout=30)
            if kind == "get_many":
                return jobs.get_many(5, timeout=30)
            if kind == "prefetch":
                return jobs.get(timeout=30)
            msg = jobs.reserve(timeout=30)
            msg.ack()  # the lease is the next broker's
            return msg.body, msg.attempt

        thread = Worker(work)
        thread.start()
        streams = "streams" if kind == "prefetch" else "waiters"
        wait_until(lambda: waiting(other, "jobs", streams), what=f"the {kind} to wait")
        stop(other.socket_path, first)
        other.queue("jobs").put(b"after the stop")
        expected = {
            "get": b"after the stop",
            "get_many": [b"after the stop"],
            "reserve": (b"after the stop", 1),
            "prefetch": b"after the stop",
        }
        assert thread.result() == expected[kind]
        assert other.stats()["pid"] != first
        stats = other.queue("jobs").stats()
        assert (stats["ready"], stats["reserved"]) == (0, 0)


def test_a_put_waiting_for_room_during_a_stop_is_enqueued_once(socket_path: str) -> None:
    """A put the stopping broker refused was not carried out: sent again with
    its key, it is enqueued exactly once, on the next broker."""
    with brokerq.connect(socket_path) as producer, brokerq.connect(socket_path) as other:
        jobs = producer.queue("jobs", maxsize=1)
        jobs.put(b"first")
        first = producer.broker_pid
        thread = Worker(lambda: jobs.put(b"second"))  # waits for room
        thread.start()
        wait_until(lambda: waiting(other, "jobs", "putters"), what="the put to wait")
        stop(other.socket_path, first)
        wait_until(lambda: waiting(other, "jobs", "putters"), what="it to wait on the next")
        queue = other.queue("jobs")
        assert queue.get(timeout=5) == b"first"
        second = thread.result()
        assert queue.get_many(5, timeout=5) == [b"second"]
        assert queue.stats()["put_total"] == 1  # on the next broker: the one put, once
        assert second > 1
        with pytest.raises(brokerq.Empty):
            queue.get(timeout=0)


def test_windowed_puts_during_a_stop_are_enqueued_once_in_order(socket_path: str) -> None:
    """Puts sent in a window, waiting in the broker behind one that waits for
    room, are refused by the stopping broker; the window sends every one
    again, in order, with its key, to the next broker."""
    bodies = [b"put %d" % i for i in range(6)]
    with (
        brokerq.connect(socket_path, put_window=8) as producer,
        brokerq.connect(socket_path) as other,
    ):
        other.queue("jobs", maxsize=1).put(b"first")
        first = other.broker_pid
        jobs = producer.queue("jobs")

        def produce() -> None:
            for body in bodies:
                jobs.put(body)
            producer.flush()

        thread = Worker(produce)
        thread.start()
        wait_until(lambda: waiting(other, "jobs", "putters"), what="the first put to wait")
        stop(other.socket_path, first)
        queue = other.queue("jobs")
        got = [queue.get(timeout=10) for _ in range(len(bodies) + 1)]
        assert thread.result() is None
        assert got == [b"first", *bodies]
        with pytest.raises(brokerq.Empty):
            queue.get(timeout=0)


def test_a_refused_request_is_sent_again_unless_it_is_a_lease_verb(socket_path: str) -> None:
    """A broker (here a fake one) that refuses each request once as it stops:
    a put is sent again with its key, a task_done (which did not count) and
    a reserve are sent again, an ack raises ShuttingDown and is not."""

    def answer(request: protocol.AnyRequest, count: int) -> protocol.AnyReply | None:
        if count % 2 == 1 or isinstance(request, Ack):
            return Error(id=request.id, code="shutting_down", message="the broker is stopping")
        if isinstance(request, TaskDone):
            return TaskDoneReply(id=request.id, unfinished=0)
        return good_reply(request)

    fake = FakeBroker(socket_path, answer)
    try:
        with brokerq.Client(socket_path, timeout=5) as client:
            jobs = client.queue("jobs")
            assert jobs.put(b"x") == 7
            jobs.task_done()
            msg = jobs.reserve(timeout=5)
            with pytest.raises(brokerq.ShuttingDown, match="the broker is stopping"):
                msg.ack()
    finally:
        fake.close()
    sent = [request for _, request in fake.requests]
    kinds = [type(request).__name__ for request in sent]
    assert kinds == ["Put", "Put", "TaskDone", "TaskDone", "Reserve", "Reserve", "Ack"]
    assert isinstance(sent[0], Put)
    assert isinstance(sent[1], Put)
    assert sent[0].key == sent[1].key
    assert [number for number, _ in fake.requests] == [1, 2, 2, 3, 3, 4, 4]  # new connections


# -- the async client ---------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_waiting_async_get_survives_a_stop(socket_path: str, backend: str) -> None:
    got: list[bytes] = []

    async def main() -> None:
        async with brokerq.open_async_client(socket_path) as client:
            jobs = client.queue("jobs")
            first = (await client.stats())["pid"]

            async def consume() -> None:
                got.append(await jobs.get(timeout=30))

            async with anyio.create_task_group() as tg:
                tg.start_soon(consume)
                while (await jobs.stats())["waiters"] != 1:
                    await anyio.sleep(0.005)
                await anyio.to_thread.run_sync(stop, socket_path, first)
                await jobs.put(b"after the stop")
            assert (await client.stats())["pid"] != first

    async def bounded() -> None:
        with anyio.fail_after(60):
            await main()

    anyio.run(bounded, backend=backend)
    assert got == [b"after the stop"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_async_reserve_and_subscription_survive_a_stop(socket_path: str, backend: str) -> None:
    got: dict[str, Any] = {}

    async def main() -> None:
        async with brokerq.open_async_client(socket_path) as client:
            jobs = client.queue("jobs")
            first = (await client.stats())["pid"]
            subscription = await client.subscribe("news")

            async def reserve() -> None:
                async with jobs.reserve(timeout=30) as msg:
                    got["reserved"] = msg.body

            async def listen() -> None:
                got["published"] = await subscription.get(timeout=30)

            async with anyio.create_task_group() as tg:
                tg.start_soon(reserve)
                tg.start_soon(listen)
                while (await jobs.stats())["waiters"] != 1:
                    await anyio.sleep(0.005)
                await anyio.to_thread.run_sync(stop, socket_path, first)
                await jobs.put(b"after the stop")
                while (await client.stats()).get("topics", {}).get("news", {}).get("live") != 1:
                    await anyio.sleep(0.005)
                assert await client.publish("news", b"published after") == 1
            await subscription.aclose()

    async def bounded() -> None:
        with anyio.fail_after(60):
            await main()

    anyio.run(bounded, backend=backend)
    assert got == {"reserved": b"after the stop", "published": b"published after"}


def test_a_stop_of_a_broker_without_waiters_still_leaves_none(socket_path: str) -> None:
    """Stopping for good: with no client waiting, nothing starts a broker again."""
    with brokerq.connect(socket_path) as client:
        pid = client.broker_pid
    stop(socket_path, pid)
    assert not brokerq.spawn.broker_running(socket_path)


def test_sigterm_is_a_stop_too(socket_path: str) -> None:
    """SIGTERM stops the broker as ``stop`` does: a waiting get carries on."""
    with brokerq.connect(socket_path) as worker, brokerq.connect(socket_path) as other:
        first = worker.broker_pid
        thread = Worker(lambda: worker.queue("jobs").get(timeout=30))
        thread.start()
        wait_until(lambda: waiting(other, "jobs"), what="the get to wait")
        os.kill(first, signal.SIGTERM)
        wait_until(lambda: gone(first), what=f"broker {first} to exit")
        other.queue("jobs").put(b"after the stop")
        assert thread.result() == b"after the stop"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_while_the_broker_starts_waits_until_it_serves(
    socket_path: str, sock_dir: str, procs: Procs, signum: signal.Signals
) -> None:
    """A signal sent between the lock and the broker's receiver (here while it
    is held with its socket published, a client may already be in its backlog)
    stops it in order once it serves: exit 0 and the queue readable by the next
    broker, rather than death by the default action."""
    ready = Pause(sock_dir, "broker.before_ready")
    broker = procs(
        [BROKER, socket_path, "--idle-exit", "0"],
        env={**os.environ, "BROKERQ_TEST_PAUSE": ready.spec},
    )
    assert ready.wait() == broker.pid
    broker.send_signal(signum)
    ready.release()
    _, err = broker.communicate(timeout=10)
    assert broker.returncode == 0, err.decode()
    assert f"stopping: signal {signum.name}" in err.decode()


def test_a_broker_spawned_with_stop_signals_blocked_still_stops_on_them(
    socket_path: str, procs: Procs
) -> None:
    """A blocked signal mask is inherited through fork and exec: a broker
    started by a process that blocks SIGTERM (a shell's trap, a supervisor)
    must not ignore SIGTERM for the rest of its life."""
    blocked = {signal.SIGTERM, signal.SIGINT}
    broker = procs(
        [BROKER, socket_path, "--idle-exit", "0"],
        preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_BLOCK, blocked),
    )
    wait_until(lambda: os.path.exists(socket_path), what="the broker to publish its socket")
    with brokerq.connect(socket_path) as client:
        assert client.broker_pid == broker.pid
    broker.send_signal(signal.SIGTERM)
    _, err = broker.communicate(timeout=10)
    assert broker.returncode == 0, err.decode()
