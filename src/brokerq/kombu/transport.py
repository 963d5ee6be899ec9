"""The kombu transport: brokerq as the broker of kombu (and so of Celery).

What kombu asks of a transport, mapped onto brokerq's own features:

* queues are brokerq queues; a message is kombu's message (body,
  headers, properties) as JSON, put with brokerq ``priority`` (kombu's
  0-9, higher first, as AMQP; clamped by the queue's ``x-max-priority``)
  and ``ttl`` (the message's ``expiration`` and the queue's
  ``x-message-ttl``, in ms, whichever is shorter; the queue's arguments
  are known where the queue was declared in this process, and apply to
  puts: the anonymous exchange and topic exchanges; a direct or fanout
  exchange's publish is one brokerq publish to every bound queue, with
  the message's own priority and expiration); a body put by anything
  else (``brokerq put``) is delivered as a message of raw bytes;
* consuming is reserving, one request waiting on all the consumed queues
  at once (:mod:`.poller`); acks, rejects and requeues settle the lease
  (:mod:`.qos`); ``visibility_timeout`` (a transport option, seconds,
  default 3600) is the lease's length; ``wait_bound`` (default 1 s) how
  long one waiting request stays parked before it is sent again with the
  queues consumed by then;
* ``auto_delete`` queues are deleted with their last consumer in the
  process that declared them (Celery's reply queues);
* exchanges are brokerq topics, their bindings durable subscriptions kept
  in the broker's journal (:mod:`.routing`);
* the URL names the broker's socket: ``brokerq://`` the default one (as
  ``brokerq.connect()``), ``brokerq:///abs/path/to/broker.sock`` that
  one; the broker is spawned, as by every client, if none runs.
"""

from __future__ import annotations

import base64
import logging
import time
import uuid
from typing import Any, cast

from kombu.transport import virtual
from kombu.transport.base import to_rabbitmq_queue_arguments
from kombu.utils.json import dumps, loads

from ..client.blocking import Client, Queue, connect
from ..client.blocking import Message as Lease
from ..errors import (
    BrokerqError,
    BrokerUnavailable,
    ConnectionLost,
    Empty,
    Full,
    InvalidRequest,
    LeaseLost,
    LocalProtocolError,
    MessageTooLarge,
    PermissionDenied,
    RemoteProtocolError,
    VersionMismatch,
)
from ..spawn import resolve_socket_path
from ..version import __version__
from . import routing
from .poller import Poller, Reserved, wait_any
from .qos import QoS, settle

logger = logging.getLogger(__name__)

#: kombu's default lease, as Redis's and SQS's ``visibility_timeout``.
DEFAULT_VISIBILITY_TIMEOUT = 3600.0
#: How long one waiting reserve waits in the broker before it is asked again
#: with the queues consumed by then (see :mod:`.poller`).
DEFAULT_WAIT_BOUND = 1.0


