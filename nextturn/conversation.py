"""Conversation identity: the canonical form of messages and the hashes of a conversation's prefixes.

A client that keeps no session id still sends the whole conversation each time. The turn that answered
``messages`` with ``response`` is identified by the hash of ``messages + [response]``; a later request
whose messages start with that prefix continues that turn, and what follows the prefix is the turn's next
state. The gateway links requests with these hashes; the store keeps them so that any replica can link.

Hashes are seeded with the tenant, so conversations of different tenants never link, and they are built
over a canonical form that ignores what clients change when they echo a message back: content as a
string or as text parts, JSON spacing in tool-call arguments, extra fields such as ``refusal``.

Also here, because serving and training must agree on them: the prompt a model sees for a conversation
(:func:`prompt_token_ids`) and the teacher's prompt for a hint (:func:`teacher_context`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from nextturn.events import ChatMessage


def canonical(message: ChatMessage) -> bytes:
    """The parts of a message that identify it, as compact JSON.

    >>> canonical(ChatMessage(role="user", content=[{"type": "text", "text": "hi"}]))
    b'["user","hi",[],null]'
    """
    calls = [[call.id, call.function.name, _canonical_arguments(call.function.arguments)]
             for call in message.tool_calls or []]
    return json.dumps([message.role, _canonical_content(message.content), calls, message.tool_call_id],
                      separators=(",", ":"), ensure_ascii=False, sort_keys=True).encode()


def _canonical_content(content: str | list[dict[str, Any]] | None) -> Any:
    if content is None:
        return ""
    if isinstance(content, list) and all(part.get("type") == "text" for part in content):
        return "".join(str(part.get("text", "")) for part in content)
    return content


def _canonical_arguments(arguments: str) -> str:
    try:
        return json.dumps(json.loads(arguments), separators=(",", ":"), sort_keys=True, ensure_ascii=False)
    except ValueError:
        return arguments  # not JSON: compared as the model wrote it


def prefix_hashes(tenant: str, messages: Sequence[ChatMessage]) -> list[str]:
    """``result[i]`` identifies ``messages[: i + 1]`` within the tenant."""
    running = hashlib.blake2b(digest_size=16, person=b"nextturn-conv")
    _feed(running, tenant.encode())
    hashes = []
    for message in messages:
        _feed(running, canonical(message))
        hashes.append(running.copy().hexdigest())
    return hashes


def _feed(running: Any, part: bytes) -> None:
    running.update(len(part).to_bytes(8, "big"))  # length-prefixed: no two splits hash alike
    running.update(part)


def prompt_token_ids(tokenizer: Any, messages: Sequence[ChatMessage], tools: list[dict[str, Any]] | None) -> list[int]:
    """The prompt a model sees for ``messages``: the tokenizer's chat template with the generation prompt.
    The embedded engine serves with it and the trainer builds teacher prompts with it, so they agree."""
    dumped = [message.model_dump(mode="json", exclude_none=True) for message in messages]
    text = tokenizer.apply_chat_template(dumped, tools=tools or None, add_generation_prompt=True, tokenize=False)
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids


def turn_key(tenant: str, messages: Sequence[ChatMessage], response: ChatMessage) -> str:
    """The hash a later request's prefix must match to continue this turn."""
    return prefix_hashes(tenant, [*messages, response])[-1]


HINT_PREFIX = "\n\n[Hint about what a good answer does: "


def teacher_context(messages: Sequence[ChatMessage], hint: str) -> list[ChatMessage]:
    """The teacher's prompt: the original messages with the hint appended to the last user message
    (a new user message at the end if there is none). The originals are not modified.

    >>> context = teacher_context([ChatMessage(role="user", content="Name a flower.")], "Answer with one word.")
    >>> context[-1].content
    'Name a flower.\\n\\n[Hint about what a good answer does: Answer with one word.]'
    """
    context = list(messages)
    note = f"{HINT_PREFIX}{hint.strip()}]"
    for index in range(len(context) - 1, -1, -1):
        message = context[index]
        if message.role != "user":
            continue
        if isinstance(message.content, list):
            content: str | list[dict[str, Any]] = [*message.content, {"type": "text", "text": note}]
        else:
            content = (message.content or "") + note
        context[index] = message.model_copy(update={"content": content})  # messages are frozen: a new one
        return context
    return [*context, ChatMessage(role="user", content=note.strip())]
