"""Erasure: forgetting a session, an end user or a tenant (``DELETE /v1/sessions/{id}``, ``nextturn users
forget``, ``nextturn tenants forget``), and the rules that keep it forgotten.

What is removed: the turns, sessions, feedback, signals and the signals worker's cases of the sessions it
covers, their dead letters, and their records on the event log (SQLite: deleted; Kafka: a tombstone under
each erased key, which a compacted topic drops and every reader skips); for a user or a tenant, its own
scopes (adapters, checkpoints, deployments), which stop serving; for a tenant, its keys. The report names
every published version that was trained on the data (``meta.json`` lists each update's signals), so an
operator can retrain without it: the shared lineage's, and ancestors' that a removed scope began from.

Order of operations:

1. The erasure is written as a **rule** (``erasures``; ``erased_sessions`` for the sessions it names) in one
   transaction. Every writer of what a rule covers reads the rules inside its own write transaction,
   holding their lock (Postgres: ``LOCK TABLE erasures IN SHARE MODE``, which the eraser's insert waits for;
   SQLite: the database's write lock, which every such writer takes when it begins). So a write either
   committed before the rule, and step 2 removes it, or it sees the rule and drops what it covers.
2. What the rule covers is deleted: store rows, log records, the scopes' files and deployments.
3. The report is saved with the rule.

Events on their way (a gateway's spool, the log, a consumer's batch, a trainer's waiting samples and standing
hints) are dropped by whoever holds them once they learn the rule (:class:`RuleBook`: one indexed read per
batch). A crash during step 2 leaves the rule in force; running the same erasure again finishes it.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Collection, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import Connection, delete, func, insert, or_, select, text, update
from sqlalchemy.exc import SQLAlchemyError

from nextturn import events, scopes, tables
from nextturn.errors import CannotForget, NothingToForget, StoreUnavailable
from nextturn.settings import Settings

if TYPE_CHECKING:
    from nextturn.bus import EventLog
    from nextturn.store import Store

Kind = Literal["session", "user", "tenant"]

_ERASURES = tables.table_of(tables.Erasure)
_ERASED = tables.table_of(tables.ErasedSession)
_TURNS = tables.table_of(tables.Turn)
_SESSIONS = tables.table_of(tables.Session)
_FEEDBACK = tables.table_of(tables.Feedback)
_SIGNALS = tables.table_of(tables.Signal)
_CASES = tables.table_of(tables.SignalCase)
_ADAPTERS = tables.table_of(tables.Adapter)
_DEAD = tables.table_of(tables.DeadLetter)
_CHUNK = 500  # ids per IN (...): far below any database's parameter cap


# -- the rules ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rules:
    """Every erasure so far, as plain data: what a writer must not write again.

    >>> from datetime import timedelta
    >>> now = datetime.now(UTC)
    >>> rules = Rules(sessions=frozenset({"s1"}), tenants=frozenset({"gone"}),
    ...               users={("acme", "u1"): now}, scopes={"t.acme.u.u1": now})
    >>> rules.covers_session("acme", "s1"), rules.covers_session("gone", "s9"), rules.covers_session("acme", "s2")
    (True, True, False)
    >>> rules.covers_user("acme", "u1", now - timedelta(seconds=1)), rules.covers_user("acme", "u1", now)
    (True, False)
    """

    seq: int = 0  # the newest erasure they hold
    marks: int = 0  # the newest erased session they hold
    sessions: frozenset[str] = frozenset()
    tenants: frozenset[str] = frozenset()
    users: Mapping[tuple[str, str], datetime] = field(default_factory=dict)  # (tenant, user id) -> before
    scopes: Mapping[str, datetime] = field(default_factory=dict)  # removed scope -> before

    def __bool__(self) -> bool:
        return bool(self.sessions or self.tenants or self.users or self.scopes)

    def covers_session(self, tenant: str, session_id: str) -> bool:
        return session_id in self.sessions or tenant in self.tenants

    def covers_user(self, tenant: str, user: str | None, at: datetime) -> bool:
        before = self.users.get((tenant, user)) if user is not None else None
        return before is not None and _aware(at) < before

    def covers_scope(self, scope: str, at: datetime) -> bool:
        before = self.scopes.get(scope)
        return before is not None and _aware(at) < before

    def covers(self, event: events.Event) -> bool:
        """Whether a reader must drop ``event``.

        >>> now = datetime.now(UTC)
        >>> turn = events.TurnRecorded(tenant="acme", session_id="s2", turn_id="t", model="m", messages=[],
        ...                            user="u1", latency_ms=1, started_at=now, finished_at=now)
        >>> Rules(users={("acme", "u1"): now}).covers(turn), Rules(sessions=frozenset({"s2"})).covers(turn)
        (False, True)
        """
        if isinstance(event, events.TurnRecorded):
            return self.covers_session(event.tenant, event.session_id) or \
                self.covers_user(event.tenant, event.user, event.started_at)
        if isinstance(event, events.FeedbackReceived | events.SignalExtracted):
            return self.covers_session(event.tenant, event.session_id)
        if isinstance(event, events.AdapterPublished | events.DeploymentChanged):
            return self.covers_scope(event.scope, event.occurred_at)
        if isinstance(event, events.DeadLettered):
            return self._covers_letter(event)
        return False

    def _covers_letter(self, letter: events.DeadLettered) -> bool:
        key = letter.key
        if key is not None and (key in self.sessions or self.covers_scope(key, letter.occurred_at)):
            return True
        try:
            body = json.loads(letter.payload)
        except ValueError:
            return False
        if not isinstance(body, dict):
            return False
        tenant, session = body.get("tenant"), body.get("session_id")
        return isinstance(tenant, str) and isinstance(session, str) and self.covers_session(tenant, session)

    def with_sessions(self, sessions: Iterable[str]) -> Rules:
        return replace(self, sessions=self.sessions | frozenset(sessions))


class RuleBook:
    """The rules as one process knows them, read again only when an erasure or an erased session is newer
    than what it holds (two indexed reads per call)."""

    def __init__(self) -> None:
        self.rules = Rules()

    def read(self, conn: Connection, *, hold: bool = False) -> Rules:
        """The current rules. ``hold``: inside a write transaction, take the rules' lock first (Postgres), so
        that no erasure commits between this read and the transaction's end."""
        if hold and conn.dialect.name == "postgresql":
            conn.execute(text("LOCK TABLE erasures IN SHARE MODE"))
        newest = conn.execute(select(func.max(_ERASURES.c.seq))).scalar() or 0
        marks = conn.execute(select(func.max(_ERASED.c.seq))).scalar() or 0
        known = self.rules
        if (newest, marks) == (known.seq, known.marks):
            return known
        tenants, users, removed = set(known.tenants), dict(known.users), dict(known.scopes)
        for row in conn.execute(select(_ERASURES).where(_ERASURES.c.seq > known.seq)):
            before = _aware(row.before)
            if row.kind == "tenant":
                tenants.add(row.tenant)
            elif row.kind == "user" and row.subject is not None:
                users[(row.tenant, row.subject)] = before
            for scope in row.scopes or []:
                removed[scope] = before
        sessions = conn.execute(select(_ERASED.c.session_id).where(_ERASED.c.seq > known.marks)).scalars()
        self.rules = Rules(seq=newest, marks=marks, sessions=known.sessions | frozenset(sessions),
                           tenants=frozenset(tenants), users=users, scopes=removed)
        return self.rules

    def read_store(self, store: Store) -> Rules:
        """The current rules, read on their own (readers that write nothing the rules cover in the same
        transaction: the trainer between rounds, a gateway's watcher)."""
        try:
            with store.engine.connect() as conn:
                return self.read(conn)
        except SQLAlchemyError as exc:
            raise StoreUnavailable(f"cannot read the erasures from the store: {exc}") from exc


