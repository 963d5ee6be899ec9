"""Buried messages on NATS (brokerq.nats.burial): bury and kick, with a
client SIGKILLed between the steps of each, by pid, at the point named.

A helper process runs the verb with the step after that point stalled
(the stall is the helper's own patch of nats-py, chosen by ``STALL_AT``:
no library code knows of it); it writes ``stalled`` and the test kills it
(or, given ``GO_ON_WHEN``, lets it go on once that file exists).
"""

from __future__ import annotations

import os
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from conftest import Procs, read_line
from extras import require
from nats_fixtures import clean_client, kill_once_it_says, module_server  # noqa: F401
from nats_server import NatsServer

import brokerq

require("nats", "nats")
import brokerq.nats  # noqa: E402
from brokerq.nats import naming  # noqa: E402

HELPER = textwrap.dedent(
    """
    import asyncio, os, sys
    import brokerq
    from nats.aio.msg import Msg
    from nats.js.manager import JetStreamManager

    url, queue, verb = sys.argv[1:4]
    stall_at = os.environ["STALL_AT"]
    go_on_when = os.environ.get("GO_ON_WHEN")

    async def stall():
        os.write(1, b"stalled\\n")
        for _ in range(36000):
            if go_on_when and os.path.exists(go_on_when):
                return
            await asyncio.sleep(0.1)

    async def ack_sync(self, *args, **kwargs):
        await stall()  # bury: the copy is published, the ack never sent

    real_delete = JetStreamManager.delete_msg

    async def delete_msg(self, stream, seq):
        if stall_at == "before-copy-delete" and stream.startswith("BB_"):
            await stall()  # kick: put back, the buried copy not deleted
        done = await real_delete(self, stream, seq)
        if stall_at == "after-original-delete" and stream.startswith("BQ_"):
            await stall()  # kick: the original deleted, the copy not put back
        return done

    real_get = JetStreamManager.get_msg

    async def get_msg(self, stream, *args, **kwargs):
        if stall_at == "before-lookup" and stream.startswith("BB_"):
            await stall()  # a redelivery fetched, its buried copy not looked up yet
        return await real_get(self, stream, *args, **kwargs)

    real_delete_stream = JetStreamManager.delete_stream

    async def delete_stream(self, name):
        if stall_at == "before-buried-delete" and name.startswith("BB_"):
            await stall()  # delete: the queue stream gone, the buried one not yet
        return await real_delete_stream(self, name)

    if stall_at == "before-ack":
        Msg.ack_sync = ack_sync
    JetStreamManager.delete_msg = delete_msg
    JetStreamManager.delete_stream = delete_stream
    JetStreamManager.get_msg = get_msg
    with brokerq.connect(url) as client:
        q = client.queue(queue)
        if verb == "bury":
            q.reserve(timeout=10).bury()
        elif verb == "delete":
            q.delete()
        elif verb == "reserve":
            msg = q.reserve(timeout=10)
            os.write(1, b"got %d %d\\n" % (msg.id, msg.attempt))
            msg.ack()
        else:
            q.kick()
    """
)


def kill_at(procs: Procs, url: str, queue: str, verb: str, stall_at: str) -> None:
    """Run ``verb`` (bury, kick or delete) on ``queue`` in a process of its own, and
    SIGKILL it by pid once it stalls at ``stall_at``."""
    args = [sys.executable, "-c", HELPER, url, queue, verb]
    kill_once_it_says(procs, args, b"stalled\n", env={**os.environ, "STALL_AT": stall_at})


def counts(q: brokerq.nats.NatsQueue) -> tuple[int, int, int]:
    stats = q.stats()
    return stats["ready"], stats["reserved"], stats["buried"]


def got_once(q: brokerq.nats.NatsQueue, quiet: float) -> None:
    """``q`` gives ``x``, then nothing more for ``quiet`` seconds."""
    assert q.get(timeout=5) == b"x"
    with pytest.raises(brokerq.Empty):
        q.get(timeout=quiet)


def test_a_client_dying_between_copy_and_ack_buries_it_once(
    client: brokerq.nats.NatsClient, server: NatsServer, procs: Procs
) -> None:
    """The copy made, the ack never sent: the original comes back after its
    lease, and its redelivery is acked, not delivered: buried once."""
    q = client.queue("dies-burying", lease=1.0)
    q.put(b"x")
    kill_at(procs, server.url, "dies-burying", "bury", "before-ack")
    assert q.stats()["buried"] == 1
    with pytest.raises(brokerq.Empty):
        q.get(timeout=2.5)  # the redelivery (after 1 s) finishes the bury
    assert counts(q) == (0, 0, 1)
    assert q.kick(5) == 1
    got_once(q, quiet=1.5)


