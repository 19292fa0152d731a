"""The signals worker on real event logs (SQLite and Kafka via Tansu) and real stores (SQLite and Postgres):
joins, exactly-once through crashes, late feedback, idle sessions, bounded state, dead letters, sharing."""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select

from nextturn import events, tables
from nextturn.bus import Crash, EventLog
from nextturn.errors import UndecodableRecord
from nextturn.events import SignalExtracted
from nextturn.settings import Settings
from nextturn.store import Store, upgrade
from signals.cases import IDLE
from signals.relabel import relabel
from signals.worker import SignalsWorker, from_settings

from support.crashing import run_until_crash
from support.event_logs import SESSION_TIMEOUT_S, open_log
from support.eventually import eventually
from support.factories import feedback, follow, says, turn


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'nextturn.db'}"
    upgrade(url)
    return url


@pytest.fixture
def sqlite_log(tmp_path: Path) -> Iterator[EventLog]:
    log = open_log("sqlite", str(tmp_path / "events.db"))
    yield log
    log.close()


def signal_rows(store: Store) -> list[tables.Signal]:
    with store.session() as db:
        return list(db.exec(select(tables.Signal).order_by(tables.Signal.turn_id, tables.Signal.revision)).scalars())


def latest(store: Store) -> dict[str, tables.Signal]:
    return {row.turn_id: row for row in signal_rows(store)}  # ordered by revision: the last one wins


def published(log: EventLog) -> list[SignalExtracted]:
    reader = log.consumer(None, [events.SIGNALS], start="beginning")
    found: list[SignalExtracted] = []
    try:
        while batch := reader.poll(timeout_s=1.0):
            found.extend(item.event for item in batch if isinstance(item.event, SignalExtracted))
    finally:
        reader.close()
    return found


def conversation(session: str) -> list[events.Event]:
    """Three turns of one session: a correction, then thanks, then a rating of the last answer."""
    first = turn(session, 1, content="What is the boiling point of water?")
    second = follow(first, says("No, I meant in Fahrenheit, please use Fahrenheit."))
    third = follow(second, says("Thanks, that's exactly right!"))
    return [first, second, third, feedback(third, value=1.0)]


def test_a_session_resolves_each_turn_by_what_came_next(sqlite_log: EventLog, store_url: str) -> None:
    store = Store(store_url)
    first, second, third, rating = conversation("s1")
    sqlite_log.append([first, second, third, rating])
    worker = SignalsWorker(sqlite_log, store, idle_timeout_s=3600)
    worker.drain(0.3)
    worker.close()

    signals = latest(store)
    assert signals[first.turn_id].reward is not None and signals[first.turn_id].reward < 0
    assert signals[first.turn_id].hint == "I meant in Fahrenheit, please use Fahrenheit."
    assert signals[first.turn_id].hint_source == "user"
    assert signals[second.turn_id].reward is not None and signals[second.turn_id].reward > 0
    assert (signals[second.turn_id].hint, signals[second.turn_id].hint_source) == (None, None)
    assert signals[third.turn_id].reward == 1.0  # the rating; the session has said nothing after it yet
    assert signals[first.turn_id].evidence == sorted([first.event_id, second.event_id])
    on_topic = {signal.event_id for signal in published(sqlite_log)}
    assert on_topic == {row.id for row in signal_rows(store)}
    assert all(row.published for row in signal_rows(store))


def test_a_tenant_that_opted_in_also_trains_the_shared_scope(sqlite_log: EventLog, store_url: str) -> None:
    store = Store(store_url)
    acme, globex, shared = (turn(f"s-{name}", 1, tenant=name).model_copy(update={"scope": scope})
                            for name, scope in (("acme", "t.acme"), ("globex", "t.globex"), ("initech", "default")))
    sqlite_log.append([acme, globex, shared, *(feedback(t, value=1.0) for t in (acme, globex, shared))])
    worker = SignalsWorker(sqlite_log, store, idle_timeout_s=3600, shared_learning=["acme"])
    worker.drain(0.3)
    worker.close()
    stored = latest(store)
    assert {t.tenant: stored[t.turn_id].also_trains for t in (acme, globex, shared)} == {
        "acme": ["default"], "globex": [], "initech": []}
    on_log = {signal.turn_id: signal for signal in published(sqlite_log)}
    assert on_log[acme.turn_id].trains("default") and on_log[acme.turn_id].trains("t.acme")
    assert not on_log[globex.turn_id].trains("default")


