"""The journal: file format, torn tails, corruption, compaction, disk faults.

Plain synchronous tests: a BrokerCore writes through a real Journal in a
temporary directory. A "crash" abandons the Journal (its descriptors are
closed, nothing more is written) and replays what is on disk; a power loss
also cuts off bytes written after the last fsync. Disk faults come from a
stand-in for ``os`` that only brokerq.broker.journal sees.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import shutil
import stat
import tempfile
from collections.abc import Callable
from typing import Any

import pytest

import brokerq
import brokerq.broker.journal as jmod
from brokerq.broker.core import BrokerCore
from brokerq.broker.core.records import (
    AnyRecord,
    AttemptsRecord,
    ConfigRecord,
    DeleteRecord,
    PutRecord,
    StateRecord,
)
from brokerq.broker.core.state import Message
from brokerq.broker.journal import Journal, JournalFailed, JournalFull, journal_path, read_journal
from brokerq.broker.journal_file import (
    FILE_HEADER,
    FORMAT_VERSION,
    MAGIC,
    RECORD_HEADER,
    RECORD_MARKER,
    JournalCorrupt,
    _checksum,
    encode_record,
)
from brokerq.errors import BrokerqError

#: The wall-clock time the scenarios end at and replays happen at.
NOW = 60.0
HEADER = FILE_HEADER.pack(MAGIC, FORMAT_VERSION)


# -- fixtures and helpers ----------------------------------------------------------


@pytest.fixture
def path(jdir: str) -> str:
    return os.path.join(jdir, "b.sock.journal")


class FaultyOs:
    """Stands in for ``os`` inside brokerq.broker.journal; ``write``/``fsync`` can be hooked."""

    def __init__(self) -> None:
        self.on_write: Callable[[int, Any], int] | None = None
        self.on_fsync: Callable[[int], None] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def write(self, fd: int, data: Any) -> int:
        if self.on_write is not None:
            return self.on_write(fd, data)
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        if self.on_fsync is not None:
            self.on_fsync(fd)
        else:
            os.fsync(fd)


@pytest.fixture(autouse=True)
def _fsync_as_on_a_disk(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests count fsyncs: run them as on a disk even where /tmp is a tmpfs."""
    if request.node.name != "test_fsync_is_skipped_on_a_tmpfs_only":
        monkeypatch.setattr(jmod, "in_memory_filesystem", lambda path: False)


@pytest.fixture
def fake_os(monkeypatch: pytest.MonkeyPatch) -> FaultyOs:
    fake = FaultyOs()
    monkeypatch.setattr(jmod, "os", fake)
    return fake


def make_core(write: Callable[[AnyRecord], None] | None = None) -> BrokerCore:
    return BrokerCore(max_message_size=1000, max_deliveries=3, default_lease=30.0, write=write)


def replay(path: str, now: float = NOW, *, repair: bool = False) -> BrokerCore:
    """A fresh core rebuilt from the file at ``path``, as a restarting broker does."""
    core = make_core()
    for record in read_journal(path, repair=repair).records:
        core.apply(record)
    core.finish_replay(now)
    return core


def _desc(msg: Message) -> tuple[int, bytes, int, float]:
    return (msg.id, msg.body, msg.attempts, msg.enqueued_at)


def view(core: BrokerCore) -> dict[str, Any]:
    """The durable state as a restart must see it: a leased message counts as
    ready (its lease dies with the broker), at its place by id, with its
    delivery count. Queues holding nothing and with no settings are left out."""
    leased: dict[str, list[Message]] = {}
    for msg_id in sorted(core._leases):
        lease = core.lease_of(msg_id)
        assert lease is not None
        leased.setdefault(lease.message.queue, []).append(lease.message)
    delayed: dict[str, list[tuple[int, bytes, int, float, float]]] = {}
    for msg, until in core._delayed.values():
        delayed.setdefault(msg.queue, []).append((*_desc(msg), until))
    queues: dict[str, Any] = {}
    for name in core.queue_names():
        q = core._queues[name]
        ready = list(q.ready)
        for msg in leased.get(name, []):
            i = 0
            while i < len(ready) and ready[i].id < msg.id:
                i += 1
            ready.insert(i, msg)
        entry = {
            "ready": [_desc(m) for m in ready],
            "buried": sorted(_desc(m) for m in q.buried.values()),
            "delayed": sorted(delayed.get(name, [])),
            "config": (q.max_deliveries, q.lease),
            "bytes": q.bytes,
        }
        if entry["ready"] or entry["buried"] or entry["delayed"] or entry["config"] != (None, None):
            queues[name] = entry
    return {
        "queues": queues,
        "next_id": core._next_id,
        "keys": list(core._keys.items()),
        "live_bytes": core.live_bytes,
    }


def all_ids(core: BrokerCore) -> list[int]:
    return [m[0] for q in view(core)["queues"].values() for k in ("ready", "buried") for m in q[k]]


def assert_same_behaviour(original: BrokerCore, rebuilt: BrokerCore) -> None:
    """Ids go on where they stopped, and the window of put keys came back."""
    assert view(rebuilt) == view(original)
    original.write = None  # its journal is closed
    old_ids = all_ids(original)
    new_id, _ = rebuilt.put("fresh", b"new", NOW)
    assert new_id == original.put("fresh", b"new", NOW)[0]
    assert new_id > max(old_ids, default=0)
    for key, msg_id in list(original._keys.items())[:3]:
        before = rebuilt.totals()
        assert rebuilt.put("fresh", b"retried", NOW, key=key) == (msg_id, None)
        assert rebuilt.totals() == before


def reserve(
    core: BrokerCore,
    queue: str,
    now: float,
    body: bytes,
    attempts: int,
    *,
    lease: float | None = None,
) -> Message:
    """Reserve the head of ``queue``, which must be ``body`` at its ``attempts``-th delivery."""
    msg = core.reserve_nowait(queue, now, lease=lease)
    assert msg is not None
    assert (msg.body, msg.attempts) == (body, attempts)
    return msg


