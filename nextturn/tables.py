"""The store's tables (SQLModel). Alembic owns the schema: a change here needs a migration in migrations/.

Rows that come from events carry the event id and are written idempotently (insert, ignore on conflict).
They hold no foreign keys to each other: events of different topics arrive in any order (feedback may be
stored before the turn it refers to), and a store rebuilt by replaying the log must accept that.
Token ids and logprobs are JSON arrays: they are read whole, by the trainer, never queried into.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Index, LargeBinary, MetaData, Table, Text, UniqueConstraint, false
from sqlmodel import Field, SQLModel

# Named constraints, so that SQLite and Postgres agree and migrations can drop what they created.
SQLModel.metadata.naming_convention = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
metadata: MetaData = SQLModel.metadata


def table_of(model: type[SQLModel]) -> Table:
    """The table behind a table model, for SQLAlchemy Core queries (SQLModel's class attribute is untyped)."""
    table: Table = getattr(model, "__table__")  # noqa: B009
    return table


def _when(**kwargs: Any) -> Any:
    return Field(sa_type=DateTime(timezone=True), **kwargs)


def _json(**kwargs: Any) -> Any:
    return Field(sa_type=JSON, **kwargs)


def _text(**kwargs: Any) -> Any:
    return Field(sa_type=Text, **kwargs)


class Tenant(SQLModel, table=True):
    __tablename__ = "tenants"

    id: str = Field(primary_key=True)
    name: str
    created_at: datetime = _when()


class ApiKey(SQLModel, table=True):
    """An API key, stored as its SHA-256 digest only."""

    __tablename__ = "api_keys"

    key_hash: str = Field(primary_key=True)
    tenant_id: str = Field(foreign_key="tenants.id", index=True)
    is_admin: bool = False
    created_at: datetime = _when()
    revoked_at: datetime | None = _when(default=None)


class Session(SQLModel, table=True):
    __tablename__ = "sessions"

    id: str = Field(primary_key=True)
    tenant: str = Field(index=True)
    scope: str
    user: str | None = Field(default=None, index=True)  # nextturn.scopes.user_id of its first turn's user
    started_at: datetime = _when()
    last_turn_at: datetime = _when(index=True)
    ended_at: datetime | None = _when(default=None)


class Turn(SQLModel, table=True):
    __tablename__ = "turns"
    # The rollout controller reads one version's turns since a time (nextturn.deployments).
    __table_args__ = (Index("ix_turns_adapter_version_started_at", "adapter_version", "started_at"),)

    id: str = Field(primary_key=True)  # the completion id
    event_id: str = Field(unique=True)
    tenant: str = Field(index=True)
    scope: str = Field(index=True)
    session_id: str = Field(index=True)
    user: str | None = Field(default=None, index=True)  # events.TurnRecorded.user (None before 0009)
    parent_turn_id: str | None = Field(default=None, index=True)
    # nextturn.conversation.turn_key of messages + response: a later request that starts with them links
    # to this turn on any gateway replica. None for a turn without a response.
    link_hash: str | None = Field(default=None, index=True)
    model: str
    adapter_version: str = Field(index=True)
    messages: list[dict[str, Any]] = _json()
    tools: list[dict[str, Any]] | None = _json(default=None)
    params: dict[str, Any] = _json()
    response: dict[str, Any] | None = _json(default=None)
    prompt_token_ids: list[int] = _json()
    response_token_ids: list[int] = _json()
    response_logprobs: list[float] | None = _json(default=None)
    finish_reason: str | None = None
    status: str
    error: str | None = _text(default=None)
    latency_ms: float
    started_at: datetime = _when(index=True)
    finished_at: datetime = _when()
    flaw: str | None = None  # nextturn.flaws: what is visibly wrong with it (None: nothing, or recorded before 0004)
    # The client named the version: not evidence for the rollout (turns stored before 0006: False).
    pinned: bool = Field(default=False, sa_column_kwargs={"server_default": false()})


class Feedback(SQLModel, table=True):
    __tablename__ = "feedback"
    __table_args__ = (UniqueConstraint("tenant", "idempotency_key"),)

    id: str = Field(primary_key=True)  # the event id
    tenant: str = Field(index=True)
    session_id: str
    turn_id: str = Field(index=True)
    kind: str
    value: float | None = None
    text: str | None = _text(default=None)
    tool: dict[str, Any] | None = _json(default=None)
    idempotency_key: str | None = None
    received_at: datetime = _when()


class Signal(SQLModel, table=True):
    """Every revision of every signal; readers take the highest revision of a signal_id."""

    __tablename__ = "signals"
    __table_args__ = (UniqueConstraint("signal_id", "revision"),)

    id: str = Field(primary_key=True)  # the event id
    signal_id: str = Field(index=True)
    revision: int
    tenant: str = Field(index=True)
    scope: str = Field(index=True)
    session_id: str
    turn_id: str = Field(index=True)
    adapter_version: str = Field(index=True)
    reward: float | None = None
    hint: str | None = _text(default=None)
    hint_source: str | None = None  # nextturn.events.HintSource; None before migration 0005
    confidence: float
    verdicts: list[dict[str, Any]] = _json()
    extractor_version: str
    # Event ids of what this revision was computed from (the turn, the next request, feedback, "idle").
    evidence: list[str] = _json(default_factory=list)
    also_trains: list[str] | None = _json(default=None)  # events.SignalExtracted.also_trains (None before 0007)
    # The outbox: the signals worker writes a row before it publishes it, and marks it once published; a
    # worker that died in between leaves it unpublished, and the next one publishes it.
    published: bool = Field(default=True, index=True)
    created_at: datetime = _when(index=True)


class SignalCase(SQLModel, table=True):
    """The signals worker's file on one turn: what it knows so far (the turn, its next state, feedback) and
    which revision it last wrote. Written in the same transaction as that revision, under the lock of the
    session's partition, so a replayed event finds its effect already there."""

    __tablename__ = "signal_cases"

    turn_id: str = Field(primary_key=True)
    partition: int  # the event log partition of the session
    session_id: str  # writers lock the session (Postgres: an advisory lock per bucket of sessions)
    state: str = Field(index=True)  # waiting (feedback seen, turn not yet) | open | closed
    opened_at: float = Field(index=True)  # wall clock, seconds: when the worker first saw the turn
    touched_at: float = Field(index=True)  # the latest change: retention counts from here
    body: str = _text()  # signals.cases.Case as JSON


class Adapter(SQLModel, table=True):
    __tablename__ = "adapters"

    scope: str = Field(primary_key=True)
    version: int = Field(primary_key=True)
    event_id: str = Field(unique=True)
    parent_version: int | None = None
    base_model: str
    path: str
    meta: dict[str, Any] = _json()
    # published, then as the rollout decides (nextturn.deployments): canary, stable, retired (replaced as
    # stable), rolled_back, rejected (its collapse guards failed) or skipped (a newer version went first).
    status: str = "published"
    published_at: datetime = _when()


class Deployment(SQLModel, table=True):
    """What serves each scope now; the latest DeploymentChanged by time wins."""

    __tablename__ = "deployments"

    scope: str = Field(primary_key=True)
    stable_version: int | None = None
    canary_version: int | None = None
    canary_weight: float = 0.0
    paused: bool = False
    schedule: list[float] = _json(default_factory=list)
    canary_since: datetime | None = _when(default=None)
    watch_since: datetime | None = _when(default=None)
    last_event_id: str
    updated_at: datetime = _when()


class DeploymentChange(SQLModel, table=True):
    __tablename__ = "deployment_changes"

    id: str = Field(primary_key=True)  # the event id
    scope: str = Field(index=True)
    stable_version: int | None = None
    canary_version: int | None = None
    canary_weight: float
    paused: bool
    schedule: list[float] = _json(default_factory=list)
    canary_since: datetime | None = _when(default=None)
    watch_since: datetime | None = _when(default=None)
    action: str = "set"
    subject_version: int | None = None
    reason: str = _text()
    actor: str
    changed_at: datetime = _when(index=True)


class DeadLetter(SQLModel, table=True):
    """Records that could not be read as events, kept with the reason."""

    __tablename__ = "dead_letters"

    id: str = Field(primary_key=True)  # the dead letter's event id (derived from the record's position)
    source_topic: str = Field(index=True)
    partition: int
    offset: int
    key: str | None = None
    payload: bytes = Field(sa_type=LargeBinary)
    reason: str = _text()
    created_at: datetime = _when()


class Erasure(SQLModel, table=True):
    """A session, an end user or a tenant that was forgotten (:mod:`nextturn.erasure`): the rule every writer
    applies from then on, and what was removed."""

    __tablename__ = "erasures"

    seq: int | None = Field(default=None, primary_key=True)  # readers learn new erasures by it
    id: str = Field(unique=True)
    kind: str  # session | user | tenant
    tenant: str = Field(index=True)
    subject: str | None = None  # the session id, or the user's nextturn.scopes.user_id; None for a tenant
    before: datetime = _when()  # a user's turns that began before this are covered (a session's and a tenant's: all)
    scopes: list[str] = _json(default_factory=list)  # the scopes removed with it
    actor: str
    requested_at: datetime = _when()
    report: dict[str, Any] = _json(default_factory=dict)  # nextturn.erasure.Report, once done


class ErasedSession(SQLModel, table=True):
    """A forgotten session: nothing of it is written again."""

    __tablename__ = "erased_sessions"

    seq: int | None = Field(default=None, primary_key=True)  # readers learn new ones by it
    session_id: str = Field(unique=True)
    erasure: int = Field(index=True)  # the Erasure.seq that covers it


class OperatorSession(SQLModel, table=True):
    """A login to the operator's page (``/dashboard``): the browser's cookie holds a random token, the store
    only its SHA-256 digest, so every gateway replica knows the login and logging out ends it everywhere."""

    __tablename__ = "operator_sessions"

    token_hash: str = Field(primary_key=True)
    actor: str  # the name given at login, recorded with each action taken
    key_hash: str  # the digest of the admin key it was opened with: the session ends with that key
    created_at: datetime = _when()
    expires_at: datetime = _when(index=True)
