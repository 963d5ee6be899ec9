"""The multi-queue wait (``get_any``, ``reserve_any``): first the core, with the
time passed in, then a real broker over its socket, spoken to frame by frame
(protocol.md 5.4a, 5.12a).

What must hold: the first queue in the list with a message answers; a
waiter on several queues stands in each queue's line by the moment it
parked, against the waiters of that one queue; it is served once, and then
(or cancelled, or gone with its connection) it is in no line at all; a
reserve_any's message is leased as a reserve's is, redelivered when the
lease runs out and brought back by the journal after a crash."""

from __future__ import annotations

import os
import signal
import socket
import threading
from typing import Any

import msgspec
import pytest
from conftest import gone, wait_until

import brokerq
from brokerq import protocol
from brokerq.broker.core import BrokerCore
from brokerq.broker.core.state import QUEUE_LEASE, Message
from brokerq.errors import InvalidRequest
from brokerq.protocol import FrameReader

# -- the core ------------------------------------------------------------------


@pytest.fixture
def core() -> BrokerCore:
    return BrokerCore(max_message_size=1000, default_lease=30.0)


def body_of(msg: Message | None) -> bytes | None:
    return None if msg is None else msg.body


def lease_end(core: BrokerCore, msg: Message | None) -> float | None:
    held = None if msg is None else core.lease_of(msg.id)
    return None if held is None else held.expires_at


def waiting(core: BrokerCore, name: str) -> int:
    return int(core.queue_stats(name, now=0)["waiters"])


def test_answered_from_the_first_queue_in_the_list_that_has_a_message(core: BrokerCore) -> None:
    core.put("b", b"b1", now=0)
    core.put("a", b"a1", now=0)
    assert body_of(core.take_any(["c", "a", "b"], now=0)) == b"a1"
    assert body_of(core.take_any(["b", "a"], now=0)) == b"b1"
    assert core.take_any(["a", "b"], now=0) is None


def test_a_waiter_on_one_queue_parked_first_is_served_first(core: BrokerCore) -> None:
    single = core.wait("b")
    multi = core.wait_any(["a", "b"])
    _, woken = core.put("b", b"1", now=0)
    assert woken is single
    _, woken = core.put("b", b"2", now=0)
    assert woken is multi
    assert [m.body for m in multi.messages] == [b"2"]


def test_a_waiter_on_several_queues_parked_first_is_served_first(core: BrokerCore) -> None:
    multi = core.wait_any(["a", "b"])
    single = core.wait("b")
    ids, woken = core.put_many("b", [b"1", b"2"], now=0)
    assert woken == [multi, single]
    assert [m.id for m in multi.messages] == ids[:1]
    assert [m.id for m in single.messages] == ids[1:]


def test_a_served_waiter_leaves_every_line_so_the_next_put_goes_elsewhere(
    core: BrokerCore,
) -> None:
    multi = core.wait_any(["a", "b"])
    later = core.wait("b")
    assert (waiting(core, "a"), waiting(core, "b")) == (1, 2)  # counted in each line
    _, woken = core.put("a", b"first", now=0)
    assert woken is multi
    assert (waiting(core, "a"), waiting(core, "b")) == (0, 1)
    _, woken = core.put("b", b"second", now=0)
    assert woken is later  # not handed to the multi-waiter a second time
    _, woken = core.put("b", b"third", now=0)
    assert woken is None
    assert [m.body for m in multi.messages] == [b"first"]
    assert [m.body for m in core.get_nowait("b")] == [b"third"]


def test_a_cancelled_waiter_leaves_every_line(core: BrokerCore) -> None:
    multi = core.wait_any(["a", "b", "c"])
    assert core.cancel_wait(multi, now=0) == []
    assert [waiting(core, name) for name in "abc"] == [0, 0, 0]
    core.put("c", b"x", now=0)
    assert multi.messages == []
    assert core.queue_stats("c", now=0)["ready"] == 1


def test_a_message_that_comes_back_serves_a_multi_waiter_once(core: BrokerCore) -> None:
    """Served from a lease that ran out (the handoff of a message made ready)."""
    core.put("b", b"job", now=0)
    core.reserve_nowait("b", now=0, lease=5)
    multi = core.wait_any(["a", "b"], lease=QUEUE_LEASE, owner="w")
    assert core.tick(now=5) == [multi]
    assert waiting(core, "a") == 0
    _, woken = core.put("a", b"next", now=5)
    assert woken is None


