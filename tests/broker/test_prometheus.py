"""``brokerq stats --prom``: the Prometheus text format (0.0.4).

The formatting is a pure function, tested here on dicts shaped like the
broker's stats (docs/protocol.md, section 5.8) with exact outputs; one
CliRunner test checks the command against a real broker.
"""

from __future__ import annotations

import re

from click.testing import CliRunner

import brokerq
from brokerq.broker.prometheus import format_prometheus
from brokerq.cli import cli


def broker_stats(**changes: object) -> dict[str, object]:
    stats: dict[str, object] = {
        "pid": 4242,
        "version": "0.1.0",
        "protocol": 1,
        "uptime_s": 12.5,
        "connections": 2,
        "max_message_size": 16777216,
        "idle_exit_s": 300.0,
        "max_deliveries": 20,
        "lease_s": 30.0,
        "journal": "/run/user/1000/brokerq/broker.sock.journal",
        "journal_bytes": 4096,
        "fsync": "batch",
        "fsync_skipped_on_tmpfs": True,
        "queues": 2,
        "ready": 3,
        "reserved": 1,
        "waiters": 0,
        "bytes": 42,
        "put_total": 7,
        "delivered_total": 4,
    }
    stats.update(changes)
    return stats


def queue_stats(name: str, **changes: object) -> dict[str, object]:
    stats: dict[str, object] = {
        "name": name,
        "ready": 0,
        "delayed": 0,
        "reserved": 0,
        "buried": 0,
        "waiters": 0,
        "putters": 0,
        "unfinished_tasks": 0,
        "bytes": 0,
        "put_total": 0,
        "delivered_total": 0,
        "expired_total": 0,
        "dead_lettered_total": 0,
        "oldest_ready_age_s": None,
        "max_deliveries": 20,
        "lease": 30.0,
        "maxsize": 0,
        "max_bytes": 0,
    }
    stats.update(changes)
    return stats


SUM = ""

