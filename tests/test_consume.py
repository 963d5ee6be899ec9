"""``brokerq consume``: the real command in a subprocess, and the Consumer in-process.

Commands are small shell scripts that write what they saw into files of a
directory ``$D`` (inside the test's socket directory). A command that must
stay running until the test lets it go (a *blocker*) first creates
``$D/started.<id>``, then waits for ``$D/go``; it also gives up once ``$D``
is gone, so that no command outlives its test even when the test fails.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import BIN, Procs, run_cli, wait_until

import brokerq
from brokerq import consume
from brokerq.consume import Consumer

BROKERQ = str(BIN / "brokerq")
SAVE = 'cat > "$D/$BROKERQ_MESSAGE_ID"'
BLOCK = (
    'echo $$ > "$D/pid.$BROKERQ_MESSAGE_ID"; touch "$D/started.$BROKERQ_MESSAGE_ID"; '
    'while [ ! -e "$D/go" ]; do [ -d "$D" ] || exit 1; sleep 0.01; done'
)


@pytest.fixture
def out(sock_dir: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The commands' directory, as ``$D`` in their environment."""
    path = Path(sock_dir, "out")
    path.mkdir()
    monkeypatch.setenv("D", str(path))
    return path


@pytest.fixture
def client(socket_path: str) -> Iterator[brokerq.Client]:
    with brokerq.connect(socket_path) as c:
        yield c


def sh(script: str) -> list[str]:
    return ["sh", "-c", script]


def started(out: Path) -> list[str]:
    return sorted(p.name.split(".", 1)[1] for p in out.glob("started.*"))


def group_alive(pgid: int) -> bool:
    """Does any live process belong to process group ``pgid``?"""
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
            return True
    return False


def counts(q: brokerq.Queue) -> tuple[int, int, int, int]:
    s = q.stats()
    return s["ready"], s["delayed"], s["reserved"], s["buried"]


# -- the command, for real ----------------------------------------------------------


def test_each_body_goes_once_to_the_command(
    socket_path: str, client: brokerq.Client, out: Path
) -> None:
    bodies = [b"one", b"two\nlines", b"", b"\x00\xff binary", b"x" * 300_000]
    ids = client.queue("q").put_many(bodies)
    env = 'echo "$BROKERQ_QUEUE $BROKERQ_ATTEMPT" > "$D/env.$BROKERQ_MESSAGE_ID"'
    script = f"{SAVE}; {env}; echo out"
    done = run_cli(
        "--socket", socket_path, "consume", "q", "-j", "2", "--idle-exit", "0", "--",
        *sh(script),
    )  # fmt: skip
    assert (done.returncode, done.stderr) == (0, b"")
    assert done.stdout == b"out\n" * len(bodies)  # the commands' own, nothing of consume's
    for msg_id, body in zip(ids, bodies, strict=True):
        assert (out / str(msg_id)).read_bytes() == body
        assert (out / f"env.{msg_id}").read_text() == "q 1\n"
    assert counts(client.queue("q")) == (0, 0, 0, 0)
    assert client.queue("q").stats()["delivered_total"] == len(bodies)


def test_the_command_gets_the_socket_consume_used_even_under_brokerq_url(
    socket_path: str, client: brokerq.Client, out: Path
) -> None:
    """BROKERQ_URL wins over BROKERQ_SOCKET: a command that inherited it would
    put its results on NATS, not on the broker consume took the message from."""
    client.queue("q").put(b"job")
    script = 'echo "${BROKERQ_URL-unset} $BROKERQ_SOCKET" > "$D/env"'
    done = run_cli(
        "--socket", socket_path, "consume", "q", "--idle-exit", "0", "--", *sh(script),
        env={"BROKERQ_URL": "nats://127.0.0.1:1"},
    )  # fmt: skip
    assert (done.returncode, done.stderr) == (0, b"")
    assert (out / "env").read_text() == f"unset {socket_path}\n"


