"""brokerq.testing: private brokers for users' own tests, and its pytest plugin.

The plugin is checked the way a user's suite meets it: a conftest.py with
``pytest_plugins = ["brokerq.testing"]`` run by ``pytester`` in a pytest of
its own. Every test checks what is left afterwards: no broker process and
no directory.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest
from conftest import BIN, gone

import brokerq
import brokerq.testing
from brokerq.testing import private_broker

pytest_plugins = ["pytester", "brokerq.testing"]


def assert_nothing_left(directory: str, *pids: int) -> None:
    assert not os.path.exists(directory)
    for pid in pids:
        assert gone(pid), f"broker pid {pid} is still running"


def test_a_private_broker_with_its_options_and_nothing_left() -> None:
    with private_broker(max_deliveries=3, lease=2.5, max_message_size=1000) as client:
        directory = os.path.dirname(client.socket_path)
        pid = client.broker_pid
        assert directory.startswith("/tmp/")
        assert len(client.socket_path) < 60
        assert os.stat(directory).st_mode & 0o777 == 0o700
        q = client.queue("q")
        q.put(b"x")
        assert q.get(timeout=1) == b"x"
        stats = client.stats()
        assert stats["journal"] is None  # journal=False: nothing on disk
        assert stats["idle_exit_s"] == 600  # an orphaned test broker goes by itself
        assert (stats["max_deliveries"], stats["lease_s"]) == (3, 2.5)
        assert stats["max_message_size"] == 1000
        assert not [name for name in os.listdir(directory) if "journal" in name]
    assert_nothing_left(directory, pid)
    with pytest.raises(brokerq.BrokerqError, match="closed"):
        client.ping()


def test_the_broker_ignores_the_brokerq_environment(
    monkeypatch: pytest.MonkeyPatch, sock_dir: str
) -> None:
    monkeypatch.setenv("BROKERQ_MAX_DELIVERIES", "7")
    monkeypatch.setenv("BROKERQ_DATA_DIR", sock_dir)
    monkeypatch.setenv("BROKERQ_JOURNAL", "1")
    with private_broker() as client:
        stats = client.stats()
        assert stats["max_deliveries"] == 20
        assert stats["journal"] is None
    assert os.listdir(sock_dir) == []


def test_with_a_journal_messages_outlive_a_stop() -> None:
    with private_broker(journal=True) as client:
        directory = os.path.dirname(client.socket_path)
        first = client.broker_pid
        assert client.stats()["journal"] == client.socket_path + ".journal"
        client.queue("q").put(b"kept")
        assert client.stop()
        # The next use spawns a broker at the same socket, as a client
        # always does; it replays the journal, and is stopped at the end too.
        assert client.queue("q").get(timeout=5) == b"kept"
        second = client.broker_pid
        assert second != first
    assert_nothing_left(directory, first, second)


def test_teardown_after_an_exception_in_the_block() -> None:
    with pytest.raises(ZeroDivisionError), private_broker() as client:  # noqa: PT012
        directory = os.path.dirname(client.socket_path)
        pid = client.broker_pid
        client.queue("q").put(b"x")
        1 / 0  # noqa: B018
    assert_nothing_left(directory, pid)


def test_teardown_after_the_broker_was_stopped_or_killed() -> None:
    with private_broker() as client:
        directory = os.path.dirname(client.socket_path)
        pid = client.broker_pid
        assert client.stop()
        assert not brokerq.Client(client.socket_path, timeout=1).stop()
    assert_nothing_left(directory, pid)

    with private_broker() as client:
        directory = os.path.dirname(client.socket_path)
        pid = client.broker_pid
        os.kill(pid, signal.SIGKILL)
        client.close()  # the test may close the client itself, too
    assert_nothing_left(directory, pid)


def test_a_broker_that_does_not_answer_is_killed() -> None:
    start = time.monotonic()
    with private_broker(timeout=1) as client:
        directory = os.path.dirname(client.socket_path)
        pid = client.broker_pid
        os.kill(pid, signal.SIGSTOP)
    assert_nothing_left(directory, pid)
    assert time.monotonic() - start < 10


def test_a_broker_that_cannot_start(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[str] = []
    mkdtemp = tempfile.mkdtemp

    def recording_mkdtemp(*args: str, **kwargs: str) -> str:
        made.append(mkdtemp(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(tempfile, "mkdtemp", recording_mkdtemp)
    with (
        pytest.raises(brokerq.BrokerUnavailable, match="exited before it was ready"),
        private_broker(log_level="loud"),
    ):
        pass  # pragma: no cover - never entered
    assert made
    assert not os.path.exists(made[0])


def test_importing_it_does_not_need_pytest() -> None:
    code = (
        "import sys; sys.modules['pytest'] = None\n"
        "import brokerq.testing as t\n"
        "assert 'pytest' not in dir(t) and not hasattr(t, 'brokerq_client')\n"
        "with t.private_broker() as c:\n"
        "    c.queue('q').put(b'x')\n"
        "    print(c.queue('q').get(timeout=5).decode())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, timeout=60, check=False
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, b"x\n", b"")


def test_queue_names_for_tests() -> None:
    assert brokerq.testing.queue_name_for("test_x") == "test_x"
    assert brokerq.testing.queue_name_for("test_x[a:b c]") == "test_x[a_b_c]"
    assert len(brokerq.testing.queue_name_for("t" * 300)) == 200


# -- the fixtures, in this suite ------------------------------------------------


def test_the_fixtures(
    brokerq_client: brokerq.Client, brokerq_socket: str, brokerq_queue: brokerq.Queue
) -> None:
    assert brokerq_socket == brokerq_client.socket_path
    assert os.environ["BROKERQ_SOCKET"] == brokerq_socket
    assert brokerq_queue.client is brokerq_client
    assert brokerq_queue.name == "test_the_fixtures"
    # Code that uses the default broker reaches the private one.
    brokerq.Queue("jobs").put(b"via the default socket")
    assert brokerq_client.queue("jobs").get(timeout=1) == b"via the default socket"


# -- the plugin, in a user's suite ----------------------------------------------

USER_CONFTEST = """
import pytest