BROKER_AND_QUEUES = f"""\
# HELP brokerq_info Broker version and journal fsync mode (empty without a journal); always 1.
# TYPE brokerq_info gauge
brokerq_info{{version="0.1.0",fsync="batch"}} 1
# HELP brokerq_uptime_seconds Seconds since the broker began serving.
# TYPE brokerq_uptime_seconds gauge
brokerq_uptime_seconds 12.5
# HELP brokerq_connections Open connections to the broker.
# TYPE brokerq_connections gauge
brokerq_connections 2
# HELP brokerq_queues Number of queues the broker holds.
# TYPE brokerq_queues gauge
brokerq_queues 2
# HELP brokerq_journal_bytes Size of the journal file in bytes (0 without a journal).
# TYPE brokerq_journal_bytes gauge
brokerq_journal_bytes 4096
# HELP brokerq_fsync_skipped_on_tmpfs 1 if fsync is skipped: the journal is on a tmpfs or ramfs.
# TYPE brokerq_fsync_skipped_on_tmpfs gauge
brokerq_fsync_skipped_on_tmpfs 1
# HELP brokerq_max_message_size_bytes Largest message body the broker accepts, in bytes.
# TYPE brokerq_max_message_size_bytes gauge
brokerq_max_message_size_bytes 16777216
# HELP brokerq_idle_exit_seconds Idle-exit delay in seconds (absent when idle exit is disabled).
# TYPE brokerq_idle_exit_seconds gauge
brokerq_idle_exit_seconds 300.0
# HELP brokerq_default_max_deliveries The broker's default delivery limit.
# TYPE brokerq_default_max_deliveries gauge
brokerq_default_max_deliveries 20
# HELP brokerq_default_lease_seconds The broker's default lease in seconds.
# TYPE brokerq_default_lease_seconds gauge
brokerq_default_lease_seconds 30.0
# HELP brokerq_protocol_version Protocol version the broker speaks.
# TYPE brokerq_protocol_version gauge
brokerq_protocol_version 1
# HELP brokerq_pid Process id of the broker.
# TYPE brokerq_pid gauge
brokerq_pid 4242
# HELP brokerq_ready Messages ready to be delivered{SUM}.
# TYPE brokerq_ready gauge
brokerq_ready{{queue="jobs"}} 2
brokerq_ready{{queue="mail"}} 1
# HELP brokerq_delayed Messages delayed (put or released with a delay), not yet due.
# TYPE brokerq_delayed gauge
brokerq_delayed{{queue="jobs"}} 1
brokerq_delayed{{queue="mail"}} 0
# HELP brokerq_reserved Messages under a lease{SUM}.
# TYPE brokerq_reserved gauge
brokerq_reserved{{queue="jobs"}} 1
brokerq_reserved{{queue="mail"}} 0
# HELP brokerq_buried Messages buried, waiting for a kick.
# TYPE brokerq_buried gauge
brokerq_buried{{queue="jobs"}} 0
brokerq_buried{{queue="mail"}} 2
# HELP brokerq_waiters Requests (gets and reserves of every kind) waiting on a queue{SUM}.
# TYPE brokerq_waiters gauge
brokerq_waiters{{queue="jobs"}} 0
brokerq_waiters{{queue="mail"}} 0
# HELP brokerq_putters Puts waiting for room in a full (bounded) queue.
# TYPE brokerq_putters gauge
brokerq_putters{{queue="jobs"}} 0
brokerq_putters{{queue="mail"}} 0
# HELP brokerq_unfinished_tasks Messages put whose task is not done (task_done, ack, or gone).
# TYPE brokerq_unfinished_tasks gauge
brokerq_unfinished_tasks{{queue="jobs"}} 3
brokerq_unfinished_tasks{{queue="mail"}} 0
# HELP brokerq_bytes Body bytes of the messages held, in every state{SUM}.
# TYPE brokerq_bytes gauge
brokerq_bytes{{queue="jobs"}} 30
brokerq_bytes{{queue="mail"}} 12
# HELP brokerq_put_total Messages put{SUM}.
# TYPE brokerq_put_total counter
brokerq_put_total{{queue="jobs"}} 5
brokerq_put_total{{queue="mail"}} 2
# HELP brokerq_delivered_total Deliveries by get, get_many and reserve, redeliveries included{SUM}.
# TYPE brokerq_delivered_total counter
brokerq_delivered_total{{queue="jobs"}} 3
brokerq_delivered_total{{queue="mail"}} 1
# HELP brokerq_expired_total Messages dropped because their ttl ran out.
# TYPE brokerq_expired_total counter
brokerq_expired_total{{queue="jobs"}} 0
brokerq_expired_total{{queue="mail"}} 0
# HELP brokerq_dead_lettered_total Messages moved from a queue to <queue>:dead.
# TYPE brokerq_dead_lettered_total counter
brokerq_dead_lettered_total{{queue="jobs"}} 0
brokerq_dead_lettered_total{{queue="mail"}} 1
# HELP brokerq_oldest_ready_age_seconds Age in seconds of the oldest ready message; absent if none.
# TYPE brokerq_oldest_ready_age_seconds gauge
brokerq_oldest_ready_age_seconds{{queue="jobs"}} 1.25
# HELP brokerq_max_deliveries The delivery limit in force for a queue.
# TYPE brokerq_max_deliveries gauge
brokerq_max_deliveries{{queue="jobs"}} 5
brokerq_max_deliveries{{queue="mail"}} 20
# HELP brokerq_lease_seconds The default lease in force for a queue.
# TYPE brokerq_lease_seconds gauge
brokerq_lease_seconds{{queue="jobs"}} 60.0
brokerq_lease_seconds{{queue="mail"}} 30.0
# HELP brokerq_maxsize The most messages a queue may hold (0: unlimited).
# TYPE brokerq_maxsize gauge
brokerq_maxsize{{queue="jobs"}} 1000
brokerq_maxsize{{queue="mail"}} 0
# HELP brokerq_max_bytes The most body bytes a queue may hold (0: the broker's --max-queue-bytes).
# TYPE brokerq_max_bytes gauge
brokerq_max_bytes{{queue="jobs"}} 0
brokerq_max_bytes{{queue="mail"}} 65536
"""


def test_broker_and_queues_exact_output_queues_sorted() -> None:
    queues = [
        # "mail" first: the output sorts by name. "mail" has no ready
        # message, so no age: its sample is left out, not written as NaN.
        queue_stats(
            "mail",
            ready=1,
            buried=2,
            bytes=12,
            put_total=2,
            delivered_total=1,
            dead_lettered_total=1,
            max_bytes=65536,
        ),
        queue_stats(
            "jobs",
            ready=2,
            delayed=1,
            reserved=1,
            bytes=30,
            put_total=5,
            delivered_total=3,
            unfinished_tasks=3,
            oldest_ready_age_s=1.25,
            max_deliveries=5,
            lease=60.0,
            maxsize=1000,
        ),
    ]
    assert format_prometheus(broker_stats(), queues) == BROKER_AND_QUEUES