def scenario(core: BrokerCore) -> dict[str, int]:
    """A realistic run from t=0 to NOW, touching every kind of record."""
    ids: dict[str, int] = {}
    ids["a1"], _ = core.put("a", b"a1", 0)
    ids["a2"], _ = core.put("a", b"a2", 0, key=b"k-a2")
    ids["a3"], _ = core.put("a", b"a3", 1, key=b"k-a3")
    many, _ = core.put_many("a", [b"a4", b"a5", b"a6"], 2, keys=[b"k-a4", b"k-a5", b"k-a6"])
    ids["a4"], ids["a5"], ids["a6"] = many
    many, _ = core.put_many("b", [b"b1", b"b2", b"b3", b"b4"], 3)
    ids["b1"], ids["b2"], ids["b3"], ids["b4"] = many
    # A retried put_many: one key seen before (dropped), one new.
    again, _ = core.put_many("a", [b"a5 again", b"a7"], 4, keys=[b"k-a5", b"k-a7"])
    assert again[0] == ids["a5"]
    ids["a7"] = again[1]
    # get, reserve + ack, reserve + release.
    assert [m.body for m in core.get_nowait("a")] == [b"a1"]
    msg = reserve(core, "a", 5, b"a2", 1)
    core.ack(msg.id, msg.attempts)
    msg = reserve(core, "a", 6, b"a3", 1)
    core.release(msg.id, msg.attempts, 6)
    # reserve + bury (twice), kick one back.
    for body in (b"b1", b"b2"):
        msg = reserve(core, "b", 7, body, 1)
        core.bury(msg.id, msg.attempts)
    assert core.kick("b", 1, 8)[0] == 1
    # Release with a delay: one still delayed at NOW, one ready again at 14.
    msg = reserve(core, "a", 9, b"a3", 2)
    core.release(msg.id, msg.attempts, 9, delay=100)
    msg = reserve(core, "a", 9, b"a4", 1)
    core.release(msg.id, msg.attempts, 9, delay=5)
    # Leases that run out until the messages are dead-lettered; kick one back.
    core.configure("c", max_deliveries=2, lease=5.0)
    many, _ = core.put_many("c", [b"c1", b"c2", b"c3"], 10)
    ids["c1"], ids["c2"], ids["c3"] = many
    for t in (20, 30):
        assert core.reserve_nowait("c", t) is not None
        assert core.reserve_nowait("c", t) is not None
        core.tick(t + 6)
    assert core.queue_stats("c:dead", 40)["ready"] == 2
    assert core.kick("c:dead", 1, 40)[0] == 1
    # Some traffic that leaves nothing behind.
    core.put_many("g", [b"g1", b"g2", b"g3"], 41)
    assert len(core.get_nowait("g", 3)) == 3
    core.put_many("p", [b"p1", b"p2"], 42)
    assert core.purge("p") == 2
    core.configure("b", lease=7.0)
    # Reserved and never acked: they come back ready after a restart.
    reserve(core, "c", 50, b"c1", 1, lease=1000)
    reserve(core, "a", 50, b"a4", 2, lease=1000)
    # Delayed until 55: due at NOW (in the core by tick, at replay by finish_replay).
    msg = reserve(core, "a", 50, b"a5", 1)
    core.release(msg.id, msg.attempts, 50, delay=5)
    core.tick(NOW)
    return ids


def expected_after_scenario(ids: dict[str, int]) -> dict[str, Any]:
    """What :func:`scenario` leaves, spelled out (ids, bodies, delivery counts)."""

    def m(name: str, attempts: int) -> tuple[int, bytes, int]:
        return (ids[name], name.encode(), attempts)

    return {
        "a": {"ready": [m("a4", 2), m("a5", 1), m("a6", 0), m("a7", 0)], "delayed": [m("a3", 2)]},
        "b": {"ready": [m("b1", 1), m("b3", 0), m("b4", 0)], "buried": [m("b2", 1)]},
        "c": {"ready": [m("c1", 1), m("c3", 0)]},
        "c:dead": {"ready": [m("c2", 2)]},
    }


def check_scenario_state(core: BrokerCore, ids: dict[str, int]) -> None:
    state = view(core)["queues"]
    assert sorted(state) == ["a", "b", "c", "c:dead"]
    for name, want in expected_after_scenario(ids).items():
        for kind in ("ready", "buried", "delayed"):
            assert [e[:3] for e in state[name][kind]] == want.get(kind, []), (name, kind)
    assert state["a"]["delayed"][0][4] == 109.0
    assert state["b"]["config"] == (None, 7.0)
    assert state["c"]["config"] == (2, 5.0)


def write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def small_records() -> list[AnyRecord]:
    return [
        PutRecord(queue="q", ids=[1, 2], bodies=[b"one", b"two"], at=1.0, keys=[b"k1", b"k2"]),
        AttemptsRecord(id=1, attempts=1),
        ConfigRecord(queue="q", max_deliveries=4),
        StateRecord(id=1, state="delayed", until=99.0),
        DeleteRecord(ids=[2]),
        PutRecord(queue="q", ids=[3], bodies=[b"three"], at=2.0),
    ]


def frame_offsets(records: list[AnyRecord]) -> list[int]:
    """Where each record starts in a file holding exactly ``records``."""
    offsets = []
    at = FILE_HEADER.size
    for record in records:
        offsets.append(at)
        at += len(encode_record(record))
    return offsets


def build(path: str, records: list[AnyRecord]) -> bytes:
    journal, result = Journal.open(path, "never")
    assert result.records == []
    for record in records:
        journal.append(record)
    journal.close()
    return read_bytes(path)


def flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


# -- 1. round trip ------------------------------------------------------------------


def test_round_trip_rebuilds_the_state(path: str) -> None:
    journal, result = Journal.open(path, "never")
    assert (result.records, result.torn) == ([], None)
    written: list[AnyRecord] = []

    def write(record: AnyRecord) -> None:
        journal.append(record)
        written.append(record)

    core = make_core(write)
    ids = scenario(core)
    check_scenario_state(core, ids)
    journal.close()

    result = read_journal(path)
    assert result.records == written
    assert result.torn is None
    assert result.end == os.path.getsize(path)

    journal, opened = Journal.open(path, "never")
    journal.close()
    rebuilt = make_core()
    for record in opened.records:
        rebuilt.apply(record)
    assert rebuilt.finish_replay(NOW) == 12
    check_scenario_state(rebuilt, ids)
    # Reserved-but-unacked messages came back ready, with their delivery counts.
    assert rebuilt.totals()["reserved"] == 0
    assert rebuilt.queue_stats("a", NOW)["ready"] == 4
    assert rebuilt.queue_stats("a", NOW)["delayed"] == 1
    assert rebuilt.queue_config("c") == {
        "max_deliveries": 2,
        "lease": 5.0,
        "maxsize": 0,
        "max_bytes": 0,
    }
    # The dedup window: an acked message's key still returns its id.
    before = rebuilt.totals()
    assert rebuilt.put("a", b"a2 again", NOW, key=b"k-a2") == (ids["a2"], None)
    assert rebuilt.totals() == before
    assert_same_behaviour(core, rebuilt)


def test_an_empty_put_key_is_no_key_before_and_after_a_restart(path: str) -> None:
    journal, _ = Journal.open(path, "never")
    core = make_core(journal.append)
    first, _ = core.put("q", b"x", NOW, key=b"")
    second, _ = core.put("q", b"x", NOW, key=b"")
    assert second != first  # b"" means "no key": never deduplicated
    journal.close()
    rebuilt = replay(path)
    assert view(rebuilt) == view(core)
    assert rebuilt.put("q", b"x", NOW, key=b"")[0] not in (first, second)


