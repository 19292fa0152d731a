"""The store: SQLite by default, Postgres in production; schema owned by Alembic (``migrations/``).

:meth:`Store.apply` writes a batch of events in one transaction, idempotently: every row is keyed by its
event id and inserted with ON CONFLICT DO NOTHING, and derived rows (a session's last activity, a scope's
current deployment) change only when their event was new. Applying a batch twice changes nothing.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, Insert, case, create_engine, event, literal, or_, update
from sqlalchemy import select as sa_select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session as DbSession
from sqlmodel import SQLModel, func, select

from nextturn import events, tables
from nextturn.conversation import turn_key
from nextturn.erasure import RuleBook, mark
from nextturn.errors import DeploymentConflict, SchemaOutOfDate, StoreUnavailable
from nextturn.flaws import flaw
from nextturn.scopes import link_namespace
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


@dataclass(frozen=True)
class Pool:
    """A Postgres engine's connection pool (Settings ``db_pool_*``, ``db_max_overflow``); SQLite keeps its own."""

    size: int = 5
    max_overflow: int = 10
    recycle_s: float = 1800.0
    timeout_s: float = 30.0

    @classmethod
    def from_settings(cls, settings: Settings) -> Pool:
        return cls(settings.db_pool_size, settings.db_max_overflow, settings.db_pool_recycle_s,
                   settings.db_pool_timeout_s)