def test_one_queue_has_no_broker_level_samples() -> None:
    out = format_prometheus(None, [queue_stats("jobs", ready=4, oldest_ready_age_s=0.5)])
    samples = [line for line in out.splitlines() if not line.startswith("#")]
    assert samples == [
        'brokerq_ready{queue="jobs"} 4',
        'brokerq_delayed{queue="jobs"} 0',
        'brokerq_reserved{queue="jobs"} 0',
        'brokerq_buried{queue="jobs"} 0',
        'brokerq_waiters{queue="jobs"} 0',
        'brokerq_putters{queue="jobs"} 0',
        'brokerq_unfinished_tasks{queue="jobs"} 0',
        'brokerq_bytes{queue="jobs"} 0',
        'brokerq_put_total{queue="jobs"} 0',
        'brokerq_delivered_total{queue="jobs"} 0',
        'brokerq_expired_total{queue="jobs"} 0',
        'brokerq_dead_lettered_total{queue="jobs"} 0',
        'brokerq_oldest_ready_age_seconds{queue="jobs"} 0.5',
        'brokerq_max_deliveries{queue="jobs"} 20',
        'brokerq_lease_seconds{queue="jobs"} 30.0',
        'brokerq_maxsize{queue="jobs"} 0',
        'brokerq_max_bytes{queue="jobs"} 0',
    ]
    assert "brokerq_info" not in out
    assert "brokerq_uptime_seconds" not in out
    # Each family still has its HELP and TYPE, once, right before its samples.
    assert out.startswith(
        f"# HELP brokerq_ready Messages ready to be delivered{SUM}.\n"
        "# TYPE brokerq_ready gauge\n"
        'brokerq_ready{queue="jobs"} 4\n'
        "# HELP brokerq_delayed "
    )


def test_label_values_are_escaped() -> None:
    name = 'a"b\\c\nd'
    out = format_prometheus(
        broker_stats(version='1.0 "dev"\\x\n'), [queue_stats(name, ready=1)]
    ).splitlines()
    assert out[2] == 'brokerq_info{version="1.0 \\"dev\\"\\\\x\\n",fsync="batch"} 1'
    assert 'brokerq_ready{queue="a\\"b\\\\c\\nd"} 1' in out
    # No raw newline got into the output: every line is a comment or a sample.
    assert all(line.startswith(("#", "brokerq_")) for line in out)


def test_null_values_leave_their_samples_out() -> None:
    # No journal: fsync is null (an empty label), journal is a null path.
    # Idle exit off: idle_exit_s is null, so that family goes entirely.
    # No queue has a ready message: the age family goes entirely.
    stats = broker_stats(
        idle_exit_s=None,
        journal=None,
        journal_bytes=0,
        fsync=None,
        fsync_skipped_on_tmpfs=False,
    )
    out = format_prometheus(stats, [queue_stats("a"), queue_stats("b")])
    lines = out.splitlines()
    assert lines[:3] == [
        "# HELP brokerq_info Broker version and journal fsync mode "
        "(empty without a journal); always 1.",
        "# TYPE brokerq_info gauge",
        'brokerq_info{version="0.1.0",fsync=""} 1',
    ]
    assert "brokerq_idle_exit_seconds" not in out
    assert "brokerq_oldest_ready_age_seconds" not in out
    assert "brokerq_journal_bytes 0" in lines
    assert "brokerq_fsync_skipped_on_tmpfs 0" in lines
    assert "None" not in out
    assert "null" not in out


def test_values_booleans_floats_strings_and_unknown_keys() -> None:
    stats = broker_stats(
        uptime_s=float("inf"),
        connections=True,
        queues="two",  # not a number: left out
        some_new_key=5,  # unknown: ignored
    )
    out = format_prometheus(stats, [queue_stats("q", oldest_ready_age_s=float("nan"))])
    lines = out.splitlines()
    assert "brokerq_uptime_seconds +Inf" in lines
    assert "brokerq_connections 1" in lines
    assert "brokerq_queues" not in out
    assert "some_new_key" not in out
    assert 'brokerq_oldest_ready_age_seconds{queue="q"} NaN' in lines
    assert "/run/user" not in out  # the journal's path is a string: left out


def test_nothing_to_show_is_empty() -> None:
    assert format_prometheus(None, []) == ""