class Channel(virtual.Channel):
    """A kombu channel: queues, bindings and publishes through the
    connection's brokerq client; consuming through its poller."""

    QoS = QoS
    supports_fanout = True
    connection: Transport

    def __init__(self, connection: Transport, **kwargs: Any) -> None:
        super().__init__(connection, **kwargs)
        #: Queues consumed with ``no_ack``: their messages are acked as they come.
        self.no_ack_queues: set[str] = set()

    @property
    def client(self) -> Client:
        return self.connection.brokerq_client()

    # -- queues --------------------------------------------------------

    def prepare_queue_arguments(self, arguments: Any, **kwargs: Any) -> Any:
        """``Queue(message_ttl=..., max_priority=...)`` as the x- arguments, as AMQP's."""
        return to_rabbitmq_queue_arguments(arguments, **kwargs)

    def _new_queue(self, queue: str, **kwargs: Any) -> None:
        """brokerq queues need no creating; their arguments are kept here."""
        self.connection.queue_arguments[queue] = dict(kwargs.get("arguments") or {})
        if kwargs.get("auto_delete"):
            self.connection.auto_delete.add(queue)

    def _has_queue(self, queue: str, **kwargs: Any) -> bool:
        return queue in self.connection.queue_arguments or queue in self.client.queues()

    def _size(self, queue: str) -> int:
        return self.client.queue(queue).qsize()

    def _purge(self, queue: str) -> int:
        return self.client.queue(queue).purge()

    def queue_delete(
        self, queue: str, if_unused: bool = False, if_empty: bool = False, **kwargs: Any
    ) -> int | None:
        """The queue's messages, settings and subscriptions (its bindings,
        made anywhere) go: brokerq's ``Queue.delete`` drops them all."""
        if if_empty and self._size(queue):
            return None
        count = self.client.queue(queue).delete()
        self.state.queue_bindings_delete(queue)
        self.connection.queue_arguments.pop(queue, None)
        return count

    # -- bindings: subscriptions ---------------------------------------

    def _binding_topic(self, exchange: str, routing_key: str) -> str:
        kind = self.typeof(exchange).type
        if kind == "fanout":
            return routing.fanout_topic(exchange)
        if kind == "topic":
            return routing.topic_binding(exchange, routing_key)
        return routing.direct_topic(exchange, routing_key)

    def _queue_bind(self, exchange: str, routing_key: str, pattern: Any, queue: str) -> None:
        self.client.queue(queue).subscribe(self._binding_topic(exchange, routing_key))

    def queue_unbind(
        self,
        queue: str,
        exchange: str | None = None,
        routing_key: str = "",
        arguments: Any = None,
        **kwargs: Any,
    ) -> None:
        super().queue_unbind(queue, exchange, routing_key, arguments, **kwargs)
        exchange = exchange or "amq.direct"
        self.client.queue(queue).unsubscribe(self._binding_topic(exchange, routing_key))

    # -- publishing ----------------------------------------------------

    def basic_publish(
        self, message: dict[str, Any], exchange: str, routing_key: str, **kwargs: Any
    ) -> None:
        self._inplace_augment_message(message, exchange, routing_key)
        if not exchange:  # the anonymous exchange: the routing key is the queue
            self._put(routing_key, message)
            return
        kind = self.typeof(exchange).type
        if kind == "topic":
            for queue in self._topic_queues(exchange, routing_key):
                self._put(queue, message)
            return
        if kind not in ("direct", "fanout"):
            raise NotImplementedError(f"brokerq has no {kind!r} exchanges")
        priority, ttl = self._put_options(message, None)
        topic = self._binding_topic(exchange, routing_key)
        self.client.publish(topic, dumps(message), priority=priority, ttl=ttl)

    def _topic_queues(self, exchange: str, routing_key: str) -> list[str]:
        """The queues bound to topic exchange ``exchange`` by a pattern that
        matches ``routing_key``, from the bindings the broker holds: each once."""
        queues: dict[str, None] = {}
        for topic, info in self.client.stats().get("topics", {}).items():
            pattern = routing.pattern_of(topic, exchange)
            if pattern is not None and routing.matches(routing.unescape(pattern), routing_key):
                queues.update(dict.fromkeys(info.get("queues", ())))
        return list(queues)

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        priority, ttl = self._put_options(message, queue)
        self.client.queue(queue).put(dumps(message), priority=priority, ttl=ttl)

    def _put_options(self, message: dict[str, Any], queue: str | None) -> tuple[int, float | None]:
        """brokerq's priority and ttl for ``message`` (put to ``queue``; None:
        published, to queues unknown here, so only the message's own)."""
        args = self.connection.queue_arguments.get(queue, {}) if queue else {}
        props = message.get("properties") or {}
        top = args.get("x-max-priority")
        top = self.max_priority if top is None else min(int(top), self.max_priority)
        try:
            priority = max(min(int(props.get("priority") or 0), top), self.min_priority)
        except (TypeError, ValueError):
            priority = self.default_priority
        given = (props.get("expiration"), args.get("x-message-ttl"))
        ttls = [float(ms) / 1000 for ms in given if ms is not None]
        # (an expiration of 0 is "now or never": the least brokerq allows)
        return priority, max(min(ttls), 0.001) if ttls else None

    # -- consuming -----------------------------------------------------

    def basic_consume(
        self, queue: str, no_ack: bool, callback: Any, consumer_tag: str, **kwargs: Any
    ) -> Any:
        super().basic_consume(queue, no_ack, callback, consumer_tag, **kwargs)
        self.connection.consumers_of[queue] = self
        if no_ack:
            self.no_ack_queues.add(queue)
        else:
            self.no_ack_queues.discard(queue)
        return consumer_tag

    def basic_cancel(self, consumer_tag: str) -> None:
        queue = self._tag_to_queue.get(consumer_tag)
        super().basic_cancel(consumer_tag)
        if queue is not None and self.connection.consumers_of.get(queue) is self:
            del self.connection.consumers_of[queue]
            self.no_ack_queues.discard(queue)
            if queue in self.connection.auto_delete:
                self._auto_delete(queue)

    def _auto_delete(self, queue: str) -> None:
        """An ``auto_delete`` queue (declared so here) goes with its last
        consumer, as in AMQP: Celery's reply queues, one per client, would
        otherwise stay in the broker, subscribed, for ever. (Not after a
        crash: nothing is left to delete it.)"""
        self.connection.auto_delete.discard(queue)
        try:
            self.queue_delete(queue)
        except BrokerqError as exc:
            logger.info("auto_delete queue %r not deleted: %s", queue, exc)

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: Any) -> Any:
        """One message now, or None: a ``get`` with ``no_ack``, else a reserve."""
        q = self.client.queue(queue)
        try:
            if no_ack:
                return self.Message(kombu_message(q.get(timeout=0), queue), channel=self)
            lease = q.reserve(timeout=0, lease=self.connection.visibility_timeout)
        except Empty:
            return None
        payload = self.connection.payload_of(lease)
        message = self.Message(payload, channel=self)
        self.qos.hold(message.delivery_tag, lease)
        self.qos.append(message, message.delivery_tag)
        return message

    def _get(self, queue: str, timeout: float | None = None) -> Any:
        raise NotImplementedError("brokerq channels consume through the transport's poller")


