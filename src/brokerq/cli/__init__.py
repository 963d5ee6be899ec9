"""The ``brokerq`` command: the group in group.py, the commands in messages.py,
topics.py, admin.py and consume.py."""

from __future__ import annotations

import contextlib
import os
import signal
import sys

from . import admin, consume, messages, topics
from .group import EXIT_INTERRUPTED, cli

__all__ = ["admin", "cli", "consume", "main", "messages", "topics"]


def main() -> None:
    try:
        cli(prog_name="brokerq")
    except SystemExit as exc:
        if exc.code == EXIT_INTERRUPTED:
            # End as a process killed by SIGINT: a shell that ran this command
            # then stops too (bash goes on with a loop whose command exited 130
            # by itself, taking Ctrl-C as handled), and shows status 130.
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        raise
