"""The broker core, driven directly with the time passed in: no trio, no sockets."""

from __future__ import annotations

import pytest

from brokerq.broker.core import BrokerCore
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
    assert core.undeliver(taken, now=0) == []
    assert bodies(core.get_nowait("q", 10)) == [b"1", b"2", b"3", b"4"]
    stats = core.queue_stats("q", now=0)
    assert stats["delivered_total"] == 4
    assert stats["bytes"] == 0


def test_undelivered_messages_go_to_waiters_first(core: BrokerCore) -> None:
    core.put("q", b"1", now=0)
    core.put("q", b"2", now=0)
    taken = core.get_nowait("q", 2)
    w1, w2, w3 = core.wait("q"), core.wait("q"), core.wait("q")
    assert core.undeliver(taken, now=0) == [w1, w2]
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
        "unfinished_tasks": 2,  # the one got still needs its task_done
        "streams": 0,
        "prefetched": 0,
        "max_deliveries": 20,
        "lease": 30.0,
        "maxsize": 0,
        "max_bytes": 0,
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


# -- leases, dead letters, kick ---------------------------------------------------


def test_reserve_leases_the_head_and_ack_removes_it(core: BrokerCore) -> None:
    core.put("q", b"a", now=0)
    core.put("q", b"b", now=0)
    msg = core.reserve_nowait("q", now=0, owner="c1")
    assert msg is not None
    assert (msg.body, msg.attempts) == (b"a", 1)
    stats = core.queue_stats("q", now=0)
    assert (stats["ready"], stats["reserved"], stats["bytes"]) == (1, 1, 2)
    core.ack(msg.id, 1)
    stats = core.queue_stats("q", now=0)
    assert (stats["ready"], stats["reserved"], stats["bytes"]) == (1, 0, 1)
    assert not core.lease_of(msg.id)


def test_release_puts_back_at_its_place_in_order(core: BrokerCore) -> None:
    for body in (b"1", b"2", b"3"):
        core.put("q", body, now=0)
    first = core.reserve_nowait("q", now=0)
    second = core.reserve_nowait("q", now=0)
    assert first is not None
    assert second is not None
    core.release(second.id, 1, now=0)
    core.release(first.id, 1, now=0)
    assert bodies(core.get_nowait("q", 5)) == [b"1", b"2", b"3"]


def test_a_late_verb_for_an_expired_attempt_is_refused(core: BrokerCore) -> None:
    from brokerq.errors import LeaseLost

    core.put("q", b"x", now=0)
    msg = core.reserve_nowait("q", now=0, lease=10)
    assert msg is not None
    assert core.next_deadline() == 10
    assert core.tick(now=9) == []
    assert core.tick(now=10) == []  # back to ready, nobody waiting
    again = core.reserve_nowait("q", now=11)
    assert again is not None
    assert again.attempts == 2
    with pytest.raises(LeaseLost):
        core.ack(msg.id, 1)
    core.ack(again.id, 2)
    assert core.queue_stats("q", now=11)["ready"] == 0


def test_expired_lease_goes_to_the_longest_waiter(core: BrokerCore) -> None:
    core.put("q", b"x", now=0)
    core.reserve_nowait("q", now=0, lease=5)
    waiter = core.wait("q", lease=5, owner="w")
    assert core.tick(now=5) == [waiter]
    assert waiter.messages[0].attempts == 2
    assert core.lease_of(waiter.messages[0].id) is not None


def test_touch_extends_the_lease(core: BrokerCore) -> None:
    core.put("q", b"x", now=0)
    msg = core.reserve_nowait("q", now=0, lease=5)
    assert msg is not None
    assert core.touch(msg.id, 1, now=4) == 9
    core.tick(now=6)
    assert core.queue_stats("q", now=6)["reserved"] == 1
    core.tick(now=9)
    assert core.queue_stats("q", now=9)["ready"] == 1


def test_owner_closing_releases_everything_it_held(core: BrokerCore) -> None:
    for body in (b"1", b"2", b"3"):
        core.put("q", body, now=0)
    core.reserve_nowait("q", now=0, owner="gone")
    core.reserve_nowait("q", now=0, owner="gone")
    core.reserve_nowait("q", now=0, owner="alive")
    core.release_owned("gone", now=1)
    stats = core.queue_stats("q", now=1)
    assert (stats["ready"], stats["reserved"]) == (2, 1)
    assert bodies(core.get_nowait("q", 5)) == [b"1", b"2"]


