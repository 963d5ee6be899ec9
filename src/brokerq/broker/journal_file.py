"""The journal's file format, and reading a journal back (journal.py writes it).

File format (version 1)::

    header   8 bytes  b"BRKQJNL\\0"
             4 bytes  format version, u32 big-endian
    record   2 bytes  marker b"\\xb0\\x51"
             4 bytes  payload length n, u32 big-endian
             4 bytes  CRC-32 of the length bytes and the payload, u32 big-endian
             n bytes  payload: one MessagePack record (brokerq.broker.records)
    record   ...
    zero     any number of zero bytes (preallocated space): the zero tail

The checksum covers the length, so a flipped length is caught too; the
marker lets a reader find the records after a damaged one. A record never
starts with a zero byte, so zero bytes where a record should start, with
only zero bytes after them, are free space (the zero tail). Reading it
back (docs/guarantees.md G7): a torn tail (nothing valid after a damaged
record) is cut off; a damaged record with valid records after it refuses to
start, unless ``repair`` truncates there.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import msgspec

from ..errors import BrokerqError
from .core.records import AnyRecord

MAGIC: Final = b"BRKQJNL\x00"
FORMAT_VERSION: Final = 1
FILE_HEADER: Final = struct.Struct(">8sI")
RECORD_MARKER: Final = b"\xb0\x51"
RECORD_HEADER: Final = struct.Struct(">2sII")
_LENGTH: Final = struct.Struct(">I")
_ZERO_SCAN: Final = 1024 * 1024

_encoder: Final = msgspec.msgpack.Encoder()
_decoder: Final[msgspec.msgpack.Decoder[AnyRecord]] = msgspec.msgpack.Decoder(AnyRecord)


class JournalCorrupt(BrokerqError):
    def __init__(self, path: str, offset: int, reason: str) -> None:
        super().__init__(
            f"journal {path} is corrupt at byte {offset} ({reason}) and valid records follow; "
            "start with --repair to truncate it there, losing what follows"
        )
        self.offset = offset


def _checksum(length: int, payload: bytes | memoryview) -> int:
    return zlib.crc32(payload, zlib.crc32(_LENGTH.pack(length)))


def encode_record(record: AnyRecord) -> bytearray:
    """Encoded in place after room for the header: a large body is copied once."""
    out = bytearray(RECORD_HEADER.size)
    _encoder.encode_into(record, out, -1)
    length = len(out) - RECORD_HEADER.size
    with memoryview(out) as view:
        crc = _checksum(length, view[RECORD_HEADER.size :])
    RECORD_HEADER.pack_into(out, 0, RECORD_MARKER, length, crc)
    return out


def file_header() -> bytes:
    return FILE_HEADER.pack(MAGIC, FORMAT_VERSION)


@dataclass
class ReadResult:
    records: list[AnyRecord] = field(default_factory=list)
    end: int = 0  # offset after the last whole record (0: no valid header)
    torn: str | None = None  # what was cut off at the end, if anything
    repaired: str | None = None  # what --repair dropped (a damaged record, and all after it)


def _record_at(data: bytes, offset: int) -> tuple[bytes, int] | str:
    if len(data) - offset < RECORD_HEADER.size:
        return "a record header cut short"
    marker, length, crc = RECORD_HEADER.unpack_from(data, offset)
    if marker != RECORD_MARKER:
        return "no record marker"
    start = offset + RECORD_HEADER.size
    if start + length > len(data):
        return f"a record of {length} bytes cut short"
    payload = data[start : start + length]
    if _checksum(length, payload) != crc:
        return "a checksum mismatch"
    return payload, start + length


def read_journal(path: str, *, repair: bool = False) -> ReadResult:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return ReadResult()
    result = ReadResult()
    data_end = _data_end(data)  # what follows is the zero tail: free space
    header = file_header()
    if data_end < len(header) and header.startswith(data[:data_end]):
        # A new journal's header cut short (zeros after it, if its space was
        # allocated; a whole header ends in a non-zero byte): no record yet.
        result.torn = "a file header cut short" if data else None
        return result
    if len(data) < len(header) or not data.startswith(MAGIC):
        raise JournalCorrupt(path, 0, "not a brokerq journal")
    if (version := FILE_HEADER.unpack_from(data)[1]) != FORMAT_VERSION:
        reads = f"this brokerq reads {FORMAT_VERSION}"
        raise BrokerqError(f"journal {path} has format version {version}; {reads}")
    offset = FILE_HEADER.size
    while offset < data_end:
        found = _record_at(data, offset)
        if isinstance(found, str):
            following = _valid_records_following(data, offset, data_end)
            if not following:
                result.torn = f"{found} at byte {offset}"
            elif repair:
                result.repaired = (
                    f"dropped {following + 1} records ({data_end - offset} bytes) from byte"
                    f" {offset}: the damaged one ({found}) and the {following} valid ones"
                    " after it (not a torn tail)"
                )
            else:
                raise JournalCorrupt(path, offset, found)
            break
        payload, after = found
        try:
            result.records.append(_decoder.decode(payload))
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise JournalCorrupt(path, offset, f"undecodable record: {exc}") from exc
        offset = after
    result.end = offset
    return result


def _data_end(data: bytes) -> int:
    """Where the zero tail begins: counted a slice at a time, not copied."""
    end = len(data)
    while end > 0:
        start = max(0, end - _ZERO_SCAN)
        if data.count(0, start, end) != end - start:
            return start + len(data[start:end].rstrip(b"\0"))
        end = start
    return 0


def _valid_records_following(data: bytes, offset: int, data_end: int) -> int:
    """How many valid records after a bad one run to ``data_end`` (0: a torn tail)?
    Its length cannot be trusted: every later marker is tried as a start."""
    start = data.find(RECORD_MARKER, offset + 1, data_end)
    while start != -1:
        position, whole = start, 0
        while isinstance(found := _record_at(data, position), tuple):
            position, whole = found[1], whole + 1
        if whole and position >= data_end:  # (a record may end with zero bytes)
            return whole
        start = data.find(RECORD_MARKER, start + 1, data_end)
    return 0
