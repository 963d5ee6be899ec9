"""Stats in the Prometheus text format (0.0.4), in a fixed order so that output
compares exactly. The broker's own sums over its queues are left out: an
unlabelled sample beside the labelled ones would be counted twice.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

__all__ = ["format_prometheus"]

PREFIX = "brokerq_"


class _Family(NamedTuple):
    name: str  # without PREFIX
    type: str  # counter or gauge
    help: str
    broker_key: str | None  # the key in the broker's stats, if any
    queue_key: str | None  # the key in a queue's stats, if any


# In the order of the output: name, type, broker key, queue key ("-": none),
# help (continued on indented lines).
_TABLE = """
uptime_seconds gauge uptime_s - Seconds since the broker began serving.
connections gauge connections - Open connections to the broker.
queues gauge queues - Number of queues the broker holds.
journal_bytes gauge journal_bytes - Size of the journal file in bytes (0 without a journal).
fsync_skipped_on_tmpfs gauge fsync_skipped_on_tmpfs - 1 if fsync is skipped: the journal is on a
    tmpfs or ramfs.
max_message_size_bytes gauge max_message_size - Largest message body the broker accepts, in bytes.
idle_exit_seconds gauge idle_exit_s - Idle-exit delay in seconds (absent when idle exit is
    disabled).
default_max_deliveries gauge max_deliveries - The broker's default delivery limit.
default_lease_seconds gauge lease_s - The broker's default lease in seconds.
protocol_version gauge protocol - Protocol version the broker speaks.
pid gauge pid - Process id of the broker.
ready gauge - ready Messages ready to be delivered.
delayed gauge - delayed Messages delayed (put or released with a delay), not yet due.
reserved gauge - reserved Messages under a lease.
buried gauge - buried Messages buried, waiting for a kick.
waiters gauge - waiters Requests (gets and reserves of every kind) waiting on a queue.
putters gauge - putters Puts waiting for room in a full (bounded) queue.
unfinished_tasks gauge - unfinished_tasks Messages put whose task is not done (task_done, ack, or
    gone).
bytes gauge - bytes Body bytes of the messages held, in every state.
put_total counter - put_total Messages put.
delivered_total counter - delivered_total Deliveries by get, get_many and reserve, redeliveries
    included.
expired_total counter - expired_total Messages dropped because their ttl ran out.
dead_lettered_total counter - dead_lettered_total Messages moved from a queue to <queue>:dead.
oldest_ready_age_seconds gauge - oldest_ready_age_s Age in seconds of the oldest ready message;
    absent if none.
max_deliveries gauge - max_deliveries The delivery limit in force for a queue.
lease_seconds gauge - lease The default lease in force for a queue.
maxsize gauge - maxsize The most messages a queue may hold (0: unlimited).
max_bytes gauge - max_bytes The most body bytes a queue may hold (0: the broker's
    --max-queue-bytes).
"""


def _families(table: str) -> tuple[_Family, ...]:
    families = []
    for entry in re.split(r"\n(?=\S)", table.strip()):
        name, kind, broker_key, queue_key, help_ = entry.split(maxsplit=4)
        broker, queue = (None if key == "-" else key for key in (broker_key, queue_key))
        families.append(_Family(name, kind, " ".join(help_.split()), broker, queue))
    return tuple(families)


_FAMILIES = _families(_TABLE)


_INFO_HELP = "Broker version and journal fsync mode (empty without a journal); always 1."


def format_prometheus(
    broker_stats: Mapping[str, Any] | None, queue_stats: Iterable[Mapping[str, Any]]
) -> str:
    """``broker_stats`` is ``client.stats()``, or None for no broker-level samples;
    ``queue_stats`` holds one ``queue.stats()`` per queue, in any order."""
    queues = sorted(queue_stats, key=lambda s: str(s["name"]))
    lines: list[str] = []
    if broker_stats is not None:
        info = {"version": broker_stats.get("version"), "fsync": broker_stats.get("fsync")}
        labels = {k: "" if v is None else str(v) for k, v in info.items()}
        _family(lines, "info", "gauge", _INFO_HELP, [(_labels(labels), 1)])
    for fam in _FAMILIES:
        samples: list[tuple[str, object]] = []
        if broker_stats is not None and fam.broker_key is not None:
            samples.append(("", broker_stats.get(fam.broker_key)))
        if fam.queue_key is not None:
            samples += [(_labels({"queue": str(s["name"])}), s.get(fam.queue_key)) for s in queues]
        _family(lines, fam.name, fam.type, fam.help, samples)
    return "".join(line + "\n" for line in lines)


def _family(
    lines: list[str], name: str, type_: str, help_: str, samples: list[tuple[str, object]]
) -> None:
    """The family's lines, with the samples whose value is a number (none: no lines)."""
    texts = [(labels, text) for labels, value in samples if (text := _value(value)) is not None]
    if not texts:
        return
    full = PREFIX + name
    help_ = help_.replace("\\", "\\\\").replace("\n", "\\n")
    lines += [f"# HELP {full} {help_}", f"# TYPE {full} {type_}"]
    lines.extend(f"{full}{labels} {text}" for labels, text in texts)


def _value(value: object) -> str | None:
    """A sample value as text; None for what is not a number (null, strings)."""
    if isinstance(value, int):
        return str(int(value))  # (a bool as 0 or 1)
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "+Inf" if value > 0 else "-Inf"
        return repr(value)
    return None


def _labels(labels: Mapping[str, str]) -> str:
    escape = {ord("\\"): "\\\\", ord('"'): '\\"', ord("\n"): "\\n"}
    return "{" + ",".join(f'{k}="{v.translate(escape)}"' for k, v in labels.items()) + "}"
