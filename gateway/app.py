"""The gateway's FastAPI app: ``create_app(settings)``.

The lifespan owns the long-lived parts: the event log, the publisher and its thread, the store and a
recorder process that copies the log into it (each replica is a member of the recorder's group), the
session linker, the engine and its connections. Requests reach them through ``request.app.state``.
A background part that dies (thread or process) turns /healthz into a 503 that names it; the publisher and
the recorder are restarted (:mod:`gateway.supervisor`), and /healthz counts their restarts.

No ``from __future__ import annotations`` here: FastAPI reads the routes' annotations at runtime, and
their dependencies are local to create_app.
"""

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from gateway.auth import Keyring
from gateway.completions import ChatCompletionsRoute
from gateway.dashboard import dashboard_routes
from gateway.engines import Engine
from gateway.errors import Conflict, GatewayError, InvalidRequest, NotFound, install_error_handlers
from gateway.feedback import FeedbackRequest, feedback_event, owner_session, turn_view
from gateway.limits import GuardRequests, LimitBodySize, StrictJsonRoute, TenantLimits
from gateway.metrics import CONTENT_TYPE, CountRequests, Metrics
from gateway.publisher import Publisher
from gateway.schemas import ChatCompletionRequest
from gateway.sessions import SessionLinker
from gateway.supervisor import Supervisor
from gateway.turns import TurnService
from gateway.watcher import DeploymentWatcher
from nextturn import deployments, erasure, events
from nextturn.bus import open_event_log
from nextturn.erasure import Rules
from nextturn.errors import ConfigError, DeploymentError, NothingToForget, StoreUnavailable
from nextturn.keys import any_keys, find_digest, find_key
from nextturn.recorder import RecorderProcess
from nextturn.settings import Settings
from nextturn.store import Store, upgrade

log = logging.getLogger(__name__)


def build_engine(settings: Settings) -> Engine:
    if settings.engine == "openai":
        from gateway.engines.upstream import UpstreamEngine

        assert settings.upstream_url and settings.model  # Settings refuses the openai engine without them
        return UpstreamEngine(settings.upstream_url, settings.model, settings.upstream_api_key,
                              connect_timeout_s=settings.engine_connect_timeout_s,
                              read_timeout_s=settings.engine_read_timeout_s)
    if settings.engine == "embedded":
        try:
            from gateway.engines.embedded import EmbeddedEngine
        except ImportError as exc:
            raise ConfigError("the embedded engine needs the ml extra: pip install 'nextturn[ml]'") from exc
        if not (settings.model_path / "config.json").is_file():
            raise ConfigError(f"no model in {settings.model_path}; build one with `nextturn model init "
                              f"{settings.model_path}`, or set NEXTTURN_MODEL to a local Hugging Face model directory")
        return EmbeddedEngine(settings.model_path, max_adapters=settings.engine_max_adapters,
                              tool_format=settings.tool_call_format)
    from gateway.engines.vllm import VllmEngine

    try:
        import transformers  # noqa: F401  (the model's tokenizer renders the prompts)
    except ImportError as exc:
        raise ConfigError("the vllm engine needs the vllm extra: pip install 'nextturn[vllm]'") from exc
    if not (settings.model_path / "config.json").is_file():
        raise ConfigError(f"the vllm engine renders prompts with the model's tokenizer: no model in "
                          f"{settings.model_path}; set NEXTTURN_MODEL to the directory vLLM serves")
    return VllmEngine(settings.vllm_url, settings.model_path, api_key=settings.vllm_api_key,
                      connect_timeout_s=settings.engine_connect_timeout_s,
                      read_timeout_s=settings.engine_read_timeout_s, tool_format=settings.tool_call_format)


class AdapterRequest(BaseModel):
    version: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")
    path: str = Field(min_length=1)  # a PEFT adapter directory on the gateway's machine


def _check_loadable(settings: Settings, body: AdapterRequest) -> None:
    """By hand, only from the adapters directory or NEXTTURN_ADAPTER_LOAD_DIRS, and never under a name the
    trainer publishes versions under (a hand-loaded "default-v9" would be served as the trainer's v9)."""
    if "\x00" in body.path:
        raise InvalidRequest("a path cannot hold a NUL character", param="path")
    where = Path(body.path).resolve()
    allowed = [settings.adapters_path, *settings.adapter_load_dirs]
    if not any(where.is_relative_to(root.resolve()) for root in allowed):
        raise InvalidRequest(f"{body.path} is outside the adapters directory and NEXTTURN_ADAPTER_LOAD_DIRS",
                             param="path")
    if events.served_version(body.version) is not None:
        raise InvalidRequest(f"{body.version!r} is reserved: published versions are served under such names",
                             param="version")


class RolloutAction(BaseModel):
    actor: str = Field(min_length=1, max_length=200)  # who acts: recorded with the change
    reason: str = Field(min_length=1, max_length=2000)  # why: recorded with the change
    # promote: the version to make stable (default: the canary); rollback without a canary: the version to
    # go back to (default: the one before)
    version: int | None = Field(default=None, ge=1, le=2**31 - 1)  # the store's integer column


