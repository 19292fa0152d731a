"""Which adapter version serves a request.

A request for a version by name (a model id in /v1/models) is pinned to it. A request for the served
model follows the scope's deployment (:mod:`nextturn.deployments`), in this order:

1. a session that already has turns keeps the version its last turn ran on, while that version still
   serves here: the stable version, the canary, or a version the deployment replaced and that is draining
   (it serves the sessions that began on it until none has had a turn for ``drain_s``). A rolled-back
   version does not drain: its sessions move at once;
2. a new session goes to the canary when the hash of (tenant, session id) falls below the canary's weight;
3. otherwise, the stable version (``base`` until a version is promoted).

A version serves only once the engine has loaded it (:meth:`Router.apply` is told which are), and the
router forgets a version before the engine unloads it, so no request is routed to an unloaded version.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection

from gateway.engines import Engine
from gateway.errors import Conflict, NotFound
from nextturn import events
from nextturn.deployments import Deployment, bucket


class Router:
    def __init__(self, engine: Engine, *, scope: str = events.DEFAULT_SCOPE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._engine = engine
        self._clock = clock
        self.deployment = Deployment(scope)  # the state last applied
        self.stable = events.BASE_VERSION
        self.canary: str | None = None
        self.weight = 0.0
        self._draining: dict[str, float] = {}  # replaced version -> when a session last used it (monotonic)

    def route(self, model: str, tenant: str = "", session_id: str = "", parent_adapter: str | None = None) -> str:
        adapter = self._engine.adapter_for(model)
        if adapter is None:
            raise NotFound(f"the model {model!r} does not exist; see /v1/models", param="model",
                           code="model_not_found")
        if adapter != events.BASE_VERSION:
            return adapter  # pinned by name
        if parent_adapter is not None:
            if parent_adapter in (self.stable, self.canary):
                return parent_adapter
            if parent_adapter in self._draining:
                self._draining[parent_adapter] = self._clock()
                return parent_adapter
        if self.canary is not None and bucket(tenant, session_id) < self.weight:
            return self.canary
        return self.stable

    def pinned(self, model: str) -> bool:
        """Whether ``model`` names a version rather than the served model."""
        return self._engine.adapter_for(model) not in (None, events.BASE_VERSION)

    @property
    def draining(self) -> list[str]:
        return sorted(self._draining)

    def serving(self) -> set[str]:
        """Every version a request may be routed to now."""
        return {self.stable, *([self.canary] if self.canary else []), *self._draining}

    def versions(self) -> list[str]:
        """The adapter versions loaded (the model ids other than the served model)."""
        return [model for model in self._engine.models() if self._engine.adapter_for(model) != events.BASE_VERSION]

    def apply(self, deployment: Deployment, loaded: Callable[[str], bool], bad: Collection[str]) -> list[str]:
        """Route by ``deployment``, as far as the engine has loaded its versions (a stable version that did
        not load leaves the current one serving; a canary that did not load gets no sessions). Versions
        it replaces drain, except ``bad`` ones (rolled back, rejected). Return the versions to unload now."""
        stable = deployment.stable_name if loaded(deployment.stable_name) else self.stable
        canary = deployment.canary_name if deployment.canary_name and loaded(deployment.canary_name) else None
        now = self._clock()
        for replaced in {self.stable, self.canary} - {stable, canary, None}:
            assert replaced is not None
            self._draining[replaced] = now
        for version in (stable, canary):
            self._draining.pop(version, None)  # type: ignore[arg-type]
        dropped = [version for version in self._draining if version in bad]
        for version in dropped:
            del self._draining[version]
        self.deployment, self.stable, self.canary = deployment, stable, canary
        self.weight = deployment.weight if canary else 0.0
        return [version for version in dropped if version != events.BASE_VERSION]

    def drained(self, drain_s: float) -> list[str]:
        """Forget the replaced versions no session used for ``drain_s``; return those to unload."""
        horizon = self._clock() - drain_s
        done = [version for version, used in self._draining.items() if used <= horizon]
        for version in done:
            del self._draining[version]
        return [version for version in done if version != events.BASE_VERSION]

    async def remove(self, version: str) -> None:
        if version in self.serving():
            raise Conflict(f"{version!r} is part of the deployment; roll it back instead of removing it",
                           param="version")
        await self._engine.remove_adapter(version)
