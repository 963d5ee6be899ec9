"""A nats-server of a test's own: a free loopback port, its own storage dir, ended by pid.

``start_server()`` returns a :class:`NatsServer` (``.url``, ``.pid``,
``.stop()``) once the server answers on its port; ``stop()`` ends it by
pid and removes its storage directory (``with running_server() as s``
stops it at the block's end) (a three-node cluster:
:mod:`nats_cluster`). Where nats-server is missing, :func:`require_server`
skips the calling test module (or, under CI, fails it) with :data:`INSTALL_HINT`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

INSTALL_HINT = (
    "nats-server is not installed: apt-get install nats-server (or see "
    "https://docs.nats.io/running-a-nats-service/introduction/installation)"
)


def server_binary() -> str | None:
    return shutil.which("nats-server") or (
        "/usr/sbin/nats-server" if os.path.exists("/usr/sbin/nats-server") else None
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class NatsServer:
    url: str
    port: int
    pid: int
    store_dir: str
    process: subprocess.Popen[bytes]

    def stop(self) -> None:
        """End the server by its pid (SIGTERM, then SIGKILL), and remove its storage."""
        if self.process.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.process.wait(10)
        shutil.rmtree(self.store_dir, ignore_errors=True)


def require_server() -> str:
    """The nats-server binary, or skip the calling test (fail it under ``CI=true``)."""
    import pytest

    binary = server_binary()
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and {INSTALL_HINT}", pytrace=False)
        pytest.skip(INSTALL_HINT, allow_module_level=True)
    return binary


def start_server(
    port: int | None = None,
    timeout: float = 20.0,
    config: str | None = None,
    store_dir: str | None = None,
) -> NatsServer:
    """A JetStream-enabled nats-server on 127.0.0.1:``port`` (None: a free one);
    ``config``: the text of a configuration file to start it with;
    ``store_dir``: a stopped server's storage to start on (None: a new one)."""
    binary = server_binary()
    if binary is None:
        raise FileNotFoundError(INSTALL_HINT)
    port = port or free_port()
    store_dir = store_dir or tempfile.mkdtemp(dir="/tmp", prefix="bq-nats-")
    args = [binary, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", store_dir]
    if config is not None:
        config_file = os.path.join(store_dir, "server.conf")
        with open(config_file, "w") as f:
            f.write(config)
        args += ["-c", config_file]
    process = subprocess.Popen(
        args,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = NatsServer(f"nats://127.0.0.1:{port}", port, process.pid, store_dir, process)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            server.stop()
            raise RuntimeError(f"nats-server exited with status {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return server
        except OSError:
            time.sleep(0.05)
    server.stop()
    raise TimeoutError(f"nats-server did not listen on port {port} within {timeout} s")


@contextlib.contextmanager
def running_server(config: str | None = None) -> Iterator[NatsServer]:
    """``start_server(config=config)``, stopped by its pid when the block ends."""
    handle = start_server(config=config)
    try:
        yield handle
    finally:
        handle.stop()
