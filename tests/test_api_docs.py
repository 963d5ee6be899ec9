"""docs/usage.md says what the code does: the errors it can raise.

(tests/test_docs.py runs the examples; this checks the reference text.)
"""

from __future__ import annotations

import re
from pathlib import Path

import brokerq
from brokerq import calls, client, errors

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
