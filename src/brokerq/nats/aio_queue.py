"""A queue on JetStream: put, get, reserve and the lease verbs, async.

Every verb keeps the local broker's guarantees where JetStream gives them
(docs/nats.md): a put returns once the stream (with replicas, its quorum)
has it, under a key that drops a retried put; a reserved message comes
back when its lease (the consumer's ack wait) runs out; a message past
``max_deliveries`` moves to ``<queue>:dead`` (publish under a fixed id,
then ack: a client dying between the two leaves a redelivery whose
publish is dropped as a duplicate). What cannot hold raises NotSupported.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import PubAck

from .. import validation
from ..client.calls import Body, PutOptions, as_bytes
from ..errors import BrokerUnavailable, Empty, Full, InvalidRequest
from . import burial, naming, rules, topics
from .aio_admin import QueueAdmin, QueueHost, QueueSettings
from .aio_message import AsyncNatsMessage, NatsReserving, not_supported
from .failures import NO_STREAM, translate_errors
from .pulling import NoLeader, Puller
from .tasks import AckStep, TaskCount

#: How long one attempt of a put waits for its PubAck before it is sent
#: again (with its key: a duplicate is dropped): a put sent to a server
#: that just died, or to a leader being replaced, is soon sent again.
ATTEMPT_TIMEOUT = 2.0
#: A message held by a prefetch is handed out only with this much of its
#: lease left (seconds; a quarter of a shorter lease), so its ack or touch
#: reaches the server in time.
HELD_MARGIN = 1.0
#: Errors after which a put is sent again with the same key (deduplicated):
#: no answer (a reconnect, a leader election), or no stream leader just now.
_RETRY = (
    TimeoutError,  # (nats-py's too)
    BrokerUnavailable,  # (no answer, as the client's methods raise it)
    nats.js.errors.ServiceUnavailableError,
    *NO_STREAM,
)

#: JetStream's error codes for a stream at its limits (messages, bytes).
_FULL_CODES = frozenset({10077, 10078})


def _is_full(exc: Exception) -> bool:
    """JetStream's refusal of a put to a stream at its max_msgs or max_bytes."""
    return getattr(exc, "err_code", None) in _FULL_CODES


def _held_margin(lease: float) -> float:
    return min(HELD_MARGIN, lease / 4)


def _deadline(timeout: float | None) -> float | None:
    validation.validate_timeout(timeout)
    return None if timeout is None else time.monotonic() + timeout


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


@dataclass
class SentPut:
    """A put sent under its key, its PubAck still to come."""

    queue: AsyncNatsQueue
    data: bytes
    headers: dict[str, str]
    timeout: float | None
    ack: asyncio.Future[PubAck]

    async def settle(self) -> int:
        """Its id once acknowledged. No PubAck in time (a lost connection, a
        leader election), or a refusal: it is put again under its key as
        :meth:`AsyncNatsQueue.put` puts (stored once; a full queue raises Full)."""
        seq = await self.acknowledged()
        return seq if seq is not None else await self.put_again()

    async def acknowledged(self) -> int | None:
        """Its id, if its PubAck came in time; None if not (or it was refused)."""
        try:
            return int((await asyncio.wait_for(self.ack, ATTEMPT_TIMEOUT)).seq)
        except Exception:
            return None

    async def put_again(self) -> int:
        return await self.queue._put_keyed(self.data, self.headers, self.timeout)


