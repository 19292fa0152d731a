"""Who is calling: ``Authorization: Bearer <key>``, and each key belongs to a tenant.

Keys come from Settings (``NEXTTURN_API_KEYS``) for the embedded default. With no keys configured the
gateway is open, as the tenant ``default``, and only on a loopback address (checked at start); its
admin routes are open too. Otherwise admin routes need ``NEXTTURN_ADMIN_KEY``.
"""

from __future__ import annotations

import hmac
from ipaddress import ip_address

from gateway.errors import AuthenticationFailed, PermissionDenied
from nextturn.errors import ConfigError
from nextturn.settings import Settings

OPEN_TENANT = "default"


class Keyring:
    def __init__(self, keys: dict[str, str], admin_key: str | None = None) -> None:
        self._keys = keys
        self._admin_key = admin_key

    @classmethod
    def from_settings(cls, settings: Settings) -> Keyring:
        keys = settings.tenant_keys
        if not keys and not _loopback(settings.host):
            raise ConfigError(
                f"the gateway binds to {settings.host} with no API keys; set NEXTTURN_API_KEYS (key:tenant,…) "
                "or bind to 127.0.0.1"
            )
        return cls(keys, settings.admin_key)

    def admin(self, authorization: str | None) -> None:
        """Pass for the admin key (or an open loopback gateway); raise otherwise."""
        if not self._keys and self._admin_key is None:
            return
        key = _bearer(authorization)
        if self._admin_key is not None and hmac.compare_digest(self._admin_key.encode(), key.encode()):
            return
        if self._admin_key is None:
            raise PermissionDenied("admin routes are disabled: set NEXTTURN_ADMIN_KEY")
        self.tenant(authorization)  # an unknown key is a 401; a tenant's key is not enough:
        raise PermissionDenied("this route needs the admin key")

    def tenant(self, authorization: str | None) -> str:
        if not self._keys:
            return OPEN_TENANT
        key = _bearer(authorization)
        for known, tenant in self._keys.items():
            if hmac.compare_digest(known.encode(), key.encode()):
                return tenant
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
