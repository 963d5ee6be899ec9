"""The ``brokerq`` command: the queue from the shell.

Exit status: 0 ok; 1 an error (one line on stderr); 2 a usage error;
3 timed out or empty (``get``, ``peek``, ``join``); Ctrl-C: the command
ends quietly as one killed by SIGINT (status 130 in the shell). Library
errors become exit codes here, at the edge, and nowhere else.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import sys
import time
from collections.abc import Iterator
from types import FrameType
from typing import Any, BinaryIO, cast

import click

from .client import calls
from .client.blocking import Client, Message, Queue
from .errors import (
    BrokerqError,
    BrokerUnavailable,
    Empty,
    Full,
    InvalidRequest,
    JoinTimeout,
    LeaseLost,
)
from .version import __version__

EXIT_ERROR = 1
EXIT_USAGE = 2  # click's own, for options it refuses itself
EXIT_EMPTY = 3
#: Ctrl-C. Within click's runner (tests) the status; as the command
#: (:func:`main`), the process then ends by SIGINT itself, which a shell
#: shows as this same 130.
EXIT_INTERRUPTED = 128 + signal.SIGINT

#: The lease of a message ``get`` takes: it is acked once written to
#: stdout, which may wait for a slow reader of a full pipe. A get that
#: dies gives it back at once anyway (its connection closes), so the lease
#: only has to outlast the write.
GET_LEASE = 24 * 3600.0


class _Group(click.Group):
    """Turns brokerq's errors into one line on stderr and an exit status.

    It makes the ``serve`` command only when it is asked for (see
    :func:`_serve_command`).
    """

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), "serve"})

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        cmd.params.extend(_command_options())
        super().add_command(cmd, name)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name == "serve" and cmd_name not in self.commands:
            self.add_command(_serve_command())
        return super().get_command(ctx, cmd_name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (Empty, Full, JoinTimeout) as exc:
            click.echo(f"brokerq: {exc}", err=True)
            ctx.exit(EXIT_EMPTY)
        except InvalidRequest as exc:
            # An argument the user got wrong, whoever found it (click, the
            # client, the broker): one rule, a usage error.
            click.echo(f"brokerq: {exc}", err=True)
            ctx.exit(EXIT_USAGE)
        except BrokerqError as exc:
            click.echo(f"brokerq: {exc}", err=True)
            ctx.exit(EXIT_ERROR)
        except KeyboardInterrupt:
            # Quietly: no traceback, no click "Aborted!" (main ends the
            # process by SIGINT, so that a shell loop running it stops too).
            ctx.exit(EXIT_INTERRUPTED)


class _State:
    """What every command shares: the socket path and a lazily made client."""

    def __init__(self, socket: str | None, connect_timeout: float) -> None:
        self.socket = socket
        self.connect_timeout = connect_timeout
        self._client: Client | None = None

    @property
    def client(self) -> Client:
        if self._client is None:
            # No put window, whatever BROKERQ_PUT_WINDOW says: `put` prints
            # each message's id, which a windowed put does not know. No
            # prefetch either: `get -n 1` would take 64 to hand out one.
            self._client = Client(self.socket, self.connect_timeout, put_window=0, prefetch=0)
        return self._client

    def queue(self, name: str) -> Queue:
        return self.client.queue(name)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


pass_state = click.make_pass_decorator(_State)


def _command_options() -> list[click.Parameter]:
    """The group's --socket and --connect-timeout, taken after the command
    name too (``brokerq get jobs --socket PATH``), where they win over the
    group's (and so over BROKERQ_SOCKET)."""

    def set_socket(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
        state = ctx.find_object(_State)
        if state is not None and value is not None:
            state.socket = value

    def set_timeout(ctx: click.Context, param: click.Parameter, value: float | None) -> None:
        state = ctx.find_object(_State)
        if state is not None and value is not None:
            state.connect_timeout = value

    return [
        click.Option(
            ["--socket"],
            metavar="PATH",
            expose_value=False,
            callback=set_socket,
            help="The broker's socket, as before the command (this one wins).",
        ),
        click.Option(
            ["--connect-timeout"],
            type=click.FloatRange(min=0),
            metavar="SECONDS",
            expose_value=False,
            callback=set_timeout,
            help="As before the command (this one wins).",
        ),
    ]


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--socket",
    envvar="BROKERQ_SOCKET",
    metavar="PATH",
    help="The broker's socket [env: BROKERQ_SOCKET; default: the per-user path].",
)
@click.option(
    "--connect-timeout",
    type=click.FloatRange(min=0),
    default=10.0,
    show_default=True,
    envvar="BROKERQ_CONNECT_TIMEOUT",
    show_envvar=True,
    metavar="SECONDS",
    help="How long to wait for a broker to answer (or start); 0: use a running one only.",
)
@click.version_option(__version__, prog_name="brokerq")
@click.pass_context
def cli(ctx: click.Context, socket: str | None, connect_timeout: float) -> None:
    """A local message queue: name a socket, enqueue, dequeue.

    Every command but `stop` starts a broker for the socket if none runs.

    Exit status: 0 ok, 1 error, 2 usage error, 3 timed out, empty or full;
    Ctrl-C ends a command as SIGINT does (status 130).
    """
    state = ctx.obj = _State(socket, connect_timeout)
    ctx.call_on_close(state.close)


