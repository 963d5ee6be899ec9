"""``python -m brokerq`` works like the ``brokerq`` command, help and errors alike."""

from .cli import main

if __name__ == "__main__":
    main()
