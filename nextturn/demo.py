"""``nextturn demo`` for now: the foundation of the loop, end to end, on the embedded default.

It records a short scripted conversation on the event log the way the gateway will (two turns, a rating,
a correction, and one corrupt record), runs the recorder that copies the log into the store, and shows
what arrived where. There is no model, gateway, signals worker or trainer yet: those come with their
issues, and this demo grows into the full learning loop with them.
"""

from __future__ import annotations

from datetime import timedelta

from rich.console import Console
from rich.table import Table

from nextturn import events, tables
from nextturn.bus import open_event_log
from nextturn.recorder import Recorder
from nextturn.settings import Settings
from nextturn.store import Store, upgrade


def scripted_conversation() -> list[events.Event]:
    """What the gateway would record for a two-turn conversation and the feedback on it."""
    session = f"demo-{events.new_id()[:8]}"
    question = events.ChatMessage(role="user", content="Name a flower, in one word.")
    first = _turn(session, [question], "Sure! A lovely flower is the lotus.", parent=None)
    correction = events.ChatMessage(role="user", content="One word, please.")
    second = _turn(session, [question, first.response, correction], "Lotus.", parent=first)  # type: ignore[list-item]
    return [
        first,
        events.FeedbackReceived(tenant="demo", session_id=session, turn_id=first.turn_id, kind="correction",
                                text="Answer in one word, as asked."),
        second,
        events.FeedbackReceived(tenant="demo", session_id=session, turn_id=second.turn_id, kind="rating", value=1.0),
    ]


def _turn(session: str, messages: list[events.ChatMessage], reply: str,
          parent: events.TurnRecorded | None) -> events.TurnRecorded:
    started = events.utc_now()
    return events.TurnRecorded(
        tenant="demo", session_id=session, turn_id=f"chatcmpl-{events.new_id()}",
        parent_turn_id=parent.turn_id if parent else None, model="none-yet",
        messages=messages, response=events.ChatMessage(role="assistant", content=reply),
        finish_reason="stop", latency_ms=0.0, started_at=started, finished_at=started + timedelta(milliseconds=1),
    )


def run(settings: Settings) -> None:
    console = Console()
    console.print("[bold]nextturn demo[/bold] — the foundation: event log → recorder → store")
    console.print("Not built yet: gateway, model, signals, trainer, canary (each has its issue).\n")
    store = Store.from_settings(settings)
    upgrade(settings.store_url)
    log = open_event_log(settings)
    try:
        log.append(scripted_conversation())
        log.append_raw(events.TURNS, "demo", b"{not an event")  # a corrupt record: dead-lettered, not fatal
        recorder = Recorder(log, store)
        new = recorder.drain()
        recorder.close()
        console.print(f"recorded {new} new events (4 from the conversation, 1 dead letter)\n")
        console.print(_summary(store))
        console.print(f"\nevent log: {settings.event_log_path}")
        console.print(f"store:     {settings.store_url}")
        console.print("Look inside: [cyan]nextturn events tail turns[/cyan], "
                      "[cyan]nextturn events tail dead-letters[/cyan]")
    finally:
        log.close()
        store.close()


def _summary(store: Store) -> Table:
    table = Table(title="rows in the store")
    table.add_column("table")
    table.add_column("rows", justify="right")
    for row in (tables.Turn, tables.Feedback, tables.Session, tables.DeadLetter):
        table.add_row(row.__tablename__, str(store.count(row)))
    return table
