"""The brokerq wire protocol, sans-IO: bytes in, frames out, and back.

``docs/protocol.md`` is the normative description of the frames: change it
first. Every transport (the broker, both clients, the tests) drives these
same pieces: :class:`FrameReader`, the decoders, :func:`append_frame`.
"""

from __future__ import annotations

import struct
from typing import Any, Final, TypeAlias

import msgspec

from .errors import LocalProtocolError, RemoteProtocolError

PROTOCOL_VERSION: Final = 1
HEADER: Final = struct.Struct(">I")
HEADER_SIZE: Final = HEADER.size

DEFAULT_MAX_MESSAGE_SIZE: Final = 16 * 1024 * 1024
#: Room in a frame beyond the largest body: the map, the keys, the queue name.
FRAME_OVERHEAD: Final = 64 * 1024
#: What one message adds to a batch reply beyond its body: a bin header (up
#: to 5 bytes) and its id (an int, up to 9), rounded up.
MESSAGE_OVERHEAD: Final = 16
#: The limit a client applies before the broker's ``hello`` reply tells it more.
HANDSHAKE_FRAME_LIMIT: Final = 64 * 1024
#: Bytes of publishes a broker holds for one live subscriber before dropping it.
DEFAULT_SUBSCRIBER_BUFFER: Final = 8 * 1024 * 1024


def max_frame_size(max_message_size: int) -> int:
    """The largest frame a broker with this body limit accepts or sends."""
    return max_message_size + FRAME_OVERHEAD


# Requests (client -> broker). An absent field takes the default below; a
# ``timeout`` absent or nil waits for ever, 0 does not wait.


class Request(msgspec.Struct, frozen=True, kw_only=True, tag_field="op", omit_defaults=True):
    id: int  # echoed by the reply


class QueueRequest(Request, frozen=True):
    queue: str


class LeaseRequest(Request, frozen=True):  # of a reserved message
    msg_id: int
    attempt: int  # the delivery whose lease it is


class Hello(Request, frozen=True, tag="hello"):
    version: int
    client: str = ""


class Put(QueueRequest, frozen=True, tag="put"):
    body: bytes
    key: bytes | None = None  # a retry with the same key gets the first put's id, enqueues nothing
    priority: int = 0  # higher first; FIFO within a priority
    delay: float = 0.0  # seconds before it becomes ready
    ttl: float | None = None  # seconds after which, still waiting, it is dropped
    timeout: float | None = None  # how long to wait for room in a full queue


class PutMany(QueueRequest, frozen=True, tag="put_many"):
    bodies: list[bytes]  # all with the same priority, delay and ttl
    keys: list[bytes] | None = None
    priority: int = 0
    delay: float = 0.0
    ttl: float | None = None
    timeout: float | None = None


class Get(QueueRequest, frozen=True, tag="get"):
    timeout: float | None = None


class GetMany(QueueRequest, frozen=True, tag="get_many"):
    n: int
    timeout: float | None = None


class Reserve(QueueRequest, frozen=True, tag="reserve"):  # a get, the broker's until acked
    timeout: float | None = None
    lease: float | None = None  # seconds (absent: the queue's), then it is delivered again


class GetAny(Request, frozen=True, tag="get_any"):  # a get from the first of several queues
    queues: list[str]  # in the order they are tried; parked on all when none has a message
    timeout: float | None = None


class ReserveAny(Request, frozen=True, tag="reserve_any"):  # a reserve from the first of several
    queues: list[str]
    timeout: float | None = None
    lease: float | None = None


class Ack(LeaseRequest, frozen=True, tag="ack"):
    as_get: bool = False  # gone as a get takes it: its task unfinished until a task_done


class Release(LeaseRequest, frozen=True, tag="release"):
    delay: float = 0.0


class Bury(LeaseRequest, frozen=True, tag="bury"): ...


class Touch(LeaseRequest, frozen=True, tag="touch"):
    lease: float | None = None


class Kick(QueueRequest, frozen=True, tag="kick"):
    n: int = 1


class Configure(QueueRequest, frozen=True, tag="configure"):  # absent: left as it is
    max_deliveries: int | None = None
    lease: float | None = None
    maxsize: int | None = None
    max_bytes: int | None = None


class Delete(QueueRequest, frozen=True, tag="delete"): ...  # messages, settings and all


class Peek(QueueRequest, frozen=True, tag="peek"): ...


class Purge(QueueRequest, frozen=True, tag="purge"): ...


class Stats(Request, frozen=True, tag="stats"):
    queue: str | None = None  # absent: the broker's


class Queues(Request, frozen=True, tag="queues"): ...


class Publish(Request, frozen=True, tag="publish"):
    topic: str  # a copy of body to every subscriber
    body: bytes
    key: bytes | None = None  # a retry gives each subscriber queue at most one copy
    priority: int = 0
    ttl: float | None = None


