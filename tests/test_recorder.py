"""The recorder copies the log into the store exactly once, also when it dies between write and commit."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlmodel import func, select

from factories import turn
from nextturn import events, tables
from nextturn.bus import EventLog
from nextturn.recorder import GROUP, RECORDED_TOPICS, Recorder
from nextturn.store import Store, upgrade


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    upgrade(database_url)
    store = Store(database_url)
    yield store
    store.close()


def rows(store: Store, table: type) -> int:
    with store.session() as db:
        return int(db.exec(select(func.count()).select_from(table)).one())


def test_a_crash_between_write_and_commit_stores_nothing_twice(event_log: EventLog, store: Store) -> None:
    sent = [turn(f"s{n % 5}", n) for n in range(25)]
    event_log.append(sent)
    event_log.append_raw(events.TURNS, "s0", b"corrupt")

    # A recorder that wrote its batch durably and died before committing its offsets.
    doomed = event_log.consumer(GROUP, RECORDED_TOPICS)
    written = []
    while len(written) < 25:
        written.extend(doomed.poll(max_records=100, timeout_s=0.5))
    assert store.apply([d.event for d in written]) == 25
    doomed.close()

    # Its successor gets the same events again: the writes are no-ops, and then it commits. Both saw
    # the corrupt record, so it was dead-lettered twice, under one derived event id.
    recorder = Recorder(event_log, store)
    new = 0
    for _ in range(60):
        batch = recorder.run_once(timeout_s=0.5)
        new += batch.new
        if batch.polled == 0 and rows(store, tables.DeadLetter) == 1:
            break
    recorder.close()
    assert new == 1  # only the dead letter was new
    assert rows(store, tables.Turn) == 25
    assert rows(store, tables.Session) == 5

    # Everything was committed: another run finds nothing to do.
    again = Recorder(event_log, store)
    assert again.run_once(timeout_s=1.0).polled == 0
    again.close()