def test_release_with_delay(core: BrokerCore) -> None:
    core.put("q", b"x", now=0)
    msg = core.reserve_nowait("q", now=0)
    assert msg is not None
    core.release(msg.id, 1, now=0, delay=3)
    assert core.queue_stats("q", now=1)["delayed"] == 1
    assert core.get_nowait("q") == []
    core.tick(now=3)
    assert bodies(core.get_nowait("q")) == [b"x"]


def test_dead_letter_after_max_deliveries_and_kick_back(core: BrokerCore) -> None:
    core.configure("q", max_deliveries=2)
    core.put("q", b"x", now=0)
    for attempt in (1, 2):
        msg = core.reserve_nowait("q", now=0)
        assert msg is not None
        assert msg.attempts == attempt
        core.release(msg.id, attempt, now=0)
    assert core.queue_stats("q", now=0)["dead_lettered_total"] == 1
    assert core.queue_stats("q", now=0)["ready"] == 0
    assert core.queue_stats("q:dead", now=0)["ready"] == 1
    count, _ = core.kick("q:dead", 10, now=0)
    assert count == 1
    msg = core.reserve_nowait("q", now=0)
    assert msg is not None
    assert msg.attempts == 1


def test_bury_and_kick(core: BrokerCore) -> None:
    core.put("q", b"x", now=0)
    msg = core.reserve_nowait("q", now=0)
    assert msg is not None
    core.bury(msg.id, 1)
    assert core.queue_stats("q", now=0)["buried"] == 1
    assert core.get_nowait("q") == []
    waiter = core.wait("q")
    count, woken = core.kick("q", 1, now=0)
    assert (count, woken) == (1, [waiter])


def test_configure_validates(core: BrokerCore) -> None:
    with pytest.raises(InvalidRequest):
        core.configure("q", max_deliveries=0)
    with pytest.raises(InvalidRequest):
        core.configure("q", lease=0)
    assert core.configure("q", lease=5)["lease"] == 5


def test_a_retried_put_key_is_dropped(core: BrokerCore) -> None:
    first, _ = core.put("q", b"x", now=0, key=b"k1")
    again, _ = core.put("q", b"x", now=0, key=b"k1")
    assert again == first
    ids, _ = core.put_many("q", [b"x", b"y"], now=0, keys=[b"k1", b"k2"])
    assert ids[0] == first
    assert core.queue_stats("q", now=0)["ready"] == 2


def test_write_ahead_failure_changes_nothing() -> None:
    from brokerq.errors import Full

    def refuse(record: object) -> None:
        raise Full("disk full")

    core = BrokerCore(max_message_size=100)
    core.put("q", b"kept", now=0)
    core.write = refuse
    with pytest.raises(Full):
        core.put("q", b"x", now=0)
    with pytest.raises(Full):
        core.get_nowait("q")
    core.write = None
    assert bodies(core.get_nowait("q", 5)) == [b"kept"]


def test_replay_rebuilds_the_state() -> None:
    records: list = []  # type: ignore[type-arg]
    a = BrokerCore(max_message_size=100, write=records.append)
    for body in (b"1", b"2", b"3", b"4"):
        a.put("q", body, now=0, key=body)
    a.get_nowait("q")  # 1 gone
    held = a.reserve_nowait("q", now=0)  # 2 reserved: ready again after a restart
    buried = a.reserve_nowait("q", now=0)
    assert held is not None
    assert buried is not None
    a.bury(buried.id, 1)  # 3 buried
    a.configure("q", lease=7)
    b = BrokerCore(max_message_size=100)
    for record in records:
        b.apply(record)
    assert b.finish_replay(now=0) == 3
    assert bodies(b.get_nowait("q", 5)) == [b"2", b"4"]
    assert b.queue_stats("q", now=0)["buried"] == 1
    assert b.queue_config("q")["lease"] == 7
    new_id, _ = b.put("q", b"5", now=0)
    assert new_id > 4
    assert b.put("q", b"4", now=0, key=b"4")[0] == 4  # the key window came back


