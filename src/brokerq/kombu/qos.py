"""kombu's QoS onto brokerq leases: a delivery tag is a reserved message.

Every message a channel consumes is reserved (leased), never taken: the
broker keeps it until it is acked, and gives it back when the lease ends
without one. So, per delivery tag:

* ``basic_ack`` → ``ack``: gone for good.
* ``reject(requeue=False)`` → ``bury``: kept aside in the queue, not lost;
  ``brokerq kick QUEUE`` brings it back.
* ``reject(requeue=True)``, ``Message.requeue()``, ``basic_recover`` and
  a channel closed with messages unacked → ``release``: ready again at
  once, its delivery count one higher (past the queue's ``max_deliveries``
  it goes to ``QUEUE:dead``).

kombu's virtual QoS restores unacked messages by putting them again: that
would make a second copy of a message the broker still holds. Here nothing
reserved is ever put again. A process that dies with messages unacked
(SIGKILL, a crash) has its leases released by the broker when its
connection closes, which is what makes Celery's ``acks_late`` truly
at-least-once; a consumer hung while still connected holds them until the
lease runs out (the transport option ``visibility_timeout``). While a
worker's event loop runs, it renews its leases (:meth:`QoS.renew`), so a
long task, or one waiting for its ETA, is not delivered twice; a process
hung, its loop stopped, renews nothing.

``prefetch_count`` (basic_qos) bounds the unacked reserved messages of the
channel: :meth:`can_consume` is asked before each reserve, and a reserve
asks for one message, so a channel never holds more leases than that.
Why not brokerq's prefetch streams (``prefetch=N``), which send a consumer
N messages ahead? A stream is per queue, where a kombu consumer waits on
many at once; and a message it has sent ahead is leased to this process
but not yet handed to kombu, so the process would hold more leased
messages than ``prefetch_count`` says, out of other workers' reach. One
waiting reserve costs a round trip per message (tens of microseconds on a
Unix socket), and keeps the bound exact.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from kombu.transport import virtual

from ..client.blocking import Message as Lease
from ..errors import BrokerqError, BrokerUnavailable, LeaseLost

logger = logging.getLogger(__name__)


class QoS(virtual.QoS):
    """A channel's unacked deliveries, each the brokerq lease behind it."""

    def __init__(self, channel: Any, prefetch_count: int = 0) -> None:
        super().__init__(channel, prefetch_count)
        #: delivery tag → the reserved brokerq message it settles.
        self.leases: dict[str, Lease] = {}
        #: The leases are this process's: a forked child (a Celery pool
        #: process) that inherits them must not release them when it exits.
        self.pid = os.getpid()

    def hold(self, delivery_tag: str, lease: Lease) -> None:
        """``lease`` is about to be delivered under ``delivery_tag``."""
        self.leases[delivery_tag] = lease

    def ack(self, delivery_tag: str) -> None:
        lease = self.leases.pop(delivery_tag, None)
        if lease is not None:
            settle(lease, "ack")
        super().ack(delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        lease = self.leases.pop(delivery_tag, None)
        if lease is not None:
            settle(lease, "release" if requeue else "bury")
        self._quick_ack(delivery_tag)  # (not super(): it would put the message again)

    def restore_unacked(self) -> list[tuple[BaseException, Any]]:
        """Release every unacked message (see the module doc): the broker
        hands each to the next consumer. Returns no errors: a release that
        cannot reach the broker needs none, its lease ends anyway."""
        self._flush()
        if os.getpid() == self.pid:  # (a forked child's are its parent's)
            for tag in list(self._delivered):
                lease = self.leases.pop(tag, None)
                if lease is not None:
                    try:
                        settle(lease, "release")
                    except BrokerqError as exc:
                        logger.debug("release of %r at restore: %s", lease, exc)
        self._delivered.clear()
        self.leases.clear()
        return []

    def renew(self, length: float) -> None:
        """Extend every unacked lease to ``length`` seconds from now: called
        from the event loop while it runs (see ``Transport.renew_leases``)."""
        for lease in list(self.leases.values()):
            try:
                lease.touch(length)
            except (LeaseLost, BrokerUnavailable) as exc:
                logger.info("lease of %r not renewed: %s", lease, exc)


def settle(lease: Lease, verb: str) -> None:
    """Ack, release or bury ``lease``. A lease already lost (run out, or held
    by a broker that has since stopped) is not an error to raise into the
    consumer: the broker delivers the message again, as at-least-once says,
    and the ack or reject that came too late is said in the log."""
    try:
        getattr(lease, verb)()
    except LeaseLost as exc:
        logger.warning("%s of %r came too late: %s (it is delivered again)", verb, lease, exc)
    except BrokerUnavailable as exc:
        logger.warning(
            "%s of %r lost with the broker: %s (it is delivered again)", verb, lease, exc
        )
