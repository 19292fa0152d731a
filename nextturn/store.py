"""The store: SQLite by default, Postgres in production; schema owned by Alembic (``migrations/``).

:meth:`Store.apply` writes a batch of events in one transaction, idempotently: every row is keyed by its
event id and inserted with ON CONFLICT DO NOTHING, and derived rows (a session's last activity, a scope's
current deployment) change only when their event was new. Applying a batch twice changes nothing.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, Insert, case, create_engine, event, literal
from sqlalchemy import select as sa_select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session as DbSession
from sqlmodel import SQLModel, func, select

from nextturn import events, tables
from nextturn.conversation import turn_key
from nextturn.errors import SchemaOutOfDate, StoreUnavailable
from nextturn.settings import Settings

_Row = TypeVar("_Row", bound=SQLModel)


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(importlib.resources.files("migrations")))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Apply migrations up to ``revision`` (``nextturn db upgrade``)."""
    try:
        command.upgrade(alembic_config(url), revision)
    except SQLAlchemyError as exc:
        raise StoreUnavailable(f"cannot migrate the store at {_safe(url)}: {exc}") from exc


def downgrade(url: str, revision: str = "base") -> None:
    try:
        command.downgrade(alembic_config(url), revision)
    except SQLAlchemyError as exc:
        raise StoreUnavailable(f"cannot migrate the store at {_safe(url)}: {exc}") from exc


