"""API keys kept in the store (production): ``nextturn keys create --tenant T``.

Only a key's SHA-256 digest is stored; the key itself is shown once, when it is created. A key belongs to
a tenant and may be an admin key. The gateway looks keys up here when they are not in its Settings.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy.exc import SQLAlchemyError

from nextturn import events
from nextturn.errors import StoreUnavailable
from nextturn.store import Store
from nextturn.tables import ApiKey, Tenant

PREFIX = "nt-"


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
    try:
        row = store.get(ApiKey, digest(key))
    except SQLAlchemyError as exc:
        raise StoreUnavailable(f"cannot look the key up: {exc}") from exc
    if row is None or row.revoked_at is not None:
        return None
    return Holder(row.tenant_id, row.is_admin)


def any_keys(store: Store) -> bool:
    try:
        return store.count(ApiKey) > 0
    except SQLAlchemyError as exc:
        raise StoreUnavailable(f"cannot count the keys: {exc}") from exc
