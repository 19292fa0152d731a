"""What only one backend has to show: Kafka's broker failures, SQLite's several processes on one file."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest
import trustme
from kafka import KafkaAdminClient

from nextturn import events
from nextturn.bus import open_event_log
from nextturn.bus.kafka import KafkaEventLog, Topics
from nextturn.bus.sqlite import SqliteEventLog
from nextturn.errors import ConfigError, EventLogUnavailable
from nextturn.settings import Settings

from support.event_logs import open_log, poll_until
from support.eventually import eventually
from support.factories import sequence_of, turn
from support.faults import TcpProxy
from support.services import Tansu, free_port

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


@pytest.mark.kafka
def test_kafka_topics_are_created_with_the_settings_partitions_and_replicas(tansu: Tansu, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, bus="kafka", kafka_bootstrap_servers=tansu.bootstrap_servers,
                        kafka_partitions=3, kafka_replication_factor=2, kafka_min_insync_replicas=2)
    log = open_event_log(settings)
    log.append([turn("s", 0)])
    log.close()
    admin = KafkaAdminClient(bootstrap_servers=tansu.bootstrap_servers)
    described = {topic["name"]: topic["partitions"] for topic in admin.describe_topics(list(events.TOPICS))}
    admin.close()
    assert {name: len(partitions) for name, partitions in described.items()} == dict.fromkeys(events.TOPICS, 3)
    assert {len(p["replica_nodes"]) for partitions in described.values() for p in partitions} == {2}


def test_kafka_settings_that_cannot_work_fail_at_start(tmp_path: Path) -> None:
    kafka = {"bus": "kafka", "kafka_bootstrap_servers": "kafka:9092"}
    with pytest.raises(ConfigError, match="MIN_INSYNC_REPLICAS \\(3\\) is above"):
        Settings.load(**kafka, kafka_replication_factor=2, kafka_min_insync_replicas=3)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="needs NEXTTURN_KAFKA_SASL_USERNAME"):
        Settings.load(**kafka, kafka_security_protocol="SASL_SSL")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="is not a file"):
        Settings.load(**kafka, kafka_security_protocol="SSL", kafka_ssl_cafile=tmp_path / "ca.pem")  # type: ignore[arg-type]


@pytest.mark.kafka
def test_kafka_over_tls_with_a_client_certificate(tmp_path: Path) -> None:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    ca.configure_trust(server)
    server.verify_mode = ssl.CERT_REQUIRED
    proxy_port = free_port()
    broker = Tansu(advertised_port=proxy_port)  # clients are sent back to the TLS end
    broker.start()
    proxy = TcpProxy(broker.port, port=proxy_port, tls=server)
    proxy.start()
    try:
        ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
        client = ca.issue_cert("nextturn-client")
        client.cert_chain_pems[0].write_to_path(str(tmp_path / "client.pem"))
        client.private_key_pem.write_to_path(str(tmp_path / "client.key"))
        base = {"data_dir": tmp_path, "bus": "kafka", "kafka_bootstrap_servers": f"127.0.0.1:{proxy_port}",
                "kafka_replication_factor": 1, "kafka_min_insync_replicas": 1, "kafka_security_protocol": "SSL",
                "kafka_ssl_cafile": tmp_path / "ca.pem"}
        log = open_event_log(Settings(**base, kafka_ssl_certfile=tmp_path / "client.pem",  # type: ignore[arg-type]
                                      kafka_ssl_keyfile=tmp_path / "client.key"))
        log.append([turn("s", 0)])
        reader = log.consumer(None, [events.TURNS], start="beginning")
        assert [sequence_of(d.event) for d in poll_until(reader, 1)] == [0]
        reader.close()
        log.close()
        refused = open_event_log(Settings(**base))  # type: ignore[arg-type]  # no client certificate
        with pytest.raises(EventLogUnavailable):
            refused.append([turn("s", 1)])
        refused.close()
    finally:
        proxy.stop()
        broker.stop()


@pytest.mark.kafka
def test_a_member_busy_between_polls_joins_and_shares_when_another_joins(tansu: Tansu) -> None:
    """A member that works between short polls (a trainer's round) still joins, and gives up partitions when
    another member joins: kafka-python drops a join that completes between two polls, so a joining member
    waits in its poll for the join (nextturn/bus/kafka.py). The production session timeout, 10 s."""
    log = KafkaEventLog(tansu.bootstrap_servers, topics=Topics(partitions=4), session_timeout_ms=10_000)
    log.append([turn("s", 0)])
    busy = log.consumer("busy-members", [events.TURNS])

    def work_once() -> frozenset[int]:
        busy.poll(timeout_s=0.5)
        time.sleep(1.5)  # the round's work
        return busy.held()

    assert eventually(work_once, "the busy member to join", timeout_s=60, interval_s=0) == frozenset(range(4))
    idle = log.consumer("busy-members", [events.TURNS])
    stop = threading.Event()
    polling = threading.Thread(target=lambda: [idle.poll(timeout_s=0.5) for _ in iter(stop.is_set, True)])
    polling.start()
    try:
        shared = eventually(lambda: (work_once(), idle.held()), "the partitions shared", timeout_s=90,
                            interval_s=0, until=lambda held: held[0] and held[1] and not held[0] & held[1])
    finally:
        stop.set()
        polling.join(30)
    assert shared[0] | shared[1] == frozenset(range(4))
    busy.close()
    idle.close()
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
