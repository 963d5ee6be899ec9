"""kombu's exchanges onto brokerq topics: the topic names, and topic-key matching.

A binding (queue, exchange, routing key) is a durable brokerq subscription
of the queue to a topic named after the exchange (and the key), so the
bindings live in the broker's journal: producers and consumers in other
processes, started later, agree on them, and they survive restarts.

* direct: topic ``kombu.direct.<n>.<exchange>.<routing key>``, ``n`` the
  length of the (escaped) exchange name, so that no two (exchange, key)
  pairs share a topic whatever dots they hold; a publish is one brokerq
  publish to that topic.
* fanout: topic ``kombu.fanout.<exchange>``; every bound queue gets a copy.
* topic: topic ``kombu.topic.<n>.<exchange>.<pattern>``; a publish reads
  the bindings the broker holds (its stats' topics), matches the routing
  key against each pattern, and puts ONE copy into each matching queue
  (a queue bound by two matching patterns still gets one).

Topic names are printable UTF-8 without ``:`` (the broker's), so ``%``,
``:`` and non-printable characters are %-escaped: the escape is
reversible, and the names stay readable in ``brokerq stats``.
"""

from __future__ import annotations

import urllib.parse
from functools import lru_cache
from typing import Final

PREFIX: Final = "kombu."


def escape(name: str) -> str:
    """``name`` with ``%``, ``:`` and non-printable characters %-escaped."""
    out: list[str] = []
    for char in name:
        if char in "%:" or not char.isprintable():
            out.extend(f"%{byte:02X}" for byte in char.encode("utf-8", "surrogatepass"))
        else:
            out.append(char)
    return "".join(out)


def _keyed(kind: str, exchange: str, key: str) -> str:
    ex = escape(exchange)
    return f"{PREFIX}{kind}.{len(ex)}.{ex}.{escape(key)}"


def direct_topic(exchange: str, routing_key: str) -> str:
    """The topic a direct exchange's binding (and publish) with ``routing_key`` uses."""
    return _keyed("direct", exchange, routing_key)


def fanout_topic(exchange: str) -> str:
    """The topic of a fanout exchange: one for all its bindings."""
    return f"{PREFIX}fanout.{escape(exchange)}"


def topic_binding(exchange: str, pattern: str) -> str:
    """The topic that records a topic exchange's binding with ``pattern``."""
    return _keyed("topic", exchange, pattern)


def pattern_of(topic: str, exchange: str) -> str | None:
    """The escaped pattern of ``topic`` if it is a binding of topic exchange
    ``exchange`` (see :func:`topic_binding`), else None."""
    head = topic_binding(exchange, "")
    return topic[len(head) :] if topic.startswith(head) else None


def unescape(name: str) -> str:
    """The inverse of :func:`escape` (the %XX of UTF-8 bytes, as URLs have them)."""
    return urllib.parse.unquote(name, errors="surrogatepass")


def matches(pattern: str, routing_key: str) -> bool:
    """Whether ``routing_key`` matches the topic exchange's ``pattern``, as
    AMQP has it: words split by dots, ``*`` one word, ``#`` zero or more."""
    return _match(tuple(pattern.split(".")), tuple(routing_key.split(".")))


@lru_cache(maxsize=4096)
def _match(pattern: tuple[str, ...], words: tuple[str, ...]) -> bool:
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_match(rest, words[i:]) for i in range(len(words) + 1))
    if not words:
        return False
    return head in ("*", words[0]) and _match(rest, words[1:])