def test_parallel_tool_results_resolve_the_turn_that_called_the_tools(sqlite_log: EventLog, store_url: str) -> None:
    store = Store(store_url)
    calls = [events.ToolCall(id=f"call_{n}", function=events.ToolCallFunction(name="run", arguments="{}"))
             for n in (1, 2)]
    asking = follow(turn("s1", 1, content="Run the tests"), says("and the linter"), tool_calls=calls)
    results = follow(asking,
                     events.ChatMessage(role="tool", tool_call_id="call_1", content="12 passed in 0.3s"),
                     events.ChatMessage(role="tool", tool_call_id="call_2",
                                        content="Traceback (most recent call last):\nImportError: no module x"))
    sqlite_log.append([asking, results])
    worker = SignalsWorker(sqlite_log, store, idle_timeout_s=3600)
    worker.drain(0.3)
    worker.close()

    signal = latest(store)[asking.turn_id]
    assert signal.reward == 0.0  # one of two calls failed
    assert signal.hint is not None and "call_2" in signal.hint and "ImportError" in signal.hint
    assert signal.hint_source == "tools"


def calculator_exchange(session: str, rounds: int) -> list[events.TurnRecorded]:
    """A question, ``rounds`` tool-call turns in a row (each answered by the calculator), the final answer."""
    calls = [events.ToolCall(id="call_1", function=events.ToolCallFunction(name="calculator", arguments="{}"))]
    first = turn(session, 1, content="What is 17 plus 5?").model_copy(
        update={"response": events.ChatMessage(role="assistant", tool_calls=calls)})
    chain = [first]
    for n in range(rounds):
        result = events.ChatMessage(role="tool", tool_call_id="call_1", content='{"ok": true, "result": 23}')
        chain.append(follow(chain[-1], result, answer="So 17 plus 5 is 23.",
                            tool_calls=calls if n < rounds - 1 else None))
    return chain


def test_tool_call_turns_are_judged_by_how_their_exchange_ended(sqlite_log: EventLog, store_url: str) -> None:
    store = Store(store_url)
    *calls, answer = calculator_exchange("s1", rounds=2)
    sqlite_log.append([*calls, answer])
    worker = SignalsWorker(sqlite_log, store, idle_timeout_s=3600)
    worker.drain(0.3)
    assert signal_rows(store) == []  # the calls ran; whether they were right is the final answer's to say

    sqlite_log.append([follow(answer, says("No, that's wrong: use 17 and 5, it is 22."))])
    worker.drain(0.3)
    worker.close()
    signals = latest(store)
    final = signals[answer.turn_id]
    assert final.reward is not None and final.reward < 0
    for call in calls:
        signal = signals[call.turn_id]
        assert signal.revision == 0 and signal.reward == final.reward  # one revision: it waited
        assert [v["evaluator"] for v in signal.verdicts] == ["tool", "exchange"] and signal.verdicts[0]["score"] is None
        assert final.id in signal.evidence
    assert worker.counts["exchanges"] == 2


def test_an_exchange_that_ends_after_the_session_went_quiet_revises_its_tool_calls(
        sqlite_log: EventLog, store_url: str) -> None:
    store = Store(store_url)
    clock = Clock()
    call, answer = calculator_exchange("s1", rounds=1)
    sqlite_log.append([call, answer])
    worker = SignalsWorker(sqlite_log, store, idle_timeout_s=300, clock=clock)
    worker.drain(0.3)
    clock.now += 301
    worker.maintain()
    quiet = latest(store)[call.turn_id]
    assert quiet.revision == 0 and quiet.reward == 1.0  # the call ran, and nothing else was said in time

    sqlite_log.append([follow(answer, says("Thanks, that's right!"))])
    worker.drain(0.3)
    worker.close()
    late = latest(store)[call.turn_id]
    assert late.revision == 1 and late.reward is not None and 0 < late.reward < 1.0  # the thanks, handed down
    assert late.evidence == sorted([*quiet.evidence, latest(store)[answer.turn_id].id])


