"""The event log's contract, run against both backends: SQLite and a real Kafka-protocol broker (Tansu)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest

from nextturn import events
from nextturn.bus import Crash, Delivery, EventLog
from nextturn.bus.log import MAX_EVENT_BYTES
from nextturn.errors import CommitFailed, EventTooLarge, UndecodableRecord, UnknownTopic

from support.event_logs import poll_until
from support.eventually import eventually
from support.factories import sequence_of, turn

TESTS = Path(__file__).parent


def ids(deliveries: list[Delivery]) -> list[str]:
    return [d.event.event_id for d in deliveries]


def test_events_with_one_key_arrive_in_order(event_log: EventLog) -> None:
    sent = [turn(f"session-{n % 6}", n) for n in range(60)]
    for start in range(0, 60, 20):
        event_log.append(sent[start:start + 20])
    consumer = event_log.consumer("order", [events.TURNS])
    got = poll_until(consumer, 60)
    consumer.close()

    assert sorted(ids(got)) == sorted(e.event_id for e in sent)
    by_session: dict[str, list[int]] = defaultdict(list)
    for delivery in got:
        assert delivery.key == delivery.event.session_id  # type: ignore[union-attr]
        by_session[delivery.key].append(sequence_of(delivery.event))
    assert by_session == {f"session-{k}": list(range(k, 60, 6)) for k in range(6)}


CHILD = """
import sys, time
from support.event_logs import open_log
log = open_log(sys.argv[1], sys.argv[2])
consumer = log.consumer("survivors", ["turns"])
got = 0
while got < int(sys.argv[3]):
    got += len(consumer.poll(max_records=100, timeout_s=0.2))
