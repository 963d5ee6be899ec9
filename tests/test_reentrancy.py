"""A reply out of step (issue 14, item 2).

A reply whose id does not match the request it was read for fails every
request waiting on that connection at once with ProtocolError, and closes
it; the next call opens a new connection.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import msgspec
import pytest
from anyio.abc import SocketAttribute

import brokerq
from brokerq import calls, protocol
from brokerq.async_client import AsyncConnection
from brokerq.sockio import Spinner

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def client(socket_path: str) -> Iterator[brokerq.Client]:
    with brokerq.connect(socket_path, timeout=5) as c:
        yield c


@pytest.fixture
def observer(socket_path: str) -> Iterator[brokerq.Client]:
    """Another client of the same broker, to look with (its own connections)."""
    with brokerq.connect(socket_path, timeout=5) as c:
        yield c


def collect_at_first(
    monkeypatch: pytest.MonkeyPatch, method: str, garbage: Callable[[], None]
) -> list[bool]:
    """Patch ``Spinner.<method>`` (the client's socket I/O) so that its first
    call, whoever makes it, first makes ``garbage()`` and collects it: the
    finalizers run inside the request being sent or read. Returns a list
    that gets True once that happened."""
    original = getattr(Spinner, method)
    fired: list[bool] = []

    def patched(self: Spinner, *args: Any, **kwargs: Any) -> Any:
        if not fired:
            fired.append(True)
            garbage()
            gc.collect()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Spinner, method, patched)
    return fired


def take_all(q: brokerq.Queue) -> list[bytes]:
    """Every ready body of ``q``, in order."""
    bodies: list[bytes] = []
    while True:
        try:
            bodies += q.get_many(1000, timeout=0)
        except brokerq.Empty:
            return bodies


def put_and_flush(q: brokerq.Queue, body: bytes) -> None:
    """A put, and with a window the flush that reads its reply."""
    q.put(body)
    q.flush()


def _out_of_step(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The next reply the client decodes gets another id (as from a broker
    that lost track). Returns a list that gets the forged id."""
    original = protocol.decode_reply
    forged: list[int] = []

    def decode(payload: bytes) -> protocol.AnyReply:
        reply = original(payload)
        if not forged:
            forged.append(reply.id + 1000)
            reply = msgspec.structs.replace(reply, id=reply.id + 1000)
        return reply

    monkeypatch.setattr(protocol, "decode_reply", decode)
    return forged


@pytest.mark.parametrize("put_window", [0, 8])
def test_a_reply_out_of_step_fails_at_once_closes_and_the_next_call_reconnects(
    socket_path: str, observer: brokerq.Client, monkeypatch: pytest.MonkeyPatch, put_window: int
) -> None:
    with brokerq.connect(socket_path, timeout=5, put_window=put_window) as client:
        q = client.queue("q")
        conn = client.connection()
        forged = _out_of_step(monkeypatch)
        start = time.monotonic()
        with pytest.raises(brokerq.ProtocolError, match="does not match"):
            put_and_flush(q, b"a")
        assert forged
        assert time.monotonic() - start < 0.5
        assert conn.sock.fileno() == -1
        q.put(b"b")
        client.flush()
        assert client.connection() is not conn
    # Each put once (the window sent "a" again, with its key, on the new connection).
    assert sorted(take_all(observer.queue("q"))) == [b"a", b"b"]


def test_a_reply_out_of_step_fails_every_request_waiting_on_the_connection(
    client: brokerq.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two requests waiting on one connection (which the client must never
    do itself): the one that reads the other's reply fails, and so does
    the other, at once, with ProtocolError; neither hangs."""
    conn = client.connection()
    ping = calls.ping()
    errors: list[BaseException] = []

    def inner() -> None:
        start = time.monotonic()
        try:
            conn.request(ping.expect, ping.kind, 5)
        except BaseException as exc:
            errors.append(exc)
        assert time.monotonic() - start < 0.5

    collect_at_first(monkeypatch, "receive", inner)
    start = time.monotonic()
    with pytest.raises(brokerq.ProtocolError):
        conn.request(ping.expect, ping.kind, None)  # no deadline: a hang would be for ever
    assert time.monotonic() - start < 0.5
    assert len(errors) == 1
    assert isinstance(errors[0], brokerq.ProtocolError), errors
    assert conn.sock.fileno() == -1
    assert client.queue("q").put(b"x") > 0  # on a new connection
    assert client.connection() is not conn


def _raw_socket(conn: AsyncConnection) -> Any:
    return conn.stream.extra(SocketAttribute.raw_socket)


@pytest.mark.parametrize("verb", ["put", "ack"])
async def test_async_a_reply_out_of_step_fails_at_once_and_closes(
    socket_path: str, monkeypatch: pytest.MonkeyPatch, verb: str
) -> None:
    async with brokerq.open_async_client(socket_path, timeout=5) as client:
        q = client.queue("q")
        await q.put(b"a")
        if verb == "ack":
            msg = await q.reserve(timeout=0)
            assert msg._conn is not None
            conn = msg._conn
        else:
            conn = client._idle[-1]  # the connection the next request takes
        forged = _out_of_step(monkeypatch)
        start = anyio.current_time()
        request = msg.ack() if verb == "ack" else q.put(b"b")
        with pytest.raises(brokerq.ProtocolError, match="does not match"):
            await request
        assert forged
        assert anyio.current_time() - start < 0.5
        assert conn.broken
        assert _raw_socket(conn).fileno() == -1  # closed now, not when next taken
        assert await q.put(b"c") > 0  # the next call works, on another connection
        assert conn not in client._open
