"""The ``openai`` engine: any OpenAI-compatible upstream, over one pool of keep-alive connections.

Turns it serves are recorded, but an upstream that returns no token ids or logprobs makes them
untrainable: the trainer needs the exact sampled tokens (DESIGN, Gateway). The connection pool is
:mod:`gateway.engines.origin` (its docstring says why it is not httpx).
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from gateway.engines import Delta, Generation, Stream
from gateway.engines.origin import Origin, OriginError, OriginTimeout, StreamedResponse
from gateway.errors import EngineTimeout, EngineUnavailable, GatewayError, InvalidRequest
from gateway.schemas import ChatCompletionRequest
from nextturn import events

# What a reply that is not a chat completion raises while we read it (pydantic's ValidationError is a
# ValueError): translated here, so that the turn is recorded as failed instead of escaping as a 500.
_MALFORMED = (ValueError, KeyError, IndexError, TypeError, AttributeError)


class UpstreamEngine:
    name = "engine"
    failure: BaseException | None = None  # no thread of its own: it cannot die apart from the requests

    def __init__(self, base_url: str, model: str, api_key: str | None = None, *, connect_timeout_s: float = 10.0,
                 read_timeout_s: float = 120.0) -> None:
        self._base_url = base_url
        self._model = model
        self._headers = [("Authorization", f"Bearer {api_key}")] if api_key else []
        self._timeouts = (connect_timeout_s, read_timeout_s)
        self._origin: Origin | None = None

    async def start(self) -> None:
        self._origin = Origin(self._base_url, self._headers, connect_timeout_s=self._timeouts[0],
                              read_timeout_s=self._timeouts[1])

    async def close(self) -> None:
        if self._origin is not None:
            await self._origin.close()

    def models(self) -> list[str]:
        return [self._model]

    def adapter_for(self, model: str) -> str | None:
        return events.BASE_VERSION if model == self._model else None

    async def add_adapter(self, version: str, path: str) -> None:
        raise InvalidRequest("the openai engine serves what its upstream serves; it cannot load adapters")

    async def remove_adapter(self, version: str) -> None:
        raise InvalidRequest("the openai engine serves what its upstream serves; it has no adapters")

    def _body(self, request: ChatCompletionRequest, stream: bool) -> bytes:
        body = request.model_dump(mode="json", exclude_none=True, exclude={"n"})
        return json.dumps(body | {"model": self._model, "stream": stream}).encode()

    async def _send(self, request: ChatCompletionRequest, stream: bool) -> StreamedResponse:
        assert self._origin is not None, "start() the engine first"
        try:
            response = await self._origin.stream("POST", "/chat/completions", self._body(request, stream))
            if response.status >= 400:
                _raise_for_upstream(response.status, (await response.read()).decode(errors="replace"))
        except OriginError as exc:
            raise _translate(exc, "the upstream model is unreachable") from exc
        return response

    async def complete(self, request: ChatCompletionRequest, adapter: str) -> Generation:
        response = await self._send(request, stream=False)
        try:
            payload = json.loads(await response.read())
            choice = payload["choices"][0]
            usage = payload.get("usage") or {}
            return Generation(
                message=events.ChatMessage.model_validate(_assistant(choice["message"])),
                finish_reason=choice.get("finish_reason") or "stop",
                prompt_tokens=usage.get("prompt_tokens", 0),
                completion_tokens=usage.get("completion_tokens", 0),
            )
        except OriginError as exc:
            raise _translate(exc, "the upstream model failed mid-answer") from exc
        except _MALFORMED as exc:
            raise EngineUnavailable(f"the upstream model answered something that is not a completion: {exc!r}") from exc

    async def stream(self, request: ChatCompletionRequest, adapter: str) -> Stream:
        return self._chunks(await self._send(request, stream=True))

    async def _chunks(self, response: StreamedResponse) -> AsyncGenerator[Delta | Generation, None]:
        content: list[str] = []
        calls: dict[int, dict[str, Any]] = {}
        finish_reason = "stop"
        try:
            async for line in sse_lines(response):
                if not line.startswith(b"data:") or line.strip() == b"data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if not chunk.get("choices"):
                    continue
                choice = chunk["choices"][0]
                delta = choice.get("delta") or {}
                finish_reason = choice.get("finish_reason") or finish_reason
                if delta.get("content"):
                    content.append(delta["content"])
                for call in delta.get("tool_calls") or []:
                    _merge_call(calls.setdefault(call.get("index", 0), {}), call)
                if delta.get("content") or delta.get("tool_calls"):
                    yield Delta(content=delta.get("content"), tool_calls=delta.get("tool_calls"))
            tool_calls = [calls[index] for index in sorted(calls)] or None
            message = {"role": "assistant", "content": "".join(content) or None, "tool_calls": tool_calls}
            generation = Generation(message=events.ChatMessage.model_validate(message), finish_reason=finish_reason)
        except OriginError as exc:
            raise _translate(exc, "the upstream model failed mid-stream") from exc
        except _MALFORMED as exc:
            raise EngineUnavailable(f"the upstream model streamed something that is not a completion: {exc!r}") from exc
        finally:
            await response.aclose()
        yield generation


async def sse_lines(response: StreamedResponse) -> AsyncIterator[bytes]:
    """The body's lines as they arrive (server-sent events are lines)."""
    pending = b""
    async for piece in response:
        pending += piece
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r")
    if pending:
        yield pending


def _translate(error: OriginError, what: str) -> GatewayError:
    if isinstance(error, OriginTimeout):
        return EngineTimeout(f"the upstream model did not answer in time: {error}")
    return EngineUnavailable(f"{what}: {error}")


def _assistant(message: dict[str, Any]) -> dict[str, Any]:
    """The fields of an upstream's message that a chat message carries."""
    return {key: message.get(key) for key in ("role", "content", "tool_calls")} | {"role": "assistant"}


def _merge_call(into: dict[str, Any], piece: dict[str, Any]) -> None:
    """Streamed tool calls arrive in pieces: the id and name once, the arguments in fragments."""
    into.setdefault("id", piece.get("id"))
    into["type"] = "function"
    function = into.setdefault("function", {"name": "", "arguments": ""})
    fragment = piece.get("function") or {}
    function["name"] += fragment.get("name") or ""
    function["arguments"] += fragment.get("arguments") or ""
    if piece.get("id"):
        into["id"] = piece["id"]


def _raise_for_upstream(status: int, text: str) -> None:
    if status < 400:
        return
    try:
        message = json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = text[:500]
    if 400 <= status < 500:
        raise InvalidRequest(f"the upstream model refused the request: {message}")
    raise EngineUnavailable(f"the upstream model failed ({status}): {message}")
