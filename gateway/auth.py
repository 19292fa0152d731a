"""Who is calling: ``Authorization: Bearer <key>``, and each key belongs to a tenant.

Keys come from Settings (``NEXTTURN_API_KEYS``, the embedded default) and from the store (production,
``nextturn keys create``). A key found in the store is remembered for a minute, so a request costs a
dictionary lookup and a revoked key stops working within that minute. With no key anywhere, the gateway
is open, as the tenant ``default``, and only on a loopback address (checked at start); its admin routes are
open too, and it closes within seconds of the first key's creation in the store. Otherwise admin routes
need ``NEXTTURN_ADMIN_KEY`` or a store admin key.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Callable
from ipaddress import ip_address

from gateway.errors import AuthenticationFailed, AuthenticationUnavailable, PermissionDenied
from nextturn.errors import ConfigError, NextturnError
from nextturn.keys import Holder
from nextturn.settings import Settings

OPEN_TENANT = "default"
REMEMBER_S = 60.0
RECHECK_S = 5.0  # an open gateway looks for keys in the store this often: the first one closes it


class Keyring:
    def __init__(self, keys: dict[str, str], admin_key: str | None = None) -> None:
        self._keys = keys
        self._admin_key = admin_key
        self._lookup: Callable[[str], Holder | None] | None = None
        self._has_keys: Callable[[], bool] | None = None
        self._next_check = 0.0
        self._remembered: dict[str, tuple[Holder, float]] = {}
        self.open = not keys

    @classmethod
    def from_settings(cls, settings: Settings) -> Keyring:
        keys = settings.tenant_keys
        if not keys and not _loopback(settings.host):
            raise ConfigError(
                f"the gateway binds to {settings.host} with no API keys; set NEXTTURN_API_KEYS (key:tenant,…) "
                "or bind to 127.0.0.1"
            )
        return cls(keys, settings.admin_key)

    def use_store(self, lookup: Callable[[str], Holder | None], has_keys: Callable[[], bool]) -> None:
        """Look unknown keys up in the store; a store with keys closes a gateway that had none, at start or
        within RECHECK_S of the first key's creation."""
        self._lookup, self._has_keys = lookup, has_keys
        self.open = self.open and not has_keys()
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
