"""Named pause points, so that tests can force races: every spawn race, and
those of a put that waits for room (test-only).

**For tests only; never set this in production.** ``BROKERQ_TEST_PAUSE``
names points and a FIFO for each, comma separated::

    BROKERQ_TEST_PAUSE=client.connect_failed=/tmp/bqX/p1,broker.bound=/tmp/bqX/p2

It is read once, when this module is imported. A spawned broker inherits
it, as it inherits every ``BROKERQ_*`` variable of its spawner
(:func:`brokerq.spawn.broker_environment`), so a test sets it for a client
process and reaches the broker's points too. Unset, :func:`pause` costs one
test of an empty dict.

The first time a process reaches a named point (each point holds a process
once; later passes go straight on) it

1. opens the FIFO read-write (so the open never blocks, and a byte the test
   writes stays in the pipe until it is read);
2. appends ``<pid> <point>\\n`` to ``<fifo>.reached``: the test waits for
   that line to know the process is *at* the point, and which process it is;
3. blocks reading one byte from the FIFO, which the test writes to release
   it: ``x`` makes it exit there with status 1 (a crash at that point),
   ``f`` makes it fork a helper child that keeps every descriptor the
   process has not closed at fork (it appends ``<pid> <point>:helper\\n``
   and sleeps until killed) and then wait for the next byte; any other byte
   lets it go on.

The points (in ``brokerq.spawn``, the broker wing's ``daemon``, ``server``
and ``connection``, and the client wing's ``blocking``):

``client.connected``
    connect() succeeded (the connection may wait in the backlog); no hello
    sent yet.
``client.connect_failed``
    connect() did not connect; the client has not tried the lock yet.
``client.backlog_full``
    connect() said EAGAIN: a broker listens, its backlog full; the client is
    about to back off and connect again, without trying the lock.
``client.lock_busy``
    the lock is held by someone else; the client is about to back off.
``client.locked``
    the client holds the lock and has not started a broker yet.
``client.spawned``
    the broker's launcher was just started (Popen returned).
``client.stop_sent``
    ``Client.stop`` sent ``stop`` (and read the reply, if one came) and has
    not begun to wait for the broker to exit.
``broker.locked``
    the broker holds the lock; nothing is bound or published yet.
``broker.bound``
    the temporary socket is bound, not listening.
``broker.listening``
    it listens, and is not yet renamed over the socket path.
``broker.before_ready``
    the socket is published; READY is not written yet.
``broker.idle_exit``
    the broker decided to idle out and has not unlinked the socket yet.
``broker.idle_unlinked``
    it unlinked the socket and has not drained the backlog yet.
``broker.put_room``
    a request freed room in a queue where puts wait for it; none of them
    is admitted yet (the request's reply is not written).
``broker.put_admitted``
    puts that waited for room were just admitted (enqueued); their replies
    are not written yet.
``broker.put_abandoned``
    the broker read the end of a connection whose put waits for room; the
    put is not withdrawn yet.
"""

from __future__ import annotations

import os
import signal
import sys

ENV = "BROKERQ_TEST_PAUSE"


def _parse(spec: str) -> dict[str, str]:
    points: dict[str, str] = {}
    for item in spec.split(","):
        name, sep, path = item.strip().partition("=")
        if sep and name and path:
            points[name] = path
    return points


_POINTS: dict[str, str] = _parse(os.environ.get(ENV, ""))


def pause(name: str) -> None:
    """Hold this process at point ``name`` if the test asked for it."""
    if _POINTS:
        path = _POINTS.pop(name, None)
        if path is not None:
            _hold(name, path)


def _note(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _hold(name: str, fifo: str) -> None:
    fd = os.open(fifo, os.O_RDWR | os.O_CLOEXEC)
    try:
        _note(fifo + ".reached", f"{os.getpid()} {name}\n")
        while True:
            command = os.read(fd, 1)
            if command == b"x":
                sys.stderr.write(f"brokerq: test pause: exiting at {name}\n")
                sys.stderr.flush()
                os._exit(1)
            if command != b"f":
                return
            if os.fork() == 0:  # the helper: never returns into the caller
                try:
                    os.close(fd)
                    _note(fifo + ".reached", f"{os.getpid()} {name}:helper\n")
                    while True:
                        signal.pause()
                finally:
                    os._exit(0)
    finally:
        os.close(fd)
