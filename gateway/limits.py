"""What the gateway reads of a request: at most ``NEXTTURN_MAX_REQUEST_BYTES`` (413 above, before it is read),
and JSON bodies parsed strictly (:class:`StrictJsonRoute`).

A body that announces its length is refused from its headers. A chunked body (no Content-Length) is
read up to the limit and then handed on, so that nothing past the limit is ever held in memory.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pydantic_core
from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.auth import Keyring
from gateway.errors import (
    GatewayError,
    InvalidRequest,
    PayloadTooLarge,
    PermissionDenied,
    RateLimited,
    UnsupportedMediaType,
    error_body,
)


class LimitBodySize:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self._app = app
        self._max = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await _refuse(send, InvalidRequest("the Content-Length header is not a number"))
            elif int(declared) > self._max:
                await _refuse(send, self._too_large())
            else:
                await self._app(scope, receive, send)
            return
        chunks: list[Message] = []
        size = 0
        while True:
            message = await receive()
            chunks.append(message)
            size += len(message.get("body", b""))
            if size > self._max:
                await _refuse(send, self._too_large())
                return
            if message["type"] != "http.request" or not message.get("more_body", False):
                break

        async def replay() -> Message:
            return chunks.pop(0) if chunks else await receive()

        await self._app(scope, replay, send)

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"the request body is larger than {self._max} bytes (NEXTTURN_MAX_REQUEST_BYTES)")


class GuardRequests:
    """Two checks before anything else reads a request. A body must be ``application/json``: a browser
    sends a cross-site form or ``text/plain`` without asking the server first, JSON it cannot. The one
    exception is the operator's page (``/dashboard/``), whose forms carry a session-bound token
    (:mod:`gateway.dashboard`). And an open
    gateway (no API keys, loopback only) answers only requests addressed to a loopback name: a web page
    whose own name resolves to 127.0.0.1 (DNS rebinding) would otherwise reach it as if it were local."""

    def __init__(self, app: ASGIApp, keyring: Keyring) -> None:
        self._app = app
        self._keyring = keyring

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            kind = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            form = kind == b"application/x-www-form-urlencoded" and scope["path"].startswith("/dashboard/")
            if scope["method"] in ("POST", "PUT", "PATCH") and kind != b"application/json" and not form:
                await _refuse(send, UnsupportedMediaType("send the body as JSON: Content-Type: application/json"))
                return
            if self._keyring.open and not _loopback_name(headers.get(b"host", b"")):
                await _refuse(send, PermissionDenied("a gateway without API keys answers only requests to "
                                                     "localhost; set NEXTTURN_API_KEYS to serve other names"))
                return
        await self._app(scope, receive, send)


def _loopback_name(host: bytes) -> bool:
    """
    >>> [_loopback_name(h) for h in (b"127.0.0.1:8000", b"localhost", b"[::1]:80", b"evil.example:8000", b"")]
    [True, True, True, False, False]
    """
    name = host.rsplit(b":", 1)[0] if host.count(b":") == 1 or host.startswith(b"[") and b"]:" in host else host
    return name.strip(b"[]").lower() in (b"localhost", b"::1") or name.startswith(b"127.")


async def _refuse(send: Send, error: GatewayError) -> None:
    body = json.dumps(error_body(error)).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class StrictJsonRequest(Request):
    """A request whose JSON body is parsed strictly: a lone surrogate escape (``"\\ud800"``) is valid JSON
    but not UTF-8, and text holding one could never be written to the event log or the store. Python's
    ``json`` accepts it; pydantic's parser refuses it, which FastAPI answers with a 400."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = pydantic_core.from_json(await self.body())
        return self._json


class StrictJsonRoute(APIRoute):
    """Every FastAPI route of the gateway reads its body as :class:`StrictJsonRequest` (the chat route is
    plain ASGI and validates with pydantic's parser already)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(StrictJsonRequest(request.scope, request.receive))

        return strict


class TenantLimits:
    """Each tenant's share of this replica: requests and tokens per minute, requests at once (0: no limit).

    Requests and tokens are token buckets that refill continuously to a minute's worth; a request is
    admitted while the request bucket holds one and the token bucket is not in debt, and the tokens a turn
    used (prompt and completion) are charged when it ends, so one large answer may overdraw and the next
    request waits until the debt is paid. Per replica: N replicas admit up to N times the rate.
    """

    def __init__(self, requests_per_minute: int = 0, tokens_per_minute: int = 0, concurrent: int = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._rpm, self._tpm, self._concurrent = requests_per_minute, tokens_per_minute, concurrent
        self._clock = clock
        self._requests: dict[str, tuple[float, float]] = {}  # tenant -> (level, when)
        self._tokens: dict[str, tuple[float, float]] = {}
        self._running: dict[str, int] = {}

    def admit(self, tenant: str) -> None:
        """Take a request slot for ``tenant`` (released by :meth:`done`), or raise RateLimited."""
        now = self._clock()
        if self._concurrent and self._running.get(tenant, 0) >= self._concurrent:
            raise RateLimited(f"at most {self._concurrent} requests at once per tenant", retry_after_s=1)
        if self._tpm:
            level = _refill(self._tokens, tenant, self._tpm, now)
            if level < 0:
                raise RateLimited(f"over {self._tpm:,} tokens per minute", retry_after_s=-level * 60 / self._tpm)
        if self._rpm:
            level = _refill(self._requests, tenant, self._rpm, now)
            if level < 1:
                raise RateLimited(f"over {self._rpm:,} requests per minute",
                                  retry_after_s=(1 - level) * 60 / self._rpm)
            self._requests[tenant] = (level - 1, now)
        if self._concurrent:
            self._running[tenant] = self._running.get(tenant, 0) + 1

    def done(self, tenant: str, tokens: int) -> None:
        """The request ended, having used ``tokens``."""
        if self._concurrent:
            running = self._running.get(tenant, 1) - 1
            if running:
                self._running[tenant] = running
            else:
                self._running.pop(tenant, None)
        if self._tpm:
            now = self._clock()
            self._tokens[tenant] = (_refill(self._tokens, tenant, self._tpm, now) - tokens, now)


def _refill(buckets: dict[str, tuple[float, float]], tenant: str, per_minute: int, now: float) -> float:
    """The bucket's level now: it refills at ``per_minute`` a minute, up to a minute's worth.

    >>> buckets = {"a": (0.0, 0.0)}
    >>> _refill(buckets, "a", 60, 0.5), _refill(buckets, "a", 60, 1000.0), _refill(buckets, "new", 60, 5.0)
    (0.5, 60.0, 60.0)
    """
    level, when = buckets.get(tenant, (float(per_minute), now))
    return min(float(per_minute), level + (now - when) * per_minute / 60)