@pytest.mark.parametrize(
    "case",
    [
        (3, [], 3),  # the queue's max_deliveries
        (None, ["--max-attempts", "2"], 2),  # under the broker's 20
        (2, ["--max-attempts", "5"], 2),  # never past the queue's limit
    ],
)
def test_a_failing_command_is_retried_then_buried(
    socket_path: str, client: brokerq.Client, out: Path, case: tuple[int | None, list[str], int]
) -> None:
    max_deliveries, option, attempts = case
    q = client.queue("q", max_deliveries=max_deliveries)
    (msg_id,) = q.put_many([b"doomed"])
    script = 'echo "$BROKERQ_ATTEMPT" >> "$D/attempts"; exit 3'
    done = run_cli(
        "--socket", socket_path, "consume", "q", "--retry-delay", "0", "--idle-exit", "0",
        *option, "--", *sh(script),
    )  # fmt: skip
    assert (done.returncode, done.stdout) == (0, b"")
    assert (out / "attempts").read_text() == "".join(f"{n}\n" for n in range(1, attempts + 1))
    lines = done.stderr.decode().splitlines()
    assert len(lines) == attempts
    assert lines[0] == (
        f"brokerq consume: message {msg_id} (attempt 1 of {attempts}): exit status 3; retry in 0 s"
    )
    assert lines[-1].endswith(f"(attempt {attempts} of {attempts}): exit status 3; buried")
    assert counts(q) == (0, 0, 0, 1)
    assert q.stats()["dead_lettered_total"] == 0
    assert q.kick() == 1  # buried in q, where kick finds it
    assert q.get(timeout=0) == b"doomed"


def test_jobs_run_that_many_commands_at_once(
    socket_path: str, client: brokerq.Client, out: Path, procs: Procs
) -> None:
    q = client.queue("q")
    ids = q.put_many([b"a", b"b", b"c", b"d"])
    proc = procs(
        [BROKERQ, "--socket", socket_path, "consume", "q", "-j", "3", "--idle-exit", "0", "--",
         *sh(f"{BLOCK}; {SAVE}")],
    )  # fmt: skip
    wait_until(lambda: len(started(out)) == 3, what="three commands running at once")
    # All three workers are busy: the fourth message waits for one of them.
    assert counts(q) == (1, 0, 3, 0)
    assert started(out) == sorted(str(i) for i in ids[:3])
    (out / "go").touch()
    assert proc.wait(timeout=20) == 0
    assert [(out / str(i)).read_bytes() for i in ids] == [b"a", b"b", b"c", b"d"]
    assert counts(q) == (0, 0, 0, 0)


def test_ctrl_c_lets_running_commands_finish(
    socket_path: str, client: brokerq.Client, out: Path, procs: Procs, sock_dir: str
) -> None:
    q = client.queue("q")
    ids = q.put_many([b"a", b"b", b"c", b"d"])
    log = Path(sock_dir, "stderr")
    with log.open("wb") as stderr:
        proc = procs(
            [BROKERQ, "--socket", socket_path, "consume", "q", "-j", "2", "--",
             *sh(f"{BLOCK}; {SAVE}")],
            stderr=stderr,
            process_group=0,
        )  # fmt: skip
    wait_until(lambda: len(started(out)) == 2, what="two commands running")
    # As the terminal does: SIGINT to consume's whole process group. The
    # commands have their own groups, so only consume gets it.
    os.killpg(proc.pid, signal.SIGINT)
    wait_until(
        lambda: "stopping: waiting for 2 running command(s)" in log.read_text(),
        what="consume to say it is stopping",
    )
    (out / "go").touch()
    assert proc.wait(timeout=20) == 0
    assert proc.stdout is not None
    assert proc.stdout.read() == b""
    assert log.read_text() == (
        "brokerq consume: stopping: waiting for 2 running command(s) "
        "(killed after a second signal)\n"
    )
    assert [(out / str(i)).read_bytes() for i in ids[:2]] == [b"a", b"b"]
    assert started(out) == sorted(str(i) for i in ids[:2])  # nothing taken after the signal
    assert counts(q) == (2, 0, 0, 0)  # both finished ones acked, the others untouched
    assert q.get_many(2, timeout=0) == [b"c", b"d"]


