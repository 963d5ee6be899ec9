"""The old path of :mod:`brokerq.client.asynchronous`: the same module object,
so what is patched or imported through either name is the same."""

import sys
from typing import TYPE_CHECKING

from .client import asynchronous

if TYPE_CHECKING:  # (what a type checker reads here: the module's public names)
    from .client.asynchronous import *  # noqa: F403

sys.modules[__name__] = asynchronous
