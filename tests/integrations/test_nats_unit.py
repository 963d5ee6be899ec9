"""The NATS backend's pure rules (brokerq.nats.naming, brokerq.nats.rules):
names, escapes, and what a consumer does with a fetched message. No server."""

from __future__ import annotations

import pytest
from extras import require
from hypothesis import given
from hypothesis import strategies as st

require("nats", "nats")  # (brokerq.nats's package imports nats-py; these modules do not)
import brokerq.nats  # noqa: E402
from brokerq.errors import InvalidRequest  # noqa: E402
from brokerq.nats import naming, rules  # noqa: E402
from brokerq.nats.aio_admin import QueueSettings  # noqa: E402

NOW = 1_000_000.0


@given(st.text(min_size=1))
def test_escape_is_reversible_and_safe(name: str) -> None:
    token = naming.escape(name)
    assert naming.unescape(token) == name
    assert not set(token) & set(". *>/\\\t\n")


def test_names() -> None:
    assert naming.stream_name("jobs") == "BQ_jobs"
    assert naming.stream_name("jobs:dead") == "BQ_jobs_3Adead"
    assert naming.subject("mail.out") == "bq.q.mail_2Eout"
    assert naming.escape("a_b") == "a_5Fb"  # '_' escaped too: no two names meet
    assert naming.queue_of_stream("BQ_jobs_3Adead") == "jobs:dead"
    assert naming.queue_of_stream("ORDERS") is None
    assert naming.queue_of_stream("BQ__ZZ") is None
    assert naming.dead_letter_id("BQ_jobs", 7) == "dead-BQ_jobs-7"


@given(st.text(min_size=1), st.text(min_size=1))
def test_a_subscription_subject_names_its_topic_and_queue_and_no_other(
    topic: str, queue: str
) -> None:
    subject = naming.subscription_subject(topic, queue)
    assert naming.parse_subscription(subject) == (topic, queue)
    assert subject.count(".") == 3  # one token each: the filters' '*' match exactly one


def test_subscription_names() -> None:
    assert naming.subscription_subject("news.eu", "audit:x") == "bq.s.news_2Eeu.audit_3Ax"
    assert naming.topic_subscriptions("news.eu") == "bq.s.news_2Eeu.*"
    assert naming.queue_subscriptions("audit") == "bq.s.*.audit"
    assert naming.SUBSCRIPTIONS_SUBJECTS == "bq.s.>"
    # The subscriptions' stream is never taken for a queue's.
    assert naming.queue_of_stream(naming.SUBSCRIPTIONS_STREAM) is None
    for other in ("bq.q.jobs", "bq.s.a", "bq.s.a.b.c", "bq.s.a.Z_"):
        assert naming.parse_subscription(other) is None


def test_buried_names() -> None:
    """A queue's buried copies: a stream that is not listed as a queue, a
    subject per queue sequence, and a kick's id fixed by the copy's own."""
    assert naming.buried_stream_name("jobs:dead") == "BB_jobs_3Adead"
    assert naming.queue_of_stream(naming.buried_stream_name("jobs")) is None
    assert naming.buried_subject("mail.out", 7) == "bq.b.mail_2Eout.7"
    assert naming.buried_subjects("mail.out") == "bq.b.mail_2Eout.>"
    assert naming.buried_from(naming.buried_subject("a.b.c", 42)) == 42
    assert naming.kicked_id("buried-1f2e") == "kicked-buried-1f2e"
    longest = "j" * 252
    assert len(naming.buried_stream_name(longest)) == len(naming.stream_name(longest)) == 255
    with pytest.raises(InvalidRequest):
        naming.buried_stream_name("j" * 253)


def test_a_name_too_long_for_a_stream_once_escaped_is_an_invalid_request() -> None:
    """JetStream allows 255 characters; the escape triples a byte outside
    [A-Za-z0-9-]: refused before the server would refuse it."""
    assert naming.stream_name("j" * 252) == "BQ_" + "j" * 252
    with pytest.raises(InvalidRequest, match="too long for the NATS backend"):
        naming.stream_name("j" * 253)
    with pytest.raises(InvalidRequest, match="has 363 characters"):
        naming.stream_name("é" * 60)  # 120 bytes, each _XX


def test_put_headers_carry_the_key_and_absolute_times() -> None:
    assert rules.put_headers("k", NOW, 0, None) == {"Nats-Msg-Id": "k"}
    headers = rules.put_headers("k", NOW, 5, 10)
    assert float(headers[rules.NOT_BEFORE]) == NOW + 5
    assert float(headers[rules.EXPIRES]) == NOW + 15  # the ttl counts from when it is due


def test_a_plain_message_is_delivered_until_max_deliveries_then_dead() -> None:
    assert rules.judge({}, 1, 3, NOW).action is rules.Action.DELIVER
    assert rules.judge(None, 3, 3, NOW).action is rules.Action.DELIVER
    assert rules.judge(None, 4, 3, NOW).action is rules.Action.DEAD
    # A dead-letter queue's own messages never move on.
    assert rules.judge(None, 99, 3, NOW, dead_letters=False).action is rules.Action.DELIVER


