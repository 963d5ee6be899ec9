"""The old path of :mod:`brokerq.cli.consume`: the same module object, so what
is patched or imported through either name is the same."""

import sys

from .cli import consume

sys.modules[__name__] = consume
