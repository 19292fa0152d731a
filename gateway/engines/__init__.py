"""Engines: what generates the tokens. One interface for the embedded model, vLLM and any OpenAI upstream.

An engine answers a request on a named adapter version (``base`` is the base model). ``stream`` yields
text and tool-call deltas as they are produced and ends with the complete :class:`Generation`, so that
the turn is recorded from exactly what was sampled, streamed or not.
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


class Engine(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def models(self) -> list[str]: ...

    async def complete(self, request: ChatCompletionRequest, adapter: str) -> Generation: ...

    def stream(self, request: ChatCompletionRequest, adapter: str) -> AsyncIterator[Delta | Generation]: ...
