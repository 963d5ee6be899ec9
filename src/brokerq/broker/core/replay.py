"""Recovery: replay gathers each live message's last known state, then builds
the queues in id order; a snapshot is the fewest records that replay to now."""

from __future__ import annotations

import math

from .base import LIVE_OVERHEAD, CoreBase, config_record_of, put_record_of
from .records import (
    AnyRecord,
    AttemptsRecord,
    ConfigRecord,
    DeleteRecord,
    DropQueueRecord,
    KeysRecord,
    MoveRecord,
    NextIdRecord,
    PutRecord,
    StateRecord,
    SubscribeRecord,
    UnfinishedRecord,
)
from .state import Expiry, Message


class Replay(CoreBase):
    def apply(self, record: AnyRecord) -> None:
        live = self._replayed = self._replayed or {}  # (None while not replaying)
        match record:
            case PutRecord(queue=queue, ids=ids, bodies=bodies, at=at, keys=keys):
                taken = set(record.taken or ())
                leased = set(record.leased or ())
                if not record.returned:
                    self._replay_tasks(queue, len(ids))
                if keys:
                    self._remember_keys(zip(keys, ids, strict=True))
                self._next_id = max(self._next_id, max(ids, default=0) + 1)
                for msg_id, body in zip(ids, bodies, strict=True):
                    if msg_id in taken:
                        continue
                    msg = Message(
                        msg_id,
                        queue,
                        body,
                        at,
                        record.attempts + (msg_id in leased),
                        priority=record.priority,
                        expires_at=record.expires_at or math.inf,
                    )
                    delayed = bool(record.not_before)
                    live[msg_id] = (msg, "delayed" if delayed else "ready", record.not_before)
            case DeleteRecord(ids=ids, got=got):
                for msg_id in ids:
                    entry = live.pop(msg_id, None)
                    if entry is not None and not got and entry[1] != "buried":
                        self._replay_tasks(entry[0].queue, -1)  # (read before it went)
            case AttemptsRecord(id=msg_id, attempts=attempts) if msg_id in live:
                live[msg_id][0].attempts = attempts
            case StateRecord(id=msg_id, state=state, until=until) if msg_id in live:
                msg, before, _ = live[msg_id]
                if (before == "buried") != (state == "buried"):  # buried, or kicked
                    self._replay_tasks(msg.queue, 1 if before == "buried" else -1)
                live[msg_id] = (msg, state, until)
            case MoveRecord(id=msg_id, queue=queue, attempts=attempts) if msg_id in live:
                msg, before, _ = live[msg_id]
                if before != "buried":
                    self._replay_tasks(msg.queue, -1)
                self._replay_tasks(queue, 1)
                msg.queue, msg.attempts = queue, attempts
                live[msg_id] = (msg, "ready", 0)
            case UnfinishedRecord(queue=queue, count=count):
                self._replayed_tasks[queue] = count
            case ConfigRecord():
                self._configure(record)
            case DropQueueRecord(queue=queue):
                self._queues.pop(queue, None)
                self._replayed_tasks.pop(queue, None)
                self.topics.remove_everywhere(queue)
            case SubscribeRecord(topic=topic, queue=queue, on=on):
                if on:
                    self.topics.add(topic, queue)
                else:
                    self.topics.remove(topic, queue)
            case KeysRecord(keys=keys, ids=ids):
                self._remember_keys(zip(keys, ids, strict=True))
            case NextIdRecord(next_id=next_id):
                self._next_id = max(self._next_id, next_id)

    def _replay_tasks(self, queue: str, change: int) -> None:
        """Clamped at 0, as :meth:`_finished` does."""
        tasks = self._replayed_tasks
        tasks[queue] = max(0, tasks.get(queue, 0) + change)

    def finish_replay(self, now: float) -> int:
        """Build the queues from the replayed records; returns how many messages
        came back (the reserved ones ready again). Those whose ttl ran out are
        dropped by a record owed ahead of this broker's first, so that every
        later replay counts the tasks they took with them at this point too."""
        live, self._replayed = self._replayed or {}, None
        restored = 0
        dropped: list[int] = []
        for msg_id in sorted(live):
            msg, state, until = live[msg_id]
            q = self._queue(msg.queue)
            if msg.expires_at <= now and state != "buried":
                dropped.append(msg_id)  # its ttl ran out while no broker ran
                self._replay_tasks(msg.queue, -1)
                continue
            restored += 1
            if msg.expires_at < math.inf:
                self._add_timer(msg.expires_at, Expiry(msg))
            q.bytes += len(msg.body)
            self.live_bytes += len(msg.body) + LIVE_OVERHEAD
            if state == "buried":
                q.buried[msg_id] = msg
            elif state == "delayed" and until > now:
                self._delay(q, msg, until)
            else:
                q.ready.append(msg)
        if dropped:
            self._owed.append(DeleteRecord(ids=dropped))
        tasks, self._replayed_tasks = self._replayed_tasks, {}
        for name, count in tasks.items():
            if count:
                self._queue(name).unfinished = count
        return restored

    def snapshot(self) -> list[AnyRecord]:
        records: list[AnyRecord] = [NextIdRecord(next_id=self._next_id)]
        elsewhere: dict[str, list[Message]] = {}  # (prefetched: ready to the journal)
        for msg in self._off_the_lists():
            elsewhere.setdefault(msg.queue, []).append(msg)
        for q in self._queues.values():
            if q.max_deliveries is not None or q.lease is not None or q.maxsize or q.max_bytes:
                records.append(config_record_of(q))
            held = [*q.ready, *q.buried.values(), *elsewhere.get(q.name, ())]
            records += [put_record_of(msg) for msg in held]
            records += [StateRecord(id=msg_id, state="buried") for msg_id in q.buried]
            if q.unfinished or q.held > len(q.buried):
                # After the puts above, which count a task each (but buried): the count as it is.
                records.append(UnfinishedRecord(queue=q.name, count=q.unfinished))
        records += [
            StateRecord(id=msg.id, state="delayed", until=until)
            for msg, until in self._delayed.values()
        ]
        records += [SubscribeRecord(topic=t, queue=q) for t, q in self.topics.subscriptions()]
        if self._keys:
            order = list(self._key_order)
            records.append(KeysRecord(keys=order, ids=[self._keys[k] for k in order]))
        return records
