"""Growth: what a put or a get costs as a queue gets deep and as gets park.

    .venv/bin/python bench/growth.py [--quick]

One broker of its own (``--no-journal``, so the core is what is measured;
see benchlib.py), one request at a time from a blocking client, medians of
interleaved rounds. ``--quick`` stops at 100,000 messages and 300 parked
gets. Runs in about a minute (``--quick``: under 30 s).

1. **Depth**: the cost of a put and of a get on a queue holding 0, 1k, 10k,
   100k and 1M ready messages of 100 B, beside the same on an empty queue of
   the same broker at the same moment (so that the broker's size alone, its
   garbage collector say, shows apart from the queue's depth).
2. **Messages that come back, and ttls, in a deep queue**: how long the
   broker stalls (the longest ping round trip meanwhile) when one delayed
   message becomes ready with older and newer messages queued (it goes to
   its place by id, in the middle), and when 100 messages with a ttl
   expire at the back of the queue.
3. **Parked gets**: the cost of a put+get pair on one queue while 0, 10, 100,
   1000 gets (raw connections, ``timeout`` 600 s) are parked on other
   queues; and of a put handed straight to one of N gets parked on the same
   queue (each connection pipelines its next gets, so it parks again at
   the back of the line as soon as it is served).

What core.py says (BrokerCore, ReadyList in ready.py; n = ready messages of
the queue, p = priority levels in use in it, t = timer heap entries):

* put, put_many (per message), get, get_many (per message), reserve: O(1)
  amortized: a deque per priority; a new or emptied level costs O(p)
  (``bisect.insort`` / ``list.remove`` on the sorted levels). The put key
  window is a dict plus a deque: O(1).
* a put handed to a parked get, parking a get, withdrawing it: O(1)
  (an ``OrderedDict`` of waiters per queue).
* delay, ttl, lease (reserve), touch: O(log t), a ``heapq`` push each; the
  timers fire lazily, stale entries (a touched lease, an acked message)
  stay in the heap until they come due.
* a message coming back to the ready list (release, lease expiry, a delayed
  message coming due, kick): O(log r), a heap push (r: messages come back
  and not yet delivered; ready.py). Section 2 measures the case that was a
  walk before: one landing in the middle of a deep queue.
* ttl expiry of a ready message: O(1), removed lazily (its entry is
  dropped when it reaches the head): section 2.
* stats of a queue: O(1); the broker's stats: O(queues). purge: O(n).
  delete of a queue: O(its messages + every lease and delayed message of
  the broker).
"""

from __future__ import annotations

import argparse
import contextlib
import selectors
import statistics
import threading
import time
from collections.abc import Callable, Iterator

from benchlib import BODY, Broker, RawConnection, fill, per_op, put_get_pairs, raise_fd_limit

import brokerq
from brokerq import protocol

PARK_TIMEOUT = 600.0


def puts(queue: brokerq.Queue, n: int) -> Callable[[], int]:
    def run() -> int:
        for _ in range(n):
            queue.put(BODY)
        return n

    return run


def gets(queue: brokerq.Queue, n: int) -> Callable[[], int]:
    def run() -> int:
        for _ in range(n):
            queue.get(timeout=10)
        return n

    return run


def longest_ping(client: brokerq.Client, until: Callable[[], bool], at_least: float) -> float:
    """Ping for ``at_least`` seconds and until ``until()`` (itself a request,
    also timed); the longest round trip."""
    longest = 0.0
    end = time.monotonic() + at_least
    while True:
        start = time.perf_counter()
        client.ping()
        done = time.monotonic() >= end and until()
        longest = max(longest, (time.perf_counter() - start) / (2 if done else 1))
        if done:
            return longest
        time.sleep(0.001)


def size_passes(queue: brokerq.Queue, target: int) -> Callable[[], bool]:
    """A test that ``queue``'s ready count has reached ``target`` (from below or above)."""
    start = queue.qsize()
    if target >= start:
        return lambda: queue.qsize() >= target
    return lambda: queue.qsize() <= target


def depth_rows(
    client: brokerq.Client, depths: list[int], n: int, rounds: int
) -> Iterator[dict[str, float]]:
    deep, control = client.queue("deep"), client.queue("control")
    pinger = brokerq.Client(client.socket_path, 120.0)
    try:
        for depth in depths:
            fill(deep, depth - deep.qsize())
            times: dict[str, list[float]] = {"put": [], "get": [], "cput": [], "cget": []}
            for i in range(rounds):  # the deep and the empty queue go first in turn
                for queue, put_key, get_key in [(deep, "put", "get"), (control, "cput", "cget")][
                    :: 1 if i % 2 else -1
                ]:
                    times[put_key].append(per_op(puts(queue, n), 1))
                    times[get_key].append(per_op(gets(queue, n), 1))
            row = {k: statistics.median(v) for k, v in times.items()}
            row["depth"] = deep.qsize()
            # One delayed message, due among older and newer ones.
            deep.put(b"delayed", delay=0.3)
            deep.put(BODY)
            row["delayed_stall"] = longest_ping(pinger, size_passes(deep, deep.qsize() + 1), 0.5)
            # 100 messages with a ttl, behind all the others.
            deep.put_many([BODY] * 100, ttl=0.3)
            row["ttl_stall"] = longest_ping(pinger, size_passes(deep, deep.qsize() - 100), 0.5)
            # The quiet baseline: pings with nothing due.
            row["idle_ping"] = longest_ping(pinger, lambda: True, 0.3)
            yield row
    finally:
        pinger.close()


