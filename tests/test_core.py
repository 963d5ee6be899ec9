"""The broker core, driven directly with the time passed in: no trio, no sockets."""

from __future__ import annotations

import pytest

from brokerq.core import BrokerCore
from brokerq.errors import InvalidRequest, MessageTooLarge


@pytest.fixture
def core() -> BrokerCore:
    return BrokerCore(max_message_size=1000)


def bodies(messages: list) -> list[bytes]:  # type: ignore[type-arg]
    return [m.body for m in messages]


def test_fifo(core: BrokerCore) -> None:
    for i in range(5):
        core.put("q", b"%d" % i, now=0)
    assert bodies(core.get_nowait("q", 10)) == [b"0", b"1", b"2", b"3", b"4"]
    assert core.get_nowait("q") == []


def test_ids_increase_across_queues(core: BrokerCore) -> None:
    a, _ = core.put("a", b"x", now=0)
    b, _ = core.put("b", b"x", now=0)
    assert b > a


def test_queues_are_independent_and_created_on_first_use(core: BrokerCore) -> None:
    assert core.queue_names() == []
    core.put("a", b"1", now=0)
    core.put("b", b"2", now=0)
    assert core.queue_names() == ["a", "b"]
    assert bodies(core.get_nowait("b")) == [b"2"]
    assert bodies(core.get_nowait("a")) == [b"1"]


def test_put_hands_to_the_longest_waiter(core: BrokerCore) -> None:
    first = core.wait("q")
    second = core.wait("q")
    _, woken = core.put("q", b"m1", now=0)
    assert woken is first
    _, woken = core.put("q", b"m2", now=0)
    assert woken is second
    assert bodies(first.messages) == [b"m1"]
    assert bodies(second.messages) == [b"m2"]
    _, woken = core.put("q", b"m3", now=0)
    assert woken is None
    assert bodies(core.get_nowait("q")) == [b"m3"]


def test_waiter_that_gives_up_is_skipped(core: BrokerCore) -> None:
    first = core.wait("q")
    second = core.wait("q")
    assert core.cancel_wait(first, now=0) == []
    _, woken = core.put("q", b"m", now=0)
    assert woken is second
    assert first.messages == []


def test_waiter_that_leaves_after_handoff_gives_the_message_to_the_next(core: BrokerCore) -> None:
    first = core.wait("q")
    second = core.wait("q")
    core.put("q", b"m1", now=0)  # to first
    assert core.cancel_wait(first, now=0) == [second]
    assert bodies(second.messages) == [b"m1"]
    assert core.queue_stats("q", now=0)["delivered_total"] == 1


def test_waiter_that_leaves_after_handoff_with_no_one_waiting_puts_back_at_head(
    core: BrokerCore,
) -> None:
    waiter = core.wait("q")
    core.put("q", b"m1", now=0)
    core.put("q", b"m2", now=0)
    assert core.cancel_wait(waiter, now=0) == []
    assert bodies(core.get_nowait("q", 5)) == [b"m1", b"m2"]


def test_undeliver_puts_back_at_head_in_order(core: BrokerCore) -> None:
    for body in (b"1", b"2", b"3", b"4"):
        core.put("q", body, now=0)
    taken = core.get_nowait("q", 2)
    assert core.undeliver(taken, now=0, leased=False) == []
    assert bodies(core.get_nowait("q", 10)) == [b"1", b"2", b"3", b"4"]
    stats = core.queue_stats("q", now=0)
    assert stats["delivered_total"] == 4
    assert stats["bytes"] == 0


def test_undelivered_messages_go_to_waiters_first(core: BrokerCore) -> None:
    core.put("q", b"1", now=0)
    core.put("q", b"2", now=0)
    taken = core.get_nowait("q", 2)
    w1, w2, w3 = core.wait("q"), core.wait("q"), core.wait("q")
    assert core.undeliver(taken, now=0, leased=False) == [w1, w2]
    assert bodies(w1.messages) == [b"1"]
    assert bodies(w2.messages) == [b"2"]
    assert list(core._queues["q"].waiters) == [w3]


