"""Idempotent writes by event id, on SQLite and Postgres."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest

from nextturn import events, tables
from nextturn.errors import SchemaOutOfDate, StoreUnavailable
from nextturn.settings import Settings
from nextturn.store import Store, upgrade

from support.factories import turn
from support.services import PostgresCluster


def a_bit_of_everything() -> list[events.Event]:
    first, second = turn("s1", 0), turn("s1", 1)
    return [
        first,
        second,
        events.FeedbackReceived(tenant="acme", session_id="s1", turn_id=first.turn_id, kind="rating", value=1.0,
                                idempotency_key="k1"),
        events.FeedbackReceived(tenant="acme", session_id="s1", turn_id=first.turn_id, kind="tool_result",
                                tool=events.ToolOutcome(name="pytest", exit_code=1, passed=False, output="boom")),
        events.SignalExtracted(signal_id="sig-1", tenant="acme", session_id="s1", turn_id=first.turn_id,
                               reward=0.5, hint="Be brief.", confidence=0.9, extractor_version="v1",
                               verdicts=[events.Verdict(evaluator="rating", source="explicit", score=1.0,
                                                        confidence=1.0)]),
        events.AdapterPublished(version=1, base_model="tiny", path="/a/1", meta={"entropy": 1.5}),
        events.DeploymentChanged(stable_version=None, canary_version=1, canary_weight=0.1, reason="new", actor="c"),
        events.DeadLettered(source_topic="turns", partition=1, offset=9, key="s1", payload_b64="AAE=", reason="bad"),
    ]


def test_apply_twice_writes_once(store: Store) -> None:
    batch = a_bit_of_everything()
    assert store.apply(batch) == len(batch)
    assert store.apply(batch) == 0
    assert store.apply(list(reversed(batch))) == 0
    for table, rows in [(tables.Turn, 2), (tables.Feedback, 2), (tables.Signal, 1), (tables.Adapter, 1),
                        (tables.DeploymentChange, 1), (tables.Deployment, 1), (tables.DeadLetter, 1),
                        (tables.Session, 1)]:
        assert store.count(table) == rows, table.__tablename__


def test_a_turn_is_stored_exactly_as_recorded(store: Store) -> None:
    recorded = turn("s9", 4)
    store.apply([recorded])
    row = store.get(tables.Turn, recorded.turn_id)
    assert row is not None
    assert row.prompt_token_ids == recorded.prompt_token_ids
    assert row.response_token_ids == recorded.response_token_ids
    assert row.response_logprobs == recorded.response_logprobs
    assert row.messages == [m.model_dump(mode="json") for m in recorded.messages]
    assert row.response == {"role": "assistant", "content": "answer 4", "name": None, "tool_calls": None,
                            "tool_call_id": None}
    assert (row.session_id, row.tenant, row.scope, row.adapter_version) == ("s9", "acme", "default", "base")
    letter = events.DeadLettered(source_topic="turns", partition=0, offset=1, key=None,
                                 payload_b64="/wA=", reason="not JSON")
    store.apply([letter])
    dead = store.get(tables.DeadLetter, letter.event_id)
    assert dead is not None and dead.payload == b"\xff\x00"


def test_a_session_keeps_its_latest_activity_whatever_the_order(store: Store) -> None:
    early, late = turn("s", 0), turn("s", 1)
    late = late.model_copy(update={"finished_at": early.finished_at + timedelta(minutes=5)})
    store.apply([late])
    store.apply([early])
    session = store.get(tables.Session, "s")
    assert session is not None
    assert session.last_turn_at.replace(tzinfo=None) == late.finished_at.replace(tzinfo=None)


def test_the_latest_deployment_change_wins_even_when_applied_out_of_order(store: Store) -> None:
    older = events.DeploymentChanged(canary_version=2, canary_weight=0.1, reason="canary", actor="controller")
    newer = events.DeploymentChanged(stable_version=2, reason="promoted", actor="ops",
                                     occurred_at=older.occurred_at + timedelta(seconds=1))
    store.apply([newer])
    store.apply([older])
    deployment = store.get(tables.Deployment, "default")
    assert deployment is not None
    assert (deployment.stable_version, deployment.canary_version, deployment.last_event_id) == (2, None, newer.event_id)
    assert store.count(tables.DeploymentChange) == 2


def test_a_repeated_idempotency_key_is_stored_once(store: Store) -> None:
    rating = dict(tenant="acme", session_id="s", turn_id="t", kind="rating", value=1.0, idempotency_key="retry")
    store.apply([events.FeedbackReceived(**rating)])  # type: ignore[arg-type]
    store.apply([events.FeedbackReceived(**rating)])  # type: ignore[arg-type]  # a new event id, same key
    assert store.count(tables.Feedback) == 1


def test_a_store_behind_the_migrations_says_so(database_url: str) -> None:
    store = Store(database_url)
    with pytest.raises(SchemaOutOfDate, match="run `nextturn db upgrade`"):
        store.check_schema()
    store.close()


@pytest.mark.postgres
def test_the_pool_settings_bound_a_processs_postgres_connections(postgres: PostgresCluster) -> None:
    """At most db_pool_size + db_max_overflow connections; a caller who finds none free within
    db_pool_timeout_s gets StoreUnavailable (a 503 at the gateway), and the next one is served."""
    url = postgres.create_database(f"test_{uuid.uuid4().hex[:12]}")
    upgrade(url)
    store = Store.from_settings(Settings(database_url=url, db_pool_size=1, db_max_overflow=1,
                                         db_pool_timeout_s=0.5))
    with store.engine.connect() as first, store.engine.connect() as second:
        opened = {conn.exec_driver_sql("SELECT pg_backend_pid()").scalar() for conn in (first, second)}
        assert len(opened) == 2
        with pytest.raises(StoreUnavailable, match="cannot write"):
            store.apply([turn("s1", 0)])
    assert store.apply([turn("s1", 0)]) == 1
    store.close()
