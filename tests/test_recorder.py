"""The recorder copies the log into the store exactly once: also when it dies between write and commit, and
when the store is down for a while."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

from nextturn import events, tables
from nextturn.bus import EventLog
from nextturn.errors import StoreUnavailable
from nextturn.recorder import GROUP, RECORDED_TOPICS, Recorder
from nextturn.store import Store, upgrade

from support.event_logs import poll_until
from support.eventually import eventually
from support.factories import turn


def test_a_crash_between_write_and_commit_stores_nothing_twice(event_log: EventLog, store: Store) -> None:
    sent = [turn(f"s{n % 5}", n) for n in range(25)]
    event_log.append(sent)
    event_log.append_raw(events.TURNS, "s0", b"corrupt")  # dead-lettered: 26 events to record in all

    # A recorder that wrote what it polled durably and died before committing its offsets.
    doomed = event_log.consumer(GROUP, RECORDED_TOPICS)
    written = poll_until(doomed, 25)
    written_by_doomed = store.apply([d.event for d in written])
    assert written_by_doomed == len(written)
    doomed.close()

    # Its successor gets the same events again: what was written is a no-op, the rest is new. Both
    # saw the corrupt record, so it was dead-lettered twice, under one derived event id.
    recorder = Recorder(event_log, store)
    written_by_successor, polled = 0, 0

    def caught_up() -> bool:
        nonlocal written_by_successor, polled
        batch = recorder.run_once(timeout_s=0.5)
        written_by_successor += batch.new
        polled += batch.polled
        return batch.polled == 0 and store.count(tables.Turn) == 25 and store.count(tables.DeadLetter) == 1

    eventually(caught_up, "the successor to record everything", timeout_s=60, interval_s=0)
    recorder.close()
    assert (store.count(tables.Turn), store.count(tables.DeadLetter), polled) >= (25, 1, 25), "stalled"
    assert written_by_doomed + written_by_successor == 26
    assert store.count(tables.Session) == 5

    # Everything was committed: another run finds nothing to do.
    again = Recorder(event_log, store)
    assert again.run_once(timeout_s=1.0).polled == 0
    again.close()


class _DownForAWhile(Store):
    """A real SQLite store whose first writes fail the way an unreachable database's do."""

    failures = 3

    def apply(self, batch: Sequence[events.Event]) -> int:
        if self.failures:
            self.failures -= 1
            raise StoreUnavailable("cannot write to the store: connection refused")
        return super().apply(batch)


def test_a_store_that_is_down_for_a_while_pauses_the_recorder_and_nothing_is_lost(
    event_log: EventLog, tmp_path: Path
) -> None:
    """It once ended the gateway's recorder for good: /healthz said so, and nothing was stored after."""
    url = f"sqlite:///{tmp_path / 'nextturn.db'}"
    upgrade(url)
    store = _DownForAWhile(url)
    event_log.append([turn(f"s{n % 3}", n) for n in range(12)])
    recorder = Recorder(event_log, store)
    stop = threading.Event()
    running = threading.Thread(target=recorder.run, args=(stop,), kwargs={"pause_s": (0.05, 0.2)})
    running.start()
    try:
        eventually(lambda: store.count(tables.Turn) == 12, "every turn stored once the store is back")
        assert running.is_alive() and store.failures == 0
    finally:
        stop.set()
        running.join()
        recorder.close()
        store.close()
