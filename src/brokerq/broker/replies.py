"""A connection's replies: in order, in one write for all that was buffered.
Under ``--fsync batch`` a put's reply, and every one after it, go to a commit
writer task that sends them as their fsyncs complete, while the connection
reads and answers on.
"""

from __future__ import annotations

import contextlib
from collections import deque
from typing import TYPE_CHECKING

import trio

from .. import protocol
from ..protocol import Error, FrameReader, StreamDelivery
from .core import limits
from .core.state import Stream
from .journal import JournalFailed
from .wakeup import STREAM_GONE, PeerGone

if TYPE_CHECKING:
    from .broker_base import BrokerBase
    from .feeds import LiveFeed


class Replies:
    def __init__(self, broker: BrokerBase, stream: trio.abc.Stream) -> None:
        self.broker = broker
        self.core = broker.core
        self.stream = stream
        self.reader = FrameReader(protocol.HANDSHAKE_FRAME_LIMIT)
        self.out = bytearray()
        self.scope = trio.CancelScope()
        self.unsent = 0  # requests answered since the replies were last written
        self.sync_to = 0  # journal bytes that must be synced before replies go out
        journal = broker.journal
        self.group_commit = journal is not None and journal.syncs == "batch"
        # Replies waiting for their group commit, in order: (journal offset
        # to be synced first, or 0; the bytes; how many requests they answer).
        self.pending: deque[tuple[int, bytearray, int]] = deque()
        self.pending_bytes = self.pending_requests = 0
        self.drained = trio.Event()  # set while nothing is pending
        self.drained.set()
        self.commit_wakeup = trio.Event()
        self.commit_scope: trio.CancelScope | None = None  # the writer's, once started
        self.commit_failed = False
        self.send_lock = trio.Lock()
        self.feed: LiveFeed | None = None  # set by the first live subscribe
        self.streams: dict[int, Stream] | None = None  # by id, once one is open
        self.ending = False  # an error with id 0 was answered: close once it is written

    def _reply_error(self, request_id: int, code: str, message: str) -> None:
        protocol.append_frame(self.out, Error(id=request_id, code=code, message=message))

    def _needs_sync(self) -> None:
        if self.group_commit:
            journal = self.broker.journal
            assert journal is not None
            self.sync_to = journal.written

    async def _flush(self) -> None:
        """Write the replies answered so far, or hand them to the commit writer."""
        answered, self.unsent = self.unsent, 0
        if not self.out:
            return
        if self.sync_to or self.pending:  # to the commit writer, in order
            self.pending.append((self.sync_to, self.out, answered))
            self.pending_bytes += len(self.out)
            self.pending_requests += answered
            self.sync_to, self.out = 0, bytearray()
            if self.drained.is_set():
                self.drained = trio.Event()
            if self.commit_scope is None:
                self.commit_scope = trio.CancelScope()
                self.broker.start_task(self._write_committed)
            self.commit_wakeup.set()
            too_many = self.pending_requests >= self.broker.config.max_pipelined
            if too_many or self.pending_bytes > limits.REPLY_BUFFER:
                await self._wait_drained()
            return
        try:
            await self._send(self.out)
        finally:
            self.out.clear()

    async def _drain(self) -> None:
        """Write every reply answered so far, and return once they are written."""
        await self._flush()
        if self.pending:
            await self._wait_drained()

    async def _wait_drained(self) -> None:
        await self.drained.wait()
        if self.commit_failed:
            raise PeerGone

    async def _write_committed(self) -> None:
        """Send the pending replies in order, each once its fsync is done; after a
        journal failure, one ``internal`` error instead, and the connection closes."""
        assert self.commit_scope is not None
        pending = self.pending
        with self.commit_scope:
            while True:
                if not pending:
                    await self.commit_wakeup.wait()
                    self.commit_wakeup = trio.Event()
                    continue
                sync_to, data, answered = pending[0]
                try:
                    if sync_to:
                        await self.broker.wait_synced(sync_to)
                    await self._send(data)
                except (JournalFailed, PeerGone) as exc:
                    if isinstance(exc, JournalFailed):
                        message = f"{exc}; nothing more was acknowledged"
                        error = Error(id=0, code="internal", message=message)
                        with contextlib.suppress(PeerGone):
                            await self._send(protocol.encode_frame(error))
                    self.commit_failed = True
                    self.pending.clear()
                    self.pending_bytes = self.pending_requests = 0
                    self.drained.set()
                    self.scope.cancel()
                    return
                pending.popleft()
                self.pending_bytes -= len(data)
                self.pending_requests -= answered
                if not pending:
                    self.drained.set()

    async def _send(self, data: bytes | bytearray) -> None:
        try:
            if self.feed is None and self.streams is None:
                await self.stream.send_all(data)
            else:
                async with self.send_lock:
                    if self.streams and (before := self.stream_frames()):
                        before += data  # deliveries made before these replies go first
                        data = before
                    await self.stream.send_all(data)
        except STREAM_GONE as exc:
            raise PeerGone from exc

    def stream_frames(self) -> bytearray:
        """The delivery frames not sent yet, which count as sent from now on."""
        out = bytearray()
        for stream_id, stream in (self.streams or {}).items():
            if not stream.messages:
                continue
            # (Even a deleted queue's: the client's takens count deliveries in order.)
            messages, stream.messages = stream.messages, []
            for msg in messages:
                delivery = StreamDelivery(
                    id=stream_id, msg_id=msg.id, body=msg.body, attempt=msg.attempts + 1
                )
                protocol.append_frame(out, delivery)
        return out
