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
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from .. import validation
from ..client.calls import Body, PutOptions, as_bytes
from ..errors import BrokerUnavailable, Empty, Full, InvalidRequest
from . import naming, rules
from .aio_admin import QueueAdmin, QueueHost, QueueSettings
from .aio_message import AsyncNatsMessage, NatsReserving, not_supported
from .failures import translate_errors
from .tasks import AckStep, TaskCount

#: How long a delivery may take to come from the server, at most: its
#: lease is counted from then, so that a verb this side still lets through
#: finds the lease alive on the server too.
RECEIPT_MARGIN = 0.1
#: How long one attempt of a put waits for its PubAck before it is sent
#: again (with its key: a duplicate is dropped): a put sent to a server
#: that just died, or to a leader being replaced, is soon sent again.
ATTEMPT_TIMEOUT = 2.0
#: How long a no-wait get asks the server (a pull request needs a deadline).
NOWAIT_WAIT = 0.2
#: Errors after which a put is sent again with the same key (deduplicated):
#: no answer (a reconnect, a leader election), or no stream leader just now.
_NO_STREAM = (
    nats.errors.NoRespondersError,
    nats.js.errors.NoStreamResponseError,  # (nats-py's name for no responders to a publish)
)
#: A pull's errors while a consumer has no leader.
_NO_LEADER = (nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError)
_RETRY = (
    TimeoutError,  # (nats-py's too)
    BrokerUnavailable,  # (no answer, as the client's methods raise it)
    nats.js.errors.ServiceUnavailableError,
    *_NO_STREAM,
)

#: JetStream's error codes for a stream at its limits (messages, bytes).
_FULL_CODES = frozenset({10077, 10078})


def _is_full(exc: Exception) -> bool:
    """JetStream's refusal of a put to a stream at its max_msgs or max_bytes."""
    return getattr(exc, "err_code", None) in _FULL_CODES


def _deadline(timeout: float | None) -> float | None:
    validation_timeout(timeout)
    return None if timeout is None else time.monotonic() + timeout


def validation_timeout(timeout: float | None) -> None:
    if timeout is not None and not (isinstance(timeout, int | float) and timeout >= 0):
        raise InvalidRequest(f"timeout must be None or a number >= 0, not {timeout!r}")


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


