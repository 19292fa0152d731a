"""Evaluators: what happened after a turn, scored. Each is a pure function over plain data that returns a
:class:`~nextturn.events.Verdict` (score in [-1, 1], confidence in [0, 1], provenance) or None when it
has nothing to say.

    rating        explicit feedback: the client's own score               source "explicit"
    tool_outcome  tool results: structured feedback, then tool messages   source "tool"
    exchange      a tool-call turn whose calls ran: how its exchange ended  the final answer's source
    follow_up     rules over the user's next message                      source "rules"

The model judge (:mod:`signals.judge`) is the fourth; :mod:`signals.composition` combines them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from nextturn.events import ChatMessage, FeedbackReceived, Verdict
from signals.tool_results import outcome_succeeded, succeeded, text_of

# -- explicit ratings -----------------------------------------------------------------------------------


def rating(feedback: Sequence[FeedbackReceived]) -> Verdict | None:
    """The client's latest rating of the turn, as it is.

    >>> from nextturn.events import FeedbackReceived as F
    >>> rating([F(tenant="t", session_id="s", turn_id="x", kind="rating", value=-0.5)]).score
    -0.5
    """
    ratings = sorted((item for item in feedback if item.kind == "rating" and item.value is not None),
                     key=lambda item: (item.occurred_at, item.event_id))
    if not ratings:
        return None
    latest = ratings[-1]
    assert latest.value is not None
    return Verdict(evaluator="rating", source="explicit", score=latest.value, confidence=1.0,
                   detail=f"rated {latest.value:+g}" + (f" ({len(ratings)} ratings, the latest counts)"
                                                        if len(ratings) > 1 else ""))


# -- tool outcomes ----------------------------------------------------------------------------------------

def tool_outcome(feedback: Sequence[FeedbackReceived], next_state: Sequence[ChatMessage]) -> Verdict | None:
    """How the tool calls of the turn went.

    Structured feedback (``exit_code``, ``passed``) is trusted first; a call without it is judged by the
    tool message that answered it in the next state. Score: successes minus failures over the calls that
    say either; confidence is high for structured evidence, lower for text.

    >>> crashed = ChatMessage(role="tool", tool_call_id="c", content="Traceback (most recent call last): ...")
    >>> tool_outcome([], [crashed]).score
    -1.0
    """
    structured: dict[str, bool] = {}
    for item in feedback:
        if item.kind == "tool_result" and item.tool is not None and (ok := outcome_succeeded(item.tool)) is not None:
            structured[item.tool.call_id or item.event_id] = ok
    from_text: dict[str, bool] = {}
    for message in next_state:
        if message.role != "tool":
            continue
        call_id = message.tool_call_id or f"#{len(from_text)}"
        if call_id not in structured and (ok := succeeded(text_of(message))) is not None:
            from_text[call_id] = ok
    outcomes = list(structured.values()) + list(from_text.values())
    if not outcomes:
        return None
    failures = outcomes.count(False)
    score = (len(outcomes) - 2 * failures) / len(outcomes)
    confidence = (0.95 * len(structured) + 0.7 * len(from_text)) / len(outcomes)
    return Verdict(evaluator="tool", source="tool", score=score, confidence=round(confidence, 4),
                   detail=f"{failures} of {len(outcomes)} tool call(s) failed")


def failed(tool: Verdict | None) -> bool:
    """Some tool call of the turn failed (by its tool verdict)."""
    return tool is not None and tool.score is not None and tool.score < 1.0


def exchange(tool: Verdict | None, outcome: Verdict | None) -> list[Verdict]:
    """The verdicts on a turn that called tools, once the exchange those calls served has ended.

    ``outcome`` is the final answer's reward (the first answer after the calls that called no tool), as the
    signals worker hands it down. A call that ran says the call was well formed, not that it was the right
    call: a calculator asked the wrong sum runs fine, and the user rejects the answer built on it. So when no
    call failed, the tool verdict abstains (kept as provenance) and the exchange's outcome speaks. A failed
    call is wrong whatever came after it: then the tool verdict stands and the outcome is not used.

    >>> ran = Verdict(evaluator="tool", source="tool", score=1.0, confidence=0.7)
    >>> wrong = Verdict(evaluator="exchange", source="rules", score=-0.7, confidence=0.65)
    >>> [(v.evaluator, v.score) for v in exchange(ran, wrong)]
    [('tool', None), ('exchange', -0.7)]
    >>> crashed = ran.model_copy(update={"score": -1.0})
    >>> [(v.evaluator, v.score) for v in exchange(crashed, wrong)]
    [('tool', -1.0)]
    """
    if outcome is None or failed(tool):
        return [tool] if tool is not None else []
    if tool is None:
        return [outcome]
    ran = tool.model_copy(update={"score": None, "detail": f"{tool.detail}; whether they were the right calls is "
                                                           "the exchange's to say"})
    return [ran, outcome]


# -- the user's next message ------------------------------------------------------------------------------

# Cue phrases by what they say about the previous answer. Each class holds many phrasings; a message may
# match several, and the strongest evidence wins (see follow_up).
_CUES: dict[str, tuple[float, tuple[str, ...]]] = {
    "correction": (-0.7, (
        "no i meant", "i meant", "that's not what i", "that is not what i", "not what i asked", "not what i wanted",
        "you misunderstood", "you got it wrong", "that's wrong", "that is wrong", "that's incorrect",
        "that is incorrect", "incorrect", "wrong", "actually", "instead", "should have", "should be",
        "you forgot", "you missed", "you didn't", "you did not", "please use", "i said", "i asked for", "rather",
        "not quite", "try again", "not right", "isn't right", "is not right", "not correct", "isn't correct",
        "is not correct",
    )),
    "complaint": (-0.8, (
        "useless", "terrible", "awful", "this is bad", "that's bad", "doesn't work", "does not work",
        "didn't work", "did not work", "still broken", "still wrong", "still not", "not helpful", "unhelpful",
        "makes no sense", "doesn't make sense", "nonsense", "frustrating", "frustrated", "annoying", "ugh", "come on",
        "are you kidding", "waste of time", "stop", "why did you", "why would you", "not good", "no good",
        "not what i need",
    )),
    "thanks": (0.8, (
        "thanks", "thank you", "thx", "perfect", "great", "awesome", "excellent", "exactly", "that works",
        "that worked", "works now", "it works", "works great", "nice", "brilliant", "helpful", "that's right",
        "that is right", "correct", "spot on", "love it", "well done", "good job", "cheers", "appreciate",
    )),
}
_NEGATED_THANKS = ("not perfect", "not great", "not helpful", "not correct", "not right", "not exactly",
                   "no thanks", "isn't correct", "isn't right", "is not correct", "not quite right")
_WORD = re.compile(r"[a-z0-9']+")
_STOPWORDS = frozenset("a an the is are was were be to of in on for and or it this that me my you your i "
                       "please can could would will do does how what why when which with about".split())


def follow_up(next_message: str, asked: str | None = None) -> Verdict | None:
    """What the user's next message says about the answer: a correction, a complaint, a re-query (the
    same request asked again in other words), thanks, or moving on to something else.

    >>> follow_up("No, I meant the other file.").score
    -0.7
    >>> follow_up("Thanks, that works!").score
    0.8
    """
    raw = next_message.lower().replace("’", "'")
    words = _WORD.findall(raw)
    text = f" {' '.join(words)} "
    found: dict[str, int] = {}
    for kind, (_, phrases) in _CUES.items():
        hits = sum(1 for phrase in phrases if f" {phrase} " in text)
        if hits:
            found[kind] = hits
    if words[:1] in (["no"], ["nope"]):  # "No, …" opens a correction
        found["correction"] = found.get("correction", 0) + 1
    if "thanks" in found and any(f" {phrase} " in text for phrase in _NEGATED_THANKS):
        del found["thanks"]
    if asked is not None and "thanks" not in found and _same_request(next_message, asked):
        found["requery"] = 2
    if not found:
        if not next_message.strip():
            return None
        return Verdict(evaluator="rules", source="rules", score=0.2, confidence=0.3,
                       detail="moved on: nothing in the reply about the answer")
    scores = {"correction": -0.7, "complaint": -0.8, "thanks": 0.8, "requery": -0.5}
    negative = {kind for kind in found if scores[kind] < 0}
    if negative and "thanks" in found:  # "thanks, but that's wrong": mixed, the criticism is the point
        if found["thanks"] > sum(found[kind] for kind in negative):
            return Verdict(evaluator="rules", source="rules", score=0.0, confidence=0.2,
                           detail="mixed: thanks and criticism")
        found.pop("thanks")
    kind = max(found, key=lambda k: (found[k], -scores[k]))  # the most cues; ties: the more negative
    confidence = min(0.9, 0.5 + 0.15 * found[kind])
    return Verdict(evaluator="rules", source="rules", score=scores[kind], confidence=confidence,
                   detail=f"{kind} ({found[kind]} cue(s))")


def _same_request(next_message: str, asked: str) -> bool:
    """The user asked the same thing again: most content words shared (a rephrase or a plain repeat)."""
    ours = _content_words(next_message)
    theirs = _content_words(asked)
    if not ours or not theirs:
        return False
    return len(ours & theirs) / len(ours | theirs) >= 0.5


def _content_words(text: str) -> set[str]:
    return {word for word in _WORD.findall(text.lower()) if word not in _STOPWORDS and len(word) > 1}
