"""``brokerq get Q1 Q2 ...``: the multi-queue wait from the shell, against a real broker.

In-process through click's CliRunner where the command's output is all
that matters; as a real process where it has to wait (and be signalled).
"""

from __future__ import annotations

import json
import signal
from typing import Any

from click.testing import CliRunner, Result
from conftest import BIN, Procs, read_line, wait_until

import brokerq
from brokerq.cli import cli


def brokerq_cli(socket_path: str, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--socket", socket_path, *args], catch_exceptions=False)


def ok(result: Result) -> str:
    assert (result.exit_code, result.stderr) == (0, "")
    return result.stdout


def waiters(socket_path: str, *queues: str) -> list[int]:
    with brokerq.connect(socket_path) as client:
        return [client.queue(name).stats()["waiters"] for name in queues]


def stats(socket_path: str, queue: str) -> dict[str, Any]:
    with brokerq.connect(socket_path) as client:
        return client.queue(queue).stats()


def test_get_of_several_queues_takes_from_the_first_that_has_one(socket_path: str) -> None:
    ok(brokerq_cli(socket_path, "put", "low", "l1", "l2"))
    ok(brokerq_cli(socket_path, "put", "high", "h1"))
    out = ok(brokerq_cli(socket_path, "get", "high", "low", "-n", "3", "--json"))
    records = [json.loads(line) for line in out.splitlines()]
    assert [(r["queue"], r["body"], r["attempt"]) for r in records] == [
        ("high", "h1", 1),
        ("low", "l1", 1),
        ("low", "l2", 1),
    ]
    assert [r["id"] for r in records] == [3, 1, 2]
    # Taken as a get takes: nothing stays reserved, the tasks await task_done.
    low = stats(socket_path, "low")
    assert (low["ready"], low["reserved"], low["unfinished_tasks"]) == (0, 0, 2)


def test_get_of_one_queue_says_its_queue_in_json_too(socket_path: str) -> None:
    ok(brokerq_cli(socket_path, "put", "jobs", "x"))
    record = json.loads(ok(brokerq_cli(socket_path, "get", "jobs", "--json")))
    assert (record["queue"], record["body"]) == ("jobs", "x")


def test_a_waiting_get_of_several_queues_is_served_by_any(socket_path: str, procs: Procs) -> None:
    getter = procs([str(BIN / "brokerq"), "--socket", socket_path, "get", "a", "b", "--json"])
    wait_until(lambda: waiters(socket_path, "a", "b") == [1, 1], what="get to wait on both")
    ok(brokerq_cli(socket_path, "put", "b", "to b"))
    assert json.loads(read_line(getter))["queue"] == "b"
    assert getter.wait(timeout=10) == 0
    assert waiters(socket_path, "a", "b") == [0, 0]


def test_get_of_several_queues_times_out_naming_them(socket_path: str) -> None:
    result = brokerq_cli(socket_path, "get", "a", "b", "--timeout", "0.2")
    assert (result.exit_code, result.stdout) == (3, "")
    assert "no message on 'a', 'b' within 0.2 s" in result.stderr
    ok(brokerq_cli(socket_path, "put", "b", "only"))
    result = brokerq_cli(socket_path, "get", "a", "b", "-n", "2", "--timeout", "0.3")
    assert (result.exit_code, result.stdout) == (0, "only\n")


def test_a_bad_list_of_queues_is_a_usage_error(socket_path: str) -> None:
    for args in (["a", "a"], [f"q{i}" for i in range(65)], ["a", ""]):
        result = brokerq_cli(socket_path, "get", *args, "--timeout", "0")
        assert result.exit_code == 2, (args, result.stderr)
        assert result.stderr.startswith("brokerq: ")
        assert result.stdout == ""


def test_ctrl_c_ends_a_get_waiting_on_several_queues_and_takes_nothing(
    socket_path: str, procs: Procs
) -> None:
    getter = procs([str(BIN / "brokerq"), "--socket", socket_path, "get", "a", "b"])
    wait_until(lambda: waiters(socket_path, "a", "b") == [1, 1], what="get to wait on both")
    getter.send_signal(signal.SIGINT)
    out, err = getter.communicate(timeout=10)
    assert (getter.returncode, out, err) == (-signal.SIGINT, b"", b"")
    wait_until(lambda: waiters(socket_path, "a", "b") == [0, 0], what="it to leave both lines")
    with brokerq.connect(socket_path) as client:
        client.queue("b").put(b"kept")
        assert client.get_any(["a", "b"], timeout=5) == ("b", b"kept")