@translate_errors
class AsyncNatsQueue(QueueAdmin):
    """A named queue on JetStream; the local AsyncQueue's names."""

    def __init__(self, name: str, client: QueueHost) -> None:
        self.name = name
        self.client = client
        self.stream = naming.stream_name(name)
        self.pending_settings: dict[str, Any] = {}
        self._psub: JetStreamContext.PullSubscription | None = None
        # One pull at a time per queue and client: a message a timed-out pull
        # brought in late waits in the subscription for the next one.
        self._pulling = asyncio.Lock()
        self.tasks = TaskCount(client, name, self.stream)

    def __repr__(self) -> str:
        return f"<brokerq.nats.AsyncNatsQueue {self.name!r} at {self.client.url!r}>"

    async def _settings(self) -> QueueSettings:
        """The queue's settings, its stream and consumer made first if need be
        (and the settings given to ``client.queue`` applied). Tried again for
        the client's timeout: a cluster electing its leaders answers nothing."""
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
        self._psub = None

    async def put(
        self,
        body: Body,
        *,
        priority: int = 0,
        delay: float = 0,
        ttl: float | None = None,
        timeout: float | None = None,
    ) -> int:
        (data,) = self._checked([body], PutOptions(priority, delay, ttl, timeout))
        headers = rules.put_headers(self.client.next_key(), time.time(), delay, ttl)
        return await self._put_keyed(data, headers, timeout)

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
                if isinstance(exc, _NO_STREAM):
                    self.client.forget(self.name)  # deleted meanwhile? made again
                await asyncio.sleep(0.05)

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
        items = self._checked(list(bodies), PutOptions(priority, delay, ttl, timeout))
        now = time.time()
        keyed = [(d, rules.put_headers(self.client.next_key(), now, delay, ttl)) for d in items]
        await self._settings()
        subject = naming.subject(self.name)
        js = self.client.js
        sent = [await js.publish_async(subject, d, headers=h) for d, h in keyed]
        acks = [asyncio.wait_for(ack, ATTEMPT_TIMEOUT) for ack in sent]
        done = await asyncio.gather(*acks, return_exceptions=True)
        return [
            await self._put_keyed(d, h, timeout) if isinstance(ack, BaseException) else int(ack.seq)
            for (d, h), ack in zip(keyed, done, strict=True)
        ]

    async def flush(self) -> None:
        """Nothing to wait for: every put returned once the stream had it."""

    async def get(self, timeout: float | None = None) -> bytes:
        """A reserve and its ack, counted first as a task owed a task_done (tasks.py)."""
        msg = await self.reserve_message(timeout)
        (failed,) = await self.tasks.acked_as_got([msg.ack])
        if failed is not None:
            raise failed
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
        settings = await self._settings()
        if lease is not None and lease != settings.lease:
            raise not_supported(
                "a per-reserve lease",
                f"every reserve of a queue shares its consumer's ack wait; "
                f"set it with configure(lease=...), now {settings.lease} s",
            )
        deadline = _deadline(timeout)
        while True:
            msg, asked = await self._pull(deadline)
            if await self._deliverable(msg, settings):
                attempt = rules.attempt(msg.headers, msg.metadata.num_delivered)
                return AsyncNatsMessage(self, msg, attempt, settings.lease, asked)

    async def _deliverable(self, msg: Msg, settings: QueueSettings) -> bool:
        """Whether ``msg`` goes to the caller; if not, what rules.judge says is done
        with it (deferred, dropped as expired, or moved to the dead letters)."""
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
        """Up to ``n`` messages there now (none: an empty list), in one pull."""
        async with self._pulling:
            try:
                return await (await self._subscription()).fetch(n, timeout=NOWAIT_WAIT)
            except (nats.errors.TimeoutError, *_NO_LEADER):
                return []

    async def _pull(self, deadline: float | None) -> tuple[Msg, float]:
        """One message from the consumer, waiting until ``deadline`` (None: for
        ever), and when its lease began at the latest: the server sent it
        after the pull was asked for and (the network's lag allowed for)
        before it came."""
        left = _left(deadline)
        try:
            await asyncio.wait_for(
                self._pulling.acquire(), None if left is None else max(left, 0.001)
            )
        except TimeoutError:
            raise Empty(f"queue {self.name!r} is empty") from None
        try:
            while True:
                left = _left(deadline)
                wait = NOWAIT_WAIT if left is not None and left <= 0 else rules.fetch_wait(left)
                asked = time.monotonic()
                try:
                    (msg,) = await (await self._subscription()).fetch(1, timeout=wait)
                    return msg, max(asked, time.monotonic() - RECEIPT_MARGIN)
                except (nats.errors.TimeoutError, *_NO_LEADER) as exc:
                    # Nothing came, or no consumer leader answers just now (one
                    # is being elected): as the local get through a reconnect,
                    # wait on until the deadline.
                    left = _left(deadline)
                    if left is not None and left <= 0:
                        raise Empty(f"queue {self.name!r} is empty") from None
                    if isinstance(exc, _NO_LEADER):
                        await asyncio.sleep(0.05 if left is None else min(0.05, left))
        finally:
            self._pulling.release()

    async def _subscription(self) -> JetStreamContext.PullSubscription:
        if self._psub is None:
            self._psub = await self.client.js.pull_subscribe_bind(
                durable=naming.CONSUMER, stream=self.stream
            )
        return self._psub

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
        raise not_supported("kick", "buried messages are not built yet")

    async def task_done(self, n: int = 1) -> None:
        await self.tasks.task_done(n)

    async def join(self, timeout: float | None = None) -> None:
        await self.tasks.join(timeout)

    async def unfinished_tasks(self) -> int:
        return await self.tasks.unfinished()

    async def subscribe(self, topic: str) -> None:
        raise not_supported("a queue's durable subscription", "not built yet")

    async def unsubscribe(self, topic: str) -> bool:
        raise not_supported("a queue's durable subscription", "not built yet")