def test_reserve_any_leases_with_the_queue_of_the_message_unless_asked(
    core: BrokerCore,
) -> None:
    core.configure("b", lease=7.0)
    core.put("b", b"x", now=0)
    core.put("b", b"y", now=0)
    first = core.take_any(["a", "b"], now=0, lease=QUEUE_LEASE, owner="w")
    asked = core.take_any(["a", "b"], now=0, lease=2.0, owner="w")
    assert lease_end(core, first) == 7.0
    assert lease_end(core, asked) == 2.0
    multi = core.wait_any(["a", "b"], lease=QUEUE_LEASE, owner="w")
    core.put("b", b"z", now=1)
    (lease,) = multi.leases
    assert lease is not None
    assert lease.expires_at == 8.0


def test_a_multi_waiter_takes_its_turn_with_a_stream_and_is_served_once(
    core: BrokerCore,
) -> None:
    """A queue with a stream (consume) hands messages round the line after
    the put: the multi-waiter served there must leave its other queue too."""
    stream, _ = core.consume("b", 5, now=0)
    multi = core.wait_any(["a", "b"])
    _, woken = core.put_many("b", [b"1", b"2", b"3"], now=0)
    assert [m.body for m in multi.messages] == [b"2"]
    assert [m.body for m in stream.held] == [b"1", b"3"]
    assert woken.count(multi) == 1
    _, woken = core.put_many("a", [b"x"], now=0)
    assert woken == []
    assert core.queue_stats("a", now=0)["ready"] == 1


def test_a_reserve_any_lease_that_runs_out_redelivers(core: BrokerCore) -> None:
    core.put("b", b"job", now=0)
    msg = core.take_any(["a", "b"], now=0, lease=3.0, owner="w")
    assert msg is not None
    assert msg.attempts == 1
    core.tick(now=3)
    again = core.take_any(["a", "b"], now=3, lease=3.0, owner="v")
    assert again is msg
    assert again.attempts == 2


def test_reserve_any_is_journaled_as_a_reserve_and_comes_back_on_replay() -> None:
    records: list[Any] = []
    core = BrokerCore(max_message_size=1000, write=records.append)
    core.put("b", b"held", now=0)
    multi = core.wait_any(["a", "c"], lease=QUEUE_LEASE, owner="w")
    core.put("c", b"handed", now=0)
    assert core.take_any(["a", "b"], now=0, lease=QUEUE_LEASE, owner="w") is not None
    assert multi.served
    assert {type(r).__name__ for r in records} == {"PutRecord", "AttemptsRecord"}
    replayed = BrokerCore(max_message_size=1000)
    for record in records:
        replayed.apply(record)
    replayed.finish_replay(now=1)
    assert [(m.body, m.attempts) for m in replayed.get_nowait("b")] == [(b"held", 1)]
    assert [(m.body, m.attempts) for m in replayed.get_nowait("c")] == [(b"handed", 1)]


@pytest.mark.parametrize(
    "queues",
    [[], ["a", "a"], [""], ["a", 3], [f"q{i}" for i in range(65)], "ab"],
    ids=["none", "twice", "empty-name", "not-a-name", "65", "not-a-list"],
)
def test_a_bad_list_of_queues_is_invalid(core: BrokerCore, queues: Any) -> None:
    with pytest.raises(InvalidRequest):
        core.take_any(queues, now=0)
    with pytest.raises(InvalidRequest):
        core.wait_any(queues)
    assert core.queue_names() == []


def test_64_queues_and_the_brokers_own_names_are_valid(core: BrokerCore) -> None:
    names = [f"q{i}" for i in range(63)] + ["q0:dead"]
    waiter = core.wait_any(names)
    assert all(waiting(core, name) == 1 for name in names)
    core.cancel_wait(waiter, now=0)


# -- a real broker, over its socket -------------------------------------------


