"""How models write tool calls in their text, and how to read them back into OpenAI ``tool_calls``.

A model that calls a tool writes markup its chat template taught it; the gateway samples that text and must
hand the client ``tool_calls``, streamed or whole (``gateway.engines.decoding``). The common formats:

- ``nextturn``: the local models (``nextturn.local_models``):
  ``<|tool_call|>{"id": "call_1", "name": "ls", "arguments": {}}<|/tool_call|>``, one block per call.
- ``hermes``: Hermes 2 Pro, Qwen 2.5 and Qwen 3: ``<tool_call>\\n{"name": "ls", "arguments": {}}\\n</tool_call>``,
  one block per call.
- ``llama3``: Llama 3.1 to 3.3 JSON tool calling: the whole answer is ``{"name": "ls", "parameters": {}}``,
  optionally after ``<|python_tag|>``; several calls are separated by ``;``.
- ``mistral``: ``[TOOL_CALLS][{"name": "ls", "arguments": {}, "id": "a1b2c3d4e"}]`` (a JSON list), or in newer
  tokenizers ``[TOOL_CALLS]ls[ARGS]{}`` once per call. The calls run to the end of the answer.

:func:`format_of` picks the format from a model's chat template (``NEXTTURN_TOOL_CALL_FORMAT`` may name it
instead). A block that does not parse stays in the content, so a malformed call is seen, not dropped, and
the rollout's fast guardrails count it (``nextturn.flaws`` looks for every format's markers).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from nextturn.events import ToolCall, ToolCallFunction

FormatName = Literal["nextturn", "hermes", "llama3", "mistral"]


@dataclass(frozen=True)
class ToolFormat:
    """Where a format's calls are in the text, and how one stretch of call text reads.

    ``open`` starts a stretch of calls; ``close`` ends it (None: it runs to the end of the answer). With
    ``at_start`` the stretch may only begin the answer, and ``opens_at_start`` are further ways it may begin
    (Llama 3 writes bare JSON: an answer that starts with ``{`` is a call). ``parse`` returns the calls of one
    stretch (without its markers), or None when it is not calls."""

    name: FormatName
    open: str
    close: str | None
    parse: Callable[[str], list[ToolCall] | None]
    at_start: bool = False
    opens_at_start: tuple[str, ...] = ()

    @property
    def markers(self) -> tuple[str, ...]:
        """Text that means a call was attempted, wherever it is left in an answer."""
        return (self.open,) + ((self.close,) if self.close else ())


def _call(parsed: Any, arguments_key: str = "arguments") -> ToolCall | None:
    """One call from a parsed JSON object, or None when it is not one."""
    if not isinstance(parsed, dict) or not isinstance(parsed.get("name"), str) or not parsed["name"]:
        return None
    arguments = parsed.get(arguments_key, parsed.get("arguments", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string, as OpenAI sends them
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    given = parsed.get("id")
    call_id = given if isinstance(given, str) and given else f"call_{uuid.uuid4().hex[:24]}"
    return ToolCall(id=call_id, function=ToolCallFunction(name=parsed["name"], arguments=json.dumps(arguments)))


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def one_object(body: str) -> list[ToolCall] | None:
    """A block holding one JSON call (nextturn, hermes).

    >>> [c.function.name for c in one_object(' {"name": "ls", "arguments": {"path": "."}} ')]
    ['ls']
    >>> one_object('{"name": "ls", "arguments": [1]}') is None
    True
    """
    call = _call(_json(body.strip()))
    return None if call is None else [call]


def llama3_calls(body: str) -> list[ToolCall] | None:
    """Llama 3's answer-long calls: JSON objects with ``parameters``, separated by ``;``.

    >>> [(c.function.name, c.function.arguments) for c in llama3_calls('{"name": "a", "parameters": {"x": 1}}; '
    ...                                                                 '{"name": "b", "parameters": {}}')]
    [('a', '{"x": 1}'), ('b', '{}')]
    >>> llama3_calls('{"answer": 42}') is None
    True
    """
    decoder = json.JSONDecoder()
    calls: list[ToolCall] = []
    text = body.strip()
    at = 0
    while at < len(text):
        try:
            parsed, at = decoder.raw_decode(text, at)
        except ValueError:
            return None
        call = _call(parsed, "parameters")
        if call is None:
            return None
        calls.append(call)
        while at < len(text) and text[at] in " \t\r\n;":
            at += 1
    return calls or None


def mistral_calls(body: str) -> list[ToolCall] | None:
    """Mistral's calls after ``[TOOL_CALLS]``: a JSON list, or ``name[ARGS]{…}`` (each after its own marker).

    >>> [c.id for c in mistral_calls('[{"name": "ls", "arguments": {}, "id": "a1b2c3d4e"}]')]
    ['a1b2c3d4e']
    >>> [c.function.name for c in mistral_calls('ls[ARGS]{"path": "."}[TOOL_CALLS]pwd[ARGS]{}')]
    ['ls', 'pwd']
    """
    parsed = _json(body.strip())
    if isinstance(parsed, list):
        calls = [_call(item) for item in parsed]
        return None if not calls or any(call is None for call in calls) else calls  # type: ignore[return-value]
    found: list[ToolCall] = []
    for part in body.split(MISTRAL.open):
        name, sep, arguments = part.partition("[ARGS]")
        call = _call({"name": name.strip(), "arguments": _json(arguments.strip())}) if sep else None
        if call is None:
            return None
        found.append(call)
    return found or None


NEXTTURN = ToolFormat("nextturn", "<|tool_call|>", "<|/tool_call|>", one_object)
HERMES = ToolFormat("hermes", "<tool_call>", "</tool_call>", one_object)
LLAMA3 = ToolFormat("llama3", "<|python_tag|>", None, llama3_calls, at_start=True, opens_at_start=("{",))
MISTRAL = ToolFormat("mistral", "[TOOL_CALLS]", None, mistral_calls)
FORMATS: dict[str, ToolFormat] = {f.name: f for f in (NEXTTURN, HERMES, LLAMA3, MISTRAL)}
# Markers of every format: one left in an answer's text is a call that did not parse (nextturn.flaws).
MARKERS = tuple(dict.fromkeys(marker for f in FORMATS.values() for marker in f.markers))


def format_of(chat_template: str | None) -> ToolFormat | None:
    """The format a chat template teaches its model, or None when it renders no tool calls.

    >>> format_of("{{ '<tool_call>\\\\n' + tool_call | tojson + '\\\\n</tool_call>' }}").name
    'hermes'
    >>> format_of("{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}") is None
    True
    """
    template = chat_template or ""
    if NEXTTURN.open in template:
        return NEXTTURN
    if HERMES.open in template:
        return HERMES
    if MISTRAL.open in template:
        return MISTRAL
    if LLAMA3.open in template or ('"parameters"' in template and "ipython" in template):
        return LLAMA3
    return None


def resolve(setting: str, chat_template: str | None) -> ToolFormat | None:
    """``NEXTTURN_TOOL_CALL_FORMAT``: ``auto`` reads the chat template, ``none`` parses no calls, else that format.

    >>> resolve("hermes", None).name, resolve("none", "<|tool_call|>"), resolve("auto", "<|tool_call|>").name
    ('hermes', None, 'nextturn')
    """
    if setting == "auto":
        return format_of(chat_template)
    return None if setting == "none" else FORMATS[setting]
