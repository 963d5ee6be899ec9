"""The journal: an append-only file of records (journal_file.py: its format
and reading it back), replayed at start.

Writing (:class:`Journal`): each record is written with one ``write()``
before the broker acknowledges anything. ``fsync`` is ``never`` (the page
cache only: survives a broker crash, not a power loss), ``always`` (a sync
inside every append) or ``batch`` (the broker calls :meth:`Journal.sync`,
in a thread, for the puts waiting for one, and their replies wait for it:
group commit; the puts that arrive while it runs share the next one). A
full disk (ENOSPC) cuts the partial record back off and raises
:class:`JournalFull`: that request fails, and nothing changed. Any other
write or sync error raises :class:`JournalFailed`: the broker must stop
acknowledging and exit, since the kernel may have dropped the unwritten
pages (fsync errors are not retryable).

**Preallocation** (docs/usage.md, "Preallocation"; only for a synced
journal): the file is extended ahead of its records (:func:`_allocate`),
so that an append neither grows the file nor allocates a block and a sync
is an ``fdatasync`` with no metadata to write. :attr:`Journal.size` is
where the records end, :attr:`Journal.allocated` the file's size.

Compaction rewrites the live state into a new file while appends go on:
the snapshot is written (then, if the journal preallocates, space after
it) and fsynced to ``<journal>.compact`` (in a thread), then the records
appended meanwhile are added, the file is fsynced, renamed
over the journal, and the directory is fsynced. A crash at any step leaves
either the old file or the new one, each complete (and maybe a stale
``<journal>.compact``, which the next :meth:`Journal.open` removes).
:meth:`Journal.compact` takes the same steps at once, for a broker that is
not serving (starting or exiting).

Plain blocking file I/O, no trio.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import sys
from typing import Final

from ..errors import BrokerqError, Full
from .core.records import AnyRecord
from .journal_file import FILE_HEADER, ReadResult, encode_record, file_header, read_journal

__all__ = ["Journal", "JournalFailed", "JournalFull", "journal_path", "read_journal"]

log = logging.getLogger("brokerq.journal")

FSYNC_MODES: Final = ("never", "batch", "always")
#: Preallocation steps: as much again as the records hold, within these bounds.
#: (Each step's zeros are written in the event loop and flushed by the next
#: sync: 8 MiB cost about 2 + 5 ms on the test machine, 64 MiB 17 + 29 ms.)
PREALLOCATE_MIN: Final = 1024 * 1024
PREALLOCATE_MAX: Final = 8 * 1024 * 1024
_ZERO_CHUNK: Final = 1024 * 1024


class JournalFull(Full):
    """The disk is full: the record was not written and the request fails."""

    code = "full"


class JournalFailed(BrokerqError):
    """A write or fsync failed: the journal can no longer be trusted."""

    code = "internal"


def journal_path(socket_path: str, data_dir: str | None) -> str:
    """``<socket>.journal``, or ``<data_dir>/<socket name>-<hash>.journal``.

    In a data directory the name carries a hash of the whole socket path,
    so brokers of two sockets named alike never share a journal.
    """
    if data_dir is None:
        return socket_path + ".journal"
    digest = hashlib.sha256(os.fsencode(socket_path)).hexdigest()[:12]
    return os.path.join(data_dir, f"{os.path.basename(socket_path)}-{digest}.journal")


#: fdatasync(2): Linux and most Unixes; not macOS, which keeps fsync.
_HAS_FDATASYNC: Final = hasattr(os, "fdatasync")

_MEMORY_FILESYSTEMS: Final = {0x01021994, 0x858458F6}  # Linux TMPFS_MAGIC, RAMFS_MAGIC


def in_memory_filesystem(path: str) -> bool:
    """True if ``path`` is on a tmpfs or ramfs (Linux), where fsync cannot add
    durability: the data is in memory either way and goes with a reboot."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    buffer = ctypes.create_string_buffer(256)  # struct statfs; f_type comes first
    if libc.statfs(os.fsencode(path), buffer) != 0:
        return False
    f_type = ctypes.c_long.from_buffer(buffer).value & 0xFFFFFFFF
    return f_type in _MEMORY_FILESYSTEMS


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_directory(path: str) -> None:
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _preallocation_step(size: int) -> int:
    """How far ahead of ``size`` bytes of records to allocate: as much again, within bounds."""
    return min(max(size, PREALLOCATE_MIN), PREALLOCATE_MAX)


def _allocate(fd: int, offset: int, length: int) -> OSError | None:
    """Allocate ``length`` bytes at ``offset`` and write zeros there; the error,
    if any, instead of raising it (the caller goes on without).

    Zeros over the ``posix_fallocate``'d space: on ext4 a block allocated
    and never written costs every sync into it a conversion in the
    filesystem's journal (docs/performance.md, "Tried, not kept").
    """
    try:
        if hasattr(os, "posix_fallocate"):
            try:
                os.posix_fallocate(fd, offset, length)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
        zeros = bytes(min(length, _ZERO_CHUNK))
        done = 0
        while done < length:
            done += os.pwrite(fd, zeros[: length - done], offset + done)
    except OSError as exc:
        return exc
    return None


