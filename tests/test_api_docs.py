"""docs/usage.md says what the code does: the errors it can raise, the stats
it reports and what ``brokerq stats --prom`` exports of them.

(tests/test_docs.py runs the examples; this checks the reference text.)
"""

from __future__ import annotations

import re
from pathlib import Path

import brokerq
from brokerq import errors
from brokerq.broker import prometheus
from brokerq.client import blocking as client
from brokerq.client import calls
from brokerq.testing import private_broker

USAGE = (Path(__file__).resolve().parent.parent / "docs" / "usage.md").read_text()


def section(start: str, end: str) -> str:
    """The text of usage.md from the line ``start`` up to the next line ``end``."""
    begin = USAGE.index(start)
    return USAGE[begin : USAGE.index(end, begin + len(start))]


def error_classes() -> dict[str, type[BaseException]]:
    return {
        name: value
        for name, value in vars(errors).items()
        if isinstance(value, type) and issubclass(value, BaseException)
        if value.__module__ == errors.__name__
    }


def test_every_error_class_is_exported_from_brokerq() -> None:
    assert set(error_classes()) >= {"ConnectionLost", "QueueFull"}
    for name, cls in error_classes().items():
        assert name in brokerq.__all__, name
        assert getattr(brokerq, name) is cls
    # The clients raise the very class that brokerq exports.
    assert calls.ConnectionLost is client.ConnectionLost is brokerq.ConnectionLost
    assert issubclass(brokerq.ConnectionLost, brokerq.BrokerUnavailable)
    assert issubclass(brokerq.QueueFull, brokerq.Full)


def test_every_exported_error_is_in_the_errors_section() -> None:
    text = section("### Errors\n", "\n### ")
    exported = [
        name
        for name in brokerq.__all__
        if isinstance(cls := getattr(brokerq, name), type) and issubclass(cls, BaseException)
    ]
    assert len(exported) == len(error_classes())
    missing = [name for name in exported if not re.search(rf"`(brokerq\.)?{name}`", text)]
    assert not missing, f"not in docs/usage.md, Errors: {missing}"


def test_the_stats_section_names_every_stat() -> None:
    text = section("\n## Stats\n", "\n## ")
    with private_broker() as c:
        c.queue("jobs").put(b"x")
        broker, queue = c.stats(), c.queue("jobs").stats()
    table = [line.split("|")[1] for line in text.splitlines() if line.startswith("| `")]
    in_table = {key for cell in table for key in re.findall(r"`(\w+)`", cell)}
    assert set(queue) <= in_table, f"queue stats not in the table: {set(queue) - in_table}"
    named = set(re.findall(r"`(\w+)`", text))
    assert set(broker) <= named, f"broker stats not in the text: {set(broker) - named}"


def test_stats_prom_exports_what_the_doc_lists_and_leaves_out_what_it_says() -> None:
    text = section("`stats --prom` prints", "\nExit status:")
    listed = set(re.findall(r"`(brokerq_\w+)", text))
    families = {prometheus.PREFIX + f.name for f in prometheus._FAMILIES}
    assert listed == families | {"brokerq_info"}
    left_out = set(re.findall(r"`(\w+)`", text[text.index("It leaves out") :]))
    by_broker = {f.broker_key for f in prometheus._FAMILIES} | {"version", "fsync"}  # info
    by_queue = {f.queue_key for f in prometheus._FAMILIES} | {"name"}  # the label
    with private_broker() as c:
        c.queue("jobs").put(b"x")
        broker, queue = c.stats(), c.queue("jobs").stats()
    for key in broker:
        assert (key in by_broker) != (key in left_out), f"the broker's {key}"
    for key in set(queue) - by_queue:
        assert key in left_out, f"a queue's {key}"
    # The queue's settings in force are exported, per queue.
    assert {"maxsize", "max_bytes", "max_deliveries", "lease"} <= by_queue
