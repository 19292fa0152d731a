"""Evaluators, composition and hints: realistic follow-ups with expected outcomes, and properties."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nextturn.conversation import teacher_context
from nextturn.events import ChatMessage, FeedbackReceived, ToolOutcome, Verdict
from signals.composition import DECISIVE, compose
from signals.hints import from_correction, from_tools, is_directive
from signals.judge import prompt, tally
from signals.rewards import follow_up, rating, tool_outcome


def feedback(kind: str, **fields: object) -> FeedbackReceived:
    return FeedbackReceived(tenant="acme", session_id="s", turn_id="t", kind=kind, **fields)  # type: ignore[arg-type]


def tool(call_id: str, output: str) -> ChatMessage:
    return ChatMessage(role="tool", tool_call_id=call_id, content=output)


# (the user's next message, what they had asked, expected class, expected sign of the reward)
FOLLOW_UPS = [
    ("No, I meant the Python version.", None, "correction", -1),
    ("That's not what I asked, I wanted a list.", None, "correction", -1),
    ("Actually, it should be sorted descending.", None, "correction", -1),
    ("You forgot to include the units.", None, "correction", -1),
    ("Wrong file. Use config.yaml instead.", None, "correction", -1),
    ("nope, try again", None, "correction", -1),
    ("This is not right.", None, "correction", -1),
    ("That isn't correct, the total is 12.", None, "correction", -1),
    ("Not good.", None, "complaint", -1),
    ("This is useless.", None, "complaint", -1),
    ("ugh, it still doesn't work", None, "complaint", -1),
    ("That makes no sense at all", None, "complaint", -1),
    ("how can I reverse a python list?", "How do I reverse a list in Python?", "requery", -1),
    ("Reverse a list in Python, how?", "How do I reverse a list in Python?", "requery", -1),
    ("Thanks!", None, "thanks", 1),
    ("Perfect, that's exactly it.", None, "thanks", 1),
    ("Great, that worked. Now how do I deploy it?", "How do I build it?", "thanks", 1),
    ("thank you so much, appreciate it", None, "thanks", 1),
    ("What is the weather like on Mars?", "Write a haiku about autumn.", "moved on", 1),
    ("Now write the tests for it.", "Write a function that parses dates.", "moved on", 1),
]


@pytest.mark.parametrize("message, asked, kind, sign", FOLLOW_UPS)
def test_a_follow_up_is_read_as_what_it_says(message: str, asked: str | None, kind: str, sign: int) -> None:
    verdict = follow_up(message, asked)
    assert verdict is not None and verdict.source == "rules"
    assert verdict.detail is not None and verdict.detail.startswith(kind)
    assert verdict.score is not None and (verdict.score > 0) == (sign > 0)


def test_mixed_thanks_and_criticism_is_not_praise() -> None:
    verdict = follow_up("thanks, but that's wrong: it should be 42")
    assert verdict is not None and verdict.score is not None and verdict.score < 0
    assert follow_up("Not great, not helpful.").score < 0  # type: ignore[union-attr,operator]
    mostly_pleased = follow_up("Thanks, great, perfect! One number is wrong though.")
    assert mostly_pleased is not None and mostly_pleased.score == 0.0 and mostly_pleased.confidence < 0.5


def test_the_latest_rating_counts() -> None:
    first, second = feedback("rating", value=1.0), feedback("rating", value=-1.0)
    verdict = rating([second, first]) if first.occurred_at > second.occurred_at else rating([first, second])
    latest = max((first, second), key=lambda item: (item.occurred_at, item.event_id))
    assert verdict is not None and verdict.score == latest.value and verdict.source == "explicit"
    assert rating([feedback("comment", text="meh")]) is None


@pytest.mark.parametrize("items, next_state, score", [
    ([feedback("tool_result", tool=ToolOutcome(name="pytest", call_id="a", exit_code=0))], [], 1.0),
    ([feedback("tool_result", tool=ToolOutcome(name="pytest", call_id="a", passed=False, exit_code=0))], [], -1.0),
    ([], [tool("a", "Traceback (most recent call last):\n  File 'x'\nKeyError: 'id'")], -1.0),
    ([], [tool("a", "bash: jq: command not found")], -1.0),
    ([], [tool("a", "===== 12 passed in 0.31s ====="), tool("b", "===== 1 failed, 3 passed =====")], 0.0),
    ([], [tool("a", "12 passed"), tool("b", "exit code 0")], 1.0),
    # structured feedback about a call outranks what its tool message says
    ([feedback("tool_result", tool=ToolOutcome(name="pytest", call_id="a", passed=True))],
     [tool("a", "1 failed")], 1.0),
])
def test_tool_outcomes(items: list[FeedbackReceived], next_state: list[ChatMessage], score: float) -> None:
    verdict = tool_outcome(items, next_state)
    assert verdict is not None and verdict.score == score and verdict.source == "tool"


def test_tool_messages_that_say_nothing_give_no_verdict() -> None:
    assert tool_outcome([], [tool("a", "the weather is sunny")]) is None
    assert tool_outcome([], [ChatMessage(role="user", content="error: something")]) is None


# -- hints -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, directive", [
    ("Use tabs instead of spaces.", True),
    ("Answer in French, and keep it under three sentences.", True),
    ("You should have checked the file first.", True),
    ("This is wrong.", False),
    ("bad", False),
    ("Terrible answer, really awful stuff here.", False),
    ("Do this. Then that. Then more. And more.", False),  # more than three sentences
])
def test_a_hint_is_kept_only_when_it_says_what_to_do(text: str, directive: bool) -> None:
    assert is_directive(text) is directive


def test_hints_from_corrections_and_tool_errors() -> None:
    explicit = feedback("correction", text="Always give the answer in metres.")
    assert from_correction([explicit], "No, I meant the Python version.", corrected=True) == explicit.text
    assert from_correction([], "No, I meant the Python version.", corrected=True) == "I meant the Python version."
    assert from_correction([], "No, I meant the Python version.", corrected=False) is None
    assert from_correction([], "this is wrong", corrected=True) is None

    failing = feedback("tool_result", tool=ToolOutcome(name="pytest", call_id="a", exit_code=1,
                                                       output="E   AssertionError: 3 != 4\n1 failed"))
    hint = from_tools([failing], [tool("b", "ok"), tool("c", "Traceback...\nValueError: bad date '2024-13-01'")])
    assert hint == ("The pytest call a failed: 1 failed; the tool call c failed: ValueError: bad date "
                    "'2024-13-01'. Find the cause and fix it before answering.")
    assert from_tools([], [tool("a", "3 passed")]) is None


def test_the_teacher_context_appends_the_hint_to_the_last_user_message_only() -> None:
    messages = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Name a city."),
                ChatMessage(role="assistant", content="Paris."),
                ChatMessage(role="user", content=[{"type": "text", "text": "Another?"}])]
    context = teacher_context(messages, "Answer with a city in Asia.")
    assert context[:3] == messages[:3]
    assert context[3].content == [{"type": "text", "text": "Another?"},
                                  {"type": "text", "text": "\n\n[Hint about what a good answer does: "
                                                           "Answer with a city in Asia.]"}]
    assert messages[3].content == [{"type": "text", "text": "Another?"}]  # the originals are untouched
    only_system = teacher_context([ChatMessage(role="system", content="x")], "Say hello first.")
    assert only_system[-1].role == "user" and "Say hello first." in str(only_system[-1].content)


# -- properties ----------------------------------------------------------------------------------------------

SOURCES = ("explicit", "tool", "judge", "rules")
verdicts = st.builds(
    lambda source, score, confidence: Verdict(evaluator=source, source=source, score=score, confidence=confidence),
    st.sampled_from(SOURCES),
    st.one_of(st.none(), st.floats(-1, 1, allow_nan=False)),
    st.floats(0, 1, allow_nan=False),
)


@given(st.lists(verdicts, max_size=6), st.randoms(use_true_random=False))
def test_composition_is_bounded_deterministic_and_order_independent(
    items: list[Verdict], shuffler: random.Random
) -> None:
    result = compose(items)
    shuffled = list(items)
    shuffler.shuffle(shuffled)
    assert compose(shuffled) == result == compose(items)
    assert result.reward is None or -1 <= result.reward <= 1
    assert 0 <= result.confidence <= 1
    if not any(item.score is not None for item in items):
        assert result.reward is None


@given(st.lists(verdicts, max_size=6), st.floats(-1, 1, allow_nan=False), st.floats(0, 1, allow_nan=False))
def test_explicit_feedback_beats_every_other_source(items: list[Verdict], score: float, confidence: float) -> None:
    explicit = Verdict(evaluator="rating", source="explicit", score=score, confidence=confidence)
    others = [item for item in items if item.source != "explicit"]
    assert compose([*others, explicit]).reward == score


@given(st.floats(DECISIVE, 1), st.floats(-1, -DECISIVE), st.floats(0.5, 1), st.floats(0.5, 1), st.booleans())
def test_a_confident_conflict_between_judge_and_rules_abstains(
    up: float, down: float, judge_confidence: float, rules_confidence: float, judge_positive: bool
) -> None:
    judge = Verdict(evaluator="judge", source="judge", score=up if judge_positive else down,
                    confidence=judge_confidence)
    rules = Verdict(evaluator="rules", source="rules", score=down if judge_positive else up,
                    confidence=rules_confidence)
    assert compose([judge, rules]).reward is None


@given(st.text(max_size=300), st.one_of(st.none(), st.text(max_size=100)))
def test_follow_up_reading_is_bounded_and_deterministic(message: str, asked: str | None) -> None:
    first, second = follow_up(message, asked), follow_up(message, asked)
    assert first == second
    if first is not None:
        assert first.score is not None and -1 <= first.score <= 1 and 0 <= first.confidence <= 1


@given(st.lists(st.text(max_size=120), max_size=5))
def test_tool_outcome_is_bounded_and_order_independent(outputs: list[str]) -> None:
    messages = [tool(f"c{n}", output) for n, output in enumerate(outputs)]
    verdict = tool_outcome([], messages)
    assert verdict == tool_outcome([], list(reversed(messages)))
    if verdict is not None:
        assert verdict.score is not None and -1 <= verdict.score <= 1 and 0 <= verdict.confidence <= 1


# -- the judge's pure parts ------------------------------------------------------------------------------------


@pytest.mark.parametrize("answers, score, hint", [
    (["VERDICT: GOOD", "VERDICT: GOOD\nHINT: NONE", "VERDICT: BAD\nHINT: Use metres."], 1.0, None),
    (["VERDICT: BAD\nHINT: Use metres, not feet.", "**VERDICT:** BAD\nHINT: Answer in metres, and say so.",
      "VERDICT: GOOD"], -1.0, "Answer in metres, and say so."),
    (["VERDICT: BAD", "VERDICT: GOOD", "no idea"], None, None),  # a tie among the readable votes
    (["VERDICT: BAD", "garbage", "more garbage"], None, None),  # one of three is no majority
    (["VERDICT: GOOD\nVERDICT: BAD", "VERDICT: BAD\nHINT: bad", "VERDICT: BAD\nHINT: This was bad."], -1.0, None),
])
def test_the_judge_majority_and_its_hint(answers: list[str], score: float | None, hint: str | None) -> None:
    verdict, best = tally(answers)
    assert (verdict.score, best) == (score, hint)
    assert verdict.source == "judge" and len(verdict.votes) == len(answers)


@given(st.lists(st.sampled_from(["VERDICT: GOOD", "VERDICT: BAD", "VERDICT: NEUTRAL", "??"]), min_size=1, max_size=7),
       st.randoms(use_true_random=False))
def test_the_judge_tally_is_bounded_and_independent_of_vote_order(answers: list[str], shuffler: random.Random) -> None:
    verdict, _ = tally(answers)
    shuffled = list(answers)
    shuffler.shuffle(shuffled)
    again, _ = tally(shuffled)
    assert (again.score, again.confidence) == (verdict.score, verdict.confidence)
    assert 0 <= verdict.confidence <= 1
    if verdict.score is not None:
        assert verdict.confidence > 0.5  # a strict majority of all votes


def test_the_judge_prompt_shows_the_reply_and_what_came_next() -> None:
    asked = [ChatMessage(role="user", content="Run the tests.")]
    reply = ChatMessage(role="assistant", content=None, tool_calls=[
        {"id": "c1", "type": "function", "function": {"name": "pytest", "arguments": "{}"}}])  # type: ignore[list-item]
    chat = prompt(asked, reply, [tool("c1", "1 failed")])
    assert chat[0]["role"] == "system" and "VERDICT" in chat[0]["content"]
    assert 'USER: "Run the tests."' in chat[1]["content"] and "[calls pytest({})]" in chat[1]["content"]
    assert chat[1]["content"].endswith('WHAT HAPPENED NEXT:\nTOOL: "1 failed"\n</transcript>')