class Journal:
    """The open journal file (see the module doc)."""

    def __init__(self, path: str, fsync: str = "batch", *, preallocate: bool = False) -> None:
        if fsync not in FSYNC_MODES:
            raise ValueError(f"fsync must be one of {FSYNC_MODES}, not {fsync!r}")
        self.path = path
        self.fsync = fsync
        self.fd = -1
        #: Bytes appended since open ("log sequence numbers"), and how many are synced.
        self.written = 0
        self.synced = 0
        #: Where the records end (the next append's offset), and the file's size,
        #: which preallocation keeps ahead of it (the zero tail).
        self.size = 0
        self.allocated = 0
        self.failed: str | None = None
        #: On a tmpfs or ramfs, where an fsync cannot make anything more durable.
        self.in_memory = False
        #: Asked to preallocate; :attr:`preallocating` says whether it does.
        self.preallocate = preallocate
        #: No new allocation is tried before the records reach this (after one
        #: failed for lack of space).
        self._allocate_again_at = 0
        self._compaction: Compaction | None = None

    @classmethod
    def open(
        cls, path: str, fsync: str = "batch", *, repair: bool = False, preallocate: bool = False
    ) -> tuple[Journal, ReadResult]:
        """Read the journal at ``path``, cut a torn tail off, and open it for appends.

        ``preallocate``: allocate space ahead of the records, if the journal
        is synced (see the module doc); else a zero tail found is cut off.
        """
        result = read_journal(path, repair=repair)
        journal = cls(path, fsync, preallocate=preallocate)
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        journal.fd = os.open(path, flags, 0o600)
        journal._remove_stale_compaction()
        if fsync != "never" and in_memory_filesystem(path):
            log.info("journal %s is on a tmpfs: fsync adds nothing there, so it is skipped", path)
            journal.in_memory = True
        if result.torn:
            log.warning("journal %s: cut off a torn tail (%s)", path, result.torn)
        if result.repaired:
            log.warning("journal %s: --repair %s", path, result.repaired)
        if result.end == 0:
            os.ftruncate(journal.fd, 0)
            _write_all(journal.fd, file_header())
            result.end = FILE_HEADER.size
        elif result.torn or result.repaired or not journal.preallocating:
            os.ftruncate(journal.fd, result.end)  # (a zero tail is kept to append into)
        os.lseek(journal.fd, result.end, os.SEEK_SET)
        journal.size = result.end
        journal.allocated = os.fstat(journal.fd).st_size
        if journal.preallocating:
            journal._reserve(1)
        os.fsync(journal.fd)
        _fsync_directory(path)  # a new file's name must survive a power loss too
        return journal, result

    def _remove_stale_compaction(self) -> None:
        """Unlink a ``<journal>.compact`` left by a broker that died while compacting.

        It never became the journal (a finished compaction renames it away), and
        only the broker holding the lock, which opens the journal, writes it.
        """
        stale = self.path + ".compact"
        with contextlib.suppress(FileNotFoundError):
            size = os.lstat(stale).st_size
            os.unlink(stale)
            log.info(
                "journal %s: removed %s (%d bytes) of an unfinished compaction",
                self.path,
                stale,
                size,
            )

    @property
    def syncs(self) -> str:
        """The fsync mode in effect: ``never`` on a tmpfs, whatever was asked."""
        return "never" if self.in_memory else self.fsync

    @property
    def preallocating(self) -> bool:
        """Whether space is allocated ahead of the records: asked for, and synced."""
        return self.preallocate and self.syncs != "never"

    def _reserve(self, length: int) -> None:
        """Make sure ``length`` more bytes fit in the allocated space, allocating
        ahead if not (see the module doc). If that fails (no space, or not
        supported), appends go on without: they extend the file, as without
        preallocation, and a full disk shows as :class:`JournalFull` then.
        """
        if self.size + length <= self.allocated or self.size < self._allocate_again_at:
            return
        target = self.size + length + _preallocation_step(self.size)
        error = _allocate(self.fd, self.allocated, target - self.allocated)
        if error is None:
            self.allocated = target
            return
        # Part of it may have been allocated: what the file's size says is zeros.
        with contextlib.suppress(OSError):
            self.allocated = max(self.size, os.fstat(self.fd).st_size)
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            self._allocate_again_at = self.size + PREALLOCATE_MIN
            log.warning("journal %s: cannot allocate ahead (%s)", self.path, error)
        else:
            self.preallocate = False
            log.warning(
                "journal %s: cannot allocate ahead (%s); appending without", self.path, error
            )

    def append(self, record: AnyRecord) -> None:
        """Write one record (and sync it, with ``always``). See the module doc."""
        self._check_failed()
        frame = encode_record(record)
        if self.preallocating:
            self._reserve(len(frame))
        try:
            _write_all(self.fd, frame)
        except OSError as exc:
            self._undo_partial_write(exc)
        self.size += len(frame)
        self.allocated = max(self.allocated, self.size)
        self.written += len(frame)
        if self._compaction is not None:
            self._compaction.tail += frame
        if self.syncs == "always":
            self.sync()

    def _undo_partial_write(self, exc: OSError) -> None:
        try:
            os.ftruncate(self.fd, self.size)  # (and the space allocated ahead)
            os.lseek(self.fd, self.size, os.SEEK_SET)
            self.allocated = self.size
        except OSError as undo:
            self._fail(f"write failed ({exc}) and could not be undone ({undo})")
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise JournalFull(
                f"the journal's disk is full ({self.path}): nothing was written"
            ) from exc
        self._fail(f"write failed: {exc}")

    def sync(self) -> int:
        """Sync what was written so far; returns how many bytes are now synced.

        An ``fdatasync`` when preallocating (the file's size stays), else an
        ``fsync``. Safe to call from a worker thread while the owner appends.
        """
        self._check_failed()
        target = self.written
        try:
            if self.preallocating and _HAS_FDATASYNC:
                os.fdatasync(self.fd)
            else:
                os.fsync(self.fd)
        except OSError as exc:
            self._fail(f"fsync failed: {exc}")
        self.synced = max(self.synced, target)
        return self.synced

    def _check_failed(self) -> None:
        if self.failed:
            raise JournalFailed(f"the journal failed earlier: {self.failed}")

    def _fail(self, reason: str) -> None:
        self.failed = reason
        log.critical("journal %s: %s", self.path, reason)
        raise JournalFailed(f"journal {self.path}: {reason}")

    def close(self) -> None:
        if self.fd >= 0:
            if self.fsync != "never" and not self.failed:
                with contextlib.suppress(OSError):
                    os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1

    # -- compaction ------------------------------------------------------------

    @property
    def compacting(self) -> bool:
        return self._compaction is not None

    def begin_compaction(self, snapshot: list[AnyRecord]) -> Compaction:
        """Start rewriting the live state; appends are copied until :meth:`Compaction.finish`."""
        assert self._compaction is None, "one compaction at a time"
        self._compaction = Compaction(self, snapshot)
        return self._compaction

    def compact(self, snapshot: list[AnyRecord]) -> None:
        """Rewrite the journal to ``snapshot`` at once, blocking, with no appends meanwhile.

        The same steps as a compaction in the background; on an error the old
        journal stays (or, past the rename, the new one is in use) and it is raised.
        """
        compaction = self.begin_compaction(snapshot)
        try:
            compaction.write_snapshot()
            compaction.finish()
        except BaseException:
            compaction.abandon()
            raise


