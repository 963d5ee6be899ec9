"""Where the time goes: run a workload against a broker under py-spy, print the top.

    .venv/bin/python bench/profile.py [--workload b] [--journal shm|disk|none]
                                      [--spy broker|producer|consumer] [-n N]

A broker of its own is spawned in a temporary directory (``--journal shm``
puts it on /dev/shm, a tmpfs, as the default XDG_RUNTIME_DIR would be;
``disk`` on /tmp; ``none`` runs it without a journal), with the broker's
defaults (``BROKERQ_FSYNC=batch`` in the environment to profile the fsync
path beside the socket, ``BROKERQ_DATA_DIR`` for a data directory). One producer and
one consumer process then run the workload with the blocking client, as
``../shared/bench`` does:

* ``a``: one message in flight: put, the consumer's get(timeout) takes it
  and signals back over a pipe, then the next put;
* ``b``: the producer puts N messages of 100 B while the consumer gets;
* ``c``: the same with 4 producers and 4 consumers (N in all);
* ``d``: the same in batches of 100 (put_many / get_many);
* ``e``: N messages of 64 KiB.

``py-spy record`` samples the process named by ``--spy`` (idle samples
left out) and this script prints the functions with the most samples, on
their own (self) and with what they call (total). ``--raw FILE`` keeps
py-spy's collapsed stacks for a flame graph. Without ``--spy`` it only
times the run, which is how to measure a change before and after.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

import brokerq

BATCH = 100


def producer(path: str, workload: str, n: int, size: int, ack: Any) -> None:
    with brokerq.connect(path) as client:
        q = client.queue("p")
        body = b"x" * size
        if workload == "d":
            for _ in range(n // BATCH):
                q.put_many([body] * BATCH)
        elif workload == "a":
            for _ in range(n):
                q.put(body)
                ack.recv_bytes()
        else:
            for _ in range(n):
                q.put(body)


def consumer(path: str, workload: str, n: int, ack: Any) -> None:
    with brokerq.connect(path) as client:
        q = client.queue("p")
        got = 0
        while got < n:
            if workload == "d":
                got += len(q.get_many(BATCH, timeout=10))
            else:
                q.get(timeout=10)
                got += 1
                if workload == "a":
                    ack.send_bytes(b"")


def spy(pid: int, seconds: float, raw: str) -> subprocess.Popen[bytes]:
    py_spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    cmd = [py_spy, "record", "--pid", str(pid), "--format", "raw", "--output", raw]
    cmd += ["--duration", str(int(seconds) + 1), "--rate", "500", "--nonblocking"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def summarize(raw: str, top: int) -> None:
    """Print the functions with the most samples, self and total."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    with open(raw) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            n = int(count)
            samples += n
            frames = [fr.split(" (")[0] + " " + fr.rsplit("/", 1)[-1] for fr in stack.split(";")]
            own[frames[-1]] += n
            for frame in set(frames):
                total[frame] += n
    print(f"\n{samples} samples (busy only)")
    for title, counter in (("self", own), ("total", total)):
        print(f"\n--- top {top} by {title} ---")
        for frame, n in counter.most_common(top):
            print(f"{100 * n / samples:5.1f}%  {frame}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", choices="abcde", default="b")
    parser.add_argument("--journal", choices=("shm", "disk", "none"), default="shm")
    parser.add_argument("--spy", choices=("broker", "producer", "consumer"))
    parser.add_argument("-n", type=int, default=0, help="messages (default per workload)")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--raw", help="keep py-spy's collapsed stacks here")
    args = parser.parse_args()
    n = args.n or {"a": 5000, "b": 30000, "c": 40000, "d": 300000, "e": 5000}[args.workload]
    pairs = 4 if args.workload == "c" else 1
    size = 65536 if args.workload == "e" else 100
    base = "/dev/shm" if args.journal == "shm" else "/tmp"
    tmp = tempfile.mkdtemp(prefix="bqp-", dir=base)
    path = os.path.join(tmp, "s")
    os.environ.setdefault("BROKERQ_IDLE_EXIT", "60")  # the broker's defaults otherwise
    if args.journal == "none":
        os.environ["BROKERQ_JOURNAL"] = "false"
    raw = args.raw or os.path.join(tmp, "raw.txt")
    try:
        with brokerq.connect(path) as client:
            broker_pid = client.broker_pid
            ctx = mp.get_context("fork")
            ack_r, ack_w = ctx.Pipe(duplex=False)
            each = n // pairs
            cons = [
                ctx.Process(target=consumer, args=(path, args.workload, each, ack_w))
                for _ in range(pairs)
            ]
            prods = [
                ctx.Process(target=producer, args=(path, args.workload, each, size, ack_r))
                for _ in range(pairs)
            ]
            start = time.perf_counter()
            for proc in cons + prods:
                proc.start()
            pid = {"broker": broker_pid, "producer": prods[0].pid, "consumer": cons[0].pid}
            recorder = spy(pid[args.spy] or 0, 3600, raw) if args.spy else None
            for proc in prods + cons:
                proc.join()
            elapsed = time.perf_counter() - start
            if recorder is not None:
                recorder.send_signal(signal.SIGINT)
                recorder.wait(30)
            client.stop()
        rate = n / elapsed
        mb = f", {rate * size / 1e6:.0f} MB/s" if size > 1000 else ""
        print(
            f"workload {args.workload}, journal {args.journal}: {n} msgs in {elapsed:.2f} s, "
            f"{rate:,.0f} msgs/s{mb}, {1e6 * elapsed / n:.1f} µs/msg"
        )
        if recorder is not None:
            summarize(raw, args.top)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
