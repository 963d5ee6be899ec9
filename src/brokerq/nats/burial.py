"""Buried messages on JetStream: set aside by ``bury``, put back by ``kick``.

A queue's buried messages live in a stream of their own, ``BB_<escaped>``
(naming.py), where no consumer of the queue sees them: the copy of the
queue's message ``seq`` is on the subject ``bq.b.<escaped>.<seq>``. Moving
a message between two streams takes steps a client may die between; each
pair below says what that leaves, and why it is neither lost nor doubled.

``bury``: (1) publish the copy, (2) ack the original. Dying between them
leaves the original unacked: it comes back after its lease, and its
redelivery finds the copy (:func:`finish_if_buried`) and is acked instead
of delivered. One buried copy, no delivery.

``kick``: (0) delete the original if it is still in the queue (a bury whose
ack never came: else it would come back beside its kicked copy; one
fetched already finds neither it nor its copy, and is dropped too),
(1) put the copy back under an id fixed by the copy's own,
(2) delete the copy. Dying after (0) leaves the copy buried, for the next
kick; dying after (1) leaves the copy buried too, and a kick within the
queue's duplicate window (2 minutes) puts it again under the same id, so
it is dropped; a kick later than that puts it a second time: the one
duplicate this allows (at-least-once, docs/nats.md). A kick on
``<queue>:dead`` buries a ready dead letter, then kicks it: the same steps.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg, StorageType, StreamConfig

from ..errors import Full, InvalidRequest
from . import naming, rules
from .failures import NO_STREAM, asked_again

#: The buried copy's header with its original's put key: with the body, it
#: tells the original from another message under the same sequence (a
#: queue deleted and made again starts its sequences at 1).
ORIGINAL_KEY = "Bq-Original-Key"
#: As the queue stream's: a kick of one copy twice within it puts it once.
DUPLICATE_WINDOW = 120.0
#: JetStream's error codes for a message to delete that is not there, and
#: for a stream that is not there.
_NO_MESSAGE = 10057
_NO_STREAM_CODE = 10059

#: A put to the queue under the given headers (its key among them), as
#: ``AsyncNatsQueue`` puts: sent again under that key while no answer comes.
Put = Callable[[bytes, dict[str, str]], Awaitable[int]]


class _Client(Protocol):
    timeout: float

    @property
    def js(self) -> JetStreamContext: ...


class Home(Protocol):
    """The queue whose messages are buried and kicked."""

    name: str

    @property
    def client(self) -> _Client: ...


async def bury(home: Home, msg: Msg) -> None:
    """Set ``msg`` aside: copy it to the buried stream, then ack it (see the
    module's docstring for a death between the two). The copy's id is new
    each time: only this call sends it, and a redelivery never sends it again."""
    js, timeout = home.client.js, home.client.timeout
    subject = naming.buried_subject(home.name, msg.metadata.sequence.stream)
    headers = _copy_headers(msg.headers)
    try:
        await js.publish(subject, msg.data, headers=headers, timeout=timeout)
    except NO_STREAM:  # the queue's first bury (or its buried stream deleted)
        await _make_stream(js, home.name)
        await js.publish(subject, msg.data, headers=headers, timeout=timeout)
    await msg.ack_sync(timeout=timeout)


def _copy_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    """The original's headers for its copy: its put key set aside (see
    ORIGINAL_KEY), its delay dropped (it was due, and a kicked copy's
    attempts count from 1, as a new message's), and a key of the copy's own."""
    copied = dict(headers or {})
    key = copied.pop(rules.MSG_ID, None)
    if key is not None:
        copied[ORIGINAL_KEY] = key
    copied.pop(rules.NOT_BEFORE, None)
    copied[rules.MSG_ID] = f"buried-{uuid.uuid4().hex}"
    return copied


async def _make_stream(js: JetStreamContext, queue: str) -> None:
    """The buried stream, with the queue stream's replicas. Idempotent: two
    clients burying at once make it with the same config."""
    queue_stream = await js.stream_info(naming.stream_name(queue))
    await js.add_stream(
        StreamConfig(
            name=naming.buried_stream_name(queue),
            subjects=[naming.buried_subjects(queue)],
            storage=StorageType.FILE,
            num_replicas=queue_stream.config.num_replicas,
            duplicate_window=DUPLICATE_WINDOW,
        )
    )


async def finish_if_buried(home: Home, msg: Msg) -> bool:
    """Whether ``msg`` was buried already, by a client that died before its
    ack; if so the bury is finished here (acked, not delivered). Asked of
    redeliveries only: a first delivery cannot have been buried yet.

    A kick deletes such an original before its copy, so a redelivery
    fetched before the kick and looked up after it finds no copy, but no
    original either: it is dropped too, not delivered beside the kicked copy."""
    if msg.metadata.num_delivered <= 1:
        return False
    js, within = home.client.js, home.client.timeout
    seq = msg.metadata.sequence.stream
    buried_in, subject = naming.buried_stream_name(home.name), naming.buried_subject(home.name, seq)
    try:
        # (Asked again while unanswered: a redelivery is what a cluster that
        # lost a node gives out, while it may still be electing leaders.)
        copy = await asked_again(lambda: js.get_msg(buried_in, subject=subject), within)
        buried = _same_message(copy, msg.headers, msg.data)
    except nats.js.errors.NotFoundError as exc:
        if exc.err_code == _NO_STREAM_CODE:
            return False  # nothing buried, so nothing kicked: no more to ask
        buried = not await _in_stream(js, naming.stream_name(home.name), seq, within)
    if buried:
        await msg.ack_sync(timeout=home.client.timeout)
    return buried


async def _in_stream(js: JetStreamContext, stream: str, seq: int, within: float) -> bool:
    """Whether ``stream`` holds message ``seq`` (a work queue's: not acked yet)."""
    try:
        await asked_again(lambda: js.get_msg(stream, seq=seq), within)
    except nats.js.errors.NotFoundError:
        return False
    return True


def _same_message(copy: RawStreamMsg, headers: Mapping[str, str] | None, data: bytes) -> bool:
    """Whether ``copy`` is the buried copy of the message with these headers and body."""
    key = (headers or {}).get(rules.MSG_ID)
    return (copy.headers or {}).get(ORIGINAL_KEY) == key and (copy.data or b"") == bytes(data)


def check_count(n: int) -> None:
    """A kick's ``n``: an int, 1 or more (the local broker's rule)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise InvalidRequest(f"kick needs n >= 1, not {n!r}")


async def kick(home: Home, n: int, put: Put) -> int:
    """Put up to ``n`` buried messages back in the queue, the earliest buried
    first; returns how many this call moved. Two clients kicking at once may
    both take a copy: both put it under one id (one is dropped), and only the
    one whose delete of the copy succeeds counts it, while the other goes on
    to the next. A full queue ends the kick (``Full`` if it moved none)."""
    check_count(n)
    kicked, after = 0, 0
    while kicked < n:
        copy = await _next_copy(home.client.js, home.name, after)
        if copy is None or copy.seq is None:
            break
        after = copy.seq
        try:
            kicked += await _kick_one(home, copy, after, put)
        except Full:
            if not kicked:
                raise
            break
    return kicked


async def _next_copy(js: JetStreamContext, queue: str, after: int) -> RawStreamMsg | None:
    """The earliest buried copy after sequence ``after`` of the buried stream, if any."""
    try:
        return await js.get_msg(
            naming.buried_stream_name(queue),
            seq=after + 1,
            subject=naming.buried_subjects(queue),
            next=True,
        )
    except nats.js.errors.NotFoundError:  # none left, or no buried stream
        return None


async def _kick_one(home: Home, copy: RawStreamMsg, seq: int, put: Put) -> int:
    """Steps (0), (1), (2) of a kick (the module's docstring) of ``copy``,
    message ``seq`` of the buried stream; 1 if this call deleted the copy,
    0 if another kick did first."""
    js = home.client.js
    await _drop_original(js, home.name, copy)
    buried_headers = copy.headers or {}
    headers = {k: v for k, v in buried_headers.items() if k not in (ORIGINAL_KEY, rules.MSG_ID)}
    headers[rules.MSG_ID] = naming.kicked_id(buried_headers.get(rules.MSG_ID, f"seq{seq}"))
    await put(copy.data or b"", headers)
    return int(await _delete(js, naming.buried_stream_name(home.name), seq))


async def _drop_original(js: JetStreamContext, queue: str, copy: RawStreamMsg) -> None:
    """Delete the original of ``copy`` if it is still in the queue: its bury
    copied it, then died before the ack. (A redelivery of it fetched before
    this finds it gone: see :func:`finish_if_buried`.)"""
    stream = naming.stream_name(queue)
    seq = naming.buried_from(copy.subject or "")
    try:
        original = await js.get_msg(stream, seq=seq)
    except nats.js.errors.NotFoundError:
        return  # acked, as it should be
    if _same_message(copy, original.headers, original.data or b""):
        await _delete(js, stream, seq)


async def _delete(js: JetStreamContext, stream: str, seq: int) -> bool:
    """Delete message ``seq``; False if it was not there (deleted by another)."""
    try:
        return bool(await js.delete_msg(stream, seq))
    except nats.js.errors.NotFoundError:
        return False
    except nats.js.errors.Error as exc:
        if getattr(exc, "err_code", None) == _NO_MESSAGE:
            return False
        raise


async def count(js: JetStreamContext, queue: str) -> int:
    """How many messages of ``queue`` are buried (a bury whose ack has not
    come yet is counted here and, until its redelivery, in the queue too)."""
    try:
        info = await js.stream_info(naming.buried_stream_name(queue))
    except nats.js.errors.NotFoundError:
        return 0
    return int(info.state.messages)


async def delete(js: JetStreamContext, queue: str) -> int:
    """Delete ``queue``'s buried stream; returns how many messages it held."""
    try:
        held = await count(js, queue)
        await js.delete_stream(naming.buried_stream_name(queue))
    except nats.js.errors.NotFoundError:
        return 0
    return held