def test_round_trip_of_an_empty_journal(path: str) -> None:
    journal, _ = Journal.open(path, "always")
    journal.close()
    assert read_bytes(path) == HEADER
    core = replay(path)
    assert view(core) == view(make_core())
    assert core.put("q", b"x", NOW)[0] == 1


# -- 2. torn tail at every offset ------------------------------------------------


def test_torn_tail_at_every_offset_of_the_last_record(path: str, jdir: str) -> None:
    records = small_records()
    full = build(path, records)
    start = frame_offsets(records)[-1]
    assert start + len(encode_record(records[-1])) == len(full)
    extra = DeleteRecord(ids=[1])
    cut_path = os.path.join(jdir, "cut.journal")
    for cut in range(start, len(full)):
        write_file(cut_path, full[:cut])
        result = read_journal(cut_path)
        assert result.records == records[:-1], cut
        assert result.end == start
        if cut == start:
            assert result.torn is None
        else:
            assert result.torn is not None
            assert f"at byte {start}" in result.torn
        journal, opened = Journal.open(cut_path, "never")
        assert opened.records == records[:-1]
        assert os.path.getsize(cut_path) == start == journal.size
        journal.append(extra)
        journal.close()
        again = read_journal(cut_path)
        assert again.records == [*records[:-1], extra], cut
        assert again.torn is None


def test_torn_file_header_is_rewritten(path: str) -> None:
    for cut in range(1, FILE_HEADER.size):
        write_file(path, HEADER[:cut])
        result = read_journal(path)
        assert (result.records, result.end) == ([], 0)
        assert result.torn == "a file header cut short"
        journal, _ = Journal.open(path, "never")
        journal.append(DeleteRecord(ids=[7]))
        journal.close()
        assert read_journal(path).records == [DeleteRecord(ids=[7])]


# -- 3. one flipped bit in the last record ---------------------------------------


def test_flipped_bit_anywhere_in_the_last_record_drops_only_it(path: str, jdir: str) -> None:
    records = small_records()
    full = build(path, records)
    start = frame_offsets(records)[-1]
    bad_path = os.path.join(jdir, "bad.journal")
    for bit in range(start * 8, len(full) * 8):
        write_file(bad_path, flip(full, bit))
        result = read_journal(bad_path)  # never raises
        assert result.records == records[:-1], bit
        assert result.end == start
        assert result.torn is not None
        journal, opened = Journal.open(bad_path, "never")
        journal.close()
        assert opened.records == records[:-1]
        assert os.path.getsize(bad_path) == start


# -- 4. corruption in the middle --------------------------------------------------


def _check_corrupt_middle(path: str, bad: bytes, offset: int, kept: list[AnyRecord]) -> None:
    write_file(path, bad)
    with pytest.raises(JournalCorrupt, match=f"corrupt at byte {offset} ") as info:
        read_journal(path)
    assert info.value.offset == offset
    with pytest.raises(JournalCorrupt):
        Journal.open(path, "never")
    assert read_bytes(path) == bad  # refused: the file is left alone
    result = read_journal(path, repair=True)
    assert result.records == kept
    assert result.end == offset
    assert result.torn is None  # --repair says what it dropped: not a torn tail
    assert result.repaired is not None
    assert result.repaired.startswith("dropped ")
    assert result.repaired.endswith("(not a torn tail)")
    assert f"({len(bad) - offset} bytes) from byte {offset}:" in result.repaired
    journal, opened = Journal.open(path, "never", repair=True)
    assert opened.records == kept
    assert os.path.getsize(path) == offset == journal.size
    journal.append(DeleteRecord(ids=[42]))
    journal.close()
    assert read_journal(path).records == [*kept, DeleteRecord(ids=[42])]


@pytest.mark.parametrize("index", [0, 2, 4])
def test_flipped_bit_in_a_middle_payload_is_refused_unless_repair(
    path: str, jdir: str, index: int
) -> None:
    records = small_records()
    full = build(path, records)
    offset = frame_offsets(records)[index]
    payload_start = offset + RECORD_HEADER.size
    payload_end = offset + len(encode_record(records[index]))
    bad_path = os.path.join(jdir, "bad.journal")
    for bit in range(payload_start * 8, payload_end * 8):
        _check_corrupt_middle(bad_path, flip(full, bit), offset, records[:index])


def test_repair_logs_how_many_records_and_bytes_it_dropped(
    path: str, jdir: str, caplog: pytest.LogCaptureFixture
) -> None:
    records = small_records()
    full = build(path, records)
    offset = frame_offsets(records)[1]
    write_file(path, flip(full, (offset + RECORD_HEADER.size) * 8))
    with caplog.at_level(logging.WARNING, logger="brokerq"):
        journal, opened = Journal.open(path, "never", repair=True)
    journal.close()
    assert opened.records == records[:1]
    dropped = len(records) - 1
    assert [r.getMessage() for r in caplog.records] == [
        f"journal {path}: --repair dropped {dropped} records ({len(full) - offset} bytes)"
        f" from byte {offset}: the damaged one (a checksum mismatch) and the {dropped - 1}"
        " valid ones after it (not a torn tail)"
    ]


def test_flipped_bit_in_a_middle_checksum_is_refused(path: str, jdir: str) -> None:
    records = small_records()
    full = build(path, records)
    offset = frame_offsets(records)[2]
    bad_path = os.path.join(jdir, "bad.journal")
    for bit in range((offset + 4) * 8, (offset + 8) * 8):
        _check_corrupt_middle(bad_path, flip(full, bit), offset, records[:2])


def test_flipped_bit_in_a_middle_length_field_is_not_taken_for_a_torn_tail(
    path: str, jdir: str
) -> None:
    records = small_records()
    full = build(path, records)
    offset = frame_offsets(records)[2]
    bad_path = os.path.join(jdir, "bad.journal")
    for bit in range(offset * 8, (offset + 4) * 8):
        write_file(bad_path, flip(full, bit))
        with pytest.raises(JournalCorrupt):
            read_journal(bad_path)


def test_valid_checksum_but_undecodable_record_is_corrupt(path: str) -> None:
    records = small_records()[:2]
    full = build(path, records)
    garbage = b"\xc1 not msgpack"
    frame = RECORD_HEADER.pack(RECORD_MARKER, len(garbage), _checksum(len(garbage), garbage))
    frame += garbage
    write_file(path, full + frame)
    with pytest.raises(JournalCorrupt, match=f"byte {len(full)} .*undecodable"):
        read_journal(path)


# -- 5. not a journal, newer format, empty, missing -------------------------------