def test_relabel_hands_an_exchange_down_once(sqlite_log: EventLog, store_url: str) -> None:
    store = Store(store_url)
    call, answer = calculator_exchange("s1", rounds=1)
    reply = follow(answer, says("No, that's wrong: use 17 and 5, it is 22."))
    store.apply([call, answer, reply])  # stored by the recorder; no worker ran
    once = relabel(store, sqlite_log, datetime(2020, 1, 1, tzinfo=UTC), idle_timeout_s=0.0)
    again = relabel(store, sqlite_log, datetime(2020, 1, 1, tzinfo=UTC), idle_timeout_s=0.0)
    rows = [row for row in signal_rows(store) if row.turn_id == call.turn_id]
    assert len(rows) == 1 and rows[0].reward == latest(store)[answer.turn_id].reward < 0  # one revision
    assert [v["evaluator"] for v in rows[0].verdicts] == ["tool", "exchange"]
    assert (once.written, again.written) == (3, 0)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["before-publish", "before-commit"])
def test_a_worker_killed_mid_batch_loses_nothing_and_doubles_nothing(
        log_spec: tuple[str, str], store_url: str, stage: str) -> None:
    log = open_log(*log_spec)
    store = Store(store_url)
    sessions = [conversation(f"s{n}") for n in range(12)]
    log.append([event for session in sessions for event in session])

    child = multiprocessing.get_context("spawn").Process(
        target=run_until_crash, args=(*log_spec, store_url, stage, 3, 7))
    child.start()
    child.join(120)
    assert child.exitcode == 70, "the worker should have died at the injected point"
    assert 0 < len(signal_rows(store)) < 36, "the crash should come mid-way"

    late = [feedback(session[0], value=-1.0) for session in sessions]  # the first turns, rated much later
    log.append(late)
    worker = SignalsWorker(log, store, batch_size=7, idle_timeout_s=3600)

    def complete() -> bool:
        signals = latest(store)
        pairs = zip(sessions, late, strict=True)
        return all(first.turn_id in signals and late_rating.event_id in signals[first.turn_id].evidence
                   and third.turn_id in signals for (first, _, third, _), late_rating in pairs)

    def worked() -> bool:
        if complete():
            return True
        worker.run_once(0.5)  # waits out the dead member's session first
        return False

    eventually(worked, "every first turn signalled with its late rating", timeout_s=90, interval_s=0)
    worker.drain(1.0)
    worker.close()

    signals = latest(store)
    for (first, second, third, rating), late_rating in zip(sessions, late, strict=True):
        assert signals[first.turn_id].evidence == sorted([first.event_id, second.event_id, late_rating.event_id])
        assert signals[first.turn_id].reward == -1.0  # the late rating decides
        assert signals[second.turn_id].evidence == sorted([second.event_id, third.event_id])
        assert signals[third.turn_id].evidence == sorted([third.event_id, rating.event_id])
    rows = signal_rows(store)
    chains: dict[str, list[tables.Signal]] = {}
    for row in rows:
        chains.setdefault(row.signal_id, []).append(row)
    for chain in chains.values():  # revisions 0, 1, … each knowing strictly more than the one before
        assert [row.revision for row in chain] == list(range(len(chain)))
        assert all(set(a.evidence) < set(b.evidence) for a, b in zip(chain, chain[1:], strict=False))
    on_topic = published(log)
    assert {signal.event_id for signal in on_topic} == {row.id for row in rows}
    stored = {row.id: (row.reward, row.evidence) for row in rows}
    for signal in on_topic:  # a re-published signal is the same signal
        assert (signal.reward, signal.evidence) == stored[signal.event_id]
    assert all(row.published for row in rows)
    log.close()


