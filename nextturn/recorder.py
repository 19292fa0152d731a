"""The recorder: copies events from the event log into the store.

Order of operations, for each batch:
1. poll a batch (bad records are dead-lettered by the consumer's policy and reach the store through the
   ``dead-letters`` topic);
2. write the batch to the store in one transaction, idempotently by event id;
3. commit the offsets.
A crash before 3 redelivers the batch, and step 2 makes the second write a no-op: every event is stored
exactly once.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from nextturn import events
from nextturn.bus import EventLog
from nextturn.errors import CommitFailed
from nextturn.store import Store

GROUP = "recorder"
RECORDED_TOPICS = (events.TURNS, events.FEEDBACK, events.SIGNALS, events.ADAPTERS, events.DEPLOYMENTS,
                   events.DEAD_LETTERS)


@dataclass(frozen=True)
class Batch:
    polled: int  # events delivered (bad records are dead-lettered, not counted)
    new: int  # of those, events the store did not have yet


class Recorder:
    def __init__(self, log: EventLog, store: Store, *, group: str = GROUP, batch_size: int = 500) -> None:
        self._consumer = log.consumer(group, RECORDED_TOPICS)
        self._store = store
        self._batch_size = batch_size

    def run_once(self, timeout_s: float = 1.0) -> Batch:
        """Record one batch."""
        deliveries = self._consumer.poll(self._batch_size, timeout_s)
        new = self._store.apply([delivery.event for delivery in deliveries]) if deliveries else 0
        try:
            self._consumer.commit()
        except CommitFailed:
            pass  # the group moved on; the batch comes again to its new owner and is a no-op there
        return Batch(polled=len(deliveries), new=new)

    def drain(self, idle_s: float = 0.5) -> int:
        """Record until a poll waits ``idle_s`` for nothing; return how many events were new."""
        new = 0
        while (batch := self.run_once(idle_s)).polled:
            new += batch.new
        return new

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.run_once(timeout_s=0.5)

    def close(self) -> None:
        self._consumer.close()
