"""What is visibly wrong with a served turn, judged from the turn alone: the rollout's fast guardrails.

The store files every turn under at most one flaw when it records it, so that the rollout controller
counts them per version with one query (DESIGN, Rollout controller):

- ``error``: the turn failed (the engine or the gateway). A failure the client caused (it left, or sent a
  request the engine refused, such as a context too long) is not the version's fault: no flaw;
- ``tool_call``: the model tried to call a tool and the call did not parse (a marker of any known tool-call
  format left in the text, or arguments that are not a JSON object);
- ``malformed``: text with U+FFFD, the mark of bytes that do not decode (a token soup);
- ``empty``: no text and no tool call.
"""

from __future__ import annotations

import json
from typing import Literal

from nextturn.events import TurnRecorded
from nextturn.tool_formats import MARKERS

Flaw = Literal["error", "tool_call", "malformed", "empty"]
FLAWS: tuple[Flaw, ...] = ("error", "tool_call", "malformed", "empty")


def flaw(turn: TurnRecorded) -> Flaw | None:
    """The turn's flaw, or None for a turn that looks whole.

    >>> from nextturn.events import ChatMessage, utc_now
    >>> def answered(text):
    ...     return TurnRecorded(tenant="t", session_id="s", turn_id="c", model="m", messages=[], latency_ms=1,
    ...                         started_at=utc_now(), finished_at=utc_now(),
    ...                         response=ChatMessage(role="assistant", content=text))
    >>> [flaw(answered(text)) for text in ("Blue.", "", "  ", "a \\ufffd b", "<|tool_call|>{oops", "<tool_call>{")]
    [None, 'empty', 'empty', 'malformed', 'tool_call', 'tool_call']
    """
    if turn.status == "failed":
        return None if turn.failed_by == "client" else "error"
    if turn.response is None:
        return "error"
    calls = turn.response.tool_calls or []
    if any(not _json_object(call.function.arguments) for call in calls):
        return "tool_call"
    content = turn.response.content
    text = content if isinstance(content, str) else "".join(str(part.get("text", "")) for part in content or [])
    if any(marker in text for marker in MARKERS):
        return "tool_call"
    if "\ufffd" in text:
        return "malformed"
    if not text.strip() and not calls:
        return "empty"
    return None


def _json_object(arguments: str) -> bool:
    try:
        return isinstance(json.loads(arguments), dict)
    except ValueError:
        return False