@translate_errors
class AsyncNatsQueue(QueueAdmin):
    """A named queue on JetStream; the local AsyncQueue's names."""

    def __init__(self, name: str, client: QueueHost) -> None:
        self.name = name
        self.client = client
        self.stream = naming.stream_name(name)
        self.pending_settings: dict[str, Any] = {}
        self._pulls: Puller | None = None
        # One pull at a time per queue and client: a message a timed-out pull
        # brought in late waits in the subscription for the next one.
        self._pulling = asyncio.Lock()
        self.tasks = TaskCount(client, name, self.stream)

    def __repr__(self) -> str:
        where = naming.redacted(self.client.url)
        return f"<brokerq.nats.AsyncNatsQueue {self.name!r} at {where!r}>"

    async def _settings(self) -> QueueSettings:
        """The queue's settings, its stream and consumer made first if need be
        (and the settings given to ``client.queue`` applied). Tried again for
        the client's timeout: a cluster electing its leaders answers nothing."""
        known = None if self.pending_settings else self.client.known(self.name)
        if known is not None:
            return known  # (the common case: no request, no task)
        give_up = time.monotonic() + self.client.timeout
        while True:
            try:
                pending, self.pending_settings = self.pending_settings, {}
                if pending:
                    try:
                        await self.configure(**pending)
                    except BaseException:
                        self.pending_settings = pending | self.pending_settings  # (next time)
                        raise
                return await asyncio.wait_for(self.client.ensure(self.name), ATTEMPT_TIMEOUT)
            except (TimeoutError, BrokerUnavailable) as exc:
                if time.monotonic() >= give_up:
                    raise BrokerUnavailable(f"NATS did not answer in time: {exc!r}") from exc
                await asyncio.sleep(0.1)

    def drop_subscription(self) -> None:
        self._pulls = None

    async def aclose(self) -> None:
        """Give back what a prefetch holds, at once (the client is closing)."""
        pulls, self._pulls = self._pulls, None
        if pulls is not None:
            await pulls.close()

    async def put(
        self,
        body: Body,
        *,
        priority: int = 0,
        delay: float = 0,
        ttl: float | None = None,
        timeout: float | None = None,
    ) -> int:
        data, headers = self._keyed(body, PutOptions(priority, delay, ttl, timeout))
        return await self._put_keyed(data, headers, timeout)

    def _keyed(self, body: Body, options: PutOptions) -> tuple[bytes, dict[str, str]]:
        """A put's body, checked, and its headers: the key every try of it
        is sent under, and its delay and ttl."""
        (data,) = self._checked([body], options)
        now = time.time()
        return data, rules.put_headers(self.client.next_key(), now, options.delay, options.ttl)

    def _checked(self, bodies: list[Body], options: PutOptions) -> list[bytes]:
        """The local put's argument checks (types, timeout), then the NATS backend's."""
        validation.validate_queue_name(self.name, for_put=True)
        options.fields()
        priority, delay, ttl = options.priority, options.delay, options.ttl
        if priority:
            raise not_supported("priority", "JetStream has no priority order")
        if delay < 0 or (ttl is not None and ttl <= 0):
            raise InvalidRequest("delay must be >= 0 and ttl > 0")
        return [as_bytes(body) for body in bodies]  # (a str is UTF-8, as the local put's)

    async def _put_keyed(self, data: bytes, headers: dict[str, str], timeout: float | None) -> int:
        """Publish until acknowledged: sent again under the same key (a
        duplicate is dropped) while no answer comes, for the client's timeout;
        a full queue waited on until ``timeout``, as the local put waits for room."""
        deadline = _deadline(timeout)
        answer_by = time.monotonic() + self.client.timeout + (timeout or 0)
        while True:
            try:
                await self._settings()  # (made again if it was deleted meanwhile)
                ack = await self.client.js.publish(
                    naming.subject(self.name),
                    data,
                    headers=headers,
                    timeout=min(self.client.timeout, ATTEMPT_TIMEOUT),
                )
                return int(ack.seq)
            except (*_RETRY, nats.js.errors.Error) as exc:
                if _is_full(exc):
                    left = _left(deadline)
                    if left is not None and left <= 0:
                        raise Full(f"queue {self.name!r} stayed full until the timeout") from exc
                elif not isinstance(exc, _RETRY) or time.monotonic() >= answer_by:
                    raise
                if isinstance(exc, NO_STREAM):
                    self.client.forget(self.name)  # deleted meanwhile? made again
                await asyncio.sleep(0.05)

    async def put_sent(self, body: Body, options: PutOptions) -> SentPut:
        """A put sent and not yet acknowledged (JetStream's async publish),
        for a put window: :meth:`SentPut.settle` awaits its PubAck."""
        data, headers = self._keyed(body, options)
        await self._settings()
        subject = naming.subject(self.name)
        ack = await self.client.js.publish_async(subject, data, headers=headers)
        return SentPut(self, data, headers, options.timeout, ack)

    async def put_nowait(self, body: Body, **options: Any) -> int:
        return await self.put(body, timeout=0, **options)

    async def put_many(
        self,
        bodies: Iterable[Body],
        *,
        priority: int = 0,
        delay: float = 0,
        ttl: float | None = None,
        timeout: float | None = None,
    ) -> list[int]:
        """The puts sent together (JetStream's async publish), each under its
        own key, then their acks awaited; one not acknowledged (full, no
        answer) is put again under its key as :meth:`put` does. Not atomic:
        a failure leaves the ones before it put."""
        options = PutOptions(priority, delay, ttl, timeout)
        items = list(bodies)
        self._checked(items, options)  # (every body, before any is sent)
        sent = [await self.put_sent(body, options) for body in items]
        # The acks awaited together; those that did not come put again in order.
        acked = await asyncio.gather(*(put.acknowledged() for put in sent))
        return [
            seq if seq is not None else await put.put_again()
            for put, seq in zip(sent, acked, strict=True)
        ]

    async def flush(self) -> None:
        """Nothing to wait for: every put returned once the stream had it."""

    async def get(self, timeout: float | None = None) -> bytes:
        """A reserve and its ack, counted first as a task owed a task_done (tasks.py)."""
        msg = await self.reserve_message(timeout)
        await msg.ack_as_get()
        return msg.body

    async def get_nowait(self) -> bytes:
        return await self.get(timeout=0)

    async def get_many(self, n: int, timeout: float | None = None) -> list[bytes]:
        """Up to ``n`` bodies: waits (up to ``timeout``) for the first, then
        takes what is there now, as the local get_many: the rest in one pull
        batch, all counted as tasks at once and acked together. One whose ack
        fails is not returned (it comes back after its lease) and its task is
        given back: never a body returned unacked, or acked unreturned."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidRequest(f"get_many needs n >= 1, not {n!r}")
        first = await self.reserve_message(timeout)
        settings = await self._settings()
        rest: list[Msg] = []
        while len(rest) < n - 1:
            fetched = await self._pull_batch(n - 1 - len(rest))
            if not fetched:
                break
            rest += [msg for msg in fetched if await self._deliverable(msg, settings)]
        acks: list[AckStep] = [
            first.ack,
            *(functools.partial(m.ack_sync, self.client.timeout) for m in rest),
        ]
        failed = await self.tasks.acked_as_got(acks)
        bodies = [first.body, *(bytes(m.data) for m in rest)]
        got = [body for body, error in zip(bodies, failed, strict=True) if error is None]
        if not got and failed[0] is not None:
            raise failed[0]
        return got

    def reserve(self, timeout: float | None = None, lease: float | None = None) -> NatsReserving:
        """A reserve to make, as the local AsyncQueue's: awaited for its
        message, or ``async with`` (acked on a clean exit, released on an exception)."""
        return NatsReserving(self.reserve_message(timeout, lease))

    async def reserve_message(
        self, timeout: float | None = None, lease: float | None = None
    ) -> AsyncNatsMessage:
        validation.validate_lease(lease)
        settings = await self._settings()
        deadline = _deadline(timeout)
        while True:
            called = time.monotonic()
            msg, since = await self._pull(deadline)
            margin = _held_margin(settings.lease)
            if since < called - margin:
                # Held since an earlier pull (a prefetch): if its lease still has
                # time, it begins again now, as the local prefetch's at hand-out.
                if since + settings.lease - margin <= time.monotonic():
                    continue  # (the server gives it out again when its lease ends)
                since = time.monotonic()
                await msg.in_progress()
            if not await self._deliverable(msg, settings):
                continue
            if since + settings.lease - margin <= time.monotonic():
                # Judged past its lease (a look among the buried copies waiting out
                # an election): it may be another consumer's now, and comes back.
                continue
            attempt = rules.attempt(msg.headers, msg.metadata.num_delivered)
            return AsyncNatsMessage(self, msg, attempt, settings.lease, since, lease=lease)

    async def _deliverable(self, msg: Msg, settings: QueueSettings) -> bool:
        """Whether ``msg`` goes to the caller; if not, what rules.judge says is done
        with it (deferred, dropped as expired, or moved to the dead letters), or
        its bury finished (a client died between the copy and the ack)."""
        if await burial.finish_if_buried(self, msg):
            return False
        verdict = rules.judge(
            msg.headers,
            msg.metadata.num_delivered,
            settings.max_deliveries,
            time.time(),
            dead_letters=not self.name.endswith(naming.DEAD_SUFFIX),
        )
        if verdict.action is rules.Action.DEFER:
            await msg.nak(delay=verdict.delay)
        elif verdict.action is rules.Action.EXPIRE:
            await msg.ack_sync(timeout=self.client.timeout)
        elif verdict.action is rules.Action.DEAD:
            await self._dead_letter(msg)
        return verdict.action is rules.Action.DELIVER

    async def _pull_batch(self, n: int) -> list[Msg]:
        """Up to ``n`` messages there now (none: an empty list), in one pull;
        leaving out any a prefetch held until its lease was nearly over (the
        server gives it out again when its lease ends)."""
        lease = (await self._settings()).lease
        async with self._pulling:
            try:
                got = await self._puller().pull(n, None, self.client.prefetch)
            except NoLeader:
                return []
        fresh_since = time.monotonic() + _held_margin(lease) - lease
        return [msg for msg, since in got if since > fresh_since]

    async def _pull(self, deadline: float | None) -> tuple[Msg, float]:
        """One message from the consumer, waiting until ``deadline`` (None: for
        ever), and the latest time its lease can have begun (see pulling.py)."""
        if self._pulling.locked():
            try:
                async with asyncio.timeout(_left(deadline)):
                    await self._pulling.acquire()
            except TimeoutError:
                raise Empty(f"queue {self.name!r} is empty") from None
        else:
            await self._pulling.acquire()
        try:
            while True:
                left = _left(deadline)
                expires = None if left is not None and left <= 0 else rules.fetch_wait(left)
                try:
                    got = await self._puller().pull(1, expires, self.client.prefetch)
                except NoLeader:
                    got = []  # (a consumer leader being elected: wait on, as through a reconnect)
                    await asyncio.sleep(0.05)
                if got:
                    return got[0]
                left = _left(deadline)
                if left is not None and left <= 0:
                    raise Empty(f"queue {self.name!r} is empty")
        finally:
            self._pulling.release()

    def _puller(self) -> Puller:
        if self._pulls is None:
            self._pulls = Puller(self.client.nc, self.stream, naming.CONSUMER)
        return self._pulls

    async def _dead_letter(self, msg: Msg) -> None:
        """Move ``msg`` to ``<queue>:dead``: publish under an id fixed by its
        stream sequence, then ack. Dying between the two leaves the message
        here, redelivered, and its second publish dropped as a duplicate."""
        dead = self.name + naming.DEAD_SUFFIX
        await self.client.ensure(dead)
        headers = {k: v for k, v in (msg.headers or {}).items() if k != rules.MSG_ID}
        headers[rules.MSG_ID] = naming.dead_letter_id(self.stream, msg.metadata.sequence.stream)
        await self.client.js.publish(naming.subject(dead), msg.data, headers=headers)
        await msg.ack_sync(timeout=self.client.timeout)

    async def kick(self, n: int = 1) -> int:
        """Up to ``n`` buried messages back, the earliest buried first, each
        put anew at the end of the queue (:func:`burial.kick`). On
        ``<name>:dead``, dead letters back to ``<name>``: the buried ones
        first, then ready ones, each buried first, so that the move is
        made of burial's two, each safe from a client dying in it."""
        burial.check_count(n)
        if not self.name.endswith(naming.DEAD_SUFFIX):
            return await burial.kick(self, n, self._put_back)
        target = AsyncNatsQueue(self.name[: -len(naming.DEAD_SUFFIX)], self.client)
        kicked = 0
        while True:
            try:
                kicked += await burial.kick(self, n - kicked, target._put_back)
            except Full:  # (the ones buried for it stay buried here, first to go next time)
                if not kicked:
                    raise
                return kicked
            if kicked >= n or not await self._bury_ready(n - kicked):
                return kicked

    async def _put_back(self, data: bytes, headers: dict[str, str]) -> int:
        """A kicked message's put: under its fixed key, ``Full`` if there is no room."""
        return await self._put_keyed(data, headers, 0)

    async def _bury_ready(self, n: int) -> int:
        """Up to ``n`` ready messages buried now; how many were fetched for it
        (those not due, or expired, are dealt with as a reserve would)."""
        try:
            await self.client.js.stream_info(self.stream)
        except nats.js.errors.NotFoundError:
            return 0  # (a kick does not make the queue)
        settings = await self._settings()
        fetched = await self._pull_batch(n)
        for msg in fetched:
            if await self._deliverable(msg, settings):
                await burial.bury(self, msg)
        return len(fetched)

    async def task_done(self, n: int = 1) -> None:
        await self.tasks.task_done(n)

    async def join(self, timeout: float | None = None) -> None:
        await self.tasks.join(timeout)

    async def unfinished_tasks(self) -> int:
        return await self.tasks.unfinished()

    async def subscribe(self, topic: str) -> None:
        """From now on, a copy of every publish to ``topic`` (see :mod:`.topics`)."""
        topics.check_topic(topic)
        await self._settings()  # (the queue made first: a copy needs somewhere to go)
        await topics.subscribe(self.client, self.name, topic)

    async def unsubscribe(self, topic: str) -> bool:
        """End that subscription; False if there was none. The copies stay."""
        return await topics.unsubscribe(self.client, self.name, topic)
