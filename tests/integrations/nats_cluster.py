"""nats-server for the NATS backend's tests: whether it is installed, and a
three-node JetStream cluster on loopback.

Each node has its own client and route ports, storage directory and
server_name, and routes to the other two, so a stream created with three
replicas (R3) has a RAFT leader on one node and followers on the others:
killing the leader makes the followers elect a new one, which is what the
cluster test does while producers and consumers run. Every node is started
and stopped by its pid; the storage directories are removed at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import nats_server

#: A cluster client's timeout, how long its calls wait out a leader's election:
#: one took 4 to 9 s here on an idle machine (docs/nats.md), longer on a busy one.
ELECTION = 30.0


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports free at this moment (held together while
    chosen, so none is handed out twice)."""
    held = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            held.append(s)
        return [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


@dataclass
class Node:
    name: str
    port: int
    route_port: int
    store: str
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"


class Cluster:
    """Three JetStream nodes routed to each other (``with Cluster() as c``)."""

    def __init__(self, size: int = 3) -> None:
        self.binary = nats_server.require_server()
        self.root = tempfile.mkdtemp(prefix="bqnc", dir="/tmp")
        ports = free_ports(2 * size)
        self.nodes = [
            Node(f"n{i}", ports[2 * i], ports[2 * i + 1], os.path.join(self.root, f"n{i}"))
            for i in range(size)
        ]

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def url(self) -> str:
        """Every node's URL, comma-separated (a client may fail over to any)."""
        return ",".join(self.urls)

    def node(self, name: str) -> Node:
        return next(node for node in self.nodes if node.name == name)

    def start(self, node: Node) -> None:
        routes = ",".join(
            f"nats://127.0.0.1:{other.route_port}" for other in self.nodes if other is not node
        )
        os.makedirs(node.store, exist_ok=True)
        args = [self.binary, "--jetstream", "--store_dir", node.store]
        args += ["--server_name", node.name, "--addr", "127.0.0.1", "--port", str(node.port)]
        args += ["--cluster_name", "bq-test", "--cluster", f"nats://127.0.0.1:{node.route_port}"]
        args += ["--routes", routes]
        node.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def __enter__(self) -> Cluster:
        try:
            for node in self.nodes:
                self.start(node)
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until JetStream answers on every live node (its meta leader is elected)."""
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            if node.proc is None or node.proc.poll() is not None:
                continue
            while not run(_jetstream_answers(node.url)):
                if node.proc.poll() is not None:
                    raise AssertionError(f"nats-server {node.name} exited: {node.proc.returncode}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"JetStream not ready on {node.name} in {timeout} s")
                time.sleep(0.1)
        # Answering is not enough: until every peer has joined the meta group,
        # a replicated stream finds "no suitable peers for placement".
        while not run(_replicated_stream_placed(self.urls, len(self.nodes))):
            if time.monotonic() > deadline:
                raise AssertionError(f"no R{len(self.nodes)} stream could be placed in {timeout} s")
            time.sleep(0.2)

    def stream_leader(self, stream: str) -> str:
        """The server_name of the node that leads ``stream``'s RAFT group."""
        live = [n.url for n in self.nodes if n.proc is not None and n.proc.poll() is None]
        leader: str | None = run(_stream_leader(live, stream))
        assert leader, f"stream {stream} has no leader"
        return leader

    def stream_replicas(self, stream: str) -> int:
        """How many replicas ``stream`` was made with."""
        replicas: int = run(_stream_replicas(self.urls, stream))
        return replicas

    def kill(self, name: str) -> None:
        """SIGKILL node ``name`` by its pid and wait for it."""
        proc = self.node(name).proc
        assert proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def kill_leader(self, stream: str) -> str:
        """Kill the node leading ``stream``; returns its name."""
        name = self.stream_leader(stream)
        self.kill(name)
        return name

    def stop(self) -> None:
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(node.proc.pid, signal.SIGTERM)
        for node in self.nodes:
            if node.proc is None:
                continue
            try:
                node.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(node.proc.pid, signal.SIGKILL)
                node.proc.wait(timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _jetstream_answers(url: str) -> bool:
    import nats

    try:
        nc = await nats.connect(
            url, connect_timeout=1, allow_reconnect=False, max_reconnect_attempts=0, error_cb=_quiet
        )
    except Exception:
        return False
    try:
        await nc.jetstream().account_info()
        return True
    except Exception:
        return False
    finally:
        await nc.close()


async def _quiet(exc: Exception) -> None:
    """nats-py logs every failed connect attempt unless given an error callback."""


async def _replicated_stream_placed(urls: list[str], replicas: int) -> bool:
    import nats
    from nats.js.api import StreamConfig

    nc = await nats.connect(urls, connect_timeout=2, error_cb=_quiet)
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="READY_PROBE", num_replicas=replicas))
        await js.delete_stream("READY_PROBE")
        return True
    except Exception:
        return False
    finally:
        await nc.close()


async def _stream_leader(urls: list[str], stream: str) -> str | None:
    import nats

    nc = await nats.connect(urls, connect_timeout=2, error_cb=_quiet)
    try:
        info = await nc.jetstream().stream_info(stream)
        return info.cluster.leader if info.cluster else None
    finally:
        await nc.close()


async def _stream_replicas(urls: list[str], stream: str) -> int:
    import nats

    nc = await nats.connect(urls, connect_timeout=2, error_cb=_quiet)
    try:
        info = await nc.jetstream().stream_info(stream)
        return int(info.config.num_replicas or 1)
    finally:
        await nc.close()