def create_db_engine(url: str, *, immediate: bool = False, pool: Pool | None = None, **options: Any) -> Engine:
    """An engine for the store (on Postgres with ``pool``'s bounds, if given). ``immediate``: on SQLite, every
    transaction takes the write lock when it begins (``BEGIN IMMEDIATE``), so that a read-then-write transaction
    cannot interleave with another writer's (pysqlite would begin only at the first write, after the reads)."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30}, **options)
        event.listen(engine, "connect", _sqlite_pragmas)
        if immediate:
            event.listen(engine, "connect", _sqlite_manual_transactions)
            event.listen(engine, "begin", _sqlite_begin_immediate)
        return engine
    if pool is not None:
        options |= {"pool_size": pool.size, "max_overflow": pool.max_overflow, "pool_recycle": pool.recycle_s,
                    "pool_timeout": pool.timeout_s}
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


@dataclass(frozen=True)
class Evidence:
    """Which turns are one arm's evidence in a rollout: not pinned to a version by the client; learning into
    ``scope`` or a scope below it (any turn, for ``default``); served by one of ``versions``, or by a
    version of one of the ``ancestors`` (what serves a scope that has no stable version of its own)."""

    scope: str
    versions: tuple[str, ...]
    ancestors: tuple[str, ...] = ()

    def where(self, turns: Any) -> list[Any]:
        served = [turns.c.adapter_version.in_(list(self.versions))]
        served += [turns.c.adapter_version.like(f"{_like(scope)}-v%", escape="\\") for scope in self.ancestors]
        found = [turns.c.pinned.is_(False), or_(*served)]
        if self.scope != events.DEFAULT_SCOPE:
            found.append(or_(turns.c.scope == self.scope, turns.c.scope.like(f"{_like(self.scope)}.u.%", escape="\\")))
        return found


def _like(text: str) -> str:
    """``text`` matched literally in a LIKE pattern."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class Store:
    def __init__(self, url: str, pool: Pool = Pool()) -> None:
        self.url = url
        self.pool = pool
        self.engine = create_db_engine(url, pool=pool)
        self._dialect = postgresql if self.engine.dialect.name == "postgresql" else sqlite
        # apply reads the erasure rules before it writes: on SQLite its transaction takes the write lock when it
        # begins, so that no erasure commits in between (nextturn.erasure, order of operations)
        self._writer = create_db_engine(url, immediate=True) if self._dialect is sqlite else self.engine
        self.erasures = RuleBook()

    @classmethod
    def from_settings(cls, settings: Settings) -> Store:
        if settings.store_url.startswith("sqlite"):
            settings.data_dir.mkdir(parents=True, exist_ok=True)
        return cls(settings.store_url, Pool.from_settings(settings))

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
        """Write events idempotently in one transaction, except what an erasure covers; return how many were new."""
        try:
            with self._writer.begin() as conn:
                rules = self.erasures.read(conn, hold=True)
                if rules:
                    dropped = [item for item in batch if rules.covers(item)]
                    if dropped:
                        rules = mark(conn, rules, dropped)
                        batch = [item for item in batch if not rules.covers(item)]
                return sum(_WRITERS[type(item)](self, conn, item) for item in batch)
        except SQLAlchemyError as exc:
            raise StoreUnavailable(f"cannot write to the store at {_safe(self.url)}: {exc}") from exc

    def find_link(self, tenant: str, keys: Sequence[str],
                  session_id: str | None) -> tuple[str, str, str, str] | None:
        """(turn id, session id, key, adapter version) of the tenant's turn that continues the longest of
        ``keys`` (longest first; the latest turn when several share a key), optionally within one session."""
        table = tables.table_of(tables.Turn)
        query = (sa_select(table.c.id, table.c.session_id, table.c.link_hash, table.c.adapter_version)
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
        return (best.id, best.session_id, best.link_hash, best.adapter_version) if best is not None else None

    def get(self, table: type[_Row], key: Any) -> _Row | None:
        try:
            with self.session() as db:
                return db.get(table, key)
        except SQLAlchemyError as exc:
            raise StoreUnavailable(f"cannot read the store at {_safe(self.url)}: {exc}") from exc

    # -- deployments (nextturn.deployments) -----------------------------------------------------------

    def change_deployment(self, change: events.DeploymentChanged, *, expected: str | None) -> None:
        """Write a change made on the state whose last change was ``expected`` (None: no state yet); raise
        DeploymentConflict when the state moved on since. Applying the same event later is a no-op."""
        state = _deployment_state(change)
        table = tables.table_of(tables.Deployment)
        try:
            with self.engine.begin() as conn:
                if expected is None:
                    statement: Any = self._dialect.insert(tables.Deployment).values(
                        scope=change.scope, **state).on_conflict_do_nothing()
                else:
                    statement = (update(tables.Deployment).values(**state)
                                 .where(table.c.scope == change.scope, table.c.last_event_id == expected))
                if conn.execute(statement.returning(literal(1))).first() is None:
                    raise DeploymentConflict(f"the deployment of {change.scope!r} changed meanwhile")
                self._record_change(conn, change)
        except SQLAlchemyError as exc:
            raise StoreUnavailable(f"cannot write to the store at {_safe(self.url)}: {exc}") from exc

    def deployments(self) -> list[tables.Deployment]:
        """Every scope's deployment, in one read."""
        try:
            with self.session() as db:
                return list(db.exec(select(tables.Deployment)))
        except SQLAlchemyError as exc:
            raise StoreUnavailable(f"cannot read the store at {_safe(self.url)}: {exc}") from exc

    def deployment_changes(self, scope: str, limit: int = 20) -> list[tables.DeploymentChange]:
        """The latest changes first."""
        with self.session() as db:
            return list(db.exec(select(tables.DeploymentChange).where(tables.DeploymentChange.scope == scope)
                                .order_by(tables.DeploymentChange.changed_at.desc()).limit(limit)))  # type: ignore[attr-defined]

    def adapter_statuses(self, scope: str) -> dict[int, str]:
        table = tables.table_of(tables.Adapter)
        return {row.version: row.status for row in self._read(
            sa_select(table.c.version, table.c.status).where(table.c.scope == scope))}

    def newest_published(self) -> dict[str, int]:
        """Each scope's newest version still waiting for the rollout (status published), in one read."""
        table = tables.table_of(tables.Adapter)
        return {scope: int(version) for scope, version in self._read(
            sa_select(table.c.scope, func.max(table.c.version)).where(table.c.status == "published")
            .group_by(table.c.scope))}

    def newest_adapter(self, scope: str, *, newer_than: int, status: str = "published") -> tables.Adapter | None:
        with self.session() as db:
            return db.exec(select(tables.Adapter).where(
                tables.Adapter.scope == scope, tables.Adapter.version > newer_than, tables.Adapter.status == status,
            ).order_by(tables.Adapter.version.desc())).first()  # type: ignore[attr-defined]

    def served_turns(self, evidence: Evidence, since: datetime, step_since: datetime) -> list[Any]:
        """(flaw, turns, of them since ``step_since``) of the turns that are ``evidence`` since ``since``,
        counted by the database."""
        table = tables.table_of(tables.Turn)
        recent = func.sum(case((table.c.started_at >= step_since, 1), else_=0))
        return self._read(sa_select(table.c.flaw, func.count(), recent)
                          .where(*evidence.where(table), table.c.started_at >= since).group_by(table.c.flaw))

    def latencies(self, evidence: Evidence, since: datetime, limit: int) -> list[float]:
        """The latency of the latest ``limit`` turns that are ``evidence`` since ``since``."""
        table = tables.table_of(tables.Turn)
        return [row[0] for row in self._read(
            sa_select(table.c.latency_ms).where(*evidence.where(table), table.c.started_at >= since)
            .order_by(table.c.started_at.desc()).limit(limit))]

    def signal_scopes(self) -> list[str]:
        """Every scope signals were stored for, in one read."""
        signals = tables.table_of(tables.Signal)
        return [row[0] for row in self._read(sa_select(signals.c.scope).distinct())]

    def scope_tenants(self, scope: str, limit: int) -> list[str]:
        """Up to ``limit`` of the tenants with signals in ``scope``."""
        signals = tables.table_of(tables.Signal)
        return [row[0] for row in self._read(
            sa_select(signals.c.tenant).where(signals.c.scope == scope).distinct().limit(limit))]

    def rewards(self, evidence: Evidence, since: datetime | None, *, until: datetime | None = None,
                limit: int | None = None) -> list[tuple[str, float]]:
        """(tenant, reward) of the turns that are ``evidence`` served since ``since`` (None: ever) and before
        ``until``, whose latest signal revision carries a reward, in the order they were served. ``limit``:
        from the latest ``limit`` signal rows only (revisions count)."""
        signals, turns = tables.table_of(tables.Signal), tables.table_of(tables.Turn)
        window = [turns.c.started_at >= since] if since is not None else []
        window += [turns.c.started_at < until] if until is not None else []
        query = (sa_select(signals.c.tenant, signals.c.signal_id, signals.c.revision, signals.c.reward)
                 .join(turns, turns.c.id == signals.c.turn_id).where(*evidence.where(turns), *window))
        if limit is None:
            rows = self._read(query.order_by(turns.c.started_at, turns.c.id))
        else:
            rows = self._read(query.order_by(turns.c.started_at.desc(), turns.c.id.desc()).limit(limit))[::-1]
        latest: dict[str, tuple[int, str, float | None]] = {}
        for tenant, signal_id, revision, reward in rows:
            if signal_id not in latest or revision > latest[signal_id][0]:
                latest[signal_id] = (revision, tenant, reward)
        return [(tenant, reward) for _, tenant, reward in latest.values() if reward is not None]

    def resolved(self, scope: str, since: datetime) -> int:
        """How many turns of ``scope`` (or a scope below it) got a signal with a reward since ``since``."""
        signals = tables.table_of(tables.Signal)
        mine = signals.c.scope == scope
        if scope != events.DEFAULT_SCOPE:
            mine = or_(mine, signals.c.scope.like(f"{_like(scope)}.u.%", escape="\\"))
        found = self._read(sa_select(func.count(func.distinct(signals.c.turn_id)))
                           .where(mine, signals.c.reward.is_not(None), signals.c.created_at >= since))
        return int(found[0][0])

    def scope_figures(self, since: datetime) -> dict[str, dict[str, Any]]:
        """Per scope: published versions, and the turns resolved since ``since`` with their mean reward (each
        signal's latest revision), in three grouped reads however many scopes there are."""
        adapters, signals = tables.table_of(tables.Adapter), tables.table_of(tables.Signal)
        figures: dict[str, dict[str, Any]] = {}

        def of(scope: str) -> dict[str, Any]:
            return figures.setdefault(scope, {"versions": 0, "resolved": 0, "mean_reward": None})

        for scope, count in self._read(sa_select(adapters.c.scope, func.count()).group_by(adapters.c.scope)):
            of(scope)["versions"] = int(count)
        latest = (sa_select(signals.c.signal_id, func.max(signals.c.revision).label("revision"))
                  .where(signals.c.created_at >= since).group_by(signals.c.signal_id).subquery())
        resolved = self._read(
            sa_select(signals.c.scope, func.count(), func.avg(signals.c.reward))
            .join(latest, (signals.c.signal_id == latest.c.signal_id) & (signals.c.revision == latest.c.revision))
            .group_by(signals.c.scope))
        for scope, count, mean in resolved:
            of(scope).update(resolved=int(count), mean_reward=None if mean is None else round(float(mean), 4))
        return figures

    def loop_counts(self, scope: str, recent: int) -> dict[str, Any]:
        """What a live status shows: the scope's turns (and failed ones), turns with a signal, with a reward,
        with a hint (counted once per signal, over its revisions), the latest ``recent`` rewards, versions."""
        turns, signals, adapters = (tables.table_of(model) for model in (tables.Turn, tables.Signal, tables.Adapter))
        ours = signals.c.scope == scope
        distinct = func.count(func.distinct(signals.c.signal_id))
        (total, failed), = self._read(sa_select(func.count(), func.sum(case((turns.c.status != "ok", 1), else_=0)))
                                      .where(turns.c.scope == scope))
        (resolved,), = self._read(sa_select(distinct).where(ours))
        (rewarded,), = self._read(sa_select(distinct).where(ours, signals.c.reward.is_not(None)))
        (hints,), = self._read(sa_select(distinct).where(ours, signals.c.hint.is_not(None)))
        latest = self._read(sa_select(signals.c.reward).where(ours, signals.c.reward.is_not(None))
                            .order_by(signals.c.created_at.desc()).limit(recent))
        (versions,), = self._read(sa_select(func.count()).select_from(adapters).where(adapters.c.scope == scope))
        return {"turns": int(total or 0), "failed_turns": int(failed or 0), "resolved": int(resolved),
                "rewarded": int(rewarded), "hints": int(hints), "recent_rewards": [row[0] for row in latest],
                "versions": int(versions)}

    def _read(self, query: Any) -> list[Any]:
        try:
            with self.engine.connect() as conn:
                return list(conn.execute(query).all())
        except SQLAlchemyError as exc:
            raise StoreUnavailable(f"cannot read the store at {_safe(self.url)}: {exc}") from exc

    def feedback_ids(self, turn_id: str, limit: int) -> set[str]:
        """The event ids of up to ``limit`` pieces of feedback stored for a turn."""
        table = tables.table_of(tables.Feedback)
        return {row.id for row in self._read(sa_select(table.c.id).where(table.c.turn_id == turn_id).limit(limit))}

    def turn_ids(self, ids: Sequence[str]) -> set[str]:
        """Which of ``ids`` (at most a few hundred) are stored turns."""
        table = tables.table_of(tables.Turn)
        return {row[0] for row in self._read(sa_select(table.c.id).where(table.c.id.in_(list(ids))))}

    def count(self, table: type[SQLModel]) -> int:
        with self.session() as db:
            return int(db.exec(select(func.count()).select_from(table)).one())

    def close(self) -> None:
        self.engine.dispose()
        self._writer.dispose()

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
            "session_id": turn.session_id, "user": turn.user, "parent_turn_id": turn.parent_turn_id,
            "model": turn.model,
            "link_hash": turn_key(link_namespace(turn.tenant, turn.scope), turn.messages, turn.response)
            if turn.response else None,
            "adapter_version": turn.adapter_version, "messages": dumped["messages"], "tools": turn.tools,
            "params": dumped["params"], "response": dumped["response"],
            "prompt_token_ids": turn.prompt_token_ids, "response_token_ids": turn.response_token_ids,
            "response_logprobs": turn.response_logprobs, "finish_reason": turn.finish_reason,
            "status": turn.status, "error": turn.error, "latency_ms": turn.latency_ms,
            "started_at": turn.started_at, "finished_at": turn.finished_at, "flaw": flaw(turn),
            "pinned": turn.pinned,
        })
        if new:
            self._touch_session(conn, turn)
        return int(new)

    def _touch_session(self, conn: Connection, turn: events.TurnRecorded) -> None:
        table = tables.table_of(tables.Session)
        statement = self._dialect.insert(tables.Session).values(
            id=turn.session_id, tenant=turn.tenant, scope=turn.scope, user=turn.user,
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
            "hint": signal.hint, "hint_source": signal.hint_source, "confidence": signal.confidence,
            "verdicts": [verdict.model_dump() for verdict in signal.verdicts],
            "extractor_version": signal.extractor_version, "evidence": signal.evidence,
            "also_trains": signal.also_trains, "created_at": signal.occurred_at,
        }))

    def _adapter(self, conn: Connection, adapter: events.AdapterPublished) -> int:
        return int(self._insert_new(conn, tables.Adapter, {
            "scope": adapter.scope, "version": adapter.version, "event_id": adapter.event_id,
            "parent_version": adapter.parent_version, "base_model": adapter.base_model, "path": adapter.path,
            "meta": adapter.meta, "published_at": adapter.occurred_at,
        }))

    def _deployment(self, conn: Connection, change: events.DeploymentChanged) -> int:
        new = self._record_change(conn, change)
        if new:
            state = _deployment_state(change)
            table = tables.table_of(tables.Deployment)
            statement = self._dialect.insert(tables.Deployment).values(scope=change.scope, **state)
            # Changes may be applied out of order (a replay, a second recorder): the latest one wins.
            conn.execute(statement.on_conflict_do_update(
                index_elements=["scope"], set_=state, where=table.c.updated_at <= statement.excluded.updated_at,
            ))
        return int(new)

    def _record_change(self, conn: Connection, change: events.DeploymentChanged) -> bool:
        """The change in the history, and its effect on the adapters' status; False if it was there already."""
        state = _deployment_state(change)
        del state["last_event_id"], state["updated_at"]
        new = self._insert_new(conn, tables.DeploymentChange, {
            "id": change.event_id, "scope": change.scope, "reason": change.reason, "actor": change.actor,
            "action": change.action, "subject_version": change.subject_version, "changed_at": change.occurred_at,
            **state,
        })
        if new and change.subject_version is not None:
            table = tables.table_of(tables.Adapter)
            ours = table.c.scope == change.scope

            def mark(status: str, *where: Any) -> None:
                conn.execute(update(tables.Adapter).values(status=status).where(ours, *where))

            subject = table.c.version == change.subject_version
            if change.action == "canary":
                mark("skipped", table.c.version < change.subject_version, table.c.status == "published")
                mark("canary", subject)
            elif change.action == "promote":
                mark("retired", table.c.status.in_(["stable", "canary"]), ~subject)
                mark("stable", subject)
            elif change.action == "rollback":
                mark("rolled_back", subject)
                if change.stable_version is not None:
                    mark("stable", table.c.version == change.stable_version)
            elif change.action == "reject":
                mark("rejected", subject)
        return new

    def _dead_letter(self, conn: Connection, letter: events.DeadLettered) -> int:
        return int(self._insert_new(conn, tables.DeadLetter, {
            "id": letter.event_id, "source_topic": letter.source_topic, "partition": letter.partition,
            "offset": letter.offset, "key": letter.key, "payload": letter.payload, "reason": letter.reason,
            "created_at": letter.occurred_at,
        }))


def _deployment_state(change: events.DeploymentChanged) -> dict[str, Any]:
    """The ``deployments`` row a change leaves behind (without the scope)."""
    return {"stable_version": change.stable_version, "canary_version": change.canary_version,
            "canary_weight": change.canary_weight, "paused": change.paused, "schedule": change.schedule,
            "canary_since": change.canary_since, "watch_since": change.watch_since, "last_event_id": change.event_id,
            "updated_at": change.occurred_at}


_WRITERS: dict[type, Callable[[Store, Connection, Any], int]] = {
    events.TurnRecorded: Store._turn,
    events.FeedbackReceived: Store._feedback,
    events.SignalExtracted: Store._signal,
    events.AdapterPublished: Store._adapter,
    events.DeploymentChanged: Store._deployment,
    events.DeadLettered: Store._dead_letter,
}