def test_a_body_handed_straight_to_a_get_is_not_journaled_but_comes_back_if_unsent() -> None:
    """A put taken by a waiting get in the same record writes no body (it is
    never live after a replay); a reserve's, or an unsent reply's, does."""
    records: list = []  # type: ignore[type-arg]
    core = BrokerCore(max_message_size=100_000, write=records.append)
    body = b"b" * 65536
    getter = core.wait("q")
    reserver = core.wait("q", lease=30.0)
    ids, woken = core.put_many("q", [body, body, body], now=0, keys=[b"k1", b"k2", b"k3"])
    assert woken == [getter, reserver]
    (put,) = records
    assert put.bodies == [b"", body, body]  # taken, leased, ready
    assert put.taken == [ids[0]]
    assert sum(len(b) for b in put.bodies) == 2 * len(body)
    replayed = BrokerCore(max_message_size=100_000)
    for record in records:
        replayed.apply(record)
    assert replayed.finish_replay(now=0) == 2  # the leased one is ready again
    assert [m.id for m in replayed.get_nowait("q", 5)] == ids[1:]
    assert replayed.put("q", b"again", now=0, key=b"k1")[0] == ids[0]  # its key is kept
    # The get's reply could not be written: the message comes back, body and all.
    core.undeliver(getter.messages, now=1)
    again = BrokerCore(max_message_size=100_000)
    for record in records:
        again.apply(record)
    again.finish_replay(now=1)
    assert [(m.id, m.body) for m in again.get_nowait("q", 5)] == [
        (ids[0], body),
        (ids[1], body),
        (ids[2], body),
    ]


def test_undelivering_a_reserve_whose_lease_already_ended_touches_nothing(
    core: BrokerCore,
) -> None:
    core.put("q", b"x", now=0)
    first = core.reserve_nowait("q", now=0, lease=1)
    assert first is not None
    leases = core.leases_of([first])
    core.tick(now=1)  # its lease ran out...
    second = core.reserve_nowait("q", now=2, lease=10)  # ...and it went to another
    assert second is not None
    assert second.attempts == 2
    core.undeliver([first], now=2, leases=leases)  # the first reply failed late
    lease = core.lease_of(second.id)
    assert lease is not None
    assert lease.attempt == 2
    core.ack(second.id, 2)


def test_a_put_handed_to_waiters_is_one_record() -> None:
    records: list = []  # type: ignore[type-arg]
    core = BrokerCore(max_message_size=100, write=records.append)
    getter = core.wait("q")
    reserver = core.wait("q", lease=5)
    core.put_many("q", [b"a", b"b", b"c"], now=0)
    assert len(records) == 1
    assert (records[0].taken, records[0].leased) == ([1], [2])
    assert bodies(getter.messages) == [b"a"]
    assert [m.attempts for m in reserver.messages] == [1]
    replayed = BrokerCore(max_message_size=100)
    replayed.apply(records[0])
    assert replayed.finish_replay(now=0) == 2  # b (reserved: ready again) and c
    assert [m.attempts for m in replayed.get_nowait("q", 5)] == [1, 0]


def test_a_full_disk_postpones_a_lease_expiry() -> None:
    from brokerq.errors import Full

    core = BrokerCore(max_message_size=100)
    core.put("q", b"x", now=0)
    core.reserve_nowait("q", now=0, lease=1)

    def full(record: object) -> None:
        raise Full("disk full")

    core.write = full
    assert core.tick(now=1) == []
    assert core.next_deadline() == 2
    core.write = None
    core.tick(now=2)
    assert core.queue_stats("q", now=2)["ready"] == 1


@pytest.mark.parametrize("value", [float("inf"), float("nan"), -1.0])
def test_leases_and_delays_are_finite(core: BrokerCore, value: float) -> None:
    core.put("q", b"x", now=0)
    msg = core.reserve_nowait("q", now=0)
    assert msg is not None
    with pytest.raises(InvalidRequest):
        core.release(msg.id, 1, now=0, delay=value)
    with pytest.raises(InvalidRequest):
        core.configure("q", lease=value)


# -- priority, delay, ttl ---------------------------------------------------------


def test_higher_priority_first_fifo_within(core: BrokerCore) -> None:
    core.put("q", b"low1", now=0, priority=-1)
    core.put("q", b"mid1", now=0)
    core.put("q", b"high1", now=0, priority=5)
    core.put("q", b"mid2", now=0)
    core.put("q", b"high2", now=0, priority=5)
    assert bodies(core.get_nowait("q", 10)) == [b"high1", b"high2", b"mid1", b"mid2", b"low1"]


