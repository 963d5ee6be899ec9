"""A stop is no worse than a crash for workers.

A consumer that reconnects when the broker stops may start the next broker
as soon as the old one exits: ``brokerq stop`` waits for the broker it
stopped, not for none to run.

Every wait is on an observable condition (the broker's stats, a line of
output, a pause point), bounded; processes are ended by pid (``procs``,
``sock_dir``).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from conftest import BIN, Procs, gone, read_line, wait_until

import brokerq

BROKERQ = str(BIN / "brokerq")


def live(client: brokerq.Client, topic: str) -> int:
    """The live subscribers of ``topic`` on the broker serving now."""
    info = client.stats().get("topics", {}).get(topic)
    return 0 if info is None else int(info["live"])


def ended(proc: subprocess.Popen[bytes], timeout: float = 30) -> tuple[int, bytes]:
    """``proc``'s exit status and what it wrote on stderr, once it exited."""
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


# -- the command line ---------------------------------------------------------------------


class Pause:
    """A pause point of :mod:`brokerq.pause`, armed by :attr:`spec` in a
    process's BROKERQ_TEST_PAUSE (test_spawn_races.py has the full story)."""

    def __init__(self, directory: str, point: str) -> None:
        self.point = point
        self.fifo = os.path.join(directory, point)
        os.mkfifo(self.fifo, 0o600)
        self.spec = f"{point}={self.fifo}"

    def wait(self) -> int:
        """Wait until a process is held at the point; its pid."""
        reached = Path(self.fifo + ".reached")
        line = wait_until(
            lambda: reached.read_text() if reached.exists() else "",
            what=f"a process at {self.point}",
        )
        pid, point = line.split()
        assert point == self.point
        return int(pid)

    def release(self) -> None:
        fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.write(fd, b"g")
        finally:
            os.close(fd)


def test_brokerq_stop_waits_for_its_broker_not_for_the_next(
    socket_path: str, sock_dir: str, procs: Procs
) -> None:
    """A consumer that reconnects may start the next broker as soon as the old
    one exits; ``brokerq stop`` returns all the same (it does not wait for no
    broker to run), here while that consumer holds the lock to start one."""
    locked = Pause(sock_dir, "client.locked")
    stop_sent = Pause(sock_dir, "client.stop_sent")
    with brokerq.connect(socket_path) as client:
        first = client.broker_pid
        sub = procs(
            [BROKERQ, "--socket", socket_path, "subscribe", "news", "-n", "1"],
            env={**os.environ, "BROKERQ_TEST_PAUSE": locked.spec},
        )
        wait_until(lambda: live(client, "news") == 1, what="brokerq subscribe to subscribe")
        stopping = procs(
            [BROKERQ, "--socket", socket_path, "--connect-timeout", "5", "stop"],
            env={**os.environ, "BROKERQ_TEST_PAUSE": stop_sent.spec},
        )
        assert stop_sent.wait() == stopping.pid
        # The old broker exits; the subscriber takes the lock to start the next.
        assert locked.wait() == sub.pid
        wait_until(lambda: gone(first), what=f"broker {first} to exit")
        stop_sent.release()
        assert ended(stopping) == (0, b"")
        locked.release()
        wait_until(lambda: live(client, "news") == 1, what="it to subscribe again")
        assert client.publish("news", b"after the stop") == 1
        assert read_line(sub, timeout=20) == b"after the stop\n"
        assert sub.wait(timeout=10) == 0