def test_a_second_signal_kills_the_commands_and_releases_their_messages(
    socket_path: str, client: brokerq.Client, out: Path, procs: Procs, sock_dir: str
) -> None:
    q = client.queue("q")
    (msg_id,) = q.put_many([b"long"])
    log = Path(sock_dir, "stderr")
    with log.open("wb") as stderr:
        proc = procs(
            [BROKERQ, "--socket", socket_path, "consume", "q", "--", *sh(BLOCK)],
            stderr=stderr,
        )
    wait_until(lambda: started(out), what="the command to start")
    command = int((out / f"pid.{msg_id}").read_text())
    proc.send_signal(signal.SIGTERM)
    wait_until(lambda: "stopping" in log.read_text(), what="consume to say it is stopping")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    assert not group_alive(command)  # the shell and its sleep
    assert log.read_text().splitlines()[1:] == [
        f"brokerq consume: message {msg_id} (attempt 1 of 20): "
        "killed by SIGTERM while stopping; released"
    ]
    assert counts(q) == (1, 0, 0, 0)
    again = q.reserve(timeout=0)
    assert (again.id, again.body, again.attempt) == (msg_id, b"long", 2)


def test_a_command_that_is_not_found_is_a_usage_error(socket_path: str) -> None:
    done = run_cli("--socket", socket_path, "consume", "q", "--", "no-such-command-here")
    assert done.returncode == 2
    assert b"no-such-command-here: command not found" in done.stderr


# -- the Consumer, in-process -----------------------------------------------------------


class Running:
    """A Consumer's run() in a thread, with what it logged."""

    def __init__(self, make: Callable[[Callable[[str], None]], Consumer]) -> None:
        self.lines: list[str] = []
        self.consumer = make(self.lines.append)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.consumer.run()
        except BaseException as exc:
            self.error = exc

    def finish(self, timeout: float = 20) -> Consumer:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the consumer did not finish"
        if self.error is not None:
            raise self.error
        return self.consumer


def run_consumer(q: brokerq.Queue, command: list[str], **options: Any) -> Running:
    return Running(lambda log: Consumer(q, command, log=log, **options))


def test_outcomes_are_counted_and_failures_logged(client: brokerq.Client, out: Path) -> None:
    q = client.queue("q")
    ids = q.put_many([b"good", b"bad", b"good"])
    running = run_consumer(q, sh('[ "$(cat)" = good ]'), max_attempts=1, idle_exit=0)
    done = running.finish()
    assert (done.acked, done.released, done.buried) == (2, 0, 1)
    assert running.lines == [
        f"brokerq consume: message {ids[1]} (attempt 1 of 1): exit status 1; buried"
    ]


def test_a_failure_is_released_with_the_retry_delay(client: brokerq.Client, out: Path) -> None:
    q = client.queue("q")
    q.put(b"x")
    done = run_consumer(q, ["false"], retry_delay=60, idle_exit=0).finish()
    assert (done.acked, done.released, done.buried) == (0, 1, 0)
    assert counts(q) == (0, 1, 0, 0)


def test_a_command_that_cannot_start_is_a_failure(client: brokerq.Client, out: Path) -> None:
    q = client.queue("q")
    msg_id = q.put(b"x")
    running = run_consumer(q, [str(out / "missing")], max_attempts=1, idle_exit=0)
    assert running.finish().buried == 1
    assert running.lines == [
        f"brokerq consume: message {msg_id} (attempt 1 of 1): "
        f"cannot run '{out / 'missing'}': No such file or directory; buried"
    ]


def test_the_lease_is_renewed_while_the_command_runs(client: brokerq.Client, out: Path) -> None:
    # The command runs three leases long; an idle second worker would get
    # the message again (attempt 2) if its lease ran out.
    q = client.queue("q")
    q.put(b"x")
    script = 'echo "$BROKERQ_ATTEMPT" >> "$D/attempts"; sleep 1.5'
    running = run_consumer(q, sh(script), jobs=2, lease=0.5, idle_exit=0)
    assert running.finish().acked == 1
    assert (out / "attempts").read_text() == "1\n"
    assert running.lines == []


