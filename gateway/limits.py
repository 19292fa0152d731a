"""What the gateway reads of a request: at most ``NEXTTURN_MAX_REQUEST_BYTES`` (413 above, before it is read),
and JSON bodies parsed strictly (:class:`StrictJsonRoute`).

A body that announces its length is refused from its headers. A chunked body (no Content-Length) is
read up to the limit and then handed on, so that nothing past the limit is ever held in memory.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

import pydantic_core
from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import GatewayError, InvalidRequest, PayloadTooLarge, error_body


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