def create_app(settings: Settings) -> FastAPI:
    keyring = Keyring.from_settings(settings)
    engine = build_engine(settings)
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = Store.from_settings(settings)
        if settings.store_url.startswith("sqlite"):
            upgrade(settings.store_url)  # the embedded default migrates itself; production runs db upgrade
        store.check_schema()
        keyring.use_store(partial(find_key, store), partial(any_keys, store), partial(find_digest, store))
        event_log = open_event_log(settings)
        publisher = Publisher(event_log, settings.spool_dir, adopt=[settings.data_dir / "spool.jsonl"])
        publisher.start()
        recorder = RecorderProcess(settings) if settings.gateway_recorder else None
        if recorder is not None:
            recorder.start()
        await engine.start()
        limits = TenantLimits(settings.tenant_requests_per_minute, settings.tenant_tokens_per_minute,
                              settings.tenant_concurrent_requests)
        service = TurnService(engine, SessionLinker(lookup=store.find_link), publisher, metrics, limits=limits,
                              scope_by=settings.scope_by)
        def forget(rules: Rules) -> None:
            publisher.forget(rules)
            service.forget(rules)

        watcher = DeploymentWatcher(service.router, engine, store, event_log, metrics,
                                    interval_s=settings.rollout_check_interval_s, drain_s=settings.rollout_drain_s,
                                    on_erasure=forget)
        await watcher.start()  # the deployed versions are loaded before the first request
        app.state.turns = service
        app.state.watcher = watcher
        metrics.watch(lambda: publisher.queued, lambda: len(publisher.spool), lambda: publisher.dropped)
        app.state.store = store
        app.state.event_log = event_log
        supervisor = Supervisor([task for task in (publisher, recorder, engine, watcher) if task is not None],
                                metrics)
        await supervisor.start()
        app.state.supervisor = supervisor
        try:
            yield
        finally:
            await supervisor.close()
            await watcher.close()
            await engine.close()
            if recorder is not None:
                recorder.stop()
            publisher.stop()
            event_log.close()
            store.close()

    shown = settings.api_docs
    app = FastAPI(title="nextturn", lifespan=lifespan, docs_url="/docs" if shown else None,
                  redoc_url="/redoc" if shown else None, openapi_url="/openapi.json" if shown else None)
    app.router.route_class = StrictJsonRoute  # before any route is added
    install_error_handlers(app)
    app.add_middleware(ChatCompletionsRoute, keyring=keyring,  # the hot path: see gateway/completions.py
                       stall_timeout_s=settings.stream_stall_timeout_s)
    app.add_middleware(LimitBodySize, max_bytes=settings.max_request_bytes)
    app.add_middleware(GuardRequests, keyring=keyring)
    app.add_middleware(CountRequests, metrics=metrics)

    # Dependencies are async: FastAPI runs a plain `def` dependency in its thread pool, a thread hop
    # per dependency per request that cost milliseconds under load (measured by bench/gateway_overhead.py).
    async def tenant(authorization: Annotated[str | None, Header()] = None) -> str:
        return await keyring.tenant(authorization)

    async def admin(authorization: Annotated[str | None, Header()] = None) -> None:
        await keyring.admin(authorization)

    async def turns(request: Request) -> TurnService:
        service: TurnService = request.app.state.turns
        return service

    async def store(request: Request) -> Store:
        found: Store = request.app.state.store
        return found

    app.include_router(dashboard_routes(keyring))

    @app.get("/healthz", response_model=None)
    async def healthz(request: Request) -> dict[str, Any] | JSONResponse:
        supervisor: Supervisor = request.app.state.supervisor
        restarts = {"restarts": dict(supervisor.restarts)} if supervisor.restarts else {}
        dead = supervisor.dead()
        if dead:
            return JSONResponse({"status": "degraded", "dead": ", ".join(dead), **restarts}, status_code=503)
        return {"status": "ok", **restarts}

    if settings.metrics:
        @app.get("/metrics")
        async def prometheus() -> Response:
            return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/admin/adapters", dependencies=[Depends(admin)])
    async def list_adapters(service: Annotated[TurnService, Depends(turns)]) -> dict[str, Any]:
        return {"serving": service.router.stable, "adapters": service.router.versions()}

    @app.post("/v1/admin/adapters", dependencies=[Depends(admin)], status_code=201)
    async def add_adapter(body: AdapterRequest, service: Annotated[TurnService, Depends(turns)]) -> dict[str, Any]:
        """Load an adapter on this replica by hand; clients pin it by name (deployed versions come by rollout)."""
        _check_loadable(settings, body)
        await engine.add_adapter(body.version, body.path)
        return {"version": body.version, "serving": service.router.stable}

    @app.get("/v1/admin/rollout", dependencies=[Depends(admin)])
    async def rollout_status(request: Request, db: Annotated[Store, Depends(store)],
                             scope: str = events.DEFAULT_SCOPE) -> dict[str, Any]:
        found = await asyncio.to_thread(deployments.status, db, scope)
        watcher: DeploymentWatcher = request.app.state.watcher
        return {**found, "replica": watcher.status()}

    @app.get("/v1/admin/scopes", dependencies=[Depends(admin)])
    async def scopes_list(db: Annotated[Store, Depends(store)]) -> dict[str, Any]:
        return {"object": "list", "data": await asyncio.to_thread(deployments.overview, db)}

    @app.post("/v1/admin/rollout/{action}", dependencies=[Depends(admin)])
    async def rollout_act(action: Literal["promote", "rollback", "pause", "resume"], body: RolloutAction,
                          request: Request, db: Annotated[Store, Depends(store)],
                          service: Annotated[TurnService, Depends(turns)],
                          scope: str = events.DEFAULT_SCOPE) -> dict[str, Any]:
        try:
            change = await asyncio.to_thread(deployments.operate, db, scope, action, body.actor, body.reason,
                                             service.publisher.publish, body.version)
        except DeploymentError as exc:
            raise Conflict(str(exc), code="rollout_conflict") from exc
        watcher: DeploymentWatcher = request.app.state.watcher
        await watcher.refresh()  # this replica routes by it before answering
        return {"action": change.action, "version": change.subject_version,
                **await asyncio.to_thread(deployments.status, db, scope), "replica": watcher.status()}

    @app.delete("/v1/admin/adapters/{version:path}", dependencies=[Depends(admin)])
    async def remove_adapter(version: str, service: Annotated[TurnService, Depends(turns)]) -> dict[str, Any]:
        await service.router.remove(version)  # returns once the requests still running on it finished
        return {"version": version, "removed": True}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(
        body: ChatCompletionRequest, who: Annotated[str, Depends(tenant)],
        x_session_id: Annotated[str | None, Header()] = None,
        x_nextturn_user: Annotated[str | None, Header()] = None,
    ) -> dict[str, Any]:
        """OpenAI's chat completions, streamed or whole; the completion id is the turn id, and the
        X-Nextturn-Adapter header names the version that served it. Served by gateway.completions in front of
        this app (this function never runs): declared so that the API docs and the schema-driven tests know it."""
        raise GatewayError("the chat completions route is served in front of the app")

    @app.post("/v1/feedback")
    async def post_feedback(
        body: FeedbackRequest,
        who: Annotated[str, Depends(tenant)],
        service: Annotated[TurnService, Depends(turns)],
        db: Annotated[Store, Depends(store)],
        idempotency_key: Annotated[str | None, Header()] = None,
    ) -> dict[str, Any]:
        session_id = await asyncio.to_thread(owner_session, service, db, who, body.turn_id)
        event = feedback_event(who, session_id, body, idempotency_key)
        try:
            stored = await asyncio.to_thread(db.feedback_ids, body.turn_id, events.MAX_FEEDBACK_PER_TURN)
        except StoreUnavailable as exc:  # the signals worker keeps the first 64 anyway: this check is a courtesy
            log.warning("cannot count the turn's feedback now, taking it: %s", exc)
            stored = set()
        if len(stored) >= events.MAX_FEEDBACK_PER_TURN and event.event_id not in stored:  # a retry is fine
            raise Conflict(f"turn {body.turn_id} has {len(stored)} pieces of feedback; more would not count",
                           param="turn_id", code="feedback_limit_reached")
        service.publisher.publish(event)
        return {"id": event.event_id, "object": "feedback", "turn_id": event.turn_id, "kind": event.kind}

    @app.delete("/v1/sessions/{session_id}")
    async def delete_session(session_id: str, request: Request, who: Annotated[str, Depends(tenant)],
                             service: Annotated[TurnService, Depends(turns)],
                             db: Annotated[Store, Depends(store)]) -> dict[str, Any]:
        """Forget one of the caller's sessions: everything recorded of it, on every replica and in every
        later update (nextturn.erasure). The answer names the published versions that were trained on it."""
        try:
            report = await asyncio.to_thread(
                erasure.forget_session, db, request.app.state.event_log, erasure.Places.from_settings(settings),
                who, session_id, actor=f"tenant {who}", known=service.served_session(who, session_id))
        except NothingToForget as exc:
            raise NotFound(f"no session {session_id!r}", param="session_id", code="session_not_found") from exc
        watcher: DeploymentWatcher = request.app.state.watcher
        await watcher.refresh()  # this replica's spool and links drop it before the answer
        return {"id": session_id, "object": "session.deleted", "deleted": True, "erasure": report.id,
                "removed": report.removed, "trained_versions": report.trained_versions}

    @app.get("/v1/turns/{turn_id}")
    async def get_turn(
        turn_id: str, who: Annotated[str, Depends(tenant)], db: Annotated[Store, Depends(store)]
    ) -> dict[str, Any]:
        return turn_view(db, who, turn_id)

    @app.get("/v1/models")
    async def models(request: Request, tenant_name: Annotated[str, Depends(tenant)],
                     x_nextturn_user: Annotated[str | None, Header()] = None) -> dict[str, Any]:
        """The served model and the versions the caller's scope may use (its own, its tenant's, the shared
        ones, and adapters an operator loaded by hand)."""
        service: TurnService = request.app.state.turns
        scope = service.scope_for(tenant_name, x_nextturn_user)
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "nextturn"}
                                           for name in service.router.models(scope)]}

    return app