def create_db_engine(url: str, *, immediate: bool = False, **options: Any) -> Engine:
    """An engine for the store. ``immediate``: on SQLite, every transaction takes the write lock when it
    begins (``BEGIN IMMEDIATE``), so that a read-then-write transaction cannot interleave with another
    writer's (pysqlite would begin only at the first write, after the reads)."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30}, **options)
        event.listen(engine, "connect", _sqlite_pragmas)
        if immediate:
            event.listen(engine, "connect", _sqlite_manual_transactions)
            event.listen(engine, "begin", _sqlite_begin_immediate)
        return engine
    return create_engine(url, pool_pre_ping=True, **options)


def _sqlite_manual_transactions(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # pysqlite must not begin on its own; the begin hook does


def _sqlite_begin_immediate(conn: Connection) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _safe(url: str) -> str:
    """The URL without its password, for messages."""
    head, sep, tail = url.rpartition("@")
    if not sep:
        return url
    scheme, _, credentials = head.partition("://")
    return f"{scheme}://{credentials.split(':')[0]}@{tail}"


class Store:
    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = create_db_engine(url)
        self._dialect = postgresql if self.engine.dialect.name == "postgresql" else sqlite

    @classmethod
    def from_settings(cls, settings: Settings) -> Store:
        if settings.store_url.startswith("sqlite"):
            settings.data_dir.mkdir(parents=True, exist_ok=True)
        return cls(settings.store_url)

    def check_schema(self) -> None:
        """Raise SchemaOutOfDate unless the database is at the migrations' head."""
        head = ScriptDirectory.from_config(alembic_config(self.url)).get_current_head()
        try:
            with self.engine.connect() as conn:
                current = MigrationContext.configure(conn).get_current_revision()
        except SQLAlchemyError as exc:
            raise StoreUnavailable(f"cannot reach the store at {_safe(self.url)}: {exc}") from exc
        if current != head:
            raise SchemaOutOfDate(
                f"the store at {_safe(self.url)} is at revision {current or 'none'}, not {head}; "
                "run `nextturn db upgrade`"
            )

    def session(self) -> DbSession:
        return DbSession(self.engine)

    def apply(self, batch: Sequence[events.Event]) -> int:
        """Write events idempotently in one transaction; return how many were new."""
        try:
            with self.engine.begin() as conn:
                return sum(_WRITERS[type(item)](self, conn, item) for item in batch)
        except SQLAlchemyError as exc:
            raise StoreUnavailable(f"cannot write to the store at {_safe(self.url)}: {exc}") from exc

    def find_link(self, tenant: str, keys: Sequence[str], session_id: str | None) -> tuple[str, str, str] | None:
        """(turn id, session id, key) of the tenant's turn that continues the longest of ``keys`` (longest
        first; the latest turn when several share a key), optionally within one session."""
        table = tables.Turn.__table__
        query = (sa_select(table.c.id, table.c.session_id, table.c.link_hash)
                 .where(table.c.tenant == tenant, table.c.link_hash.in_(list(keys)))
                 .order_by(table.c.started_at.desc()))
        if session_id is not None:
            query = query.where(table.c.session_id == session_id)
        try:
            with self.engine.connect() as conn:
                rows = conn.execute(query).all()
        except SQLAlchemyError as exc:
            raise StoreUnavailable(f"cannot read the store at {_safe(self.url)}: {exc}") from exc
        rank = {key: n for n, key in enumerate(keys)}
        best = min(rows, key=lambda row: rank[row.link_hash], default=None)  # min keeps the first (latest) of ties
        return (best.id, best.session_id, best.link_hash) if best is not None else None

    def get(self, table: type[_Row], key: Any) -> _Row | None:
        with self.session() as db:
            return db.get(table, key)

    def count(self, table: type[SQLModel]) -> int:
        with self.session() as db:
            return int(db.exec(select(func.count()).select_from(table)).one())

    def close(self) -> None:
        self.engine.dispose()

    # -- one writer per event type ---------------------------------------------------------------------

    def _insert_new(self, conn: Connection, table: type[SQLModel], values: dict[str, Any]) -> bool:
        """Insert unless a row with the same key exists; True when this call inserted it."""
        # RETURNING rather than rowcount: psycopg reports -1 for ON CONFLICT inserts through SQLAlchemy.
        statement: Insert = self._dialect.insert(table).values(**values).on_conflict_do_nothing()
        return conn.execute(statement.returning(literal(1))).first() is not None

    def _turn(self, conn: Connection, turn: events.TurnRecorded) -> int:
        dumped = turn.model_dump(mode="json")
        new = self._insert_new(conn, tables.Turn, {
            "id": turn.turn_id, "event_id": turn.event_id, "tenant": turn.tenant, "scope": turn.scope,
            "session_id": turn.session_id, "parent_turn_id": turn.parent_turn_id, "model": turn.model,
            "link_hash": turn_key(turn.tenant, turn.messages, turn.response) if turn.response else None,
            "adapter_version": turn.adapter_version, "messages": dumped["messages"], "tools": turn.tools,
            "params": dumped["params"], "response": dumped["response"],
            "prompt_token_ids": turn.prompt_token_ids, "response_token_ids": turn.response_token_ids,
            "response_logprobs": turn.response_logprobs, "finish_reason": turn.finish_reason,
            "status": turn.status, "error": turn.error, "latency_ms": turn.latency_ms,
            "started_at": turn.started_at, "finished_at": turn.finished_at,
        })
        if new:
            self._touch_session(conn, turn)
        return int(new)

    def _touch_session(self, conn: Connection, turn: events.TurnRecorded) -> None:
        table = tables.Session.__table__
        statement = self._dialect.insert(tables.Session).values(
            id=turn.session_id, tenant=turn.tenant, scope=turn.scope,
            started_at=turn.started_at, last_turn_at=turn.finished_at,
        )
        later = case(
            (statement.excluded.last_turn_at > table.c.last_turn_at, statement.excluded.last_turn_at),
            else_=table.c.last_turn_at,
        )
        conn.execute(statement.on_conflict_do_update(index_elements=["id"], set_={"last_turn_at": later}))

    def _feedback(self, conn: Connection, feedback: events.FeedbackReceived) -> int:
        return int(self._insert_new(conn, tables.Feedback, {
            "id": feedback.event_id, "tenant": feedback.tenant, "session_id": feedback.session_id,
            "turn_id": feedback.turn_id, "kind": feedback.kind, "value": feedback.value, "text": feedback.text,
            "tool": feedback.tool.model_dump() if feedback.tool else None,
            "idempotency_key": feedback.idempotency_key, "received_at": feedback.occurred_at,
        }))

    def _signal(self, conn: Connection, signal: events.SignalExtracted) -> int:
        return int(self._insert_new(conn, tables.Signal, {
            "id": signal.event_id, "signal_id": signal.signal_id, "revision": signal.revision,
            "tenant": signal.tenant, "scope": signal.scope, "session_id": signal.session_id,
            "turn_id": signal.turn_id, "adapter_version": signal.adapter_version, "reward": signal.reward,
            "hint": signal.hint, "confidence": signal.confidence,
            "verdicts": [verdict.model_dump() for verdict in signal.verdicts],
            "extractor_version": signal.extractor_version, "evidence": signal.evidence,
            "created_at": signal.occurred_at,
        }))

    def _adapter(self, conn: Connection, adapter: events.AdapterPublished) -> int:
        return int(self._insert_new(conn, tables.Adapter, {
            "scope": adapter.scope, "version": adapter.version, "event_id": adapter.event_id,
            "parent_version": adapter.parent_version, "base_model": adapter.base_model, "path": adapter.path,
            "meta": adapter.meta, "published_at": adapter.occurred_at,
        }))

    def _deployment(self, conn: Connection, change: events.DeploymentChanged) -> int:
        state = {
            "stable_version": change.stable_version, "canary_version": change.canary_version,
            "canary_weight": change.canary_weight, "paused": change.paused,
        }
        new = self._insert_new(conn, tables.DeploymentChange, {
            "id": change.event_id, "scope": change.scope, "reason": change.reason, "actor": change.actor,
            "changed_at": change.occurred_at, **state,
        })
        if new:
            table = tables.Deployment.__table__
            statement = self._dialect.insert(tables.Deployment).values(
                scope=change.scope, last_event_id=change.event_id, updated_at=change.occurred_at, **state
            )
            # Changes may be applied out of order (a replay, a second recorder): the latest one wins.
            conn.execute(statement.on_conflict_do_update(
                index_elements=["scope"],
                set_={**state, "last_event_id": change.event_id, "updated_at": change.occurred_at},
                where=table.c.updated_at <= statement.excluded.updated_at,
            ))
        return int(new)

    def _dead_letter(self, conn: Connection, letter: events.DeadLettered) -> int:
        return int(self._insert_new(conn, tables.DeadLetter, {
            "id": letter.event_id, "source_topic": letter.source_topic, "partition": letter.partition,
            "offset": letter.offset, "key": letter.key, "payload": letter.payload, "reason": letter.reason,
            "created_at": letter.occurred_at,
        }))


_WRITERS: dict[type, Callable[[Store, Connection, Any], int]] = {
    events.TurnRecorded: Store._turn,
    events.FeedbackReceived: Store._feedback,
    events.SignalExtracted: Store._signal,
    events.AdapterPublished: Store._adapter,
    events.DeploymentChanged: Store._deployment,
    events.DeadLettered: Store._dead_letter,
}

