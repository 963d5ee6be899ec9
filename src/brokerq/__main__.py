"""``python -m brokerq`` works like the ``brokerq`` command (``main`` names
the program ``brokerq``, so its help and errors read the same)."""

from .cli import main

if __name__ == "__main__":
    main()