def mark(conn: Connection, rules: Rules, dropped: Iterable[events.Event]) -> Rules:
    """Remember as erased the sessions of turns a user's rule covered that the rules did not name yet (a turn
    that arrived after its user was forgotten), and remove what was stored of them meanwhile (feedback that
    came first): later events of those sessions are dropped by everyone. Return the rules with them."""
    found: dict[str, int] = {}
    for event in dropped:
        if isinstance(event, events.TurnRecorded) and event.session_id not in rules.sessions \
                and not rules.covers_session(event.tenant, event.session_id):
            before = rules.users.get((event.tenant, event.user or ""))
            if before is not None:
                found[event.session_id] = _erasure_of(conn, event.tenant, event.user)
    if not found:
        return rules
    for session_id, seq in found.items():
        if conn.execute(select(_ERASED.c.seq).where(_ERASED.c.session_id == session_id)).first() is None:
            conn.execute(insert(_ERASED).values(session_id=session_id, erasure=seq))
    _delete_sessions(conn, list(found))
    return rules.with_sessions(found)


def _erasure_of(conn: Connection, tenant: str, user: str | None) -> int:
    seq = conn.execute(select(func.max(_ERASURES.c.seq)).where(
        _ERASURES.c.kind == "user", _ERASURES.c.tenant == tenant, _ERASURES.c.subject == user)).scalar()
    return int(seq or 0)