def test_a_message_not_yet_due_is_deferred_for_the_rest_of_its_delay() -> None:
    headers = rules.put_headers("k", NOW, 5, None)
    verdict = rules.judge(headers, 1, 3, NOW + 1)
    assert verdict == rules.Verdict(rules.Action.DEFER, 4.0)
    # Deferred, never dead-lettered, however often it was seen early.
    assert rules.judge(headers, 50, 3, NOW + 1).action is rules.Action.DEFER
    # Once due: its deferral is no attempt.
    assert rules.judge(headers, 2, 1, NOW + 6).action is rules.Action.DELIVER
    assert rules.attempt(headers, 2) == 1
    assert rules.attempt(headers, 1) == 1
    assert rules.attempt({}, 2) == 2


def test_an_expired_message_is_dropped_before_anything_else() -> None:
    headers = rules.put_headers("k", NOW, 0, 1)
    assert rules.judge(headers, 1, 3, NOW + 0.5).action is rules.Action.DELIVER
    assert rules.judge(headers, 99, 3, NOW + 2).action is rules.Action.EXPIRE


def test_headers_not_ours_are_ignored() -> None:
    headers = {rules.NOT_BEFORE: "soon", rules.EXPIRES: ""}
    assert rules.judge(headers, 1, 3, NOW).action is rules.Action.DELIVER


@pytest.mark.parametrize(
    ("remaining", "wait"), [(None, 5.0), (2.0, 2.0), (60.0, 5.0), (0.0, 0.001)]
)
def test_a_wait_is_a_loop_of_bounded_pulls(remaining: float | None, wait: float) -> None:
    assert rules.fetch_wait(remaining) == wait


def test_settings_read_from_the_stream_description() -> None:
    assert QueueSettings.from_description('{"max_deliveries": 4}').max_deliveries == 4
    assert QueueSettings.from_description(None).max_deliveries == rules.DEFAULT_MAX_DELIVERIES
    assert QueueSettings.from_description("a user's words").max_deliveries == 20


def test_import_brokerq_loads_neither_brokerq_nats_nor_nats_py() -> None:
    """The NATS backend is imported on first use of a nats:// URL, not before."""
    import subprocess
    import sys

    check = (
        "import sys, brokerq\n"
        "print(sorted(m for m in sys.modules if m.partition('.')[0] == 'nats'"
        " or m.startswith('brokerq.nats')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"


def test_nats_errors_become_brokerq_errors() -> None:
    import nats.errors

    import brokerq
    from brokerq.nats.failures import brokerq_error

    lost = brokerq_error(nats.errors.ConnectionClosedError())
    assert isinstance(lost, brokerq.ConnectionLost)
    assert isinstance(brokerq_error(nats.errors.TimeoutError()), brokerq.BrokerUnavailable)
    assert isinstance(brokerq_error(nats.errors.MaxPayloadError()), brokerq.MessageTooLarge)
    assert type(brokerq_error(nats.errors.BadSubjectError())) is brokerq.BrokerqError


@pytest.mark.parametrize("silence", ["no answer", "no responders"])
def test_a_request_asked_again_until_its_time_is_up_raises_broker_unavailable(
    silence: str,
) -> None:
    """The last attempt's own error (asyncio's TimeoutError of its wait, say)
    would escape a caller's ``except brokerq.BrokerqError``."""
    import asyncio

    import nats.errors

    import brokerq
    from brokerq.nats.failures import asked_again

    attempts = 0

    async def request() -> None:
        nonlocal attempts
        attempts += 1
        if silence == "no responders":
            raise nats.errors.NoRespondersError
        await asyncio.sleep(3600)

    with pytest.raises(brokerq.BrokerUnavailable, match="did not answer"):
        asyncio.run(asked_again(request, within=0.3, attempt=0.1))
    assert attempts >= 2


def test_the_url_names_servers_and_replicas() -> None:
    assert naming.parse_url("nats://h:4222") == (["nats://h:4222"], 1)
    cluster = "nats://a:1,nats://b:2, nats://c:3?replicas=3"
    assert naming.parse_url(cluster) == (["nats://a:1", "nats://b:2", "nats://c:3"], 3)
    with pytest.raises(ValueError, match="replicas must be 1 to 5"):
        naming.parse_url("nats://h:4222?replicas=7")
    with pytest.raises(ValueError, match="unknown option"):
        naming.parse_url("nats://h:4222?replica=3")


def test_a_url_is_shown_without_its_password_or_token() -> None:
    assert naming.redacted("nats://alice:s3cret@host:4222") == "nats://alice:***@host:4222"
    assert naming.redacted("nats://t0ken@host:4222") == "nats://***@host:4222"
    cluster = "nats://a:x@h1:4222,nats://b:y@h2:4222?replicas=3"
    assert naming.redacted(cluster) == "nats://a:***@h1:4222,nats://b:***@h2:4222?replicas=3"
    assert naming.redacted("tls://host:4222") == "tls://host:4222"


def test_a_clients_repr_hides_the_password() -> None:
    client = brokerq.nats.NatsClient("nats://alice:s3cret@127.0.0.1:1")
    queue = client.queue("jobs")
    assert "s3cret" not in repr(client) + repr(queue)
    assert client.url == "nats://alice:s3cret@127.0.0.1:1"  # (still the one to connect to)
    client.close()