class Raw:
    """A bare connection that speaks frames by hand (no client has these ops yet)."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(20)
        self.sock.connect(path)
        self.reader = FrameReader(2**32)
        self.send({"op": "hello", "id": 1, "version": protocol.PROTOCOL_VERSION})
        assert isinstance(self.reply(), protocol.HelloReply)

    def send(self, frame: dict[str, Any]) -> None:
        payload = msgspec.msgpack.encode(frame)
        self.sock.sendall(protocol.HEADER.pack(len(payload)) + payload)

    def reply(self) -> protocol.AnyReply:
        while (payload := self.reader.next_frame()) is None:
            data = self.sock.recv(65536)
            assert data, "the broker closed the connection"
            self.reader.feed(data)
        return protocol.decode_reply(payload)

    def call(self, frame: dict[str, Any]) -> protocol.AnyReply:
        self.send(frame)
        reply = self.reply()
        assert reply.id == frame["id"]
        return reply

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw(socket_path: str, observer: brokerq.Client) -> Any:
    """A raw connection to the test's broker (spawned by ``observer``)."""
    conn = Raw(socket_path)
    yield conn
    conn.close()


def waiters_of(client: brokerq.Client, *names: str) -> list[int]:
    return [client.queue(name).stats()["waiters"] for name in names]


def test_get_any_names_the_queue_answered_at_once_or_after_waiting(
    raw: Raw, observer: brokerq.Client
) -> None:
    observer.queue("b").put(b"in b")
    reply = raw.call({"op": "get_any", "id": 2, "queues": ["a", "b"], "timeout": 0})
    assert isinstance(reply, protocol.GetAnyReply)
    assert (reply.queue, reply.body) == ("b", b"in b")
    raw.send({"op": "get_any", "id": 3, "queues": ["a", "b"], "timeout": 20})
    wait_until(lambda: waiters_of(observer, "a", "b") == [1, 1], what="the get_any to park")
    msg_id = observer.queue("a").put(b"in a")
    reply = raw.reply()
    assert isinstance(reply, protocol.GetAnyReply)
    assert (reply.id, reply.queue, reply.msg_id, reply.body) == (3, "a", msg_id, b"in a")
    assert waiters_of(observer, "a", "b") == [0, 0]
    observer.queue("b").put(b"stays")
    assert observer.queue("b").stats()["ready"] == 1


def test_a_waiter_on_one_queue_parked_first_gets_the_first_message(
    raw: Raw, observer: brokerq.Client, socket_path: str
) -> None:
    with brokerq.connect(socket_path) as other:
        got: list[bytes] = []
        thread = threading.Thread(target=lambda: got.append(other.queue("b").get(timeout=20)))
        thread.start()
        wait_until(lambda: waiters_of(observer, "b") == [1], what="the get to park")
        raw.send({"op": "get_any", "id": 2, "queues": ["a", "b"], "timeout": 20})
        wait_until(lambda: waiters_of(observer, "b") == [2], what="the get_any to park")
        observer.queue("b").put(b"one")
        observer.queue("b").put(b"two")
        thread.join(timeout=20)
        assert got == [b"one"]
        reply = raw.reply()
        assert isinstance(reply, protocol.GetAnyReply)
        assert (reply.queue, reply.body) == ("b", b"two")


def test_get_any_times_out_empty_and_leaves_every_line(raw: Raw, observer: brokerq.Client) -> None:
    reply = raw.call({"op": "get_any", "id": 2, "queues": ["a", "b"], "timeout": 0.2})
    assert isinstance(reply, protocol.Error)
    assert reply.code == "empty"
    assert waiters_of(observer, "a", "b") == [0, 0]
    observer.queue("a").put(b"x")
    assert observer.queue("a").stats()["ready"] == 1


def test_a_client_gone_while_waiting_on_several_queues_leaves_every_line(
    socket_path: str, observer: brokerq.Client
) -> None:
    for op in ("get_any", "reserve_any"):
        conn = Raw(socket_path)
        conn.send({"op": op, "id": 2, "queues": ["a", "b", "c"]})
        wait_until(lambda: waiters_of(observer, "a", "b", "c") == [1, 1, 1], what="it to park")
        conn.close()
        wait_until(lambda: waiters_of(observer, "a", "b", "c") == [0, 0, 0], what="it to leave")
    for name in "abc":
        observer.queue(name).put(name.encode())
    assert [observer.queue(name).stats()["ready"] for name in "abc"] == [1, 1, 1]


