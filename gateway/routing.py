"""Which adapter version serves a request.

A request for a version by name (a model id in /v1/models) is pinned to it. A request for the served
model is in a scope (:mod:`nextturn.scopes`) and follows a deployment (:mod:`nextturn.deployments`): each
scope's deployment is a **lane** with its own stable version, canary and draining versions. In this order:

1. a session that already has turns keeps the version its last turn ran on, while that version still
   serves in a lane of the request's chain: a stable version, a canary, or a version a deployment replaced
   and that is draining (it serves the sessions that began on it until none has had a turn for
   ``drain_s``). A rolled-back version does not drain: its sessions move at once;
2. otherwise the chain's lanes are asked in order (the request's own scope, its tenant's, ``default``): a
   new session goes to a lane's canary when the hash of (tenant, session id) falls below the canary's
   weight, else to the lane's stable version; a lane with no stable version of its own passes the session
   on to the next (a scope's first canary is tried beside what its parent serves, not beside the base);
3. with no version anywhere in the chain, the base model.

A version serves only once the engine has loaded it (:meth:`Router.apply` is told which are), and the
router forgets a version before the engine unloads it, so no request is routed to an unloaded version.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from gateway.engines import Engine
from gateway.errors import Conflict, NotFound
from nextturn import events
from nextturn.deployments import Deployment, bucket
from nextturn.scopes import chain


@dataclass
class Lane:
    """One scope's deployment as this replica routes it."""

    deployment: Deployment
    stable: str = events.BASE_VERSION
    canary: str | None = None
    weight: float = 0.0
    draining: dict[str, float] = field(default_factory=dict)  # replaced version -> when a session last used it

    @property
    def inherits(self) -> bool:
        """No stable version of its own: its sessions off the canary are served by the next in the chain
        (the shared scope's ``base`` is a stable version: the base model serves)."""
        return self.stable == events.BASE_VERSION and self.deployment.scope != events.DEFAULT_SCOPE

    def serves(self, version: str) -> bool:
        return version == self.canary or version in self.draining or (version == self.stable and not self.inherits)

    def pick(self, tenant: str, session_id: str) -> str | None:
        """The version for a new session; None: this lane has none for it (ask the next in the chain)."""
        if self.canary is not None and bucket(tenant, session_id) < self.weight:
            return self.canary
        return None if self.stable == events.BASE_VERSION else self.stable  # the shared base: chain's end