def test_a_kick_before_the_redelivery_takes_the_original_out(
    client: brokerq.nats.NatsClient, server: NatsServer, procs: Procs
) -> None:
    """A bury cut before its ack, kicked before its lease ran out: the kick
    deletes the original, so it does not come back beside its kicked copy."""
    q = client.queue("kicked-early", lease=2.0)
    q.put(b"x")
    kill_at(procs, server.url, "kicked-early", "bury", "before-ack")
    assert q.kick() == 1
    got_once(q, quiet=3)  # past the dead client's lease: nothing comes back
    assert counts(q) == (0, 0, 0)


def test_a_redelivery_judged_after_a_kick_is_not_delivered_beside_the_kicked_copy(
    client: brokerq.nats.NatsClient, server: NatsServer, procs: Procs, tmp_path: Path
) -> None:
    """A bury cut before its ack; its redelivery fetched by a consumer, and
    a whole kick made before that consumer looks the copy up: it finds no
    copy, and no original (the kick deleted it), so it drops the
    redelivery, and takes the kicked copy next. Delivered once."""
    q = client.queue("race", lease=1.0)
    q.put(b"x")
    kill_at(procs, server.url, "race", "bury", "before-ack")
    go_on = tmp_path / "go-on"
    consumer = procs(
        [sys.executable, "-c", HELPER, server.url, "race", "reserve"],
        env={**os.environ, "STALL_AT": "before-lookup", "GO_ON_WHEN": str(go_on)},
    )
    # (it stalls on the redelivery, once the dead client's lease has run out)
    assert read_line(consumer, timeout=20) == b"stalled\n"
    assert q.kick() == 1  # the original deleted, the copy put back as message 2
    go_on.touch()
    assert read_line(consumer, timeout=20) == b"got 2 1\n"  # the kicked copy, not the original
    assert consumer.wait(10) == 0
    with pytest.raises(brokerq.Empty):
        q.get(timeout=1.5)


def test_a_kicker_dying_before_deleting_the_copy_puts_it_back_once(
    client: brokerq.nats.NatsClient, server: NatsServer, procs: Procs
) -> None:
    """Put back, its buried copy not deleted: the next kick (within the
    duplicate window) puts it again under the same id, dropped, and deletes it."""
    q = client.queue("dies-kicking")
    q.put(b"x")
    q.reserve(timeout=5).bury()
    kill_at(procs, server.url, "dies-kicking", "kick", "before-copy-delete")
    assert counts(q) == (1, 0, 1)
    assert q.kick() == 1
    assert counts(q) == (1, 0, 0)
    got_once(q, quiet=0.5)


def test_a_kicker_dying_after_deleting_the_original_leaves_it_buried(
    client: brokerq.nats.NatsClient, server: NatsServer, procs: Procs
) -> None:
    """A bury cut before its ack, then a kick cut after it deleted the
    original: the copy is still buried, and the next kick puts it back."""
    q = client.queue("dies-dropping", lease=2.0)
    q.put(b"x")
    kill_at(procs, server.url, "dies-dropping", "bury", "before-ack")
    kill_at(procs, server.url, "dies-dropping", "kick", "after-original-delete")
    assert counts(q) == (0, 0, 1)
    with pytest.raises(brokerq.Empty):
        q.get(timeout=2.5)  # past the lease: the original is gone
    assert q.kick() == 1
    got_once(q, quiet=0.5)


def test_a_kicker_of_dead_letters_dying_mid_bury_moves_each_once(
    client: brokerq.nats.NatsClient, server: NatsServer, procs: Procs
) -> None:
    """A kick on ``q:dead`` buries a ready dead letter, then kicks it: cut
    between that bury's copy and its ack, the next kick moves it once."""
    q = client.queue("deadkick", max_deliveries=1)
    dead = client.queue("deadkick:dead", lease=2.0)
    q.put(b"x")
    q.reserve(timeout=5).release()
    with pytest.raises(brokerq.Empty):
        q.get(timeout=0.5)  # (the fetch that moves it to its dead letters)
    kill_at(procs, server.url, "deadkick:dead", "kick", "before-ack")
    assert counts(dead) == (0, 1, 1)  # the original still leased, its copy buried
    assert dead.kick(5) == 1
    assert q.get(timeout=5) == b"x"
    with pytest.raises(brokerq.Empty):
        dead.get(timeout=2.5)  # past the lease: the original is gone
    with pytest.raises(brokerq.Empty):
        q.get(timeout=0.5)