def test_late_feedback_after_the_case_expired_still_gets_a_revision(sqlite_log: EventLog, store_url: str) -> None:
    store = Store(store_url)
    clock = Clock()
    first, second, third, rating = conversation("s1")
    sqlite_log.append([first, second, third, rating])
    store.apply([first, second, third])  # what the recorder does
    worker = SignalsWorker(sqlite_log, store, idle_timeout_s=60, retention_s=600, clock=clock)
    worker.drain(0.3)
    clock.now += 10_000
    worker.maintain()  # closes the last turn (idle), and forgets the others: untouched past retention
    clock.now += 10_000
    worker.maintain()  # forgets the last one too
    with store.session() as db:
        assert list(db.exec(select(tables.SignalCase)).scalars()) == []

    late = feedback(first, value=1.0)
    sqlite_log.append([late])
    worker.drain(0.3)
    worker.close()
    signal = latest(store)[first.turn_id]
    assert signal.revision == 1 and signal.reward == 1.0  # rebuilt from the store: turn, next request, rating
    assert signal.evidence == sorted([first.event_id, second.event_id, late.event_id])


def test_a_quiet_session_resolves_its_last_turn_with_no_next_state(sqlite_log: EventLog, store_url: str) -> None:
    store = Store(store_url)
    clock = Clock()
    only = turn("s1", 1, content="Write a haiku about rain.")
    sqlite_log.append([only])
    worker = SignalsWorker(sqlite_log, store, idle_timeout_s=300, clock=clock)
    worker.drain(0.3)
    assert signal_rows(store) == []  # still open: the user may yet answer

    clock.now += 299
    worker.maintain()
    assert signal_rows(store) == []
    clock.now += 2
    worker.maintain()
    signal = latest(store)[only.turn_id]
    assert signal.revision == 0 and signal.reward is None  # nothing said anything: an abstention
    assert signal.evidence == sorted([only.event_id, IDLE])

    later = follow(only, says("That's wrong, a haiku has three lines."))  # the user came back after all
    sqlite_log.append([later])
    worker.drain(0.3)
    worker.close()
    signal = latest(store)[only.turn_id]
    assert signal.revision == 1 and signal.reward is not None and signal.reward < 0


def test_the_idle_timeout_comes_from_settings(sqlite_log: EventLog, store_url: str, tmp_path: Path) -> None:
    store = Store(store_url)
    only = turn("s1", 1)
    sqlite_log.append([only])
    for timeout_s, resolved in ((3600.0, False), (0.05, True)):
        settings = Settings(data_dir=tmp_path, signals_idle_timeout_s=timeout_s)
        worker = from_settings(settings, sqlite_log, store)
        worker.drain(0.3)
        time.sleep(0.1)
        worker.maintain()
        worker.close()
        assert (only.turn_id in latest(store)) is resolved


def test_open_cases_stay_bounded(sqlite_log: EventLog, store_url: str, tmp_path: Path) -> None:
    store = Store(store_url)
    turns = [turn(f"s{n}", 1) for n in range(40)]
    sqlite_log.append(turns)
    worker = from_settings(Settings(data_dir=tmp_path, signals_max_open_cases=10), sqlite_log, store)
    worker.drain(0.3)
    worker.maintain()
    worker.close()
    with store.session() as db:
        open_cases = db.exec(select(tables.SignalCase).where(tables.SignalCase.state == "open")).scalars().all()
    assert len(open_cases) == 10
    assert worker.counts["evicted"] == 30
    assert len(latest(store)) == 30  # the oldest ones, resolved early as if idle
    resolved = latest(store)
    assert {case.turn_id for case in open_cases}.isdisjoint(resolved)
    assert all(signal.evidence[-1] == IDLE or IDLE in signal.evidence for signal in resolved.values())


