"""Recording never hurts serving: the publisher queues, spools when the log is down, and replays in order."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest

from gateway.publisher import Publisher, PublisherStopped, Spool
from nextturn import events
from nextturn.bus import Consumer, EventLog
from nextturn.bus.kafka import KafkaEventLog
from nextturn.bus.log import MAX_EVENT_BYTES
from nextturn.bus.sqlite import SqliteEventLog
from nextturn.erasure import Rules

from support.event_logs import poll_until
from support.eventually import eventually
from support.factories import sequence_of, turn
from support.services import Tansu


def arrived(log: EventLog, count: int, timeout_s: float = 60) -> list[int]:
    reader: Consumer = log.consumer(None, [events.TURNS], start="beginning")
    got = poll_until(reader, count, timeout_s) + reader.poll(timeout_s=0.5)  # and nothing more
    reader.close()
    return [sequence_of(d.event) for d in got]


def wait_until_spool_is_empty(publisher: Publisher, timeout_s: float = 60) -> None:
    eventually(lambda: len(publisher.spool) == 0, "the spool to be replayed", timeout_s=timeout_s)


def test_events_reach_the_log_in_order(tmp_path: Path) -> None:
    log = SqliteEventLog(tmp_path / "events.db")
    publisher = Publisher(log, tmp_path / "spool")
    publisher.start()
    for n in range(200):
        publisher.publish(turn("one-session", n))
    publisher.stop()
    assert arrived(log, 200) == list(range(200))
    assert not list((tmp_path / "spool").iterdir())  # nothing spooled: no spool and no claim left behind
    log.close()


def test_an_event_that_cannot_be_written_is_set_aside_and_the_rest_go_on(tmp_path: Path) -> None:
    """A lone surrogate (valid JSON, not UTF-8) or an event over the log's limit would stop every event
    behind it; each becomes a dead letter with its reason, the others arrive in order, whether the log took
    them at once or from the spool."""
    log = SqliteEventLog(tmp_path / "events.db")
    publisher = Publisher(log, tmp_path / "spool")
    publisher.start()
    lone = turn("one-session", 1, content="\ud800")
    huge = turn("one-session", 3, content="x" * (MAX_EVENT_BYTES + 1))
    for event in (turn("one-session", 0), lone, turn("one-session", 2), huge, turn("one-session", 4)):
        publisher.publish(event)
    assert arrived(log, 3) == [0, 2, 4]
    publisher.spool.write([turn("one-session", 5)])  # the log "was down": the next ones go behind the spool
    publisher.publish(turn("one-session", 6, content="\udfff"))
    publisher.publish(turn("one-session", 7))
    wait_until_spool_is_empty(publisher)
    assert publisher.failure is None
    publisher.stop()
    assert arrived(log, 5) == [0, 2, 4, 5, 7]
    reader = log.consumer(None, [events.DEAD_LETTERS], start="beginning")
    dead = [delivery.event for delivery in poll_until(reader, 3)]
    reader.close()
    log.close()
    assert [letter.event_id for letter in dead] == [f"dead-unwritable-{e.event_id}" for e in (lone, huge)] + [
        dead[2].event_id]
    assert all(isinstance(letter, events.DeadLettered) and letter.source_topic == events.TURNS for letter in dead)
    assert "cannot be encoded" in dead[0].reason and "\\ud800" in dead[0].payload.decode()
    assert "the event log takes at most" in dead[1].reason and "payload cut" in dead[1].reason


class _CountingLog(SqliteEventLog):
    """A real SQLite log that counts its writes."""

    appends = 0

    def append(self, batch: Sequence[events.Event]) -> None:
        self.appends += 1
        super().append(batch)


def test_events_published_together_are_written_together(tmp_path: Path) -> None:
    log = _CountingLog(tmp_path / "events.db")
    publisher = Publisher(log, tmp_path / "spool", linger_s=2.0)  # far longer than 50 publishes take
    publisher.start()
    for n in range(50):
        publisher.publish(turn("one-session", n))
    publisher.stop()  # stopping cuts the linger short and delivers what is queued
    assert arrived(log, 50) == list(range(50))
    assert log.appends == 1
    log.close()


@pytest.mark.kafka
def test_while_the_log_is_down_events_spool_and_then_arrive_once_in_order(tansu: Tansu, tmp_path: Path) -> None:
    log = KafkaEventLog(tansu.bootstrap_servers, request_timeout_ms=1000, session_timeout_ms=2000)
    publisher = Publisher(log, tmp_path / "spool", retry_pause_s=(0.1, 0.5))
    publisher.start()
    publisher.publish(turn("s", 0))
    assert arrived(log, 1) == [0]

    tansu.stop()
    for n in range(1, 31):
        publisher.publish(turn("s", n))  # returns at once: the request path never waits on the log
    eventually(lambda: len(publisher.spool) == 30, "30 events in the spool")

    tansu.start()  # an empty broker on the same port: everything spooled must arrive now
    wait_until_spool_is_empty(publisher)
    publisher.publish(turn("s", 31))
    publisher.stop()
    assert arrived(log, 31) == list(range(1, 32))
    log.close()


@pytest.mark.kafka
def test_a_restarted_gateway_replays_the_spool_it_finds(tansu: Tansu, tmp_path: Path) -> None:
    log = KafkaEventLog(tansu.bootstrap_servers, request_timeout_ms=1000, session_timeout_ms=2000)
    tansu.stop()
    before = Publisher(log, tmp_path / "spool", retry_pause_s=(0.1, 0.5))
    before.start()
    for n in range(10):
        before.publish(turn("s", n))
    before.stop(timeout_s=30)  # the log is down: what was queued is spooled before the thread ends
    assert len(before.spool) == 10 and before.spool.path.exists()

    tansu.start()
    after = Publisher(log, tmp_path / "spool")
    after.start()
    wait_until_spool_is_empty(after)
    after.stop()
    assert arrived(log, 10) == list(range(10))
    log.close()


def test_a_torn_last_line_is_cut_and_the_rest_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "spool.jsonl"
    Spool(path).write([turn("s", 0), turn("s", 1)])
    with path.open("ab") as file:
        file.write(turn("s", 2).encode()[:40])  # the process died in the middle of this write
    spool = Spool(path)
    assert len(spool) == 2
    spool.write([turn("s", 3)])
    assert [sequence_of(e) for _, e in spool.read()] == [0, 1, 3]


class _Unavailable:
    """An event log that is down: the real interface, failing as the real backends fail."""

    def append(self, batch: Iterable[events.Event]) -> None:
        from nextturn.errors import EventLogUnavailable

        raise EventLogUnavailable("down for the test")


def test_a_full_queue_spills_to_the_spool_and_loses_nothing(tmp_path: Path) -> None:
    publisher = Publisher(_Unavailable(), tmp_path / "spool", capacity=1)  # type: ignore[arg-type]
    publisher.start()
    for n in range(50):
        publisher.publish(turn(f"s{n}", n))
    publisher.stop()
    assert sorted(sequence_of(e) for _, e in publisher.spool.read()) == list(range(50))


class _BrokenOnce:
    """A log whose first append fails with a bug (not an outage); then the real SQLite log."""

    def __init__(self, log: EventLog) -> None:
        self.log, self.failed = log, False

    def append(self, batch: Sequence[events.Event]) -> None:
        if not self.failed:
            self.failed = True
            raise RuntimeError("a bug, not an outage")
        self.log.append(batch)


def test_a_dead_publisher_says_so_and_a_restart_delivers_everything_in_order(tmp_path: Path) -> None:
    log = SqliteEventLog(tmp_path / "events.db")
    publisher = Publisher(_BrokenOnce(log), tmp_path / "spool")  # type: ignore[arg-type]
    publisher.start()
    publisher.publish(turn("s", 0))
    eventually(lambda: publisher.failure, "the publisher to fail")
    assert isinstance(publisher.failure, RuntimeError)
    for n in (1, 2):  # while it is dead, requests go on: their events wait
        publisher.publish(turn("s", n))
    publisher.restart()
    assert publisher.failure is None
    publisher.stop()
    assert arrived(log, 3) == [0, 1, 2]  # the batch the dead thread held came first
    with pytest.raises(PublisherStopped):
        publisher.publish(turn("s", 3))


def test_publishers_sharing_a_directory_spool_apart_and_a_spool_left_behind_is_adopted(tmp_path: Path) -> None:
    """Gateway replicas share a data directory: each spools to a file of its own, and one that is gone
    (stopped with the log down, killed) leaves its spool to the next publisher, which replays it."""
    directory = tmp_path / "spool"
    left, alive = (Publisher(_Unavailable(), directory, retry_pause_s=(0.1, 0.5))  # type: ignore[arg-type]
                   for _ in range(2))
    legacy = Spool(tmp_path / "spool.jsonl")  # where earlier versions kept the one spool
    legacy.write([turn("old", n) for n in range(3)])
    left.start(), alive.start()
    for n in range(10):
        left.publish(turn("left", n))
        alive.publish(turn("alive", n))
    eventually(lambda: len(left.spool) == 10 and len(alive.spool) == 10, "both spools written")
    assert left.spool.path != alive.spool.path
    left.stop()  # the log is down: its spool stays, unclaimed

    log = SqliteEventLog(tmp_path / "events.db")
    adopter = Publisher(log, directory, adopt=[legacy.path])
    adopter.start()
    wait_until_spool_is_empty(adopter)
    adopter.stop()
    got = arrived(log, 13)
    assert sorted(got) == sorted([*range(3), *range(10)])  # the legacy spool's 3, left's 10
    assert not left.spool.path.exists() and not legacy.path.exists()
    assert len(alive.spool) == 10 and alive.spool.path.exists()  # a live publisher's spool is not taken
    alive.stop()
    log.close()


class _DownUntil:
    """An event log that is down until ``up`` is set, then the real SQLite log."""

    def __init__(self, log: EventLog) -> None:
        self.log, self.up = log, False

    def append(self, batch: Sequence[events.Event]) -> None:
        if not self.up:
            from nextturn.errors import EventLogUnavailable

            raise EventLogUnavailable("down for the test")
        self.log.append(batch)


def test_a_forgotten_sessions_events_leave_the_spool_and_the_queue(tmp_path: Path) -> None:
    """An erasure reaches what waits in a gateway: the spool is rewritten without the session's events and
    none of them is delivered when the log is back; the rest arrive in order."""
    log = SqliteEventLog(tmp_path / "events.db")
    flaky = _DownUntil(log)
    publisher = Publisher(flaky, tmp_path / "spool", retry_pause_s=(0.05, 0.1))  # type: ignore[arg-type]
    publisher.start()
    for n in range(20):
        publisher.publish(turn("gone" if n % 2 else "kept", n))
    eventually(lambda: len(publisher.spool) == 20, "20 events in the spool")
    publisher.forget(Rules(sessions=frozenset({"gone"})))
    eventually(lambda: len(publisher.spool) == 10, "the forgotten session's events to leave the spool")
    assert b'"gone"' not in publisher.spool.path.read_bytes()
    publisher.publish(turn("gone", 21))  # queued after the erasure: never delivered either
    publisher.publish(turn("kept", 22))
    flaky.up = True
    wait_until_spool_is_empty(publisher)
    publisher.stop()
    assert arrived(log, 11) == [*range(0, 20, 2), 22]
    log.close()


def test_with_the_log_down_and_the_disk_full_requests_go_on_and_only_a_full_queue_drops_counted(
        tmp_path: Path) -> None:
    log = SqliteEventLog(tmp_path / "events.db")
    flaky = _DownUntil(log)
    publisher = Publisher(flaky, tmp_path / "spool", capacity=5, retry_pause_s=(0.05, 0.1))  # type: ignore[arg-type]
    publisher.spool.path.mkdir()  # every write to the spool fails, as on a full disk
    publisher.start()
    for n in range(20):
        publisher.publish(turn("s", n))  # never raises
    eventually(lambda: publisher.disk_full, "the publisher to find the disk full")
    assert publisher.failure is None and publisher.dropped > 0
    publisher.spool.path.rmdir()
    flaky.up = True
    eventually(lambda: publisher.queued == 0, "what waited in memory to be delivered")
    publisher.stop()
    delivered = arrived(log, 20 - publisher.dropped)
    assert len(delivered) == 20 - publisher.dropped and delivered == sorted(delivered)
    log.close()
