"""The recorder copies the log into the store exactly once, also when it dies between write and commit."""

from __future__ import annotations

from nextturn import events, tables
from nextturn.bus import EventLog
from nextturn.recorder import GROUP, RECORDED_TOPICS, Recorder
from nextturn.store import Store

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
