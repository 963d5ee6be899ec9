"""What the broker is to its connections (server.Broker adds the listener, so
that connections import nothing that imports them). A failed journal write
or fsync is fatal: the broker acknowledges nothing more and exits non-zero.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

import trio

from .. import protocol
from ..pause import pause
from ..protocol import PROTOCOL_VERSION
from ..version import __version__
from .config import BrokerConfig
from .core import BrokerCore
from .journal import Journal, JournalFailed
from .wakeup import wake_all

if TYPE_CHECKING:
    import outcome  # trio's

log = logging.getLogger("brokerq.broker")

#: How long, at most, the event loop waits for a sync's thread to take it up.
SYNC_HANDOFF_SECONDS: Final = 0.001
#: A sync due after another starts once the event loop is idle, or after this many passes.
SYNC_DEFER_PASSES: Final = 4
#: The journal is compacted once it is over twice the live data and this.
COMPACT_MIN_BYTES: Final = 1024 * 1024
#: Live data compacted at once, blocking, at start and exit; past it, one at start
#: runs in a thread, one at exit is left to the next broker.
COMPACT_AT_ONCE_MAX_BYTES: Final = 4 * COMPACT_MIN_BYTES


class BrokerBase:
    """``core`` and ``journal`` come replayed; ``clock`` is the core's wall clock."""

    log = log
    _nursery: trio.Nursery  # (set by Broker.serve)

    def __init__(
        self,
        config: BrokerConfig,
        core: BrokerCore | None = None,
        journal: Journal | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.core = core or config.new_core()
        self.core.max_queue_bytes = config.max_queue_bytes
        self.core.max_total_bytes = config.max_total_bytes
        self.journal = journal
        if journal is not None:
            self.core.write = journal.append
        self.clock = clock
        self.max_frame_size = protocol.max_frame_size(config.max_message_size)
        self.pid = os.getpid()  # (asked once: a broker does not fork after it is made)
        self.connections = self.busy_total = 0  # (busy: refused for --max-connections)
        self.started_at = 0.0
        self.closing = False
        self.failure: str | None = None
        self._stop_requested = trio.Event()
        # Group commit: set and replaced as each sync ends; whether one runs,
        # one is due once the loop is idle, compaction holds it back; the offset
        # the waiting puts need synced, and for how many passes one was due.
        self._synced = trio.Event()
        self._committing = self._sync_due = self._syncs_held = False
        self._sync_wanted = self._sync_due_passes = 0
        self._token: trio.lowlevel.TrioToken | None = None
        self._timers_changed = trio.Event()
        self._timer_at = math.inf

    def request_stop(self, why: str) -> None:
        if not self._stop_requested.is_set():
            log.info("stopping: %s", why)
            self._stop_requested.set()

    def fail(self, reason: str) -> None:
        if self.failure is None:
            self.failure = reason
            log.critical("fatal: %s", reason)
        self._synced.set()  # waiting puts wake up and see the failure
        self.request_stop("the journal failed")

    def start_task(self, fn: Callable[[], Awaitable[object]]) -> None:
        self._nursery.start_soon(fn)

    def stats(self) -> dict[str, Any]:
        journal = self.journal
        return {
            "pid": self.pid,
            "version": __version__,
            "protocol": PROTOCOL_VERSION,
            "uptime_s": trio.current_time() - self.started_at,
            "connections": self.connections,
            "max_message_size": self.config.max_message_size,
            "idle_exit_s": None if math.isinf(self.config.idle_exit) else self.config.idle_exit,
            "max_deliveries": self.core.max_deliveries,
            "lease_s": self.core.default_lease,
            "journal": None if journal is None else journal.path,
            "journal_bytes": 0 if journal is None else journal.size,
            "fsync": None if journal is None else journal.fsync,
            "fsync_skipped_on_tmpfs": journal is not None and journal.in_memory,
            "subscriber_buffer": self.config.subscriber_buffer,
            "max_connections": self.config.max_connections,
            "busy_total": self.busy_total,
            "frame_timeout_s": self.config.frame_seconds,
            "max_pipelined": self.config.max_pipelined,
            "max_queue_bytes": self.config.max_queue_bytes,
            "max_total_bytes": self.config.max_total_bytes,
            "held_bytes": self.core.live_bytes,
            "socket_activated": self.config.activated,
            **self.core.totals(),
            "topics": self.core.topics.stats(),
        }

    async def wait_synced(self, lsn: int) -> None:
        """Group commit: a put that finds no sync running or due starts one; those written
        while one runs share the next, once the event loop is idle (docs/performance.md)."""
        journal = self.journal
        assert journal is not None
        self._sync_wanted = max(self._sync_wanted, lsn)
        while journal.synced < lsn:
            if self.failure is not None:
                raise JournalFailed(self.failure)
            if not (self._committing or self._sync_due or self._syncs_held):
                self._start_sync()
            await self._synced.wait()

    def start_due_sync(self, timeout: float) -> None:
        """Start the sync due if the loop is idle (``timeout`` > 0), or was not for long."""
        if not self._sync_due or self._syncs_held or self.failure is not None:
            return
        if timeout <= 0 and self._sync_due_passes < SYNC_DEFER_PASSES:
            self._sync_due_passes += 1
            return
        self._start_sync()

    def _start_sync(self) -> None:
        """Run ``journal.sync`` in a thread; the loop waits for it to start: running Python
        on, it would hold the GIL and the CPU the thread needs to reach its syscall."""
        journal, token = self.journal, self._token
        assert journal is not None
        assert token is not None
        self._sync_due, self._sync_due_passes = False, 0
        self._committing = True
        sync = journal.sync
        taken = threading.Lock()
        taken.acquire()

        def run() -> int:  # in the worker thread
            taken.release()
            return sync()

        def deliver(result: outcome.Outcome[int]) -> None:  # in the worker thread
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(self._sync_done, result)

        try:
            trio.lowlevel.start_thread_soon(run, deliver)
        except Exception as exc:  # no thread could be started, say: as fatal
            self._committing = False
            self.fail(f"could not start a sync: {exc!r}")
            return
        taken.acquire(timeout=SYNC_HANDOFF_SECONDS)

    def _sync_done(self, result: outcome.Outcome[int]) -> None:
        journal = self.journal
        assert journal is not None
        self._committing = False
        try:
            result.unwrap()
        except Exception as exc:  # JournalFailed; anything else is as fatal
            self.fail(str(exc) if isinstance(exc, JournalFailed) else f"sync failed: {exc!r}")
            return
        if self._sync_wanted > journal.synced:
            self._sync_due = True
        self._wake_sync_waiters()

    def _wake_sync_waiters(self) -> None:
        done, self._synced = self._synced, trio.Event()
        done.set()

    def _should_compact(self) -> bool:
        journal = self.journal
        if journal is None or journal.compacting or journal.failed:
            return False
        return journal.size > COMPACT_MIN_BYTES and journal.size > 2 * self.core.snapshot_size()

    async def _compact(self) -> None:
        journal = self.journal
        assert journal is not None
        before = journal.size
        compaction = journal.begin_compaction(self.core.snapshot())
        try:
            await trio.to_thread.run_sync(compaction.write_snapshot)
            # A sync in its thread must not see the swap: hold the next one back
            # (under load one is due whenever one ends), and let the running one end.
            self._syncs_held = True
            while self._committing:
                await self._synced.wait()
            compaction.finish()  # inline: no sync starts until it is done
        except OSError as exc:
            compaction.abandon()
            log.warning("journal compaction failed (the old journal stays): %s", exc)
            return
        except BaseException:  # cancelled: the broker stops, and the old journal stays
            compaction.abandon()
            raise
        finally:
            if self._syncs_held:  # finish synced all that was written: wake the waiters
                self._syncs_held = False
                self._wake_sync_waiters()
        log.info("compacted the journal from %d to %d bytes", before, journal.size)

    def _compact_at_once(self, when: str) -> bool:
        """Only while nothing is served; False if the live data is too large for it."""
        journal = self.journal
        assert journal is not None
        if self.core.snapshot_size() > COMPACT_AT_ONCE_MAX_BYTES:
            return False
        before = journal.size
        try:
            journal.compact(self.core.snapshot())
        except OSError as exc:
            log.warning("journal compaction %s failed (the old journal stays): %s", when, exc)
            return True
        log.info("compacted the journal %s from %d to %d bytes", when, before, journal.size)
        return True

    def after_request(self) -> None:
        """Admit parked puts where room was freed, wake joins done and the timer task."""
        if self.core.freed:
            pause("broker.put_room")
            if woken := self.core.admit_freed(self.clock()):
                pause("broker.put_admitted")
            wake_all(woken)
        wake_all(self.core.joins_done())  # (nothing to do while nobody joins)
        deadline = self.core.next_deadline()
        if deadline is not None and deadline < self._timer_at:
            self._timers_changed.set()

    async def _run_timers(self) -> None:
        while True:
            deadline = self.core.next_deadline()
            self._timer_at = math.inf if deadline is None else deadline
            with trio.move_on_after(max(0.0, self._timer_at - self.clock())):
                await self._timers_changed.wait()
            self._timers_changed = trio.Event()
            try:
                wake_all(self.core.tick(self.clock()))
                wake_all(self.core.admit_freed(self.clock()))
                wake_all(self.core.joins_done())  # expired or dead-lettered messages
            except JournalFailed as exc:
                self.fail(str(exc))


class SyncWhenIdle(trio.abc.Instrument):
    def __init__(self, broker: BrokerBase) -> None:
        self.broker = broker

    def before_io_wait(self, timeout: float) -> None:
        self.broker.start_due_sync(timeout)
