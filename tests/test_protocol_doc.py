"""docs/protocol.md's byte-level examples (section 9) are what the reference
encoder writes: each hex dump has the length it states, a length prefix that
matches, decodes to the frame shown, and re-encodes to the same bytes. A
third-language client is written from these dumps, so they must not drift.
Section 5.25's worked order of a stream's frames is replayed against a real
broker, which must send exactly the frames shown."""

from __future__ import annotations

import ast
import re
import socket
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest

from brokerq import protocol
from brokerq.testing import private_broker

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
HEADING = re.compile(r"^\*\*(Client → broker|Broker → client): (.*?)\*\* \((\d+) bytes\)(.*)$")
HEX = re.compile(r"^[0-9a-f]{2}$")


@dataclass
class Dump:
    direction: str
    title: str
    size: int
    shown: str  # the frame as a Python literal after the heading, if any
    data: bytes


def dumps() -> list[Dump]:
    """Every heading of section 9 followed by a hex block."""
    text = DOC.read_text()
    section = text[text.index("## 9. Worked examples") : text.index("## 10. Finding")]
    lines = section.splitlines()
    found = []
    for i, line in enumerate(lines):
        match = HEADING.match(line)
        if not match or i + 2 >= len(lines) or lines[i + 2] != "```":
            continue  # "identical to ...": no block of its own
        data = bytearray()
        for row in lines[i + 3 :]:
            if row == "```":
                break
            for token in row.split():
                if not HEX.match(token):
                    break
                data.append(int(token, 16))
        rest = match.group(4).strip().lstrip(",").strip()
        literal = rest.strip("`") if rest.startswith("`{") else ""
        found.append(
            Dump(match.group(1), match.group(2), int(match.group(3)), literal, bytes(data))
        )
    return found


DUMPS = dumps()


def test_section_9_has_the_examples_the_issue_asks_for() -> None:
    titles = " ".join(d.title for d in DUMPS)
    for op in ("hello", "put", "get", "reserve", "ack", "error"):
        assert f"`{op}`" in titles
    assert len(DUMPS) >= 12


@pytest.mark.parametrize("dump", DUMPS, ids=[f"{d.direction[0]}:{d.title}" for d in DUMPS])
def test_a_dump_is_the_reference_encoding_of_its_frame(dump: Dump) -> None:
    assert len(dump.data) == dump.size, "the stated size"
    (length,) = protocol.HEADER.unpack_from(dump.data)
    assert length == dump.size - protocol.HEADER_SIZE, "the length prefix"
    payload = dump.data[protocol.HEADER_SIZE :]
    if dump.direction == "Client → broker":
        protocol.decode_request(payload)  # a valid request
    else:
        protocol.decode_reply(payload)  # a valid reply
    as_map = msgspec.msgpack.decode(payload)
    assert msgspec.msgpack.encode(as_map) == payload, "the shortest encoding, keys in this order"
    if dump.shown:
        assert as_map == ast.literal_eval(dump.shown), "the frame shown above the dump"


def test_the_reference_client_writes_the_put_and_ack_dumps_byte_for_byte() -> None:
    """Frames whose every field is of its declared type come out of the
    reference encoder as dumped (a get's ``timeout: 0`` is an int in a
    float field, which the encoder keeps as given)."""
    by_title = {(d.direction, d.title): d for d in DUMPS}
    put = by_title[("Client → broker", "`put`")]
    key = bytes.fromhex("5be8d402773a1c9f") + bytes(8)
    frame = protocol.Put(id=2, queue="jobs", body=b"hi", key=key)
    assert protocol.encode_frame(frame) == put.data
    ack = by_title[("Client → broker", "`ack`")]
    assert protocol.encode_frame(protocol.Ack(id=8, msg_id=2, attempt=1)) == ack.data


FRAME_LINE = re.compile(r"^(client →|broker ←) (\{.*\})(?:\s+\(.*\))?$")


def test_the_worked_order_of_a_stream_is_what_a_broker_does() -> None:
    """Section 5.25's worked order of frames (get mode, prefetch 2, three
    messages ready), sent to a real broker: each ``client →`` frame as
    shown, and each ``broker ←`` frame is the next one the broker sends."""
    text = DOC.read_text()
    start = text.index("A worked order of frames (get mode")
    opening = text.index("```\n", start) + 4
    block = text[opening : text.index("\n```", opening)]
    steps = []
    for line in block.splitlines():
        match = FRAME_LINE.match(line)
        assert match, line
        steps.append((match.group(1), ast.literal_eval(match.group(2))))
    assert len(steps) == 9
    with private_broker() as client:
        client.queue("jobs").put_many([b"a", b"b", b"c"])
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(client.socket_path)
            send(sock, {"op": "hello", "version": protocol.PROTOCOL_VERSION, "id": 1})
            assert receive(sock)["op"] == "hello"
            for direction, frame in steps:
                if direction == "client →":
                    send(sock, frame)
                else:
                    assert receive(sock) == frame


def send(sock: socket.socket, frame: dict[str, object]) -> None:
    payload = msgspec.msgpack.encode(frame)
    sock.sendall(protocol.HEADER.pack(len(payload)) + payload)


def receive(sock: socket.socket) -> dict[str, object]:
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            assert chunk, "the broker closed the connection"
            data += chunk
        return data

    (length,) = protocol.HEADER.unpack(exactly(protocol.HEADER_SIZE))
    frame = msgspec.msgpack.decode(exactly(length))
    assert isinstance(frame, dict)
    return frame