from brokerq.testing import private_broker

pytest_plugins = ["brokerq.testing"]


@pytest.fixture(scope="session")
def shared_client():
    with private_broker() as client:
        yield client
"""

USER_TESTS = """
import os
import subprocess

import pytest

import brokerq

RECORD = {record!r}


def record(client):
    with open(RECORD, "a") as f:
        f.write(f"{{client.socket_path}} {{client.broker_pid}}\\n")


def test_client(brokerq_client):
    record(brokerq_client)
    q = brokerq_client.queue("jobs")
    q.put(b"hello")
    assert q.get(timeout=5) == b"hello"


def test_socket_for_code_that_takes_a_path(brokerq_socket):
    with brokerq.connect(brokerq_socket) as client:
        record(client)
        client.queue("jobs").put(b"by path")
    # The brokerq command, in a subprocess, finds it through BROKERQ_SOCKET.
    got = subprocess.run(
        [{brokerq!r}, "get", "jobs", "--timeout", "5"],
        capture_output=True, check=True, timeout=30,
    )
    assert got.stdout == b"by path\\n"


def test_queue_named_after_the_test(brokerq_queue):
    record(brokerq_queue.client)
    assert brokerq_queue.name == "test_queue_named_after_the_test"
    brokerq_queue.put(b"x")
    assert brokerq_queue.client.queues() == [brokerq_queue.name]


class TestOptions:
    @pytest.fixture
    def brokerq_options(self):
        return {{"journal": True, "max_deliveries": 2}}

    def test_overridden(self, brokerq_client):
        record(brokerq_client)
        stats = brokerq_client.stats()
        assert stats["max_deliveries"] == 2
        assert stats["journal"] == brokerq_client.socket_path + ".journal"


def test_a_failing_test_is_cleaned_up_too(brokerq_client):
    record(brokerq_client)
    brokerq_client.queue("jobs").put(b"x")
    raise RuntimeError("the user's test fails")


def test_the_broker_stopped_by_the_test(brokerq_client):
    record(brokerq_client)
    assert brokerq_client.stop()


@pytest.mark.parametrize("n", [1, 2])
def test_one_broker_for_the_session(shared_client, n):
    if n == 1:
        record(shared_client)
    shared_client.queue("shared").put(b"%d" % n)
    assert shared_client.queue("shared").stats()["put_total"] == n
"""


def test_the_pytest_plugin_in_a_users_suite(pytester: pytest.Pytester) -> None:
    record = pytester.path / "brokers.txt"
    pytester.makeconftest(USER_CONFTEST)
    pytester.makepyfile(
        test_user=USER_TESTS.format(record=str(record), brokerq=str(BIN / "brokerq"))
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=7, failed=1, warnings=0)
    result.stdout.fnmatch_lines(["*RuntimeError: the user's test fails*"])
    brokers = [line.split() for line in record.read_text().splitlines()]
    assert len(brokers) == 7
    assert len({path for path, _ in brokers}) == 7  # a fresh broker per test
    for path, pid in brokers:
        assert_nothing_left(os.path.dirname(path), int(pid))


def test_the_plugin_is_opt_in(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_user="""
        def test_client(brokerq_client):
            pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'brokerq_client' not found*"])
