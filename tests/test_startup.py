"""What importing the client loads: no trio, no anyio, and for the client no click.

A client must start fast: trio and anyio are the broker's and the async
client's, click the command line's. Each import is checked in a fresh
interpreter (this test process has them all loaded already).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("trio", "anyio", "click")

CHECK = r"""
import sys
import {module}
print(" ".join(name for name in {heavy!r} if name in sys.modules))
"""


def loaded_after_import(module: str) -> set[str]:
    """Which of trio, anyio, click a clean interpreter has loaded after ``import module``."""
    done = subprocess.run(
        [sys.executable, "-c", CHECK.format(module=module, heavy=HEAVY)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split())


@pytest.mark.parametrize("module", ["brokerq", "brokerq.client.blocking"])
def test_importing_the_client_loads_neither_trio_nor_anyio_nor_click(module: str) -> None:
    assert loaded_after_import(module) == set()


def test_the_check_sees_what_is_loaded() -> None:
    # The command line needs click, and the async client anyio: the check finds them.
    assert "click" in loaded_after_import("brokerq.cli")
    assert "anyio" in loaded_after_import("brokerq.client.asynchronous")
