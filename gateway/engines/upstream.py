"""The ``openai`` engine: any OpenAI-compatible upstream, over one pooled httpx client.

Turns it serves are recorded, but an upstream that returns no token ids or logprobs makes them
untrainable: the trainer needs the exact sampled tokens (DESIGN, Gateway).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

from gateway.engines import Delta, Generation
from gateway.errors import EngineTimeout, EngineUnavailable, InvalidRequest
from gateway.schemas import ChatCompletionRequest
from nextturn import events

# What a reply that is not a chat completion raises while we read it (pydantic's ValidationError is a
# ValueError): translated here, so that the turn is recorded as failed instead of escaping as a 500.
_MALFORMED = (ValueError, KeyError, IndexError, TypeError, AttributeError)


class UpstreamEngine:
    name = "engine"
    failure: BaseException | None = None  # no thread of its own: it cannot die apart from the requests

    def __init__(self, base_url: str, model: str, api_key: str | None = None, *, timeout_s: float = 120.0) -> None:
        self._base_url = base_url.rstrip("/")
        self._model = model
        self._api_key = api_key
        self._timeout = httpx.Timeout(timeout_s, connect=10.0)
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        self._client = httpx.AsyncClient(base_url=self._base_url, headers=headers, timeout=self._timeout)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    def models(self) -> list[str]:
        return [self._model]

    def adapter_for(self, model: str) -> str | None:
        return events.BASE_VERSION if model == self._model else None

    async def add_adapter(self, version: str, path: str) -> None:
        raise InvalidRequest("the openai engine serves what its upstream serves; it cannot load adapters")

    async def remove_adapter(self, version: str) -> None:
        raise InvalidRequest("the openai engine serves what its upstream serves; it has no adapters")

    def _body(self, request: ChatCompletionRequest, stream: bool) -> dict[str, Any]:
        body = request.model_dump(mode="json", exclude_none=True, exclude={"n"})
        return body | {"model": self._model, "stream": stream}

    async def complete(self, request: ChatCompletionRequest, adapter: str) -> Generation:
        assert self._client is not None, "start() the engine first"
        try:
            response = await self._client.post("/chat/completions", json=self._body(request, stream=False))
        except httpx.TimeoutException as exc:
            raise EngineTimeout(f"the upstream model did not answer in time: {exc}") from exc
        except httpx.HTTPError as exc:
            raise EngineUnavailable(f"the upstream model is unreachable: {exc}") from exc
        _raise_for_upstream(response.status_code, response.text)
        try:
            payload = response.json()
            choice = payload["choices"][0]
            usage = payload.get("usage") or {}
            return Generation(
                message=events.ChatMessage.model_validate(_assistant(choice["message"])),
                finish_reason=choice.get("finish_reason") or "stop",
                prompt_tokens=usage.get("prompt_tokens", 0),
                completion_tokens=usage.get("completion_tokens", 0),
            )
        except _MALFORMED as exc:
            raise EngineUnavailable(f"the upstream model answered something that is not a completion: {exc!r}") from exc

    async def stream(self, request: ChatCompletionRequest, adapter: str) -> AsyncIterator[Delta | Generation]:
        assert self._client is not None, "start() the engine first"
        outgoing = self._client.build_request("POST", "/chat/completions", json=self._body(request, True))
        try:
            response = await self._client.send(outgoing, stream=True)
        except httpx.TimeoutException as exc:
            raise EngineTimeout(f"the upstream model did not answer in time: {exc}") from exc
        except httpx.HTTPError as exc:
            raise EngineUnavailable(f"the upstream model is unreachable: {exc}") from exc
        if response.status_code >= 400:
            text = (await response.aread()).decode(errors="replace")
            await response.aclose()
            _raise_for_upstream(response.status_code, text)
        return self._chunks(response)

    async def _chunks(self, response: httpx.Response) -> AsyncIterator[Delta | Generation]:
        content: list[str] = []
        calls: dict[int, dict[str, Any]] = {}
        finish_reason = "stop"
        try:
            async for line in response.aiter_lines():
                if not line.startswith("data:") or line.strip() == "data: [DONE]":
                    continue
                chunk = json.loads(line.removeprefix("data:"))
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
        except httpx.TimeoutException as exc:
            raise EngineTimeout(f"the upstream model stopped answering: {exc}") from exc
        except httpx.HTTPError as exc:
            raise EngineUnavailable(f"the upstream model failed mid-stream: {exc}") from exc
        except _MALFORMED as exc:
            raise EngineUnavailable(f"the upstream model streamed something that is not a completion: {exc!r}") from exc
        finally:
            await response.aclose()
        yield generation


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
