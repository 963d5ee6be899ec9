"""The commands of topics: publish, subscribe, unsubscribe (``topics`` lists them: admin.py)."""

from __future__ import annotations

import itertools
import signal
import sys
from typing import Any

import click

from ..errors import BrokerqError, Empty
from .group import State, bodies, cli, count, null_option, pass_state, seconds


@cli.command()
@click.argument("topic")
@click.argument("messages", nargs=-1)
@click.option("--priority", type=int, default=0, show_default=True, help="Higher first.")
@seconds("--ttl", above=True, help="Each copy is dropped if still waiting after this many seconds.")
@null_option(output=False)
@pass_state
def publish(state: State, /, topic: str, messages: tuple[str, ...], null: bool, **kw: Any) -> None:
    """Publish each MESSAGE to TOPIC; with none, one message per stdin line
    (a MESSAGE `-`: all of stdin, as one message, as for put).

    Every subscriber gets a copy: each queue subscribed with `brokerq
    subscribe TOPIC --queue Q`, and each live `brokerq subscribe TOPIC`.
    Prints, per message, how many subscribers it reached (0: nobody
    subscribes; the message went nowhere).
    """
    for body in bodies(messages, null):
        click.echo(state.client.publish(topic, body, **kw))


@cli.command()
@click.argument("topic")
@click.option(
    "--queue",
    metavar="QUEUE",
    help="Subscribe QUEUE for good (kept across restarts) and exit, instead of "
    "printing the publishes as they come.",
)
@count("-n", "count", help="Exit after this many messages (default: run until interrupted).")
@seconds("--timeout", help="Exit 3 if no message comes for this long (default: wait for ever).")
@null_option(output=True)
@pass_state
def subscribe(
    state: State,
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
    out = sys.stdout.buffer

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # Ctrl-C or SIGTERM ends the subscription quietly: the way to stop a subscriber.
    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        with state.client.subscribe(topic) as subscription:
            for _ in itertools.count() if count is None else range(count):
                try:
                    body = subscription.get(timeout=timeout)
                except Empty:
                    raise Empty(f"nothing was published to {topic!r} for {timeout:g} s") from None
                out.write(body + end)
                out.flush()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)


@cli.command()
@click.argument("topic")
@click.option("--queue", metavar="QUEUE", required=True, help="The subscribed queue.")
@pass_state
def unsubscribe(state: State, topic: str, queue: str) -> None:
    """End QUEUE's subscription to TOPIC (its messages stay in it).

    Exits 1 if QUEUE did not subscribe to TOPIC.
    """
    if not state.queue(queue).unsubscribe(topic):
        raise BrokerqError(f"queue {queue!r} does not subscribe to {topic!r}")