def test_max_messages(client: brokerq.Client, out: Path) -> None:
    q = client.queue("q")
    q.put_many([b"a", b"b", b"c"])
    done = run_consumer(q, sh(SAVE), jobs=2, max_messages=2).finish()
    assert done.acked == 2
    assert counts(q) == (1, 0, 0, 0)


def test_idle_exit_waits_for_the_quiet_period(client: brokerq.Client, out: Path) -> None:
    q = client.queue("q")
    running = run_consumer(q, sh(SAVE), idle_exit=30)
    msg_id = q.put(b"late")  # within the 30 s: taken
    wait_until((out / str(msg_id)).exists, what="the late message")
    running.consumer.stop()
    assert running.finish().acked == 1


def test_a_message_that_comes_after_a_stop_is_given_back(client: brokerq.Client, out: Path) -> None:
    q = client.queue("q")
    running = run_consumer(q, sh(SAVE))
    wait_until(lambda: q.stats()["waiters"] == 1, what="the worker to wait in a reserve")
    running.consumer.stop()
    msg_id = q.put(b"late")  # to the waiting reserve, unless it just timed out
    done = running.finish()
    assert not (out / str(msg_id)).exists()
    assert done.acked == 0
    assert counts(q) == (1, 0, 0, 0)


def test_stop_with_grace_kills_what_is_still_running(client: brokerq.Client, out: Path) -> None:
    q = client.queue("q")
    msg_id = q.put(b"x")
    running = run_consumer(q, sh(BLOCK), grace=0.1)
    wait_until(lambda: started(out), what="the command to start")
    running.consumer.stop()
    assert running.finish().released == 1
    assert running.lines == [
        "brokerq consume: stopping: waiting for 1 running command(s) (killed after 0.1 s)",
        f"brokerq consume: message {msg_id} (attempt 1 of 20): "
        "killed by SIGTERM while stopping; released",
    ]
    assert counts(q) == (1, 0, 0, 0)


@pytest.mark.parametrize("kills", [1, 2])
def test_a_command_that_ignores_sigterm_gets_sigkill(
    client: brokerq.Client, out: Path, monkeypatch: pytest.MonkeyPatch, kills: int
) -> None:
    # One kill: SIGKILL after KILL_AFTER; a second kill: at once (KILL_AFTER
    # is then too long for the test to pass by waiting for it).
    monkeypatch.setattr(consume, "KILL_AFTER", 0.2 if kills == 1 else 600)
    q = client.queue("q")
    msg_id = q.put(b"x")
    running = run_consumer(q, sh(f"trap '' TERM; {BLOCK}"))
    wait_until(lambda: started(out), what="the command to start")
    for _ in range(kills):
        running.consumer.kill()
    assert running.finish().released == 1
    assert running.lines[-1].endswith("killed by SIGKILL while stopping; released")
    assert not group_alive(int((out / f"pid.{msg_id}").read_text()))
    assert counts(q) == (1, 0, 0, 0)


def test_a_message_is_not_lost_if_its_lease_cannot_be_renewed(
    client: brokerq.Client, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every touch is refused: the first attempt outlives its lease, its ack
    # fails, and the message comes back for a second attempt.
    def refused(self: brokerq.Message, lease: float | None = None) -> None:
        raise brokerq.LeaseLost("refused, for the test")

    monkeypatch.setattr(brokerq.Message, "touch", refused)
    q = client.queue("q")
    msg_id = q.put(b"x")
    script = 'echo "$BROKERQ_ATTEMPT" >> "$D/attempts"; [ "$BROKERQ_ATTEMPT" = 2 ] || sleep 1.5'
    running = run_consumer(q, sh(script), lease=0.5, max_messages=2)
    assert running.finish().acked == 1
    assert (out / "attempts").read_text() == "1\n2\n"
    assert running.lines[0] == (
        f"brokerq consume: message {msg_id}: cannot renew its lease: refused, for the test"
    )
    assert running.lines[1].startswith(f"brokerq consume: message {msg_id}: cannot ack it: ")


def test_consumer_needs_a_command(client: brokerq.Client) -> None:
    with pytest.raises(ValueError, match="command"):
        Consumer(client.queue("q"), [])