def test_wrong_magic_is_refused_and_left_alone(path: str) -> None:
    data = b"#!/bin/sh\necho this is not a journal\n"
    write_file(path, data)
    with pytest.raises(JournalCorrupt, match="not a brokerq journal"):
        read_journal(path)
    with pytest.raises(JournalCorrupt, match="not a brokerq journal"):
        Journal.open(path, "never")
    assert read_bytes(path) == data


def test_short_file_that_is_not_a_journal_is_refused_and_left_alone(path: str) -> None:
    data = b"hello\n"
    write_file(path, data)
    try:
        with pytest.raises(JournalCorrupt, match="not a brokerq journal"):
            Journal.open(path, "never")
    finally:
        assert read_bytes(path) == data


def test_newer_format_version_is_refused_with_a_clear_message(path: str) -> None:
    data = FILE_HEADER.pack(MAGIC, FORMAT_VERSION + 1) + encode_record(DeleteRecord(ids=[1]))
    write_file(path, data)
    message = f"format version {FORMAT_VERSION + 1}; this brokerq reads {FORMAT_VERSION}"
    with pytest.raises(BrokerqError, match=message):
        read_journal(path)
    with pytest.raises(BrokerqError, match=message):
        Journal.open(path, "never")
    assert read_bytes(path) == data


@pytest.mark.parametrize("existing", [False, True])
def test_missing_or_empty_file_opens_as_an_empty_journal(path: str, existing: bool) -> None:
    if existing:
        write_file(path, b"")
    result = read_journal(path)
    assert (result.records, result.end, result.torn) == ([], 0, None)
    journal, result = Journal.open(path, "batch")
    assert (result.records, result.torn) == ([], None)
    assert read_bytes(path) == HEADER
    assert journal.size == FILE_HEADER.size
    if not existing:
        assert os.stat(path).st_mode & 0o777 == 0o600
    journal.append(DeleteRecord(ids=[1]))
    journal.close()
    assert read_journal(path).records == [DeleteRecord(ids=[1])]


def test_unknown_fsync_mode_is_refused(path: str) -> None:
    with pytest.raises(ValueError, match="fsync must be one of"):
        Journal.open(path, "sometimes")


# -- 6. compaction --------------------------------------------------------------------


def churn(core: BrokerCore, n: int = 200) -> None:
    """Dead data: messages put and taken again."""
    for i in range(n):
        core.put("churn", b"x" * 50, NOW, key=b"churn-%d" % i)
        core.get_nowait("churn")


def churned_journal(path: str) -> tuple[Journal, BrokerCore]:
    """A journal at ``path`` and its core, holding the scenario and some dead data to compact."""
    journal, _ = Journal.open(path, "batch")
    core = make_core(journal.append)
    scenario(core)
    churn(core, 50)
    return journal, core


def during(core: BrokerCore, step: int) -> None:
    """Traffic while a compaction runs: puts, a get, a reserve + ack, a bury."""
    core.put_many("a", [b"during %d.1" % step, b"during %d.2" % step], NOW, keys=None)
    core.put("d", b"d%d" % step, NOW, key=b"k-during-%d" % step)
    assert core.get_nowait("a")
    msg = core.reserve_nowait("b", NOW, lease=1000)
    assert msg is not None
    core.ack(msg.id, msg.attempts)
    msg = core.reserve_nowait("d", NOW, lease=1000)
    assert msg is not None
    core.bury(msg.id, msg.attempts)
    core.configure("d", max_deliveries=step + 3)


def test_compaction_shrinks_the_journal_and_keeps_appends_made_meanwhile(path: str) -> None:
    journal, _ = Journal.open(path, "batch")
    core = make_core(journal.append)
    scenario(core)
    churn(core)
    before = os.path.getsize(path)
    assert journal.size == before
    compaction = journal.begin_compaction(core.snapshot())
    assert journal.compacting
    during(core, 1)
    compaction.write_snapshot()
    during(core, 2)
    compaction.finish()
    assert not journal.compacting
    assert not os.path.exists(compaction.tmp_path)
    after = os.path.getsize(path)
    assert after == journal.size
    assert after < before / 3
    assert journal.synced == journal.written
    # Appends after the compaction go to the new file.
    during(core, 3)
    journal.close()
    result = read_journal(path)
    assert result.torn is None
    assert result.end == os.path.getsize(path)
    rebuilt = replay(path)
    assert view(rebuilt) == view(core)
    assert_same_behaviour(core, rebuilt)


def _crash(journal: Journal, compaction: jmod.Compaction | None = None) -> None:
    """The broker dies: its descriptors close, nothing more is written or synced."""
    for owner in (journal, compaction):
        if owner is not None and owner.fd >= 0:
            os.close(owner.fd)
            owner.fd = -1