# -- the command --------------------------------------------------------------

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
VALUE = r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?|[-+]Inf|NaN"
SAMPLE = re.compile(rf"({NAME})(\{{{LABEL}(?:,{LABEL})*\}})? ({VALUE})")
HELP = re.compile(rf"# HELP ({NAME}) .*")
TYPE = re.compile(rf"# TYPE ({NAME}) (counter|gauge)")


def parse(text: str) -> dict[str, tuple[str, list[str]]]:
    """Check text line by line; return each family's type and sample lines.

    Every family has a HELP line, then a TYPE line, then its samples, all
    together and once; every sample line is ``name{labels} value``.
    """
    assert text.endswith("\n")
    families: dict[str, tuple[str, list[str]]] = {}
    current = None
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        help_, type_ = HELP.fullmatch(lines[i]), TYPE.fullmatch(lines[i + 1])
        assert help_ is not None, lines[i]
        assert type_ is not None, lines[i + 1]
        current = help_.group(1)
        assert type_.group(1) == current
        assert current not in families, f"{current} twice"
        assert current.startswith("brokerq_")
        assert current.endswith("_total") == (type_.group(2) == "counter"), current
        families[current] = (type_.group(2), [])
        i += 2
        while i < len(lines) and not lines[i].startswith("#"):
            sample = SAMPLE.fullmatch(lines[i])
            assert sample is not None, lines[i]
            assert sample.group(1) == current, lines[i]
            families[current][1].append(lines[i])
            i += 1
        assert families[current][1], f"{current} has no sample"
    return families


def test_stats_prom_against_a_broker(socket_path: str) -> None:
    runner = CliRunner()

    def run(*args: str) -> str:
        result = runner.invoke(cli, ["--socket", socket_path, *args], catch_exceptions=False)
        assert result.exit_code == 0, (result.exit_code, result.stderr)
        assert result.stderr == ""
        return result.stdout

    run("put", "jobs", "a", "bb", "ccc")
    assert run("get", "jobs") == "a\n"
    run("put", "mail", "x")
    brokerq.connect(socket_path).queue("mail", maxsize=10, max_bytes=4096).client.close()

    families = parse(run("stats", "--prom"))
    samples = {line for _, lines in families.values() for line in lines}
    assert f'brokerq_info{{version="{brokerq.__version__}",fsync="never"}} 1' in samples
    assert "brokerq_queues 2" in samples
    assert "brokerq_connections 1" in samples
    assert 'brokerq_ready{queue="jobs"} 2' in samples
    assert 'brokerq_ready{queue="mail"} 1' in samples
    assert 'brokerq_put_total{queue="jobs"} 3' in samples
    assert 'brokerq_delivered_total{queue="jobs"} 1' in samples
    assert 'brokerq_delivered_total{queue="mail"} 0' in samples
    assert 'brokerq_bytes{queue="jobs"} 5' in samples
    assert 'brokerq_unfinished_tasks{queue="jobs"} 3' in samples  # one got, none done
    assert 'brokerq_maxsize{queue="jobs"} 0' in samples  # the settings in force
    assert 'brokerq_maxsize{queue="mail"} 10' in samples
    assert 'brokerq_max_bytes{queue="jobs"} 0' in samples
    assert 'brokerq_max_bytes{queue="mail"} 4096' in samples
    assert families["brokerq_maxsize"][0] == families["brokerq_max_bytes"][0] == "gauge"
    assert families["brokerq_put_total"][0] == "counter"
    assert families["brokerq_ready"][0] == "gauge"
    assert families["brokerq_uptime_seconds"][1][0].startswith("brokerq_uptime_seconds ")
    ages = families["brokerq_oldest_ready_age_seconds"][1]
    assert [line.split(" ")[0] for line in ages] == [
        'brokerq_oldest_ready_age_seconds{queue="jobs"}',
        'brokerq_oldest_ready_age_seconds{queue="mail"}',
    ]

    one = parse(run("stats", "mail", "--prom"))
    one_samples = [line for _, lines in one.values() for line in lines]
    assert all('{queue="mail"} ' in line for line in one_samples), one_samples
    assert 'brokerq_ready{queue="mail"} 1' in one_samples
    assert "brokerq_info" not in one


def test_json_and_prom_together_are_a_usage_error(socket_path: str) -> None:
    result = CliRunner().invoke(cli, ["--socket", socket_path, "stats", "--json", "--prom"])
    assert result.exit_code == 2
    assert result.stdout == ""
    assert "--json and --prom are mutually exclusive" in result.stderr
