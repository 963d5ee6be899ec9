"""The blocking client's socket I/O: one syscall when the data is there, a
short adaptive spin before sleeping when it is about to be.

Not ``sock.settimeout(t)``: CPython would poll() before every recv() and
send(), two syscalls where one would do. Why spin? A reply often comes back
within tens of microseconds, while sleeping and waking again costs about as
much. So :class:`Spinner` tries the read again for up to ``spin`` seconds,
yielding the CPU between tries, but only while this connection's late
replies have come, on a moving average, within the spin: an idle consumer
burns no CPU.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any, Final, TypeVar

from .. import protocol
from ..errors import BrokerUnavailable, InvalidRequest, RemoteProtocolError, VersionMismatch
from ..spawn import broker_running, connect_or_spawn, lock_holder_pid, still_running
from . import calls
from .calls import ConnectionLost

R = TypeVar("R", bound=protocol.Reply)

#: Default upper bound of a spin, in microseconds (``BROKERQ_SPIN_US``).
DEFAULT_SPIN_US: Final = 100
RECEIVE_BUFFER: Final = 256 * 1024
#: Weight of the latest wait in the moving average that decides whether to spin.
WEIGHT: Final = 0.125

_POLLIN: Final = select.POLLIN
_POLLOUT: Final = select.POLLOUT
#: The longest spin ``BROKERQ_SPIN_US`` may ask for, in microseconds.
MAX_SPIN_US: Final = 10_000


def spin_from_environment() -> float:
    """The spin bound in seconds from ``BROKERQ_SPIN_US`` (unset or empty: 100 µs).
    A bad value raises InvalidRequest: a setting quietly ignored is one the
    user thinks is on."""
    raw = os.environ.get("BROKERQ_SPIN_US", "").strip()
    if not raw:
        return DEFAULT_SPIN_US / 1e6
    try:
        micros = float(raw)
    except ValueError:
        micros = -1.0
    if not 0 <= micros <= MAX_SPIN_US:
        raise InvalidRequest(
            f"BROKERQ_SPIN_US must be a number of microseconds from 0 to {MAX_SPIN_US}, not {raw!r}"
        )
    return micros / 1e6


class Spinner:
    """Reads and writes on one non-blocking socket with deadlines (see the module doc)."""

    __slots__ = ("buffer", "poller", "sock", "spin", "typical_wait", "view")

    def __init__(self, sock: socket.socket, spin: float) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.spin = spin
        #: A moving average of how long a read that found nothing waited (seconds).
        self.typical_wait = 0.0
        self.poller = select.poll()
        self.poller.register(sock, _POLLIN)
        #: Received into, then copied out: ``recv(n)`` with a large ``n``
        #: allocates (and with glibc, maps) ``n`` bytes on every call, which
        #: made a 256 KiB recv cost six times a 64 KiB one (bench/profile.py).
        self.buffer = bytearray(RECEIVE_BUFFER)
        self.view = memoryview(self.buffer)

    def send_all(
        self,
        data: bytes | bytearray | memoryview,
        deadline: float | None,
        take: Callable[[bytes], None] | None = None,
    ) -> None:
        """Send all of ``data`` by ``deadline`` (monotonic; None: no bound).

        ``take``: while the send waits, what arrives is read and handed to
        it. A client that pipelines must read as it sends: a broker whose
        replies go unread stops reading, and both would wait for ever."""
        sock = self.sock
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        if sent == len(data):
            return
        view = memoryview(data)[sent:]
        self.poller.modify(sock, _POLLOUT | (_POLLIN if take else 0))
        try:
            while view:
                ready = self._sleep(deadline)
                if take is not None and ready & ~_POLLOUT:  # readable, or hung up
                    with contextlib.suppress(BlockingIOError):
                        take(self._recv())
                with contextlib.suppress(BlockingIOError):
                    view = view[sock.send(view) :]
        finally:
            if sock.fileno() >= 0:  # (closed meanwhile: let the error of the send tell)
                self.poller.modify(sock, _POLLIN)

    def receive(self, deadline: float | None) -> bytes:
        """What has come, up to :data:`RECEIVE_BUFFER` bytes (b"" at end of
        stream), by ``deadline`` (else TimeoutError)."""
        try:
            return self._recv()
        except BlockingIOError:
            pass
        start = time.perf_counter()
        end = start + self.spin
        spin = self.typical_wait < self.spin and (deadline is None or deadline > time.monotonic())
        while True:
            if spin:  # (then sleep, once the spin is over)
                os.sched_yield()
                spin = time.perf_counter() < end
            else:
                self._sleep(deadline)
            try:
                data = self._recv()
            except BlockingIOError:
                continue
            self.typical_wait += (time.perf_counter() - start - self.typical_wait) * WEIGHT
            return data

    def _recv(self) -> bytes:
        n = self.sock.recv_into(self.buffer)
        return bytes(self.view[:n])

    def _sleep(self, deadline: float | None) -> int:
        """Wait until the socket is ready as registered; return the events."""
        if deadline is None:
            return self.poller.poll()[0][1]
        left = deadline - time.monotonic()
        ready = self.poller.poll(left * 1000 + 0.999) if left > 0 else []
        if not ready:
            raise TimeoutError("timed out")
        return ready[0][1]


class Connection:
    """One socket to the broker, greeted, used by one thread at a time."""

    def __init__(
        self, socket_path: str, timeout: float, *, spawn: bool = True, spin: float | None = None
    ) -> None:
        spin = spin_from_environment() if spin is None else spin
        deadline = time.monotonic() + timeout
        self.socket_path = socket_path
        self.pid = os.getpid()
        while True:
            try:
                self.sock = connect_or_spawn(socket_path, deadline, spawn=spawn)
            except OSError as exc:
                raise calls.unreachable(socket_path, exc) from exc
            self.closed = False
            self.wire = calls.Wire(socket_path)
            self.io = Spinner(self.sock, spin)
            hello = calls.hello()
            try:
                reply = self.request(
                    hello.expect, hello.kind, deadline - time.monotonic(), **hello.fields
                )
                break
            except ConnectionLost:
                # A broker that died (or idled out) just after accepting us:
                # connect again, which finds or starts the next one.
                if time.monotonic() >= deadline:
                    raise
            except VersionMismatch as exc:
                self.close()
                # An upgrade: the broker still running is older than this
                # client. Ask it to finish and exit; the next one is ours.
                older = calls.broker_to_retire(socket_path, exc, may_retire=spawn)
                retire_older_broker(socket_path, older, deadline)
            except BaseException:
                self.close()
                raise
        self.wire.greeted(reply)
        self.broker_pid = reply.pid
        self.server = reply.server
        self.max_message_size = reply.max_message_size

    def close(self) -> None:
        self.closed = True
        self.sock.close()

    def request(
        self, expect: type[R], kind: type[protocol.Request], wait: float | None, **fields: Any
    ) -> R:
        """Send one request and return its reply; ``wait`` bounds the whole
        exchange (None: no bound)."""
        request_id = self.wire.encode(kind, fields)
        deadline = None if wait is None else time.monotonic() + wait
        try:  # (inline, not self.exchange: a generator per request costs a microsecond)
            self.io.send_all(self.wire.out, deadline)
            reply = self.read_reply(deadline)
        except BaseException as exc:
            raise self._interrupted(exc, wait)  # noqa: B904 (its cause is set)
        return self.wire.check(expect, request_id, reply, self.close)

    @contextlib.contextmanager
    def exchange(self, wait: float | None) -> Iterator[None]:
        try:
            yield
        except BaseException as exc:
            raise self._interrupted(exc, wait)  # noqa: B904 (its cause is set)

    def _interrupted(self, exc: BaseException, wait: float | None) -> BaseException:
        """An exchange was interrupted by ``exc``: close the connection, whose
        replies would be out of step from then on, and return what to raise
        (RemoteProtocolError, never retried, if it went out of step meanwhile)."""
        self.close()
        if isinstance(exc, RemoteProtocolError) and self.wire.failure is None:
            self.wire.failure = exc  # a frame that cannot be read: out of step too
        out_of_step = self.wire.out_of_step()
        if out_of_step is not None and isinstance(exc, OSError | ValueError):
            error: BaseException = out_of_step
        elif isinstance(exc, TimeoutError):
            error = self.wire.timed_out(wait)
        elif isinstance(exc, OSError):
            error = self.wire.lost(exc)
        else:
            return exc
        error.__cause__ = exc
        return error

    def read_reply(self, deadline: float | None) -> protocol.AnyReply:
        while (reply := self.wire.next_reply()) is None:
            self.wire.feed(self.io.receive(deadline))
        return reply

    def send_reading(self, data: bytes | bytearray, deadline: float | None) -> None:
        """Send all of ``data``, taking in the replies the broker sends
        meanwhile (see :meth:`Spinner.send_all`), to be read in order."""
        self.io.send_all(data, deadline, self.wire.feed)


def retire_older_broker(socket_path: str, version: int, deadline: float) -> None:
    """Ask the broker at ``socket_path``, which speaks the older protocol
    ``version``, to stop, and wait until it holds its lock no more."""
    start = time.monotonic()
    try:
        sock = connect_or_spawn(socket_path, deadline, spawn=False)
    except OSError as exc:
        raise calls.unreachable(socket_path, exc) from exc
    pid = lock_holder_pid(socket_path)  # (it serves: the pid is its own)
    with sock, contextlib.suppress(OSError):
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        sock.sendall(calls.retirement(version))
        while sock.recv(65536):
            pass  # its replies, then the end of the connection as it stops
    wait_stopped(socket_path, pid, deadline, deadline - start)


def wait_stopped(socket_path: str, pid: int | None, deadline: float, waited: float) -> None:
    """Wait until the broker ``pid`` holds the lock of ``socket_path`` no more."""
    while still_running(socket_path, pid):
        if time.monotonic() > deadline:
            raise calls.not_stopped(socket_path, waited)
        time.sleep(0.005)


def stop_unopened(
    socket_path: str, exc: VersionMismatch | BrokerUnavailable, timeout: float
) -> bool:
    """``stop`` found no broker to connect to (``exc``): True if it was an
    older broker, now retired; False if none is running; else raise ``exc``."""
    if isinstance(exc, VersionMismatch):
        older = calls.older_broker(exc)
        if older is not None:
            retire_older_broker(socket_path, older, time.monotonic() + timeout)
            return True
    elif not broker_running(socket_path):
        return False
    raise exc