# -- forgetting ---------------------------------------------------------------------------------------


@dataclass
class Report:
    """What one erasure removed, and what was trained on it."""

    id: str
    kind: Kind
    tenant: str
    subject: str | None
    sessions: int = 0
    removed: dict[str, int] = field(default_factory=dict)  # what -> how many (rows, log records, files)
    # Published versions trained on the data, "scope-vN" with their status then; those of removed scopes are
    # gone with them and listed in removed_scopes.
    trained_versions: list[dict[str, Any]] = field(default_factory=list)
    removed_scopes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Places:
    """Where a scope's files live: ``<adapters>/<scope>/`` and ``<trainer>/<scope>/``."""

    adapters: Path
    trainer: Path

    @classmethod
    def from_settings(cls, settings: Settings) -> Places:
        return cls(settings.adapters_path, settings.trainer_path)


@dataclass(frozen=True)
class Subject:
    """What the event log must forget: the sessions' records (keyed by session), a tenant's records, and the
    scopes' records (keyed by scope)."""

    sessions: frozenset[str]
    tenant: str | None  # every record of this tenant (a tenant erasure), else None
    scopes: frozenset[str]


def forget_session(store: Store, event_log: EventLog, places: Places, tenant: str, session_id: str, *,
                   actor: str, known: bool = False) -> Report:
    """Forget one session of ``tenant``. NothingToForget when the tenant has no such session (another
    tenant's is as missing); ``known``: the caller served it (it may not be in the store yet)."""
    rows = _read(store, select(_SESSIONS.c.tenant).where(_SESSIONS.c.id == session_id))
    if (not rows and not known) or (rows and rows[0][0] != tenant):
        raise NothingToForget(f"no session {session_id!r}")
    return _forget(store, event_log, places, "session", tenant, session_id, [session_id], [], actor)


def forget_user(store: Store, event_log: EventLog, places: Places, tenant: str, user: str, *,
                actor: str) -> Report:
    """Forget an end user of ``tenant`` (as the request's ``user`` field or X-Nextturn-User named them): every
    session in which they had a turn, and their own scope."""
    digest = scopes.user_id(tenant, user)
    scope = scopes.user_scope(tenant, user)
    sessions = {row[0] for row in _read(store, select(_TURNS.c.session_id).where(
        _TURNS.c.tenant == tenant, or_(_TURNS.c.user == digest, _TURNS.c.scope == scope)).distinct())}
    sessions |= {row[0] for row in _read(store, select(_SESSIONS.c.id).where(
        _SESSIONS.c.tenant == tenant, _SESSIONS.c.user == digest))}
    return _forget(store, event_log, places, "user", tenant, digest, sorted(sessions), [scope], actor)