def _stdout() -> BinaryIO:
    return sys.stdout.buffer


_null_option = click.option(
    "-0",
    "--null",
    "null",
    is_flag=True,
    help="End each body with a NUL byte instead of a newline (for xargs -0).",
)


def _bodies(messages: tuple[str, ...], null: bool) -> Iterator[bytes]:
    """What ``put`` and ``publish`` send: each MESSAGE, ``-`` standing for
    all of stdin (one message, bytes as they are); with none, stdin's lines
    (or with ``null``, its NUL-ended records)."""
    if messages and null:
        raise click.UsageError("-0/--null splits stdin: it takes no MESSAGE.")
    if messages.count("-") > 1:
        raise click.UsageError("'-' (all of stdin, as one message) may be given once.")
    if not messages:
        return _stdin_records() if null else _stdin_lines()
    return (
        sys.stdin.buffer.read() if m == "-" else m.encode("utf-8", "surrogateescape")
        for m in messages
    )


def _stdin_lines() -> Iterator[bytes]:
    for line in sys.stdin.buffer:
        yield line[:-1] if line.endswith(b"\n") else line


def _stdin_records() -> Iterator[bytes]:
    """Stdin's records, each ended by a NUL (the last may lack it), as they come."""
    stdin = cast("io.BufferedReader", sys.stdin.buffer)  # (or click's BytesIO)
    pending = bytearray()
    start = 0  # of the next record in pending
    while chunk := stdin.read1(1 << 16):
        searched = len(pending)
        pending += chunk
        while (end := pending.find(b"\0", searched)) >= 0:
            yield bytes(pending[start:end])
            start = searched = end + 1
        del pending[:start]
        start = 0
    if pending:
        yield bytes(pending)


_null_input_option = click.option(
    "-0",
    "--null",
    "null",
    is_flag=True,
    help="With no MESSAGE: stdin holds messages each ended by a NUL byte "
    "(as get -0 prints them), not lines.",
)


@cli.command()
@click.argument("queue")
@click.argument("messages", nargs=-1)
@click.option("--priority", type=int, default=0, show_default=True, help="Higher first.")
@click.option(
    "--delay",
    type=click.FloatRange(min=0),
    default=0.0,
    metavar="SECONDS",
    help="Invisible until this many seconds have passed.",
)
@click.option(
    "--ttl",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Dropped if still waiting after this many seconds.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    help="On a full queue, wait this long for room, then exit 3 (default: for ever).",
)
@_null_input_option
@pass_state
def put(
    state: _State,
    /,
    *,
    queue: str,
    messages: tuple[str, ...],
    priority: int,
    delay: float,
    ttl: float | None,
    timeout: float | None,
    null: bool,
) -> None:
    """Put each MESSAGE on QUEUE; with none, one message per stdin line.

    A MESSAGE `-` is all of stdin, as one message, byte for byte (so
    `brokerq put QUEUE - < file` puts a file; a body `-` itself: `printf %s
    - | brokerq put QUEUE -`). Prints each message id on its own line. Exits
    3 if a full queue had no room within --timeout.
    """
    q = state.queue(queue)
    for body in _bodies(messages, null):
        click.echo(q.put(body, priority=priority, delay=delay, ttl=ttl, timeout=timeout))


