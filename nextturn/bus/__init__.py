"""The event log: topics of events, consumed by groups with explicit commits. See :mod:`nextturn.bus.log`."""

from __future__ import annotations

from typing import Any

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
    "kafka_connection",
    "open_event_log",
]


def open_event_log(settings: Settings) -> EventLog:
    """The event log that Settings name. The Kafka client is imported only when it is used."""
    if settings.bus == "kafka":
        from nextturn.bus.kafka import KafkaEventLog, Topics

        assert settings.kafka_bootstrap_servers is not None  # Settings refuses kafka without servers
        topics = Topics(settings.kafka_partitions, settings.kafka_replication_factor,
                        settings.kafka_min_insync_replicas)
        return KafkaEventLog(settings.kafka_bootstrap_servers, topics=topics, connection=kafka_connection(settings))
    from nextturn.bus.sqlite import SqliteEventLog

    return SqliteEventLog(settings.event_log_path)


def kafka_connection(settings: Settings) -> dict[str, Any]:
    """kafka-python's options for TLS and SASL, from Settings (the same for producers, consumers and admins).

    >>> kafka_connection(Settings())
    {'security_protocol': 'PLAINTEXT'}
    """
    options: dict[str, Any] = {"security_protocol": settings.kafka_security_protocol}
    if settings.kafka_security_protocol in ("SSL", "SASL_SSL"):
        options |= {"ssl_check_hostname": True}
        if settings.kafka_ssl_cafile is not None:
            options["ssl_cafile"] = str(settings.kafka_ssl_cafile)
        if settings.kafka_ssl_certfile is not None and settings.kafka_ssl_keyfile is not None:
            options |= {"ssl_certfile": str(settings.kafka_ssl_certfile),
                        "ssl_keyfile": str(settings.kafka_ssl_keyfile)}
    if settings.kafka_security_protocol.startswith("SASL"):
        options |= {"sasl_mechanism": settings.kafka_sasl_mechanism,
                    "sasl_plain_username": settings.kafka_sasl_username,
                    "sasl_plain_password": settings.kafka_sasl_password}
    return options
