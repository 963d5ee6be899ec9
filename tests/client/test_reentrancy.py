"""Calls made while the same thread is inside another call (issue 14, item 2).

A ``__del__`` run by the garbage collector, or a signal handler, may call
the client while the thread that runs it is in the middle of a request (as
``queue.SimpleQueue.put`` allows, and ``logging.handlers.QueueHandler``
relies on). Such a call must not touch the connection (or put window) of
the call it interrupted: both complete with their own results, nothing is
lost or duplicated, and the connections it takes are few and reused.
Separately, a reply whose id does not match fails every request waiting on
that connection at once with ProtocolError, and closes it.
"""

from __future__ import annotations

import gc
import itertools
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import msgspec
import pytest
from anyio.abc import SocketAttribute

import brokerq
from brokerq import protocol
from brokerq.client import blocking as client_module
from brokerq.client import calls
from brokerq.client.asynchronous import AsyncConnection
from brokerq.client.sockio import Spinner

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


@pytest.fixture
def no_automatic_gc() -> Iterator[None]:
    """The collector runs only where a test calls gc.collect()."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[client_module.Connection]:
    """Every blocking-client connection opened during the test."""
    made: list[client_module.Connection] = []
    original = client_module.Connection.__init__

    def counting(self: client_module.Connection, *args: Any, **kwargs: Any) -> None:
        made.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(client_module.Connection, "__init__", counting)
    return made


class PutWhenCollected:
    """Garbage in a reference cycle whose finalizer puts, as a QueueHandler
    held by an object being finalized would. Records what the put returned
    (or raised) in ``results``."""

    def __init__(
        self, queue: brokerq.Queue, body: bytes, results: list[object], **options: Any
    ) -> None:
        self.queue = queue
        self.body = body
        self.results = results
        self.options = options
        self.cycle = self

    def __del__(self) -> None:
        try:
            self.results.append(self.queue.put(self.body, **self.options))
        except BaseException as exc:  # (a finalizer must not raise)
            self.results.append(exc)


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


@pytest.mark.usefixtures("no_automatic_gc")
@pytest.mark.parametrize("method", ["send_all", "receive"])
def test_a_put_from_a_finalizer_inside_a_put(
    client: brokerq.Client,
    monkeypatch: pytest.MonkeyPatch,
    opened: list[client_module.Connection],
    method: str,
) -> None:
    q = client.queue("q")
    q.put(b"first")  # the thread's connection, open before the patch
    results: list[object] = []
    fired = collect_at_first(
        monkeypatch, method, lambda: PutWhenCollected(q, b"nested", results) and None
    )
    outer = q.put(b"outer")
    assert fired
    (nested,) = results
    assert isinstance(nested, int), nested
    assert isinstance(outer, int)
    reserved = [q.reserve(timeout=0) for _ in range(3)]
    assert {(m.id, m.body) for m in reserved[1:]} == {(outer, b"outer"), (nested, b"nested")}
    for m in reserved:
        m.ack()
    assert take_all(q) == []
    assert len(opened) == 1  # for the call inside the put (the thread's was open)


@pytest.mark.usefixtures("no_automatic_gc")
@pytest.mark.parametrize("method", ["send_all", "receive"])
def test_a_put_from_a_finalizer_inside_a_blocking_get(
    client: brokerq.Client, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    q = client.queue("q")
    other = client.queue("other")
    client.ping()
    results: list[object] = []

    def garbage() -> None:
        PutWhenCollected(q, b"for the get", results)
        PutWhenCollected(other, b"elsewhere", results)

    fired = collect_at_first(monkeypatch, method, garbage)
    start = time.monotonic()
    assert q.get(timeout=5) == b"for the get"  # the put made while it waited
    assert time.monotonic() - start < 4
    assert fired
    assert len(results) == 2
    assert all(isinstance(r, int) and r > 0 for r in results), results
    assert take_all(q) == []
    assert take_all(other) == [b"elsewhere"]
    with pytest.raises(brokerq.Empty):  # and the thread's own connection is in step
        q.get(timeout=0.05)


@pytest.mark.usefixtures("no_automatic_gc")
@pytest.mark.parametrize("method", ["send_all", "receive"])
def test_a_put_from_a_finalizer_inside_the_put_windows_send_or_read(
    socket_path: str,
    observer: brokerq.Client,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
) -> None:
    """The nested puts go around the window, synchronously: acknowledged
    (or failed) when they return, an error raised by the put that made it,
    and the window's puts are each made once, in order."""
    with brokerq.connect(socket_path, timeout=5, put_window=8) as client:
        q = client.queue("q")
        nested_q = client.queue("nested")
        full = client.queue("full", maxsize=1)
        full.put(b"the one it holds")
        results: list[object] = []
        seen: list[int] = []

        def look() -> None:
            PutWhenCollected(nested_q, b"nested", results)
            PutWhenCollected(full, b"no room", results, timeout=0)
            gc.collect()  # the finalizers' puts return here, done:
            seen.append(observer.queue("nested").qsize())

        fired = collect_at_first(monkeypatch, method, look)
        bodies = [b"%d" % i for i in range(20)]
        for body in bodies:
            assert q.put(body) == 0
        client.flush()  # raises nothing: the Full was the nested put's
        assert fired
        assert seen == [1]
        assert len(results) == 2
        assert 0 in results, results
        assert any(isinstance(r, brokerq.Full) for r in results), results
        assert take_all(observer.queue("q")) == bodies
        assert take_all(observer.queue("nested")) == [b"nested"]
        assert take_all(observer.queue("full")) == [b"the one it holds"]