@cli.command()
@click.argument("queue")
@click.option(
    "-n",
    "count",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="How many messages to get, one after another.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    help="One deadline for all of them (default: wait for ever).",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help='Print each message as a JSON object on a line of its own: "id", "queue", '
    '"attempt", and "body" (a UTF-8 body, as text) or "body_base64" (any other).',
)
@_null_option
@pass_state
def get(
    state: _State,
    /,
    *,
    queue: str,
    count: int,
    timeout: float | None,
    as_json: bool,
    null: bool,
) -> None:
    """Get messages from QUEUE and print each body on its own line.

    Exits 3 if --timeout passes before the first message; 0 if at least one
    message came. Each message is taken off QUEUE once it was written to
    stdout: one that could not be (Ctrl-C, a closed pipe) stays on QUEUE.
    """
    if as_json and null:
        raise click.UsageError("--json and -0/--null are mutually exclusive.")
    end = b"\0" if null else b"\n"
    q = state.queue(queue)
    out = _stdout()
    deadline = None if timeout is None else time.monotonic() + timeout
    with _Interrupts() as interrupts:
        for got in range(count):
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                message = q.reserve(timeout=remaining, lease=GET_LEASE)
            except Empty:
                if got:
                    return
                raise Empty(f"no message on {queue!r} within {timeout:g} s") from None
            with interrupts.held():
                _write_all(out, _json_line(message) if as_json else message.body + end)
                _ack_as_get(state.client, message)


def _json_line(message: Message) -> bytes:
    """``get --json``'s line for ``message``: its body as text if it is
    UTF-8, else in base64 under another key (so that it is not taken for text)."""
    import base64
    import json

    record: dict[str, Any] = {
        "id": message.id,
        "queue": message.queue.name,
        "attempt": message.attempt,
    }
    try:
        record["body"] = message.body.decode("utf-8")
    except UnicodeDecodeError:
        record["body_base64"] = base64.b64encode(message.body).decode("ascii")
    return json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n"


def _write_all(out: BinaryIO, data: bytes) -> None:
    """Write and flush all of ``data``. (A buffered write that a signal
    interrupts, the handler returning, may return having written part.)"""
    view = memoryview(data)
    while view:
        view = view[out.write(view) :]
    out.flush()


def _ack_as_get(client: Client, message: Message) -> None:
    """Take a reserved and printed message off its queue as a get does
    (its task left for a task_done): the ack of the async client's get."""
    try:
        client.run(calls.ack(message.id, message.attempt, as_get=True))
    except (LeaseLost, BrokerUnavailable) as exc:
        raise BrokerqError(
            f"message {message.id} was printed, but may be delivered again: {exc}"
        ) from exc


class _Interrupts:
    """Ctrl-C while a message is being written and acked waits until it is,
    so that it is neither lost nor printed twice; a second one interrupts
    at once (a reader that does not read holds the write up for ever), and
    the message goes back to its queue. SIGINT that was ignored (a
    background job) stays ignored."""

    def __init__(self) -> None:
        self.holding = False
        self.pending = False
        self.previous: Any = None

    def __enter__(self) -> _Interrupts:
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.holding and not self.pending:
            self.pending = True
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
        if self.pending:
            raise KeyboardInterrupt


@cli.command()
@click.argument("queue")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    help="Exit 3 if the work is not done by then (default: wait for ever).",
)
@pass_state
def join(state: _State, queue: str, timeout: float | None) -> None:
    """Wait until every task of QUEUE is done, then exit 0.

    A task is a message put and not yet settled: got and then marked done
    (Queue.task_done), acked, or otherwise gone (purged, expired, buried,
    dead-lettered). So a script can enqueue a batch, start its consumers
    and wait for the batch to finish:

    \b
        brokerq put jobs < batch.txt
        brokerq consume jobs -j 4 -- ./work.sh & consumer=$!
        brokerq join jobs --timeout 600; status=$?
        kill $consumer
    """
    try:
        state.queue(queue).join(timeout=timeout)
    except JoinTimeout:
        if timeout is None:
            raise
        raise JoinTimeout(
            f"the tasks of {queue!r} were not all done within {timeout:g} s"
        ) from None


