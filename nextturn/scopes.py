"""Scopes: which adapter lineage a request learns into and is served from (DESIGN, Scopes).

``NEXTTURN_SCOPE_BY`` maps a request to its scope:

- ``deployment``: every request is in the one shared scope, ``default``;
- ``tenant``: each API key's tenant has its own, ``t.<tenant>`` (the tenant ``default``, as which a gateway
  without keys serves everyone, learns into ``default``);
- ``user``: each end user of a tenant (the request's ``user`` field, or the ``X-Nextturn-User`` header) has
  its own, ``t.<tenant>.u.<digest>``; a request that names no user is in its tenant's scope.

A scope's **chain** is where it is served from when it has no version of its own: user → tenant →
``default`` (and then the base model).

A scope name names directories (``adapters/<scope>/``, ``trainer/<scope>/``) and model ids
(``<scope>-v<n>``), so it is made only of ``[a-z0-9._-]``, at most :data:`MAX_NAME` characters, and never
``.`` or ``..``. A tenant name that fits ``[a-z0-9][a-z0-9_-]{0,31}`` is used as it is; any other (capitals,
dots, slashes, unicode, longer) is replaced by a digest of it, so two tenants never share a scope. A user
is always a digest of (tenant, user): what a client sends can neither reach another tenant's scope nor
put personal data (an e-mail address) into a path.
"""

from __future__ import annotations

import hashlib
import re
from typing import Literal

from nextturn.events import DEFAULT_SCOPE

ScopeBy = Literal["deployment", "tenant", "user"]
SCOPE_BY: tuple[ScopeBy, ...] = ("deployment", "tenant", "user")
MAX_NAME = 64
MAX_USER_CHARS = 256  # a longer `user` is refused (OpenAI's own field is an identifier, not a document)

_PLAIN_TENANT = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode("utf-8", "surrogatepass")).hexdigest()[:20]


def tenant_scope(tenant: str) -> str:
    """The scope of a tenant's own lineage.

    >>> tenant_scope("acme"), tenant_scope("Acme"), tenant_scope("../etc")
    ('t.acme', 't.h-8e2beaaa2b5aa0c40a94', 't.h-2a11316fff9660f1d7e4')
    """
    return f"t.{tenant}" if _PLAIN_TENANT.fullmatch(tenant) else f"t.h-{_digest('tenant', tenant)}"


def user_id(tenant: str, user: str) -> str:
    """How an end user of a tenant is recorded (turns, sessions) and named in a user's scope: a digest, so the
    store holds no address or name a client sent, and ``nextturn users forget`` finds the user's turns.

    >>> user_id("acme", "ana@example.com")
    '11193ea5ea5431f3ec68'
    """
    return _digest("user", tenant, user)


def user_scope(tenant: str, user: str) -> str:
    """The scope of one end user of a tenant.

    >>> user_scope("acme", "ana@example.com")
    't.acme.u.11193ea5ea5431f3ec68'
    """
    return f"{tenant_scope(tenant)}.u.{user_id(tenant, user)}"


def scope_of(policy: ScopeBy, tenant: str, user: str | None = None) -> str:
    """The scope a request learns into. The tenant ``default`` (a gateway without keys serves everyone as it)
    is the deployment's own: its scope is the shared one.

    >>> [scope_of(policy, "acme", "ana") for policy in SCOPE_BY]
    ['default', 't.acme', 't.acme.u.e86e93b4d4752b8370b5']
    >>> scope_of("user", "acme", None), scope_of("user", "acme", ""), scope_of("tenant", "default")
    ('t.acme', 't.acme', 'default')
    """
    if policy == "deployment" or (tenant == DEFAULT_SCOPE and not (policy == "user" and user)):
        return DEFAULT_SCOPE
    if policy == "user" and user:
        return user_scope(tenant, user)
    return tenant_scope(tenant)


def chain(scope: str) -> tuple[str, ...]:
    """The scope, then each scope it falls back to, ending with ``default``.

    >>> chain("t.acme.u.0a5b4c7e4e4c8a8d8a67"), chain("t.acme"), chain("default")
    (('t.acme.u.0a5b4c7e4e4c8a8d8a67', 't.acme', 'default'), ('t.acme', 'default'), ('default',))
    >>> chain(user_scope("u", "0"))[1]  # a tenant named "u": the user's part is the last ".u." (a digest)
    't.u'
    """
    if scope == DEFAULT_SCOPE:
        return (DEFAULT_SCOPE,)
    tenant, sep, _ = scope.rpartition(".u.")
    return (scope, tenant, DEFAULT_SCOPE) if sep else (scope, DEFAULT_SCOPE)


def link_namespace(tenant: str, scope: str) -> str:
    """What a turn's implicit session links are hashed under (nextturn.conversation): its tenant, and for a
    user's scope also that scope, so that two users of one tenant who send the same conversation never
    continue each other's sessions.

    >>> link_namespace("acme", "t.acme"), link_namespace("acme", "t.acme.u.e86e").split(chr(0))
    ('acme', ['acme', 't.acme.u.e86e'])
    """
    return f"{tenant}\x00{scope}" if len(chain(scope)) == 3 else tenant


def valid(name: str) -> bool:
    """Whether ``name`` can be a scope: what :func:`scope_of` makes, or a name an operator chose that is as
    safe in a path and a model id.

    >>> [valid(name) for name in ("default", "t.acme", "team-a", "..", "a/b", "A", "x" * 65, "")]
    [True, True, True, False, False, False, False, False]
    """
    return len(name) <= MAX_NAME and _NAME.fullmatch(name) is not None and name not in (".", "..")
