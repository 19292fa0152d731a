"""Engines: what generates the tokens. One interface for the embedded model, vLLM and any OpenAI upstream.

An engine answers a request on a named adapter version (``base`` is the base model). ``stream`` checks
the request and starts it (a bad request fails there, with its own status, before any chunk is sent),
then returns an iterator of text and tool-call deltas as they are produced, ending with the complete
:class:`Generation`, so that the turn is recorded from exactly what was sampled, streamed or not.

Adapters are named by version, and a version is also a model id in /v1/models (as vLLM names LoRA
modules): a request for the served model is routed by the gateway, a request for a version pins it.
An engine with a generation thread reports its death in ``failure`` (shown by /healthz).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.schemas import ChatCompletionRequest
from nextturn import events


@dataclass
class Generation:
    message: events.ChatMessage
    finish_reason: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_token_ids: list[int] = field(default_factory=list)
    response_token_ids: list[int] = field(default_factory=list)
    response_logprobs: list[float] | None = None  # None: the engine gave none (not trainable)


@dataclass
class Delta:
    """A piece of a streamed response, in the shape of an OpenAI chunk's ``delta``."""

    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class Stream(Protocol):
    """An answer as it is generated: deltas, then the whole Generation last. Closing it early (a client
    that left) stops the generation."""

    def __aiter__(self) -> AsyncIterator[Delta | Generation]: ...

    async def __anext__(self) -> Delta | Generation: ...

    async def aclose(self) -> None: ...


class Engine(Protocol):
    name: str
    failure: BaseException | None

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def models(self) -> list[str]: ...

    def adapter_for(self, model: str) -> str | None:
        """The adapter version a request for ``model`` runs on (``base`` for the served model); None: unknown."""

    async def add_adapter(self, version: str, path: str) -> None: ...

    async def remove_adapter(self, version: str) -> None: ...

    async def complete(self, request: ChatCompletionRequest, adapter: str) -> Generation: ...

    async def stream(self, request: ChatCompletionRequest, adapter: str) -> Stream: ...