def _alarm_every(seconds: float, handler: Callable[[int, Any], None]) -> Callable[[], None]:
    """Call ``handler`` on SIGALRM every ``seconds``; returns what stops it."""
    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds, seconds)

    def stop() -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)

    return stop


@pytest.mark.timeout(60, method="thread")  # SIGALRM is the test's
@pytest.mark.parametrize("put_window", [0, 8])
def test_puts_from_a_signal_handler_while_the_thread_waits_in_get(
    socket_path: str, opened: list[client_module.Connection], put_window: int
) -> None:
    with brokerq.connect(socket_path, timeout=5, put_window=put_window) as client:
        sig = client.queue("sig")
        idle = client.queue("idle")
        main = client.queue("main")
        numbers = itertools.count()
        made: dict[int, object] = {}
        depth = [0, 0]  # now, deepest

        def handler(signum: int, frame: Any) -> None:
            # Python runs a handler again inside itself if the signal comes
            # back before it returns: each level of nesting needs a
            # connection, but only one, whatever the number of calls.
            depth[0] += 1
            depth[1] = max(depth)
            n = next(numbers)
            try:
                made[n] = sig.put(b"%d" % n)
            except BaseException as exc:  # (recorded, not raised into the get)
                made[n] = exc
            finally:
                depth[0] -= 1

        got: list[bytes] = []
        empties = 0
        mains = 0
        stop = _alarm_every(0.003, handler)
        try:
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline or len(made) < 200:
                try:
                    got.append(sig.get(timeout=0.05))
                except brokerq.Empty:
                    empties += 1
                start = time.monotonic()
                with pytest.raises(brokerq.Empty):  # nothing is ever put there
                    idle.get(timeout=0.01)
                assert time.monotonic() - start < 1
                main.put(b"%d" % mains)
                mains += 1
                assert time.monotonic() < deadline + 20, f"only {len(made)} handler calls"
        finally:
            stop()
        client.flush()
        failures = {n: r for n, r in made.items() if not isinstance(r, int)}
        assert not failures
        if put_window == 0:
            assert all(r > 0 for r in made.values())  # type: ignore[operator]
        rest = take_all(sig)
        everything = got + rest
        assert len(everything) == len(made) >= 200
        assert sorted(everything, key=int) == [b"%d" % n for n in range(len(made))]
        assert take_all(main) == [b"%d" % n for n in range(mains)]
        assert take_all(idle) == []
    # The thread's connection, and one per level of nesting, each reused:
    # not one per handler call.
    assert len(opened) <= 1 + depth[1] < 20, (len(opened), depth)


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
    """Two requests waiting on one connection (which the client itself never
    does: it gives a nested call a connection of its own): the one that
    reads the other's reply fails, and so does the other, at once, with
    ProtocolError; neither hangs."""
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