class Subscribe(Request, frozen=True, tag="subscribe"):
    topic: str
    queue: str | None = None  # gets a copy of every later publish; absent: ``event`` frames


class Unsubscribe(Request, frozen=True, tag="unsubscribe"):
    topic: str
    queue: str | None = None


class TaskDone(QueueRequest, frozen=True, tag="task_done"):
    n: int = 1  # queue.Queue.task_done, n times


class Join(QueueRequest, frozen=True, tag="join"):  # until no task is unfinished
    timeout: float | None = None


class Consume(QueueRequest, frozen=True, tag="consume"):  # a stream (docs/protocol.md 5.25)
    prefetch: int  # ``delivery`` frames sent unasked, not yet taken
    mode: str = "get"  # "get" or "reserve": what a taken message becomes
    lease: float | None = None  # reserve mode: the lease a taken message gets


class Taken(Request, frozen=True, tag="taken"):  # no reply
    n: int = 1  # the first n deliveries not taken of the stream ``id`` are the client's


class Cancel(Request, frozen=True, tag="cancel"):
    stream: int  # the consume request's id


class Ping(Request, frozen=True, tag="ping"): ...


class Stop(Request, frozen=True, tag="stop"): ...


# fmt: off
AnyRequest: TypeAlias = (
    Hello | Put | PutMany | Get | GetMany | Reserve | GetAny | ReserveAny | Ack | Release |
    Bury | Touch | Kick | Configure | Delete | Peek | Purge | Stats | Queues | Publish |
    Subscribe | Unsubscribe | TaskDone | Join | Consume | Taken | Cancel | Ping | Stop
)
# fmt: on


# Replies (broker -> client). A reply's ``op`` is its request's, or "error";
# ``event`` and ``delivery`` frames come unasked, even before the reply to
# the subscribe or consume request whose id they carry.


class Reply(msgspec.Struct, frozen=True, kw_only=True, tag_field="op", omit_defaults=True):
    id: int


class HelloReply(Reply, frozen=True, tag="hello"):
    version: int
    server: str
    pid: int
    max_message_size: int
    max_frame_size: int


class PutReply(Reply, frozen=True, tag="put"):
    msg_id: int


class PutManyReply(Reply, frozen=True, tag="put_many"):
    msg_ids: list[int]


class GetReply(Reply, frozen=True, tag="get"):
    msg_id: int
    body: bytes


class GetManyReply(Reply, frozen=True, tag="get_many"):
    msg_ids: list[int]
    bodies: list[bytes]


class ReserveReply(Reply, frozen=True, tag="reserve"):
    msg_id: int
    body: bytes
    attempt: int
    lease: float  # seconds until the lease runs out


class GetAnyReply(Reply, frozen=True, tag="get_any"):
    queue: str  # the queue it came from
    msg_id: int
    body: bytes


class ReserveAnyReply(Reply, frozen=True, tag="reserve_any"):
    queue: str
    msg_id: int
    body: bytes
    attempt: int
    lease: float


class AckReply(Reply, frozen=True, tag="ack"): ...


class ReleaseReply(Reply, frozen=True, tag="release"): ...


class BuryReply(Reply, frozen=True, tag="bury"): ...


class TouchReply(Reply, frozen=True, tag="touch"):
    lease: float


class KickReply(Reply, frozen=True, tag="kick"):
    count: int


class ConfigureReply(Reply, frozen=True, tag="configure"):
    config: dict[str, Any]


class DeleteReply(Reply, frozen=True, tag="delete"):
    count: int


class PeekReply(Reply, frozen=True, tag="peek"):
    msg_id: int
    body: bytes


class PurgeReply(Reply, frozen=True, tag="purge"):
    count: int


class StatsReply(Reply, frozen=True, tag="stats"):
    stats: dict[str, Any]


class QueuesReply(Reply, frozen=True, tag="queues"):
    names: list[str]


class PublishReply(Reply, frozen=True, tag="publish"):
    copies: int  # copies enqueued to subscriber queues
    live: int  # live subscribers it was sent to


class SubscribeReply(Reply, frozen=True, tag="subscribe"): ...


class UnsubscribeReply(Reply, frozen=True, tag="unsubscribe"):
    found: bool  # False: there was no such subscription


class Event(Reply, frozen=True, tag="event"):  # a publish, to a live subscriber
    topic: str
    body: bytes


class TaskDoneReply(Reply, frozen=True, tag="task_done"):
    unfinished: int  # the queue's unfinished tasks left


class JoinReply(Reply, frozen=True, tag="join"): ...


class ConsumeReply(Reply, frozen=True, tag="consume"):
    lease: float  # reserve mode: the lease a taken message gets, in seconds; get mode: 0


