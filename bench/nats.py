"""brokerq's API on NATS JetStream beside nats-py used directly, and the
local broker beside both, in one run.

    .bench-venv/bin/python bench/nats.py [--messages N] [--batch B] [--quick]

The venv needs nats-py and brokerq (``pip install nats-py`` and ``pip
install --no-deps -e .``), and ``nats-server`` (Debian: /usr/sbin).

This starts a nats-server of its own (JetStream, file storage, a fresh
``/tmp`` directory, a free loopback port) and a local broker of its own
(benchlib.Broker: its defaults, journal included). Each workload runs on
four backends, each time on a fresh queue:

* ``brokerq-nats``: the blocking brokerq API (``brokerq.connect(nats_url)``:
  its calls cross to the event loop nats-py needs, in a thread of its own);
* ``brokerq-nats-async``: the async brokerq API under asyncio
  (``brokerq.open_async_client(nats_url)``: no thread to cross);
* ``nats-py``: nats-py itself, on the stream and consumer brokerq makes
  for the queue, doing what the workload asks with the same guarantees: a
  put is a JetStream publish with a ``Nats-Msg-Id`` awaited until its
  PubAck, a take is a pull and a double ack (``ack_sync``). In batches it
  does what a nats-py user would: the batch's async publishes, then every
  PubAck awaited; one pull of the batch, its double acks together;
* ``local``: the brokerq API on the local broker's socket.

Workloads (every producer and consumer is a process of its own, connected
before the clock starts): ``1P+1C`` one producer putting one message at a
time, one consumer reserving and acking one at a time; ``4P+4C`` the same
with four of each; ``batches`` one producer with ``put_many`` of B, one
consumer with ``get_many(B)``. The figure is messages/s: N over the time
from the first process's start until the last consumer took its last
message. The ratios are brokerq's layer cost, nats-py's messages/s over
brokerq's, for each brokerq client (the time brokerq takes for what
nats-py does in 1; the target is at most 1.2x), and local / brokerq-nats (what leaving the machine
costs, or saves). The ratios are
the claim (../shared/bench/README.md: one machine, one run); the absolute
figures are context. JSON goes to ``bench-results/nats-<date>-<time>.json``.

Every process started here (the server, the broker, the producers and
consumers) is ended by its pid, and every directory removed, also on an
error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from typing import Any

import benchlib  # bench/ is sys.path[0] when this file runs as a script

HERE = os.path.dirname(os.path.abspath(__file__))
# This file is named nats.py: with bench/ first on the path, ``import nats``
# would import this file again instead of nats-py.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]

import nats  # noqa: E402

import brokerq  # noqa: E402

ROOT = os.path.dirname(HERE)
BODY = benchlib.BODY
START_TIMEOUT = 30.0
PHASE_TIMEOUT = 300.0
STOP_TIMEOUT = 10.0
BACKENDS = ["brokerq-nats", "brokerq-nats-async", "nats-py", "local"]
#: name: (producers, consumers, batch or 0)
WORKLOADS = {"1P+1C": (1, 1, False), "4P+4C": (4, 4, False), "batches": (1, 1, True)}


# -- one producer or consumer, in a process of its own -----------------------


def role_main(backend: str, target: str, queue: str, role: str, *, count: int, batch: int) -> None:
    """Run as ``bench/nats.py --role ...``: connect, say ready, wait for the
    go (a line on stdin), do the work, print one JSON line of its times."""
    if backend == "nats-py":
        start, end = asyncio.run(direct(target, queue, role, count, batch))
    elif backend == "brokerq-nats-async":
        start, end = asyncio.run(with_brokerq_async(target, queue, role, count, batch))
    else:
        start, end = with_brokerq(target, queue, role, count, batch)
    print(json.dumps({"start": start, "end": end}), flush=True)


def go() -> float:
    print("ready", flush=True)
    sys.stdin.readline()
    return time.time()


def with_brokerq(target: str, queue: str, role: str, count: int, batch: int) -> tuple[float, float]:
    with brokerq.connect(target) as client:
        q = client.queue(queue)
        q.stats()  # connected and the queue made before the clock starts
        start = go()
        done = 0
        while done < count:
            if role == "producer" and batch:
                q.put_many([BODY] * min(batch, count - done))
                done += min(batch, count - done)
            elif role == "producer":
                q.put(BODY)
                done += 1
            elif batch:
                done += len(q.get_many(min(batch, count - done), timeout=PHASE_TIMEOUT))
            else:
                with q.reserve(timeout=PHASE_TIMEOUT):
                    done += 1
        return start, time.time()


async def with_brokerq_async(
    target: str, queue: str, role: str, count: int, batch: int
) -> tuple[float, float]:
    async with brokerq.open_async_client(target) as client:
        q = client.queue(queue)
        await q.stats()
        start = go()
        done = 0
        while done < count:
            n = min(batch or 1, count - done)
            if role == "producer" and batch:
                await q.put_many([BODY] * n)
                done += n
            elif role == "producer":
                await q.put(BODY)
                done += 1
            elif batch:
                done += len(await q.get_many(n, timeout=PHASE_TIMEOUT))
            else:
                msg = await q.reserve(timeout=PHASE_TIMEOUT)
                await msg.ack()
                done += 1
        return start, time.time()


async def direct(url: str, queue: str, role: str, count: int, batch: int) -> tuple[float, float]:
    from brokerq.nats import naming

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        subject = naming.subject(queue)
        psub = await js.pull_subscribe_bind(
            durable=naming.CONSUMER, stream=naming.stream_name(queue)
        )
        prefix = uuid.uuid4().hex
        start = go()
        done = 0
        while done < count:
            n = min(batch or 1, count - done)
            if role == "producer" and batch:
                # nats-py's way to batch: async publishes, then every PubAck.
                keys = [f"{prefix}-{done + i}" for i in range(n)]
                acks = [
                    await js.publish_async(subject, BODY, headers={"Nats-Msg-Id": key})
                    for key in keys
                ]
                await asyncio.gather(*acks)
                done += n
            elif role == "producer":
                await js.publish(subject, BODY, headers={"Nats-Msg-Id": f"{prefix}-{done}"})
                done += 1
            else:
                with contextlib.suppress(nats.errors.TimeoutError):
                    msgs = await psub.fetch(n, timeout=5)
                    await asyncio.gather(*(msg.ack_sync() for msg in msgs))
                    done += len(msgs)
        return start, time.time()
    finally:
        await nc.close()


# -- servers and processes, each ended by its pid ----------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nats_server_binary() -> str:
    found = shutil.which("nats-server") or shutil.which("nats-server", path="/usr/sbin")
    if found is None:
        sys.exit("nats-server is not installed: apt-get install nats-server")
    return found


def nats_server_version() -> str:
    out = subprocess.run([nats_server_binary(), "--version"], capture_output=True, check=False)
    return out.stdout.decode().strip().split()[-1] if out.returncode == 0 else "?"


@contextlib.contextmanager
def nats_server() -> Iterator[str]:
    """A JetStream nats-server of our own: yields its URL."""
    directory = tempfile.mkdtemp(prefix="bqn", dir="/tmp")
    port = free_port()
    command = [nats_server_binary(), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", directory]
    proc = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("nats-server did not start")
            time.sleep(0.05)
        yield f"nats://127.0.0.1:{port}"
    finally:
        end(proc)
        shutil.rmtree(directory, ignore_errors=True)


def end(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM ``proc``, then SIGKILL it after a bound (by its pid)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_role(
    backend: str, target: str, queue: str, role: str, *, count: int, batch: int
) -> subprocess.Popen[bytes]:
    args = [sys.executable, os.path.abspath(__file__), "--role", backend, target, queue, role]
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKERQ_")}
    return subprocess.Popen(
        [*args, str(count), str(batch)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
    )


def read_line(proc: subprocess.Popen[bytes]) -> bytes:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait()
        raise RuntimeError(f"a bench process exited with status {proc.returncode}")
    return line


def run_workload(backend: str, target: str, workload: str, n: int, batch: int) -> dict[str, float]:
    """One workload on one backend, on a fresh queue: its figures."""
    producers, consumers, batched = WORKLOADS[workload]
    queue = "bench" + uuid.uuid4().hex[:8]
    with brokerq.connect(target) as client:
        client.queue(queue).stats()  # the stream and its consumer (NATS), made once
    size = batch if batched else 0
    procs = [
        start_role(backend, target, queue, "producer", count=n // producers, batch=size)
        for _ in range(producers)
    ]
    procs += [
        start_role(backend, target, queue, "consumer", count=n // consumers, batch=size)
        for _ in range(consumers)
    ]
    try:
        for proc in procs:
            assert read_line(proc) == b"ready\n"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
        times = [json.loads(read_line(proc)) for proc in procs]
        for proc in procs:
            proc.wait(timeout=PHASE_TIMEOUT)
    finally:
        for proc in procs:
            end(proc)
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()
    if backend != "local":
        with brokerq.connect(target) as client:
            client.queue(queue).delete()
    start = min(t["start"] for t in times)
    put_end = max(t["end"] for t in times[:producers])
    take_end = max(t["end"] for t in times[producers:])
    return {"put_per_s": n / (put_end - start), "msgs_per_s": n / (take_end - start)}


# -- the run -------------------------------------------------------------------


def table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    rows = [
        "| workload | brokerq-nats msg/s | brokerq-nats-async msg/s | nats-py msg/s | local msg/s "
        "| layer cost, blocking | layer cost, async | local / brokerq-nats |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for workload, by_backend in results.items():
        ours, ours_async, direct_, local = (
            by_backend.get(b, {}).get("msgs_per_s", math.nan) for b in BACKENDS
        )
        rows.append(
            f"| {workload} | {ours:,.0f} | {ours_async:,.0f} | {direct_:,.0f} | {local:,.0f} "
            f"| {direct_ / ours:.2f}x | {direct_ / ours_async:.2f}x | {local / ours:.2f}x |"
        )
    rows.append(
        "\nlayer cost: nats-py's msg/s over brokerq's (the time brokerq takes for "
        "what nats-py does in 1; target <= 1.2x)"
    )
    return "\n".join(rows)


def main() -> None:
    if len(sys.argv) == 8 and sys.argv[1] == "--role":
        backend, target, queue, role, count, batch = sys.argv[2:]
        role_main(backend, target, queue, role, count=int(count), batch=int(batch))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=4000, help="messages per workload")
    parser.add_argument("--batch", type=int, default=100, help="put_many / get_many size")
    parser.add_argument("--quick", action="store_true", help="400 messages: does it work?")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench-results"))
    args = parser.parse_args()
    n = 400 if args.quick else args.messages
    load_before = os.getloadavg()
    results: dict[str, dict[str, dict[str, float]]] = {w: {} for w in WORKLOADS}
    with nats_server() as url, benchlib.Broker() as broker:
        targets = {"local": broker.socket_path}
        targets |= {"brokerq-nats": url, "brokerq-nats-async": url, "nats-py": url}
        for workload in WORKLOADS:
            for backend in BACKENDS:
                print(f"{workload} on {backend} ...", file=sys.stderr, flush=True)
                results[workload][backend] = run_workload(
                    backend, targets[backend], workload, n, args.batch
                )
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    os.makedirs(args.out, exist_ok=True)
    out_path = os.path.join(args.out, f"nats-{stamp}{'-quick' if args.quick else ''}.json")
    document: dict[str, Any] = {
        "benchmark": "bench/nats.py",
        "parameters": {"messages": n, "batch": args.batch, "body_bytes": len(BODY)},
        "results": results,
        "ratios": {
            w: {
                "layer_cost_nats_py_over_brokerq_nats": r["nats-py"]["msgs_per_s"]
                / r["brokerq-nats"]["msgs_per_s"],
                "layer_cost_nats_py_over_brokerq_nats_async": r["nats-py"]["msgs_per_s"]
                / r["brokerq-nats-async"]["msgs_per_s"],
                "local_over_brokerq_nats": r["local"]["msgs_per_s"]
                / r["brokerq-nats"]["msgs_per_s"],
            }
            for w, r in results.items()
        },
        **benchlib.run_facts(
            load_before,
            **{
                "nats-py": getattr(nats, "__version__", None) or pkg_version("nats-py"),
                "nats-server": nats_server_version(),
            },
        ),
    }
    with open(out_path, "w") as file:
        json.dump(document, file, indent=2)
    print(table(results))
    print(f"\n{n} messages of {len(BODY)} bytes per workload, batches of {args.batch}; {out_path}")


def pkg_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main()
