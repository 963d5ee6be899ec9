"""The ``brokerq`` command through click's CliRunner, against a real broker.

Each test has its own socket path; the first command that needs a broker
spawns one (a descendant of the test process), and the ``sock_dir`` fixture
kills it afterwards. Message ids start at 1 on a fresh broker, so outputs
are compared exactly.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner, Result
from conftest import broker_pids

import brokerq
from brokerq.cli import cli

QUEUE_STATS_KEYS = {
    "name",
    "ready",
    "delayed",
    "reserved",
    "buried",
    "waiters",
    "putters",
    "bytes",
    "put_total",
    "delivered_total",
    "expired_total",
    "dead_lettered_total",
    "oldest_ready_age_s",
}


class Brokerq:
    """Runs ``brokerq --socket PATH ...`` in-process."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.runner = CliRunner()

    def __call__(self, *args: str, input: str | bytes | None = None) -> Result:
        # catch_exceptions=False: an exception that escapes the command (a
        # bug: errors must become exit codes) fails the test with its traceback.
        return self.runner.invoke(
            cli, ["--socket", self.socket_path, *args], input=input, catch_exceptions=False
        )


@pytest.fixture
def brokerq_cli(socket_path: str) -> Brokerq:
    return Brokerq(socket_path)


def ok(result: Result) -> str:
    """The stdout of a command that must have succeeded without a word on stderr."""
    assert result.exit_code == 0, (result.exit_code, result.stderr)
    assert result.stderr == ""
    return result.stdout


def one_error_line(result: Result) -> str:
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("brokerq: ")
    return lines[0]


def test_put_arguments_print_one_id_per_line(brokerq_cli: Brokerq) -> None:
    assert ok(brokerq_cli("put", "q", "a", "b", "c")) == "1\n2\n3\n"
    assert ok(brokerq_cli("put", "q", "d")) == "4\n"
    assert ok(brokerq_cli("get", "q", "-n", "4")) == "a\nb\nc\nd\n"


def test_put_from_stdin_one_message_per_line(brokerq_cli: Brokerq) -> None:
    assert ok(brokerq_cli("put", "q", input="a\nb\n")) == "1\n2\n"
    assert ok(brokerq_cli("put", "q", input="no newline")) == "3\n"
    stats = json.loads(ok(brokerq_cli("stats", "q", "--json")))
    assert stats["ready"] == 3
    assert ok(brokerq_cli("get", "q", "-n", "3")) == "a\nb\nno newline\n"


def test_get_prints_bodies_one_per_line(brokerq_cli: Brokerq) -> None:
    ok(brokerq_cli("put", "q", "first", "second", "third"))
    assert ok(brokerq_cli("get", "q")) == "first\n"
    assert ok(brokerq_cli("get", "q", "-n", "2")) == "second\nthird\n"


def test_get_n_with_timeout_prints_what_came(brokerq_cli: Brokerq) -> None:
    ok(brokerq_cli("put", "q", "one", "two"))
    result = brokerq_cli("get", "q", "-n", "3", "--timeout", "0.5")
    assert ok(result) == "one\ntwo\n"


def test_get_timeout_on_empty_queue_exits_3(brokerq_cli: Brokerq) -> None:
    result = brokerq_cli("get", "q", "--timeout", "0.2")
    assert result.exit_code == 3
    assert one_error_line(result) == "brokerq: no message on 'q' within 0.2 s"


def test_peek(brokerq_cli: Brokerq) -> None:
    empty = brokerq_cli("peek", "q")
    assert empty.exit_code == 3
    assert "empty" in one_error_line(empty)
    ok(brokerq_cli("put", "q", "head", "tail"))
    assert ok(brokerq_cli("peek", "q")) == "head\n"
    assert ok(brokerq_cli("peek", "q")) == "head\n"  # not removed
    assert ok(brokerq_cli("get", "q", "-n", "2")) == "head\ntail\n"


def test_purge_prints_the_count(brokerq_cli: Brokerq) -> None:
    assert ok(brokerq_cli("purge", "q")) == "0\n"
    ok(brokerq_cli("put", "q", "a", "b", "c"))
    assert ok(brokerq_cli("purge", "q")) == "3\n"
    assert brokerq_cli("get", "q", "--timeout", "0").exit_code == 3


def test_queues_lists_names(brokerq_cli: Brokerq) -> None:
    assert ok(brokerq_cli("queues")) == ""
    ok(brokerq_cli("put", "zebra", "z"))
    ok(brokerq_cli("put", "alpha", "a"))
    assert ok(brokerq_cli("queues")) == "alpha\nzebra\n"


