"""The HTTP request bodies the gateway accepts (OpenAI's chat completion format)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from nextturn import events


class FunctionSpec(BaseModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None

    @field_validator("parameters")
    @classmethod
    def _a_json_schema_object(cls, parameters: dict[str, Any] | None) -> dict[str, Any] | None:
        if parameters is not None and parameters.get("type", "object") != "object":
            raise ValueError("a function's parameters must be a JSON Schema of type 'object'")
        return parameters


class ToolSpec(BaseModel):
    type: Literal["function"]
    function: FunctionSpec


# Bounded work per request (the body itself is bounded by NEXTTURN_MAX_REQUEST_BYTES).
MAX_MESSAGES = 4096
MAX_TOOLS = 128  # as OpenAI
MAX_STOP_STRINGS = 16  # OpenAI takes 4; other servers more
MAX_STOP_CHARS = 1000


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI parameters we do not act on are accepted, not used

    model: str = Field(min_length=1)
    messages: list[events.ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    stream: bool = False
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    # Bounded work per request: every stop string is searched for in every piece of the answer.
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)  # OpenAI's int64; torch takes 64 bits
    n: Literal[1] = 1
    tools: list[ToolSpec] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Any = None
    user: str | None = None  # the end user (OpenAI's field); with NEXTTURN_SCOPE_BY=user, it picks the scope

    @field_validator("stop")
    @classmethod
    def _bounded_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        """Every stop string is searched for in every piece of the answer: their number and length are bounded."""
        strings = [stop] if isinstance(stop, str) else stop or []
        if len(strings) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, not {len(strings):,}")
        if any(len(string) > MAX_STOP_CHARS for string in strings):
            raise ValueError(f"a stop string has at most {MAX_STOP_CHARS:,} characters")
        return stop

    @field_validator("messages")
    @classmethod
    def _content_where_required(cls, messages: list[events.ChatMessage]) -> list[events.ChatMessage]:
        """As OpenAI's API: system, developer, user and tool messages carry content; an assistant message carries
        content or tool calls; a tool message names the call it answers."""
        for n, message in enumerate(messages):
            if message.content is None and (message.role != "assistant" or not message.tool_calls):
                raise ValueError(f"message {n} ({message.role}) has no content")
            if message.role == "tool" and not message.tool_call_id:
                raise ValueError(f"message {n} (tool) has no tool_call_id")
        return messages

    def sampling(self) -> events.SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        return events.SamplingParams(temperature=self.temperature, top_p=self.top_p, seed=self.seed, stop=stop,
                                     max_tokens=self.max_completion_tokens or self.max_tokens)

    def tool_definitions(self) -> list[dict[str, Any]] | None:
        return [tool.model_dump(exclude_none=True) for tool in self.tools] if self.tools else None
