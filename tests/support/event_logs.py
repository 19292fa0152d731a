"""Both event-log backends as the tests open them (also imported by child processes)."""

from __future__ import annotations

from pathlib import Path

from nextturn import events
from nextturn.bus import Consumer, Delivery, EventLog
from nextturn.bus.kafka import KafkaEventLog
from nextturn.bus.sqlite import SqliteEventLog

from support.eventually import eventually

# Consumers in tests notice a dead member within 2 s. Tansu also holds every group join for half the
# session timeout, so a short one keeps the Kafka tests quick.
SESSION_TIMEOUT_S = 2.0


def open_log(backend: str, where: str) -> EventLog:
    """``where`` is a SQLite path or Kafka bootstrap servers."""
    if backend == "sqlite":
        return SqliteEventLog(Path(where), session_timeout_s=SESSION_TIMEOUT_S)
    return KafkaEventLog(where, session_timeout_ms=int(SESSION_TIMEOUT_S * 1000), request_timeout_ms=5000)


def recorded(
    data_dir: Path, turn_id: str | None, timeout_s: float = 20, *, asked: str | None = None
) -> events.TurnRecorded:
    """The TurnRecorded for a turn (or for the turn whose last message was ``asked``), from the event log."""
    log = SqliteEventLog(data_dir / "events.db")
    reader = log.consumer(None, [events.TURNS], start="beginning")

    def found() -> events.TurnRecorded | None:
        for delivery in reader.poll(timeout_s=0.2):
            turn = delivery.event
            if isinstance(turn, events.TurnRecorded) and (
                    turn.turn_id == turn_id or (asked is not None and turn.messages[-1].content == asked)):
                return turn
        return None

    try:
        return eventually(found, f"{turn_id or asked} to be recorded", timeout_s=timeout_s, interval_s=0)
    finally:
        reader.close()
        log.close()


def poll_until(consumer: Consumer, count: int, timeout_s: float = 20.0) -> list[Delivery]:
    """Poll until ``count`` deliveries arrived or the time is up; return what arrived (the caller asserts)."""
    got: list[Delivery] = []

    def enough() -> bool:
        got.extend(consumer.poll(max_records=100, timeout_s=0.2))
        return len(got) >= count

    try:
        eventually(enough, f"{count} deliveries", timeout_s=timeout_s, interval_s=0)
    except AssertionError:
        pass
    return got