@cli.command()
@click.argument("queue")
@_null_option
@pass_state
def peek(state: _State, queue: str, null: bool) -> None:
    """Print the body at the head of QUEUE without removing it (exit 3 if empty)."""
    _stdout().write(state.queue(queue).peek() + (b"\0" if null else b"\n"))


@cli.command()
@click.argument("queue")
@pass_state
def purge(state: _State, queue: str) -> None:
    """Remove every ready message from QUEUE; print how many."""
    click.echo(state.queue(queue).purge())


@cli.command()
@click.argument("queue")
@click.option("-n", "count", type=click.IntRange(min=1), default=1, show_default=True)
@pass_state
def kick(state: _State, queue: str, count: int) -> None:
    """Return up to N buried messages of QUEUE to ready; print how many.

    On QUEUE:dead (dead letters) it moves them back to QUEUE instead, with
    their delivery count reset.
    """
    click.echo(state.queue(queue).kick(count))


@cli.command()
@click.argument("queue")
@pass_state
def delete(state: _State, queue: str) -> None:
    """Delete QUEUE with every message it holds (in every state) and its
    settings; print how many messages went."""
    click.echo(state.queue(queue).delete())


@cli.command()
@pass_state
def queues(state: _State) -> None:
    """List the broker's queues, one name per line."""
    for name in state.client.queues():
        click.echo(name)


#: ``bytes`` counts the bodies in every state, the ready, delayed, reserved and buried.
QUEUE_COLUMNS = (
    "name",
    "ready",
    "delayed",
    "reserved",
    "buried",
    "waiters",
    "bytes",
    "put_total",
    "delivered_total",
)


