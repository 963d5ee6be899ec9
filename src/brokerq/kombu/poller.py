"""The wait on a channel's consumed queues: one reserve, parked on them all.

A kombu connection consumes many queues, on a few channels (a Celery
worker: its task queues on one channel, its remote-control queue on
another). Rather than poll them in turn, each consuming channel has a
poller that keeps ONE request waiting on all of the channel's queues in the
broker (``reserve_any``, the multi-queue wait; a single queue: a plain
``reserve``, which older brokers also serve), on a connection of its own,
so that a message is handed over the moment it is put.

Why one poller per channel, not one for the connection? A channel at its
``prefetch_count`` must not be sent more, so its queues leave the wait; when
an ack makes room, its wait must start at once. A poller shared with
another channel would be parked then (a broker answers a connection's
requests in order, behind the waiting one) and the channel's queues would
wait for its bound: a Celery prefork worker stalled a second at a time.
With one each, a channel's own poller is idle exactly when it may take
more, as Redis's transport has a connection per channel for its BRPOP.

Why its own socket, driven here with the client wing's sans-IO
:class:`~brokerq.client.wire.Wire`, rather than the blocking client's
``reserve_any``? kombu's event loop (the hub a Celery worker runs) must
*send* the request when a poll starts and *read* the reply when the socket
is readable, never blocking in between; the blocking client only has the
call that does both. So the request is split here: :meth:`Poller.start`
sends, :meth:`Poller.read` reads whatever has come without blocking, and
:func:`wait_any` blocks for ``drain_events`` (code without a hub).

The request waits at most ``wait_bound`` seconds in the broker: a reply
(or its ``empty`` at the bound) ends it, and the next one asks again with
the queues consumed by then, so a consumer added meanwhile is waited on
soon. Messages do not wait for the bound: they are handed over at once.
``drain_events(timeout)`` bounds its requests by its timeout too, so that
no reserve waits on in the broker long after it has returned.

The leases of the messages reserved here belong to the poller's
connection: if the process dies, the broker releases them when the socket
closes.
"""

from __future__ import annotations

import logging
import select
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from .. import protocol
from ..client import calls
from ..client.sockio import Connection
from ..errors import ConnectionLost, Empty, RemoteProtocolError
from ..validation import MAX_QUEUES_PER_WAIT

logger = logging.getLogger(__name__)

#: How many bytes one read takes.
READ_SIZE: Final = 256 * 1024


@dataclass(frozen=True, slots=True)
class Reserved:
    """A message reserved from ``queue``, to be delivered."""

    queue: str
    msg_id: int
    body: bytes
    attempt: int
    lease: float


@dataclass(frozen=True, slots=True)
class _Waiting:
    request_id: int
    queues: list[str]
    expect: type[protocol.ReserveReply] | type[protocol.ReserveAnyReply]


