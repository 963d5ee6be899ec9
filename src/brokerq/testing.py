"""Private brokers for your own tests: a context manager and an opt-in pytest
plugin (docs/usage.md, "Testing with brokerq"). Importing this module never
needs pytest: the fixtures are only defined when it is there.

PYTEST_DONT_REWRITE: this module has no asserts for pytest to rewrite, and a
conftest.py may import it before pytest loads it as a plugin (pytest would
warn that it cannot rewrite it).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from .client import blocking as _client_module
from .client.blocking import DEFAULT_TIMEOUT, Client, Queue
from .errors import BrokerqError, BrokerUnavailable
from .spawn import broker_running, launch, lock_holder_pid, wait_ready

__all__ = ["private_broker"]

#: The temporary directories' prefix, under ``/tmp`` (pytest's ``tmp_path`` is
#: often too long for a socket path).
DIR_PREFIX = "brokerq-test-"
SOCKET_NAME = "broker.sock"


@contextlib.contextmanager
def private_broker(
    *,
    journal: bool = False,
    fsync: str = "never",
    idle_exit: float = 600,
    max_deliveries: int | None = None,
    lease: float | None = None,
    max_message_size: int | None = None,
    log_level: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Iterator[Client]:
    """Run a broker of its own, a child serving ``<dir>/broker.sock`` in a new
    directory under /tmp, for the ``with`` block; yield a client of it.

    It takes its options from the arguments only (the broker's options of
    those names; None: its default), never from the ``BROKERQ_*``
    environment. ``idle_exit``'s 10 minutes outlast any test, and let a
    broker orphaned by a killed test run go by itself. ``timeout`` is the
    client's, and how long starting or stopping the broker may take. When
    the block ends, however it ends, whatever broker serves the socket is
    stopped (or killed) and the directory removed.
    """
    named = {
        "--idle-exit": repr(float(idle_exit)),
        "--max-deliveries": None if max_deliveries is None else str(int(max_deliveries)),
        "--lease": None if lease is None else repr(float(lease)),
        "--max-message-size": None if max_message_size is None else str(int(max_message_size)),
        "--log-level": log_level,
    }
    options = ["--journal" if journal else "--no-journal", "--fsync", fsync]
    options += [arg for name, value in named.items() if value is not None for arg in (name, value)]
    directory = tempfile.mkdtemp(prefix=DIR_PREFIX, dir="/tmp")
    socket_path = os.path.join(directory, SOCKET_NAME)
    proc: subprocess.Popen[bytes] | None = None
    client: Client | None = None
    try:
        proc = _start_broker(socket_path, options, timeout)
        client = Client(socket_path, timeout)
        client.connection()
        yield client
    finally:
        deadline = time.monotonic() + timeout
        try:
            if client is not None:
                client.close()
            # The client brokerq.Queue(name) made for this socket, if any: a
            # test suite that uses it must not leak one socket per test.
            with _client_module._shared_lock:
                shared = _client_module._shared.pop(socket_path, None)
            if shared is not None:
                shared.close()
            if proc is not None or broker_running(socket_path):
                # A fresh client: the test may have closed its own. Whichever
                # broker serves the socket now (ours, or one a client spawned
                # after the test stopped ours) is asked to exit and waited for.
                # One that does not answer (stopped with SIGSTOP, say) is killed below.
                with contextlib.suppress(BrokerqError), Client(socket_path, timeout) as stopper:
                    stopper.stop()
            if proc is not None:
                try:
                    proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    _kill_and_wait(proc)
            _kill_lock_holder(socket_path)
        finally:
            shutil.rmtree(directory, ignore_errors=True)


def _start_broker(socket_path: str, options: list[str], timeout: float) -> subprocess.Popen[bytes]:
    """Start the broker as a child, in the foreground (it takes the lock itself:
    the directory is new), without the ``BROKERQ_*`` variables; return once READY."""
    deadline = time.monotonic() + timeout
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKERQ_")}
    proc, ready = launch(socket_path, options, env=env)
    try:
        wait_ready(ready, deadline, socket_path)
    except BaseException:
        _kill_and_wait(proc)
        raise
    return proc


def _kill_and_wait(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL our own child, by its pid (Popen's), and reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    proc.wait()


def _kill_lock_holder(socket_path: str) -> None:
    """The last resort for a broker that is not our child and did not stop:
    SIGKILL the pid in its lock file while it holds the lock."""
    deadline = time.monotonic() + 5
    while broker_running(socket_path):
        pid = lock_holder_pid(socket_path)
        if pid is not None and pid > 0:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise BrokerUnavailable(f"the broker at {socket_path} (pid {pid}) does not exit")
        time.sleep(0.01)


def queue_name_for(test_name: str) -> str:
    """A queue name made from a test's name: ``test_x[a:b]`` -> ``test_x[a_b]``."""
    name = re.sub(r"[^\w.\-\[\]]", "_", test_name)[:200]
    return name or "queue"


# -- the pytest plugin ---------------------------------------------------------

try:
    import pytest
except ImportError:  # pragma: no cover - pytest is only in the test extra
    pass
else:

    @pytest.fixture
    def brokerq_options() -> dict[str, Any]:
        """Keyword arguments of :func:`private_broker` for ``brokerq_client``;
        override this fixture to set broker options, e.g. ``{"journal": True}``."""
        return {}

    @pytest.fixture
    def brokerq_client(
        brokerq_options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
    ) -> Iterator[Client]:
        """A client of a fresh private broker, stopped and removed after the test.
        ``BROKERQ_SOCKET`` names its socket meanwhile, so code that uses the
        default broker (``brokerq.Queue``, the command) reaches this one."""
        with private_broker(**brokerq_options) as client:
            monkeypatch.setenv("BROKERQ_SOCKET", client.socket_path)
            yield client

    @pytest.fixture
    def brokerq_socket(brokerq_client: Client) -> str:
        """The socket path of the test's private broker (also in ``BROKERQ_SOCKET``)."""
        return brokerq_client.socket_path

    @pytest.fixture
    def brokerq_queue(brokerq_client: Client, request: pytest.FixtureRequest) -> Queue:
        """A queue of the test's private broker, named after the test."""
        return brokerq_client.queue(queue_name_for(request.node.name))
