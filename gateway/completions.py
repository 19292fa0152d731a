"""``POST /v1/chat/completions``: the hot path, served as plain ASGI in front of FastAPI.

Every request the gateway proxies passes here, and the budget for what the gateway adds is 0.5 ms at
p50 (DESIGN). FastAPI's routing, dependency injection and response classes cost a sizeable share of
that (bench/gateway_overhead.py), and Starlette's StreamingResponse adds a task group per stream. This
route does the same work directly: the body limit and the request counter still wrap it (they are
middlewares outside it), the request body is validated by the same pydantic model, errors are the same
OpenAI-style JSON (:mod:`gateway.errors`), and the turn is served by the same :class:`TurnService`.
The route is not in FastAPI's OpenAPI schema.

A streamed answer watches for the client leaving: when it does, the generation it was waiting for is
cancelled and the turn is recorded as failed ("client left"). A client that stays but stops reading is
treated the same once a chunk could not be sent for ``stall_timeout_s`` (the connection's buffers are full):
it would otherwise hold a generation and a connection to the model server for as long as it likes.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

from pydantic import ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.auth import Keyring
from gateway.errors import GatewayError, InvalidRequest, error_body, error_headers, invalid_body
from gateway.schemas import ChatCompletionRequest
from gateway.turns import TurnService

log = logging.getLogger(__name__)

ADAPTER_HEADER = "X-Nextturn-Adapter"
_JSON = (b"content-type", b"application/json")


class ChatCompletionsRoute:
    """ASGI middleware that answers ``POST /v1/chat/completions`` and hands every other request on."""

    path = "/v1/chat/completions"  # read by the request counter as the route's name

    def __init__(self, app: ASGIApp, keyring: Keyring, stall_timeout_s: float = 30.0) -> None:
        self._app = app
        self._keyring = keyring
        self._stall_timeout_s = stall_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path:
            await self._app(scope, receive, send)
            return
        scope["route"] = self
        try:
            if scope["method"] != "POST":
                raise _MethodNotAllowed("Method Not Allowed")
            await self._serve(scope, receive, send)
        except GatewayError as exc:
            await _send_error(send, exc)
        except Exception:
            log.exception("unexpected error")
            await _send_error(send, GatewayError("internal error; it has been logged"))

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope["headers"])
        authorization = headers.get(b"authorization")
        tenant = await self._keyring.tenant(authorization.decode("latin-1") if authorization is not None else None)
        request = _parse(await _body(receive))
        service: TurnService = scope["app"].state.turns
        session = headers.get(b"x-session-id")
        user = headers.get(b"x-nextturn-user")
        turn = await service.begin(tenant, request, session.decode("latin-1") if session is not None else None,
                                   user=user.decode("utf-8", "replace") if user is not None else None)
        adapter = (ADAPTER_HEADER.lower().encode(), turn.adapter.encode())
        if not request.stream:
            body = json.dumps(await service.complete(turn)).encode()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [_JSON, (b"content-length", b"%d" % len(body)), adapter]})
            await send({"type": "http.response.body", "body": body})
            return
        chunks = await service.open_stream(turn)  # a refused request fails here, with its own status
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                (b"cache-control", b"no-cache"), adapter]})
        await _stream(chunks, receive, send, self._stall_timeout_s)


async def _stream(chunks: AsyncIterator[str], receive: Receive, send: Send, stall_timeout_s: float) -> None:
    """Send the chunks as they come, until the end or until the client leaves or stops reading (then stop
    generating)."""

    async def pump() -> None:
        async for chunk in chunks:
            try:
                async with asyncio.timeout(stall_timeout_s):  # a timer, not a task: this runs per chunk
                    await send({"type": "http.response.body", "body": chunk.encode(), "more_body": True})
            except TimeoutError:
                log.warning("a stream's client read nothing for %g s; ending the stream", stall_timeout_s)
                return
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    sending = asyncio.ensure_future(pump())
    listening = asyncio.ensure_future(_until_disconnected(receive))
    try:
        await asyncio.wait((sending, listening), return_when=asyncio.FIRST_COMPLETED)
    finally:
        sending.cancel()  # a no-op once it finished; otherwise the client left, or the server is stopping
        listening.cancel()
        await asyncio.wait((sending, listening))
        if not sending.cancelled() and sending.exception() is not None:
            log.error("a stream failed after its first chunk", exc_info=sending.exception())
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()  # records the turn as failed if the stream was cut short


async def _until_disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _body(receive: Receive) -> bytes:
    parts = []
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientLeft("the client left before its request body arrived")
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)


def _parse(body: bytes) -> ChatCompletionRequest:
    try:
        return ChatCompletionRequest.model_validate_json(body)
    except ValidationError as exc:
        raise invalid_body(exc.errors()) from None


async def _send_error(send: Send, error: GatewayError) -> None:
    if isinstance(error, _ClientLeft):
        return
    body = json.dumps(error_body(error)).encode()
    headers = [_JSON, (b"content-length", b"%d" % len(body))]
    headers += [(name.lower().encode(), value.encode()) for name, value in error_headers(error)]
    if isinstance(error, _MethodNotAllowed):
        headers.append((b"allow", b"POST"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _MethodNotAllowed(GatewayError):
    status, type = 405, "invalid_request_error"


class _ClientLeft(InvalidRequest):
    """The client left before its request body arrived: there is no one to answer."""