def test_two_clients_kicking_at_once_move_each_message_once(
    client: brokerq.nats.NatsClient, server: NatsServer
) -> None:
    q = client.queue("kickers")
    bodies = [b"m%d" % i for i in range(8)]
    q.put_many(bodies)
    for _ in bodies:
        q.reserve(timeout=5).bury()
    moved: list[int] = []

    def kicker() -> None:
        with brokerq.nats.connect(server.url) as own:
            moved.append(own.queue("kickers").kick(5))

    threads = [threading.Thread(target=kicker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sum(moved) == 8  # (5 and 3, in some order, however they raced)
    assert sorted(q.get_many(20, timeout=5)) == bodies
    assert counts(q) == (0, 0, 0)


def test_a_delete_cut_between_its_streams_mistakes_no_new_message_for_buried(
    client: brokerq.nats.NatsClient, server: NatsServer, procs: Procs
) -> None:
    """A queue made again starts its sequences at 1: a buried copy left by
    a delete cut between its two streams names sequence 1 too, and must not
    make the new message 1 vanish as buried; the next delete removes it."""
    q = client.queue("reused")
    q.put(b"old")
    q.reserve(timeout=5).bury()
    kill_at(procs, server.url, "reused", "delete", "before-buried-delete")
    assert q.put(b"new") == 1
    q.reserve(timeout=5).release()
    again = q.reserve(timeout=5)  # a redelivery of sequence 1
    assert (again.body, again.attempt) == (b"new", 2)
    again.release()
    assert q.stats()["buried"] == 1  # the old copy, left by the cut delete
    assert q.delete() == 2
    assert client.queues() == []


def test_buried_messages_keep_their_headers_but_not_their_delay(
    client: brokerq.nats.NatsClient,
) -> None:
    """A kicked message is a new message of the queue: attempt 1 again
    (on the local broker it keeps counting)."""
    q = client.queue("headers")
    q.put(b"x", delay=0.2, ttl=60)
    m = q.reserve(timeout=5)
    m.release()
    m = q.reserve(timeout=5)
    m.bury()
    assert q.kick() == 1
    again = q.reserve(timeout=5)
    assert (again.body, again.attempt) == (b"x", 1)
    again.release()
    assert q.reserve(timeout=5).attempt == 2


def test_a_kick_into_a_full_queue_moves_what_fits(client: brokerq.nats.NatsClient) -> None:
    """JetStream refuses a put to a full stream (the local broker's kick
    ignores the limits): the kick returns what it moved, Full if none."""
    q = client.queue("full", maxsize=2)
    q.put_many([b"a", b"b"])
    for _ in range(2):
        q.reserve(timeout=5).bury()
    q.put(b"c")
    assert q.kick(5) == 1
    with pytest.raises(brokerq.Full):
        q.kick(5)
    assert counts(q) == (2, 0, 1)
    assert q.get_many(5, timeout=5) == [b"c", b"a"]
    dead = client.queue("full:dead")
    assert dead.kick(5) == 0  # (nothing dead: and no dead-letter stream made for it)
    assert client.queues() == ["full"]
    assert q.kick(5) == 1
    assert q.get(timeout=5) == b"b"


def test_a_kick_of_dead_letters_into_a_full_queue_leaves_them_buried_first(
    client: brokerq.nats.NatsClient,
) -> None:
    q = client.queue("fulldead", maxsize=1, max_deliveries=1)
    q.put(b"a")
    q.reserve(timeout=5).release()
    with pytest.raises(brokerq.Empty):
        q.get(timeout=0.5)  # (the fetch that moves it to its dead letters)
    q.put(b"b")
    dead = client.queue("fulldead:dead")
    with pytest.raises(brokerq.Full):
        dead.kick(5)
    assert counts(dead) == (0, 0, 1)  # buried on the way: the first to go next time
    assert q.get(timeout=5) == b"b"
    assert dead.kick(5) == 1
    assert q.get(timeout=5) == b"a"


def test_buried_streams_are_not_queues(client: brokerq.nats.NatsClient) -> None:
    q = client.queue("listed")
    q.put(b"x")
    q.reserve(timeout=5).bury()
    assert client.queues() == ["listed"]
    assert client.stats()["queues"] == 1
    assert q.delete() == 1
    assert client.queues() == []
    assert q.kick() == 0
    assert client.queues() == []  # a kick of nothing makes nothing


def test_on_a_cluster_the_buried_stream_has_the_queues_replicas() -> None:
    """A buried message survives a node's loss as its queue's messages do."""
    from nats_cluster import ELECTION, Cluster

    with Cluster() as cluster, brokerq.connect(cluster.url + "?replicas=3", ELECTION) as client:
        q = client.queue("r3buried")
        q.put(b"x")
        q.reserve(timeout=10).bury()
        buried = naming.buried_stream_name("r3buried")
        assert cluster.stream_replicas(buried) == 3
        assert q.kick() == 1
        assert q.get(timeout=10) == b"x"
        # A redelivery is looked up among the buried copies (was it buried by a
        # client that died before its ack?), asked again through their stream's election.
        q.configure(lease=3)  # (a release lost in the election comes back after this)
        q.put(b"y")
        q.reserve(timeout=10, lease=1)  # not acked: released when its lease runs out
        cluster.kill_leader(buried)
        assert q.get(timeout=ELECTION) == b"y"
