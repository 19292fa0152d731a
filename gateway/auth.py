"""Who is calling: ``Authorization: Bearer <key>``, and each key belongs to a tenant.

Keys come from Settings (``NEXTTURN_API_KEYS``, the embedded default) and from the store (production,
``nextturn keys create``). A key found in the store is remembered for a minute, so a request costs a
dictionary lookup and a revoked key stops working within that minute. A gateway on a loopback address with
no key anywhere is open, as the tenant ``default``, admin routes included, and closes within seconds of the
first key's creation in the store. A gateway on any other address is never open: with no key in Settings it
takes the store's keys (and refuses every request until there is one: ``nextturn keys create``). Admin routes
need ``NEXTTURN_ADMIN_KEY`` or a store admin key.

The operator's page logs in with an admin key once (:meth:`Keyring.admin_login`) and then holds a session
(:mod:`nextturn.keys`) that lasts while the key it was opened with does (:meth:`Keyring.session_holds`).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Callable
from ipaddress import ip_address

from gateway.errors import AuthenticationFailed, AuthenticationUnavailable, PermissionDenied
from nextturn.errors import NextturnError
from nextturn.keys import Holder, digest
from nextturn.settings import Settings

_log = logging.getLogger(__name__)

OPEN_TENANT = "default"
REMEMBER_S = 60.0
RECHECK_S = 5.0  # an open gateway looks for keys in the store this often: the first one closes it
OPEN_LOGIN = "open"  # what an operator session records of its key on an open gateway without an admin key


class Keyring:
    def __init__(self, keys: dict[str, str], admin_key: str | None = None, may_open: bool = True) -> None:
        self._keys = keys
        self._admin_key = admin_key
        self._lookup: Callable[[str], Holder | None] | None = None
        self._lookup_digest: Callable[[str], Holder | None] | None = None
        self._has_keys: Callable[[], bool] | None = None
        self._next_check = 0.0
        self._remembered: dict[str, tuple[Holder, float]] = {}
        self.open = may_open and not keys

    @classmethod
    def from_settings(cls, settings: Settings) -> Keyring:
        return cls(settings.tenant_keys, settings.admin_key, may_open=_loopback(settings.host))

    def use_store(self, lookup: Callable[[str], Holder | None], has_keys: Callable[[], bool],
                  lookup_digest: Callable[[str], Holder | None] | None = None) -> None:
        """Look unknown keys up in the store (by the key, and by its digest for operator sessions); a store
        with keys closes a gateway that had none, at start or within RECHECK_S of the first key's creation."""
        self._lookup, self._has_keys, self._lookup_digest = lookup, has_keys, lookup_digest
        self.open = self.open and not has_keys()
        if not self.open and not self._keys and not has_keys() and self._admin_key is None:
            _log.warning("no API keys yet: every request is refused until `nextturn keys create` makes one")
        self._next_check = time.monotonic() + RECHECK_S

    async def _still_open(self) -> bool:
        if self.open and self._has_keys is not None and time.monotonic() >= self._next_check:
            self._next_check = time.monotonic() + RECHECK_S
            try:
                self.open = not await asyncio.to_thread(self._has_keys)
            except NextturnError as exc:
                raise AuthenticationUnavailable(f"cannot check for API keys now: {exc}") from exc
        return self.open

    async def tenant(self, authorization: str | None) -> str:
        if await self._still_open():
            return OPEN_TENANT
        return (await self._holder(authorization)).tenant

    async def admin(self, authorization: str | None) -> None:
        """Pass for an admin key (or an open loopback gateway without one); raise otherwise."""
        if await self._still_open() and self._admin_key is None:
            return
        key = _bearer(authorization)
        if self._admin_key is not None and hmac.compare_digest(self._admin_key.encode(), key.encode()):
            return
        if (await self._holder(authorization)).is_admin:
            return
        raise PermissionDenied("this route needs an admin key")

    async def admin_login(self, key: str) -> str:
        """Check ``key`` as an admin key (raise otherwise); return what an operator session keeps of it: its
        digest, or :data:`OPEN_LOGIN` on an open gateway without an admin key."""
        if await self._still_open() and self._admin_key is None:
            return OPEN_LOGIN
        await self.admin(f"Bearer {key}")
        return digest(key.strip())

    async def session_holds(self, key_hash: str) -> bool:
        """Whether the key an operator session was opened with (by its digest) is an admin key still."""
        if self._admin_key is not None and hmac.compare_digest(key_hash, digest(self._admin_key)):
            return True
        if key_hash == OPEN_LOGIN:
            return self._admin_key is None and await self._still_open()
        if self._lookup_digest is None:
            return False
        try:
            holder = await asyncio.to_thread(self._lookup_digest, key_hash)
        except NextturnError as exc:
            raise AuthenticationUnavailable(f"cannot check the session's key now: {exc}") from exc
        return holder is not None and holder.is_admin

    async def _holder(self, authorization: str | None) -> Holder:
        key = _bearer(authorization)
        for known, tenant in self._keys.items():
            if hmac.compare_digest(known.encode(), key.encode()):
                return Holder(tenant, is_admin=False)
        remembered = self._remembered.get(key)
        if remembered is not None and time.monotonic() - remembered[1] < REMEMBER_S:
            return remembered[0]
        if self._lookup is not None:
            try:
                holder = await asyncio.to_thread(self._lookup, key)
            except NextturnError as exc:
                raise AuthenticationUnavailable(f"cannot check the API key now: {exc}") from exc
            if holder is not None:
                if len(self._remembered) > 100_000:
                    self._remembered.clear()
                self._remembered[key] = (holder, time.monotonic())
                return holder
        raise AuthenticationFailed("invalid API key")


def _bearer(authorization: str | None) -> str:
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise AuthenticationFailed("missing API key: send Authorization: Bearer <key>")
    return key.strip()


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return False
