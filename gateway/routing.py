"""Which adapter version serves a request.

A request for a version by name (a model id in /v1/models) is pinned to it. A request for the served
model goes to the stable version: ``base`` until an adapter is put into service. The rollout controller
(DESIGN, Rollout controller) adds a canary here, chosen by a stable hash of the session id.
"""

from __future__ import annotations

from gateway.engines import Engine
from gateway.errors import Conflict, NotFound
from nextturn import events


class Router:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.stable = events.BASE_VERSION

    def route(self, model: str) -> str:
        adapter = self._engine.adapter_for(model)
        if adapter is None:
            raise NotFound(f"the model {model!r} does not exist; see /v1/models", param="model",
                           code="model_not_found")
        return self.stable if adapter == events.BASE_VERSION else adapter

    def versions(self) -> list[str]:
        """The adapter versions loaded (the model ids other than the served model)."""
        return [model for model in self._engine.models() if self._engine.adapter_for(model) != events.BASE_VERSION]

    def serve(self, version: str) -> None:
        """Send the served model's requests to ``version`` from now on (in-flight ones keep theirs)."""
        if version != events.BASE_VERSION and version not in self.versions():
            raise NotFound(f"no adapter {version!r} is loaded", param="version", code="adapter_not_found")
        self.stable = version

    async def remove(self, version: str) -> None:
        if version == self.stable:
            raise Conflict(f"{version!r} is serving; serve another version before removing it", param="version")
        await self._engine.remove_adapter(version)
