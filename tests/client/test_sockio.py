"""The socket layers under the two ends: the blocking client's Spinner
(brokerq.client.sockio) and the broker's UnixStream (brokerq.broker.unixstream), over
real socketpairs."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
import trio
import trio.testing

import brokerq
from brokerq.broker.unixstream import YIELD_EVERY, UnixStream
from brokerq.client import sockio
from brokerq.client.sockio import Spinner, spin_from_environment


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield a, b
    a.close()
    b.close()


# -- Spinner ------------------------------------------------------------------


class CountingSpinner(Spinner):
    """A Spinner that counts the reads it tries."""

    reads = 0

    def _recv(self) -> bytes:
        self.reads += 1
        return super()._recv()


def test_spinner_returns_what_is_there_at_once(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    theirs.sendall(b"hello")
    assert Spinner(ours, 0.0001).receive(time.monotonic() + 1) == b"hello"


def test_spinner_times_out_at_its_deadline(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, _ = pair
    spinner = Spinner(ours, 0.0001)
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        spinner.receive(start + 0.2)
    assert 0.15 <= time.monotonic() - start < 2


def test_spinner_with_a_deadline_passed_does_not_wait(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, _ = pair
    spinner = CountingSpinner(ours, 0.01)
    with pytest.raises(TimeoutError):
        spinner.receive(time.monotonic())
    assert spinner.reads == 1  # one try, no spin


def test_spinner_sees_the_end_of_the_stream(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    theirs.close()
    assert Spinner(ours, 0.0001).receive(None) == b""


def test_spinner_sleeps_until_data_comes_without_a_deadline(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    timer = threading.Timer(0.05, theirs.sendall, args=(b"late",))
    timer.start()
    try:
        assert Spinner(ours, 0.0001).receive(None) == b"late"
    finally:
        timer.join()


def test_spinner_sends_more_than_the_socket_holds(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    data = bytes(range(256)) * 40_000  # 10 MB: many times the socket buffer
    received = bytearray()

    def read() -> None:
        while len(received) < len(data):
            received.extend(theirs.recv(1 << 20))

    reader = threading.Thread(target=read)
    reader.start()
    Spinner(ours, 0.0001).send_all(data, time.monotonic() + 30)
    reader.join(30)
    assert received == data


def test_spinner_send_times_out_when_the_peer_does_not_read(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, _ = pair
    with pytest.raises(TimeoutError):
        Spinner(ours, 0.0001).send_all(b"x" * 10_000_000, time.monotonic() + 0.2)


def reads_while_waiting(spinner: CountingSpinner, theirs: socket.socket, delay: float) -> int:
    """How many reads a receive whose data comes ``delay`` s later tries."""
    timer = threading.Timer(delay, theirs.sendall, args=(b"r",))
    timer.start()
    spinner.reads = 0
    try:
        assert spinner.receive(None) == b"r"
    finally:
        timer.join()
    return spinner.reads


def test_spinning_stops_for_a_connection_whose_replies_come_late(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    spinner = CountingSpinner(ours, 0.02)
    # It spins (reads again and again) for up to 20 ms, then sleeps.
    assert reads_while_waiting(spinner, theirs, 0.05) > 3
    for _ in range(30):  # replies that keep coming well after the spin ...
        reads_while_waiting(spinner, theirs, 0.04)
    assert spinner.typical_wait > spinner.spin
    # ... and now it sleeps at once: one read that finds nothing, one after.
    assert reads_while_waiting(spinner, theirs, 0.05) == 2


def test_spin_setting_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BROKERQ_SPIN_US", raising=False)
    assert spin_from_environment() == sockio.DEFAULT_SPIN_US / 1e6
    for raw, seconds in [("0", 0.0), ("250", 0.00025), (" 10000 ", 0.01), ("", 0.0001)]:
        monkeypatch.setenv("BROKERQ_SPIN_US", raw)
        assert spin_from_environment() == pytest.approx(seconds)


@pytest.mark.parametrize("raw", ["junk", "-1", "20000", "1e9", "nan"])
def test_a_bad_spin_setting_is_refused_as_a_bad_put_window_is(
    monkeypatch: pytest.MonkeyPatch, raw: str
) -> None:
    """Not quietly replaced by the default: the client is not made (and
    ``import brokerq`` still works: the variable is read by Client())."""
    monkeypatch.setenv("BROKERQ_SPIN_US", raw)
    with pytest.raises(brokerq.InvalidRequest, match="BROKERQ_SPIN_US"):
        spin_from_environment()
    with pytest.raises(brokerq.InvalidRequest, match="BROKERQ_SPIN_US"):
        brokerq.Client("/nonexistent/b.sock")


# -- UnixStream ----------------------------------------------------------------


async def test_unix_stream_round_trip(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    stream = UnixStream(ours)
    theirs.sendall(b"ping")
    assert await stream.receive_some(100) == b"ping"
    await stream.send_all(b"pong")
    assert theirs.recv(100) == b"pong"
    theirs.close()
    assert await stream.receive_some(100) == b""
    await stream.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await stream.receive_some(100)
    with pytest.raises(trio.ClosedResourceError):
        await stream.send_all(b"x")


async def test_unix_stream_waits_for_data_and_for_room(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    theirs.setblocking(False)
    stream = UnixStream(ours)
    data = b"y" * 5_000_000
    received = bytearray()

    async def read_slowly() -> None:
        while len(received) < len(data):
            await trio.lowlevel.wait_readable(theirs)
            received.extend(theirs.recv(1 << 16))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_slowly)
        await stream.send_all(data)
    assert received == data

    async def answer_later() -> None:
        await trio.testing.wait_all_tasks_blocked()  # the receive waits for data
        theirs.send(b"later")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer_later)
        assert await stream.receive_some(100) == b"later"
    await stream.aclose()


async def test_unix_stream_peer_gone_is_a_broken_resource(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    stream = UnixStream(ours)
    theirs.close()
    with pytest.raises(trio.BrokenResourceError):
        await stream.send_all(b"x" * 1_000_000)
    await stream.aclose()


async def test_unix_stream_closed_while_waiting_raises(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, _ = pair
    stream = UnixStream(ours)

    async def receive() -> None:
        with pytest.raises(trio.ClosedResourceError):
            await stream.receive_some(100)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive)
        await trio.testing.wait_all_tasks_blocked()
        await stream.aclose()


async def test_a_busy_unix_stream_still_lets_other_tasks_run(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """A receive that always finds data yields every YIELD_EVERY times, so a
    client that keeps its socket full cannot starve the broker's other tasks."""
    ours, theirs = pair
    stream = UnixStream(ours)
    theirs.sendall(b"z" * 100_000)
    ticks = 0

    async def other_task() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other_task)
        await trio.lowlevel.checkpoint()
        for _ in range(10 * YIELD_EVERY):
            assert await stream.receive_some(10) == b"z" * 10
        nursery.cancel_scope.cancel()
    assert ticks >= 9
    await stream.aclose()


async def test_a_cancelled_receive_with_data_ready_is_cancelled(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    stream = UnixStream(ours)
    theirs.sendall(b"data")
    with trio.CancelScope() as scope:
        scope.cancel()
        await stream.receive_some(100)
    assert scope.cancelled_caught
    assert await stream.receive_some(100) == b"data"  # nothing was taken
    await stream.aclose()