def forget_tenant(store: Store, event_log: EventLog, places: Places, tenant: str, *, actor: str) -> Report:
    """Forget a tenant: everything it sent, its scopes and its keys. Its name cannot be given keys again."""
    if tenant == events.DEFAULT_SCOPE:
        raise CannotForget(f"the tenant {tenant!r} is how a gateway without keys serves everyone; forget its "
                           "sessions or users instead")
    sessions = sorted({row[0] for row in _read(store, select(_SESSIONS.c.id).where(_SESSIONS.c.tenant == tenant))})
    own = scopes.tenant_scope(tenant)
    found = {row[0] for row in _read(store, select(_ADAPTERS.c.scope).distinct())}
    found |= {row[0] for row in _read(store, select(tables.table_of(tables.Deployment).c.scope))}
    removed = sorted(scope for scope in found | {own} if scope == own or scope.startswith(f"{own}.u."))
    return _forget(store, event_log, places, "tenant", tenant, None, sessions, removed, actor)


def forgotten_tenant(store: Store, tenant: str) -> datetime | None:
    """When ``tenant`` was forgotten (its name takes no keys again), or None."""
    rows = _read(store, select(_ERASURES.c.requested_at).where(_ERASURES.c.kind == "tenant",
                                                                 _ERASURES.c.tenant == tenant))
    return _aware(rows[0][0]) if rows else None


def _forget(store: Store, event_log: EventLog, places: Places, kind: Kind, tenant: str, subject: str | None,
            sessions: list[str], removed_scopes: list[str], actor: str) -> Report:
    now = events.utc_now()
    erasure_id = uuid.uuid4().hex
    report = Report(erasure_id, kind, tenant, subject, sessions=len(sessions), removed_scopes=removed_scopes)
    trained = _trained_versions(store, tenant if kind == "tenant" else None, sessions)
    report.trained_versions = [version for version in trained if version["scope"] not in removed_scopes]
    try:
        # 1. the rule: from its commit on, every writer drops what it covers
        with store.engine.begin() as conn:
            seq = conn.execute(insert(_ERASURES).values(
                id=erasure_id, kind=kind, tenant=tenant, subject=subject,
                before=now, scopes=removed_scopes, actor=actor, requested_at=now, report={},
            ).returning(_ERASURES.c.seq)).scalar_one()
            known = _known_erased(conn, sessions)
            fresh = [{"session_id": session, "erasure": seq} for session in sessions if session not in known]
            if fresh and kind != "tenant":  # a tenant's rule covers its sessions by name
                conn.execute(insert(_ERASED), fresh)
        # 2. what it covers
        with store.engine.begin() as conn:
            report.removed.update(_delete_sessions(conn, sessions))
            if kind == "tenant":
                report.removed.update(_delete_tenant(conn, tenant))
            report.removed.update(_delete_scopes(conn, removed_scopes))
        # 3. the report
        with store.engine.begin() as conn:
            conn.execute(update(_ERASURES).where(_ERASURES.c.seq == seq).values(report=report.to_json()))
    except SQLAlchemyError as exc:
        raise StoreUnavailable(f"cannot forget in the store: {exc}") from exc
    report.removed["log_records"] = event_log.erase(Subject(
        frozenset(sessions), tenant if kind == "tenant" else None, frozenset(removed_scopes)))
    report.removed["scope_files"] = _remove_files(places, removed_scopes)
    with store.engine.begin() as conn:
        conn.execute(update(_ERASURES).where(_ERASURES.c.seq == seq).values(report=report.to_json()))
    return report


def _known_erased(conn: Connection, sessions: list[str]) -> set[str]:
    found: set[str] = set()
    for start in range(0, len(sessions), _CHUNK):
        chunk = sessions[start:start + _CHUNK]
        found |= set(conn.execute(select(_ERASED.c.session_id).where(_ERASED.c.session_id.in_(chunk))).scalars())
    return found


def _delete_sessions(conn: Connection, sessions: list[str]) -> dict[str, int]:
    """Delete every stored row of the sessions; how many of each."""
    removed = {"turns": 0, "sessions": 0, "feedback": 0, "signals": 0, "signal_cases": 0, "dead_letters": 0}
    for start in range(0, len(sessions), _CHUNK):
        chunk = sessions[start:start + _CHUNK]
        for name, table, column in (("turns", _TURNS, _TURNS.c.session_id), ("sessions", _SESSIONS, _SESSIONS.c.id),
                                    ("feedback", _FEEDBACK, _FEEDBACK.c.session_id),
                                    ("signals", _SIGNALS, _SIGNALS.c.session_id),
                                    ("signal_cases", _CASES, _CASES.c.session_id),
                                    ("dead_letters", _DEAD, _DEAD.c.key)):
            removed[name] += conn.execute(delete(table).where(column.in_(chunk))).rowcount or 0
    return removed


