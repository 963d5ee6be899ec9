"""``python -m brokerq`` works like the ``brokerq`` command."""

from .cli import main

main()
