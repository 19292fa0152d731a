"""API keys kept in the store (production): ``nextturn keys create --tenant T``, ``keys list``, ``keys revoke``.

Only a key's SHA-256 digest is stored; the key itself is shown once, when it is created. A key belongs to
a tenant and may be an admin key. The gateway looks keys up here when they are not in its Settings.

Operator sessions: a login to the operator's page opened with an admin key (:func:`open_session`). The
browser keeps a random token; the store keeps its digest, the operator's name and the digest of the key, so
that a session ends when it expires, when it is closed, and when its key is revoked.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import select

from nextturn import erasure, events
from nextturn.errors import NextturnError, StoreUnavailable
from nextturn.store import Store
from nextturn.tables import ApiKey, OperatorSession, Tenant

PREFIX = "nt-"


class KeyNotFound(NextturnError):
    """No single key matches what the operator named."""


class TenantForgotten(NextturnError):
    """The tenant was forgotten (``nextturn tenants forget``): everything under its name is dropped, so it
    takes no keys again."""


@dataclass(frozen=True)
class Holder:
    tenant: str
    is_admin: bool


def digest(key: str) -> str:
    """
    >>> digest("nt-abc") == digest("nt-abc") != digest("nt-abd")
    True
    """
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(store: Store, tenant: str, *, admin: bool = False) -> str:
    """A new key for ``tenant`` (created if new); returns the key, which is not stored anywhere."""
    forgotten = erasure.forgotten_tenant(store, tenant)
    if forgotten is not None:
        raise TenantForgotten(f"the tenant {tenant!r} was forgotten on {forgotten:%Y-%m-%d %H:%M} UTC and nothing "
                              "under its name is kept; choose another name")
    key = PREFIX + secrets.token_urlsafe(32)
    now = events.utc_now()
    try:
        with store.session() as db:
            if db.get(Tenant, tenant) is None:
                db.add(Tenant(id=tenant, name=tenant, created_at=now))
                db.flush()  # the key's foreign key needs the tenant row first
            db.add(ApiKey(key_hash=digest(key), tenant_id=tenant, is_admin=admin, created_at=now))
            db.commit()
    except SQLAlchemyError as exc:
        raise StoreUnavailable(f"cannot store the key: {exc}") from exc
    return key


def find_key(store: Store, key: str) -> Holder | None:
    """Who holds ``key``; None for an unknown or revoked key."""
    return find_digest(store, digest(key))


def find_digest(store: Store, key_hash: str) -> Holder | None:
    """Who holds the key of this digest; None for an unknown or revoked key."""
    try:
        row = store.get(ApiKey, key_hash)
    except SQLAlchemyError as exc:
        raise StoreUnavailable(f"cannot look the key up: {exc}") from exc
    if row is None or row.revoked_at is not None:
        return None
    return Holder(row.tenant_id, row.is_admin)


SESSION_S = 12 * 3600.0  # an operator logs in again after this


def open_session(store: Store, key_hash: str, actor: str, *, ttl_s: float = SESSION_S,
                 now: datetime | None = None) -> str:
    """A new operator session for the holder of the admin key of digest ``key_hash``; returns its token,
    which is not stored anywhere. Sessions that expired are removed on the way."""
    token = secrets.token_urlsafe(32)
    now = now or events.utc_now()
    try:
        with store.session() as db:
            for old in db.exec(select(OperatorSession).where(OperatorSession.expires_at < now)).all():
                db.delete(old)
            db.add(OperatorSession(token_hash=digest(token), actor=actor, key_hash=key_hash, created_at=now,
                                   expires_at=now + timedelta(seconds=ttl_s)))
            db.commit()
    except SQLAlchemyError as exc:
        raise StoreUnavailable(f"cannot store the session: {exc}") from exc
    return token


def find_session(store: Store, token: str, *, now: datetime | None = None) -> OperatorSession | None:
    """The session of ``token``; None for an unknown, closed or expired one. Whether its key still holds is
    the caller's to check (the key may live in Settings)."""
    try:
        row = store.get(OperatorSession, digest(token))
    except SQLAlchemyError as exc:
        raise StoreUnavailable(f"cannot look the session up: {exc}") from exc
    if row is None:
        return None
    expires = row.expires_at if row.expires_at.tzinfo else row.expires_at.replace(tzinfo=UTC)  # SQLite: naive UTC
    return row if expires > (now or events.utc_now()) else None


def close_session(store: Store, token: str) -> None:
    try:
        with store.session() as db:
            row = db.get(OperatorSession, digest(token))
            if row is not None:
                db.delete(row)
                db.commit()
    except SQLAlchemyError as exc:
        raise StoreUnavailable(f"cannot close the session: {exc}") from exc


def any_keys(store: Store) -> bool:
    try:
        return store.count(ApiKey) > 0
    except SQLAlchemyError as exc:
        raise StoreUnavailable(f"cannot count the keys: {exc}") from exc


@dataclass(frozen=True)
class KeyInfo:
    id: str  # the first characters of the key's digest: enough to name it, useless to call with
    tenant: str
    is_admin: bool
    created_at: str
    revoked_at: str | None


ID_CHARS = 12


def list_keys(store: Store) -> list[KeyInfo]:
    """Every key in the store, oldest first, by the id ``nextturn keys revoke`` takes."""
    try:
        with store.session() as db:
            rows = db.exec(select(ApiKey).order_by(ApiKey.created_at)).all()  # type: ignore[arg-type]
    except SQLAlchemyError as exc:
        raise StoreUnavailable(f"cannot list the keys: {exc}") from exc
    return [KeyInfo(row.key_hash[:ID_CHARS], row.tenant_id, row.is_admin, row.created_at.isoformat(),
                    row.revoked_at.isoformat() if row.revoked_at else None) for row in rows]


def revoke_key(store: Store, key_or_id: str) -> KeyInfo:
    """Revoke a key, named by the key itself or by its id (a prefix of its digest, at least 8 characters).
    Gateways stop taking it within REMEMBER_S (gateway.auth). Revoking twice keeps the first time."""
    try:
        with store.session() as db:
            if key_or_id.startswith(PREFIX):
                found = [row for row in [db.get(ApiKey, digest(key_or_id))] if row is not None]
            elif len(key_or_id) >= 8:
                found = list(db.exec(select(ApiKey).where(
                    ApiKey.key_hash.startswith(key_or_id.lower()))).all())
            else:
                raise KeyNotFound("name a key by the key itself or by an id of at least 8 characters")
            if len(found) != 1:
                raise KeyNotFound(f"{len(found)} keys match {key_or_id!r}; `nextturn keys list` shows their ids")
            row = found[0]
            if row.revoked_at is None:
                row.revoked_at = events.utc_now()
                db.add(row)
                db.commit()
                db.refresh(row)
            return KeyInfo(row.key_hash[:ID_CHARS], row.tenant_id, row.is_admin, row.created_at.isoformat(),
                           row.revoked_at.isoformat() if row.revoked_at else None)
    except SQLAlchemyError as exc:
        raise StoreUnavailable(f"cannot revoke the key: {exc}") from exc