@pytest.mark.parametrize("step", ["begun", "snapshot written", "renamed", "finished"])
def test_crash_at_each_step_of_a_compaction_loses_nothing(
    path: str, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    journal, core = churned_journal(path)
    old_size = journal.size
    compaction = journal.begin_compaction(core.snapshot())
    during(core, 1)
    if step != "begun":
        compaction.write_snapshot()
        assert os.path.getsize(compaction.tmp_path) == compaction.size
        during(core, 2)
    if step == "renamed":

        def no_directory_fsync(path: str) -> None:
            raise OSError(errno.EIO, "simulated crash before the directory fsync")

        monkeypatch.setattr(jmod, "_fsync_directory", no_directory_fsync)
        with pytest.raises(OSError, match="simulated crash"):
            compaction.finish()
        monkeypatch.undo()  # the next broker's directory fsync works again
        assert not os.path.exists(compaction.tmp_path)
        assert os.path.getsize(path) < old_size
    elif step == "finished":
        compaction.finish()
        during(core, 3)
    _crash(journal, compaction)
    result = read_journal(path)
    assert result.torn is None
    rebuilt = replay(path)
    assert view(rebuilt) == view(core)
    assert_same_behaviour(core, rebuilt)
    # The next broker opens the journal fine (a stale .compact does not matter).
    journal, _ = Journal.open(path, "batch")
    journal.close()


def test_abandoned_compaction_leaves_the_old_journal_and_removes_the_temp_file(
    path: str,
) -> None:
    journal, core = churned_journal(path)
    before = read_bytes(path)
    compaction = journal.begin_compaction(core.snapshot())
    compaction.write_snapshot()
    assert os.path.exists(compaction.tmp_path)
    during(core, 1)
    compaction.abandon()
    assert not journal.compacting
    assert not os.path.exists(compaction.tmp_path)
    assert read_bytes(path).startswith(before)  # the old file, with the appends made meanwhile
    during(core, 2)
    assert view(replay(path)) == view(core)
    # A later compaction still works.
    compaction = journal.begin_compaction(core.snapshot())
    compaction.write_snapshot()
    compaction.finish()
    journal.close()
    assert os.path.getsize(path) < len(before)
    assert view(replay(path)) == view(core)


def test_abandon_before_the_snapshot_is_written(path: str) -> None:
    journal, _ = Journal.open(path, "never")
    core = make_core(journal.append)
    scenario(core)
    compaction = journal.begin_compaction(core.snapshot())
    compaction.abandon()
    assert not journal.compacting
    during(core, 1)
    journal.close()
    assert view(replay(path)) == view(core)


def test_appends_after_a_failed_directory_fsync_are_not_lost(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal, _ = Journal.open(path, "batch")
    core = make_core(journal.append)
    scenario(core)
    compaction = journal.begin_compaction(core.snapshot())
    compaction.write_snapshot()

    def failing_directory_fsync(path: str) -> None:
        raise OSError(errno.EIO, "directory fsync failed")

    monkeypatch.setattr(jmod, "_fsync_directory", failing_directory_fsync)
    # What the broker does (server.py, Broker._compact): abandon on OSError, go on.
    with pytest.raises(OSError, match="directory fsync failed"):
        compaction.finish()
    compaction.abandon()
    try:
        during(core, 1)  # acknowledged puts, an ack, a bury...
    except JournalFailed:
        return  # refusing further appends would also be sound: nothing acked is lost
    journal.sync()
    _crash(journal)
    assert view(replay(path)) == view(core)


def test_compact_at_once_shrinks_the_journal_and_keeps_the_state(path: str) -> None:
    """What a broker does at start and at exit (server.py, Broker._compact_at_once)."""
    journal, _ = Journal.open(path, "batch")
    core = make_core(journal.append)
    scenario(core)
    churn(core)
    before = journal.size
    journal.compact(core.snapshot())
    assert not journal.compacting
    assert not os.path.exists(path + ".compact")
    assert os.path.getsize(path) == journal.size < before / 3
    assert journal.synced == journal.written
    during(core, 1)  # appends after it go to the new file
    journal.close()
    rebuilt = replay(path)
    assert view(rebuilt) == view(core)
    assert_same_behaviour(core, rebuilt)


def test_compact_at_once_on_a_journal_holding_nothing_leaves_a_few_bytes(path: str) -> None:
    """Nothing held: the new journal keeps only the next id and the put keys."""
    journal, _ = Journal.open(path, "batch")
    core = make_core(journal.append)
    for i in range(3):
        core.put("q", b"x" * 1000, NOW, key=b"k%d" % i)
        assert core.get_nowait("q")
    assert journal.size > 3000
    journal.compact(core.snapshot())
    journal.close()
    assert os.path.getsize(path) < 200
    rebuilt = replay(path)
    assert view(rebuilt) == view(core)
    assert_same_behaviour(core, rebuilt)


def test_a_failed_compaction_at_once_leaves_the_old_journal_in_use(
    path: str, fake_os: FaultyOs
) -> None:
    journal, core = churned_journal(path)
    before = read_bytes(path)
    fake_os.on_write = DiskFull(1)  # the snapshot's write
    with pytest.raises(OSError, match=os.strerror(errno.ENOSPC)):
        journal.compact(core.snapshot())
    fake_os.on_write = None
    assert not journal.compacting
    assert not os.path.exists(path + ".compact")
    assert read_bytes(path) == before
    during(core, 1)
    journal.close()
    assert view(replay(path)) == view(core)


def test_open_removes_the_file_of_a_compaction_cut_short(path: str) -> None:
    """A broker killed while compacting leaves ``<journal>.compact``: the next one's space."""
    journal, core = churned_journal(path)
    compaction = journal.begin_compaction(core.snapshot())
    compaction.write_snapshot()
    during(core, 1)
    _crash(journal, compaction)
    assert os.path.exists(compaction.tmp_path)
    journal, result = Journal.open(path, "batch")
    assert not os.path.exists(compaction.tmp_path)
    journal.close()
    assert result.torn is None
    assert view(replay(path)) == view(core)


# -- 7. disk faults -------------------------------------------------------------------


class DiskFull:
    """Writes pass until the ``n``-th, which writes half its bytes; then ENOSPC until freed."""

    def __init__(self, n: int, err: int = errno.ENOSPC) -> None:
        self.n = n
        self.err = err
        self.calls = 0
        self.full = False

    def __call__(self, fd: int, data: Any) -> int:
        self.calls += 1
        if self.full:
            raise OSError(self.err, os.strerror(self.err))
        if self.calls == self.n:
            self.full = True
            return os.write(fd, bytes(data[: max(1, len(data) // 2)]))
        return os.write(fd, data)


def _durable_stats(core: BrokerCore) -> tuple[Any, ...]:
    return (core.totals(), core.queue_stats("q", NOW), core._next_id, list(core._keys.items()))


@pytest.mark.parametrize("mode", ["never", "always"])
@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EDQUOT])
def test_full_disk_fails_the_request_and_changes_nothing(
    path: str, fake_os: FaultyOs, mode: str, err: int
) -> None:
    journal, _ = Journal.open(path, mode)
    written: list[AnyRecord] = []

    def write(record: AnyRecord) -> None:
        journal.append(record)
        written.append(record)

    core = make_core(write)
    disk = DiskFull(6, err)
    fake_os.on_write = disk
    for i in range(5):
        core.put("q", b"m%d" % i, NOW, key=b"k%d" % i)
    next_id = core._next_id
    before = _durable_stats(core)
    size = os.path.getsize(path)
    assert journal.size == size

    with pytest.raises(JournalFull, match="disk is full") as info:
        core.put("q", b"big" * 20, NOW, key=b"k-full")
    assert isinstance(info.value, brokerq.Full)
    assert disk.calls == 7  # half a record, then ENOSPC: the half was cut off again
    assert os.path.getsize(path) == size == journal.size
    assert _durable_stats(core) == before
    assert not journal.failed
    # Still full: a put_many fails all or nothing, a get fails and leaves the message.
    with pytest.raises(JournalFull):
        core.put_many("q", [b"x", b"y"], NOW)
    with pytest.raises(JournalFull):
        core.get_nowait("q")
    with pytest.raises(JournalFull):
        core.reserve_nowait("q", NOW)
    assert _durable_stats(core) == before
    assert os.path.getsize(path) == size

    disk.full = False  # space comes back
    msg_id, _ = core.put("q", b"big" * 20, NOW, key=b"k-full")
    assert msg_id == next_id  # the failed put used up no id, and its key was not taken
    assert [m.body for m in core.get_nowait("q")] == [b"m0"]
    journal.close()
    result = read_journal(path)
    assert result.torn is None
    assert result.records == written
    assert view(replay(path)) == view(core)


def test_full_disk_during_a_compaction_keeps_the_tail_consistent(
    path: str, fake_os: FaultyOs
) -> None:
    journal, _ = Journal.open(path, "batch")
    core = make_core(journal.append)
    scenario(core)
    compaction = journal.begin_compaction(core.snapshot())
    compaction.write_snapshot()
    disk = DiskFull(1)
    fake_os.on_write = disk
    with pytest.raises(JournalFull):
        core.put("q", b"lost", NOW)
    disk.full = False
    fake_os.on_write = None
    core.put("q", b"kept", NOW)
    compaction.finish()
    journal.close()
    assert view(replay(path)) == view(core)


@pytest.mark.parametrize("mode", ["batch", "always"])
def test_fsync_error_fails_the_journal_for_good(path: str, fake_os: FaultyOs, mode: str) -> None:
    journal, _ = Journal.open(path, mode)
    core = make_core(journal.append)
    core.put("q", b"before", NOW)
    journal.sync()

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    fake_os.on_fsync = eio
    if mode == "batch":
        core.put("q", b"unsynced", NOW)
        with pytest.raises(JournalFailed, match="fsync failed"):
            journal.sync()
    else:
        with pytest.raises(JournalFailed, match="fsync failed"):
            core.put("q", b"unsynced", NOW)
    assert journal.failed
    fake_os.on_fsync = None  # even once the disk answers again
    before = _durable_stats(core)
    with pytest.raises(JournalFailed, match="failed earlier"):
        journal.append(DeleteRecord(ids=[1]))
    with pytest.raises(JournalFailed):
        core.put("q", b"after", NOW)
    with pytest.raises(JournalFailed):
        core.get_nowait("q")
    assert _durable_stats(core) == before
    journal.close()


def test_no_byte_counts_as_synced_after_an_fsync_error(path: str, fake_os: FaultyOs) -> None:
    journal, _ = Journal.open(path, "batch")
    journal.append(DeleteRecord(ids=[1]))
    synced = journal.sync()
    journal.append(DeleteRecord(ids=[2]))

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    fake_os.on_fsync = eio
    with pytest.raises(JournalFailed):
        journal.sync()
    fake_os.on_fsync = None
    try:
        with pytest.raises(JournalFailed):
            journal.sync()
    finally:
        assert journal.synced == synced
        journal.close()


def test_write_error_fails_the_journal(path: str, fake_os: FaultyOs) -> None:
    journal, _ = Journal.open(path, "batch")
    core = make_core(journal.append)
    core.put("q", b"before", NOW)
    size = os.path.getsize(path)
    calls = 0

    def half_then_eio(fd: int, data: Any) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            return os.write(fd, bytes(data[:5]))
        raise OSError(errno.EIO, "Input/output error")

    fake_os.on_write = half_then_eio
    before = _durable_stats(core)
    with pytest.raises(JournalFailed, match="write failed"):
        core.put("q", b"doomed", NOW)
    assert journal.failed
    assert os.path.getsize(path) == size
    assert _durable_stats(core) == before
    fake_os.on_write = None
    with pytest.raises(JournalFailed):
        core.put("q", b"after", NOW)
    journal.close()
    assert [r.bodies for r in read_journal(path).records if isinstance(r, PutRecord)] == [
        [b"before"]
    ]


@pytest.mark.parametrize("mode", ["always", "batch"])
def test_power_loss_never_loses_an_acknowledged_put(
    path: str, jdir: str, fake_os: FaultyOs, mode: str
) -> None:
    """Bytes written after the last fsync may be lost, in part or whole;
    every put acknowledged (synced before the ack) must survive."""
    journal: Journal | None = None
    synced_size = 0

    def fsync(fd: int) -> None:
        nonlocal synced_size
        os.fsync(fd)
        is_file = stat.S_ISREG(os.fstat(fd).st_mode)  # not the directory's fsync
        if is_file and (journal is None or fd == journal.fd):
            synced_size = os.fstat(fd).st_size

    fake_os.on_fsync = fsync
    journal, _ = Journal.open(path, mode)
    assert synced_size == FILE_HEADER.size
    core = make_core(journal.append)
    rng = random.Random(20240607)
    acked: list[int] = []
    pending: list[int] = []
    # (length at the last fsync, current length, ids acknowledged so far)
    checkpoints: list[tuple[int, int, int]] = []
    all_put: list[int] = []
    for i in range(60):
        bodies = [rng.randbytes(rng.randrange(0, 30)) for _ in range(rng.choice((1, 1, 3)))]
        keys = [b"k%d.%d" % (i, j) for j in range(len(bodies))] if rng.random() < 0.5 else None
        ids, _ = core.put_many("q", bodies, NOW, keys=keys)
        pending += ids
        all_put += ids
        checkpoints.append((synced_size, os.path.getsize(path), len(acked)))
        if mode == "always" or rng.random() < 0.3:
            if mode == "batch":
                journal.sync()  # the committer's group commit; the puts are acked after it
            acked += pending
            pending = []
        checkpoints.append((synced_size, os.path.getsize(path), len(acked)))
    journal.close()
    data = read_bytes(path)
    crash_path = os.path.join(jdir, "crash.journal")
    for synced, current, n_acked in checkpoints:
        assert synced <= current
        for length in {synced, current, *(rng.randint(synced, current) for _ in range(4))}:
            write_file(crash_path, data[:length])
            result = read_journal(crash_path)
            ids = [i for r in result.records if isinstance(r, PutRecord) for i in r.ids]
            assert ids == all_put[: len(ids)]  # a prefix of what was written
            assert set(acked[:n_acked]) <= set(ids)
            rebuilt = replay(crash_path)
            assert rebuilt.queue_stats("q", NOW)["ready"] == len(ids)


# -- 8. preallocation: records, then a zero tail ---------------------------------------


class SyncingOs(FaultyOs):
    """:class:`FaultyOs` that also counts and hooks ``fdatasync``."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def fsync(self, fd: int) -> None:
        self.calls.append("fsync")
        super().fsync(fd)

    def fdatasync(self, fd: int) -> None:
        self.calls.append("fdatasync")
        if self.on_fsync is not None:
            self.on_fsync(fd)
        else:
            os.fdatasync(fd)


@pytest.fixture
def syncing_os(monkeypatch: pytest.MonkeyPatch) -> SyncingOs:
    fake = SyncingOs()
    monkeypatch.setattr(jmod, "os", fake)
    return fake


def open_preallocated(path: str, fsync: str = "batch") -> tuple[Journal, jmod.ReadResult]:
    journal, result = Journal.open(path, fsync, preallocate=True)
    assert journal.preallocating
    return journal, result


def assert_zero_tail(path: str, end: int) -> None:
    """The file holds records up to ``end``, then zeros only, and more of them."""
    data = read_bytes(path)
    assert len(data) > end
    assert data.count(0, end) == len(data) - end


def test_a_preallocated_journal_replays_exactly_its_records(path: str) -> None:
    records = small_records()
    # As written by hand: the records, then zeros where space was allocated.
    frames = HEADER + b"".join(encode_record(r) for r in records)
    for tail in (1, 9, 10, 4096, 1 << 20):
        write_file(path, frames + bytes(tail))
        result = read_journal(path)
        assert result.records == records, tail
        assert (result.end, result.torn) == (len(frames), None), tail
    # As a preallocating journal writes it.
    os.unlink(path)
    journal, _ = open_preallocated(path)
    assert journal.size == FILE_HEADER.size
    assert journal.allocated == os.path.getsize(path) >= jmod.PREALLOCATE_MIN
    for record in records:
        journal.append(record)
    assert journal.size == len(frames)
    assert os.path.getsize(path) == journal.allocated  # appends did not grow the file
    journal.sync()
    journal.close()
    assert_zero_tail(path, len(frames))
    result = read_journal(path)
    assert (result.records, result.end, result.torn) == (records, len(frames), None)
    # Opened again it keeps its space, and appends go on after the records.
    allocated = os.path.getsize(path)
    journal, opened = open_preallocated(path)
    assert (opened.records, opened.torn) == (records, None)
    assert (journal.size, journal.allocated) == (len(frames), allocated)
    journal.append(DeleteRecord(ids=[9]))
    journal.close()
    assert os.path.getsize(path) == allocated
    assert read_journal(path).records == [*records, DeleteRecord(ids=[9])]
    # A journal that no longer preallocates (--fsync never) gives the space back.
    journal, opened = Journal.open(path, "never", preallocate=True)
    assert not journal.preallocating
    journal.close()
    assert os.path.getsize(path) == opened.end == journal.size
    assert opened.records == [*records, DeleteRecord(ids=[9])]


def test_a_header_that_never_reached_the_disk_before_the_zero_tail_opens_empty(
    path: str,
) -> None:
    """A power loss just after a preallocating journal was created may leave
    its zeros without its header, or with part of it: an empty journal."""
    for cut in range(FILE_HEADER.size):
        write_file(path, HEADER[:cut] + bytes(4096))
        result = read_journal(path)
        assert (result.records, result.end) == ([], 0)
        assert result.torn == "a file header cut short"
        journal, _ = open_preallocated(path)
        journal.append(DeleteRecord(ids=[7]))
        journal.close()
        assert read_journal(path).records == [DeleteRecord(ids=[7])]
    write_file(path, b"not a journal" + bytes(4096))
    with pytest.raises(JournalCorrupt, match="not a brokerq journal"):
        read_journal(path)


def test_a_record_torn_before_the_zero_tail_is_cut_as_a_torn_tail(path: str, jdir: str) -> None:
    records = small_records()
    full = build(path, records)
    start = frame_offsets(records)[-1]
    cut_path = os.path.join(jdir, "cut.journal")
    extra = DeleteRecord(ids=[1])
    for cut in range(start, len(full)):
        write_file(cut_path, full[:cut] + bytes(5000))
        result = read_journal(cut_path)
        assert result.records == records[:-1], cut
        assert result.end == start
        if cut == start:
            assert result.torn is None  # nothing of it was written: the zero tail
        else:
            assert result.torn is not None
            assert f"at byte {start}" in result.torn
        journal, opened = open_preallocated(cut_path)
        assert opened.records == records[:-1]
        assert journal.size == start
        assert_zero_tail(cut_path, start)  # the torn bytes are gone, zeros follow
        journal.append(extra)
        journal.close()
        again = read_journal(cut_path)
        assert again.records == [*records[:-1], extra], cut
        assert again.torn is None


def test_a_flipped_bit_in_the_last_record_before_the_zero_tail_drops_only_it(
    path: str, jdir: str
) -> None:
    records = small_records()
    full = build(path, records)
    start = frame_offsets(records)[-1]
    bad_path = os.path.join(jdir, "bad.journal")
    for bit in range(start * 8, len(full) * 8):
        write_file(bad_path, flip(full, bit) + bytes(300))
        result = read_journal(bad_path)  # never raises
        assert result.records == records[:-1], bit
        assert result.end == start
        assert result.torn is not None


@pytest.mark.parametrize("index", [0, 2, 4])
def test_damage_in_the_middle_is_refused_though_a_zero_tail_follows(
    path: str, jdir: str, index: int
) -> None:
    """G7: the valid records after the damage run to the zero tail, not to the
    end of the file: still corruption in the middle, never a torn tail."""
    records = small_records()
    full = build(path, records)
    offset = frame_offsets(records)[index]
    end = offset + len(encode_record(records[index]))
    bad_path = os.path.join(jdir, "bad.journal")
    for bit in range(offset * 8, end * 8):
        bad = flip(full, bit) + bytes(4096)
        write_file(bad_path, bad)
        with pytest.raises(JournalCorrupt, match=f"corrupt at byte {offset} "):
            read_journal(bad_path)
        with pytest.raises(JournalCorrupt):
            Journal.open(bad_path, "batch", preallocate=True)
        assert read_bytes(bad_path) == bad  # refused: the file is left alone
    result = read_journal(bad_path, repair=True)
    assert (result.records, result.end) == (records[:index], offset)
    journal, opened = Journal.open(bad_path, "batch", repair=True, preallocate=True)
    assert opened.records == records[:index]
    assert journal.size == offset
    journal.close()
    assert_zero_tail(bad_path, offset)


@pytest.mark.parametrize("mode", ["batch", "always"])
def test_power_loss_after_an_fdatasync_keeps_every_acknowledged_put(
    path: str, jdir: str, syncing_os: SyncingOs, mode: str
) -> None:
    """A preallocated journal is synced with fdatasync. What the disk holds
    after a power loss: the file as the last sync left it, plus any part of
    what was written after it (in the preallocated space, which reads as
    zeros where nothing reached the disk). Every acknowledged put survives."""
    journal: Journal | None = None
    images: list[bytes] = []  # the file at each of the journal's syncs

    def datasync(fd: int) -> None:
        os.fdatasync(fd)
        if journal is not None and fd == journal.fd:
            with open(path, "rb") as f:
                images.append(f.read())

    syncing_os.on_fsync = datasync
    journal, _ = open_preallocated(path, mode)
    core = make_core(journal.append)
    rng = random.Random(20251207)
    acked: list[int] = []
    pending: list[int] = []
    all_put: list[int] = []
    # (sync images taken so far, bytes written, puts acknowledged)
    checkpoints: list[tuple[int, int, int]] = []
    syncing_os.calls.clear()
    for _ in range(60):
        bodies = [rng.randbytes(rng.randrange(0, 40)) for _ in range(rng.choice((1, 1, 3)))]
        ids, _ = core.put_many("q", bodies, NOW)
        pending += ids
        all_put += ids
        if rng.random() < 0.2:
            assert core.get_nowait("q")  # a removal, never synced on its own under batch
        checkpoints.append((len(images), journal.size, len(acked)))
        if mode == "always" or rng.random() < 0.3:
            if mode == "batch":
                journal.sync()  # the group commit; its puts are answered after it
            acked += pending
            pending = []
        checkpoints.append((len(images), journal.size, len(acked)))
    journal.close()
    assert "fdatasync" in syncing_os.calls
    assert syncing_os.calls.count("fsync") <= 1  # close() only
    final = read_bytes(path)
    crash_path = os.path.join(jdir, "crash.journal")
    for n_images, written, n_acked in checkpoints:
        disk = images[n_images - 1] if n_images else HEADER
        synced_end = read_journal_bytes(disk, jdir).end
        assert synced_end <= written
        for length in {synced_end, written, *(rng.randint(synced_end, written) for _ in range(4))}:
            image = bytearray(disk.ljust(len(final), b"\0"))
            image[synced_end:length] = final[synced_end:length]
            write_file(crash_path, bytes(image))
            result = read_journal(crash_path)  # never refuses
            ids = [i for r in result.records if isinstance(r, PutRecord) for i in r.ids]
            assert ids == all_put[: len(ids)]  # a prefix of what was written
            assert set(acked[:n_acked]) <= set(ids)
            rebuilt = replay(crash_path)
            assert rebuilt.totals()["put_total"] == 0  # (replay counts nothing)


def read_journal_bytes(data: bytes, jdir: str) -> jmod.ReadResult:
    scratch = os.path.join(jdir, "scratch.journal")
    write_file(scratch, data)
    return read_journal(scratch)


def test_sync_is_fdatasync_only_when_preallocating(path: str, syncing_os: SyncingOs) -> None:
    journal, _ = Journal.open(path, "batch")  # no preallocation: the size changes
    journal.append(DeleteRecord(ids=[1]))
    syncing_os.calls.clear()
    journal.sync()
    assert syncing_os.calls == ["fsync"]
    journal.close()
    journal, _ = open_preallocated(path)
    journal.append(DeleteRecord(ids=[2]))
    syncing_os.calls.clear()
    journal.sync()
    assert syncing_os.calls == ["fdatasync"]
    journal.close()


def test_appends_past_the_allocated_space_allocate_more(path: str) -> None:
    journal, _ = open_preallocated(path)
    first = journal.allocated
    body = b"x" * 50_000
    records = []
    while journal.size < first + 1000:
        record = PutRecord(queue="q", ids=[len(records) + 1], bodies=[body], at=1.0)
        journal.append(record)
        records.append(record)
        assert journal.size < journal.allocated == os.path.getsize(path)
    assert journal.allocated > first
    journal.close()
    assert_zero_tail(path, journal.size)
    assert read_journal(path).records == records


def test_no_room_to_preallocate_is_not_an_error(path: str, syncing_os: SyncingOs) -> None:
    """Allocation that fails for lack of space: appends go on, growing the file
    (a full disk then fails the request in the write, as without preallocation)."""
    journal, _ = open_preallocated(path)
    size_on_disk = journal.allocated

    def no_space(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    syncing_os.posix_fallocate = no_space  # type: ignore[attr-defined]
    body = b"y" * 100_000
    records = [PutRecord(queue="q", ids=[i], bodies=[body], at=1.0) for i in range(1, 20)]
    for record in records:
        journal.append(record)
    assert journal.size > size_on_disk
    assert os.path.getsize(path) == journal.size == journal.allocated
    assert not journal.failed
    journal.sync()
    journal.close()
    assert read_journal(path).records == records


def test_compaction_of_a_preallocated_journal_follows_the_same_rules(path: str) -> None:
    journal, _ = open_preallocated(path)
    core = make_core(journal.append)
    scenario(core)
    churn(core)
    before = journal.size
    compaction = journal.begin_compaction(core.snapshot())
    during(core, 1)
    compaction.write_snapshot()
    assert os.path.getsize(compaction.tmp_path) > compaction.size  # its own zero tail
    assert_zero_tail(compaction.tmp_path, compaction.size)
    during(core, 2)
    compaction.finish()
    assert journal.size < before / 3
    assert journal.synced == journal.written
    assert journal.allocated == os.path.getsize(path) > journal.size
    result = read_journal(path)
    assert (result.end, result.torn) == (journal.size, None)
    during(core, 3)  # appends go on at the end of the records, in the zero tail
    assert os.path.getsize(path) == journal.allocated
    journal.close()
    assert_zero_tail(path, journal.size)
    assert read_journal(path).end == journal.size
    rebuilt = replay(path)
    assert view(rebuilt) == view(core)
    assert_same_behaviour(core, rebuilt)
    # At once, as at start and exit, likewise.
    journal, _ = open_preallocated(path)
    core = replay(path)
    core.write = journal.append
    churn(core)
    journal.compact(core.snapshot())
    core.put_many("a", [b"after 1", b"after 2"], NOW)
    assert core.get_nowait("a")
    journal.close()
    assert_zero_tail(path, journal.size)
    assert view(replay(path)) == view(core)


# -- 9. where the journal lives ------------------------------------------------------


def test_journal_path() -> None:
    assert journal_path("/run/user/1000/brokerq/b.sock", None) == (
        "/run/user/1000/brokerq/b.sock.journal"
    )
    assert journal_path("b.sock", None) == "b.sock.journal"
    in_data_dir = journal_path("/run/user/1000/brokerq/b.sock", "/var/lib/bq")
    assert in_data_dir.startswith("/var/lib/bq/b.sock-")
    assert in_data_dir.endswith(".journal")
    # Two sockets with the same name never share a journal in one data dir.
    assert journal_path("/a/b.sock", "/var/lib/bq") != journal_path("/c/b.sock", "/var/lib/bq")
    assert journal_path("/a/b.sock", "/d") == journal_path("/a/b.sock", "/d")


def test_fsync_is_skipped_on_a_tmpfs_only() -> None:
    from brokerq.broker.journal import in_memory_filesystem

    assert jmod.in_memory_filesystem is in_memory_filesystem
    assert not in_memory_filesystem("/nonexistent/path")
    if os.path.isdir("/dev/shm") and in_memory_filesystem("/dev/shm"):
        directory = tempfile.mkdtemp(dir="/dev/shm")
        try:
            journal, _ = Journal.open(os.path.join(directory, "j"), "always")
            assert (journal.fsync, journal.syncs, journal.in_memory) == ("always", "never", True)
            journal.close()
        finally:
            shutil.rmtree(directory)
