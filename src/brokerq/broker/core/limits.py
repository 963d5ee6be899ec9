"""The defaults of the broker's limits (docs/usage.md, "Limits"); imports
nothing heavy: the broker reads it before trio."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Final

DEFAULT_MAX_CONNECTIONS: Final = 1024
DEFAULT_FRAME_TIMEOUT: Final = 30.0
DEFAULT_MAX_PIPELINED: Final = 1000
#: Off by default: a queue's ``max_bytes`` 0 means unlimited (design.md); the
#: total cap is what keeps the broker's memory bounded.
DEFAULT_MAX_QUEUE_BYTES: Final = 0
#: The total cap's default is the least of this and a quarter of the RAM.
TOTAL_BYTES_CEILING: Final = 1024 * 1024 * 1024
#: Replies of one connection buffered before they are written, whatever their count.
REPLY_BUFFER: Final = 1024 * 1024
#: File descriptors the broker keeps beyond its connections' (journal, log, lock, trio).
SPARE_FDS: Final = 64


def physical_memory() -> int | None:
    with contextlib.suppress(ValueError, OSError, AttributeError):
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        if pages > 0 and size > 0:
            return int(pages * size)
    return None


def default_max_total_bytes() -> int:
    """1 GiB, or a quarter of the RAM if less: every body is in the broker's
    memory and, with the journal beside the socket (a tmpfs, usually), in the
    journal too, which may grow to twice the live data before compaction."""
    ram = physical_memory()
    return TOTAL_BYTES_CEILING if ram is None else min(TOTAL_BYTES_CEILING, ram // 4)


def ensure_fd_limit(max_connections: int) -> None:
    """Raise the soft RLIMIT_NOFILE to serve ``max_connections``; if it cannot,
    warn: past it, new connections wait in the listen backlog (EMFILE)."""
    want = max_connections + SPARE_FDS
    with contextlib.suppress(ImportError, ValueError, OSError):  # (ImportError: not Unix)
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < want:
            new = want if hard == resource.RLIM_INFINITY else min(want, hard)
            if new > soft:
                resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            if new < want:
                logging.getLogger("brokerq.broker").warning(
                    "--max-connections %d needs about %d file descriptors; the limit is %d",
                    max_connections,
                    want,
                    new,
                )
