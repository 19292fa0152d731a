"""Scope names: derived from what a request says, safe in a path and a model id, never another tenant's."""

from __future__ import annotations

from pathlib import Path

from hypothesis import example, given
from hypothesis import strategies as st

from nextturn import events, scopes

anything = st.text(max_size=300)  # any unicode a key's tenant or a client's `user` may hold


@given(tenant=anything, user=anything)
def test_every_derived_scope_is_a_safe_name_inside_the_adapters_directory(tenant: str, user: str) -> None:
    root = Path("/data/adapters")
    for policy in scopes.SCOPE_BY:
        scope = scopes.scope_of(policy, tenant, user)
        assert scopes.valid(scope), scope
        assert (root / scope).resolve().parent == root  # one directory level, inside the root
        assert events.served_version(events.adapter_name(scope, 3)) == (scope, 3)  # the model id parses back


@given(tenant=anything, other=anything, user=anything)
@example(tenant="u", other="", user="0")  # found by hypothesis: a tenant named "u" ("t.u.u.<digest>")
def test_no_user_of_one_tenant_reaches_another_tenants_scope(tenant: str, other: str, user: str) -> None:
    mine = scopes.scope_of("user", tenant, user)
    assert scopes.chain(mine)[-1] == events.DEFAULT_SCOPE
    assert scopes.tenant_scope(tenant) in scopes.chain(mine)  # a user falls back to its own tenant
    if other != tenant:
        assert scopes.tenant_scope(other) != scopes.tenant_scope(tenant)
        assert scopes.tenant_scope(other) not in scopes.chain(mine)
        assert scopes.scope_of("user", other, user) != mine


def test_crafted_users_are_hashed_and_tenants_named_like_the_shared_scope_are_not_it() -> None:
    for user in ("../x", "x" * 10_000, "ünï/cödé", "default", "t.other"):
        scope = scopes.user_scope("acme", user)
        assert scope.startswith("t.acme.u.") and len(scope) <= scopes.MAX_NAME and "/" not in scope
    assert scopes.tenant_scope("default") == "t.default" != events.DEFAULT_SCOPE
    assert scopes.chain(scopes.tenant_scope("x.u.y")) == (scopes.tenant_scope("x.u.y"), events.DEFAULT_SCOPE)
