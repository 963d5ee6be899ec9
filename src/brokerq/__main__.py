"""``python -m brokerq`` works like the ``brokerq`` command.

``cli.main`` names the program ``brokerq`` (click's ``prog_name``), so help,
version and usage errors read the same as the installed command's, and the
exit statuses are the same.
"""

from .cli import main

if __name__ == "__main__":
    main()
