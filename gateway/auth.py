"""Who is calling: ``Authorization: Bearer <key>``, and each key belongs to a tenant.

Keys come from Settings (``NEXTTURN_API_KEYS``) for the embedded default. With no keys configured the
gateway is open, as the tenant ``default``, and only on a loopback address (checked at start).
"""

from __future__ import annotations

import hmac
from ipaddress import ip_address

from gateway.errors import AuthenticationFailed
from nextturn.errors import ConfigError
from nextturn.settings import Settings

OPEN_TENANT = "default"


class Keyring:
    def __init__(self, keys: dict[str, str]) -> None:
        self._keys = keys

    @classmethod
    def from_settings(cls, settings: Settings) -> Keyring:
        keys = settings.tenant_keys
        if not keys and not _loopback(settings.host):
            raise ConfigError(
                f"the gateway binds to {settings.host} with no API keys; set NEXTTURN_API_KEYS (key:tenant,…) "
                "or bind to 127.0.0.1"
            )
        return cls(keys)

    def tenant(self, authorization: str | None) -> str:
        if not self._keys:
            return OPEN_TENANT
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise AuthenticationFailed("missing API key: send Authorization: Bearer <key>")
        for known, tenant in self._keys.items():
            if hmac.compare_digest(known.encode(), key.strip().encode()):
                return tenant
        raise AuthenticationFailed("invalid API key")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return False
