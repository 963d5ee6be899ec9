"""Queue names onto JetStream names: pure, reversible, no I/O.

A brokerq queue name is any printable string (``jobs``, ``jobs:dead``,
``mail.out``); a stream name may not hold ``.``, ``*``, ``>``, spaces or path
separators, and a subject's tokens are split on ``.``. So every name is
escaped the same way for both: letters, digits and ``-`` stay, every other
UTF-8 byte becomes ``_XX`` (its hex, ``_`` itself included). The escape is
reversible, so two queue names never share a stream.
"""

from __future__ import annotations

import re
import string

from ..errors import InvalidRequest

#: The bytes kept as they are (ASCII letters, digits, '-'): safe in stream names and subjects.
_KEPT = frozenset((string.ascii_letters + string.digits + "-").encode())

#: The one durable pull consumer of each queue's stream: every reserve of every client shares it.
CONSUMER = "bq"

#: JetStream's longest stream name (its server refuses a longer one).
MAX_STREAM_NAME = 255

#: The suffix of a queue's dead letters, as the local broker's (``jobs:dead``).
DEAD_SUFFIX = ":dead"


def escape(name: str) -> str:
    """``name`` as a token safe in stream names and subjects (``a.b`` -> ``a_2Eb``)."""
    return "".join(chr(b) if b in _KEPT else f"_{b:02X}" for b in name.encode("utf-8"))


def unescape(token: str) -> str:
    """The name :func:`escape` made ``token`` from."""
    out = bytearray()
    i = 0
    while i < len(token):
        if token[i] == "_":
            out.append(int(token[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(ord(token[i]))
            i += 1
    return out.decode("utf-8")


def stream_name(queue: str) -> str:
    """The stream that holds ``queue``'s messages. The escape makes a name up
    to three times longer: one whose stream name would pass JetStream's
    limit is refused here, as an InvalidRequest, not by the server."""
    stream = f"BQ_{escape(queue)}"
    if len(stream) > MAX_STREAM_NAME:
        raise InvalidRequest(
            f"queue name {queue!r} is too long for the NATS backend: escaped, its stream "
            f"name has {len(stream)} characters, and JetStream allows {MAX_STREAM_NAME}"
        )
    return stream


def subject(queue: str) -> str:
    """The subject ``queue``'s messages are published on (its stream's only subject)."""
    return f"bq.q.{escape(queue)}"


def queue_of_stream(stream: str) -> str | None:
    """The queue a stream holds, or None for a stream that is not one of ours."""
    if not stream.startswith("BQ_"):
        return None
    try:
        return unescape(stream[3:])
    except (ValueError, UnicodeDecodeError):
        return None


def topic_subject(topic: str) -> str:
    """The core NATS subject of a live topic (publish/subscribe: no stream)."""
    return f"bq.t.{escape(topic)}"


#: The stream of every queue's durable topic subscriptions: one message per
#: (topic, queue) pair, on the subject :func:`subscription_subject` names.
#: Not ``BQ_``-prefixed, so no queue is ever named after it.
SUBSCRIPTIONS_STREAM = "BQSUBS"

#: The subjects of :data:`SUBSCRIPTIONS_STREAM`.
SUBSCRIPTIONS_SUBJECTS = "bq.s.>"


def subscription_subject(topic: str, queue: str) -> str:
    """The subject that records ``queue``'s durable subscription to ``topic``."""
    return f"bq.s.{escape(topic)}.{escape(queue)}"


def topic_subscriptions(topic: str) -> str:
    """The subject filter matching every queue's subscription to ``topic``."""
    return f"bq.s.{escape(topic)}.*"


def queue_subscriptions(queue: str) -> str:
    """The subject filter matching every subscription of ``queue``."""
    return f"bq.s.*.{escape(queue)}"


def parse_subscription(subject: str) -> tuple[str, str] | None:
    """The (topic, queue) a subscription subject records, or None for another subject."""
    parts = subject.split(".")
    if len(parts) != 4 or parts[:2] != ["bq", "s"]:
        return None
    try:
        return unescape(parts[2]), unescape(parts[3])
    except (ValueError, UnicodeDecodeError):
        return None


def dead_letter_id(stream: str, seq: int) -> str:
    """The ``Nats-Msg-Id`` of the dead-letter copy of ``stream``'s message ``seq``:
    the same on every attempt of the move, so a move retried after a client
    died between its publish and its ack is dropped as a duplicate."""
    return f"dead-{stream}-{seq}"


def buried_stream_name(queue: str) -> str:
    """The stream that holds ``queue``'s buried messages, apart from its queue
    stream so that no consumer of the queue sees them. ``BB_`` is as long as
    ``BQ_``: a name :func:`stream_name` accepts fits here too; and it is not
    ``BQ_``, so ``queues()`` does not list it."""
    stream_name(queue)  # (the length check)
    return f"BB_{escape(queue)}"


def buried_subject(queue: str, seq: int) -> str:
    """The subject of the buried copy of ``queue``'s message ``seq`` (its queue
    stream sequence): a redelivery of ``seq`` finds its copy, if any, by it."""
    return f"bq.b.{escape(queue)}.{seq}"


def buried_subjects(queue: str) -> str:
    """The buried stream's subjects (every :func:`buried_subject` of ``queue``)."""
    return f"bq.b.{escape(queue)}.>"


def buried_from(subject: str) -> int:
    """The queue stream sequence a :func:`buried_subject` names."""
    return int(subject.rsplit(".", 1)[1])


def kicked_id(buried_id: str) -> str:
    """The ``Nats-Msg-Id`` a kick puts a buried copy back under: fixed by the
    copy's own (unique) id, so two kicks of one copy (two clients at once, or
    one that died before it deleted the copy) put it once within the window."""
    return f"kicked-{buried_id}"


def parse_url(url: str) -> tuple[list[str], int]:
    """The servers and stream replicas a brokerq NATS URL names.

    ``nats://a:4222,nats://b:4222,nats://c:4222?replicas=3``: the servers of
    a cluster (any one will do to connect; the client learns the rest), and
    the replicas of the streams this client makes (1 by default; 3 or 5 on a
    cluster, so a put is acknowledged by a quorum and survives a node's loss).
    """
    from urllib.parse import parse_qs

    servers, _, query = url.partition("?")
    options = parse_qs(query)
    unknown = set(options) - {"replicas"}
    if unknown:
        raise ValueError(f"unknown option(s) in the NATS URL: {', '.join(sorted(unknown))}")
    replicas = int(options.get("replicas", ["1"])[-1])
    if not 1 <= replicas <= 5:
        raise ValueError(f"replicas must be 1 to 5 (JetStream's limit), not {replicas}")
    return [s.strip() for s in servers.split(",") if s.strip()], replicas


def redacted(url: str) -> str:
    """``url`` as it may be shown (a repr, a stat, an error): the password or
    token of each server in it replaced by ``***``, the user name kept."""

    def hide(found: re.Match[str]) -> str:
        user, colon, _secret = found.group(1).partition(":")
        return f"//{user}:***@" if colon else "//***@"

    return re.sub(r"//([^/@,]*)@", hide, url)
