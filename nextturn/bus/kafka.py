"""The production event log: Apache Kafka (or any Kafka-protocol broker) through kafka-python.

Keys are the events' partition keys (the session for turns and feedback, the scope for signals); every
topic gets the same number of partitions and groups use the range assignor, so partition ``p`` of every
topic goes to one member and a session's turns and feedback meet in one worker.

Two broker quirks shape this file:
- kafka-python's idempotent producer breaks for good when a broker loses its state (UnknownProducerId,
  then InitProducerId failing on every retry). After any failed send the producer is dropped and a new
  one is built; a batch that failed for another reason than a timeout is sent once more at once. A resent
  batch may duplicate records that did land: readers are idempotent by event id.
- A group join waits for other members for up to half the session timeout (Tansu holds every join that
  long), so the session timeout is a constructor argument: short in tests, ~10 s in production.
- kafka-python 3.0 drops a group join that completes between two polls and starts another, so a member whose
  rounds of work outlast its polls could join forever and never hold a partition (nor let the group's other
  members get theirs): it keeps consuming its old partitions, fenced (its commits fail), while the group gives
  them to another member too. While a member is (re)joining, its poll waits long enough for the join to
  complete inside it (docs/experiments.md, 2026-12-06).

Topics are created at first use, as :class:`Topics` says (an existing topic keeps what it was created with:
docs/operations.md says how to change one). Producers write with ``acks=all``: a record is acknowledged once
every in-sync replica has it, and the broker refuses it while fewer than ``min.insync.replicas`` are in sync,
so an acknowledged event survives the loss of a broker. ``connection`` carries kafka-python's TLS and SASL
options (:func:`nextturn.bus.kafka_connection`) to every client.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kafka import ConsumerRebalanceListener, KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.coordinator.assignors.range import RangePartitionAssignor
from kafka.errors import KafkaError, KafkaTimeoutError

from nextturn import events
from nextturn.bus.log import (
    MAX_EVENT_BYTES,
    SCOPE_KEYED,
    SESSION_KEYED,
    BadRecordPolicy,
    DeadLetter,
    Delivery,
    Record,
    Start,
    check_rows,
    check_topics,
    decode_records,
    encode_batch,
)
from nextturn.erasure import Subject
from nextturn.errors import CommitFailed, EventLogUnavailable

_MAX_RECORD_BYTES = MAX_EVENT_BYTES + (1 << 20)  # room for the record batch's own framing
_TOPIC_ALREADY_EXISTS = 36


@dataclass(frozen=True)
class Topics:
    """How the event log's topics are created: all with the same partitions (see the module docstring)."""

    partitions: int = 8
    replication_factor: int = 1
    min_insync_replicas: int = 1

    def spec(self) -> dict[str, Any]:
        return {
            "num_partitions": self.partitions,
            "replication_factor": self.replication_factor,
            "configs": {
                "min.insync.replicas": str(self.min_insync_replicas),
                # Brokers default to ~1 MB records; a long prompt's token ids can be much more.
                "max.message.bytes": str(_MAX_RECORD_BYTES),
            },
        }


