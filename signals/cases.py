"""A case: everything the signals worker knows about one turn, and the signal that knowledge yields.

A case is plain data. Events are applied to it (:func:`open_turn`, :func:`close_with_next`,
:func:`add_feedback`, :func:`close_idle`), each returning whether the case learned something new, and
:func:`extract` turns it into a signal. The worker keeps cases in the store; relabel builds them from
stored turns; tests build them by hand. Nothing here does I/O.

Lifecycle::

    waiting ── the turn arrives ──▶ open ── next request / idle / evicted ──▶ closed
    (feedback came first)           │  feedback: a revision now, still open   │  late feedback or a late next
                                    ▼                                         ▼  request: a new revision

A turn that called tools is an exception: its next request (the tools' results) closes it only when a call
failed. When every call ran, the case stays open until its *exchange* ends: the first answer after it that
calls no tool is resolved, and that answer's signal is handed down (:func:`inherit`) to every tool-call turn
before it, since a call that ran may still have been the wrong call (:func:`signals.rewards.exchange`). A
session that goes quiet first closes it as usual, and a later outcome is a new revision.

A revision is written whenever the evidence (the event ids a case was built from, and the signal revision an
exchange's outcome came from) grows; applying an event twice adds nothing, so a replayed event never yields a
second revision.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from nextturn.events import (
    MAX_FEEDBACK_PER_TURN,
    ChatMessage,
    FeedbackReceived,
    HintSource,
    SignalExtracted,
    TurnRecorded,
    Verdict,
)
from signals import composition, hints, rewards
from signals.tool_results import text_of

# The extractor's version: a change to any evaluator, the composition or the hints is a new version, and
# `nextturn signals relabel` re-scores stored turns with it (new signal ids, so old and new coexist).
EXTRACTOR_VERSION = "extractor-v1"
IDLE = "idle"  # the evidence that a session went quiet after the turn
ASKED_CHARS = 2000  # enough of the user's question to recognise it asked again


class Case(BaseModel):
    model_config = ConfigDict(extra="forbid")

    turn_id: str
    session_id: str
    tenant: str
    partition: int
    state: Literal["waiting", "open", "closed"] = "waiting"
    closed_by: Literal["next", "idle", "evicted", "exchange"] | None = None
    # The turn, once seen.
    turn_event_id: str | None = None
    parent_turn_id: str | None = None
    after_tools: bool = False  # its request carries tool results: the turn before it called tools
    scope: str | None = None
    adapter_version: str | None = None
    prompt_len: int = 0  # how many messages the turn's request had
    asked: str | None = None  # the turn's last user message: a rephrase of it is a re-query
    response: ChatMessage | None = None
    # What happened next.
    next_event_id: str | None = None
    next_state: list[ChatMessage] | None = None
    feedback: list[FeedbackReceived] = Field(default_factory=list)  # a factory: no deep copy per case
    judge: Verdict | None = None
    judge_hint: str | None = None
    # How the exchange ended, for a turn that called tools: the final answer's reward, and its signal revision.
    outcome: Verdict | None = None
    outcome_event_id: str | None = None
    # What was written.
    extractor_version: str = EXTRACTOR_VERSION
    revision: int = -1
    evidence: list[str] = Field(default_factory=list)


def signal_id(turn_id: str, extractor_version: str = EXTRACTOR_VERSION) -> str:
    """Stable for a turn and an extractor version: every revision of one signal shares it."""
    return hashlib.sha256(f"{turn_id}\x1f{extractor_version}".encode()).hexdigest()[:32]


def waiting(turn_id: str, session_id: str, tenant: str, partition: int) -> Case:
    return Case(turn_id=turn_id, session_id=session_id, tenant=tenant, partition=partition)


def open_turn(case: Case, turn: TurnRecorded) -> bool:
    """The turn itself arrived. A turn that failed before answering is closed at once and never yields a
    signal: it has no response to reward and no tokens to train on."""
    if case.turn_event_id is not None:
        return False
    user = [message for message in turn.messages if message.role == "user"]
    case.turn_event_id = turn.event_id
    case.parent_turn_id = turn.parent_turn_id
    answered = max((i for i, message in enumerate(turn.messages) if message.role == "assistant"), default=-1)
    case.after_tools = any(message.role == "tool" for message in turn.messages[answered + 1:])
    case.scope, case.adapter_version = turn.scope, turn.adapter_version
    case.prompt_len = len(turn.messages)
    case.asked = text_of(user[-1])[:ASKED_CHARS] if user else None
    case.response = turn.response
    case.state = "open" if turn.response is not None else "closed"
    return True


def close_with_next(case: Case, child: TurnRecorded) -> bool:
    """The session's next request continues this turn: the messages after the turn's prompt and response
    are its next state (the user's reply, or the results of every tool call it made). A turn whose tool calls
    all ran stays open for its exchange's outcome."""
    if case.next_event_id is not None:
        return False
    case.next_event_id = child.event_id
    case.next_state = list(child.messages[case.prompt_len + 1:])
    if case.state == "open" and not exchange_decides(case):
        case.state, case.closed_by = "closed", "next"
    return True


def called_tools(case: Case) -> bool:
    return case.response is not None and bool(case.response.tool_calls)


def exchange_decides(case: Case) -> bool:
    """The turn called tools and none failed (so far): how its exchange ends says whether they were right."""
    return called_tools(case) and not rewards.failed(rewards.tool_outcome(case.feedback, case.next_state or []))


def inherit(case: Case, final: SignalExtracted) -> bool:
    """The exchange this tool-call turn served ended: ``final`` is the latest signal of its final answer. The
    case takes that answer's reward as its outcome (an abstention takes none) and closes; False when it knew
    this revision already, when a call of its own failed (a failure is its own verdict), or when the answer
    abstains and the case had no outcome (an abstention is no news)."""
    if case.outcome_event_id == final.event_id or not exchange_decides(case):
        return False
    if final.reward is None and case.outcome is None:
        return False
    primary = composition.primary(final.verdicts)
    case.outcome = None if final.reward is None or primary is None else Verdict(
        evaluator="exchange", source=primary.source, score=final.reward, confidence=final.confidence,
        detail=f"the exchange's final answer {final.turn_id}: {primary.evaluator}")
    case.outcome_event_id = final.event_id
    if case.state == "open":
        case.state, case.closed_by = "closed", "exchange"
    return True


def add_feedback(case: Case, feedback: FeedbackReceived) -> bool:
    """Keep the turn's first MAX_FEEDBACK_PER_TURN pieces of feedback; beyond them, feedback teaches nothing.
    Every piece kept makes a revision holding all of them: unbounded, a client flooding one turn made the
    work grow with the square of its count."""
    if len(case.feedback) >= MAX_FEEDBACK_PER_TURN or any(item.event_id == feedback.event_id for item in case.feedback):
        return False
    case.feedback = [*case.feedback, feedback]
    return True


def close_idle(case: Case, reason: Literal["idle", "evicted"] = "idle") -> bool:
    """No next request came in time (or the worker needed the room): resolve with no next state."""
    if case.state != "open":
        return False
    case.state, case.closed_by = "closed", reason
    return True


def context(case: Case, child: TurnRecorded) -> list[ChatMessage]:
    """The turn's own request, read back from its next request (which starts with it)."""
    return list(child.messages[: case.prompt_len])


def evidence(case: Case) -> list[str]:
    ids = [case.turn_event_id, case.next_event_id, case.outcome_event_id, *(item.event_id for item in case.feedback)]
    # Going quiet is news only to a turn nothing else has resolved, or when the judge spoke at that point.
    if case.closed_by in ("idle", "evicted") and case.next_event_id is None and (not case.feedback or case.judge):
        ids.append(IDLE)
    return sorted(item for item in ids if item)


def ready(case: Case) -> bool:
    """A signal can be written: the turn is known, and something happened (feedback, or it closed)."""
    return case.response is not None and (case.state == "closed" or bool(case.feedback))


def due(case: Case) -> bool:
    """The case knows more than its last revision said."""
    return ready(case) and evidence(case) != case.evidence


def extract(case: Case) -> SignalExtracted:
    """The signal this case yields now (its next revision). Pure: the same case gives the same signal.

    >>> from nextturn.events import FeedbackReceived as F
    >>> case = Case(turn_id="t1", session_id="s", tenant="acme", partition=0, turn_event_id="e1", state="open",
    ...             response=ChatMessage(role="assistant", content="42"))
    >>> _ = add_feedback(case, F(event_id="f1", tenant="acme", session_id="s", turn_id="t1", kind="rating",
    ...                          value=1.0))
    >>> signal = extract(case)
    >>> signal.reward, signal.confidence, signal.evidence, signal.revision
    (1.0, 1.0, ['e1', 'f1'], 0)
    """
    assert case.response is not None, "a case without a response has nothing to score"
    next_state = case.next_state or []
    next_user = next((text_of(message) for message in next_state if message.role == "user"), None)
    verdicts = [verdict for verdict in (
        rewards.rating(case.feedback),
        *rewards.exchange(rewards.tool_outcome(case.feedback, next_state), case.outcome),
        rewards.follow_up(next_user, case.asked) if next_user is not None else None,
        *(_comment(item) for item in case.feedback if item.kind == "comment"),
        case.judge,
    ) if verdict is not None]
    composite = composition.compose(verdicts)
    criticised = any(v.source == "rules" and v.score is not None and v.score < 0 for v in verdicts)
    hint, source = _best_hint(case.feedback, next_state, next_user, criticised, case.judge_hint)
    revision = case.revision + 1
    sid = signal_id(case.turn_id)
    return SignalExtracted(
        event_id=f"{sid}.{revision}", signal_id=sid, revision=revision, tenant=case.tenant,
        scope=case.scope or "default", session_id=case.session_id, turn_id=case.turn_id,
        adapter_version=case.adapter_version or "base", reward=composite.reward, hint=hint,
        hint_source=source,
        confidence=composite.confidence, verdicts=verdicts, extractor_version=EXTRACTOR_VERSION,
        evidence=evidence(case),
    )


def revise(cases: Iterable[Case]) -> list[SignalExtracted]:
    """The next signal revision of each case that knows more than its last one said (each case records it)."""
    signals = []
    for case in cases:
        if due(case):
            signal = extract(case)
            case.revision, case.evidence = signal.revision, signal.evidence
            signals.append(signal)
    return signals


def _comment(item: FeedbackReceived) -> Verdict | None:
    """A free-text comment about the turn, read by the same rules as a next message."""
    verdict = rewards.follow_up(item.text or "")
    return verdict.model_copy(update={"evaluator": "comment"}) if verdict is not None else None


def _best_hint(feedback: Sequence[FeedbackReceived], next_state: Sequence[ChatMessage], next_user: str | None,
               criticised: bool, judge_hint: str | None) -> tuple[str | None, HintSource | None]:
    """Directive evidence in order of trust, and where it came from: the user's own correction (explicit, or
    a next message the rules read as criticism), then a comment that says what to do, then what the tools
    reported, then the judge."""
    comments = [item.text for item in feedback if item.kind == "comment" and item.text]
    said = (hints.from_correction(feedback, next_user, corrected=criticised)
            or next((text for text in reversed(comments) if hints.is_directive(text)), None))
    if said:
        return said, "user"
    reported = hints.from_tools(feedback, next_state)
    if reported:
        return reported, "tools"
    return (judge_hint, "judge") if judge_hint else (None, None)
