"""Cases, pure: a table of realistic next states and the signal each yields; properties of revisions."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nextturn import events
from nextturn.events import MAX_FEEDBACK_PER_TURN, ChatMessage
from signals import cases as c

from support.factories import feedback, follow, says, turn

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
        assert (signal.hint, signal.hint_source) == (None, None)
    else:
        assert signal.hint is not None and hint_word in signal.hint
        assert signal.hint_source == ("tools" if calls else "user")


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


def exchange(reply: str, *, output: str = '{"ok": true, "result": 23}') -> tuple[c.Case, c.Case]:
    """A tool call, its result, the final answer and the user's reply to it: the two cases."""
    asking = turn("s1", 1, content="What is 17 plus 5?").model_copy(
        update={"response": ChatMessage(role="assistant", tool_calls=CALLS[:1])})
    answering = follow(asking, tool("call_1", output), answer="So 17 plus 5 is 23.")
    cases = []
    for current, after in ((asking, answering), (answering, follow(answering, says(reply)))):
        case = c.waiting(current.turn_id, current.session_id, current.tenant, 0)
        c.open_turn(case, current)
        c.close_with_next(case, after)
        cases.append(case)
    return cases[0], cases[1]


@pytest.mark.parametrize(("reply", "sign"), [("No, that's wrong: 17 plus 5 is 22.", -1), ("Thanks, perfect!", 1)])
def test_a_tool_call_that_ran_is_judged_by_how_its_exchange_ended(reply: str, sign: int) -> None:
    call, answer = exchange(reply)
    assert call.state == "open" and not c.due(call)  # the call ran: right or wrong, the answer will tell
    final = c.extract(answer)
    assert c.inherit(call, final) and call.state == "closed"
    signal = c.extract(call)
    assert signal.reward == final.reward and (signal.reward > 0) - (signal.reward < 0) == sign
    assert {(v.evaluator, v.score is None) for v in signal.verdicts} == {("tool", True), ("exchange", False)}
    assert final.event_id in signal.evidence
    call.revision, call.evidence = signal.revision, signal.evidence
    assert not c.inherit(call, final) and not c.due(call)  # the same revision again adds nothing


def test_a_failed_tool_call_keeps_its_own_verdict_whatever_the_exchange_said() -> None:
    call, answer = exchange("Thanks, perfect!", output="Traceback (most recent call last):\nZeroDivisionError")
    assert call.state == "closed" and c.due(call)  # a failure needs no outcome to be known
    assert not c.inherit(call, c.extract(answer))
    signal = c.extract(call)
    assert signal.reward == -1.0 and signal.hint is not None and "ZeroDivisionError" in signal.hint
    assert signal.hint_source == "tools"


def test_an_abstaining_final_answer_is_no_news_to_its_tool_calls() -> None:
    call, answer = exchange("")  # an empty reply: the rules say nothing
    final = c.extract(answer)
    assert final.reward is None
    assert not c.inherit(call, final) and call.state == "open"
    c.close_idle(call)
    signal = c.extract(call)
    assert signal.reward == 1.0 and [v.evaluator for v in signal.verdicts] == ["tool"]


def test_feedback_beyond_the_cap_teaches_nothing_and_keeps_a_revision_small() -> None:
    """A client flooding one turn with feedback made every revision hold all of it (work growing with the
    square of the count) until the worker crash-looped; the first MAX_FEEDBACK_PER_TURN pieces count."""
    case = resolved("How do I sort a list?", says("Thanks!"))
    flood = [feedback(turn("s1", 1), value=-1.0).model_copy(update={"turn_id": case.turn_id})
             for _ in range(MAX_FEEDBACK_PER_TURN + 500)]
    learned = [c.add_feedback(case, item) for item in flood]
    assert learned.count(True) == MAX_FEEDBACK_PER_TURN and not any(learned[MAX_FEEDBACK_PER_TURN:])
    assert len(c.extract(case).evidence) <= MAX_FEEDBACK_PER_TURN + 3