@cli.command()
@click.argument("queue", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option(
    "--prom",
    "as_prom",
    is_flag=True,
    help="Print the Prometheus text format (0.0.4) instead of a table.",
)
@pass_state
def stats(state: _State, queue: str | None, as_json: bool, as_prom: bool) -> None:
    """Print the stats of QUEUE, or of the broker and all its queues."""
    if as_json and as_prom:
        raise click.UsageError(
            "--json and --prom are mutually exclusive.", click.get_current_context()
        )
    data: dict[str, Any]
    if queue is not None:
        data = state.queue(queue).stats()
    else:
        data = state.client.stats()
        data["queue_stats"] = [state.queue(n).stats() for n in state.client.queues()]
    if as_prom:
        from .broker.prometheus import format_prometheus

        if queue is not None:
            text = format_prometheus(None, [data])
        else:
            text = format_prometheus(data, data.pop("queue_stats"))
        click.echo(text, nl=False)
        return
    if as_json:
        import json

        click.echo(json.dumps(data, indent=2, sort_keys=True))
        return
    rows = data.pop("queue_stats", None)
    topic_rows = _topic_rows(data.pop("topics", {}))
    width = max(len(k) for k in data)
    for key, value in data.items():
        click.echo(f"{key:<{width}}  {_fmt(value)}")
    if rows:
        click.echo()
        click.echo(_table(rows, QUEUE_COLUMNS))
    if topic_rows:
        click.echo()
        click.echo(_table(topic_rows, TOPIC_COLUMNS))


@cli.command()
@click.argument("topic")
@click.argument("messages", nargs=-1)
@click.option("--priority", type=int, default=0, show_default=True, help="Higher first.")
@click.option(
    "--ttl",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Each copy is dropped if still waiting after this many seconds.",
)
@_null_input_option
@pass_state
def publish(
    state: _State,
    /,
    *,
    topic: str,
    messages: tuple[str, ...],
    priority: int,
    ttl: float | None,
    null: bool,
) -> None:
    """Publish each MESSAGE to TOPIC; with none, one message per stdin line
    (a MESSAGE `-`: all of stdin, as one message, as for put).

    Every subscriber gets a copy: each queue subscribed with `brokerq
    subscribe TOPIC --queue Q`, and each live `brokerq subscribe TOPIC`.
    Prints, per message, how many subscribers it reached (0: nobody
    subscribes; the message went nowhere).
    """
    for body in _bodies(messages, null):
        click.echo(state.client.publish(topic, body, priority=priority, ttl=ttl))


@cli.command()
@click.argument("topic")
@click.option(
    "--queue",
    metavar="QUEUE",
    help="Subscribe QUEUE for good (kept across restarts) and exit, instead of "
    "printing the publishes as they come.",
)
@click.option(
    "-n",
    "count",
    type=click.IntRange(min=1),
    help="Exit after this many messages (default: run until interrupted).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    help="Exit 3 if no message comes for this long (default: wait for ever).",
)
@_null_option
@pass_state
def subscribe(
    state: _State,
    /,
    *,
    topic: str,
    queue: str | None,
    count: int | None,
    timeout: float | None,
    null: bool,
) -> None:
    """Print each message published to TOPIC from now on, one per line.

    A live subscription: it lasts while this command runs, and Ctrl-C or
    SIGTERM ends it (exit 0). One that reads too slowly is dropped by the
    broker (exit 1, "fell behind"). With --queue, QUEUE gets a copy of every
    later publish instead, until `brokerq unsubscribe TOPIC --queue QUEUE`:

    \b
        brokerq subscribe events --queue audit     # durable
        brokerq subscribe events | while read -r line; do ...; done
    """
    if queue is not None:
        state.queue(queue).subscribe(topic)
        return
    end = b"\0" if null else b"\n"
    out = _stdout()
    with _until_signalled(), state.client.subscribe(topic) as subscription:
        got = 0
        while count is None or got < count:
            try:
                body = subscription.get(timeout=timeout)
            except Empty:
                raise Empty(f"nothing was published to {topic!r} for {timeout:g} s") from None
            out.write(body + end)
            out.flush()
            got += 1


@cli.command()
@click.argument("topic")
@click.option("--queue", metavar="QUEUE", required=True, help="The subscribed queue.")
@pass_state
def unsubscribe(state: _State, topic: str, queue: str) -> None:
    """End QUEUE's subscription to TOPIC (its messages stay in it).

    Exits 1 if QUEUE did not subscribe to TOPIC.
    """
    if not state.queue(queue).unsubscribe(topic):
        raise BrokerqError(f"queue {queue!r} does not subscribe to {topic!r}")


TOPIC_COLUMNS = ("topic", "queues", "live", "published_total", "dropped_total")


@cli.command()
@pass_state
def topics(state: _State) -> None:
    """List the topics that have subscribers, with their subscribers and counts.

    With none, the table's header alone."""
    rows = _topic_rows(state.client.stats().get("topics", {}))
    click.echo(_table(rows, TOPIC_COLUMNS))


def _topic_rows(topics: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"topic": name, **info, "queues": ",".join(info["queues"]) or "-"}
        for name, info in topics.items()
    ]


@contextlib.contextmanager
def _until_signalled() -> Iterator[None]:
    """End the block quietly on Ctrl-C or SIGTERM: the way to stop a subscriber."""

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "-" if value is None else str(value)


