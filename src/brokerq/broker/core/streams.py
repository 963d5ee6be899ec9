"""Streams (``consume``), the core's side (the I/O is in streaming.py). A
message delivered to a stream is neither removed nor leased: it stays
ready, as far as the journal knows, until the client says it was taken.
"""

from __future__ import annotations

from ...errors import InvalidRequest
from ...validation import validate_lease, validate_queue_name
from .base import CoreBase
from .records import AttemptsRecord, DeleteRecord
from .state import Stream, Waiter


class Streams(CoreBase):
    def consume(
        self,
        name: str,
        prefetch: int,
        now: float,
        *,
        lease: float | None = None,
        reserve: bool = False,
        token: object = None,
        owner: object = None,
        stream_id: int = 0,
    ) -> tuple[Stream, list[Waiter]]:
        """Open a stream with ``prefetch`` credits at the back of the line;
        returns it and the waiters served (itself, if messages were ready)."""
        validate_queue_name(name)
        if isinstance(prefetch, bool) or prefetch < 1:
            raise InvalidRequest(f"prefetch must be 1 or more, not {prefetch}")
        validate_lease(lease)
        q = self._queue(name)
        length = (lease or q.lease or self.default_lease) if reserve else None
        stream = Stream(
            name, token, None, owner, credit=prefetch, length=length, stream_id=stream_id
        )
        q.streams += 1
        q.waiters[stream] = None
        return stream, self._serve_line(q, now)

    def taken(self, stream: Stream, n: int, now: float) -> list[Waiter]:
        """The client took the first ``n`` messages of ``stream``: removed (get
        mode) or leased to its owner; their credit comes back. The client has
        handed them out already, so this happens whatever the disk says.
        Messages that went meanwhile (queue deleted) only give their credit back."""
        if isinstance(n, bool) or not 1 <= n <= len(stream.held):
            raise InvalidRequest(
                f"taken {n} of stream {stream.stream_id}, which has "
                f"{len(stream.held)} message(s) delivered and not taken"
            )
        q = self._queue(stream.queue)
        messages = [stream.held.popleft() for _ in range(n)]
        live = [m for m in messages if m.alive]
        for msg in live:
            del self._prefetched[msg.id]
        q.prefetched -= len(live)
        if stream.length is None:
            if live:
                self._write_or_owe(DeleteRecord(ids=[m.id for m in live], got=True))
            for msg in live:
                self._forget(q, msg)
        else:
            for msg in live:
                self._write_or_owe(AttemptsRecord(id=msg.id, attempts=msg.attempts + 1))
                self._lease(q, msg, now, stream.length, stream.owner, journaled=True)
        q.delivered_total += len(live)
        stream.credit += n
        if stream.active and stream not in q.waiters:
            q.waiters[stream] = None
        return self._serve_line(q, now)

    def cancel_stream(self, stream: Stream, now: float) -> tuple[int, list[Waiter]]:
        """End ``stream``: what it holds not taken goes back to its place
        (nothing written: the journal has them ready all along), or is dropped
        if its ttl ran out. Returns how many went back, and the waiters served."""
        if not stream.active:
            return 0, []
        stream.active = False
        q = self._queue(stream.queue)
        q.waiters.pop(stream, None)
        q.streams -= 1
        held = [m for m in stream.held if m.alive]
        stream.held.clear()
        stream.messages = []
        returned = 0
        for msg in held:
            del self._prefetched[msg.id]
            q.prefetched -= 1
            if msg.expires_at <= now:  # its ttl ran out while it was prefetched
                self._write_or_owe(DeleteRecord(ids=[msg.id]))
                self._expired(q, msg)
                continue
            returned += 1
            q.ready.insert(msg)
        return returned, self._serve_line(q, now)
