"""The casebook: the signals worker's cases (:mod:`signals.cases`) and its signal outbox, in the store.

Everything the worker writes for a batch happens in one :meth:`Casebook.transaction`, which holds the lock
of every session the batch touches: on SQLite the database's write lock (``BEGIN IMMEDIATE``), on Postgres
transaction-scoped advisory locks, one per bucket of sessions. Two workers (or a worker and a leftover one
the group already replaced, or a relabel) never interleave their read-modify-write of one case.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Row, bindparam, delete, func, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError

from nextturn import events, tables
from nextturn.errors import StoreUnavailable
from nextturn.events import ChatMessage, SignalExtracted, Verdict
from nextturn.store import Store, create_db_engine
from signals.cases import (
    EXTRACTOR_VERSION,
    Case,
    add_feedback,
    called_tools,
    close_with_next,
    exchange_decides,
    inherit,
    open_turn,
    revise,
    signal_id,
)

_CASES = tables.table_of(tables.SignalCase)
_SIGNALS = tables.table_of(tables.Signal)
_TURNS = tables.table_of(tables.Turn)
_FEEDBACK = tables.table_of(tables.Feedback)
_LOCK_BASE = 0x6E74_0000  # advisory lock keys: this base plus a bucket of sessions
_LOCK_BUCKETS = 1024
MAX_TOOL_ROUNDS = 64  # how far back an exchange's outcome is handed down: tool-call turns in a row


@dataclass(frozen=True)
class StoredTurn:
    """A turn read back from the store, for a case the worker has no file on (it predates the worker, or its
    file expired)."""

    case: Case
    messages: list[ChatMessage]


class Casebook:
    def __init__(self, store: Store) -> None:
        self._store = store
        self.engine = create_db_engine(store.url, immediate=True, pool=store.pool)
        self._postgres = self.engine.dialect.name == "postgresql"
        self._dialect = postgresql if self._postgres else sqlite

    @contextmanager
    def transaction(self, sessions: Iterable[str]) -> Iterator[Connection]:
        try:
            with self.engine.begin() as conn:
                if self._postgres:
                    buckets = sorted({zlib.crc32(session.encode()) % _LOCK_BUCKETS for session in sessions})
                    for bucket in buckets:  # one order everywhere: no deadlock
                        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_BASE + bucket})
                yield conn
        except SQLAlchemyError as exc:
            raise StoreUnavailable(f"the signals worker cannot use the store: {exc}") from exc

    @contextmanager
    def reading(self) -> Iterator[Connection]:
        try:
            with self._store.engine.connect() as conn:
                yield conn
        except SQLAlchemyError as exc:
            raise StoreUnavailable(f"the signals worker cannot read the store: {exc}") from exc

    # -- cases ----------------------------------------------------------------------------------------

    def load(self, conn: Connection, turn_ids: Iterable[str]) -> dict[str, Case]:
        ids = list(set(turn_ids))
        if not ids:
            return {}
        rows = conn.execute(select(_CASES.c.body).where(_CASES.c.turn_id.in_(ids))).scalars()
        cases = {case.turn_id: case for case in map(Case.model_validate_json, rows)}
        # A case last scored by another extractor version continues this version's signal (a new signal id).
        self._resume(conn, [case for case in cases.values() if case.extractor_version != EXTRACTOR_VERSION])
        return cases

    def save(self, conn: Connection, cases: Sequence[Case], now: float) -> None:
        if not cases:
            return
        statement = self._dialect.insert(tables.SignalCase)
        statement = statement.on_conflict_do_update(
            index_elements=["turn_id"],
            set_={"state": statement.excluded.state, "touched_at": statement.excluded.touched_at,
                  "body": statement.excluded.body},
        )
        conn.execute(statement, [{"turn_id": case.turn_id, "partition": case.partition,
                                  "session_id": case.session_id, "state": case.state,
                                  "opened_at": now, "touched_at": now, "body": case.model_dump_json()}
                                 for case in cases])

    def revise(self, conn: Connection, changed: dict[str, Case], known: dict[str, Case]) -> list[SignalExtracted]:
        """The new signal revisions of the changed cases: first of those that do not wait for an exchange, whose
        signals are then handed down (:meth:`hand_down`; the cases this changes join ``changed``), then of the
        tool-call turns, so that a call resolved with its exchange gets one revision, not two."""
        finals = revise(case for case in changed.values() if not exchange_decides(case))
        for case in self.hand_down(conn, [(changed[signal.turn_id], signal) for signal in finals], known):
            changed[case.turn_id] = case
        return finals + revise(case for case in changed.values() if exchange_decides(case))

    def hand_down(self, conn: Connection, finals: Sequence[tuple[Case, SignalExtracted]],
                  known: dict[str, Case]) -> list[Case]:
        """Each new signal of a final answer (a turn that called no tool) handed down to the tool-call turns
        right before it in its session (:func:`signals.cases.inherit`); returns the cases that changed.
        ``known``: cases already loaded in this transaction (used, and added to). Only turns whose request
        carries tool results lead up the session, so an ordinary chat turn costs no read."""
        frontier = {case.parent_turn_id: signal for case, signal in finals
                    if case.parent_turn_id is not None and case.after_tools and not called_tools(case)}
        changed: list[Case] = []
        for _ in range(MAX_TOOL_ROUNDS):
            if not frontier:
                break
            known.update(self.load(conn, set(frontier) - set(known)))
            above: dict[str, SignalExtracted] = {}
            for turn_id, final in frontier.items():
                case = known.get(turn_id)
                if case is None or not called_tools(case):
                    continue  # the exchange started here (or the case is gone)
                if inherit(case, final):
                    changed.append(case)
                if case.parent_turn_id is not None and case.after_tools:
                    above[case.parent_turn_id] = final
            frontier = above
        return changed

    def stored_turns(self, conn: Connection, turn_ids: Iterable[str], partition_of: dict[str, int]) -> dict[
            str, StoredTurn]:
        """Cases rebuilt from the store (the turn, its first next request, its feedback) for turns that have
        none; each continues from the latest revision its signal has."""
        ids = list(set(turn_ids))
        if not ids:
            return {}
        found: dict[str, StoredTurn] = {}
        for row in conn.execute(select(_TURNS).where(_TURNS.c.id.in_(ids))):
            turn = turn_event(row)
            case = Case(turn_id=row.id, session_id=row.session_id, tenant=row.tenant,
                        partition=partition_of.get(row.id, -1))
            open_turn(case, turn)
            found[row.id] = StoredTurn(case, turn.messages)
        for turn_id, child in self.children(conn, found).items():
            close_with_next(found[turn_id].case, child)
        for item in self.feedback(conn, found):
            add_feedback(found[item.turn_id].case, item)
        self._resume(conn, [stored.case for stored in found.values()])
        return found

    def _resume(self, conn: Connection, cases: Sequence[Case]) -> None:
        """Continue each case from the latest revision its signal (this extractor version) has in the store."""
        latest = self.latest_revisions(conn, [signal_id(case.turn_id) for case in cases])
        for case in cases:
            case.revision, case.evidence = latest.get(signal_id(case.turn_id), (-1, []))
            case.extractor_version = EXTRACTOR_VERSION

    def children(self, conn: Connection, turn_ids: Iterable[str]) -> dict[str, events.TurnRecorded]:
        """The first next request stored for each turn."""
        ids = list(set(turn_ids))
        if not ids:
            return {}
        rows = conn.execute(select(_TURNS).where(_TURNS.c.parent_turn_id.in_(ids)).order_by(_TURNS.c.started_at))
        first: dict[str, events.TurnRecorded] = {}
        for row in rows:
            first.setdefault(row.parent_turn_id, turn_event(row))
        return first

    def feedback(self, conn: Connection, turn_ids: Iterable[str]) -> list[events.FeedbackReceived]:
        ids = list(set(turn_ids))
        if not ids:
            return []
        rows = conn.execute(select(_FEEDBACK).where(_FEEDBACK.c.turn_id.in_(ids)).order_by(_FEEDBACK.c.received_at))
        return [events.FeedbackReceived(
            event_id=row.id, tenant=row.tenant, session_id=row.session_id, turn_id=row.turn_id, kind=row.kind,
            value=row.value, text=row.text, tool=events.ToolOutcome.model_validate(row.tool) if row.tool else None,
            idempotency_key=row.idempotency_key, occurred_at=row.received_at,
        ) for row in rows]

    def latest_revisions(self, conn: Connection, signal_ids: Sequence[str]) -> dict[str, tuple[int, list[str]]]:
        if not signal_ids:
            return {}
        latest: dict[str, tuple[int, list[str]]] = {}
        rows = conn.execute(select(_SIGNALS.c.signal_id, _SIGNALS.c.revision, _SIGNALS.c.evidence)
                            .where(_SIGNALS.c.signal_id.in_(list(signal_ids))))
        for sid, revision, evidence in rows:
            if revision > latest.get(sid, (-1, []))[0]:
                latest[sid] = (revision, list(evidence))
        return latest

    def turn_messages(self, conn: Connection, turn_ids: Iterable[str]) -> dict[str, list[ChatMessage]]:
        ids = list(set(turn_ids))
        if not ids:
            return {}
        rows = conn.execute(select(_TURNS.c.id, _TURNS.c.messages).where(_TURNS.c.id.in_(ids)))
        return {turn_id: [ChatMessage.model_validate(m) for m in messages] for turn_id, messages in rows}

    def idle(self, conn: Connection, opened_before: float, limit: int) -> list[tuple[str, str]]:
        """(turn id, session id) of open cases opened before a time, oldest first."""
        rows = conn.execute(select(_CASES.c.turn_id, _CASES.c.session_id)
                            .where(_CASES.c.state == "open", _CASES.c.opened_at < opened_before)
                            .order_by(_CASES.c.opened_at).limit(limit))
        return [(turn_id, session) for turn_id, session in rows]

    def oldest_open(self, conn: Connection, over: int, limit: int) -> list[tuple[str, str]]:
        """The oldest open cases beyond the first ``over`` newest ones (the room the worker may use)."""
        (count,) = conn.execute(select(func.count()).select_from(_CASES).where(_CASES.c.state == "open")).one()
        if count <= over:
            return []
        rows = conn.execute(select(_CASES.c.turn_id, _CASES.c.session_id).where(_CASES.c.state == "open")
                            .order_by(_CASES.c.opened_at).limit(min(limit, count - over)))
        return [(turn_id, session) for turn_id, session in rows]

    def expire(self, conn: Connection, touched_before: float, limit: int) -> list[Case]:
        """Forget closed and waiting cases untouched for the retention period; return the waiting ones (their
        feedback names a turn that never arrived)."""
        rows = conn.execute(select(_CASES.c.turn_id, _CASES.c.state, _CASES.c.body)
                            .where(_CASES.c.state != "open", _CASES.c.touched_at < touched_before)
                            .limit(limit)).all()
        if rows:
            conn.execute(delete(_CASES).where(_CASES.c.turn_id.in_([row.turn_id for row in rows])))
        return [Case.model_validate_json(row.body) for row in rows if row.state == "waiting"]

    # -- the signal outbox ----------------------------------------------------------------------------

    def write_signals(self, conn: Connection, signals: Sequence[SignalExtracted]) -> None:
        """Insert signal rows, not yet published. A row that exists (same event id) is left as it is."""
        if signals:
            conn.execute(self._dialect.insert(tables.Signal).on_conflict_do_nothing(),
                         [_signal_row(signal) for signal in signals])

    def mark_published(self, event_ids: Sequence[str]) -> None:
        if not event_ids:
            return
        try:
            with self._store.engine.begin() as conn:
                conn.execute(update(_SIGNALS).where(_SIGNALS.c.id.in_(bindparam("ids", expanding=True)))
                             .values(published=True), {"ids": list(event_ids)})
        except SQLAlchemyError as exc:
            raise StoreUnavailable(f"the signals worker cannot update the store: {exc}") from exc

    def unpublished(self, limit: int) -> list[SignalExtracted]:
        with self.reading() as conn:
            rows = conn.execute(select(_SIGNALS).where(_SIGNALS.c.published.is_(False))
                                .order_by(_SIGNALS.c.created_at).limit(limit)).all()
        return [SignalExtracted(
            event_id=row.id, signal_id=row.signal_id, revision=row.revision, tenant=row.tenant, scope=row.scope,
            session_id=row.session_id, turn_id=row.turn_id, adapter_version=row.adapter_version,
            reward=row.reward, hint=row.hint, hint_source=row.hint_source, confidence=row.confidence,
            verdicts=[Verdict.model_validate(v) for v in row.verdicts], extractor_version=row.extractor_version,
            evidence=list(row.evidence), also_trains=list(row.also_trains or []), occurred_at=row.created_at,
        ) for row in rows]


def turn_event(row: Row[Any]) -> events.TurnRecorded:
    """A stored turn as the event it was recorded from (the fields the signals need)."""
    return events.TurnRecorded(
        event_id=row.event_id, tenant=row.tenant, scope=row.scope, session_id=row.session_id, turn_id=row.id,
        parent_turn_id=row.parent_turn_id, model=row.model, adapter_version=row.adapter_version,
        messages=row.messages, response=row.response, status=row.status, error=row.error,
        latency_ms=row.latency_ms, started_at=row.started_at, finished_at=row.finished_at,
    )


def _signal_row(signal: SignalExtracted) -> dict[str, object]:
    return {
        "id": signal.event_id, "signal_id": signal.signal_id, "revision": signal.revision, "tenant": signal.tenant,
        "scope": signal.scope, "session_id": signal.session_id, "turn_id": signal.turn_id,
        "adapter_version": signal.adapter_version, "reward": signal.reward, "hint": signal.hint,
        "hint_source": signal.hint_source, "confidence": signal.confidence,
        "verdicts": [verdict.model_dump() for verdict in signal.verdicts],
        "extractor_version": signal.extractor_version, "evidence": signal.evidence,
        "also_trains": signal.also_trains, "published": False,
        "created_at": signal.occurred_at,
    }
