"""Implicit session linking: a stock client that sends the whole conversation and no session id."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway.sessions import SessionLinker
from nextturn.conversation import canonical, prefix_hashes
from nextturn.events import ChatMessage, ToolCall, ToolCallFunction


def user(text: str) -> ChatMessage:
    return ChatMessage(role="user", content=text)


def assistant(text: str | None = None, calls: list[tuple[str, str, str]] = ()) -> ChatMessage:  # type: ignore[assignment]
    tool_calls = [ToolCall(id=i, function=ToolCallFunction(name=n, arguments=a)) for i, n, a in calls] or None
    return ChatMessage(role="assistant", content=text, tool_calls=tool_calls)


def tool(call_id: str, output: str) -> ChatMessage:
    return ChatMessage(role="tool", tool_call_id=call_id, content=output)


def test_a_four_turn_conversation_with_a_parallel_tool_call_links_turn_by_turn() -> None:
    linker = SessionLinker()
    system = ChatMessage(role="system", content="You run tests.")
    history = [system, user("Run the tests in a and b.")]
    first = linker.link("acme", history)
    assert first.parent_turn_id is None
    calls = assistant(calls=[("c1", "pytest", '{"path": "a"}'), ("c2", "pytest", '{"path": "b"}')])
    linker.remember("acme", first.session_id, "turn-1", history, calls)

    history += [calls, tool("c1", "3 passed"), tool("c2", "1 failed: test_x")]
    second = linker.link("acme", history)
    assert (second.session_id, second.parent_turn_id) == (first.session_id, "turn-1")
    assert second.next_state == [tool("c1", "3 passed"), tool("c2", "1 failed: test_x")]  # both results
    summary = assistant("b has one failure: test_x.")
    linker.remember("acme", second.session_id, "turn-2", history, summary)

    history += [summary, user("No, I meant: fix it.")]
    third = linker.link("acme", history)
    assert (third.parent_turn_id, third.next_state) == ("turn-2", [user("No, I meant: fix it.")])
    fix = assistant("Fixed the off-by-one in test_x.")
    linker.remember("acme", third.session_id, "turn-3", history, fix)

    history += [fix, user("Thanks!")]
    fourth = linker.link("acme", history)
    assert (fourth.session_id, fourth.parent_turn_id) == (first.session_id, "turn-3")


def test_echoed_messages_link_despite_what_clients_change() -> None:
    linker = SessionLinker()
    asked = [user("hi")]
    linker.remember("acme", "s", "t1", asked, assistant(calls=[("c1", "f", '{"a": 1, "b": [1, 2]}')]))
    echoed = ChatMessage(  # as an SDK sends it back: parts, respaced JSON, extra fields
        role="assistant", content=None, refusal=None, audio=None,
        tool_calls=[ToolCall(id="c1", function=ToolCallFunction(name="f", arguments='{"b":[1,2],"a":1}'))],
    )
    asked_as_parts = ChatMessage(role="user", content=[{"type": "text", "text": "h"}, {"type": "text", "text": "i"}])
    link = linker.link("acme", [asked_as_parts, echoed, tool("c1", "ok")])
    assert link.parent_turn_id == "t1"


def test_an_edited_history_starts_a_new_session() -> None:
    linker = SessionLinker()
    linker.remember("acme", "s", "t1", [user("hi")], assistant("hello"))
    edited = linker.link("acme", [user("hi"), assistant("hello!"), user("again")])
    assert edited.parent_turn_id is None and edited.session_id != "s"


def test_tenants_never_link_to_each_other() -> None:
    linker = SessionLinker()
    linker.remember("acme", "s", "t1", [user("hi")], assistant("hello"))
    assert linker.link("other", [user("hi"), assistant("hello"), user("more")]).parent_turn_id is None
    assert linker.link("acme", [user("hi"), assistant("hello"), user("more")]).parent_turn_id == "t1"


def test_a_session_header_is_kept_and_limits_linking_to_that_session() -> None:
    linker = SessionLinker()
    linker.remember("acme", "client-session", "t1", [user("hi")], assistant("hello"))
    conversation = [user("hi"), assistant("hello"), user("more")]
    assert linker.link("acme", conversation, "client-session").parent_turn_id == "t1"
    other = linker.link("acme", conversation, "another-session")
    assert (other.session_id, other.parent_turn_id) == ("another-session", None)


def test_the_index_is_bounded_by_capacity_and_idle_time() -> None:
    now = [0.0]
    linker = SessionLinker(capacity=3, idle_timeout_s=60, clock=lambda: now[0])
    for n in range(5):
        linker.remember("acme", f"s{n}", f"t{n}", [user(f"q{n}")], assistant(f"a{n}"))
    assert len(linker) == 3
    assert linker.link("acme", [user("q0"), assistant("a0"), user("x")]).parent_turn_id is None  # evicted
    assert linker.link("acme", [user("q4"), assistant("a4"), user("x")]).parent_turn_id == "t4"
    now[0] = 61.0
    assert linker.link("acme", [user("q4"), assistant("a4"), user("x")]).parent_turn_id is None  # idle
    assert len(linker) == 0


messages = st.lists(
    st.builds(ChatMessage, role=st.sampled_from(["system", "user", "assistant", "tool"]), content=st.text()),
    max_size=8,
)


@given(conversation=messages, tenant=st.text())
def test_a_prefix_has_the_hashes_of_the_start_of_the_conversation(conversation: list[ChatMessage], tenant: str) -> None:
    hashes = prefix_hashes(tenant, conversation)
    assert len(set(hashes)) == len(hashes)  # every prefix is distinct
    for end in range(len(conversation) + 1):
        assert prefix_hashes(tenant, conversation[:end]) == hashes[:end]


@given(first=st.text(), second=st.text())
def test_messages_hash_alike_only_when_their_canonical_forms_match(first: str, second: str) -> None:
    a, b = user(first), user(second)
    assert (prefix_hashes("t", [a]) == prefix_hashes("t", [b])) == (canonical(a) == canonical(b))
