"""The request body limit (``NEXTTURN_MAX_REQUEST_BYTES``): a larger body is a 413, before it is read.

A body that announces its length is refused from its headers. A chunked body (no Content-Length) is
read up to the limit and then handed on, so that nothing past the limit is ever held in memory.
"""

from __future__ import annotations

import json

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