class Poller:
    """One channel's connection, at most one reserve waiting on it (see the module doc)."""

    def __init__(
        self, socket_path: str, connect_timeout: float, lease: float, wait_bound: float
    ) -> None:
        self.socket_path = socket_path
        self.connect_timeout = connect_timeout
        self.lease = lease
        self.wait_bound = wait_bound
        self.conn: Connection | None = None
        self.waiting: _Waiting | None = None
        #: The queues that delivered last go to the back of the list: the
        #: list is the broker's order of preference, and kombu's consumers
        #: expect a fair share for each queue (as its FairCycle gives).
        self.recent: list[str] = []
        #: Called with the socket's fd before it is closed (the hub's remove_reader).
        self.forget: Callable[[int], None] | None = None

    def fileno(self) -> int | None:
        return None if self.conn is None else self.conn.sock.fileno()

    def start(self, queues: list[str], bound: float | None = None) -> None:
        """Send a reserve waiting on ``queues`` (at most ``bound`` seconds, if
        given, else ``wait_bound``), unless one waits already (or there is
        nothing to wait on). Connects (spawning a broker if none runs) if
        the connection is new or was lost."""
        if self.waiting is not None or not queues:
            return
        wait = self.wait_bound if bound is None else max(min(bound, self.wait_bound), 0.0)
        order = self._ordered(queues)[:MAX_QUEUES_PER_WAIT]
        call: calls.Call[protocol.ReserveReply] | calls.Call[protocol.ReserveAnyReply]
        if len(order) == 1:  # (a plain reserve: an older broker serves it too)
            call = calls.reserve(order[0], wait, self.lease)
        else:
            call = calls.reserve_any(order, wait, self.lease)
        fresh = self.conn is None
        while True:
            if self.conn is None:
                self.conn = Connection(self.socket_path, self.connect_timeout, spin=0.0)
            conn = self.conn
            request_id = conn.wire.encode(call.kind, call.fields)
            try:
                conn.io.send_all(conn.wire.out, time.monotonic() + self.connect_timeout)
                break
            except (OSError, TimeoutError) as exc:
                self._lost(exc)
                if fresh:  # (a connection just made that fails: the broker's trouble)
                    raise conn.wire.lost(exc) from exc
                fresh = True  # an old connection found dead: once more, on a new one
        self.waiting = _Waiting(request_id, order, call.expect)

    def _ordered(self, queues: list[str]) -> list[str]:
        unique = list(dict.fromkeys(queues))
        rank = {name: i for i, name in enumerate(self.recent)}
        return sorted(unique, key=lambda name: rank.get(name, -1))

    def read(self) -> Reserved | None:
        """What has come, read without blocking: the reserved message, or None
        (nothing whole yet, the wait ended empty, or the connection was
        lost: the next :meth:`start` asks again, reconnecting if need be)."""
        conn, waiting = self.conn, self.waiting
        if conn is None or waiting is None:
            return None
        try:
            data = conn.sock.recv(READ_SIZE)
        except BlockingIOError:
            return None
        except OSError as exc:
            self._lost(exc)
            return None
        try:
            conn.wire.feed(data)
            reply = conn.wire.next_reply()
            if reply is None:
                return None
            self.waiting = None
            with calls.supported("reserve_any", "multi-queue wait"):
                got = conn.wire.check(waiting.expect, waiting.request_id, reply, conn.close)
        except Empty:
            return None
        except (OSError, ConnectionLost, RemoteProtocolError) as exc:
            self._lost(exc)
            return None
        queue = got.queue if isinstance(got, protocol.ReserveAnyReply) else waiting.queues[0]
        self.recent = [name for name in self.recent if name != queue] + [queue]
        return Reserved(queue, got.msg_id, got.body, got.attempt, got.lease)

    def _lost(self, exc: BaseException) -> None:
        """The connection broke (the broker stopped, crashed or idled out):
        drop it; its leases go back in the broker. The next start reconnects."""
        logger.info("lost the waiting connection to %s: %s", self.socket_path, exc)
        self.close()

    def close(self) -> None:
        conn, self.conn, self.waiting = self.conn, None, None
        if conn is None:
            return
        if self.forget is not None and conn.sock.fileno() >= 0:
            self.forget(conn.sock.fileno())
        conn.close()


def wait_any(pollers: list[Poller], deadline: float | None) -> Reserved | None:
    """Block until a waiting reserve of ``pollers`` is answered, or
    ``deadline`` (monotonic; None: no bound) passes: the message, or None
    (also when a wait ended empty: the caller asks again). A second answer
    that came meanwhile stays in its socket, read by the next call."""
    while True:
        waiting = {p.conn.sock.fileno(): p for p in pollers if p.conn and p.waiting}
        left = None if deadline is None else deadline - time.monotonic()
        if not waiting or (left is not None and left <= 0):
            return None
        poll = select.poll()
        for fd in waiting:
            poll.register(fd, select.POLLIN)
        for fd, _ in poll.poll(None if left is None else left * 1000 + 0.999):
            poller = waiting[fd]
            reserved = poller.read()
            if reserved is not None or poller.waiting is None:
                return reserved