def test_stats_of_a_queue_as_json(brokerq_cli: Brokerq) -> None:
    ok(brokerq_cli("put", "jobs", "a", "bb"))
    stats = json.loads(ok(brokerq_cli("stats", "jobs", "--json")))
    assert set(stats) >= QUEUE_STATS_KEYS
    assert stats["name"] == "jobs"
    assert (stats["ready"], stats["bytes"], stats["put_total"]) == (2, 3, 2)
    assert (stats["waiters"], stats["delivered_total"]) == (0, 0)
    assert stats["oldest_ready_age_s"] >= 0
    ok(brokerq_cli("get", "jobs", "-n", "2"))
    stats = json.loads(ok(brokerq_cli("stats", "jobs", "--json")))
    assert (stats["ready"], stats["bytes"], stats["delivered_total"]) == (0, 0, 2)
    assert stats["oldest_ready_age_s"] is None


def test_stats_table_shows_the_queue_row(brokerq_cli: Brokerq, sock_dir: str) -> None:
    ok(brokerq_cli("put", "jobs", "a", "bb"))
    lines = ok(brokerq_cli("stats")).splitlines()
    fields = dict(line.split(maxsplit=1) for line in lines[: lines.index("")])
    assert [int(fields["pid"])] == broker_pids(sock_dir)
    assert fields["version"] == brokerq.__version__
    header, *rows = lines[lines.index("") + 1 :]
    assert header.split() == ["name", "ready", "waiters", "bytes", "put_total", "delivered_total"]
    assert [row.split() for row in rows] == [["jobs", "2", "0", "3", "2", "0"]]


def test_ping(brokerq_cli: Brokerq, sock_dir: str) -> None:
    out = ok(brokerq_cli("ping"))
    assert out.startswith("pong from brokerq")
    assert out.count("\n") == 1
    assert f"(pid {broker_pids(sock_dir)[0]})" in out


@pytest.mark.parametrize("command", [None, *sorted(cli.commands)])
def test_help_exits_0_and_spawns_nothing(
    brokerq_cli: Brokerq, sock_dir: str, command: str | None
) -> None:
    args = ["--help"] if command is None else [command, "--help"]
    out = ok(brokerq_cli(*args))
    assert out.startswith("Usage: ")
    if command is not None:
        assert f" {command} " in out.splitlines()[0]
    assert broker_pids(sock_dir) == []


def test_unknown_command_exits_2(brokerq_cli: Brokerq, sock_dir: str) -> None:
    result = brokerq_cli("frobnicate")
    assert result.exit_code == 2
    assert "No such command 'frobnicate'" in result.stderr
    assert broker_pids(sock_dir) == []


def test_missing_argument_exits_2(brokerq_cli: Brokerq) -> None:
    assert brokerq_cli("get").exit_code == 2


def test_version_with_python_m() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "brokerq", "--version"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert (done.returncode, done.stderr) == (0, b"")
    assert done.stdout == f"brokerq, version {brokerq.__version__}\n".encode()


def test_put_with_priority_delay_and_ttl(socket_path: str) -> None:
    runner = CliRunner()

    def run(*args: str) -> Result:
        return runner.invoke(cli, ["--socket", socket_path, *args], catch_exceptions=False)

    assert run("put", "q", "low").exit_code == 0
    assert run("put", "q", "--priority", "5", "high").exit_code == 0
    assert run("put", "q", "--delay", "60", "later").exit_code == 0
    assert run("put", "q", "--ttl", "0", "x").exit_code == 2  # ttl must be > 0
    got = run("get", "q", "-n", "3", "--timeout", "0.3")
    assert (got.exit_code, got.output) == (0, "high\nlow\n")
    stats = json.loads(run("stats", "q", "--json").output)
    assert stats["delayed"] == 1


def test_put_on_a_full_queue_exits_3(socket_path: str) -> None:
    with brokerq.connect(socket_path) as client:
        client.queue("small", maxsize=1)
    runner = CliRunner()
    args = ["--socket", socket_path, "put", "small", "--timeout", "0"]
    assert runner.invoke(cli, [*args, "one"]).output == "1\n"
    full = runner.invoke(cli, [*args, "two"])
    assert full.exit_code == 3
    assert full.output == "brokerq: queue 'small' is full\n"


def test_delete_prints_how_many_went(socket_path: str) -> None:
    runner = CliRunner()

    def run(*args: str) -> Result:
        return runner.invoke(cli, ["--socket", socket_path, *args], catch_exceptions=False)

    run("put", "gone", "a", "b")
    run("put", "kept", "c")
    assert run("delete", "gone").output == "2\n"
    assert run("queues").output == "kept\n"
    assert run("delete", "never-was").output == "0\n"
