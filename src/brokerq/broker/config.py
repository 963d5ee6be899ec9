"""The broker's options (``local-queue-broker --help``), with no trio: the daemon
reads them before it imports trio."""

from __future__ import annotations

import math
import signal
from dataclasses import dataclass
from typing import Final

from .. import protocol
from .core import BrokerCore, limits

#: The signals that stop a broker in order (exit status 0). The daemon blocks
#: them once it holds the lock; the broker's receiver unblocks them once it is
#: listening, so one sent in between is taken late, never fatal to a broker
#: that may already have answered clients.
STOP_SIGNALS: Final = frozenset({signal.SIGTERM, signal.SIGINT})


@dataclass(frozen=True)
class BrokerConfig:
    socket_path: str
    idle_exit: float = 300.0
    max_message_size: int = protocol.DEFAULT_MAX_MESSAGE_SIZE
    data_dir: str | None = None
    fsync: str = "batch"
    max_deliveries: int = 20
    lease: float = 30.0
    subscriber_buffer: int = protocol.DEFAULT_SUBSCRIBER_BUFFER
    #: Limits (limits.py; ``local-queue-broker --help`` says what each means).
    max_connections: int = limits.DEFAULT_MAX_CONNECTIONS
    frame_timeout: float = limits.DEFAULT_FRAME_TIMEOUT
    max_pipelined: int = limits.DEFAULT_MAX_PIPELINED
    max_queue_bytes: int = limits.DEFAULT_MAX_QUEUE_BYTES
    max_total_bytes: int = limits.default_max_total_bytes()
    #: The listener came from systemd (activation.py): the socket file is not ours.
    activated: bool = False

    @property
    def frame_seconds(self) -> float | None:
        """``frame_timeout`` as it applies: None when off (0 or inf)."""
        timeout = self.frame_timeout
        return None if timeout <= 0 or math.isinf(timeout) else timeout

    def new_core(self) -> BrokerCore:
        return BrokerCore(
            max_message_size=self.max_message_size,
            max_deliveries=self.max_deliveries,
            default_lease=self.lease,
        )
