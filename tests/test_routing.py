"""The router on its own: sticky sessions, canary share, draining and rolled-back versions (a clock we move)."""

from __future__ import annotations

from gateway.routing import Router
from nextturn import events
from nextturn.deployments import Deployment, bucket


class Loaded:
    """What the router asks of an engine: which model ids exist (every deployed version is loaded here)."""

    def adapter_for(self, model: str) -> str | None:
        return events.BASE_VERSION if model == "tiny" else None

    def models(self) -> list[str]:
        return ["tiny"]


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def route(router: Router, session: str, parent: str | None = None) -> str:
    return router.route("tiny", "acme", session, parent)


def test_new_sessions_split_by_hash_and_keep_their_version_as_the_weight_rises() -> None:
    router = Router(Loaded())  # type: ignore[arg-type]
    router.apply(Deployment(canary=1, weight=0.3, schedule=(0.3, 0.6)), lambda _: True, ())
    sessions = [f"s{n}" for n in range(400)]
    first = {s: route(router, s) for s in sessions}
    assert {s for s, v in first.items() if v == "default-v1"} == {s for s in sessions if bucket("acme", s) < 0.3}
    router.apply(Deployment(canary=1, weight=0.6, schedule=(0.3, 0.6)), lambda _: True, ())
    assert all(route(router, s, parent=first[s]) == first[s] for s in sessions)  # sessions with turns stay
    share = sum(route(router, f"new{n}") == "default-v1" for n in range(2000)) / 2000
    assert 0.55 < share < 0.65  # new sessions get the new weight


def test_a_replaced_version_drains_its_sessions_and_a_rolled_back_one_stops_at_once() -> None:
    clock = Clock()
    router = Router(Loaded(), clock=clock)  # type: ignore[arg-type]
    router.apply(Deployment(stable=1), lambda _: True, ())
    assert router.apply(Deployment(stable=2), lambda _: True, ()) == []  # v1 drains: nothing unloads yet
    clock.now = 50.0
    assert route(router, "old", parent="default-v1") == "default-v1"  # a turn keeps it in use
    clock.now = 100.0
    assert router.drained(60.0) == []
    clock.now = 111.0
    assert router.drained(60.0) == ["default-v1"]
    assert route(router, "old", parent="default-v1") == "default-v2"
    router.apply(Deployment(stable=2, canary=3, weight=0.5, schedule=(0.5,)), lambda _: True, ())
    assert router.apply(Deployment(stable=2), lambda _: True, bad={"default-v3"}) == ["default-v3"]
    assert route(router, "on-canary", parent="default-v3") == "default-v2"


def test_a_version_that_did_not_load_gets_no_sessions() -> None:
    router = Router(Loaded())  # type: ignore[arg-type]
    router.apply(Deployment(stable=4, canary=5, weight=0.9, schedule=(0.9,)), lambda name: name == "base", ())
    assert (router.stable, router.canary) == ("base", None)
    assert {route(router, f"s{n}") for n in range(50)} == {"base"}


def deployed(scope: str, stable: int | None = None, canary: int | None = None, weight: float = 0.0) -> Deployment:
    return Deployment(scope, stable, canary, weight, schedule=(weight,) if canary else ())


def test_each_scope_is_served_its_own_versions_and_falls_back_along_its_chain() -> None:
    router = Router(Loaded())  # type: ignore[arg-type]
    for deployment in (deployed("default", stable=3), deployed("t.acme", stable=2), deployed("t.globex", stable=1),
                       deployed("t.acme.u.ana", stable=5)):
        router.apply(deployment, lambda _: True, ())

    def served(scope: str, session: str = "s") -> str:
        return router.route("tiny", "acme", session, None, scope)

    assert served("t.acme") == "t.acme-v2" and served("t.globex") == "t.globex-v1"
    assert served("t.initech") == "default-v3"  # no version of its own: the shared one
    assert served("t.acme.u.ana") == "t.acme.u.ana-v5"
    assert served("t.acme.u.ben") == "t.acme-v2"  # a user without a version: its tenant's
    assert served("default") == "default-v3"
    # a session keeps its version while that serves in its own chain, never another tenant's
    assert router.route("tiny", "acme", "s", "t.acme-v2", "t.acme.u.ben") == "t.acme-v2"
    assert router.route("tiny", "acme", "s", "t.globex-v1", "t.acme") == "t.acme-v2"


def test_a_canary_in_one_scope_never_changes_another_scopes_routing() -> None:
    router = Router(Loaded())  # type: ignore[arg-type]
    router.apply(deployed("default", stable=3), lambda _: True, ())
    router.apply(deployed("t.globex", stable=1), lambda _: True, ())
    sessions = [f"s{n}" for n in range(300)]
    before = {(scope, s): router.route("tiny", "acme", s, None, scope) for scope in ("t.globex", "t.initech")
              for s in sessions}
    router.apply(deployed("t.acme", canary=1, weight=0.5), lambda _: True, ())
    after = {(scope, s): router.route("tiny", "acme", s, None, scope) for scope in ("t.globex", "t.initech")
             for s in sessions}
    assert after == before
    acme = {s: router.route("tiny", "acme", s, None, "t.acme") for s in sessions}
    # acme's first canary takes its share; the rest of acme is served what its parent serves, not the base
    assert set(acme.values()) == {"t.acme-v1", "default-v3"}
    assert {s for s, v in acme.items() if v == "t.acme-v1"} == {s for s in sessions if bucket("acme", s) < 0.5}


def test_a_scope_without_a_stable_version_never_holds_sessions_on_the_base_model() -> None:
    """Its `base` is a placeholder for "what the chain serves": a session that began on the base model keeps
    it only while the shared scope really serves it (or drains it)."""
    clock = Clock()
    router = Router(Loaded(), clock=clock)  # type: ignore[arg-type]
    router.apply(deployed("t.acme", canary=1, weight=0.5), lambda _: True, ())
    router.apply(deployed("default", stable=3), lambda _: True, ())  # base drains in the shared lane
    clock.now = 10_000.0
    router.drained(60.0)
    off_canary = next(s for s in (f"s{n}" for n in range(100)) if bucket("acme", s) >= 0.5)
    assert router.route("tiny", "acme", off_canary, "base", "t.acme") == "default-v3"
    router.apply(deployed("t.acme", stable=1), lambda _: True, ())  # promoted: nothing drains in acme's lane
    assert router.lanes["t.acme"].draining == {}