class Router:
    def __init__(self, engine: Engine, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._engine = engine
        self._clock = clock
        self.lanes: dict[str, Lane] = {events.DEFAULT_SCOPE: Lane(Deployment(events.DEFAULT_SCOPE))}

    def route(self, model: str, tenant: str = "", session_id: str = "", parent_adapter: str | None = None,
              scope: str = events.DEFAULT_SCOPE) -> str:
        adapter = self._engine.adapter_for(model)
        if adapter is None or not self.visible(adapter, scope):  # another tenant's: as if it did not exist
            raise NotFound(f"the model {model!r} does not exist; see /v1/models", param="model",
                           code="model_not_found")
        if adapter != events.BASE_VERSION:
            return adapter  # pinned by name
        lanes = [lane for name in chain(scope) if (lane := self.lanes.get(name)) is not None]
        if parent_adapter is not None:
            for lane in lanes:
                if lane.serves(parent_adapter):
                    if parent_adapter in lane.draining:
                        lane.draining[parent_adapter] = self._clock()
                    return parent_adapter
        for lane in lanes:
            if (picked := lane.pick(tenant, session_id)) is not None:
                return picked
        return events.BASE_VERSION

    @staticmethod
    def visible(adapter: str, scope: str) -> bool:
        """Whether a request in ``scope`` may see and pin ``adapter``: the base model, an adapter an operator
        loaded by hand, or a version of a scope in its chain (another tenant's is as missing as no model)."""
        served = events.served_version(adapter)
        return served is None or served[0] is None or served[0] in chain(scope)

    def pinned(self, model: str) -> bool:
        """Whether ``model`` names a version rather than the served model."""
        return self._engine.adapter_for(model) not in (None, events.BASE_VERSION)

    # The default scope's lane, as the admin routes and metrics show it.
    @property
    def deployment(self) -> Deployment:
        return self.lanes[events.DEFAULT_SCOPE].deployment

    @property
    def stable(self) -> str:
        return self.lanes[events.DEFAULT_SCOPE].stable

    @property
    def canary(self) -> str | None:
        return self.lanes[events.DEFAULT_SCOPE].canary

    @property
    def weight(self) -> float:
        return self.lanes[events.DEFAULT_SCOPE].weight

    @property
    def draining(self) -> list[str]:
        return sorted(name for lane in self.lanes.values() for name in lane.draining)

    def serving(self) -> set[str]:
        """Every version a request may be routed to now, in any scope."""
        return {name for lane in self.lanes.values()
                for name in (lane.stable, *([lane.canary] if lane.canary else []), *lane.draining)}

    def versions(self) -> list[str]:
        """The adapter versions loaded (the model ids other than the served model)."""
        return [model for model in self._engine.models() if self._engine.adapter_for(model) != events.BASE_VERSION]

    def models(self, scope: str) -> list[str]:
        """The model ids a request in ``scope`` may name (/v1/models)."""
        return [model for model in self._engine.models()
                if (adapter := self._engine.adapter_for(model)) is not None and self.visible(adapter, scope)]

    def apply(self, deployment: Deployment, loaded: Callable[[str], bool], bad: Collection[str]) -> list[str]:
        """Route ``deployment``'s scope by it, as far as the engine has loaded its versions (a stable version
        that did not load leaves the current one serving; a canary that did not load gets no sessions).
        Versions it replaces drain, except ``bad`` ones (rolled back, rejected). Return the versions to
        unload now."""
        lane = self.lanes.setdefault(deployment.scope, Lane(deployment))
        stable = deployment.stable_name if loaded(deployment.stable_name) else lane.stable
        canary = deployment.canary_name if deployment.canary_name and loaded(deployment.canary_name) else None
        now = self._clock()
        for replaced in {lane.stable, lane.canary} - {stable, canary, None}:
            assert replaced is not None
            if not (replaced == lane.stable and lane.inherits):  # a placeholder served no session
                lane.draining[replaced] = now
        for version in (stable, canary):
            lane.draining.pop(version, None)  # type: ignore[arg-type]
        dropped = [version for version in lane.draining if version in bad]
        for version in dropped:
            del lane.draining[version]
        lane.deployment, lane.stable, lane.canary = deployment, stable, canary
        lane.weight = deployment.weight if canary else 0.0
        return [version for version in dropped if version != events.BASE_VERSION and version not in self.serving()]

    def drop(self, scope: str) -> list[str]:
        """Stop routing ``scope`` (its deployment was removed by an erasure): its requests go to the next in
        their chain. Return its versions to unload."""
        lane = self.lanes.pop(scope, None) if scope != events.DEFAULT_SCOPE else None
        if lane is None:
            return []
        names = {lane.stable, *([lane.canary] if lane.canary else []), *lane.draining} - {events.BASE_VERSION}
        return sorted(names - self.serving())

    def drained(self, drain_s: float) -> list[str]:
        """Forget the replaced versions no session used for ``drain_s``; return those to unload."""
        horizon = self._clock() - drain_s
        done = []
        for lane in self.lanes.values():
            for version in [version for version, used in lane.draining.items() if used <= horizon]:
                del lane.draining[version]
                done.append(version)
        serving = self.serving()
        return [version for version in done if version != events.BASE_VERSION and version not in serving]

    async def remove(self, version: str) -> None:
        if version in self.serving():
            raise Conflict(f"{version!r} is part of a deployment; roll it back instead of removing it",
                           param="version")
        await self._engine.remove_adapter(version)