def test_a_parked_reserve_any_gets_its_lease_and_redelivery_when_it_runs_out(
    raw: Raw, observer: brokerq.Client
) -> None:
    raw.send({"op": "reserve_any", "id": 2, "queues": ["a", "b"], "lease": 0.5})
    wait_until(lambda: waiters_of(observer, "a", "b") == [1, 1], what="the reserve_any to park")
    msg_id = observer.queue("b").put(b"job")
    reply = raw.reply()
    assert isinstance(reply, protocol.ReserveAnyReply)
    assert (reply.queue, reply.msg_id, reply.attempt) == ("b", msg_id, 1)
    assert 0 < reply.lease <= 0.5
    assert waiters_of(observer, "a", "b") == [0, 0]
    # Not acked: the lease runs out and the message is delivered again.
    again = raw.call({"op": "reserve_any", "id": 3, "queues": ["b", "a"], "timeout": 20})
    assert isinstance(again, protocol.ReserveAnyReply)
    assert (again.queue, again.msg_id, again.attempt) == ("b", msg_id, 2)
    assert again.lease > 1  # the queue's lease (the broker's default), not the first one's
    assert isinstance(
        raw.call({"op": "ack", "id": 4, "msg_id": msg_id, "attempt": 2}), protocol.AckReply
    )
    assert observer.queue("b").stats()["ready"] == 0


def test_a_reserve_any_not_acked_survives_a_broker_crash_with_a_data_dir(
    socket_path: str, sock_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BROKERQ_DATA_DIR", os.path.join(sock_dir, "data"))
    with brokerq.connect(socket_path) as client:
        client.queue("b").put(b"precious")
        conn = Raw(socket_path)
        reply = conn.call({"op": "reserve_any", "id": 2, "queues": ["a", "b"], "lease": 60})
        assert isinstance(reply, protocol.ReserveAnyReply)
        assert reply.body == b"precious"
        assert client.queue("b").stats()["reserved"] == 1
        pid = client.broker_pid
        os.kill(pid, signal.SIGKILL)  # the lease still held: only the journal knows
        wait_until(lambda: gone(pid), what=f"broker {pid} to die")
        conn.close()
    with brokerq.connect(socket_path) as client:
        assert client.broker_pid != pid
        msg = client.queue("b").reserve(timeout=5)
        assert (msg.body, msg.attempt) == (b"precious", 2)
        msg.ack()


def test_a_stopping_broker_answers_a_waiter_on_several_queues_once(
    raw: Raw, observer: brokerq.Client
) -> None:
    raw.send({"op": "get_any", "id": 2, "queues": ["a", "b"]})
    wait_until(lambda: waiters_of(observer, "a", "b") == [1, 1], what="the get_any to park")
    observer.stop()
    reply = raw.reply()
    assert isinstance(reply, protocol.Error)
    assert (reply.id, reply.code) == (2, "shutting_down")
    data = b""
    while chunk := raw.sock.recv(65536):
        data += chunk
    assert data == b""  # nothing more: one answer, then the connection closed


@pytest.mark.parametrize(
    "fields",
    [
        {"queues": []},
        {"queues": ["a", "a"]},
        {"queues": ["a", ""]},
        {"queues": [f"q{i}" for i in range(65)]},
        {"queues": ["a"], "timeout": -1},
        {"queues": ["a"], "lease": 0},
    ],
    ids=["none", "twice", "empty-name", "65", "negative-timeout", "zero-lease"],
)
def test_a_bad_request_is_refused_invalid_and_the_connection_serves_on(
    raw: Raw, observer: brokerq.Client, fields: dict[str, Any]
) -> None:
    op = "reserve_any" if "lease" in fields else "get_any"
    reply = raw.call({"op": op, "id": 2, **fields})
    assert isinstance(reply, protocol.Error)
    assert reply.code == "invalid", reply.message
    observer.queue("a").put(b"still here")
    reply = raw.call({"op": "get_any", "id": 3, "queues": ["a"], "timeout": 5})
    assert isinstance(reply, protocol.GetAnyReply)
    assert reply.body == b"still here"
