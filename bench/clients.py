"""Round trips per second through each client, and the cost of a publish's fan-out.

    .venv/bin/python bench/clients.py [N]        (default N = 5000)

One private broker (no journal, so the clients are what is measured). Each
line is the best of three runs:

* ``put+get``: N puts then N gets of 100 B, one request at a time, with the
  blocking client and with the async client on trio and on asyncio. The
  async get that waits is a reserve + ack on the wire (see async_client.py),
  so ``get(timeout=5)`` and ``get_nowait()`` are both shown.
* ``publish``: N publishes of 100 B to a topic with 0, 1, 4 and 16 durable
  subscriber queues, and with 4 live subscribers reading in threads.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Awaitable, Callable

import anyio

import brokerq
from brokerq.testing import private_broker

BODY = b"x" * 100


def best(run: Callable[[], None]) -> float:
    times = []
    for _ in range(3):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def report(label: str, n: int, seconds: float) -> None:
    print(f"{label:<44} {n / seconds:>10,.0f} /s")


def blocking(client: brokerq.Client, n: int) -> None:
    q = client.queue("b")

    def run() -> None:
        for _ in range(n):
            q.put(BODY)
        for _ in range(n):
            q.get(timeout=5)

    report("put+get, blocking client", 2 * n, best(run))


def asynchronous(socket: str, n: int, backend: str, waiting: bool) -> None:
    async def run() -> None:
        async with brokerq.open_async_client(socket) as client:
            q = client.queue("a")
            for _ in range(n):
                await q.put(BODY)
            get: Callable[[], Awaitable[bytes]]
            get = (lambda: q.get(timeout=5)) if waiting else q.get_nowait
            for _ in range(n):
                await get()

    kind = "get(timeout=5)" if waiting else "get_nowait()"
    report(f"put+{kind}, async on {backend}", 2 * n, best(lambda: anyio.run(run, backend=backend)))


def fan_out(client: brokerq.Client, n: int, queues: int) -> None:
    topic = f"t{queues}"
    for i in range(queues):
        client.queue(f"{topic}-{i}").subscribe(topic)

    def run() -> None:
        for _ in range(n):
            client.publish(topic, BODY)
        for i in range(queues):
            client.queue(f"{topic}-{i}").purge()

    report(f"publish to {queues} durable subscriber(s)", n, best(run))


def live_fan_out(client: brokerq.Client, n: int, subscribers: int) -> None:
    subs = [client.subscribe("live") for _ in range(subscribers)]

    def run() -> None:
        def drain(sub: brokerq.Subscription) -> None:
            for _ in range(n):
                sub.get(timeout=30)

        threads = [threading.Thread(target=drain, args=(s,)) for s in subs]
        for t in threads:
            t.start()
        for _ in range(n):
            client.publish("live", BODY)
        for t in threads:
            t.join()

    report(f"publish to {subscribers} live subscribers (all read)", n, best(run))
    for sub in subs:
        sub.close()


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    with private_broker(journal=False) as client:
        blocking(client, n)
        for backend in ("trio", "asyncio"):
            asynchronous(client.socket_path, n, backend, waiting=False)
            asynchronous(client.socket_path, n, backend, waiting=True)
        for queues in (0, 1, 4, 16):
            fan_out(client, n, queues)
        live_fan_out(client, n, 4)


if __name__ == "__main__":
    main()