def _table(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    cells = [list(columns)] + [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = []
    for row in cells:
        first = row[0].ljust(widths[0])
        rest = (cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True))
        lines.append("  ".join([first, *rest]))
    return "\n".join(lines)


@cli.command()
@pass_state
def ping(state: _State) -> None:
    """Check that a broker answers (starting one if none runs)."""
    rtt = state.client.ping()
    conn = state.client.connection()
    click.echo(f"pong from {conn.server} (pid {conn.broker_pid}) in {rtt * 1000:.2f} ms")


@cli.command()
@pass_state
def stop(state: _State) -> None:
    """Ask the broker to exit. Never starts one."""
    if not state.client.stop():
        click.echo(f"brokerq: no broker is running at {state.client.socket_path}", err=True)


def _serve_command() -> click.Command:
    """The ``serve`` command, made on demand: its options are the broker's
    (daemon.py), and importing the broker's modules would slow every other
    command's start."""
    from .broker.daemon import broker_options
    from .broker.daemon import run as run_broker

    @click.command()
    @broker_options
    @pass_state
    def serve(state: _State, /, **options: Any) -> None:
        """Run a broker for --socket in the foreground (as local-queue-broker)."""
        sys.exit(run_broker(state.socket, **options))

    return serve


@cli.command()
@click.argument("queue")
@click.argument("command", nargs=-1, required=True, metavar="-- CMD [ARG]...")
@click.option(
    "-j",
    "--jobs",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    metavar="N",
    help="Run up to N commands at once.",
)
@click.option(
    "--retry-delay",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    metavar="SECONDS",
    help="After a failure, the message is delivered again this much later.",
)
@click.option(
    "--max-attempts",
    type=click.IntRange(min=1),
    metavar="N",
    help="Bury a message when its N-th delivery fails (default, and at most: the "
    "queue's max_deliveries).",
)
@click.option(
    "--lease",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="The lease of each message, renewed while its command runs (default: the queue's).",
)
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    help="On SIGINT/SIGTERM, kill the commands still running after this long "
    "(default: at a second signal).",
)
@click.option(
    "--idle-exit",
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    help="Exit once no message has come for this long and no command runs "
    "(0: once nothing is ready; default: never).",
)
@click.option(
    "--max-messages",
    type=click.IntRange(min=1),
    metavar="N",
    help="Exit after N messages (once their commands have ended).",
)
@pass_state
def consume(
    state: _State,
    /,
    *,
    queue: str,
    command: tuple[str, ...],
    jobs: int,
    retry_delay: float,
    max_attempts: int | None,
    lease: float | None,
    grace: float | None,
    idle_exit: float | None,
    max_messages: int | None,
) -> None:
    """Run CMD once for each message of QUEUE, up to N at a time.

    CMD gets the body on its stdin, and BROKERQ_MESSAGE_ID, BROKERQ_QUEUE,
    BROKERQ_ATTEMPT (1 on the first delivery) and BROKERQ_SOCKET in its
    environment; its output is consume's. consume itself prints nothing but
    one line on stderr per failure.

    CMD exiting 0 acks the message. A failure (another exit status, a
    signal, a command that cannot start) releases it for a retry after
    --retry-delay, or buries it if that was its last attempt (`brokerq kick
    QUEUE` puts it back). Messages are reserved, and their leases renewed while CMD runs,
    so if consume dies they are delivered again, not lost.

    SIGINT or SIGTERM stops taking messages, lets running commands finish
    and settles each by its result, then exits 0. A second signal (or the
    end of --grace) kills them (SIGTERM to each command's process group,
    SIGKILL 3 s later) and releases their messages.

    Put `--` before CMD, so that its options are not taken for consume's:

    \b
        brokerq consume outbox -j 4 -- sendmail -t
        brokerq consume thumbs --idle-exit 0 -- sh -c 'convert - "$BROKERQ_MESSAGE_ID.png"'
    """
    # Imported here, so that this command's lines stay together in this file.
    import shutil

    from .consume import Consumer, stop_on_signals

    if shutil.which(command[0]) is None:
        raise click.UsageError(f"{command[0]}: command not found")
    consumer = Consumer(
        state.queue(queue),
        command,
        jobs=jobs,
        retry_delay=retry_delay,
        max_attempts=max_attempts,
        lease=lease,
        grace=grace,
        idle_exit=idle_exit,
        max_messages=max_messages,
    )
    with stop_on_signals(consumer):
        consumer.run()


def main() -> None:
    try:
        cli(prog_name="brokerq")
    except SystemExit as exc:
        if exc.code == EXIT_INTERRUPTED:
            _die_of_sigint()
        raise


def _die_of_sigint() -> None:
    """End as a process killed by SIGINT: a shell that ran this command
    then stops too (bash goes on with a loop whose command exited 130 by
    itself, taking Ctrl-C as handled), and shows status 130."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)
