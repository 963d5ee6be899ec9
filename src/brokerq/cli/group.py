"""The ``brokerq`` group and what its commands share. Library errors become
exit codes here, at the edge, and nowhere else."""

from __future__ import annotations

import dataclasses
import functools
import io
import signal
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, cast

import click
from click.decorators import FC

from ..client.blocking import Client, Queue
from ..errors import BrokerqError, Empty, Full, InvalidRequest, JoinTimeout, NotSupported
from ..version import __version__

if TYPE_CHECKING:
    from ..nats import NatsClient, NatsQueue

EXIT_ERROR = 1
EXIT_USAGE = 2  # click's own, for options it refuses itself
EXIT_EMPTY = 3
#: Ctrl-C. Within click's runner (tests) the status; as the command
#: (:func:`brokerq.cli.main`), the process then ends by SIGINT itself, which
#: a shell shows as this same 130.
EXIT_INTERRUPTED = 128 + signal.SIGINT


class _Group(click.Group):
    """Turns brokerq's errors into one line on stderr and an exit status; makes
    ``serve`` only when it is asked for (importing the broker is slow)."""

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
        except BrokerqError as exc:
            click.echo(f"brokerq: {exc}", err=True)
            if isinstance(exc, Empty | Full | JoinTimeout):
                ctx.exit(EXIT_EMPTY)
            # An argument the user got wrong, whoever found it (click, the
            # client, the broker): one rule, a usage error.
            ctx.exit(EXIT_USAGE if isinstance(exc, InvalidRequest) else EXIT_ERROR)
        except KeyboardInterrupt:
            # Quietly: no traceback, no click "Aborted!" (main ends the
            # process by SIGINT, so that a shell loop running it stops too).
            ctx.exit(EXIT_INTERRUPTED)


@dataclasses.dataclass
class State:
    """What every command shares: the socket path or NATS URL, and a lazily made client."""

    socket: str | None
    connect_timeout: float
    url: str | None = None
    #: --socket was given on the command line: it wins over --url / BROKERQ_URL.
    socket_given: bool = False

    @property
    def nats_url(self) -> str | None:
        """The NATS URL the command runs against, or None for the local broker."""
        return None if self.socket_given else self.url

    @functools.cached_property
    def client(self) -> Client | NatsClient:
        if self.nats_url is not None:
            from ..nats import NatsClient

            return NatsClient(
                self.nats_url, max(self.connect_timeout, 1.0), put_window=0, prefetch=0
            )
        # (No put window or prefetch on either backend, whatever the variables
        # say: `put` prints each message's id, which a windowed put does not
        # know, and `get -n 1` would take 64 to hand out one.)
        return Client(self.socket, self.connect_timeout, put_window=0, prefetch=0)

    def local_client(self, feature: str) -> Client:
        """The local broker's client, for a command NATS cannot run: there,
        one line naming the feature and the backend (exit status 1)."""
        client = self.client
        if not isinstance(client, Client):
            raise NotSupported(f"{feature} is not supported by the NATS backend")
        return client

    def queue(self, name: str) -> Queue | NatsQueue:
        return self.client.queue(name)

    def close(self) -> None:
        if "client" in vars(self):
            self.client.close()


pass_state = click.make_pass_decorator(State)


def seconds(*decls: str, above: bool = False, **attrs: Any) -> Callable[[FC], FC]:
    """An option of SECONDS, at least 0 (``above``: more than 0)."""
    kind = click.FloatRange(min=0, min_open=above)
    return click.option(*decls, type=kind, metavar="SECONDS", **attrs)


def count(*decls: str, **attrs: Any) -> Callable[[FC], FC]:
    """An option of a whole number, at least 1."""
    return click.option(*decls, type=click.IntRange(min=1), **attrs)


