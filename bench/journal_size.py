"""The journal's size after many put/get cycles: compaction keeps it small.

    .venv/bin/python bench/journal_size.py [CYCLES]     (default 1,000,000)

Puts and gets CYCLES messages of 100 B through a private broker, in batches
of 100 (put_many / get_many), with the default journal (--fsync batch),
then prints the journal's size along the way and at the end. Without
compaction the file would hold every record ever written (about 140 B per
put and 15 B per get).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

import brokerq


def main() -> None:
    cycles = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    directory = tempfile.mkdtemp(prefix="bqsize", dir="/tmp")
    socket_path = os.path.join(directory, "b.sock")
    journal = socket_path + ".journal"
    body = b"x" * 100
    largest = 0
    try:
        with brokerq.connect(socket_path) as client:
            q = client.queue("q")
            start = time.perf_counter()
            for done in range(0, cycles, 100):
                q.put_many([body] * 100)
                got = 0
                while got < 100:
                    got += len(q.get_many(100 - got, timeout=5))
                size = os.path.getsize(journal)
                largest = max(largest, size)
                if done % 200_000 == 0:
                    print(f"{done:>9,} cycles: journal {size / 1e6:8.2f} MB", flush=True)
            elapsed = time.perf_counter() - start
            time.sleep(2.5)  # housekeeping compacts once a second
            final = os.path.getsize(journal)
            print(
                f"{cycles:,} put/get cycles in {elapsed:.1f} s ({cycles / elapsed:,.0f}/s); "
                f"journal at most {largest / 1e6:.2f} MB, {final / 1e3:.1f} kB at the end "
                f"(uncompacted it would be ~{cycles * 155 / 1e6:.0f} MB)"
            )
            client.stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
