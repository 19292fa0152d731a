"""Both event-log backends as the tests open them (also imported by child processes)."""

from __future__ import annotations

from pathlib import Path

from nextturn.bus import EventLog
from nextturn.bus.kafka import KafkaEventLog
from nextturn.bus.sqlite import SqliteEventLog

# Consumers in tests notice a dead member within 2 s. Tansu also holds every group join for half the
# session timeout, so a short one keeps the Kafka tests quick.
SESSION_TIMEOUT_S = 2.0


def open_log(backend: str, where: str) -> EventLog:
    """``where`` is a SQLite path or Kafka bootstrap servers."""
    if backend == "sqlite":
        return SqliteEventLog(Path(where), session_timeout_s=SESSION_TIMEOUT_S)
    return KafkaEventLog(where, session_timeout_ms=int(SESSION_TIMEOUT_S * 1000), request_timeout_ms=5000)