class Transport(virtual.Transport):
    """brokerq as a kombu transport (see the module doc)."""

    Channel = Channel
    driver_type = "brokerq"
    driver_name = "brokerq"
    implements = virtual.Transport.implements.extend(
        asynchronous=True, exchange_type=frozenset(["direct", "topic", "fanout"])
    )
    #: kombu's and Celery's retry logic reconnects on these.
    #: (cast: kombu's base class declares a tuple of one)
    connection_errors = cast(
        "tuple[Any]",
        (
            *virtual.Transport.connection_errors,
            BrokerUnavailable,
            ConnectionLost,
            RemoteProtocolError,
            VersionMismatch,
            OSError,
        ),
    )
    #: These fail the one operation, and the connection goes on.
    channel_errors = cast(
        "tuple[Any]",
        (
            *virtual.Transport.channel_errors,
            InvalidRequest,
            LeaseLost,
            LocalProtocolError,
            MessageTooLarge,
            Full,
            PermissionDenied,
        ),
    )

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        options = client.transport_options
        self.visibility_timeout = float(
            options.get("visibility_timeout", DEFAULT_VISIBILITY_TIMEOUT)
        )
        self.wait_bound = float(options.get("wait_bound", DEFAULT_WAIT_BOUND))
        self.connect_timeout = float(client.connect_timeout or 10.0)
        #: How long after its own timeout an answer may take to come.
        self.grace = self.connect_timeout
        #: The arguments of the queues declared in this process (x-message-ttl ...).
        self.queue_arguments: dict[str, dict[str, Any]] = {}
        #: The auto_delete queues declared in this process (deleted with their consumer).
        self.auto_delete: set[str] = set()
        #: The channel consuming each queue (kombu keeps one callback per queue).
        self.consumers_of: dict[str, Channel] = {}
        self._client: Client | None = None
        path = client.virtual_host  # brokerq:///abs/path: "abs/path"; brokerq://: "/" or None
        #: The broker's socket: the URL's path, else the default (as ``brokerq.connect()``'s).
        self.socket_path = resolve_socket_path(
            None if not path or path == "/" else "/" + path.lstrip("/")
        )
        #: Each consuming channel's poller (see :mod:`.poller`: why one each).
        self.pollers: dict[Channel, Poller] = {}
        #: The hub, once registered with it, and the fd it watches for each poller.
        self._loop: Any = None
        self._hub_fds: dict[Poller, int] = {}
        #: The hub's timer entry that renews the leases (register_with_event_loop).
        self._renewal: Any = None

    @property
    def default_connection_params(self) -> dict[str, Any]:
        """No host: a brokerq broker is a socket path (kombu would warn of "localhost")."""
        return {"hostname": None, "port": None}

    def driver_version(self) -> str:
        return __version__

    def brokerq_client(self) -> Client:
        """The blocking brokerq client the channels share (connected, and the
        broker spawned, on first use; it reconnects by itself)."""
        if self._client is None:
            self._client = connect(self.socket_path, timeout=self.connect_timeout)
        return self._client

    def establish_connection(self) -> Any:
        self.brokerq_client()
        return super().establish_connection()

    def close_connection(self, connection: Any) -> None:
        if self._renewal is not None:
            self._renewal.cancel()
            self._renewal = None
        try:
            super().close_connection(connection)
        finally:
            for poller in self.pollers.values():
                poller.close()
            self.pollers.clear()
            if self._client is not None:
                self._client.close()
                self._client = None

    # -- waiting for messages -----------------------------------------

    def waits(self) -> list[tuple[Poller, list[str]]]:
        """Each channel that may take one more message (its prefetch_count not
        reached), with its poller and its consumed queues in the order they
        were consumed; the pollers of closed channels are closed (their
        leases go back)."""
        for channel in [c for c in self.pollers if c.closed]:
            self.pollers.pop(channel).close()
        queues_of: dict[Channel, list[str]] = {}
        for queue, channel in self.consumers_of.items():
            if not channel.closed and channel.qos.can_consume():
                queues_of.setdefault(channel, []).append(queue)
        return [(self._poller_of(channel), queues) for channel, queues in queues_of.items()]

    def _poller_of(self, channel: Any) -> Poller:  # (a Channel; the name is kombu's here)
        poller = self.pollers.get(channel)
        if poller is None:
            poller = Poller(
                self.socket_path, self.connect_timeout, self.visibility_timeout, self.wait_bound
            )
            poller.forget = lambda fd: self._unwatch(poller, fd)
            self.pollers[channel] = poller
        return poller

    def _unwatch(self, poller: Poller, fd: int) -> None:  # (its socket is about to close)
        if self._hub_fds.get(poller) == fd:
            del self._hub_fds[poller]
            self._loop.remove_reader(fd)

    def drain_events(self, connection: Any, timeout: float | None = None, **kwargs: Any) -> None:
        """Wait for one message on any consumed queue and deliver it (kombu's
        ``Connection.drain_events``, for code without a hub); socket.timeout
        after ``timeout``. With nothing that may be consumed (no consumer,
        or every prefetch_count reached), nothing can come: it waits out
        the timeout (at once with None, rather than for ever)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self.brokerq_client()
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            for poller, queues in self.waits():
                poller.start(queues, left)
            waiting = [poller for poller in self.pollers.values() if poller.waiting is not None]
            if not waiting:
                if timeout:
                    time.sleep(timeout)
                raise TimeoutError("nothing is consumed")
            # The requests end in the broker by the deadline: their answers
            # come then; the connect timeout is the grace for them to come.
            reserved = wait_any(waiting, None if deadline is None else deadline + self.grace)
            if reserved is not None:
                self.deliver(reserved)
                return
            now, stuck = time.monotonic(), [p for p in waiting if p.waiting is not None]
            if stuck and deadline is not None and now >= deadline + self.grace:
                for poller in stuck:  # no answer within the grace
                    poller.close()
                raise BrokerUnavailable(f"the broker at {self.socket_path} does not answer")
            if deadline is not None and now >= deadline:
                raise TimeoutError("timed out")

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        """Wait in kombu's hub: at each poll start, each channel that may
        consume and has no reserve waiting sends one; each poller's socket is
        registered with the hub, and its reply read (and delivered) when it
        is readable."""

        def on_readable(poller: Poller) -> None:
            reserved = poller.read()
            if reserved is not None:
                self.deliver(reserved)

        def on_poll_start() -> None:
            for poller, queues in self.waits():
                poller.start(queues)
                fd = poller.fileno()
                if fd is not None and self._hub_fds.get(poller) != fd:
                    old = self._hub_fds.pop(poller, None)
                    if old is not None:
                        loop.remove_reader(old)
                    loop.add_reader(fd, on_readable, poller)
                    self._hub_fds[poller] = fd

        self._loop = loop
        loop.on_tick.add(on_poll_start)
        if self._renewal is not None:
            self._renewal.cancel()
        self._renewal = loop.call_repeatedly(self.visibility_timeout / 4, self.renew_leases)

    def renew_leases(self) -> None:
        """Renew every unacked lease of this connection, a quarter of the
        visibility timeout at a time: a long task, or a task held for its
        ETA or countdown, stays this worker's while the worker's loop runs
        (a hung worker renews nothing, and its messages come back)."""
        for channel in list(self.channels):
            if channel._qos is not None:
                channel._qos.renew(self.visibility_timeout)

    def deliver(self, reserved: Reserved) -> None:
        """Hand a reserved message to the channel consuming its queue; one
        no longer consumed goes back to the queue (released)."""
        lease = Lease(
            Queue(reserved.queue, client=self.brokerq_client()),
            reserved.msg_id,
            reserved.body,
            reserved.attempt,
            reserved.lease,
        )
        channel = self.consumers_of.get(reserved.queue)
        if channel is None or channel.closed:
            settle(lease, "release")
            return
        payload = self.payload_of(lease)
        tag = payload["properties"]["delivery_tag"]
        if reserved.queue in channel.no_ack_queues:
            settle(lease, "ack")
        else:
            channel.qos.hold(tag, lease)
        self._deliver(payload, reserved.queue)

    def payload_of(self, lease: Lease) -> dict[str, Any]:
        """kombu's message from a reserved one, with a delivery tag of its
        own (each delivery has its own lease: a redelivery, a new tag)."""
        payload = kombu_message(lease.body, lease.queue.name)
        props = payload["properties"]
        props["delivery_tag"] = uuid.uuid4().hex
        payload["redelivered"] = redelivered = lease.attempt > 1
        props.setdefault("delivery_info", {})["redelivered"] = redelivered
        return payload


def kombu_message(body: bytes, queue: str) -> dict[str, Any]:
    """kombu's message put as JSON by this transport, or, for any other body
    (put by ``brokerq put``, say), that body as a message's raw bytes."""
    try:
        payload = loads(body)
    except ValueError:
        payload = None
    if isinstance(payload, dict) and isinstance(payload.get("properties"), dict):
        return payload
    return {
        "body": base64.b64encode(body).decode("ascii"),
        "content-type": "application/data",
        "content-encoding": "binary",
        "headers": {},
        "properties": {
            "delivery_tag": uuid.uuid4().hex,  # (a publisher's would be here)
            "body_encoding": "base64",
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
        },
    }
