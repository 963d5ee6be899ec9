"""The ``brokerq`` command through click's CliRunner, against a real broker.

Each test has its own socket path; the first command that needs a broker
spawns one (a descendant of the test process), and the ``sock_dir`` fixture
kills it afterwards. Message ids start at 1 on a fresh broker, so outputs
are compared exactly.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import termios
from typing import IO, Any

import pytest
from click.testing import CliRunner, Result
from conftest import BIN, Procs, broker_pids, read_line, run_cli, wait_until

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
    "unfinished_tasks",
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


def test_put_prints_real_ids_whatever_the_put_window_variable_says(socket_path: str) -> None:
    done = run_cli("--socket", socket_path, "put", "q", "a", "b", env={"BROKERQ_PUT_WINDOW": "64"})
    assert (done.returncode, done.stdout, done.stderr) == (0, b"1\n2\n", b"")
    done = run_cli("--socket", socket_path, "get", "q", "-n", "2")
    assert done.stdout == b"a\nb\n"
    assert run_cli("--socket", socket_path, "stop").returncode == 0


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


def test_stats_table_shows_the_queue_row(
    brokerq_cli: Brokerq, sock_dir: str, socket_path: str
) -> None:
    """A message in each state, so that the bytes add up in the row."""
    with brokerq.connect(socket_path) as client:
        q = client.queue("jobs")
        q.put(b"b")
        q.reserve().bury()
        q.put(b"rr")
        held = q.reserve()
        q.put(b"ddd", delay=60)
        q.put(b"eeee")
        lines = ok(brokerq_cli("stats")).splitlines()
        held.release()
    fields = dict(line.split(maxsplit=1) for line in lines[: lines.index("")])
    assert [int(fields["pid"])] == broker_pids(sock_dir)
    assert fields["version"] == brokerq.__version__
    header, *rows = lines[lines.index("") + 1 :]
    assert header.split() == [
        "name",
        "ready",
        "delayed",
        "reserved",
        "buried",
        "waiters",
        "bytes",
        "put_total",
        "delivered_total",
    ]
    assert [row.split() for row in rows] == [["jobs", "1", "1", "1", "1", "0", "10", "4", "2"]]


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


@pytest.mark.parametrize(
    "args",
    [
        ("put", "jobs:dead", "x"),  # a queue put to may not have a ':'
        ("put", "", "x"),
        ("put", "jobs", "x", "--priority", "2147483648"),
        ("put", "jobs", "x", "--ttl", "0"),  # refused by click itself
        ("get", "", "--timeout", "1"),
        ("publish", "no:colon", "x"),
    ],
    ids=["colon", "empty_name", "priority", "ttl", "get_empty_name", "topic"],
)
def test_every_argument_the_user_got_wrong_exits_2(
    brokerq_cli: Brokerq, args: tuple[str, ...]
) -> None:
    """One rule, whoever finds the mistake (click, the client or the broker):
    a usage error, exit 2, one line on stderr; nothing was put."""
    result = brokerq_cli(*args)
    assert result.exit_code == 2, result.stderr
    assert result.stderr.strip().count("\n") <= 3  # click's usage lines, or one of ours
    assert ok(brokerq_cli("stats", "jobs", "--json")).count('"put_total": 0') == 1


def test_connect_timeout_0_uses_a_running_broker_and_starts_none(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "b.sock")
    refused = run_cli("--socket", path, "--connect-timeout", "0", "put", "q", "x")
    assert refused.returncode == 1
    assert refused.stderr.decode().splitlines() == [f"brokerq: no broker is running at {path}"]
    assert broker_pids(sock_dir) == []
    with brokerq.connect(path) as running:
        done = run_cli("--socket", path, "--connect-timeout", "0", "put", "q", "x")
        assert done.returncode == 0, done.stderr
        assert running.queue("q").get(timeout=5) == b"x"
        running.stop()


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


# -- topics ----------------------------------------------------------------------------------------

TOPIC_HEADER = ["topic", "queues", "live", "published_total", "dropped_total"]


def live_subscribers(client: brokerq.Client, topic: str) -> int:
    return int(client.stats()["topics"].get(topic, {}).get("live", 0))


def subscriber(procs: Procs, socket_path: str, *args: str) -> subprocess.Popen[bytes]:
    """``brokerq subscribe ...`` as a process of its own, once its subscription is in effect."""
    proc = procs([str(BIN / "brokerq"), "--socket", socket_path, "subscribe", *args])
    with brokerq.connect(socket_path) as client:
        wait_until(
            lambda: live_subscribers(client, args[0]) == 1 or proc.poll() is not None,
            what="the subscription to be in effect",
        )
    assert proc.poll() is None, proc.communicate()
    return proc


def test_publish_prints_how_many_subscribers_each_message_reached(brokerq_cli: Brokerq) -> None:
    assert ok(brokerq_cli("publish", "events", "nowhere")) == "0\n"  # nobody subscribes
    assert ok(brokerq_cli("queues")) == ""
    assert ok(brokerq_cli("subscribe", "events", "--queue", "audit")) == ""
    assert ok(brokerq_cli("subscribe", "events", "--queue", "metrics")) == ""
    assert ok(brokerq_cli("publish", "events", "a", "b")) == "2\n2\n"
    assert ok(brokerq_cli("publish", "events", input="c\nd\n")) == "2\n2\n"
    assert ok(brokerq_cli("get", "audit", "-n", "4")) == "a\nb\nc\nd\n"
    assert ok(brokerq_cli("get", "metrics", "-n", "4")) == "a\nb\nc\nd\n"
    result = brokerq_cli("publish", "no:colon", "x")
    assert result.exit_code == 2  # an argument the user got wrong: a usage error
    assert "topic name" in one_error_line(result)


def test_subscribe_prints_the_publishes_as_they_come(socket_path: str, procs: Procs) -> None:
    sub = subscriber(procs, socket_path, "events", "-n", "2", "--timeout", "10")
    done = run_cli("--socket", socket_path, "publish", "events", "a", "b")
    assert (done.returncode, done.stdout, done.stderr) == (0, b"1\n1\n", b"")
    out, err = sub.communicate(timeout=20)
    assert (sub.returncode, out, err) == (0, b"a\nb\n", b"")


def test_a_durable_subscription_then_get(socket_path: str) -> None:
    done = run_cli("--socket", socket_path, "subscribe", "events", "--queue", "audit")
    assert (done.returncode, done.stdout, done.stderr) == (0, b"", b"")  # exits at once
    done = run_cli("--socket", socket_path, "publish", "events", "one", "two")
    assert done.stdout == b"1\n1\n"
    with brokerq.connect(socket_path) as client:  # the broker's restart changes nothing
        assert client.stop()
    done = run_cli("--socket", socket_path, "publish", "events", "three")
    assert done.stdout == b"1\n"
    done = run_cli("--socket", socket_path, "get", "audit", "-n", "3", "--timeout", "5")
    assert (done.returncode, done.stdout, done.stderr) == (0, b"one\ntwo\nthree\n", b"")


def test_unsubscribe_exits_1_without_such_a_subscription(brokerq_cli: Brokerq) -> None:
    result = brokerq_cli("unsubscribe", "events", "--queue", "audit")
    assert result.exit_code == 1
    assert one_error_line(result) == "brokerq: queue 'audit' does not subscribe to 'events'"
    ok(brokerq_cli("subscribe", "events", "--queue", "audit"))
    ok(brokerq_cli("publish", "events", "kept"))
    assert ok(brokerq_cli("unsubscribe", "events", "--queue", "audit")) == ""
    assert brokerq_cli("unsubscribe", "events", "--queue", "audit").exit_code == 1
    assert ok(brokerq_cli("publish", "events", "not copied")) == "0\n"
    assert ok(brokerq_cli("get", "audit", "-n", "2", "--timeout", "0.2")) == "kept\n"
    assert brokerq_cli("unsubscribe", "events").exit_code == 2  # --queue is required


def test_topics_lists_subscribers_and_counts(brokerq_cli: Brokerq, socket_path: str) -> None:
    assert ok(brokerq_cli("topics")).split() == TOPIC_HEADER  # none: the header alone
    ok(brokerq_cli("subscribe", "events", "--queue", "audit"))
    ok(brokerq_cli("subscribe", "events", "--queue", "metrics"))
    ok(brokerq_cli("subscribe", "alerts", "--queue", "audit"))
    with brokerq.connect(socket_path) as client, client.subscribe("events") as sub:
        ok(brokerq_cli("publish", "events", "x"))
        assert sub.get(timeout=5) == b"x"
        expected = [
            TOPIC_HEADER,
            ["alerts", "audit", "0", "0", "0"],
            ["events", "audit,metrics", "1", "1", "0"],
        ]
        assert [line.split() for line in ok(brokerq_cli("topics")).splitlines()] == expected
        # The broker's stats end with the same table, after the queues'.
        lines = ok(brokerq_cli("stats")).splitlines()
        assert lines.count("") == 2
        topic_table = lines[len(lines) - lines[::-1].index("") :]
        assert [line.split() for line in topic_table] == expected
    ok(brokerq_cli("unsubscribe", "alerts", "--queue", "audit"))
    wait_until(lambda: "alerts" not in ok(brokerq_cli("topics")), what="alerts to go")


def test_subscribe_timeout_exits_3(brokerq_cli: Brokerq) -> None:
    result = brokerq_cli("subscribe", "events", "--timeout", "0.2")
    assert result.exit_code == 3
    assert one_error_line(result) == "brokerq: nothing was published to 'events' for 0.2 s"


def test_sigterm_ends_a_running_subscribe_with_exit_0(socket_path: str, procs: Procs) -> None:
    sub = subscriber(procs, socket_path, "events")
    with brokerq.connect(socket_path) as client:
        assert client.publish("events", b"one") == 1
        assert read_line(sub) == b"one\n"
        sub.send_signal(signal.SIGTERM)
        out, err = sub.communicate(timeout=10)
        assert (sub.returncode, out, err) == (0, b"", b"")
        wait_until(lambda: live_subscribers(client, "events") == 0, what="the broker to forget it")
        assert client.publish("events", b"two") == 0


def test_a_subscribe_that_falls_behind_exits_1(
    socket_path: str, procs: Procs, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BROKERQ_SUBSCRIBER_BUFFER", str(64 * 1024))  # whoever spawns the broker
    # Nobody reads its stdout, so once the pipe is full it stops reading publishes.
    sub = subscriber(procs, socket_path, "events")
    body = b"x" * 1023
    with brokerq.connect(socket_path) as client:
        assert client.stats()["subscriber_buffer"] == 64 * 1024
        counts = [client.publish("events", body) for _ in range(2000)]  # 2 MiB
        assert (counts[0], counts[-1]) == (1, 0)
    out, err = sub.communicate(timeout=20)
    assert sub.returncode == 1
    lines = out.splitlines()
    assert 0 < len(lines) < len(counts)
    assert set(lines) == {body}
    assert err.startswith(b"brokerq: ")
    assert b"behind" in err
    assert err.count(b"\n") == 1


# -- what get takes, and Ctrl-C ------------------------------------------------------------------


def brokerq_proc(
    procs: Procs, socket_path: str, *args: str, **kwargs: Any
) -> subprocess.Popen[bytes]:
    return procs([str(BIN / "brokerq"), "--socket", socket_path, *args], **kwargs)


def queue_stats(socket_path: str, queue: str) -> dict[str, Any]:
    with brokerq.connect(socket_path) as client:
        return client.queue(queue).stats()


def test_get_takes_each_message_as_a_get_does(brokerq_cli: Brokerq, socket_path: str) -> None:
    """Reserved, printed, then acked as a get: nothing stays reserved, and
    the tasks are left for a task_done, as after Queue.get."""
    ok(brokerq_cli("put", "q", "a", "b"))
    assert ok(brokerq_cli("get", "q", "-n", "2")) == "a\nb\n"
    stats = queue_stats(socket_path, "q")
    assert (stats["ready"], stats["reserved"], stats["delivered_total"]) == (0, 0, 2)
    assert stats["unfinished_tasks"] == 2


def test_ctrl_c_ends_a_waiting_get_quietly_as_sigint_and_takes_nothing(
    socket_path: str, procs: Procs
) -> None:
    waiting = brokerq_proc(procs, socket_path, "get", "q")
    wait_until(lambda: queue_stats(socket_path, "q")["waiters"] == 1, what="get to wait")
    waiting.send_signal(signal.SIGINT)
    out, err = waiting.communicate(timeout=10)
    # Killed by SIGINT, as Python ends on an uncaught KeyboardInterrupt: a
    # shell shows status 130 (and stops a loop that ran it, next test).
    assert (waiting.returncode, out, err) == (-signal.SIGINT, b"", b"")
    with brokerq.connect(socket_path) as client:
        q = client.queue("q")
        assert q.stats()["waiters"] == 0
        q.put(b"kept")
        assert q.get(timeout=5) == b"kept"


def test_ctrl_c_stops_a_shell_loop_that_runs_get(socket_path: str, procs: Procs) -> None:
    """bash goes on with a loop whose command exited by itself after Ctrl-C
    (it takes the signal as handled): get must end by SIGINT."""
    brokerq_path = BIN / "brokerq"
    loop = f"for i in 1 2; do '{brokerq_path}' --socket '{socket_path}' get q; done; echo after"
    shell = procs(["bash", "-c", loop], start_new_session=True)
    try:
        wait_until(lambda: queue_stats(socket_path, "q")["waiters"] == 1, what="get to wait")
        os.killpg(shell.pid, signal.SIGINT)  # as Ctrl-C does: the whole foreground group
        out, err = shell.communicate(timeout=10)
        assert (shell.returncode, out, err) == (-signal.SIGINT, b"", b"")
        assert queue_stats(socket_path, "q")["waiters"] == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(shell.pid, signal.SIGKILL)


def pipe_bytes(stream: IO[bytes]) -> int:
    """Bytes written to a pipe and not read yet."""
    size = array.array("i", [0])
    fcntl.ioctl(stream.fileno(), termios.FIONREAD, size)
    return size[0]


BIG = bytes(range(256)) * 1024  # 256 KiB: more than a pipe holds


def test_ctrl_c_while_get_writes_a_message_lets_it_finish(socket_path: str, procs: Procs) -> None:
    with brokerq.connect(socket_path) as client:
        client.queue("q").put(BIG)
    getter = brokerq_proc(procs, socket_path, "get", "q")
    assert getter.stdout is not None
    wait_until(lambda: pipe_bytes(getter.stdout) >= 65536, what="get to fill its stdout")
    getter.send_signal(signal.SIGINT)  # while it holds the message, blocked in the write
    out, err = getter.communicate(timeout=20)
    assert (getter.returncode, out == BIG + b"\n", err) == (-signal.SIGINT, True, b"")
    stats = queue_stats(socket_path, "q")
    assert (stats["ready"], stats["reserved"], stats["delivered_total"]) == (0, 0, 1)


def test_ctrl_c_again_ends_a_blocked_get_and_the_message_goes_back(
    socket_path: str, procs: Procs
) -> None:
    with brokerq.connect(socket_path) as client:
        client.queue("q").put(BIG)
    getter = brokerq_proc(procs, socket_path, "get", "q")
    assert getter.stdout is not None
    wait_until(lambda: pipe_bytes(getter.stdout) >= 65536, what="get to fill its stdout")

    def interrupted() -> bool:
        # Signals do not queue: one sent before the last was handled counts once.
        getter.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            getter.wait(timeout=0.2)
        return getter.returncode is not None

    wait_until(interrupted, what="a second Ctrl-C to end get")
    _, err = getter.communicate(timeout=10)
    assert (getter.returncode, err) == (-signal.SIGINT, b"")
    with brokerq.connect(socket_path) as client:
        message = client.queue("q").reserve(timeout=5)
        assert (message.body == BIG, message.attempt) == (True, 2)


def test_a_message_get_cannot_write_stays_on_its_queue(socket_path: str, procs: Procs) -> None:
    getter = brokerq_proc(procs, socket_path, "get", "q")
    wait_until(lambda: queue_stats(socket_path, "q")["waiters"] == 1, what="get to wait")
    assert getter.stdout is not None
    getter.stdout.close()  # the reader went away
    with brokerq.connect(socket_path) as client:
        client.queue("q").put(b"unread")
        assert getter.wait(timeout=10) == 1
        assert getter.stderr is not None
        assert getter.stderr.read() == b""
        assert client.queue("q").get(timeout=5) == b"unread"


# -- get --json, -0 ------------------------------------------------------------------------------


def test_get_json_prints_one_object_per_message(brokerq_cli: Brokerq, socket_path: str) -> None:
    with brokerq.connect(socket_path) as client:
        q = client.queue("q")
        q.put(b"plain")
        q.put("h\u00e9llo\nworld \u2603".encode())  # UTF-8, with a newline
        q.put(b"\xff\x00\xfe")  # not UTF-8
        q.put(b"")
        q.reserve().release()  # "plain" comes again: its second attempt
    result = brokerq_cli("get", "q", "--json", "-n", "4")
    lines = ok(result).splitlines()
    assert [json.loads(line) for line in lines] == [
        {"id": 1, "queue": "q", "attempt": 2, "body": "plain"},
        {"id": 2, "queue": "q", "attempt": 1, "body": "h\u00e9llo\nworld \u2603"},
        {"id": 3, "queue": "q", "attempt": 1, "body_base64": "/wD+"},
        {"id": 4, "queue": "q", "attempt": 1, "body": ""},
    ]
    assert '"body": "h\u00e9llo\\nworld \u2603"' in lines[1]  # UTF-8 as is, one line
    assert queue_stats(socket_path, "q")["ready"] == 0


def test_get_null_ends_each_body_with_a_nul(brokerq_cli: Brokerq, socket_path: str) -> None:
    with brokerq.connect(socket_path) as client:
        client.queue("q").put_many([b"two\nlines", b"", b"\xff"])
    result = brokerq_cli("get", "q", "-0", "-n", "3")
    assert (result.exit_code, result.stdout_bytes) == (0, b"two\nlines\0\0\xff\0")


def test_get_null_feeds_xargs_0(socket_path: str) -> None:
    assert run_cli("--socket", socket_path, "put", "q", "a b", "c\nd").returncode == 0
    got = run_cli("--socket", socket_path, "get", "q", "--null", "-n", "2")
    assert got.returncode == 0
    done = subprocess.run(
        ["xargs", "-0", "printf", "[%s]"],
        input=got.stdout,
        capture_output=True,
        timeout=10,
        check=True,
    )
    assert done.stdout == b"[a b][c\nd]"


def test_peek_and_subscribe_take_null_too(
    brokerq_cli: Brokerq, socket_path: str, procs: Procs
) -> None:
    ok(brokerq_cli("put", "q", "x\ny"))
    assert brokerq_cli("peek", "q", "-0").stdout_bytes == b"x\ny\0"
    sub = subscriber(procs, socket_path, "events", "-0", "-n", "2", "--timeout", "10")
    ok(brokerq_cli("publish", "events", "a\nb", "c"))
    out, err = sub.communicate(timeout=20)
    assert (sub.returncode, out, err) == (0, b"a\nb\0c\0", b"")


def test_get_json_and_null_together_is_a_usage_error(brokerq_cli: Brokerq) -> None:
    ok(brokerq_cli("put", "q", "kept"))
    result = brokerq_cli("get", "q", "--json", "-0")
    assert result.exit_code == 2
    assert "mutually exclusive" in result.stderr
    assert ok(brokerq_cli("get", "q")) == "kept\n"


# -- put from stdin: -, -0 -----------------------------------------------------------------------

BLOB = bytes(range(256)) + b"\n\nnot \xff UTF-8\r\n\0"


def bodies_of(socket_path: str, queue: str, n: int) -> list[bytes]:
    with brokerq.connect(socket_path) as client:
        return client.queue(queue).get_many(n, timeout=5)


def test_put_dash_puts_all_of_stdin_as_one_message(socket_path: str) -> None:
    done = run_cli("--socket", socket_path, "put", "q", "-", input=BLOB)
    assert (done.returncode, done.stdout, done.stderr) == (0, b"1\n", b"")
    got = run_cli("--socket", socket_path, "get", "q", "-0")
    assert (got.returncode, got.stdout) == (0, BLOB + b"\0")
    done = run_cli("--socket", socket_path, "put", "q", "-", input=b"")
    assert done.stdout == b"2\n"  # an empty stdin: one empty message
    assert bodies_of(socket_path, "q", 10) == [b""]


def test_put_dash_among_messages_and_only_once(brokerq_cli: Brokerq, socket_path: str) -> None:
    assert ok(brokerq_cli("put", "q", "a", "-", "b", input=b"from\nstdin\n")) == "1\n2\n3\n"
    assert bodies_of(socket_path, "q", 10) == [b"a", b"from\nstdin\n", b"b"]
    twice = brokerq_cli("put", "q", "-", "-", input=b"x")
    assert twice.exit_code == 2
    assert "'-'" in twice.stderr
    assert queue_stats(socket_path, "q")["put_total"] == 3


def test_put_null_reads_nul_ended_messages(brokerq_cli: Brokerq, socket_path: str) -> None:
    assert ok(brokerq_cli("put", "q", "-0", input=b"a\0b\nc\0\0\xfftail")) == "1\n2\n3\n4\n"
    assert bodies_of(socket_path, "q", 10) == [b"a", b"b\nc", b"", b"\xfftail"]
    assert ok(brokerq_cli("put", "q", "--null", input=b"")) == ""
    with_message = brokerq_cli("put", "q", "-0", "x")
    assert with_message.exit_code == 2
    assert queue_stats(socket_path, "q")["put_total"] == 4


def test_get_null_into_put_null_moves_messages_byte_for_byte(socket_path: str) -> None:
    bodies = [b"line\n", b"\xff\xfe", b"", BLOB[1:-1]]  # anything but a NUL
    with brokerq.connect(socket_path) as client:
        client.queue("src").put_many(bodies)
    got = run_cli("--socket", socket_path, "get", "src", "-0", "-n", "4")
    done = run_cli("--socket", socket_path, "put", "dst", "-0", input=got.stdout)
    assert (done.returncode, done.stdout.count(b"\n"), done.stderr) == (0, 4, b"")
    assert bodies_of(socket_path, "dst", 10) == bodies


def test_put_null_puts_each_message_as_it_comes(socket_path: str, procs: Procs) -> None:
    putter = brokerq_proc(procs, socket_path, "put", "q", "-0", stdin=subprocess.PIPE)
    assert putter.stdin is not None
    putter.stdin.write(b"first\0sec")
    putter.stdin.flush()
    assert read_line(putter) == b"1\n"  # before stdin ends
    out, err = putter.communicate(b"ond\0", timeout=10)
    assert (putter.returncode, out, err) == (0, b"2\n", b"")
    assert bodies_of(socket_path, "q", 10) == [b"first", b"second"]


def test_publish_dash_publishes_all_of_stdin(brokerq_cli: Brokerq, socket_path: str) -> None:
    ok(brokerq_cli("subscribe", "events", "--queue", "audit"))
    assert ok(brokerq_cli("publish", "events", "-", input=BLOB)) == "1\n"
    assert ok(brokerq_cli("publish", "events", "-0", input=b"a\0b")) == "1\n1\n"
    assert bodies_of(socket_path, "audit", 10) == [BLOB, b"a", b"b"]


# -- --socket after the command ------------------------------------------------------------------


def test_socket_and_connect_timeout_after_the_command(socket_path: str) -> None:
    runner = CliRunner()

    def run(*args: str) -> Result:
        return runner.invoke(cli, list(args), catch_exceptions=False)

    assert ok(run("put", "q", "a", "--socket", socket_path)) == "1\n"
    assert ok(run("get", "q", "--socket", socket_path, "--connect-timeout", "5")) == "a\n"
    assert ok(run("ping", "--socket", socket_path)).startswith("pong from brokerq")
    assert "--socket PATH" in ok(run("get", "--help"))
    assert run("ping", "--socket", socket_path, "--connect-timeout", "-1").exit_code == 2


def test_socket_after_the_command_wins(socket_path: str, sock_dir: str) -> None:
    """Over --socket before the command, and over BROKERQ_SOCKET."""
    runner = CliRunner()
    elsewhere = os.path.join(sock_dir, "other.sock")
    result = runner.invoke(
        cli, ["--socket", elsewhere, "put", "q", "a", "--socket", socket_path], env={}
    )
    assert ok(result) == "1\n"
    result = runner.invoke(
        cli, ["get", "q", "--socket", socket_path], env={"BROKERQ_SOCKET": elsewhere}
    )
    assert ok(result) == "a\n"
    assert not os.path.exists(elsewhere)
    assert not os.path.exists(elsewhere + ".lock")  # no broker was started there