@contextlib.contextmanager
def parked(
    socket_path: str, count: int, queue: Callable[[int], str], gets_each: int
) -> Iterator[list[RawConnection]]:
    """``count`` raw connections, each with ``gets_each`` gets sent (the first
    parks, the next parks again once it is served); a thread reads and drops
    their replies, so that none of them blocks the broker's writes."""
    conns: list[RawConnection] = []
    stop = threading.Event()
    selector = selectors.DefaultSelector()
    drain = threading.Thread(target=_drain, args=(selector, stop), daemon=True)
    try:
        for i in range(count):
            conn = RawConnection(socket_path)
            conns.append(conn)
            conn.send(
                *(
                    protocol.Get(id=conn.request_id(), queue=queue(i), timeout=PARK_TIMEOUT)
                    for _ in range(gets_each)
                )
            )
            conn.sock.setblocking(False)
            selector.register(conn.sock, selectors.EVENT_READ)
        drain.start()
        yield conns
    finally:
        stop.set()
        if drain.is_alive():
            drain.join()
        selector.close()
        for conn in conns:
            conn.close()


def _drain(selector: selectors.BaseSelector, stop: threading.Event) -> None:
    while not stop.is_set():
        for key, _ in selector.select(timeout=0.05):
            with contextlib.suppress(BlockingIOError):
                if not key.fileobj.recv(1 << 16):  # type: ignore[union-attr]
                    selector.unregister(key.fileobj)


def wait_waiters(client: brokerq.Client, name: str | None, count: int) -> None:
    """Until ``count`` gets are parked on queue ``name`` (None: on any queue)."""

    def waiters() -> int:
        stats = client.stats() if name is None else client.queue(name).stats()
        return int(stats["waiters"])

    deadline = time.monotonic() + 30
    while waiters() < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {waiters()} of {count} parked")
        time.sleep(0.01)


def waiter_rows(
    client: brokerq.Client, counts: list[int], n: int, rounds: int
) -> Iterator[tuple[int, float, float, int]]:
    """(parked gets, pair on another queue, put handed to one parked on it, left in it)."""
    path = client.socket_path
    measured = client.queue("measured")
    for count in counts:
        with parked(path, count, lambda i: f"w{i}", 1):
            wait_waiters(client, None, count)
            other = statistics.median(per_op(put_get_pairs(measured, n), 1) for _ in range(rounds))
        if count == 0:
            yield count, other, float("nan"), 0
            continue
        # Each of them served up to n * rounds / count times: a get more each, to park again.
        same = client.queue("same")
        gets_each = n * rounds // count + 2
        with parked(path, count, lambda i: "same", gets_each):
            wait_waiters(client, "same", count)
            handoff = statistics.median(per_op(puts(same, n), 1) for _ in range(rounds))
            left = same.qsize()
        same.purge()
        yield count, other, handoff, left


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts, under 30 s")
    args = parser.parse_args()
    if args.quick:
        depths, counts, n, rounds = [0, 1000, 10_000, 100_000], [0, 10, 100, 300], 500, 3
    else:
        depths = [0, 1000, 10_000, 100_000, 1_000_000]
        counts, n, rounds = [0, 10, 100, 1000], 1000, 5
    raise_fd_limit()
    started = time.perf_counter()
    with (
        Broker("--no-journal", "--idle-exit", "0") as broker,
        brokerq.Client(broker.socket_path, 120.0) as client,
    ):
        print("== 1/2. depth (us per request; stalls in ms: the longest ping meanwhile)")
        print(
            f"{'depth':>10} {'put':>7} {'get':>7} {'put':>7} {'get':>7} {'deep/empty':>10}"
            f" {'vs depth 0':>10} {'delayed lands':>14} {'100 ttls':>9} {'idle ping':>9}"
        )
        print(f"{'':>10} {'deep queue':^15} {'empty queue':^15}")
        first: float | None = None
        for row in depth_rows(client, depths, n, rounds):
            ratio = (row["put"] + row["get"]) / (row["cput"] + row["cget"])
            first = first or (row["put"] + row["get"])
            print(
                f"{row['depth']:>10,.0f} {row['put'] * 1e6:7.1f} {row['get'] * 1e6:7.1f}"
                f" {row['cput'] * 1e6:7.1f} {row['cget'] * 1e6:7.1f} {ratio:10.2f}"
                f" {(row['put'] + row['get']) / first:10.2f}"
                f" {row['delayed_stall'] * 1e3:14.1f} {row['ttl_stall'] * 1e3:9.1f}"
                f" {row['idle_ping'] * 1e3:9.1f}",
                flush=True,
            )
        client.queue("deep").purge()
        print("== 3. parked gets (us per request)")
        print(f"{'parked':>8} {'put+get, other queue':>21} {'put to a parked get':>20} {'left':>5}")
        for count, other, handoff, left in waiter_rows(client, counts, n, rounds):
            print(f"{count:>8,} {other * 1e6:21.1f} {handoff * 1e6:20.1f} {left:>5}", flush=True)
    print(f"(ran {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
