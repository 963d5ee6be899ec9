"""Protocol version skew (spawn-research scenario 18), and the upgrade handoff.

An "older" or "newer" broker is the real broker with its protocol version
patched in its own process; an older or newer client is this process with
``protocol.PROTOCOL_VERSION`` patched. After an upgrade, a newer client
that finds an older broker still running asks it to stop (it answers its
clients, syncs its journal and exits), then starts its own, which replays
the journal: nothing is lost.
"""

from __future__ import annotations

import os
import subprocess
import sys

import anyio
import pytest
from conftest import Procs, gone, wait_until

import brokerq
from brokerq import protocol

BROKER_SPEAKING = """\
import sys
import brokerq.broker.connection, brokerq.protocol
version = int(sys.argv.pop(1))
brokerq.protocol.PROTOCOL_VERSION = brokerq.broker.connection.PROTOCOL_VERSION = version
from brokerq.broker.daemon import main
main()
"""


def start_broker(procs: Procs, socket_path: str, version: int) -> subprocess.Popen[bytes]:
    """A broker in the foreground speaking protocol ``version``, once it listens."""
    proc = procs([sys.executable, "-c", BROKER_SPEAKING, str(version), socket_path])
    wait_until(lambda: os.path.exists(socket_path) or proc.poll() is not None, what="listen")
    assert proc.poll() is None
    return proc


def put_as(version: int, socket_path: str, bodies: list[bytes]) -> None:
    """Put ``bodies`` as a client speaking ``version``."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(protocol, "PROTOCOL_VERSION", version)
        with brokerq.connect(socket_path) as client:
            client.queue("jobs").put_many(bodies)


def test_s18_a_newer_client_retires_an_older_broker_and_loses_nothing(
    procs: Procs, socket_path: str
) -> None:
    old = start_broker(procs, socket_path, protocol.PROTOCOL_VERSION - 1)
    put_as(protocol.PROTOCOL_VERSION - 1, socket_path, [b"1", b"2", b"3"])
    with brokerq.connect(socket_path) as client:  # this version: an upgrade
        assert client.broker_pid != old.pid
        assert old.wait(timeout=10) == 0  # it stopped cleanly, journal synced
        assert client.queue("jobs").get_many(10, timeout=5) == [b"1", b"2", b"3"]
        client.stop()
    _, err = old.communicate(timeout=10)
    assert b"refused a client" in err  # the broker's own log names the mismatch


def test_s18_an_older_client_gets_a_clear_error_and_the_broker_goes_on(
    procs: Procs, socket_path: str
) -> None:
    current = start_broker(procs, socket_path, protocol.PROTOCOL_VERSION)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(protocol, "PROTOCOL_VERSION", protocol.PROTOCOL_VERSION - 1)
        with pytest.raises(brokerq.VersionMismatch) as caught:
            brokerq.connect(socket_path)
    assert caught.value.broker_version == protocol.PROTOCOL_VERSION
    assert "upgrade brokerq" in str(caught.value)
    with brokerq.connect(socket_path) as client:  # still serving, the same broker
        assert client.broker_pid == current.pid
        client.stop()


def test_s18_a_newer_broker_is_never_stopped_by_an_older_client(
    procs: Procs, socket_path: str
) -> None:
    newer = start_broker(procs, socket_path, protocol.PROTOCOL_VERSION + 1)
    client = brokerq.Client(socket_path, timeout=5)
    with pytest.raises(brokerq.VersionMismatch) as caught:
        client.queue("jobs").put(b"x")
    assert caught.value.broker_version == protocol.PROTOCOL_VERSION + 1
    with pytest.raises(brokerq.VersionMismatch):
        client.stop()
    assert newer.poll() is None
    newer.terminate()
    assert newer.wait(timeout=10) == 0


def test_s18_stop_retires_an_older_broker_without_starting_one(
    procs: Procs, socket_path: str
) -> None:
    old = start_broker(procs, socket_path, protocol.PROTOCOL_VERSION - 1)
    assert brokerq.Client(socket_path).stop()
    assert old.wait(timeout=10) == 0
    assert not os.path.exists(socket_path)
    assert gone(old.pid)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_s18_the_async_client_retires_an_older_broker_too(
    procs: Procs, socket_path: str, backend: str
) -> None:
    old = start_broker(procs, socket_path, protocol.PROTOCOL_VERSION - 1)
    put_as(protocol.PROTOCOL_VERSION - 1, socket_path, [b"kept"])

    async def main() -> None:
        with anyio.fail_after(20):
            async with brokerq.open_async_client(socket_path) as client:
                assert await client.queue("jobs").get(timeout=5) == b"kept"
                await client.stop()

    anyio.run(main, backend=backend)
    assert old.wait(timeout=10) == 0
