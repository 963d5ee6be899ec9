"""The journal: an append-only file of records (journal_file.py), with blocking I/O.

A record is written with one ``write()`` before anything is acknowledged. A
full disk cuts the partial record back off (:class:`JournalFull`: that request
fails); any other write or sync error is :class:`JournalFailed`: the broker
must exit, since the kernel may have dropped the unwritten pages. A synced
journal is preallocated, so that a sync is an ``fdatasync`` with no metadata.
Compaction writes the live state to ``<journal>.compact``, adds the records
appended meanwhile, fsyncs, renames it over the journal and fsyncs the
directory: a crash at any step leaves the old file or the new one, complete.
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
#: Preallocation steps (zeros written in the event loop: 8 MiB cost about 2 + 5 ms).
PREALLOCATE_MIN: Final = 1024 * 1024
PREALLOCATE_MAX: Final = 8 * 1024 * 1024
_ZERO_CHUNK: Final = 1024 * 1024


class JournalFull(Full):
    code = "full"  # the disk is full: the record was not written and the request fails


class JournalFailed(BrokerqError):
    code = "internal"  # a write or fsync failed: the journal can no longer be trusted


def journal_path(socket_path: str, data_dir: str | None) -> str:
    """The hash of the whole socket path keeps brokers of sockets named alike apart."""
    if data_dir is None:
        return socket_path + ".journal"
    digest = hashlib.sha256(os.fsencode(socket_path)).hexdigest()[:12]
    return os.path.join(data_dir, f"{os.path.basename(socket_path)}-{digest}.journal")


_HAS_FDATASYNC: Final = hasattr(os, "fdatasync")  # not macOS, which keeps fsync

_MEMORY_FILESYSTEMS: Final = {0x01021994, 0x858458F6}  # Linux TMPFS_MAGIC, RAMFS_MAGIC


def in_memory_filesystem(path: str) -> bool:
    """On a tmpfs or ramfs (Linux) fsync adds no durability: the data goes with a reboot."""
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
        view = view[os.write(fd, view) :]


def _fsync_directory(path: str) -> None:
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _preallocation_step(size: int) -> int:
    """As much again as ``size`` bytes of records, within bounds."""
    return min(max(size, PREALLOCATE_MIN), PREALLOCATE_MAX)


def _allocate(fd: int, offset: int, length: int) -> OSError | None:
    """Allocate and zero ``length`` bytes at ``offset``; returns the error, if any.
    Zeros: on ext4 an unwritten block costs every sync into it a conversion."""
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
    def __init__(self, path: str, fsync: str = "batch", *, preallocate: bool = False) -> None:
        if fsync not in FSYNC_MODES:
            raise ValueError(f"fsync must be one of {FSYNC_MODES}, not {fsync!r}")
        self.path = path
        self.fsync = fsync
        self.fd = -1
        self.written = self.synced = 0  # bytes appended since open (LSNs), and synced
        self.size = self.allocated = 0  # where the records end, and the file's size
        self.failed: str | None = None
        self.in_memory = False  # on a tmpfs or ramfs
        self.preallocate = preallocate
        self._allocate_again_at = 0  # after a failure for lack of space, none before this
        self._compaction: Compaction | None = None

    @classmethod
    def open(
        cls, path: str, fsync: str = "batch", *, repair: bool = False, preallocate: bool = False
    ) -> tuple[Journal, ReadResult]:
        result = read_journal(path, repair=repair)
        journal = cls(path, fsync, preallocate=preallocate)
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        journal.fd = os.open(path, flags, 0o600)
        # A ``.compact`` left by a broker that died compacting never became the
        # journal, and only the lock holder, which opens the journal, writes it.
        stale = path + ".compact"
        with contextlib.suppress(FileNotFoundError):
            size = os.lstat(stale).st_size
            os.unlink(stale)
            what = "journal %s: removed %s (%d bytes) of an unfinished compaction"
            log.info(what, path, stale, size)
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

    @property
    def syncs(self) -> str:
        """The fsync mode in effect: ``never`` on a tmpfs, whatever was asked."""
        return "never" if self.in_memory else self.fsync

    @property
    def preallocating(self) -> bool:
        return self.preallocate and self.syncs != "never"

    def _reserve(self, length: int) -> None:
        """Make room for ``length`` more bytes; if that fails, appends extend the file."""
        if self.size + length <= self.allocated or self.size < self._allocate_again_at:
            return
        target = self.size + length + _preallocation_step(self.size)
        if (error := _allocate(self.fd, self.allocated, target - self.allocated)) is None:
            self.allocated = target
            return
        # Part of it may have been allocated: what the file's size says is zeros.
        with contextlib.suppress(OSError):
            self.allocated = max(self.size, os.fstat(self.fd).st_size)
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            self._allocate_again_at = self.size + PREALLOCATE_MIN
            then = ""
        else:
            self.preallocate = False
            then = "; appending without"
        log.warning("journal %s: cannot allocate ahead (%s)%s", self.path, error, then)

    def append(self, record: AnyRecord) -> None:
        self._check_failed()
        frame = encode_record(record)
        if self.preallocating:
            self._reserve(len(frame))
        try:
            _write_all(self.fd, frame)
        except OSError as exc:
            try:
                os.ftruncate(self.fd, self.size)  # (and the space allocated ahead)
                os.lseek(self.fd, self.size, os.SEEK_SET)
                self.allocated = self.size
            except OSError as undo:
                self._fail(f"write failed ({exc}) and could not be undone ({undo})")
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                message = f"the journal's disk is full ({self.path}): nothing was written"
                raise JournalFull(message) from exc
            self._fail(f"write failed: {exc}")
        self.size += len(frame)
        self.allocated = max(self.allocated, self.size)
        self.written += len(frame)
        if self._compaction is not None:
            self._compaction.tail += frame
        if self.syncs == "always":
            self.sync()

    def sync(self) -> int:
        """Returns how many bytes are synced; safe in a thread while the owner appends."""
        self._check_failed()
        target = self.written
        sync = os.fdatasync if self.preallocating and _HAS_FDATASYNC else os.fsync
        try:
            sync(self.fd)
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

    @property
    def compacting(self) -> bool:
        return self._compaction is not None

    def begin_compaction(self, snapshot: list[AnyRecord]) -> Compaction:
        assert self._compaction is None, "one compaction at a time"
        self._compaction = Compaction(self, snapshot)
        return self._compaction

    def compact(self, snapshot: list[AnyRecord]) -> None:
        """Rewrite the journal to ``snapshot`` at once, blocking, with no appends meanwhile."""
        compaction = self.begin_compaction(snapshot)
        try:
            compaction.write_snapshot()
            compaction.finish()
        except BaseException:
            compaction.abandon()
            raise


class Compaction:
    """One rewrite of the journal; appends are copied to it until :meth:`finish`."""

    def __init__(self, journal: Journal, snapshot: list[AnyRecord]) -> None:
        self.journal = journal
        self.snapshot = snapshot
        self.tmp_path = journal.path + ".compact"
        self.tail = bytearray()
        self.fd = -1
        self.size = self.allocated = 0

    def write_snapshot(self) -> None:
        """Write and fsync the snapshot to the temporary file (may run in a thread)."""
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
        journal = self.journal
        _write_all(self.fd, self.tail)
        os.fsync(self.fd)
        self.size += len(self.tail)
        os.rename(self.tmp_path, journal.path)
        # The new file is the journal now, whatever the directory fsync says.
        old_fd, journal.fd = journal.fd, self.fd
        journal.size = self.size
        journal.allocated = max(self.allocated, self.size)
        journal.synced = journal.written
        journal._compaction = None
        self.fd = -1
        os.close(old_fd)
        _fsync_directory(journal.path)

    def abandon(self) -> None:
        """Give up after an error: the old journal stays (after the rename, the new one)."""
        if self.journal._compaction is not self:
            return
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        with contextlib.suppress(OSError):
            os.unlink(self.tmp_path)
        self.journal._compaction = None
