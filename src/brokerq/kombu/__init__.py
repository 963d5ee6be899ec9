"""brokerq as a kombu transport: ``kombu.Connection("brokerq://")``.

Importing this module registers the transport name ``brokerq`` with kombu;
``transport="brokerq.kombu:Transport"`` works without the import. See
:mod:`.transport` for what each kombu feature maps to, and docs/celery.md.
Needs kombu: ``pip install 'brokerq[kombu]'``.
"""

from __future__ import annotations

from kombu.transport import TRANSPORT_ALIASES

from .transport import Channel, Transport

__all__ = ["Channel", "Transport"]

TRANSPORT_ALIASES.setdefault("brokerq", "brokerq.kombu:Transport")
