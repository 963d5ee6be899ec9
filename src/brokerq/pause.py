"""Named pause points, so that tests can force races. **For tests only.**

``BROKERQ_TEST_PAUSE`` names points and a FIFO for each, comma separated
(``client.locked=/tmp/bqX/p1,broker.bound=/tmp/bqX/p2``), read once at
import (a spawned broker inherits it); unset, :func:`pause` costs one test
of an empty dict. The first time a process reaches a named point it opens
the FIFO read-write (so the open never blocks), appends ``<pid> <point>\\n``
to ``<fifo>.reached``, and blocks reading one byte: ``x`` makes it exit 1
there (a crash), ``f`` makes it fork a helper child that keeps every
descriptor not closed at fork (it appends ``<pid> <point>:helper\\n`` and
sleeps until killed) then wait for the next byte; any other lets it go on.

The points:

``client.connected``: connect() succeeded; no hello sent yet.
``client.connect_failed``: connect() did not; the lock not tried yet.
``client.backlog_full``: connect() said EAGAIN; about to connect again.
``client.lock_busy``: someone else holds the lock; about to back off.
``client.locked``: the client holds the lock; no broker started yet.
``client.spawned``: the broker's launcher was just started.
``client.stop_sent``: ``Client.stop`` sent ``stop``; not waiting for the exit yet.
``broker.locked``: the broker holds the lock; nothing bound yet.
``broker.bound``: the temporary socket is bound, not listening.
``broker.listening``: it listens, not yet renamed over the socket path.
``broker.before_ready``: the socket is published; READY not written yet.
``broker.idle_exit``: the broker decided to idle out; the socket not unlinked yet.
``broker.idle_unlinked``: it unlinked the socket; the backlog not drained yet.
``broker.put_room``: a request freed room where puts wait; none admitted yet.
``broker.put_admitted``: puts that waited were just enqueued; no reply written yet.
``broker.put_abandoned``: the end of a connection whose put waits was read;
the put not withdrawn yet.
"""

from __future__ import annotations

import os
import signal
import sys

ENV = "BROKERQ_TEST_PAUSE"
_PAIRS = (item.strip().partition("=") for item in os.environ.get(ENV, "").split(","))
_POINTS = {name: path for name, sep, path in _PAIRS if sep and name and path}


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
