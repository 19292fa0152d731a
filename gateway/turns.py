"""Serving one turn: link it to its session, generate, answer (whole or streamed), record it.

The turn id is the completion id the client sees; the recorded TurnRecorded carries exactly what was
generated. A turn that fails is recorded as failed, and a stream that fails ends with an error event.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from gateway.engines import Delta, Engine, Generation, Stream
from gateway.errors import GatewayError, InvalidRequest, error_body
from gateway.limits import TenantLimits
from gateway.metrics import Metrics
from gateway.publisher import Publisher
from gateway.routing import Router
from gateway.schemas import ChatCompletionRequest
from gateway.sessions import Link, SessionLinker
from nextturn import events, scopes
from nextturn.erasure import Rules
from nextturn.flaws import flaw


@dataclass
class Turn:
    tenant: str
    request: ChatCompletionRequest
    link: Link
    turn_id: str
    adapter: str  # the adapter version that serves it
    pinned: bool  # the client named the version
    scope: str  # the scope it learns into (nextturn.scopes); the adapter names the one that serves it
    user: str | None  # nextturn.scopes.user_id of the end user the request named
    started_at: Any  # datetime
    started: float  # monotonic
    recorded: bool = False


class TurnService:
    def __init__(self, engine: Engine, linker: SessionLinker, publisher: Publisher, metrics: Metrics, *,
                 recent: int = 100_000, limits: TenantLimits | None = None,
                 scope_by: scopes.ScopeBy = "deployment") -> None:
        self.engine = engine
        self.scope_by = scope_by
        self.limits = limits or TenantLimits()
        self.metrics = metrics
        self.router = Router(engine)
        self.linker = linker
        self.publisher = publisher
        # turn id -> (tenant, session): feedback on a turn this replica just served needs no store lookup
        self._recent: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._recent_capacity = recent

    def served(self, turn_id: str) -> tuple[str, str] | None:
        """(tenant, session id) of a turn this replica served recently."""
        return self._recent.get(turn_id)

    def served_session(self, tenant: str, session_id: str) -> bool:
        """Whether this replica recently served a turn of the tenant's session (it may not be stored yet)."""
        return (tenant, session_id) in self._recent.values()

    def forget(self, rules: Rules) -> None:
        """Drop what this replica remembers of forgotten sessions (nextturn.erasure)."""
        self.linker.forget(rules)
        for turn_id in [t for t, (tenant, session) in self._recent.items() if rules.covers_session(tenant, session)]:
            del self._recent[turn_id]

    def scope_for(self, tenant: str, user: str | None) -> str:
        """The scope a request of ``tenant`` (and ``user``, under NEXTTURN_SCOPE_BY=user) learns into."""
        if self.scope_by == "user" and user is not None and len(user) > scopes.MAX_USER_CHARS:
            raise InvalidRequest(f"a user is at most {scopes.MAX_USER_CHARS} characters", param="user")
        return scopes.scope_of(self.scope_by, tenant, user)

    async def begin(self, tenant: str, request: ChatCompletionRequest, session_id: str | None,
                    user: str | None = None) -> Turn:
        """Admit, link and route a request. ``user``: the X-Nextturn-User header, which wins over the body's
        ``user`` field (a trusted application in front of the gateway names its end user there)."""
        named = user if user is not None else request.user
        scope = self.scope_for(tenant, named)
        self.limits.admit(tenant)  # released when the turn is recorded
        try:
            link = await self.linker.resolve(tenant, request.messages, session_id,
                                             scopes.link_namespace(tenant, scope))
            # No await from routing until the engine has taken the request (complete/open_stream): a version
            # cannot be removed in between.
            adapter = self.router.route(request.model, tenant, link.session_id, link.parent_adapter, scope)
            pinned = self.router.pinned(request.model)
        except BaseException:
            self.limits.done(tenant, 0)
            raise
        self.metrics.in_flight.inc()  # until the turn is recorded: every path below records it once
        return Turn(tenant, request, link, f"chatcmpl-{uuid.uuid4().hex}", adapter, pinned, scope,
                    scopes.user_id(tenant, named) if named else None, events.utc_now(), time.monotonic())

    async def complete(self, turn: Turn) -> dict[str, Any]:
        try:
            generation = await self.engine.complete(turn.request, turn.adapter)
        except BaseException as exc:
            self._record(turn, None, exc)
            raise
        self._record(turn, generation, None)
        return {
            "id": turn.turn_id, "object": "chat.completion", "created": int(time.time()),
            "model": turn.request.model,
            "choices": [
                {"index": 0, "message": _message(generation.message), "finish_reason": generation.finish_reason}
            ],
            "usage": {"prompt_tokens": generation.prompt_tokens, "completion_tokens": generation.completion_tokens,
                      "total_tokens": generation.prompt_tokens + generation.completion_tokens},
        }

    async def open_stream(self, turn: Turn) -> AsyncIterator[str]:
        """Start generating; a request the engine refuses fails here, with its status, before any chunk."""
        try:
            items = await self.engine.stream(turn.request, turn.adapter)
        except BaseException as exc:
            self._record(turn, None, exc)
            raise
        return self._events(turn, items)

    async def _events(self, turn: Turn, items: Stream) -> AsyncIterator[str]:
        """Server-sent events: a role chunk, the deltas as they come, a finish chunk, ``[DONE]``."""
        # Every chunk shares its head: rendered once, so that a chunk costs one small json.dumps.
        head = (f'data: {{"id": {json.dumps(turn.turn_id)}, "object": "chat.completion.chunk", '
                f'"created": {int(time.time())}, "model": {json.dumps(turn.request.model)}, '
                f'"choices": [{{"index": 0, "delta": ')

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> str:
            return f'{head}{json.dumps(delta)}, "finish_reason": {json.dumps(finish_reason)}}}]}}\n\n'

        try:
            async with aclosing(items):  # a client that leaves stops the generation it was waiting for
                yield chunk({"role": "assistant", "content": ""})
                async for item in items:
                    if isinstance(item, Delta):
                        yield chunk({k: v for k, v in (("content", item.content), ("tool_calls", item.tool_calls))
                                     if v})
                    else:
                        self._record(turn, item, None)
                        yield chunk({}, item.finish_reason)
        except GatewayError as exc:
            self._record(turn, None, exc)
            yield f"data: {json.dumps(error_body(exc))}\n\n"
            return
        finally:
            if not turn.recorded:  # the client left, or a bug: the turn is still recorded, as failed
                self._record(turn, None, ClientDisconnected(events.CLIENT_LEFT))
        yield "data: [DONE]\n\n"

    def _record(self, turn: Turn, generation: Generation | None, error: BaseException | None) -> None:
        if turn.recorded:
            return
        turn.recorded = True
        finished_at = events.utc_now()
        seconds = time.monotonic() - turn.started
        self.metrics.in_flight.dec()
        self.limits.done(turn.tenant, generation.prompt_tokens + generation.completion_tokens if generation else 0)
        self.metrics.turn(turn.adapter, generation is not None, turn.request.stream, seconds,
                          generation.prompt_tokens if generation else 0,
                          generation.completion_tokens if generation else 0)
        recorded = events.TurnRecorded(
            tenant=turn.tenant, scope=turn.scope, session_id=turn.link.session_id, turn_id=turn.turn_id,
            parent_turn_id=turn.link.parent_turn_id, model=turn.request.model, adapter_version=turn.adapter,
            messages=turn.request.messages, tools=turn.request.tool_definitions(), params=turn.request.sampling(),
            response=generation.message if generation else None,
            prompt_token_ids=generation.prompt_token_ids if generation else [],
            response_token_ids=generation.response_token_ids if generation else [],
            response_logprobs=generation.response_logprobs if generation else None,
            finish_reason=generation.finish_reason if generation else "error",  # type: ignore[arg-type]
            status="ok" if generation else "failed", error=_describe(error), cause=_cause(error), pinned=turn.pinned,
            user=turn.user, latency_ms=seconds * 1000, started_at=turn.started_at, finished_at=finished_at,
        )
        found = flaw(recorded)
        if found is not None:
            self.metrics.flaws.labels(turn.adapter, found).inc()
        self.publisher.publish(recorded)
        self._recent[turn.turn_id] = (turn.tenant, turn.link.session_id)
        while len(self._recent) > self._recent_capacity:
            self._recent.popitem(last=False)
        if generation is not None:
            self.linker.remember(turn.tenant, turn.link.session_id, turn.turn_id, turn.request.messages,
                                 generation.message, turn.adapter, scopes.link_namespace(turn.tenant, turn.scope))


class ClientDisconnected(Exception):
    pass


def _describe(error: BaseException | None) -> str | None:
    if error is None:
        return None
    return str(error) if isinstance(error, GatewayError | ClientDisconnected) else f"{type(error).__name__}: {error}"


def _cause(error: BaseException | None) -> events.Cause | None:
    """A request the engine refused (4xx) or a client that left is the client's doing; the rest, the server's."""
    if error is None:
        return None
    client = isinstance(error, ClientDisconnected) or (isinstance(error, GatewayError) and error.status < 500)
    return "client" if client else "server"


def _message(message: events.ChatMessage) -> dict[str, Any]:
    body: dict[str, Any] = {"role": "assistant", "content": message.content}
    if message.tool_calls:
        body["tool_calls"] = [call.model_dump() for call in message.tool_calls]
    return body
