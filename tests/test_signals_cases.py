"""Cases, pure: a table of realistic next states and the signal each yields; properties of revisions."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nextturn import events
from nextturn.events import ChatMessage
from signals import cases as c

from factories import feedback, follow, says, turn

CALLS = [events.ToolCall(id=f"call_{n}", function=events.ToolCallFunction(name="shell", arguments="{}"))
         for n in (1, 2)]


def tool(call: str, output: str) -> ChatMessage:
    return ChatMessage(role="tool", tool_call_id=call, content=output)


def resolved(question: str, *after: ChatMessage, calls: bool = False) -> c.Case:
    first = turn("s1", 1, content=question)
    if calls:
        first = first.model_copy(update={"response": ChatMessage(role="assistant", tool_calls=CALLS)})
    case = c.waiting(first.turn_id, first.session_id, first.tenant, 0)
    c.open_turn(case, first)
    c.close_with_next(case, follow(first, *after))
    return case


# (what happened next, reward sign, a word the hint must contain or None for no hint)
TABLE = [
    ([says("No, I meant in Celsius, not Fahrenheit.")], -1, "Celsius"),
    ([says("That's wrong, you should use a dict instead of a list.")], -1, "dict"),
    ([says("Actually, please use tabs for indentation.")], -1, "tabs"),
    ([says("This is useless.")], -1, None),
    ([says("Still not working, same error.")], -1, None),
    ([says("how do i convert a temperature to kelvin in python")], -1, None),  # the question asked again
    ([says("Thanks, that works!")], 1, None),
    ([says("Perfect, exactly what I needed.")], 1, None),
    ([says("Now write a unit test for the parser.")], 1, None),  # moved on: a weak yes
    ([tool("call_1", "Traceback (most recent call last):\n  File 'a.py'\nKeyError: 'user'")], -1, "KeyError"),
    ([tool("call_1", "exit code 0\n3 passed"), tool("call_2", "exit code 0")], 1, None),
    ([tool("call_1", "12 passed in 0.4s"), tool("call_2", "bash: line 1: pytets: command not found")], 0,
     "command not found"),
]


@pytest.mark.parametrize(("after", "sign", "hint_word"), TABLE)
def test_realistic_next_states(after: list[ChatMessage], sign: int, hint_word: str | None) -> None:
    calls = any(message.role == "tool" for message in after)
    signal = c.extract(resolved("How do I convert a temperature to Kelvin in Python?", *after, calls=calls))
    assert signal.reward is not None
    assert (signal.reward > 0) - (signal.reward < 0) == sign
    if hint_word is None:
        assert signal.hint is None
    else:
        assert signal.hint is not None and hint_word in signal.hint


def test_an_explicit_rating_beats_what_the_rules_read() -> None:
    case = resolved("Name a colour.", says("Thanks, perfect!"))
    c.add_feedback(case, feedback(turn("s1", 1), value=-1.0).model_copy(update={"turn_id": case.turn_id}))
    signal = c.extract(case)
    assert signal.reward == -1.0 and signal.confidence < 1.0  # the thanks dissents, and lowers confidence


def test_a_failed_turn_never_yields_a_signal() -> None:
    failed = turn("s1", 1).model_copy(update={"response": None, "status": "failed", "error": "engine down"})
    case = c.waiting(failed.turn_id, "s1", "acme", 0)
    c.open_turn(case, failed)
    c.add_feedback(case, feedback(failed, value=1.0))
    assert case.state == "closed" and not c.due(case)


REPLIES = st.sampled_from(["Thanks!", "No, I meant Python 3.", "This is useless.", "ok", "What about Rust?",
                           "You forgot the imports.", ""])
RATINGS = st.lists(st.sampled_from([-1.0, -0.5, 0.0, 0.5, 1.0]), max_size=3)


@given(REPLIES, RATINGS)
def test_a_revision_is_bounded_deterministic_and_applying_an_event_twice_adds_nothing(
        reply: str, ratings: list[float]) -> None:
    case = resolved("How do I sort a list?", says(reply))
    items = [feedback(turn("s1", 1), value=value).model_copy(update={"turn_id": case.turn_id}) for value in ratings]
    for item in items:
        c.add_feedback(case, item)
    first = c.extract(case)
    assert first.reward is None or -1.0 <= first.reward <= 1.0
    assert 0.0 <= first.confidence <= 1.0
    assert c.extract(case).model_dump(exclude={"occurred_at"}) == first.model_dump(exclude={"occurred_at"})
    case.revision, case.evidence = first.revision, first.evidence
    assert not any(c.add_feedback(case, item) for item in items)  # a replay
    assert not c.due(case)
