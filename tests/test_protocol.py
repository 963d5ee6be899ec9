"""The sans-IO protocol: framing, decoding, errors. No sockets, no trio."""

from __future__ import annotations

import struct

import msgspec
import pytest

from brokerq import protocol, validation
from brokerq.errors import InvalidRequest, RemoteProtocolError
from brokerq.protocol import (
    FrameReader,
    Get,
    GetReply,
    Hello,
    InvalidRequestFrame,
    Join,
    Put,
    PutMany,
    Stats,
    TaskDone,
)

REQUESTS = [
    Hello(id=1, version=1, client="test"),
    Put(id=2, queue="jobs", body=b"\x00\xffbinary\n"),
    PutMany(id=3, queue="jobs", bodies=[b"a", b"", b"c" * 1000]),
    Get(id=4, queue="jobs", timeout=None),
    Get(id=5, queue="jobs", timeout=0.25),
    Stats(id=6),
    Stats(id=7, queue="jobs"),
    TaskDone(id=8, queue="jobs", n=3),
    Join(id=9, queue="jobs", timeout=1.5),
]


def _stream(frames: list[protocol.AnyFrame]) -> bytes:
    out = bytearray()
    for frame in frames:
        protocol.append_frame(out, frame)
    return bytes(out)


def _drain(reader: FrameReader) -> list[bytes]:
    frames = []
    while (frame := reader.next_frame()) is not None:
        frames.append(frame)
    return frames


def test_frame_is_big_endian_length_then_one_msgpack_map() -> None:
    data = protocol.encode_frame(Put(id=2, queue="q", body=b"hi"))
    (length,) = struct.unpack(">I", data[:4])
    assert length == len(data) - 4
    # Fields left at their defaults (here "key") are not sent.
    assert msgspec.msgpack.decode(data[4:]) == {"op": "put", "id": 2, "queue": "q", "body": b"hi"}


@pytest.mark.parametrize("request_frame", REQUESTS)
def test_every_request_round_trips(request_frame: protocol.AnyRequest) -> None:
    reader = FrameReader(1 << 20)
    reader.feed(protocol.encode_frame(request_frame))
    (payload,) = _drain(reader)
    assert protocol.decode_request(payload) == request_frame


def test_frames_fed_one_byte_at_a_time() -> None:
    reader = FrameReader(1 << 20)
    decoded = []
    for byte in _stream(list(REQUESTS)):
        reader.feed(bytes([byte]))
        decoded += [protocol.decode_request(p) for p in _drain(reader)]
    assert decoded == REQUESTS
    assert reader.buffered == 0


@pytest.mark.parametrize("split", [1, 3, 4, 5, 17, 100])
def test_frames_split_anywhere(split: int) -> None:
    data = _stream(list(REQUESTS))
    for cut in range(0, len(data), split):
        reader = FrameReader(1 << 20)
        reader.feed(data[:cut])
        first = _drain(reader)
        reader.feed(data[cut:])
        payloads = first + _drain(reader)
        assert [protocol.decode_request(p) for p in payloads] == REQUESTS


def test_many_frames_in_one_feed() -> None:
    reader = FrameReader(1 << 20)
    reader.feed(_stream([Put(id=i, queue="q", body=b"x" * i) for i in range(1, 500)]))
    assert len(_drain(reader)) == 499


def test_length_over_the_limit_is_a_remote_protocol_error() -> None:
    reader = FrameReader(max_frame_size=100)
    reader.feed(struct.pack(">I", 101))
    with pytest.raises(RemoteProtocolError, match="over the limit"):
        reader.next_frame()


def test_frame_at_the_limit_is_fine() -> None:
    reader = FrameReader(max_frame_size=10)
    reader.feed(struct.pack(">I", 10) + b"0123456789")
    assert reader.next_frame() == b"0123456789"


def test_garbage_bytes_are_a_remote_protocol_error() -> None:
    with pytest.raises(RemoteProtocolError, match="not valid MessagePack"):
        protocol.decode_request(b"\xc1\xc1\xc1")


@pytest.mark.parametrize(
    ("obj", "expected_id"),
    [
        ({"op": "frobnicate", "id": 5}, 5),
        ({"op": "put", "id": 6, "queue": 7, "body": b"x"}, 6),
        ({"op": "put", "id": 8, "queue": "q"}, 8),
        ({"op": "get"}, 0),
        ({"id": 9}, 9),
        ([1, 2, 3], 0),
        ({"op": "get", "id": "ten", "queue": "q"}, 0),
        ({"op": "get", "id": True, "queue": 1}, 0),
    ],
)
def test_wrong_shape_is_an_invalid_request_echoing_the_id(obj: object, expected_id: int) -> None:
    with pytest.raises(InvalidRequestFrame) as info:
        protocol.decode_request(msgspec.msgpack.encode(obj))
    assert info.value.request_id == expected_id


def test_invalid_utf8_is_a_remote_protocol_error() -> None:
    # {"op": "put", "id": 1, "queue": <str 0xff>, "body": b""}: not UTF-8.
    payload = msgspec.msgpack.encode({"op": "put", "id": 1, "queue": "Q", "body": b""})
    payload = payload.replace(b"\xa1Q", b"\xa1\xff")
    with pytest.raises(RemoteProtocolError):
        protocol.decode_request(payload)
    with pytest.raises(RemoteProtocolError):
        protocol.decode_reply(payload)


def test_absent_timeout_means_wait_for_ever() -> None:
    payload = msgspec.msgpack.encode({"op": "get", "id": 1, "queue": "q"})
    assert protocol.decode_request(payload) == Get(id=1, queue="q", timeout=None)


def test_integer_timeout_is_accepted() -> None:
    payload = msgspec.msgpack.encode({"op": "get", "id": 1, "queue": "q", "timeout": 3})
    assert protocol.decode_request(payload) == Get(id=1, queue="q", timeout=3.0)


def test_reply_decoding() -> None:
    data = protocol.encode_frame(GetReply(id=3, msg_id=9, body=b"hi"))
    assert protocol.decode_reply(data[4:]) == GetReply(id=3, msg_id=9, body=b"hi")
    with pytest.raises(RemoteProtocolError):
        protocol.decode_reply(msgspec.msgpack.encode({"op": "get", "id": 3}))


def test_reader_compacts_its_buffer() -> None:
    reader = FrameReader(1 << 20)
    frame = protocol.encode_frame(Put(id=1, queue="q", body=b"x" * 100))
    for _ in range(1000):
        reader.feed(frame)
        assert reader.next_frame() is not None
    assert len(reader._buffer) <= 2 * len(frame)


@pytest.mark.parametrize("name", ["jobs", "a" * 255, "émoji ✓", "with space", "jobs:dead"])
def test_valid_queue_names(name: str) -> None:
    validation.validate_queue_name(name)


@pytest.mark.parametrize("name", ["", "a" * 256, "tab\there", "nl\n", "\x00"])
def test_invalid_queue_names(name: str) -> None:
    with pytest.raises(InvalidRequest):
        validation.validate_queue_name(name)


def test_colon_is_reserved_for_put() -> None:
    with pytest.raises(InvalidRequest, match="reserved"):
        validation.validate_queue_name("jobs:dead", for_put=True)
