"""The commands about the broker: queues, topics, stats, ping, stop."""

from __future__ import annotations

from typing import Any

import click

from ..client.blocking import Client
from .group import State, cli, pass_state

#: ``bytes`` counts the bodies in every state, the ready, delayed, reserved and buried.
QUEUE_COLUMNS: tuple[str, ...] = ("name", "ready", "delayed", "reserved", "buried", "waiters")
QUEUE_COLUMNS += ("bytes", "put_total", "delivered_total")
TOPIC_COLUMNS = ("topic", "queues", "live", "published_total", "dropped_total")


@cli.command()
@pass_state
def queues(state: State) -> None:
    """List the broker's queues, one name per line."""
    for name in state.client.queues():
        click.echo(name)


@cli.command()
@pass_state
def topics(state: State) -> None:
    """List the topics that have subscribers, with their subscribers and counts.

    With none, the table's header alone. On NATS, the topics queues subscribe
    to: the server neither lists live subscriptions nor counts publishes (`-`)."""
    client = state.client
    if isinstance(client, Client):
        found = client.stats().get("topics", {})
    else:
        found = {topic: {"queues": queues} for topic, queues in client.topics().items()}
    click.echo(_table(_topic_rows(found), TOPIC_COLUMNS))


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
def stats(state: State, queue: str | None, as_json: bool, as_prom: bool) -> None:
    """Print the stats of QUEUE, or of the broker with tables of its queues and topics."""
    if as_json and as_prom:
        raise click.UsageError("--json and --prom are mutually exclusive.")
    rows: list[dict[str, Any]] | None = None  # the queues' stats, with the broker's
    if queue is not None:
        data = state.queue(queue).stats()
    else:
        data = state.client.stats()
        rows = [state.queue(n).stats() for n in state.client.queues()]
    if as_prom:
        from ..broker.prometheus import format_prometheus

        prom = format_prometheus(None, [data]) if rows is None else format_prometheus(data, rows)
        click.echo(prom, nl=False)
    elif as_json:
        import json

        whole = data if rows is None else {**data, "queue_stats": rows}
        click.echo(json.dumps(whole, indent=2, sort_keys=True))
    else:
        topic_rows = _topic_rows(data.pop("topics", {}))
        width = max(len(k) for k in data)
        for key, value in data.items():
            click.echo(f"{key:<{width}}  {_fmt(value)}")
        for table, columns in ((rows, QUEUE_COLUMNS), (topic_rows, TOPIC_COLUMNS)):
            if table:
                click.echo()
                click.echo(_table(table, columns))


def _topic_rows(topics: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"topic": name, **info, "queues": ",".join(info["queues"]) or "-"}
        for name, info in topics.items()
    ]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "-" if value is None else str(value)


def _table(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    cells = [list(columns)] + [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = []
    for row in cells:
        rest = (cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True))
        lines.append("  ".join([row[0].ljust(widths[0]), *rest]))
    return "\n".join(lines)


@cli.command()
@pass_state
def ping(state: State) -> None:
    """Check that a broker answers (starting one if none runs)."""
    client = state.client
    rtt = client.ping()
    if isinstance(client, Client):
        conn = client.connection()
        click.echo(f"pong from {conn.server} (pid {conn.broker_pid}) in {rtt * 1000:.2f} ms")
    else:
        from ..nats.naming import redacted

        click.echo(f"pong from {redacted(client.url)} in {rtt * 1000:.2f} ms")


@cli.command()
@pass_state
def stop(state: State) -> None:
    """Ask the broker to exit, and wait until it has. Never starts one.

    If none is running, says so on stderr and exits 0. The messages stay in
    its journal; waiting consumers start the next broker.
    """
    client = state.local_client("stop")
    if not client.stop():
        click.echo(f"brokerq: no broker is running at {client.socket_path}", err=True)