print(got, flush=True)
time.sleep(600)  # holds the batch, never commits: killed by the test
"""


def test_uncommitted_events_come_again_after_a_consumer_dies(
    event_log: EventLog, log_spec: tuple[str, str]
) -> None:
    sent = [turn(f"s{n % 3}", n) for n in range(12)]
    event_log.append(sent)
    with subprocess.Popen(
        [sys.executable, "-c", CHILD, *log_spec, "12"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(TESTS)},
    ) as child:
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "12"  # it read the whole batch...
        finally:
            child.send_signal(signal.SIGKILL)  # ...and died before committing

    successor = event_log.consumer("survivors", [events.TURNS])
    got = poll_until(successor, 12, timeout_s=30)
    successor.commit()
    successor.close()
    assert sorted(ids(got)) == sorted(e.event_id for e in sent)


def test_a_group_resumes_from_its_committed_offsets(event_log: EventLog) -> None:
    first_half = [turn(f"s{n % 4}", n) for n in range(10)]
    second_half = [turn(f"s{n % 4}", n) for n in range(10, 20)]
    event_log.append(first_half)
    consumer = event_log.consumer("resume", [events.TURNS])
    assert sorted(ids(poll_until(consumer, 10))) == sorted(e.event_id for e in first_half)
    consumer.commit()
    consumer.close()

    event_log.append(second_half)
    resumed = event_log.consumer("resume", [events.TURNS])
    got = poll_until(resumed, 10)
    got += resumed.poll(timeout_s=1.0)  # nothing from before the commit may follow
    resumed.close()
    assert sorted(ids(got)) == sorted(e.event_id for e in second_half)

    other_group = event_log.consumer("another-group", [events.TURNS])
    assert len(poll_until(other_group, 20)) == 20
    other_group.close()


def test_two_consumers_in_a_group_split_the_work(event_log: EventLog) -> None:
    sent = [turn(f"session-{n % 40}", n) for n in range(400)]
    received: dict[str, list[Delivery]] = {"a": [], "b": []}
    producing_done = threading.Event()
    errors: list[BaseException] = []

    def work(name: str) -> None:
        consumer = event_log.consumer("split", [events.TURNS])

        def all_seen() -> bool:
            received[name].extend(consumer.poll(max_records=20, timeout_s=0.2))
            try:
                consumer.commit()
            except CommitFailed:
                pass  # a rebalance: the batch comes again to the partition's new owner
            seen = {d.event.event_id for each in received.values() for d in each}
            return producing_done.is_set() and len(seen) == len(sent)

        try:
            eventually(all_seen, "every event, between the two", timeout_s=40, interval_s=0)
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)
        finally:
            consumer.close()

    workers = [threading.Thread(target=work, args=(name,)) for name in received]
    for worker in workers:
        worker.start()
    time.sleep(3)  # let both join the group before the traffic starts
    for start in range(0, len(sent), 10):
        event_log.append(sent[start:start + 10])
        time.sleep(0.05)
    producing_done.set()
    for worker in workers:
        worker.join()

    assert errors == []
    assert {d.event.event_id for name in received for d in received[name]} == {e.event_id for e in sent}
    assert received["a"] and received["b"], "both members must get a share"
    # A partition has one owner at a time: only an uncommitted batch (20 records) handed over in a
    # rebalance can reach both members.
    overlap = {d.event.event_id for d in received["a"]} & {d.event.event_id for d in received["b"]}
    assert len(overlap) <= 40
    for deliveries in received.values():  # each member saw each of its sessions in order
        by_session: dict[str | None, list[int]] = defaultdict(list)
        for delivery in deliveries:
            by_session[delivery.key].append(sequence_of(delivery.event))
        for numbers in by_session.values():
            deduplicated = list(dict.fromkeys(numbers))  # a rebalance may redeliver, never reorder
            assert deduplicated == sorted(deduplicated)


def test_members_of_a_group_hold_disjoint_partitions_and_a_leaver_s_go_to_the_others(event_log: EventLog) -> None:
    """What ``held`` says after a poll: each partition held by one member; all of them between the members.
    Each member polls in a thread of its own, as members do (a Kafka join waits for the others' polls)."""
    every = frozenset(range(event_log.partitions))  # type: ignore[attr-defined]
    held: dict[str, frozenset[int]] = {}
    stop = {"first": threading.Event(), "second": threading.Event()}

    def member(name: str) -> None:
        consumer = event_log.consumer("holders", [events.SIGNALS])
        try:
            while not stop[name].is_set():
                consumer.poll(10, 0.2)
                held[name] = consumer.held()
        finally:
            consumer.close()
            held.pop(name, None)

    threads = {name: threading.Thread(target=member, args=(name,)) for name in stop}
    for thread in threads.values():
        thread.start()
    try:
        def split() -> bool:
            mine, theirs = held.get("first", frozenset()), held.get("second", frozenset())
            return bool(mine) and bool(theirs) and mine | theirs == every and not mine & theirs

        eventually(split, "both members holding their own partitions", timeout_s=60)
        stop["second"].set()
        threads["second"].join()
        eventually(lambda: held.get("first") == every, "the remaining member holding every partition", timeout_s=60)
    finally:
        for name, thread in threads.items():
            stop[name].set()
            thread.join()


def test_large_events_round_trip(event_log: EventLog) -> None:
    big = turn("big", 0, content="x" * (6 << 20))  # 6 MiB of prompt
    event_log.append([big, turn("small", 1)])
    consumer = event_log.consumer("large", [events.TURNS])
    got = poll_until(consumer, 2)
    consumer.close()
    assert {d.event.event_id: d.event for d in got}[big.event_id] == big


def test_an_event_over_the_limit_is_refused_with_nothing_written(event_log: EventLog) -> None:
    too_big = turn("big", 1, content="x" * MAX_EVENT_BYTES)
    with pytest.raises(EventTooLarge, match="the event log takes at most 16,777,216"):
        event_log.append([turn("big", 0), too_big])
    event_log.append([turn("big", 2)])
    reader = event_log.consumer(None, [events.TURNS], start="beginning")
    got = poll_until(reader, 1) + reader.poll(timeout_s=0.5)
    assert [sequence_of(d.event) for d in got] == [2]
    reader.close()


def test_bad_records_are_dead_lettered_and_the_consumer_goes_on(event_log: EventLog) -> None:
    good = [turn("s", 0), turn("s", 1)]
    event_log.append(good[:1])
    event_log.append_raw(events.TURNS, "s", b"\xff\x00 not json")
    event_log.append_raw(events.TURNS, "s", json.dumps({"type": "turn.exploded", "schema_version": 1}).encode())
    future = good[0].model_dump(mode="json") | {"schema_version": 4}
    event_log.append_raw(events.TURNS, "s", json.dumps(future).encode())
    event_log.append(good[1:])

    consumer = event_log.consumer("tolerant", [events.TURNS])
    got = poll_until(consumer, 2)
    consumer.commit()
    consumer.close()
    assert ids(got) == ids([Delivery("", 0, 0, "", e) for e in good])

    letters = event_log.consumer(None, [events.DEAD_LETTERS], start="beginning")
    dead = [d.event for d in poll_until(letters, 3)]
    letters.close()
    assert all(isinstance(letter, events.DeadLettered) for letter in dead)
    reasons = [letter.reason for letter in dead]  # type: ignore[union-attr]
    assert "not a JSON object" in reasons[0]
    assert "unknown event type 'turn.exploded'" in reasons[1]
    assert "schema_version 4 is not supported" in reasons[2]
    assert dead[0].payload == b"\xff\x00 not json"  # type: ignore[union-attr]

    # The bad records were committed with the rest: the group does not trip over them again.
    again = event_log.consumer("tolerant", [events.TURNS])
    assert again.poll(timeout_s=3.0) == []
    again.close()


def test_the_crash_policy_stops_at_a_bad_record(event_log: EventLog) -> None:
    event_log.append_raw(events.TURNS, "s", b"garbage")
    consumer = event_log.consumer("strict", [events.TURNS], on_bad_record=Crash())
    with pytest.raises(UndecodableRecord, match="not a readable event"):
        poll_until(consumer, 1)
    consumer.close()


def test_replay_from_the_beginning_and_seek(event_log: EventLog) -> None:
    sent = [turn("one-session", n) for n in range(8)]
    event_log.append(sent)
    consumer = event_log.consumer("replay", [events.TURNS])
    assert len(poll_until(consumer, 8)) == 8
    consumer.commit()
    consumer.close()

    replay = event_log.consumer("replay", [events.TURNS], start="beginning")
    got = poll_until(replay, 8)
    assert [sequence_of(d.event) for d in got] == list(range(8))
    replay.seek(events.TURNS, got[5].partition, got[5].offset)
    assert [sequence_of(d.event) for d in poll_until(replay, 3)] == [5, 6, 7]
    replay.close()


def test_a_reader_from_the_end_sees_only_new_events(event_log: EventLog) -> None:
    event_log.append([turn("s", 0)])
    reader = event_log.consumer(None, [events.TURNS], start="end")
    assert reader.poll(timeout_s=0.5) == []
    event_log.append([turn("s", 1)])
    assert [sequence_of(d.event) for d in poll_until(reader, 1)] == [1]
    with pytest.raises(CommitFailed):
        reader.commit()
    reader.close()


def test_unknown_topics_are_refused(event_log: EventLog) -> None:
    with pytest.raises(UnknownTopic, match="the topics are turns, feedback"):
        event_log.consumer("g", ["turnz"])
    with pytest.raises(UnknownTopic):
        event_log.append_raw("nope", None, b"{}")
