"""``brokerq consume``'s runner at its old path: ``brokerq.consume`` is
:mod:`brokerq.cli.consume` itself (the same module object, so what is
patched or imported through either name is the same)."""

import sys

from .cli import consume

sys.modules[__name__] = consume