def _delete_tenant(conn: Connection, tenant: str) -> dict[str, int]:
    """What is left of a tenant once its sessions are gone (rows of sessions the store never listed), and
    its keys."""
    removed: dict[str, int] = {}
    for name, table in (("turns", _TURNS), ("sessions", _SESSIONS), ("feedback", _FEEDBACK),
                        ("signals", _SIGNALS)):
        removed[f"{name}_unlisted"] = conn.execute(delete(table).where(table.c.tenant == tenant)).rowcount or 0
    keys, tenants = tables.table_of(tables.ApiKey), tables.table_of(tables.Tenant)
    removed["api_keys"] = conn.execute(delete(keys).where(keys.c.tenant_id == tenant)).rowcount or 0
    conn.execute(delete(tenants).where(tenants.c.id == tenant))
    return removed


def _delete_scopes(conn: Connection, removed: list[str]) -> dict[str, int]:
    if not removed:
        return {"adapters": 0, "deployments": 0}
    deployments = tables.table_of(tables.Deployment)
    changes = tables.table_of(tables.DeploymentChange)
    counts = {"adapters": conn.execute(delete(_ADAPTERS).where(_ADAPTERS.c.scope.in_(removed))).rowcount or 0,
              "deployments": conn.execute(delete(deployments).where(deployments.c.scope.in_(removed))).rowcount or 0}
    conn.execute(delete(changes).where(changes.c.scope.in_(removed)))
    conn.execute(delete(_SIGNALS).where(_SIGNALS.c.scope.in_(removed)))
    return counts


def _remove_files(places: Places, removed: Collection[str]) -> int:
    """Delete the removed scopes' adapter versions and trainer checkpoints; how many scopes had files. A
    trainer's lock file stays: the trainer holding it learns of the erasure and starts the scope over."""
    count = 0
    for scope in removed:
        if not scopes.valid(scope):
            continue
        found = False
        versions = places.adapters / scope
        if versions.is_dir():
            shutil.rmtree(versions, ignore_errors=True)
            found = True
        checkpoints = places.trainer / scope
        for entry in checkpoints.iterdir() if checkpoints.is_dir() else ():
            if entry.name != "lock":
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
                found = True
        count += found
    return count


def _trained_versions(store: Store, tenant: str | None, sessions: list[str]) -> list[dict[str, Any]]:
    """Every stored version whose updates used a signal of the sessions (or of the tenant): meta.json's
    ``data.signals`` lists the signal event ids of each update."""
    ids: set[str] = set()
    if tenant is not None:
        ids |= {row[0] for row in _read(store, select(_SIGNALS.c.id).where(_SIGNALS.c.tenant == tenant))}
    for start in range(0, len(sessions), _CHUNK):
        ids |= {row[0] for row in _read(store, select(_SIGNALS.c.id).where(
            _SIGNALS.c.session_id.in_(sessions[start:start + _CHUNK])))}
    if not ids:
        return []
    found = []
    for row in _read(store, select(_ADAPTERS.c.scope, _ADAPTERS.c.version, _ADAPTERS.c.status, _ADAPTERS.c.meta)):
        used = set(((row.meta or {}).get("data") or {}).get("signals") or [])
        if used & ids:
            found.append({"version": events.adapter_name(row.scope, row.version), "scope": row.scope,
                          "status": row.status, "signals": len(used & ids)})
    return sorted(found, key=lambda item: (item["scope"], int(item["version"].rpartition("-v")[2])))


def _read(store: Store, query: Any) -> list[Any]:
    try:
        with store.engine.connect() as conn:
            return list(conn.execute(query).all())
    except SQLAlchemyError as exc:
        raise StoreUnavailable(f"cannot read the store: {exc}") from exc


def _aware(moment: datetime) -> datetime:
    """SQLite returns naive datetimes (UTC as written)."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