def test_a_released_message_returns_to_its_place_within_its_priority(core: BrokerCore) -> None:
    core.put("q", b"h1", now=0, priority=1)
    core.put("q", b"h2", now=0, priority=1)
    core.put("q", b"l", now=0)
    first = core.reserve_nowait("q", now=0)
    assert first is not None
    assert first.body == b"h1"
    core.release(first.id, 1, now=0)
    assert bodies(core.get_nowait("q", 10)) == [b"h1", b"h2", b"l"]


def test_a_waiter_gets_a_put_of_any_priority(core: BrokerCore) -> None:
    waiter = core.wait("q")
    _, woken = core.put("q", b"x", now=0, priority=3)
    assert woken is waiter


def test_delayed_put_is_invisible_until_due(core: BrokerCore) -> None:
    waiter = core.wait("q")
    _, woken = core.put("q", b"later", now=0, delay=5)
    assert woken is None
    assert core.queue_stats("q", now=0)["delayed"] == 1
    assert core.next_deadline() == 5
    assert core.tick(now=4.9) == []
    assert core.tick(now=5) == [waiter]
    assert bodies(waiter.messages) == [b"later"]


def test_ttl_drops_a_waiting_message_and_counts_it(core: BrokerCore) -> None:
    core.put("q", b"short", now=0, ttl=2)
    core.put("q", b"long", now=0, ttl=20)
    core.put("q", b"delayed", now=0, delay=5, ttl=3)
    core.tick(now=3)
    stats = core.queue_stats("q", now=3)
    assert (stats["ready"], stats["delayed"], stats["expired_total"]) == (1, 0, 2)
    assert bodies(core.get_nowait("q", 10)) == [b"long"]
    assert core.live_bytes == 0


def test_ttl_of_a_leased_message_applies_when_the_lease_ends(core: BrokerCore) -> None:
    core.put("q", b"x", now=0, ttl=2)
    msg = core.reserve_nowait("q", now=0, lease=10)
    assert msg is not None
    core.tick(now=3)  # expired while leased: still the consumer's
    core.release(msg.id, 1, now=3)  # comes back past its ttl: dropped
    stats = core.queue_stats("q", now=3)
    assert (stats["ready"], stats["reserved"], stats["expired_total"]) == (0, 0, 1)


@pytest.mark.parametrize(
    "options",
    [
        {"priority": 2**31},
        {"delay": -1.0},
        {"delay": float("inf")},
        {"ttl": 0.0},
        {"ttl": float("nan")},
    ],
)
def test_put_options_are_checked(core: BrokerCore, options: dict[str, float]) -> None:
    with pytest.raises(InvalidRequest):
        core.put("q", b"x", now=0, **options)
    assert core.queue_stats("q", now=0)["put_total"] == 0


def test_priority_delay_and_ttl_survive_a_replay() -> None:
    records: list = []  # type: ignore[type-arg]
    a = BrokerCore(max_message_size=100, write=records.append)
    a.put("q", b"low", now=0)
    a.put("q", b"high", now=0, priority=9)
    a.put("q", b"later", now=0, delay=50)
    a.put("q", b"brief", now=0, ttl=5)
    a.put("q", b"gone", now=0, ttl=1)
    b = BrokerCore(max_message_size=100)
    for record in records:
        b.apply(record)
    assert b.finish_replay(now=2) == 4  # "gone" expired while no broker ran
    assert bodies(b.get_nowait("q", 10)) == [b"high", b"low", b"brief"]
    assert b.queue_stats("q", now=2)["delayed"] == 1
    b.tick(now=50)
    assert bodies(b.get_nowait("q", 10)) == [b"later"]


# -- bounded queues and blocked putters --------------------------------------------


def test_a_full_queue_refuses_and_admits_putters_in_order(core: BrokerCore) -> None:
    from brokerq.errors import QueueFull

    core.configure("q", maxsize=2)
    core.put("q", b"1", now=0)
    core.put("q", b"2", now=0)
    with pytest.raises(QueueFull):
        core.put("q", b"3", now=0)
    first = core.wait_put("q", [b"3"], None, {})
    second = core.wait_put("q", [b"4", b"5"], None, {})
    # Nobody may overtake the putters, even when there is room for a small put.
    assert bodies(core.get_nowait("q")) == [b"1"]
    assert core.admit_freed(now=0) == [first]
    assert first.ids is not None
    with pytest.raises(QueueFull):
        core.put("q", b"late", now=0)
    core.get_nowait("q", 2)  # frees two: the second putter fits
    assert core.admit_freed(now=0) == [second]
    assert bodies(core.get_nowait("q", 5)) == [b"4", b"5"]
    assert core.queue_stats("q", now=0)["putters"] == 0


