"""A nats-server of a test's own: a free loopback port, its own storage dir, ended by pid.

``start_server()`` returns a :class:`NatsServer` (``.url``, ``.pid``,
``.stop()``) once the server answers on its port; ``stop()`` ends it by
pid and removes its storage directory. ``start_cluster(3)`` starts three
routed to each other, a :class:`NatsCluster` (``.url`` names them all
and ``replicas=3``; ``.servers``; ``.stop()``). Where nats-server is missing, the
caller skips (or, under CI, fails) with :data:`INSTALL_HINT`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass

INSTALL_HINT = "nats-server is not installed: `apt-get install nats-server` (Debian) or see nats.io"


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
        pytest.skip(INSTALL_HINT)
    return binary


@dataclass(frozen=True)
class ClusterMember:
    """What a server needs to join a cluster: its name, its route port, the others'."""

    name: str
    route_port: int
    route_ports: tuple[int, ...]

    def args(self) -> list[str]:
        routes = ",".join(f"nats-route://127.0.0.1:{p}" for p in self.route_ports)
        return [
            *("-n", self.name, "--cluster_name", "bq"),
            "--cluster",
            f"nats://127.0.0.1:{self.route_port}",
            "--routes",
            routes,
        ]


def start_server(
    port: int | None = None, timeout: float = 20.0, *, cluster: ClusterMember | None = None
) -> NatsServer:
    """A JetStream-enabled nats-server on 127.0.0.1:``port`` (None: a free one);
    with ``cluster``, one member of a cluster (:func:`start_cluster`)."""
    binary = server_binary()
    if binary is None:
        raise FileNotFoundError(INSTALL_HINT)
    port = port or free_port()
    store_dir = tempfile.mkdtemp(dir="/tmp", prefix="bq-nats-")
    extra = cluster.args() if cluster is not None else []
    process = subprocess.Popen(
        [binary, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", store_dir, *extra],
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


@dataclass
class NatsCluster:
    servers: list[NatsServer]
    replicas: int

    @property
    def url(self) -> str:
        """Every server, and the replicas of the streams brokerq makes."""
        return ",".join(s.url for s in self.servers) + f"?replicas={self.replicas}"

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


def start_cluster(size: int = 3, timeout: float = 20.0) -> NatsCluster:
    """``size`` servers routed to each other on loopback, each with its own
    storage; ``.url`` asks for streams of ``size`` replicas. JetStream needs
    a few seconds after this returns to elect its meta leader: the first
    requests may time out (a client's put is sent again meanwhile)."""
    route_ports = [free_port() for _ in range(size)]
    servers: list[NatsServer] = []
    try:
        for i, route_port in enumerate(route_ports):
            others = tuple(p for p in route_ports if p != route_port)
            member = ClusterMember(f"n{i}", route_port, others)
            servers.append(start_server(timeout=timeout, cluster=member))
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return NatsCluster(servers, size)
