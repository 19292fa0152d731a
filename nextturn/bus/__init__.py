"""The event log: topics of events, consumed by groups with explicit commits. See :mod:`nextturn.bus.log`."""

from __future__ import annotations

from nextturn.bus.log import BadRecordPolicy, Consumer, Crash, DeadLetter, Delivery, EventLog, Record, Start
from nextturn.settings import Settings

__all__ = [
    "BadRecordPolicy",
    "Consumer",
    "Crash",
    "DeadLetter",
    "Delivery",
    "EventLog",
    "Record",
    "Start",
    "open_event_log",
]


def open_event_log(settings: Settings) -> EventLog:
    """The event log that Settings name. The Kafka client is imported only when it is used."""
    if settings.bus == "kafka":
        from nextturn.bus.kafka import KafkaEventLog

        assert settings.kafka_bootstrap_servers is not None  # Settings refuses kafka without servers
        return KafkaEventLog(settings.kafka_bootstrap_servers)
    from nextturn.bus.sqlite import SqliteEventLog

    return SqliteEventLog(settings.event_log_path)
