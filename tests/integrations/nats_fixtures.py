"""The NATS tests' shared fixtures: one server per test module, a client per test.

A module imports them by their function names (``from nats_fixtures import
clean_client, module_server  # noqa: F401``); tests ask for them as
``server`` and ``client``. A module whose tests restart or stop their
server imports ``own_server`` instead: a server of each test's own.
:func:`kill_once_it_says` ends a client process at the step it names.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
from conftest import Procs, gone, read_line, wait_until
from nats_server import NatsServer, require_server, running_server

if TYPE_CHECKING:
    import brokerq.nats


@pytest.fixture(scope="module", name="server")
def module_server() -> Iterator[NatsServer]:
    """A nats-server of the module's own, ended by its pid."""
    require_server()
    with running_server() as handle:
        yield handle


@pytest.fixture(name="server")
def own_server() -> Iterator[NatsServer]:
    """A nats-server of the test's own (some restart it), ended by its pid."""
    require_server()
    with running_server() as handle:
        yield handle


@pytest.fixture(name="client")
def clean_client(server: NatsServer) -> Iterator[brokerq.nats.NatsClient]:
    """A client of ``server``; the queues it leaves are deleted after the test."""
    import brokerq.nats

    with brokerq.nats.connect(server.url) as c:
        yield c
        for name in c.queues():
            c.queue(name).delete()


def kill_once_it_says(procs: Procs, args: list[str], line: bytes, **kwargs: Any) -> None:
    """Start ``args`` (a client in a process of its own), wait until it says
    ``line`` (20 s at most), then SIGKILL it by its pid and wait until it is gone."""
    proc = procs(args, **kwargs)
    assert read_line(proc, timeout=20) == line
    os.kill(proc.pid, signal.SIGKILL)
    wait_until(lambda: gone(proc.pid), 10, "the killed client to be gone")
