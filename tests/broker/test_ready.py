"""ReadyList against a plain model: a list kept sorted by (-priority, id)."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from brokerq.broker.core.ready import ReadyList


@dataclass(eq=False)
class Msg:
    id: int
    priority: int


def order(messages: list[Msg]) -> list[int]:
    return [m.id for m in sorted(messages, key=lambda m: (-m.priority, m.id))]


# Each step: ("new", priority), ("batch", priority, k) k new ones at once
# (extend), ("pop",), ("popmany", k) the first k at once (popleft_many),
# ("back", k) puts back the k-th message popped and not yet back, ("remove",
# k) takes out the k-th ready one.
steps = st.lists(
    st.one_of(
        st.tuples(st.just("new"), st.integers(-2, 2)),
        st.tuples(st.just("batch"), st.integers(-2, 2), st.integers(0, 5)),
        st.tuples(st.just("pop")),
        st.tuples(st.just("popmany"), st.integers(0, 6)),
        st.tuples(st.just("back"), st.integers(0, 50)),
        st.tuples(st.just("remove"), st.integers(0, 50)),
    ),
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(steps)
def test_ready_list_keeps_delivery_order_through_any_steps(ops: list[tuple[object, ...]]) -> None:
    ready: ReadyList[Msg] = ReadyList()
    model: list[Msg] = []
    out: list[Msg] = []  # popped, may come back
    next_id = 1
    for op in ops:
        if op[0] == "new":
            assert isinstance(op[1], int)
            msg = Msg(next_id, op[1])
            next_id += 1
            ready.append(msg)
            model.append(msg)
        elif op[0] == "batch":
            assert isinstance(op[1], int)
            assert isinstance(op[2], int)
            batch = [Msg(next_id + i, op[1]) for i in range(op[2])]
            next_id += op[2]
            ready.extend(batch, op[1])
            model += batch
        elif op[0] == "popmany":
            assert isinstance(op[1], int)
            k = min(op[1], len(model))
            expected_ids = order(model)[:k]
            assert [m.id for m in ready][:k] == expected_ids
            ready.popleft_many(k)
            for msg in [m for m in model if m.id in expected_ids]:
                model.remove(msg)
                out.append(msg)
        elif op[0] == "pop" and model:
            expected = min(model, key=lambda m: (-m.priority, m.id))
            assert ready.head() is expected
            assert ready.popleft() is expected
            model.remove(expected)
            out.append(expected)
        elif op[0] == "back" and out:
            assert isinstance(op[1], int)
            msg = out.pop(op[1] % len(out))
            ready.insert(msg)
            model.append(msg)
        elif op[0] == "remove" and model:
            assert isinstance(op[1], int)
            msg = model.pop(op[1] % len(model))
            ready.remove(msg)  # never comes back, as with an expired message
        assert len(ready) == len(model)
        assert bool(ready) == bool(model)
        assert [m.id for m in ready] == order(model)
    while model:
        expected = min(model, key=lambda m: (-m.priority, m.id))
        assert ready.popleft() is expected
        model.remove(expected)
    assert not ready
    assert not ready._removed  # no id of a removed message is kept for ever


def test_a_message_back_in_the_middle_and_removals_at_the_back_of_a_long_queue() -> None:
    """The case bench/growth.py times (a deque walked for these took seconds
    on a million); here, that the order comes out right."""
    ready: ReadyList[Msg] = ReadyList()
    messages = [Msg(i, 0) for i in range(1, 20_001)]
    middle = messages[10_000]
    for msg in messages:
        if msg is not middle:
            ready.append(msg)
    ready.insert(middle)
    for msg in messages[-100:]:
        ready.remove(msg)
    assert len(ready) == 19_900
    assert [m.id for m in ready] == list(range(1, 19_901))
    assert [ready.popleft().id for _ in range(19_900)] == list(range(1, 19_901))
    assert not ready
