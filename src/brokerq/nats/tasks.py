"""A queue's unfinished tasks on JetStream: what task_done, join and unfinished_tasks read.

A queue's stream has work-queue retention: a message acked, expired, moved
to the dead letters or purged is gone from it. So a queue's unfinished
tasks are the messages still in its stream (ready or reserved) plus the
gets whose ``task_done`` has not come yet; JetStream counts the first, and
the second is kept here, one key per queue in a key-value bucket, changed
by compare-and-set so that consumers racing on it lose no change. A reserve
and its ack pay nothing: the ack is the task's end, as on the local broker.

A get counts itself here before it acks its message, so at every moment a
got message is counted at least once (in the stream, or here, or both
while the ack is on its way): a join never sees 0 while one is in a
consumer's hand. A getter killed between the count and the ack leaves one
unfinished task for ever while its message comes back (after its lease) to
count again, as a local getter killed before its ``task_done`` leaves one.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import Header, StorageType
from nats.js.kv import KeyValue

from ..errors import BrokerqError, InvalidRequest, JoinTimeout
from ..validation import validate_timeout
from .aio_message import not_supported
from .failures import asked_again

#: The key-value bucket of every queue's outstanding gets (its stream is
#: ``KV_bq_tasks``: not a queue's, so ``queues()`` does not list it).
BUCKET = "bq_tasks"
KV_STREAM = f"KV_{BUCKET}"
#: The header of a key's deletion or purge, and its values.
KV_OPERATION = "KV-Operation"
_FORGOTTEN = frozenset({"DEL", "PURGE"})
#: JetStream's refusal of a write whose expected last revision is not the key's.
_WRONG_REVISION = frozenset({10071, 10164})
#: A join's first and longest pause between two looks at the count.
JOIN_PAUSE = 0.02
JOIN_PAUSE_MAX = 0.5


class TaskHost(Protocol):
    """What the count needs of its client (:class:`brokerq.nats.AsyncNatsClient`)."""

    timeout: float
    replicas: int

    @property
    def js(self) -> JetStreamContext: ...

    def next_key(self) -> str: ...


class _Conflict(Exception):
    """Another client changed the count since it was read: read it again."""


class _TooFew(Exception):
    """A task_done for more gets than are outstanding."""


AckStep = Callable[[], Awaitable[object]]


class TaskCount:
    """The gets of one queue whose ``task_done`` has not come, kept in ``BUCKET``.

    The value last written or read is kept with its revision, so a change
    is usually one round trip (a write expecting that revision); a client
    that finds it stale reads again and retries.
    """

    def __init__(self, client: TaskHost, queue: str, stream: str) -> None:
        self.client = client
        self.queue = queue
        self.stream = stream
        self.key = stream  # (letters, digits, '-' and '_': a valid key)
        self._subject = f"$KV.{BUCKET}.{self.key}"
        self._kv: KeyValue | None = None
        self._kv_js: JetStreamContext | None = None
        self._known: tuple[int, int] | None = None  # (count, revision)

    async def unfinished(self) -> int:
        """The stream's messages, then the outstanding gets: read in that
        order, as a get counts itself before its ack takes the message out,
        so a message in flight between the two is never missed."""
        messages = await self._messages()
        outstanding, _ = await self._read()
        return messages + outstanding

    async def outstanding(self) -> int:
        return (await self._read())[0]

    async def acked_as_got(self, acks: Sequence[AckStep]) -> list[BaseException | None]:
        """Run the acks of messages taken as gets, each counted first as a
        task whose ``task_done`` is owed; returns each ack's error or None.
        A failed or cancelled ack's count is given back: its body is not
        returned, so no ``task_done`` will come for it (its message is back
        in the stream, counted there, or gone with no one to finish it)."""
        await self._count(len(acks))
        try:
            done = await asyncio.gather(*(ack() for ack in acks), return_exceptions=True)
        except BaseException:
            await self._give_back(len(acks))
            raise
        failed = sum(isinstance(result, BaseException) for result in done)
        if failed:
            await self._give_back(failed)
        return [result if isinstance(result, BaseException) else None for result in done]

    async def _count(self, n: int) -> None:
        """Add ``n`` gets. Cancelled meanwhile (Ctrl-C in a blocking get), the
        write is let finish and given back, as it may have landed."""
        counting = asyncio.ensure_future(self._change(lambda count: count + n))
        try:
            await asyncio.shield(counting)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await counting
                await self._give_back(n)
            raise

    async def _give_back(self, n: int) -> None:
        """Take back ``n`` gets whose bodies were not returned; shielded from a
        cancel, and a failure here leaves them counted (as a getter's crash
        would) rather than hide the get's own error."""
        with contextlib.suppress(Exception):
            await asyncio.shield(self._change(lambda count: max(0, count - n)))

    async def task_done(self, n: int) -> None:
        """``n`` gets' tasks done. More than the unfinished tasks is refused
        (InvalidRequest), as locally; more than the outstanding gets but not
        than the unfinished tasks is a task_done for a message no get took,
        which JetStream cannot mark done: NotSupported."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidRequest(f"task_done needs a whole number n >= 1, not {n!r}")

        def done(count: int) -> int:
            if count < n:
                raise _TooFew
            return count - n

        try:
            await self._change(done)
        except _TooFew:
            await self._refuse(n)

    async def _refuse(self, n: int) -> None:
        outstanding, _ = await self._read()
        messages = await self._messages()
        if outstanding + messages < n:
            raise InvalidRequest(
                f"task_done() called too many times: queue {self.queue!r} has "
                f"{outstanding + messages} unfinished task(s), not {n}"
            ) from None
        raise not_supported(
            "task_done for a message no get took",
            f"{outstanding} of the {outstanding + messages} unfinished tasks of "
            f"{self.queue!r} were got; a reserved or waiting message's task ends with its ack",
        ) from None

    async def join(self, timeout: float | None) -> None:
        """Look at the count until it is 0, with a growing pause (JetStream
        cannot wake a waiter when it changes); JoinTimeout after ``timeout``."""
        validate_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = JOIN_PAUSE
        while await self.unfinished():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise JoinTimeout(
                    f"queue {self.queue!r} still had unfinished tasks after {timeout:g} s"
                )
            await asyncio.sleep(pause if left is None else min(pause, left))
            pause = min(pause * 2, JOIN_PAUSE_MAX)

    async def forget(self) -> None:
        """Drop the count (a deleted queue's): a queue made again starts at 0."""
        kv = await self._bucket()
        await kv.purge(self.key)
        self._known = None

    async def _messages(self) -> int:
        try:
            info = await asked_again(
                lambda: self.client.js.stream_info(self.stream), self.client.timeout
            )
        except nats.js.errors.NotFoundError:
            return 0  # (never used, or deleted: nothing in it)
        return int(info.state.messages)

    async def _change(self, change: Callable[[int], int]) -> None:
        """Compare-and-set ``change`` of the count: first on the value last
        seen, read afresh after a conflict; ``change`` raising on a value
        not fresh is tried again on a fresh one."""
        give_up = time.monotonic() + self.client.timeout
        known, fresh = self._known, False
        while True:
            if known is None:
                known, fresh = await self._read(), True
            count, revision = known
            try:
                new = change(count)
                self._known = (new, await self._write(new, revision))
                return
            except _TooFew:
                if fresh:
                    raise
            except _Conflict:
                if time.monotonic() >= give_up:
                    raise BrokerqError(
                        f"the task count of {self.queue!r} kept changing under this client"
                    ) from None
            known = None

    async def _read(self) -> tuple[int, int]:
        """The count and its revision (0: no key yet; a forgotten key reads 0).
        Asked of the bucket's leader, not by a direct get that any replica may
        answer: a lagging replica's count could show a join 0 too early."""
        await self._bucket()
        try:
            entry = await asked_again(
                lambda: self.client.js.get_msg(KV_STREAM, subject=self._subject, direct=False),
                self.client.timeout,
            )
        except nats.js.errors.NotFoundError:
            self._known = (0, 0)
            return self._known
        revision = int(entry.seq or 0)
        if (entry.headers or {}).get(KV_OPERATION) in _FORGOTTEN:
            self._known = (0, revision)
            return self._known
        try:
            self._known = (int(entry.data or b"0"), revision)
        except ValueError:
            raise BrokerqError(f"the task count of {self.queue!r} is not a number") from None
        return self._known

    async def _write(self, count: int, revision: int) -> int:
        """Write ``count`` if the key is still at ``revision``; its new revision.
        Sent again under one id while no answer comes, so a write that landed
        is answered as a duplicate rather than applied twice."""
        headers = {
            Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value: str(revision),
            Header.MSG_ID.value: f"bq-task-{self.client.next_key()}",
        }
        try:
            ack = await asked_again(
                lambda: self.client.js.publish(self._subject, str(count).encode(), headers=headers),
                self.client.timeout,
            )
        except nats.js.errors.APIError as exc:
            if exc.err_code in _WRONG_REVISION:
                raise _Conflict from None
            raise
        return int(ack.seq)

    async def _bucket(self) -> KeyValue:
        """The bucket, made on first use (every client makes it alike, so two
        making it at once both succeed). Looked up patiently: a client's first
        look may fall in an election of the bucket's leader."""
        js = self.client.js
        if self._kv is None or self._kv_js is not js:
            try:
                self._kv = await asked_again(lambda: js.key_value(BUCKET), self.client.timeout)
            except nats.js.errors.BucketNotFoundError:
                self._kv = await asked_again(
                    lambda: js.create_key_value(
                        bucket=BUCKET,
                        history=1,
                        replicas=self.client.replicas,
                        storage=StorageType.FILE,
                    ),
                    self.client.timeout,
                )
            self._kv_js = js
        return self._kv
