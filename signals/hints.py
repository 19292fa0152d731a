"""Hints: the directive half of a turn's signal, what the answer should have done differently.

A hint comes from an explicit correction (feedback, or the user's next message when it corrects), from
failed tool calls (what failed and why), or from the model judge (see :mod:`signals.judge`). It is
kept only when :func:`is_directive` says it tells the model what to do; "this is wrong" is a reward,
not a hint. The hint becomes the teacher's prompt in :func:`nextturn.conversation.teacher_context` (the
spine, so that the trainer reaches it without importing this package).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from nextturn.events import ChatMessage, FeedbackReceived
from signals.tool_results import gist, outcome_succeeded, succeeded, text_of

MIN_CHARS = 12
MAX_CHARS = 600
MAX_SENTENCES = 3

# What makes a sentence tell someone what to do: a modal or contrast anywhere ("you should…", "…instead"),
# or an imperative verb opening the sentence ("Use…", "Answer…"; as nouns those words say nothing).
_MODAL = re.compile(
    r"\b(should|must|need(s)? to|have to|instead|rather than|don'?t|do not|never|always|avoid|make sure|ensure|"
    r"remember|prefer|please|i meant|i want(ed)?|i need(ed)?|better to|next time)\b",
    re.IGNORECASE,
)
_IMPERATIVE = re.compile(
    r"^(?:(?:please|just|and|then|also|now)\s+)?(use|try|check|include|add|remove|keep|start|begin|end|answer|"
    r"reply|respond|write|say|give|list|explain|mention|call|run|fix|return|format|put|find|look|read|show|"
    r"ask|stop|skip|sort|verify|test|consider|focus|limit|split|cite|quote|translate|summari[sz]e)\b",
    re.IGNORECASE,
)
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_OPENERS = re.compile(r"^(no|nope|actually|well|hmm|ugh)[,.!]?\s+", re.IGNORECASE)


def is_directive(hint: str) -> bool:
    """Long enough, short enough, and telling the model what to do.

    >>> is_directive("Use tabs instead of spaces.")
    True
    >>> is_directive("This is wrong.")
    False
    """
    text = hint.strip()
    if not MIN_CHARS <= len(text) <= MAX_CHARS or len(_SENTENCE.split(text)) > MAX_SENTENCES:
        return False
    return bool(_MODAL.search(text)) or any(_IMPERATIVE.match(part) for part in _SENTENCE.split(text))


def from_correction(feedback: Sequence[FeedbackReceived], next_user_message: str | None,
                    corrected: bool) -> str | None:
    """The latest explicit correction; else the user's next message, when the rules read it as one.

    >>> from_correction([], "No, I meant: answer in French.", corrected=True)
    'I meant: answer in French.'
    """
    explicit = sorted((item for item in feedback if item.kind == "correction" and item.text),
                      key=lambda item: (item.occurred_at, item.event_id))
    candidates = [item.text for item in reversed(explicit)]
    if corrected and next_user_message:
        candidates.append(next_user_message)
    for text in candidates:
        assert text is not None
        hint = _OPENERS.sub("", text.strip())
        if is_directive(hint):
            return hint
    return None


def from_tools(feedback: Sequence[FeedbackReceived], next_state: Sequence[ChatMessage]) -> str | None:
    """What failed and why (the first two failed calls), as an instruction to deal with it.

    >>> from_tools([], [ChatMessage(role="tool", tool_call_id="c1", content="ZeroDivisionError: division by zero")])
    'The tool call c1 failed: ZeroDivisionError: division by zero. Find the cause and fix it before answering.'
    """
    failures: list[str] = []
    reported: set[str] = set()
    for item in feedback:
        if item.kind == "tool_result" and item.tool is not None and outcome_succeeded(item.tool) is False:
            tool = item.tool
            why = gist(tool.output or "") or (f"exit code {tool.exit_code}" if tool.exit_code else "")
            failures.append(f"the {tool.name} call{' ' + tool.call_id if tool.call_id else ''} failed"
                            + (f": {why}" if why else ""))
            reported.add(tool.call_id or "")
    for message in next_state:
        if message.role == "tool" and message.tool_call_id not in reported and succeeded(text_of(message)) is False:
            name = f"the tool call {message.tool_call_id}" if message.tool_call_id else "a tool call"
            failures.append(f"{name} failed: {gist(text_of(message))}")
    if not failures:
        return None
    hint = "; ".join(failures[:2]).rstrip(".") + ". Find the cause and fix it before answering."
    hint = hint[0].upper() + hint[1:]
    return hint if is_directive(hint) else None
