"""The gateway's FastAPI app: ``create_app(settings)``.

The lifespan owns the long-lived parts: the event log, the publisher and its thread, the session
linker, the engine and its HTTP client. Requests reach them through ``request.app.state``.

No ``from __future__ import annotations`` here: FastAPI reads the routes' annotations at runtime, and
their dependencies are local to create_app.
"""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse, StreamingResponse

from gateway.auth import Keyring
from gateway.engines import Engine
from gateway.errors import NotFound, install_error_handlers
from gateway.publisher import Publisher
from gateway.schemas import ChatCompletionRequest
from gateway.sessions import SessionLinker
from gateway.turns import BASE, TurnService
from nextturn.bus import open_event_log
from nextturn.errors import ConfigError
from nextturn.settings import Settings

ADAPTER_HEADER = "X-Nextturn-Adapter"


def build_engine(settings: Settings) -> Engine:
    if settings.engine == "openai":
        from gateway.engines.upstream import UpstreamEngine

        assert settings.upstream_url and settings.model  # Settings refuses the openai engine without them
        return UpstreamEngine(settings.upstream_url, settings.model, settings.upstream_api_key)
    raise ConfigError(
        f"the {settings.engine} engine is not built yet; use NEXTTURN_ENGINE=openai with NEXTTURN_UPSTREAM_URL"
    )


def create_app(settings: Settings) -> FastAPI:
    keyring = Keyring.from_settings(settings)
    engine = build_engine(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        event_log = open_event_log(settings)
        publisher = Publisher(event_log, settings.spool_path)
        publisher.start()
        await engine.start()
        app.state.turns = TurnService(engine, SessionLinker(), publisher)
        try:
            yield
        finally:
            await engine.close()
            publisher.stop()
            event_log.close()

    app = FastAPI(title="nextturn", lifespan=lifespan)
    install_error_handlers(app)

    def tenant(authorization: Annotated[str | None, Header()] = None) -> str:
        return keyring.tenant(authorization)

    def turns(request: Request) -> TurnService:
        service: TurnService = request.app.state.turns
        return service

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(_: Annotated[str, Depends(tenant)]) -> dict[str, Any]:
        return {"object": "list",
                "data": [{"id": name, "object": "model", "owned_by": "nextturn"} for name in engine.models()]}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(
        body: ChatCompletionRequest,
        who: Annotated[str, Depends(tenant)],
        service: Annotated[TurnService, Depends(turns)],
        x_session_id: Annotated[str | None, Header()] = None,
    ) -> JSONResponse | StreamingResponse:
        if body.model not in engine.models():
            raise NotFound(f"the model {body.model!r} does not exist; see /v1/models", param="model",
                           code="model_not_found")
        turn = service.begin(who, body, x_session_id)
        headers = {ADAPTER_HEADER: BASE}
        if body.stream:
            return StreamingResponse(service.stream(turn), media_type="text/event-stream", headers=headers)
        return JSONResponse(await service.complete(turn), headers=headers)

    return app
