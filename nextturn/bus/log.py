"""The event log's interface, shared by its backends, and the handling of records that are not events.

Delivery is at least once. A consumer reads a batch with :meth:`Consumer.poll`, makes its effects durable
and idempotent (keyed by ``event_id``), then calls :meth:`Consumer.commit`, which commits everything polled
so far, bad records included. A consumer that dies before committing gets its batch again after the group
notices (the session timeout), so effects are exactly once.

Records with the same key keep their order (one partition). Events are keyed by
``event.partition_key``: the session for turns and feedback, so that a session's turns and feedback reach
the same member of a group (every topic has the same number of partitions, and both backends assign
partition ``p`` of every topic to the same member); the scope for signals, adapters and deployments, so that
one member of a group holds all of a scope's. A signal that also trains the shared scope is written once
more under that key (``record_keys``): the same event, which readers count once by its id.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from nextturn import events
from nextturn.erasure import Subject
from nextturn.errors import EventError, EventTooLarge, UndecodableRecord, UnknownTopic

# Topics whose records are keyed by session, and by scope (nextturn.events: partition_key).
SESSION_KEYED = (events.TURNS, events.FEEDBACK, events.DEAD_LETTERS)
SCOPE_KEYED = (events.SIGNALS, events.ADAPTERS, events.DEPLOYMENTS)

Start = Literal["committed", "beginning", "end"]
Row = tuple[str, str | None, bytes]  # topic, key, encoded event
MAX_EVENT_BYTES = 16 << 20  # a turn with a very long prompt: its token ids are most of it
UNWRITABLE_KEPT = 64 << 10  # what a dead letter keeps of an event that could not be written


@dataclass(frozen=True, slots=True)
class Record:
    """A record as stored, before decoding. Offsets grow within a partition (not always by one)."""

    topic: str
    partition: int
    offset: int
    key: str | None
    value: bytes | None  # None: a tombstone (Kafka), which says an erased key's records are gone


@dataclass(frozen=True, slots=True)
class Delivery:
    topic: str
    partition: int
    offset: int
    key: str | None
    event: events.Event


class Consumer(Protocol):
    def poll(self, max_records: int = 500, timeout_s: float = 1.0) -> list[Delivery]:
        """Wait up to ``timeout_s`` for records of this consumer's partitions; decode them."""
        ...

    def commit(self) -> None:
        """Commit every record polled so far (raises CommitFailed if the group took them away)."""
        ...

    def seek(self, topic: str, partition: int, offset: int) -> None:
        """Read ``topic``/``partition`` again from ``offset`` (a partition this consumer holds)."""
        ...

    def held(self) -> frozenset[int]:
        """The partitions (of every topic) this consumer holds since its last poll: a group moves them
        between members inside ``poll``, never between two polls."""
        ...

    def close(self) -> None: ...


class EventLog(Protocol):
    def append(self, batch: Iterable[events.Event]) -> None:
        """Append events to their topics; durable when this returns.

        Raises EventLogUnavailable, or EventTooLarge (over MAX_EVENT_BYTES) before writing any of the batch.
        """
        ...

    def append_raw(self, topic: str, key: str | None, payload: bytes) -> None:
        """Append an already encoded payload (a spool being replayed, a foreign producer)."""
        ...

    def erase(self, subject: Subject) -> int:
        """Remove the records of an erasure (:mod:`nextturn.erasure`): the sessions' (turns, feedback, their
        signals, dead letters), a tenant's, and the scopes' (signals, adapters, deployments). SQLite deletes
        them; Kafka appends a tombstone (a record without a value) under each erased key, which a compacted
        topic drops and every consumer skips. Returns how many records were deleted, or tombstones written."""
        ...

    def consumer(
        self,
        group: str | None,
        topics: Sequence[str],
        *,
        start: Start = "committed",
        on_bad_record: BadRecordPolicy | None = None,
    ) -> Consumer:
        """A consumer in ``group``; ``group=None`` reads every partition and cannot commit.

        ``start`` says where a partition is first read from: the group's committed offset (the beginning
        when there is none), the beginning (a replay), or the end (only new records).
        The default bad-record policy dead-letters into this same log.
        """
        ...

    def close(self) -> None: ...


class BadRecordPolicy(Protocol):
    def __call__(self, record: Record, error: EventError) -> None: ...


class DeadLetter:
    """Sets a bad record aside on the ``dead-letters`` topic and lets its consumer go on.

    The dead letter's id is derived from the record's position, so a redelivered bad record yields the
    same event id and idempotent readers count it once.
    """

    def __init__(self, log: EventLog) -> None:
        self._log = log

    def __call__(self, record: Record, error: EventError) -> None:
        self._log.append([dead_letter(record, str(error))])


def dead_letter(record: Record, reason: str) -> events.DeadLettered:
    """The dead letter for a record; its id is the record's position, whoever sets it aside."""
    return events.DeadLettered(
        event_id=f"dead-{record.topic}-{record.partition}-{record.offset}",
        source_topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        key=record.key,
        payload_b64=base64.b64encode(record.value or b"").decode(),
        reason=reason,
    )


def unwritable(event: events.Event, reason: str) -> events.DeadLettered:
    """The dead letter for an event that cannot go on the log as it is (not encodable as UTF-8, or over
    MAX_EVENT_BYTES): its JSON with every non-ASCII character escaped, cut to ``UNWRITABLE_KEPT`` bytes."""
    payload = json.dumps(event.model_dump(mode="json"), ensure_ascii=True).encode()
    return events.DeadLettered(
        event_id=f"dead-unwritable-{event.event_id}",
        source_topic=event.TOPIC,
        partition=-1,  # it never had a place on the log
        offset=-1,
        key=event.partition_key,
        payload_b64=base64.b64encode(payload[:UNWRITABLE_KEPT]).decode(),
        reason=reason if len(payload) <= UNWRITABLE_KEPT else f"{reason} (payload cut to {UNWRITABLE_KEPT:,} bytes)",
    )


class Crash:
    """Stops the consumer at the first bad record (for tools where skipping would hide a problem)."""

    def __call__(self, record: Record, error: EventError) -> None:
        raise UndecodableRecord(
            f"{record.topic}[{record.partition}]@{record.offset} is not a readable event: {error}"
        ) from error


def decode_records(records: Iterable[Record], on_bad_record: BadRecordPolicy) -> list[Delivery]:
    deliveries = []
    for record in records:
        if record.value is None:
            continue  # a tombstone: nothing to read
        try:
            event = events.decode(record.value)
        except EventError as exc:
            on_bad_record(record, exc)
            continue
        deliveries.append(Delivery(record.topic, record.partition, record.offset, record.key, event))
    return deliveries


def encode_batch(batch: Iterable[events.Event]) -> list[Row]:
    rows: list[Row] = []
    for event in batch:
        payload = event.encode()
        rows.extend((event.TOPIC, key, payload) for key in event.record_keys)
    return rows


def check_rows(rows: Sequence[Row]) -> None:
    """Refuse a batch with an unknown topic or an event over the limit before any of it is written."""
    check_topics({topic for topic, _, _ in rows})
    for topic, key, payload in rows:
        if len(payload) > MAX_EVENT_BYTES:
            raise EventTooLarge(
                f"an event for {topic} (key {key!r}) is {len(payload):,} bytes; the event log takes at most "
                f"{MAX_EVENT_BYTES:,}"
            )


def check_topics(topics: Iterable[str]) -> None:
    unknown = sorted(set(topics) - set(events.TOPICS))
    if unknown:
        raise UnknownTopic(f"unknown topic(s) {', '.join(unknown)}; the topics are {', '.join(events.TOPICS)}")
