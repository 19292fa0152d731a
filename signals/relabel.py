"""Relabel (``nextturn signals relabel --since …``): score stored turns again with this extractor version.

A new extractor version (better rules, a new judge prompt) gives new signal ids, so its signals sit beside
the old ones; the trainer reads the version it is told to. For each stored turn with a response since a
time, relabel builds the case from the store (the turn, its first next request, its feedback) and writes a
revision when the case says more than the latest revision of this version's signal. A second run finds
nothing new: it is idempotent. A turn with no next request that is not yet idle stays open (scored now only
if it has feedback); the worker closes it when its session goes quiet. The writes go through the worker's
casebook and outbox, under the same session locks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select

from nextturn import tables
from nextturn.bus import EventLog
from nextturn.errors import EventLogUnavailable
from nextturn.events import SignalExtracted
from nextturn.store import Store
from signals import cases as c
from signals.casebook import Casebook

_TURNS = tables.table_of(tables.Turn)


@dataclass(frozen=True)
class Relabeled:
    turns: int  # stored turns looked at
    written: int  # new signal revisions
    open: int  # still waiting for what happens next: the worker closes them when their session goes quiet


def relabel(store: Store, event_log: EventLog, since: datetime, *, idle_timeout_s: float,
            batch_size: int = 500) -> Relabeled:
    casebook = Casebook(store)
    seen = written = still_open = 0
    after: tuple[datetime, str] | None = None
    idle_before = time.time() - idle_timeout_s
    try:
        while True:
            with casebook.reading() as conn:
                query = (select(_TURNS.c.id, _TURNS.c.session_id, _TURNS.c.started_at)
                         .where(_TURNS.c.started_at >= since, _TURNS.c.response.is_not(None))
                         .order_by(_TURNS.c.started_at, _TURNS.c.id).limit(batch_size))
                if after is not None:
                    query = query.where((_TURNS.c.started_at > after[0])
                                        | ((_TURNS.c.started_at == after[0]) & (_TURNS.c.id > after[1])))
                page = conn.execute(query).all()
            if not page:
                break
            after = (page[-1].started_at, page[-1].id)
            seen += len(page)
            ids = [row.id for row in page]
            started = {row.id: _timestamp(row.started_at) for row in page}
            with casebook.transaction({row.session_id for row in page}) as conn:
                found = casebook.load(conn, ids)
                stored = casebook.stored_turns(conn, set(ids) - set(found), {})
                changed: dict[str, c.Case] = {}
                for turn_id in ids:
                    case = found.get(turn_id) or stored[turn_id].case
                    if case.state == "open" and started[turn_id] < idle_before:
                        c.close_idle(case)
                    still_open += case.state == "open"
                    changed[turn_id] = case
                signals = casebook.revise(conn, changed, dict(changed))
                casebook.save(conn, list(changed.values()), time.time())
                casebook.write_signals(conn, signals)
            written += len(signals)
            _publish(casebook, event_log, signals)
    finally:
        casebook.engine.dispose()
    return Relabeled(turns=seen, written=written, open=still_open)


def _timestamp(moment: datetime) -> float:
    # SQLite hands back naive datetimes; the store writes UTC.
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def _publish(casebook: Casebook, event_log: EventLog, signals: list[SignalExtracted]) -> None:
    if not signals:
        return
    try:
        event_log.append(signals)
    except EventLogUnavailable:
        return  # they stay in the outbox; the signals worker publishes them when it next starts
    casebook.mark_published([signal.event_id for signal in signals])
