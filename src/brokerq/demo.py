"""A demo of brokerq: ``python -m brokerq.demo``.

One producer and two consumer processes share the queue ``jobs`` through a
broker that the first of them to connect spawns, on a private socket in a
fresh temporary directory, stopped and removed at the end.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

import brokerq

JOBS = 12
CONSUMERS = 2
DONE = b"<done>"


def producer(socket_path: str) -> None:
    client = brokerq.client.connect(socket_path)
    jobs = client.queue("jobs")
    say("producer", f"connected to broker pid {client.broker_pid}")
    for n in range(1, JOBS + 1):
        msg_id = jobs.put(f"job-{n}")
        say("producer", f"put job-{n} (message id {msg_id})")
        time.sleep(0.02)
    jobs.put_many([DONE] * CONSUMERS)
    say("producer", "put one <done> marker per consumer and exits")


def consumer(socket_path: str, name: str) -> None:
    client = brokerq.client.connect(socket_path)
    jobs = client.queue("jobs")
    say(name, f"connected to broker pid {client.broker_pid}, waiting for jobs")
    handled = 0
    while (body := jobs.get(timeout=30)) != DONE:
        handled += 1
        say(name, f"got {body.decode()}")
    say(name, f"saw <done> after {handled} jobs and exits")


def say(who: str, what: str) -> None:
    # One write per line, newline included, so that the processes' lines
    # never run into each other, even with PYTHONUNBUFFERED set (print
    # writes the newline apart).
    sys.stdout.write(f"  [{who:<10} pid {os.getpid():>6}] {what}\n")
    sys.stdout.flush()


def main() -> int:
    directory = tempfile.mkdtemp(prefix="brokerq-demo-", dir="/tmp")
    socket_path = os.path.join(directory, "demo.sock")
    print(f"brokerq {brokerq.__version__} demo: socket {socket_path}")
    print("No broker runs yet. Starting two consumers and one producer...")
    me = [sys.executable, "-m", "brokerq.demo"]
    try:
        workers = [
            subprocess.Popen([*me, "consumer", socket_path, f"consumer-{c}"])
            for c in "AB"[:CONSUMERS]
        ]
        workers.append(subprocess.Popen([*me, "producer", socket_path]))
        codes = [w.wait(timeout=60) for w in workers]
        with brokerq.client.connect(socket_path) as client:
            stats = client.queue("jobs").stats()
            print(
                f"Broker pid {client.broker_pid} served them all: "
                f"{stats['put_total']} messages put, {stats['delivered_total']} delivered, "
                f"{stats['ready']} left."
            )
            client.stop()
        print("Stopped the broker. ", end="")
        ok = all(code == 0 for code in codes) and stats["ready"] == 0
        print("Demo finished: every job was handled once." if ok else "Demo FAILED.")
        return 0 if ok else 1
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "producer":
        producer(sys.argv[2])
    elif len(sys.argv) > 1 and sys.argv[1] == "consumer":
        consumer(sys.argv[2], sys.argv[3])
    else:
        sys.exit(main())
