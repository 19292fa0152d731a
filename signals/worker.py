"""The signals worker (``nextturn signals run``): turns what happened after each turn into a signal.

It consumes ``turns`` and ``feedback`` in the consumer group ``signals`` and keeps one case per turn
(:mod:`signals.cases`) in the store. Order of operations, for each batch:

1. read a batch (records that are not events this version reads go to the dead-letter table, counted);
2. if a judge is configured, ask it about the turns this batch closes (outside any lock: it is slow);
3. in one store transaction, holding the lock of the batch's sessions: load the cases the batch touches,
   apply the events to them, hand each final answer's new signal down to the tool-call turns of its exchange
   (:func:`signals.cases.inherit`), and write the changed cases and each new signal revision (the outbox: rows
   marked unpublished). The signal's event id is its signal id (turn id + extractor version) and revision;
4. publish the new revisions to ``signals``, then mark them published;
5. commit the offsets.

A crash before 3 commits changes nothing. A crash after 3 replays the batch onto cases that already hold
its effects: applying an event twice adds no evidence, so no revision is written twice. A crash between 3
and 4 leaves unpublished rows, which the next worker publishes when it starts (duplicates on the topic
carry the same event id; readers are idempotent by event id). If the store or the log fails mid-batch,
the worker rewinds to the batch's first offsets and tries again.

Between batches it closes cases whose session went quiet (``signals_idle_timeout_s``) with no next state,
closes the oldest open cases when there are more than ``signals_max_open_cases`` (state stays bounded), and
forgets cases untouched for ``signals_retention_s`` (feedback whose turn never came is dead-lettered then).
Several workers in one group share the partitions; the session locks keep them off each other's cases.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Literal

from sqlalchemy import Connection

from nextturn import events
from nextturn.bus import BadRecordPolicy, EventLog, Record
from nextturn.bus.log import Delivery, dead_letter
from nextturn.erasure import mark
from nextturn.errors import CommitFailed, EventError, EventLogUnavailable, StoreUnavailable
from nextturn.events import FeedbackReceived, SignalExtracted, TurnRecorded, Verdict
from nextturn.settings import Settings
from nextturn.store import Store
from signals import cases as c
from signals.casebook import Casebook
from signals.cases import Case
from signals.judge_client import JudgeClient, Question

log = logging.getLogger(__name__)

GROUP = "signals"
TOPICS = (events.TURNS, events.FEEDBACK)
SWEEP_EVERY_S = 1.0


@dataclass
class Play:
    """What applying a batch of events to its cases did."""

    changed: dict[str, Case] = field(default_factory=dict)
    questions: dict[str, Question] = field(default_factory=dict)  # cases this batch closed, for the judge
    orphans: int = 0  # next requests whose previous turn the worker has never seen


class SignalsWorker:
    def __init__(
        self,
        event_log: EventLog,
        store: Store,
        *,
        idle_timeout_s: float = 300.0,
        retention_s: float = 7 * 86400.0,
        max_open_cases: int = 1_000_000,
        judge: JudgeClient | None = None,
        batch_size: int = 500,
        group: str = GROUP,
        on_bad_record: BadRecordPolicy | None = None,
        clock: Callable[[], float] = time.time,
        shared_learning: Collection[str] = (),
    ) -> None:
        """``on_bad_record``: what to do with a record that is not a readable event; by default it goes to the
        dead-letter table and is counted (``Crash`` stops the worker instead, for a tool that must not skip)."""
        self._log = event_log
        self._store = store
        self._casebook = Casebook(store)
        self._idle_timeout_s = idle_timeout_s
        self._retention_s = retention_s
        self._max_open = max_open_cases
        self._judge = judge
        self._batch_size = batch_size
        self._clock = clock
        self._shared = frozenset(shared_learning)  # tenants whose signals also train `default` ("*": all)
        self.counts: Counter[str] = Counter()
        self._consumer = event_log.consumer(group, TOPICS, on_bad_record=on_bad_record or self._set_aside)
        self._outbox_dirty = True  # a previous worker may have died between writing and publishing
        self._next_sweep = 0.0

    # -- the loop -------------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.run_once(timeout_s=0.5)

    def run_once(self, timeout_s: float = 1.0) -> int:
        """Handle one batch, then do what is due between batches; return how many events were read."""
        deliveries = self._consumer.poll(self._batch_size, timeout_s)
        try:
            self.handle(deliveries)
        except (StoreUnavailable, EventLogUnavailable) as exc:
            log.warning("a batch failed (%s); reading it again", exc)
            self.counts["retries"] += 1
            self._rewind(deliveries)
            time.sleep(0.5)
            return 0
        try:
            self._consumer.commit()
        except CommitFailed:
            pass  # the group moved on: the batch comes again to the partitions' new owner, and adds nothing
        if self._clock() >= self._next_sweep:
            try:
                self.maintain()
            except (StoreUnavailable, EventLogUnavailable) as exc:  # as a batch's: tried again, never an end
                log.warning("closing idle cases failed (%s); trying again", exc)
                self.counts["retries"] += 1
                time.sleep(0.5)
                return len(deliveries)
            self._next_sweep = self._clock() + min(SWEEP_EVERY_S, self._idle_timeout_s / 4)
        return len(deliveries)

    def drain(self, idle_s: float = 0.5) -> int:
        """Handle batches until a poll waits ``idle_s`` for nothing (tests, relabel, benchmarks)."""
        total = 0
        while read := self.run_once(idle_s):
            total += read
        return total

    def _rewind(self, deliveries: Sequence[Delivery]) -> None:
        first: dict[tuple[str, int], int] = {}
        for item in deliveries:
            key = (item.topic, item.partition)
            first[key] = min(first.get(key, item.offset), item.offset)
        for (topic, partition), offset in first.items():
            self._consumer.seek(topic, partition, offset)

    def _set_aside(self, record: Record, error: EventError) -> None:
        """The bad-record policy: into the dead-letter table, counted, and on with the batch."""
        self._store.apply([dead_letter(record, str(error))])
        self.counts["dead_letters"] += 1

    # -- a batch --------------------------------------------------------------------------------------

    def handle(self, deliveries: Sequence[Delivery]) -> list[SignalExtracted]:
        items = [item for item in deliveries if isinstance(item.event, TurnRecorded | FeedbackReceived)]
        if not items:
            return []
        in_batch = {item.event.turn_id for item in items if isinstance(item.event, TurnRecorded)}
        partition_of: dict[str, int] = {}
        for item in items:
            event = item.event
            assert isinstance(event, TurnRecorded | FeedbackReceived)
            partition_of[event.turn_id] = item.partition
            if isinstance(event, TurnRecorded) and event.parent_turn_id:
                partition_of[event.parent_turn_id] = item.partition
        judged: dict[str, tuple[Verdict, str | None]] = {}
        if self._judge is not None:
            with self._casebook.reading() as conn:
                rules = self._store.erasures.read(conn)
                preview = _play(self._gather(conn, partition_of, in_batch),
                                [item for item in items if not rules.covers(item.event)])
            judged = self._ask(preview.questions)
        sessions = {item.event.session_id for item in items if isinstance(item.event, TurnRecorded | FeedbackReceived)}
        with self._casebook.transaction(sessions) as conn:
            rules = self._store.erasures.read(conn, hold=True)  # nextturn.erasure: what was forgotten stays so
            forgotten = [item.event for item in items if rules.covers(item.event)]
            if forgotten:
                rules = mark(conn, rules, forgotten)
                items = [item for item in items if not rules.covers(item.event)]
                self.counts["forgotten"] += len(forgotten)
            known = self._gather(conn, partition_of, in_batch)
            play = _play(known, items)
            signals = self._revise(conn, play.changed, known, judged)
            self._casebook.save(conn, list(play.changed.values()), self._clock())
            self._casebook.write_signals(conn, signals)
        self.counts["events"] += len(items)
        self.counts["orphans"] += play.orphans
        self._publish(signals)
        return signals

    def _gather(self, conn: Connection, partition_of: dict[str, int], in_batch: set[str]) -> dict[str, Case]:
        """The cases of every turn the batch names; a turn the worker has no case for, but the store has (it
        predates the worker, or its case expired), gets one from the store."""
        found = self._casebook.load(conn, partition_of)
        missing = set(partition_of) - set(found) - in_batch
        for turn_id, stored in self._casebook.stored_turns(conn, missing, partition_of).items():
            found[turn_id] = stored.case
        return found

    def _ask(self, questions: dict[str, Question]) -> dict[str, tuple[Verdict, str | None]]:
        assert self._judge is not None
        ids = list(questions)
        answers = self._judge.judge_many([questions[turn_id] for turn_id in ids])
        self.counts["judged"] += len(ids)
        return dict(zip(ids, answers, strict=True))

    def _revise(self, conn: Connection, changed: dict[str, Case], known: dict[str, Case],
                judged: dict[str, tuple[Verdict, str | None]]) -> list[SignalExtracted]:
        """The new signal revisions of the changed cases, then of the tool-call turns whose exchange those
        signals ended (added to ``changed``)."""
        for case in changed.values():
            if case.judge is None and case.turn_id in judged:
                case.judge, case.judge_hint = judged[case.turn_id]
        signals = [self._also_shared(signal) for signal in self._casebook.revise(conn, changed, known)]
        for signal in signals:
            self._count(signal)
        return signals

    def _also_shared(self, signal: SignalExtracted) -> SignalExtracted:
        """The signal, also training the shared scope when its tenant opted in (NEXTTURN_SHARED_LEARNING)."""
        if signal.scope == events.DEFAULT_SCOPE or not ({signal.tenant, "*"} & self._shared):
            return signal
        return signal.model_copy(update={"also_trains": [events.DEFAULT_SCOPE]})

    def _count(self, signal: SignalExtracted) -> None:
        self.counts["revisions" if signal.revision else "resolved"] += 1
        if signal.reward is None:
            self.counts["abstained"] += 1
        else:
            sources = {v.source for v in signal.verdicts if v.score is not None}
            self.counts["judge_only" if sources == {"judge"} else "external"] += 1
        if signal.hint:
            self.counts["hints"] += 1
        if any(verdict.evaluator == "exchange" for verdict in signal.verdicts):
            self.counts["exchanges"] += 1  # a tool-call turn judged by how its exchange ended

    def _publish(self, signals: Sequence[SignalExtracted]) -> None:
        if not signals:
            return
        try:
            self._log.append(signals)
        except EventLogUnavailable as exc:
            log.warning("cannot publish %d signal(s) now (%s); they wait in the outbox", len(signals), exc)
            self._outbox_dirty = True
            return
        self._casebook.mark_published([signal.event_id for signal in signals])
        self.counts["published"] += len(signals)

    # -- between batches ------------------------------------------------------------------------------

    def maintain(self) -> None:
        """Publish what the outbox holds, close idle cases, make room, forget old cases."""
        now = self._clock()
        if self._outbox_dirty:
            self._drain_outbox()
        with self._casebook.reading() as conn:
            quiet = self._casebook.idle(conn, now - self._idle_timeout_s, self._batch_size)
            crowded = self._casebook.oldest_open(conn, self._max_open, self._batch_size)
        if quiet:
            self._close(dict(quiet), "idle")
        if crowded:
            self._close(dict(crowded), "evicted")
        self._expire(now - self._retention_s)

    def _drain_outbox(self) -> None:
        while pending := self._casebook.unpublished(self._batch_size):
            try:
                self._log.append(pending)
            except EventLogUnavailable as exc:
                log.warning("the outbox waits for the event log (%s)", exc)
                return
            self._casebook.mark_published([signal.event_id for signal in pending])
            self.counts["published"] += len(pending)
        self._outbox_dirty = False

    def _close(self, session_of: dict[str, str], reason: Literal["idle", "evicted"]) -> None:
        judged: dict[str, tuple[Verdict, str | None]] = {}
        if self._judge is not None:
            with self._casebook.reading() as conn:
                cases = self._casebook.load(conn, session_of)
                prompts = self._casebook.turn_messages(conn, session_of)
            judged = self._ask({
                turn_id: Question(prompts[turn_id], case.response, [])
                for turn_id, case in cases.items()
                if case.state == "open" and case.response is not None and turn_id in prompts
            })
        with self._casebook.transaction(set(session_of.values())) as conn:
            rules = self._store.erasures.read(conn, hold=True)
            cases = {turn_id: case for turn_id, case in self._casebook.load(conn, session_of).items()
                     if not rules.covers_session(case.tenant, case.session_id)}
            changed = {turn_id: case for turn_id, case in cases.items() if c.close_idle(case, reason)}
            closed = len(changed)
            signals = self._revise(conn, changed, cases, judged)
            self._casebook.save(conn, list(changed.values()), self._clock())
            self._casebook.write_signals(conn, signals)
        self.counts[reason] += closed
        self._publish(signals)

    def _expire(self, touched_before: float) -> None:
        with self._casebook.transaction(()) as conn:
            orphans = self._casebook.expire(conn, touched_before, self._batch_size)
        letters = [_orphaned(feedback, case) for case in orphans for feedback in case.feedback]
        if letters:
            self._store.apply(letters)
            self.counts["dead_letters"] += len(letters)

    def close(self) -> None:
        self._consumer.close()
        if self._judge is not None:
            self._judge.close()
        self._casebook.engine.dispose()


def from_settings(settings: Settings, event_log: EventLog, store: Store, **options: object) -> SignalsWorker:
    """The worker that Settings describe (the judge only when NEXTTURN_JUDGE_URL is set)."""
    judge = None
    if settings.judge_url:
        assert settings.judge_model is not None  # Settings refuse a judge URL without a model
        judge = JudgeClient(settings.judge_url, settings.judge_model, api_key=settings.judge_api_key,
                            votes=settings.judge_votes)
    return SignalsWorker(event_log, store, idle_timeout_s=settings.signals_idle_timeout_s,
                         retention_s=settings.signals_retention_s, max_open_cases=settings.signals_max_open_cases,
                         judge=judge, shared_learning=settings.shared_learning, **options)  # type: ignore[arg-type]


def _play(cases: dict[str, Case], items: Sequence[Delivery]) -> Play:
    """Apply a batch's events to their cases, in log order. Pure: ``cases`` is changed in place."""
    play = Play()
    for item in items:
        event = item.event
        if isinstance(event, TurnRecorded):
            case = cases.setdefault(event.turn_id, c.waiting(event.turn_id, event.session_id, event.tenant,
                                                             item.partition))
            if c.open_turn(case, event):
                play.changed[case.turn_id] = case
            if event.parent_turn_id is None:
                continue
            parent = cases.get(event.parent_turn_id)
            if parent is None:
                play.orphans += 1
            elif c.close_with_next(parent, event):
                play.changed[parent.turn_id] = parent
                if parent.response is not None:
                    play.questions[parent.turn_id] = Question(c.context(parent, event), parent.response,
                                                              list(parent.next_state or []))
        elif isinstance(event, FeedbackReceived):
            case = cases.setdefault(event.turn_id, c.waiting(event.turn_id, event.session_id, event.tenant,
                                                             item.partition))
            if c.add_feedback(case, event):
                play.changed[case.turn_id] = case
    return play


def _orphaned(feedback: FeedbackReceived, case: Case) -> events.DeadLettered:
    return events.DeadLettered(
        event_id=f"dead-orphan-{feedback.event_id}", source_topic=events.FEEDBACK, partition=case.partition,
        offset=-1, key=feedback.session_id, payload_b64=base64.b64encode(feedback.encode()).decode(),
        reason=f"feedback for turn {feedback.turn_id}, which never reached the signals worker within the "
               "retention period",
    )