def test_never_ready_messages_and_waiters_together(core: BrokerCore) -> None:
    core.put("q", b"x", now=0)
    with pytest.raises(AssertionError):
        core.wait("q")


def test_get_nowait_respects_n_and_max_bytes(core: BrokerCore) -> None:
    for _ in range(10):
        core.put("q", b"x" * 100, now=0)
    assert len(core.get_nowait("q", 3)) == 3
    assert len(core.get_nowait("q", 10, max_bytes=250)) == 2
    # The first message is always taken, even when larger than max_bytes.
    assert len(core.get_nowait("q", 10, max_bytes=10)) == 1
    assert len(core.get_nowait("q", 10)) == 4


def test_put_many_is_ordered_and_wakes_waiters(core: BrokerCore) -> None:
    waiter = core.wait("q")
    ids, woken = core.put_many("q", [b"a", b"b", b"c"], now=0)
    assert ids == sorted(ids)
    assert woken == [waiter]
    assert bodies(waiter.messages) == [b"a"]
    assert bodies(core.get_nowait("q", 5)) == [b"b", b"c"]


def test_put_many_checks_every_size_first(core: BrokerCore) -> None:
    with pytest.raises(MessageTooLarge):
        core.put_many("q", [b"ok", b"x" * 1001], now=0)
    assert core.get_nowait("q") == []


def test_message_size_limit_is_inclusive(core: BrokerCore) -> None:
    core.put("q", b"x" * 1000, now=0)
    with pytest.raises(MessageTooLarge):
        core.put("q", b"x" * 1001, now=0)


def test_reserved_and_invalid_names(core: BrokerCore) -> None:
    with pytest.raises(InvalidRequest):
        core.put("q:dead", b"x", now=0)
    with pytest.raises(InvalidRequest):
        core.put("", b"x", now=0)
    assert core.get_nowait("q:dead") == []  # reading is allowed


def test_peek_does_not_remove(core: BrokerCore) -> None:
    assert core.peek("q") is None
    core.put("q", b"head", now=0)
    core.put("q", b"tail", now=0)
    peeked = core.peek("q")
    assert peeked is not None
    assert peeked.body == b"head"
    assert bodies(core.get_nowait("q", 5)) == [b"head", b"tail"]


def test_purge(core: BrokerCore) -> None:
    assert core.purge("q") == 0
    for _ in range(3):
        core.put("q", b"abc", now=0)
    assert core.purge("q") == 3
    stats = core.queue_stats("q", now=0)
    assert (stats["ready"], stats["bytes"]) == (0, 0)


def test_stats(core: BrokerCore) -> None:
    core.put("q", b"abc", now=10.0)
    core.put("q", b"de", now=11.0)
    core.get_nowait("q")
    stats = core.queue_stats("q", now=15.0)
    assert stats == {
        "name": "q",
        "ready": 1,
        "delayed": 0,
        "reserved": 0,
        "buried": 0,
        "waiters": 0,
        "putters": 0,
        "bytes": 2,
        "put_total": 2,
        "delivered_total": 1,
        "expired_total": 0,
        "dead_lettered_total": 0,
        "oldest_ready_age_s": 4.0,
        "max_deliveries": 20,
        "lease": 30.0,
    }
    core.get_nowait("q")
    assert core.queue_stats("q", now=15.0)["oldest_ready_age_s"] is None


def test_stats_of_unknown_queue_does_not_create_it(core: BrokerCore) -> None:
    assert core.queue_stats("nope", now=0)["ready"] == 0
    assert core.queue_names() == []


def test_totals_and_holds_messages(core: BrokerCore) -> None:
    assert not core.holds_messages()
    core.put("a", b"12", now=0)
    core.put("b", b"345", now=0)
    core.wait("c")
    assert core.holds_messages()
    assert core.totals() == {
        "queues": 3,
        "ready": 2,
        "reserved": 0,
        "waiters": 1,
        "bytes": 5,
        "put_total": 2,
        "delivered_total": 0,
    }
    assert len(core.all_waiters()) == 1
