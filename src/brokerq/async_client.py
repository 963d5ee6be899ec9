"""The async client's old path: ``brokerq.async_client`` is
:mod:`brokerq.client.asynchronous` itself (the same module object, so
what is patched or imported through either name is the same)."""

import sys

from .client import asynchronous

sys.modules[__name__] = asynchronous
