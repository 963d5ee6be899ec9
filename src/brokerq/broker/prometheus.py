"""Stats in the Prometheus text exposition format (version 0.0.4), by hand.

``brokerq stats --prom`` prints what :func:`format_prometheus` returns. The
function is pure: it takes the dicts that ``client.stats()`` and
``queue.stats()`` return (docs/protocol.md, section 5.8) and writes every
metric family in a fixed order, the queues sorted by name, so that its
output can be compared exactly.

Each family has one ``# HELP`` and one ``# TYPE`` line. Queue metrics carry
a ``queue`` label and nothing else: the broker's own sums over its queues
are left out, since ``sum(brokerq_ready)`` gives them and an unlabelled
sample beside the labelled ones would be counted twice. Values that are not numbers
are left out, but for ``version`` and ``fsync``, which become the labels of
``brokerq_info``; a null value leaves its sample out; a boolean is 0 or 1;
keys not known here are ignored.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["format_prometheus"]

PREFIX = "brokerq_"


@dataclass(frozen=True)
class _Family:
    name: str  # without PREFIX
    type: Literal["counter", "gauge"]
    help: str
    broker_key: str | None  # the key in the broker's stats, if any
    queue_key: str | None  # the key in a queue's stats, if any


# The order of the output.
_FAMILIES = (
    _Family("uptime_seconds", "gauge", "Seconds since the broker began serving.", "uptime_s", None),
    _Family("connections", "gauge", "Open connections to the broker.", "connections", None),
    _Family("queues", "gauge", "Number of queues the broker holds.", "queues", None),
    _Family(
        "journal_bytes",
        "gauge",
        "Size of the journal file in bytes (0 without a journal).",
        "journal_bytes",
        None,
    ),
    _Family(
        "fsync_skipped_on_tmpfs",
        "gauge",
        "1 if fsync is skipped: the journal is on a tmpfs or ramfs.",
        "fsync_skipped_on_tmpfs",
        None,
    ),
    _Family(
        "max_message_size_bytes",
        "gauge",
        "Largest message body the broker accepts, in bytes.",
        "max_message_size",
        None,
    ),
    _Family(
        "idle_exit_seconds",
        "gauge",
        "Idle-exit delay in seconds (absent when idle exit is disabled).",
        "idle_exit_s",
        None,
    ),
    _Family(
        "default_max_deliveries",
        "gauge",
        "The broker's default delivery limit.",
        "max_deliveries",
        None,
    ),
    _Family(
        "default_lease_seconds", "gauge", "The broker's default lease in seconds.", "lease_s", None
    ),
    _Family("protocol_version", "gauge", "Protocol version the broker speaks.", "protocol", None),
    _Family("pid", "gauge", "Process id of the broker.", "pid", None),
    _Family("ready", "gauge", "Messages ready to be delivered.", None, "ready"),
    _Family(
        "delayed",
        "gauge",
        "Messages delayed (put or released with a delay), not yet due.",
        None,
        "delayed",
    ),
    _Family("reserved", "gauge", "Messages under a lease.", None, "reserved"),
    _Family("buried", "gauge", "Messages buried, waiting for a kick.", None, "buried"),
    _Family(
        "waiters",
        "gauge",
        "Requests (get, get_many, reserve) waiting on a queue.",
        None,
        "waiters",
    ),
    _Family(
        "putters",
        "gauge",
        "Puts waiting for room in a full (bounded) queue.",
        None,
        "putters",
    ),
    _Family(
        "unfinished_tasks",
        "gauge",
        "Messages put whose task is not done (task_done, ack, or gone).",
        None,
        "unfinished_tasks",
    ),
    _Family(
        "bytes",
        "gauge",
        "Body bytes of the messages held, in every state.",
        None,
        "bytes",
    ),
    _Family(
        "put_total",
        "counter",
        "Messages put.",
        None,
        "put_total",
    ),
    _Family(
        "delivered_total",
        "counter",
        "Deliveries by get, get_many and reserve, redeliveries included.",
        None,
        "delivered_total",
    ),
    _Family(
        "expired_total",
        "counter",
        "Messages dropped because their ttl ran out.",
        None,
        "expired_total",
    ),
    _Family(
        "dead_lettered_total",
        "counter",
        "Messages moved from a queue to <queue>:dead.",
        None,
        "dead_lettered_total",
    ),
    _Family(
        "oldest_ready_age_seconds",
        "gauge",
        "Age in seconds of the oldest ready message; absent if none.",
        None,
        "oldest_ready_age_s",
    ),
    _Family(
        "max_deliveries",
        "gauge",
        "The delivery limit in force for a queue.",
        None,
        "max_deliveries",
    ),
    _Family("lease_seconds", "gauge", "The default lease in force for a queue.", None, "lease"),
    _Family(
        "maxsize",
        "gauge",
        "The most messages a queue may hold (0: unlimited).",
        None,
        "maxsize",
    ),
    _Family(
        "max_bytes",
        "gauge",
        "The most body bytes a queue may hold (0: the broker's --max-queue-bytes).",
        None,
        "max_bytes",
    ),
)


def format_prometheus(
    broker_stats: Mapping[str, Any] | None, queue_stats: Iterable[Mapping[str, Any]]
) -> str:
    """The stats as Prometheus text (version 0.0.4), ending in a newline.

    ``broker_stats`` is ``client.stats()``, or None for no broker-level
    samples (``brokerq stats QUEUE``); ``queue_stats`` holds one
    ``queue.stats()`` per queue, in any order. A family without a sample is
    left out whole; no samples at all give an empty string.
    """
    queues = sorted(queue_stats, key=lambda s: str(s["name"]))
    lines: list[str] = []
    if broker_stats is not None:
        info = {"version": broker_stats.get("version"), "fsync": broker_stats.get("fsync")}
        labels = {k: "" if v is None else str(v) for k, v in info.items()}
        _family(
            lines,
            "info",
            "gauge",
            "Broker version and journal fsync mode (empty without a journal); always 1.",
            [(_labels(labels), "1")],
        )
    for fam in _FAMILIES:
        samples: list[tuple[str, str]] = []
        if broker_stats is not None and fam.broker_key is not None:
            value = _value(broker_stats.get(fam.broker_key))
            if value is not None:
                samples.append(("", value))
        if fam.queue_key is not None:
            for stats in queues:
                value = _value(stats.get(fam.queue_key))
                if value is not None:
                    samples.append((_labels({"queue": str(stats["name"])}), value))
        _family(lines, fam.name, fam.type, fam.help, samples)
    return "".join(line + "\n" for line in lines)


def _family(
    lines: list[str], name: str, type_: str, help_: str, samples: list[tuple[str, str]]
) -> None:
    if not samples:
        return
    full = PREFIX + name
    lines.append(f"# HELP {full} {_escape_help(help_)}")
    lines.append(f"# TYPE {full} {type_}")
    lines.extend(f"{full}{labels} {value}" for labels, value in samples)


def _value(value: object) -> str | None:
    """A sample value as text; None for what is not a number (null, strings)."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "+Inf" if value > 0 else "-Inf"
        return repr(value)
    return None


def _labels(labels: Mapping[str, str]) -> str:
    inner = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
    return "{" + inner + "}"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")