class StreamDelivery(Reply, frozen=True, tag="delivery"):  # a message, on a stream
    msg_id: int
    body: bytes
    attempt: int  # the attempt a reserve-mode taken makes it (deliveries so far, plus 1)


class CancelReply(Reply, frozen=True, tag="cancel"):
    returned: int  # messages delivered and not taken that went back to the queue


class PingReply(Reply, frozen=True, tag="ping"):
    pid: int


class StopReply(Reply, frozen=True, tag="stop"): ...


class Error(Reply, frozen=True, tag="error"):
    code: str
    message: str
    version: int | None = None  # with code "version": the protocol the broker speaks


# fmt: off
AnyReply: TypeAlias = (
    HelloReply | PutReply | PutManyReply | GetReply | GetManyReply | ReserveReply | GetAnyReply |
    ReserveAnyReply | AckReply |
    ReleaseReply | BuryReply | TouchReply | KickReply | ConfigureReply | DeleteReply |
    PeekReply | PurgeReply | StatsReply | QueuesReply | PublishReply | SubscribeReply |
    UnsubscribeReply | Event | TaskDoneReply | JoinReply | ConsumeReply | StreamDelivery |
    CancelReply | PingReply | StopReply | Error
)
# fmt: on

# Built once: msgspec compiles the schema on construction.
_encoder: Final = msgspec.msgpack.Encoder()
_request_decoder: Final[msgspec.msgpack.Decoder[AnyRequest]] = msgspec.msgpack.Decoder(AnyRequest)
_reply_decoder: Final[msgspec.msgpack.Decoder[AnyReply]] = msgspec.msgpack.Decoder(AnyReply)
_loose_decoder: Final = msgspec.msgpack.Decoder()


class InvalidRequestFrame(LocalProtocolError):
    """A MessagePack map that is not a valid request: answered ``bad_request``
    (with ``request_id`` 0, unreadable or reserved, the connection closes)."""

    def __init__(self, message: str, request_id: int) -> None:
        super().__init__(message)
        self.request_id = request_id


def _peek_id(payload: bytes) -> int:
    """The ``id`` of a payload that failed validation, or 0 if unreadable."""
    try:
        obj = _loose_decoder.decode(payload)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return 0
    value = obj.get("id") if isinstance(obj, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def decode_request(payload: bytes) -> AnyRequest:
    """Decode a client's frame payload: InvalidRequestFrame for MessagePack of
    the wrong shape, RemoteProtocolError for bytes that are not."""
    try:
        request = _request_decoder.decode(payload)
    except msgspec.ValidationError as exc:
        raise InvalidRequestFrame(str(exc), _peek_id(payload)) from exc
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise RemoteProtocolError(f"frame is not valid MessagePack: {exc}") from exc
    if request.id == 0:
        raise InvalidRequestFrame("request id 0 is reserved for errors about the connection", 0)
    return request


def decode_reply(payload: bytes) -> AnyReply:
    """Decode one frame payload sent by a broker."""
    try:
        return _reply_decoder.decode(payload)
    except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise RemoteProtocolError(f"broker sent an invalid reply: {exc}") from exc


def append_frame(out: bytearray, frame: Request | Reply) -> None:
    """Append ``frame``, length prefix and all, to ``out`` (a reused buffer)."""
    start = len(out)
    out += b"\0\0\0\0"
    _encoder.encode_into(frame, out, -1)
    HEADER.pack_into(out, start, len(out) - start - HEADER_SIZE)


def encode_frame(frame: Request | Reply) -> bytes:
    """One frame as bytes; for the cold paths (handshake, errors, tests)."""
    out = bytearray()
    append_frame(out, frame)
    return bytes(out)


class FrameReader:
    """Splits a byte stream into frame payloads (None: it needs more). A length
    over ``max_frame_size`` is RemoteProtocolError: the caller closes the connection."""

    __slots__ = ("_buffer", "_start", "max_frame_size")

    def __init__(self, max_frame_size: int) -> None:
        self.max_frame_size = max_frame_size
        self._buffer = bytearray()
        self._start = 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._start and self._start >= len(self._buffer) // 2:
            # Drop consumed bytes now and then, not on every frame.
            del self._buffer[: self._start]
            self._start = 0
        self._buffer += data

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return len(self._buffer) - self._start

    def next_frame(self) -> bytes | None:
        start, buffer = self._start, self._buffer
        if len(buffer) - start < HEADER_SIZE:
            return None
        (length,) = HEADER.unpack_from(buffer, start)
        if length > self.max_frame_size:
            raise RemoteProtocolError(
                f"frame of {length} bytes is over the limit of {self.max_frame_size}"
            )
        end = start + HEADER_SIZE + length
        if len(buffer) < end:
            return None
        self._start = end
        with memoryview(buffer) as view:  # one copy, not a slice and then a copy
            return bytes(view[start + HEADER_SIZE : end])
