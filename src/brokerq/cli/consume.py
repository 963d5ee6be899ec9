"""``brokerq consume``: run a command once per message, and the runner behind it.

``jobs`` worker threads each reserve a message (each on its own connection,
so the lease is the thread's), run the command, renew the lease every third
of its length meanwhile, then settle the message by the result. The thread
in :meth:`Consumer.run` only waits for them and carries out ``stop`` and
``kill``, which just set flags and wake it, so they are safe in a signal
handler. Each command runs in its own process group, so a Ctrl-C at the
terminal reaches only ``consume``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue as stdlib_queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any

import click

from ..client.blocking import Message, Queue
from ..errors import BrokerqError, Empty
from .group import State, cli, count, pass_state, seconds

if TYPE_CHECKING:  # (subprocess and tempfile: imported when consume runs)
    import subprocess

    from ..nats import NatsMessage, NatsQueue

#: The longest one reserve waits: how soon an idle worker notices a stop.
POLL = 0.5
#: How long a command has between SIGTERM and SIGKILL when it is killed.
KILL_AFTER = 3.0
LOG_PREFIX = "brokerq consume: "

#: A command's exit status (negative: the signal that ended it), or why it could not start.
Status = int | str


def _stderr(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


@dataclasses.dataclass(eq=False)
class Consumer:
    """Runs ``command`` for each message of ``queue``, up to ``jobs`` at once (the
    options are the command's); ``acked``, ``released`` and ``buried`` count outcomes."""

    queue: Queue | NatsQueue
    command: Sequence[str]
    _: dataclasses.KW_ONLY
    jobs: int = 1
    retry_delay: float = 1.0
    max_attempts: int | None = None
    lease: float | None = None  # None: the queue's
    grace: float | None = None  # how long a stop waits before it kills (None: until kill())
    idle_exit: float | None = None
    max_messages: int | None = None
    log: Callable[[str], None] = _stderr

    def __post_init__(self) -> None:
        if not self.command:
            raise ValueError("consume needs a command to run")
        if self.jobs < 1:
            raise ValueError(f"jobs must be >= 1, not {self.jobs}")
        self.command = list(self.command)
        self.acked = self.released = self.buried = 0
        self._limit = 0
        self._lock = threading.Lock()
        self._wake: stdlib_queue.SimpleQueue[None] = stdlib_queue.SimpleQueue()
        self._stopping = False  # take no more messages (asked, idle, or done)
        self._stop_asked = False
        self._kills = 0
        self._stop_at: float | None = None
        self._term_at: float | None = None
        self._sigkilled = False
        self._killing = False  # the running commands are being killed
        self._procs: set[subprocess.Popen[bytes]] = set()
        self._live = 0  # workers not yet finished
        self._claimed = 0  # messages taken, or being reserved
        self._running = 0  # commands running (or being settled)
        self._last_busy = 0.0
        self._error: Exception | None = None

    def stop(self) -> None:
        """Take no more messages; let running commands finish. Signal-safe."""
        self._stopping = self._stop_asked = True
        self._wake.put(None)  # SimpleQueue.put is reentrant

    def kill(self) -> None:
        """Stop and kill the running commands (SIGTERM; a second kill: SIGKILL);
        their messages are released. Signal-safe."""
        self._kills += 1
        self.stop()

    def run(self) -> None:
        """Consume until stopped, idle for ``idle_exit``, or past ``max_messages``;
        return once every command has ended and its message is settled. Raises
        the first broker error a worker met (which stops the others)."""
        configured = int(self.queue.stats()["max_deliveries"])
        self._limit = min(self.max_attempts or configured, configured)
        workers = [
            threading.Thread(target=self._work, name=f"brokerq-consume-{i}", daemon=True)
            for i in range(self.jobs)
        ]
        self._live = len(workers)
        self._last_busy = time.monotonic()
        for worker in workers:
            worker.start()
        try:
            while self._live:
                timeout = self._tend(time.monotonic())
                with contextlib.suppress(stdlib_queue.Empty):
                    self._wake.get(timeout=timeout)
        finally:
            if self._live:  # left by an exception: leave no command running
                self._stopping = True
                self._signal_commands(signal.SIGKILL)
        for worker in workers:
            worker.join()
        if self._error is not None:
            raise self._error

    def _tend(self, now: float) -> float | None:
        """Act on stops, kills and deadlines; return how long until the next."""
        if self._stop_asked and self._stop_at is None:
            self._stop_at = now
            if self._running and not self._kills:
                until = "a second signal" if self.grace is None else f"{self.grace:g} s"
                self._log(
                    f"stopping: waiting for {self._running} running command(s) "
                    f"(killed after {until})"
                )
        grace_end = None
        if self._stop_at is not None and self.grace is not None:
            grace_end = self._stop_at + self.grace
        if self._term_at is None and (self._kills or (grace_end is not None and now >= grace_end)):
            self._signal_commands(signal.SIGTERM)
            self._term_at = now
        if self._term_at is not None and not self._sigkilled:
            if self._kills > 1 or now >= self._term_at + KILL_AFTER:
                self._signal_commands(signal.SIGKILL)
                self._sigkilled = True
            else:
                return self._term_at + KILL_AFTER - now
        if self._term_at is None and grace_end is not None:
            return max(0.0, grace_end - now)
        return None

    def _signal_commands(self, sig: signal.Signals) -> None:
        with self._lock:
            self._killing = True
            for proc in self._procs:
                _signal_group(proc, sig)

    def _work(self) -> None:
        try:
            while self._claim():
                try:
                    msg = self.queue.reserve(timeout=self._reserve_timeout(), lease=self.lease)
                except Empty:
                    self._idle()
                    continue
                self._handle(msg)
        except Exception as exc:  # a broker error, say: stop everything and report it
            if self._error is None:
                self._error = exc
            self._stopping = True
        finally:
            with self._lock:
                self._live -= 1
            self._wake.put(None)

    def _claim(self) -> bool:
        """May this worker take another message?"""
        with self._lock:
            if self._stopping:
                return False
            if self.max_messages is not None and self._claimed >= self.max_messages:
                return False  # (another worker may give its claim back, and go on)
            self._claimed += 1
            return True

    def _reserve_timeout(self) -> float:
        with self._lock:
            if self.idle_exit is None or self._running:
                return POLL
            left = self._last_busy + self.idle_exit - time.monotonic()
        return min(POLL, max(0.0, left))

    def _idle(self) -> None:
        """A reserve found nothing: give the claim back; stop if idle long enough."""
        with self._lock:
            self._claimed -= 1
            if self.idle_exit is None or self._running:
                return
            if time.monotonic() - self._last_busy >= self.idle_exit:
                self._stopping = True

    def _handle(self, msg: Message | NatsMessage) -> None:
        with self._lock:
            self._running += 1
        try:
            if self._stop_asked:  # it came in after a stop: give it straight back
                self._verb(msg, "release", msg.release)
            else:
                self._settle(msg, self._run_command(msg))
        finally:
            with self._lock:
                self._running -= 1
                self._last_busy = time.monotonic()

    def _run_command(self, msg: Message | NatsMessage) -> Status:
        """Run the command for ``msg``, keeping its lease alive; its status."""
        env = dict(os.environ)
        if isinstance(self.queue, Queue):
            env["BROKERQ_SOCKET"] = self.queue.client.socket_path
            env.pop("BROKERQ_URL", None)  # (it would win over the socket: the command's broker)
        else:
            env["BROKERQ_URL"] = self.queue.client.url
        env.update(BROKERQ_QUEUE=self.queue.name, BROKERQ_MESSAGE_ID=str(msg.id))
        env["BROKERQ_ATTEMPT"] = str(msg.attempt)
        interval = max(0.01, (msg.lease_expires - time.monotonic()) / 3)
        try:
            # A file, not a pipe: nothing to feed while we wait, however big
            # the body is and whether or not the command reads it.
            import subprocess
            import tempfile

            with tempfile.TemporaryFile() as stdin:
                stdin.write(msg.body)
                stdin.seek(0)
                proc = subprocess.Popen(self.command, stdin=stdin, env=env, process_group=0)
        except OSError as exc:
            return f"cannot run {self.command[0]!r}: {exc.strerror or exc}"
        with self._lock:
            self._procs.add(proc)
            if self._killing:
                _signal_group(proc, signal.SIGTERM)
        try:
            while True:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    return proc.wait(timeout=interval)
                try:
                    msg.touch()
                except BrokerqError as exc:
                    self._log(f"message {msg.id}: cannot renew its lease: {exc}")
                    return proc.wait()
        finally:
            with self._lock:
                self._procs.discard(proc)

    def _settle(self, msg: Message | NatsMessage, status: Status) -> None:
        what = f"message {msg.id} (attempt {msg.attempt} of {self._limit})"
        if status == 0:
            self._verb(msg, "ack", msg.ack)
        elif self._killing:
            self._log(f"{what}: {_describe(status)} while stopping; released")
            self._verb(msg, "release", msg.release)
        elif msg.attempt >= self._limit:
            self._log(f"{what}: {_describe(status)}; buried")
            self._verb(msg, "bury", msg.bury)
        else:
            self._log(f"{what}: {_describe(status)}; retry in {self.retry_delay:g} s")
            self._verb(msg, "release", lambda: msg.release(self.retry_delay))

    def _verb(self, msg: Message | NatsMessage, name: str, verb: Callable[[], None]) -> None:
        try:
            verb()
        except BrokerqError as exc:
            # Its lease ran out, or the broker went: it will be delivered again.
            self._log(f"message {msg.id}: cannot {name} it: {exc}")
            return
        counter = {"ack": "acked", "bury": "buried", "release": "released"}[name]
        with self._lock:
            setattr(self, counter, getattr(self, counter) + 1)

    def _log(self, line: str) -> None:
        with contextlib.suppress(OSError):
            self.log(LOG_PREFIX + line)


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """Signal the command and everything it started (its process group)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)


def _describe(status: Status) -> str:
    if isinstance(status, str):
        return status
    if status > 0:
        return f"exit status {status}"
    try:
        return f"killed by {signal.Signals(-status).name}"
    except ValueError:
        return f"killed by signal {-status}"


@cli.command()
@click.argument("queue")
@click.argument("command", nargs=-1, required=True, metavar="-- CMD [ARG]...")
@count(
    "-j", "--jobs", default=1, show_default=True, metavar="N", help="Run up to N commands at once."
)
@seconds(
    "--retry-delay",
    default=1.0,
    show_default=True,
    help="After a failure, the message is delivered again this much later.",
)
@count(
    "--max-attempts",
    metavar="N",
    help="Bury a message when its N-th delivery fails (default, and at most: the "
    "queue's max_deliveries).",
)
@seconds(
    "--lease",
    above=True,
    help="The lease of each message, renewed while its command runs (default: the queue's).",
)
@seconds(
    "--grace",
    help="On SIGINT/SIGTERM, kill the commands still running after this long "
    "(default: at a second signal).",
)
@seconds(
    "--idle-exit",
    help="Exit once no message has come for this long and no command runs "
    "(0: once nothing is ready; default: never).",
)
@count(
    "--max-messages", metavar="N", help="Exit after N messages (once their commands have ended)."
)
@pass_state
def consume(state: State, /, queue: str, command: tuple[str, ...], **options: Any) -> None:
    """Run CMD once for each message of QUEUE, up to N at a time.

    CMD gets the body on its stdin, and BROKERQ_MESSAGE_ID, BROKERQ_QUEUE,
    BROKERQ_ATTEMPT (1 on the first delivery) and BROKERQ_SOCKET (under
    --url: BROKERQ_URL) in its environment; its output is consume's.
    consume itself prints nothing but one line on stderr per failure.

    CMD exiting 0 acks the message. A failure (another exit status, a
    signal, a command that cannot start) releases it for a retry after
    --retry-delay, or buries it if that was its last attempt (`brokerq kick
    QUEUE` puts it back). Messages are reserved, and
    their leases renewed while CMD runs, so if consume dies they are
    delivered again, not lost.

    SIGINT or SIGTERM stops taking messages, lets running commands finish
    and settles each by its result, then exits 0. A second signal (or the
    end of --grace) kills them (SIGTERM to each command's process group,
    SIGKILL 3 s later) and releases their messages.

    Put `--` before CMD, so that its options are not taken for consume's:

    \b
        brokerq consume outbox -j 4 -- sendmail -t
        brokerq consume thumbs --idle-exit 0 -- sh -c 'convert - "$BROKERQ_MESSAGE_ID.png"'
    """
    import shutil

    if shutil.which(command[0]) is None:
        raise click.UsageError(f"{command[0]}: command not found")
    consumer = Consumer(state.queue(queue), command, **options)
    signals = 0  # the first SIGINT or SIGTERM stops consumer, the next ones kill

    def handle(signum: int, frame: FrameType | None) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            consumer.stop()
        else:
            consumer.kill()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        consumer.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