class KafkaEventLog:
    def __init__(
        self,
        bootstrap_servers: str,
        *,
        topics: Topics = Topics(),
        connection: Mapping[str, Any] | None = None,
        session_timeout_ms: int = 10_000,
        request_timeout_ms: int = 10_000,
        client_id: str = "nextturn",
    ) -> None:
        self._servers = [server.strip() for server in bootstrap_servers.split(",") if server.strip()]
        self.topics = topics
        self.partitions = topics.partitions
        self._connection = dict(connection or {})
        self._session_timeout_ms = session_timeout_ms
        self._request_timeout_ms = request_timeout_ms
        self._delivery_timeout_s = 2 * request_timeout_ms / 1000
        self._client_id = client_id
        self._producer: KafkaProducer | None = None
        self._topics_ready = False
        self._lock = threading.Lock()

    # -- writing --------------------------------------------------------------------------------------

    def append(self, batch: Iterable[events.Event]) -> None:
        self._send(encode_batch(batch))

    def append_raw(self, topic: str, key: str | None, payload: bytes) -> None:
        self._send([(topic, key, payload)])

    def erase(self, subject: Subject) -> int:
        tombstones: list[tuple[str, str | None, bytes | None]] = [
            (topic, key, None)
            for keys, topics in ((subject.sessions, SESSION_KEYED), (subject.scopes, SCOPE_KEYED))
            for key in sorted(keys) for topic in topics
        ]
        self._send(tombstones)
        return len(tombstones)

    def _send(self, rows: Sequence[tuple[str, str | None, bytes | None]]) -> None:
        check_rows([row for row in rows if row[2] is not None])  # type: ignore[misc]
        if not rows:
            return
        with self._lock:
            try:
                self._send_once(rows)
                return
            except KafkaTimeoutError as exc:
                self._drop_producer()
                raise EventLogUnavailable(f"the Kafka event log did not answer in time: {exc}") from exc
            except KafkaError:
                self._drop_producer()  # may be the idempotent producer broken for good: build a new one
            try:
                self._send_once(rows)
            except KafkaError as exc:
                self._drop_producer()
                raise EventLogUnavailable(f"the Kafka event log refused the batch: {exc}") from exc

    def _send_once(self, rows: Sequence[tuple[str, str | None, bytes | None]]) -> None:
        producer = self._ensure_producer()
        futures = [
            producer.send(topic, key=None if key is None else key.encode(), value=value) for topic, key, value in rows
        ]
        # The sender expires a batch after delivery_timeout_ms, so this wait ends with every future done,
        # either way; nothing stays pending in the producer, which lets it close without blocking.
        producer.flush(timeout=self._delivery_timeout_s + 1)
        for future in futures:
            future.get(timeout=0)

    def _ensure_producer(self) -> KafkaProducer:
        self._ensure_topics()
        if self._producer is None:
            try:
                self._producer = KafkaProducer(
                    bootstrap_servers=self._servers,
                    client_id=self._client_id,
                    **self._connection,
                    enable_idempotence=True,
                    acks="all",
                    linger_ms=1,
                    max_request_size=_MAX_RECORD_BYTES,
                    request_timeout_ms=self._request_timeout_ms,
                    bootstrap_timeout_ms=self._request_timeout_ms,
                    max_block_ms=self._request_timeout_ms,
                    delivery_timeout_ms=int(self._delivery_timeout_s * 1000),
                )
            except KafkaError as exc:
                raise EventLogUnavailable(f"cannot reach Kafka at {','.join(self._servers)}: {exc}") from exc
        return self._producer

    def _drop_producer(self) -> None:
        if self._producer is not None:
            try:
                self._producer.close(timeout=self._delivery_timeout_s)
            except KafkaError:
                pass  # closing a producer we already gave up on: its records were reported as failed
            self._producer = None
        self._topics_ready = False  # a broker that lost its state lost its topics too

    def _ensure_topics(self) -> None:
        """Create the topics (all with the same partition count) unless they exist."""
        if self._topics_ready:
            return
        try:
            admin = KafkaAdminClient(
                bootstrap_servers=self._servers,
                client_id=self._client_id,
                **self._connection,
                request_timeout_ms=self._request_timeout_ms,
                bootstrap_timeout_ms=self._request_timeout_ms,  # an unreachable broker: fail, do not hang 30 s
            )
        except KafkaError as exc:
            raise EventLogUnavailable(f"cannot reach Kafka at {','.join(self._servers)}: {exc}") from exc
        spec = self.topics.spec()
        try:
            response = admin.create_topics({topic: spec for topic in events.TOPICS}, raise_errors=False)
        except KafkaError as exc:
            raise EventLogUnavailable(f"cannot create the event log's topics: {exc}") from exc
        finally:
            admin.close()
        failed = [
            f"{topic['name']}: {topic['error_message'] or topic['error_code']}"
            for topic in response["topics"]
            if topic["error_code"] not in (0, _TOPIC_ALREADY_EXISTS)
        ]
        if failed:
            raise EventLogUnavailable(f"cannot create the event log's topics: {'; '.join(failed)}")
        self._topics_ready = True

    # -- reading --------------------------------------------------------------------------------------

    def consumer(
        self,
        group: str | None,
        topics: Sequence[str],
        *,
        start: Start = "committed",
        on_bad_record: BadRecordPolicy | None = None,
    ) -> KafkaEventConsumer:
        check_topics(topics)
        with self._lock:
            self._ensure_topics()
        try:
            consumer = KafkaConsumer(
                bootstrap_servers=self._servers,
                client_id=self._client_id,
                **self._connection,
                group_id=group,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                session_timeout_ms=self._session_timeout_ms,
                heartbeat_interval_ms=max(100, self._session_timeout_ms // 4),
                request_timeout_ms=max(self._request_timeout_ms, self._session_timeout_ms + 5000),
                bootstrap_timeout_ms=self._request_timeout_ms,
                max_partition_fetch_bytes=_MAX_RECORD_BYTES,
                fetch_max_bytes=4 * MAX_EVENT_BYTES,
                partition_assignment_strategy=(RangePartitionAssignor,),
            )
        except KafkaError as exc:
            raise EventLogUnavailable(f"cannot reach Kafka at {','.join(self._servers)}: {exc}") from exc
        return KafkaEventConsumer(consumer, group, tuple(topics), start, on_bad_record or DeadLetter(self),
                                  join_wait_ms=self._session_timeout_ms + 2000)

    def close(self) -> None:
        with self._lock:
            self._drop_producer()


class _StartAt(ConsumerRebalanceListener):
    """Moves a partition to the beginning or the end the first time this consumer is given it."""

    def __init__(self, consumer: KafkaConsumer, start: Start) -> None:
        self._consumer = consumer
        self._start = start
        self._seen: set[TopicPartition] = set()

    def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        pass

    def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        fresh = [tp for tp in assigned if tp not in self._seen]
        self._seen.update(fresh)
        if fresh and self._start == "beginning":
            self._consumer.seek_to_beginning(*fresh)
        elif fresh and self._start == "end":
            self._consumer.seek_to_end(*fresh)


def _text(key: bytes | None) -> str | None:
    return None if key is None else key.decode()


class KafkaEventConsumer:
    def __init__(
        self,
        consumer: KafkaConsumer,
        group: str | None,
        topics: tuple[str, ...],
        start: Start,
        on_bad_record: BadRecordPolicy,
        join_wait_ms: int = 12_000,
    ) -> None:
        self._consumer = consumer
        self._join_wait_ms = join_wait_ms
        self._group = group
        self._on_bad_record = on_bad_record
        try:
            if group is None:
                partitions = [
                    TopicPartition(topic, p)
                    for topic in topics
                    for p in sorted(consumer.partitions_for_topic(topic) or ())
                ]
                consumer.assign(partitions)
                if start == "end":
                    consumer.seek_to_end(*partitions)
                else:
                    consumer.seek_to_beginning(*partitions)
            else:
                consumer.subscribe(list(topics), listener=_StartAt(consumer, start))
        except KafkaError as exc:
            consumer.close()
            raise EventLogUnavailable(f"cannot subscribe to {', '.join(topics)}: {exc}") from exc

    def poll(self, max_records: int = 500, timeout_s: float = 1.0) -> list[Delivery]:
        wait_ms = int(timeout_s * 1000)
        if self._joining():
            wait_ms = max(wait_ms, self._join_wait_ms)  # see the module docstring: let a join complete in it
        try:
            batches = self._consumer.poll(timeout_ms=wait_ms, max_records=max_records)
        except KafkaError as exc:
            raise EventLogUnavailable(f"cannot read from Kafka: {exc}") from exc
        records = [
            Record(tp.topic, tp.partition, message.offset, _text(message.key), message.value)
            for tp, messages in batches.items()
            for message in messages
        ]
        return decode_records(records, self._on_bad_record)

    def _joining(self) -> bool:
        """Whether the group is (re)joining this member. kafka-python keeps this to its coordinator, so it is
        read defensively: without it, a member that holds nothing counts as joining."""
        if self._group is None:
            return False
        try:
            return bool(self._consumer._coordinator.need_rejoin())
        except Exception:  # another kafka-python: the public sign only
            return not self._consumer.assignment()

    def commit(self) -> None:
        if self._group is None:
            raise CommitFailed("a consumer without a group has nothing to commit to")
        try:
            self._consumer.commit()
        except KafkaError as exc:
            raise CommitFailed(f"the commit was refused; records since the last commit come again: {exc}") from exc

    def seek(self, topic: str, partition: int, offset: int) -> None:
        self._consumer.seek(TopicPartition(topic, partition), offset)

    def held(self) -> frozenset[int]:
        return frozenset(tp.partition for tp in self._consumer.assignment())

    def close(self) -> None:
        self._consumer.close()