def _command_options() -> list[click.Parameter]:
    """The group's --socket and --connect-timeout, taken after the command
    name too (``brokerq get jobs --socket PATH``), where they win over the
    group's (and so over BROKERQ_SOCKET)."""

    def set_state(ctx: click.Context, param: click.Parameter, value: Any) -> None:
        state = ctx.find_object(State)
        if state is not None and value is not None:
            setattr(state, str(param.name), value)  # socket, url, connect_timeout
            if param.name == "socket":
                state.socket_given = True

    option = functools.partial(click.Option, expose_value=False, callback=set_state)
    return [
        option(
            ["--socket"],
            metavar="PATH",
            help="The broker's socket, as before the command (this one wins).",
        ),
        option(
            ["--url"],
            metavar="URL",
            help="A NATS server's URL, as before the command (this one wins).",
        ),
        option(
            ["--connect-timeout"],
            type=click.FloatRange(min=0),
            metavar="SECONDS",
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
    "--url",
    envvar="BROKERQ_URL",
    metavar="URL",
    help="A NATS server to use instead of a local broker, nats://host:4222 "
    "[env: BROKERQ_URL; a --socket given here wins].",
)
@seconds(
    "--connect-timeout",
    default=10.0,
    show_default=True,
    envvar="BROKERQ_CONNECT_TIMEOUT",
    show_envvar=True,
    help="How long to wait for a broker to answer (or start); 0: use a running one only.",
)
@click.version_option(__version__, prog_name="brokerq")
@click.pass_context
def cli(ctx: click.Context, socket: str | None, url: str | None, connect_timeout: float) -> None:
    """A local message queue: name a socket, enqueue, dequeue.

    Every command but `stop` starts a broker for the socket if none runs.
    With --url (or BROKERQ_URL) the commands run on NATS JetStream instead.

    Exit status: 0 ok, 1 error, 2 usage error, 3 timed out, empty or full;
    Ctrl-C ends a command as SIGINT does (status 130).
    """
    given = ctx.get_parameter_source("socket") is click.core.ParameterSource.COMMANDLINE
    state = ctx.obj = State(socket, connect_timeout, url, socket_given=given)
    ctx.call_on_close(state.close)


def _serve_command() -> click.Command:
    """Made on demand: its options are the broker's (daemon.py)."""
    from ..broker.daemon import broker_options
    from ..broker.daemon import run as run_broker

    @click.command()
    @broker_options
    @pass_state
    def serve(state: State, /, **options: Any) -> None:
        """Run a broker for --socket in the foreground (as local-queue-broker)."""
        if state.nats_url is not None:
            raise NotSupported("serve is not supported by the NATS backend (run nats-server)")
        sys.exit(run_broker(state.socket, **options))

    return serve


def null_option(output: bool) -> Callable[[FC], FC]:
    """``-0``: bodies end with a NUL byte, in what is printed or (input) read from stdin."""
    if output:
        help = "End each body with a NUL byte instead of a newline (for xargs -0)."
    else:
        help = (
            "With no MESSAGE: stdin holds messages each ended by a NUL byte "
            "(as get -0 prints them), not lines."
        )
    return click.option("-0", "--null", "null", is_flag=True, help=help)


def bodies(messages: tuple[str, ...], null: bool) -> Iterator[bytes]:
    """What ``put`` and ``publish`` send: each MESSAGE, ``-`` standing for
    all of stdin (one message, bytes as they are); with none, stdin's lines
    (or with ``null``, its NUL-ended records)."""
    if messages and null:
        raise click.UsageError("-0/--null splits stdin: it takes no MESSAGE.")
    if messages.count("-") > 1:
        raise click.UsageError("'-' (all of stdin, as one message) may be given once.")
    if not messages:
        if null:
            return _stdin_records()
        return (line.removesuffix(b"\n") for line in sys.stdin.buffer)
    return (
        sys.stdin.buffer.read() if m == "-" else m.encode("utf-8", "surrogateescape")
        for m in messages
    )


def _stdin_records() -> Iterator[bytes]:
    """Stdin's records, each ended by a NUL (the last may lack it), as they come."""
    stdin = cast("io.BufferedReader", sys.stdin.buffer)  # (or click's BytesIO)
    pending = bytearray()  # the start of a record whose NUL has not come yet
    while chunk := stdin.read1(1 << 16):
        first, *rest = chunk.split(b"\0")
        pending += first
        if rest:
            yield bytes(pending)
            yield from rest[:-1]
            pending = bytearray(rest[-1])
    if pending:
        yield bytes(pending)
