"""The commands on a queue's messages: put, get, peek, join, purge, kick, delete."""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import TYPE_CHECKING, Any, BinaryIO

import click

from ..client import calls
from ..client.blocking import Message
from ..errors import BrokerqError, BrokerUnavailable, Empty, JoinTimeout, LeaseLost
from .group import State, bodies, cli, count, null_option, pass_state, seconds

if TYPE_CHECKING:
    from ..nats import NatsMessage

#: The lease of a message ``get`` takes: it is acked once written to
#: stdout, which may wait for a slow reader of a full pipe. A get that
#: dies gives it back at once anyway (its connection closes), so the lease
#: only has to outlast the write.
GET_LEASE = 24 * 3600.0


@cli.command()
@click.argument("queue")
@click.argument("messages", nargs=-1)
@click.option("--priority", type=int, default=0, show_default=True, help="Higher first.")
@seconds("--delay", default=0.0, help="Invisible until this many seconds have passed.")
@seconds("--ttl", above=True, help="Dropped if still waiting after this many seconds.")
@seconds(
    "--timeout", help="On a full queue, wait this long for room, then exit 3 (default: for ever)."
)
@null_option(output=False)
@pass_state
def put(state: State, /, queue: str, messages: tuple[str, ...], null: bool, **kw: Any) -> None:
    """Put each MESSAGE on QUEUE; with none, one message per stdin line.

    A MESSAGE `-` is all of stdin, as one message, byte for byte (so
    `brokerq put QUEUE - < file` puts a file; a body `-` itself: `printf %s
    - | brokerq put QUEUE -`). Prints each message id on its own line. Exits
    3 if a full queue had no room within --timeout.
    """
    q = state.queue(queue)
    for body in bodies(messages, null):
        click.echo(q.put(body, **kw))


@cli.command()
@click.argument("queues", metavar="QUEUE [QUEUE...]", nargs=-1, required=True)
@count(
    "-n", "count", default=1, show_default=True, help="How many messages to get, one after another."
)
@seconds("--timeout", help="One deadline for all of them (default: wait for ever).")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help='Print each message as a JSON object on a line of its own: "id", "queue", '
    '"attempt", and "body" (a UTF-8 body, as text) or "body_base64" (any other).',
)
@null_option(output=True)
@pass_state
def get(
    state: State,
    /,
    *,
    queues: tuple[str, ...],
    count: int,
    timeout: float | None,
    as_json: bool,
    null: bool,
) -> None:
    """Get messages from QUEUE and print each body on its own line.

    With several queues, each message comes from the first of them that has
    one, waiting on all at once when none has (--json says which). Exits 3
    if --timeout passes before the first message; 0 if at least one message
    came. Each message is taken off its queue once it was written to stdout:
    one that could not be (Ctrl-C, a closed pipe) stays on its queue.
    """
    if as_json and null:
        raise click.UsageError("--json and -0/--null are mutually exclusive.")
    end = b"\0" if null else b"\n"
    reserve = _reserver(state, queues)
    out = sys.stdout.buffer
    deadline = None if timeout is None else time.monotonic() + timeout
    with _Interrupts() as interrupts:
        for got in range(count):
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                message = reserve(remaining)
            except Empty:
                if got:
                    return
                names = ", ".join(map(repr, queues))
                raise Empty(f"no message on {names} within {timeout:g} s") from None
            with interrupts.held():
                _write_all(out, _json_line(message) if as_json else message.body + end)
                # Taken off its queue as a get does (its task left for a task_done).
                try:
                    message.ack_as_get()
                except (LeaseLost, BrokerUnavailable) as exc:
                    raise BrokerqError(
                        f"message {message.id} was printed, but may be delivered again: {exc}"
                    ) from exc


def _reserver(
    state: State, queues: tuple[str, ...]
) -> Callable[[float | None], Message | NatsMessage]:
    """How ``get`` takes its next message, within a timeout: a reserve of its
    one queue, as ever (so it runs against any broker), or of several at once."""
    if len(queues) == 1:
        q = state.queue(queues[0])
        return lambda timeout: q.reserve(timeout=timeout, lease=GET_LEASE)
    calls.queue_list(queues)  # (a name twice, or too many: refused before connecting)
    client = state.local_client("get from several queues")
    return lambda timeout: client.reserve_any(queues, timeout=timeout, lease=GET_LEASE)


def _json_line(message: Message | NatsMessage) -> bytes:
    """``get --json``'s line: the body as text if it is UTF-8, else in base64
    under another key (so that it is not taken for text)."""
    import base64
    import json

    record: dict[str, Any] = {"id": message.id, "queue": message.queue.name}
    record["attempt"] = message.attempt
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


class _Interrupts:
    """Ctrl-C while a message is being written and acked waits until it is,
    so that it is neither lost nor printed twice; a second one interrupts
    at once (a reader that does not read holds the write up for ever), and
    the message goes back to its queue. SIGINT that was ignored (a
    background job) stays ignored."""

    def __init__(self) -> None:
        self.holding = self.pending = False
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
@seconds("--timeout", help="Exit 3 if the work is not done by then (default: wait for ever).")
@pass_state
def join(state: State, queue: str, timeout: float | None) -> None:
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
@null_option(output=True)
@pass_state
def peek(state: State, queue: str, null: bool) -> None:
    """Print the body at the head of QUEUE without removing it (exit 3 if empty)."""
    sys.stdout.buffer.write(state.queue(queue).peek() + (b"\0" if null else b"\n"))


@cli.command()
@click.argument("queue")
@pass_state
def purge(state: State, queue: str) -> None:
    """Remove every ready message from QUEUE; print how many."""
    click.echo(state.queue(queue).purge())


@cli.command()
@click.argument("queue")
@count("-n", "count", default=1, show_default=True, help="The most messages to move.")
@pass_state
def kick(state: State, queue: str, count: int) -> None:
    """Return up to N buried messages of QUEUE to ready; print how many.

    On QUEUE:dead (dead letters) it moves them back to QUEUE instead, with
    their delivery count reset.
    """
    click.echo(state.queue(queue).kick(count))


@cli.command()
@click.argument("queue")
@pass_state
def delete(state: State, queue: str) -> None:
    """Delete QUEUE with every message it holds (in every state) and its
    settings; print how many messages went."""
    click.echo(state.queue(queue).delete())