def test_a_putter_that_gives_up_lets_the_next_one_in(core: BrokerCore) -> None:
    core.configure("q", maxsize=1)
    core.put("q", b"held", now=0)
    big = core.wait_put("q", [b"a", b"b"], None, {})  # can never fit while held
    small = core.wait_put("q", [b"c"], None, {})
    core.get_nowait("q")
    assert core.admit_freed(now=0) == []  # the first in line does not fit: all wait
    assert core.cancel_put(big, now=0) == [small]
    assert bodies(core.get_nowait("q")) == [b"c"]


def test_limits_count_every_state_and_bytes(core: BrokerCore) -> None:
    from brokerq.errors import Full, QueueFull

    core.configure("q", max_bytes=10)
    core.put("q", b"12345", now=0)
    msg = core.reserve_nowait("q", now=0)  # reserved still counts
    assert msg is not None
    core.put("q", b"12345", now=0, delay=5)  # delayed too
    with pytest.raises(QueueFull):
        core.put("q", b"x", now=0)
    with pytest.raises(Full, match="never fit"):
        core.put("q", b"x" * 11, now=0)
    core.ack(msg.id, 1)
    core.put("q", b"x", now=0)


def test_messages_for_waiting_consumers_need_no_room(core: BrokerCore) -> None:
    core.configure("q", maxsize=1)
    core.put("q", b"held", now=0)
    core.reserve_nowait("q", now=0)
    waiter = core.wait("q")
    _, woken = core.put("q", b"straight through", now=0)
    assert woken is waiter


def test_limits_survive_a_replay() -> None:
    records: list = []  # type: ignore[type-arg]
    a = BrokerCore(max_message_size=100, write=records.append)
    a.configure("q", maxsize=3, max_bytes=100, lease=5)
    a.configure("q", max_deliveries=4)  # None leaves the others as they are
    b = BrokerCore(max_message_size=100)
    for record in records:
        b.apply(record)
    b.finish_replay(now=0)
    assert b.queue_config("q") == {"max_deliveries": 4, "lease": 5, "maxsize": 3, "max_bytes": 100}


def test_delete_a_queue_with_messages_in_every_state() -> None:
    from brokerq.errors import LeaseLost

    records: list = []  # type: ignore[type-arg]
    core = BrokerCore(max_message_size=100, write=records.append)
    core.configure("q", maxsize=10)
    core.put_many("q", [b"a", b"b", b"c", b"d"], now=0)
    core.put("q", b"later", now=0, delay=5)
    held = core.reserve_nowait("q", now=0)
    buried = core.reserve_nowait("q", now=0)
    assert held is not None
    assert buried is not None
    core.bury(buried.id, 1)
    core.put("other", b"kept", now=0)
    count, _ = core.delete_queue("q", now=0)
    assert count == 5
    assert core.queue_names() == ["other"]
    with pytest.raises(LeaseLost):
        core.ack(held.id, 1)
    assert core.queue_config("q")["maxsize"] == 0
    assert core.delete_queue("q", now=0) == (0, [])
    replayed = BrokerCore(max_message_size=100)
    for record in records:
        replayed.apply(record)
    assert replayed.finish_replay(now=10) == 1
    assert replayed.queue_names() == ["other"]


def test_deleting_a_queue_waited_on_keeps_its_waiters() -> None:
    core = BrokerCore(max_message_size=100)
    waiter = core.wait("q")
    core.delete_queue("q", now=0)
    _, woken = core.put("q", b"x", now=0)
    assert woken is waiter


def test_an_undelivered_get_keeps_its_priority_and_ttl_across_a_replay() -> None:
    records: list = []  # type: ignore[type-arg]
    a = BrokerCore(max_message_size=100, write=records.append)
    a.put("q", b"low", now=0)
    a.put("q", b"high", now=0, priority=7, ttl=100)
    taken = a.get_nowait("q")
    a.undeliver(taken, now=0)  # its reply could not be written
    b = BrokerCore(max_message_size=100)
    for record in records:
        b.apply(record)
    b.finish_replay(now=1)
    (high, low) = b.get_nowait("q", 2)
    assert (high.body, high.priority, high.expires_at) == (b"high", 7, 100)
    assert low.body == b"low"
