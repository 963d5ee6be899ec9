"""The blocking client's socket I/O: one syscall when the data is there, a
short adaptive spin before sleeping when it is about to be.

Why not ``sock.settimeout(t)`` and ``sock.recv``? A socket with a timeout
makes CPython poll() before every recv() and send(), two syscalls where
one would do. Here the socket stays non-blocking: a read is tried first,
and only if nothing is there does the caller wait, with ``poll``.

Why spin? On a small machine a reply often comes back within tens of
microseconds, while putting the process to sleep and waking it again
costs about as much (a broker on another CPU wakes us with an IPI, or we
queue behind it on the same one). So before sleeping, :class:`Spinner`
tries the read again for up to ``spin`` microseconds, yielding the CPU
between tries (``sched_yield``: a broker waiting to run on this CPU gets
it). The spin adapts: it is tried only while the replies of this
connection that were not there at once have come, on a moving average,
within the spin. A consumer waiting on an empty queue, a large batch, or a
broker on a busy machine make that average long, and the connection
sleeps at once; an idle consumer burns no CPU. ``BROKERQ_SPIN_US=0`` turns it off.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import time
from collections.abc import Callable
from typing import Final

from ..errors import InvalidRequest

#: Default upper bound of a spin, in microseconds (``BROKERQ_SPIN_US``).
DEFAULT_SPIN_US: Final = 100
#: Bytes one read may take.
RECEIVE_BUFFER: Final = 256 * 1024
#: Weight of the latest wait in the moving average that decides whether to spin.
WEIGHT: Final = 0.125

_POLLIN: Final = select.POLLIN
_POLLOUT: Final = select.POLLOUT


#: The longest spin ``BROKERQ_SPIN_US`` may ask for, in microseconds.
MAX_SPIN_US: Final = 10_000


def spin_from_environment() -> float:
    """The spin bound in seconds from ``BROKERQ_SPIN_US`` (unset or empty: 100 µs).

    Raises InvalidRequest for a value that is not a number of microseconds
    from 0 to :data:`MAX_SPIN_US`, as a bad ``BROKERQ_PUT_WINDOW`` does: a
    setting that is quietly ignored is a setting the user thinks is on."""
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
        #: A moving average of how long a read that found nothing waited
        #: for its data (seconds). It spins only while this is under ``spin``.
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
        replies go unread stops reading, and both would wait for ever.
        """
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
        if self.typical_wait < self.spin and (deadline is None or deadline > time.monotonic()):
            end = start + self.spin
            yield_cpu = os.sched_yield
            while True:
                yield_cpu()
                try:
                    data = self._recv()
                except BlockingIOError:
                    if time.perf_counter() < end:
                        continue
                    break
                self._learn(time.perf_counter() - start)
                return data
        while True:
            self._sleep(deadline)
            try:
                data = self._recv()
            except BlockingIOError:
                continue
            self._learn(time.perf_counter() - start)
            return data

    def _recv(self) -> bytes:
        n = self.sock.recv_into(self.buffer)
        return bytes(self.view[:n])

    def _learn(self, waited: float) -> None:
        self.typical_wait += (waited - self.typical_wait) * WEIGHT

    def _sleep(self, deadline: float | None) -> int:
        """Wait until the socket is ready as registered; return the events.
        TimeoutError at ``deadline``."""
        if deadline is None:
            return self.poller.poll()[0][1]
        left = deadline - time.monotonic()
        ready = self.poller.poll(left * 1000 + 0.999) if left > 0 else []
        if not ready:
            raise TimeoutError("timed out")
        return ready[0][1]
