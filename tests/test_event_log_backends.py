"""What only one backend has to show: Kafka's broker failures, SQLite's several processes on one file."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from nextturn import events
from nextturn.bus.kafka import KafkaEventLog
from nextturn.bus.sqlite import SqliteEventLog
from nextturn.errors import EventLogUnavailable

from support.event_logs import open_log, poll_until
from support.factories import sequence_of, turn
from support.services import Tansu

TESTS = Path(__file__).parent



@pytest.mark.kafka
def test_kafka_producer_recovers_when_the_broker_loses_its_state(tansu: Tansu) -> None:
    log = open_log("kafka", tansu.bootstrap_servers)
    log.append([turn("s", 0)])
    tansu.restart()  # memory-only: topics and idempotent producer ids are gone
    log.append([turn("s", 1)])  # the old producer would fail with UnknownProducerId for good

    reader = log.consumer(None, [events.TURNS], start="beginning")
    assert [sequence_of(d.event) for d in poll_until(reader, 1)] == [1]
    reader.close()
    log.close()


@pytest.mark.kafka
def test_kafka_down_is_a_clear_error(tansu: Tansu) -> None:
    log = KafkaEventLog(tansu.bootstrap_servers, request_timeout_ms=1500)
    log.append([turn("s", 0)])
    tansu.stop()
    with pytest.raises(EventLogUnavailable, match="Kafka"):
        log.append([turn("s", 1)])
    tansu.start()  # same port: the log works again without being rebuilt
    log.append([turn("s", 2)])
    reader = log.consumer(None, [events.TURNS], start="beginning")
    assert [sequence_of(d.event) for d in poll_until(reader, 1)] == [2]
    reader.close()
    log.close()


WRITER = """
import sys
from support.factories import turn
from support.event_logs import open_log
log = open_log("sqlite", sys.argv[1])
for n in range(200):
    log.append([turn("writer-" + sys.argv[2], n)])
log.close()
"""


def test_sqlite_log_takes_appends_from_several_processes(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    SqliteEventLog(path).close()  # created once, then shared
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(k)], env=env) for k in range(3)]
    assert [writer.wait(timeout=120) for writer in writers] == [0, 0, 0]

    log = SqliteEventLog(path)
    reader = log.consumer(None, [events.TURNS])
    got = poll_until(reader, 600)
    reader.close()
    log.close()
    by_writer: dict[str | None, list[int]] = defaultdict(list)
    for delivery in got:
        by_writer[delivery.key].append(sequence_of(delivery.event))
    assert by_writer == {f"writer-{k}": list(range(200)) for k in range(3)}


def test_sqlite_partition_count_is_fixed_when_the_file_is_created(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    SqliteEventLog(path, partitions=3).close()
    reopened = SqliteEventLog(path, partitions=16)
    assert reopened.partitions == 3
    assert {reopened.partition_of(f"k{n}") for n in range(100)} == {0, 1, 2}
    reopened.close()


def test_sqlite_consumer_that_leaves_hands_its_partitions_over_at_once(tmp_path: Path) -> None:
    log = SqliteEventLog(tmp_path / "events.db", session_timeout_s=60.0)
    first = log.consumer("g", [events.TURNS])
    second = log.consumer("g", [events.TURNS])
    first.poll(timeout_s=0.1)
    second.poll(timeout_s=0.1)
    second.close()  # a clean leave, not a death: no need to wait out the 60 s session timeout
    log.append([turn(f"s{n}", n) for n in range(30)])
    got = poll_until(first, 30, timeout_s=30)  # half the session timeout: only a handover can explain it
    first.close()
    log.close()
    assert len(got) == 30