def test_feedback_whose_turn_never_comes_is_dead_lettered_after_retention(
        sqlite_log: EventLog, store_url: str, tmp_path: Path) -> None:
    store = Store(store_url)
    clock = Clock()
    ghost = turn("s1", 1)  # never appended
    sqlite_log.append([feedback(ghost, value=1.0)])
    settings = Settings(data_dir=tmp_path, signals_retention_s=100.0)
    worker = from_settings(settings, sqlite_log, store, clock=clock)
    worker.drain(0.3)
    worker.maintain()
    assert store.count(tables.DeadLetter) == 0  # the turn may still come
    clock.now += 101
    worker.maintain()
    worker.close()
    with store.session() as db:
        letters = db.exec(select(tables.DeadLetter)).scalars().all()
    assert len(letters) == 1 and ghost.turn_id in letters[0].reason
    assert store.count(tables.SignalCase) == 0


def test_records_that_are_not_events_go_to_the_dead_letter_table(sqlite_log: EventLog, store_url: str) -> None:
    store = Store(store_url)
    good = turn("s1", 1)
    sqlite_log.append_raw(events.TURNS, "s1", b"not json at all")
    sqlite_log.append_raw(events.TURNS, "s1", good.encode().replace(b'"schema_version":3', b'"schema_version":9'))
    sqlite_log.append([good, feedback(good, value=0.5)])
    worker = SignalsWorker(sqlite_log, store)
    worker.drain(0.3)
    worker.close()
    assert worker.counts["dead_letters"] == 2
    with store.session() as db:
        reasons = sorted(row.reason for row in db.exec(select(tables.DeadLetter)).scalars())
    assert "not a JSON object" in reasons[0] and "schema_version 9" in reasons[1]
    assert latest(store)[good.turn_id].reward == 0.5  # and it went on


def test_the_bad_record_policy_can_be_to_stop(sqlite_log: EventLog, store_url: str) -> None:
    sqlite_log.append_raw(events.TURNS, "s1", b"not json at all")
    worker = SignalsWorker(sqlite_log, Store(store_url), on_bad_record=Crash())
    with pytest.raises(UndecodableRecord, match="not a readable event"):
        worker.run_once(0.3)
    worker.close()


def test_workers_in_one_group_share_the_sessions(sqlite_log: EventLog, store_url: str) -> None:
    store = Store(store_url)
    sessions = [conversation(f"s{n}") for n in range(24)]
    workers = [SignalsWorker(sqlite_log, store, batch_size=5, idle_timeout_s=3600) for _ in range(2)]
    stop = threading.Event()
    threads = [threading.Thread(target=worker.run, args=(stop,)) for worker in workers]
    for thread in threads:
        thread.start()
    time.sleep(SESSION_TIMEOUT_S)  # both members join and split the partitions before there is work
    sqlite_log.append([event for session in sessions for event in session])
    try:
        eventually(lambda: len(signal_rows(store)) >= 24 * 3, "a signal for every resolved turn", timeout_s=60,
                   interval_s=0.2)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    for worker in workers:
        worker.close()
    assert len(signal_rows(store)) == 24 * 3
    assert all(worker.counts["events"] > 0 for worker in workers), [w.counts for w in workers]
    assert sum(worker.counts["events"] for worker in workers) == 24 * 4


@pytest.mark.postgres
def test_the_worker_on_postgres(sqlite_log: EventLog, postgres: object) -> None:
    from support.services import PostgresCluster

    assert isinstance(postgres, PostgresCluster)
    url = postgres.create_database(f"signals_{time.monotonic_ns()}")
    upgrade(url)
    store = Store(url)
    sessions = [conversation(f"s{n}") for n in range(5)]
    sqlite_log.append([event for session in sessions for event in session])
    worker = SignalsWorker(sqlite_log, store, batch_size=3, idle_timeout_s=3600)
    worker.drain(0.3)
    worker.drain(0.3)  # replays nothing new
    worker.close()
    assert len(signal_rows(store)) == 15
    assert {row.id for row in signal_rows(store)} == {signal.event_id for signal in published(sqlite_log)}
    store.close()