class Compaction:
    """One rewrite of the journal (see the module doc for the steps)."""

    def __init__(self, journal: Journal, snapshot: list[AnyRecord]) -> None:
        self.journal = journal
        self.snapshot = snapshot
        self.tmp_path = journal.path + ".compact"
        self.tail = bytearray()
        self.fd = -1
        self.size = 0
        self.allocated = 0

    def write_snapshot(self) -> None:
        """Write and fsync the snapshot to the temporary file (may run in a thread),
        with space allocated after it if the journal preallocates."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
        self.fd = os.open(self.tmp_path, flags, 0o600)
        out = bytearray(file_header())
        for record in self.snapshot:
            out += encode_record(record)
        self.snapshot = []
        _write_all(self.fd, out)
        self.size = self.allocated = len(out)
        if self.journal.preallocating:
            step = _preallocation_step(self.size)
            if _allocate(self.fd, self.size, step) is None:
                self.allocated = self.size + step
            else:  # appends will allocate again, or go on without
                self.allocated = max(self.size, os.fstat(self.fd).st_size)
        os.fsync(self.fd)

    def finish(self) -> None:
        """Add the records appended meanwhile, fsync, rename over the journal, fsync the dir."""
        journal = self.journal
        _write_all(self.fd, self.tail)
        os.fsync(self.fd)
        self.size += len(self.tail)
        os.rename(self.tmp_path, journal.path)
        # From here on the new file is the journal: append to it, whatever
        # the directory fsync says.
        old_fd, journal.fd = journal.fd, self.fd
        journal.size = self.size
        journal.allocated = max(self.allocated, self.size)
        journal.synced = journal.written
        journal._compaction = None
        self.fd = -1
        os.close(old_fd)
        _fsync_directory(journal.path)

    def abandon(self) -> None:
        """Give up (an error in a step): the old journal stays as it was.

        After the rename there is nothing to undo: the new file is in use.
        """
        if self.journal._compaction is not self:
            return
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        with contextlib.suppress(OSError):
            os.unlink(self.tmp_path)
        self.journal._compaction = None
