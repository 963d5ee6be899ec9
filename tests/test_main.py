"""``python -m brokerq`` works like the installed ``brokerq`` command."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import run_cli

import brokerq


def run_module(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "brokerq", *args],
        capture_output=True,
        timeout=timeout,
        env=dict(os.environ),
        cwd="/",  # not the source tree: the installed package is what runs
        check=False,
    )


def test_put_and_get_for_real(socket_path: str) -> None:
    put = run_module("--socket", socket_path, "put", "q", "hello", "world")
    assert (put.returncode, put.stdout, put.stderr) == (0, b"1\n2\n", b"")
    got = run_module("--socket", socket_path, "get", "q", "-n", "2", "--timeout", "5")
    assert (got.returncode, got.stdout, got.stderr) == (0, b"hello\nworld\n", b"")
    empty = run_module("--socket", socket_path, "get", "q", "--timeout", "0")
    assert empty.returncode == 3
    assert empty.stderr == b"brokerq: no message on 'q' within 0 s\n"
    stop = run_module("--socket", socket_path, "stop")
    assert (stop.returncode, stop.stderr) == (0, b"")


def test_help_names_the_program_brokerq() -> None:
    done = run_module("--help")
    assert done.returncode == 0
    assert done.stdout.startswith(b"Usage: brokerq [OPTIONS] COMMAND [ARGS]...\n")
    sub = run_module("get", "--help")
    assert sub.stdout.startswith(b"Usage: brokerq get [OPTIONS] QUEUE [QUEUE...]\n")


@pytest.mark.parametrize(
    "args",
    [
        ("--help",),
        ("--version",),
        ("put", "--help"),
        ("no-such-command",),
        ("get",),  # a missing argument
        ("--connect-timeout", "-1", "ping"),
    ],
)
def test_same_output_and_exit_status_as_the_command(args: tuple[str, ...]) -> None:
    module, command = run_module(*args), run_cli(*args)
    assert module.returncode == command.returncode
    assert module.stdout == command.stdout
    assert module.stderr == command.stderr
    assert b"python -m" not in module.stdout + module.stderr


def test_version() -> None:
    done = run_module("--version")
    assert (done.returncode, done.stdout) == (
        0,
        f"brokerq, version {brokerq.__version__}\n".encode(),
    )


def test_importing_main_runs_nothing() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import brokerq.__main__"],
        capture_output=True,
        timeout=20,
        check=False,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, b"", b"")
