"""Implicit session linking: a stock client that sends the whole conversation and no session id."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from gateway.sessions import Link, SessionLinker
from nextturn.conversation import canonical, prefix_hashes
from nextturn.errors import StoreUnavailable
from nextturn.events import ChatMessage, SamplingParams, ToolCall, ToolCallFunction, TurnRecorded, utc_now
from nextturn.store import Store, upgrade


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


def _stored(store: Store, tenant: str, session: str, turn_id: str, messages: list[ChatMessage],
            response: ChatMessage | None, *, seconds_ago: float = 0.0) -> None:
    started = utc_now() - timedelta(seconds=seconds_ago)
    store.apply([TurnRecorded(
        tenant=tenant, session_id=session, turn_id=turn_id, model="m", messages=messages, response=response,
        params=SamplingParams(), status="ok" if response else "failed", finish_reason="stop" if response else "error",
        error=None if response else "the engine failed", latency_ms=1.0, started_at=started, finished_at=started,
    )])


def test_a_request_this_replica_never_saw_links_through_the_store(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    upgrade(url)
    store = Store(url)
    history = [ChatMessage(role="system", content="Be brief."), user("What is 2+2?")]
    _stored(store, "acme", "sess-old", "turn-old", history, assistant("4"), seconds_ago=60)
    _stored(store, "acme", "sess-new", "turn-new", history, assistant("4"))  # the same exchange, later
    _stored(store, "acme", "sess-1", "turn-1", [user("hi")], assistant("hello"))
    _stored(store, "acme", "sess-1", "turn-2", [user("hi"), assistant("hello"), user("bye")], assistant("ciao"))
    _stored(store, "acme", "sess-f", "turn-failed", [user("boom")], None)
    linker = SessionLinker(lookup=store.find_link)  # a fresh replica: nothing in memory

    def resolve(messages: list[ChatMessage], tenant: str = "acme", session: str | None = None) -> Link:
        return asyncio.run(linker.resolve(tenant, messages, session))

    latest = resolve([*history, assistant("4"), user("And 3+3?")])
    assert (latest.session_id, latest.parent_turn_id, latest.next_state) == ("sess-new", "turn-new",
                                                                              [user("And 3+3?")])
    pinned = resolve([*history, assistant("4"), user("And 3+3?")], session="sess-old")
    assert (pinned.session_id, pinned.parent_turn_id) == ("sess-old", "turn-old")
    longest = resolve([user("hi"), assistant("hello"), user("bye"), assistant("ciao"), user("again")])
    assert (longest.session_id, longest.parent_turn_id) == ("sess-1", "turn-2")
    assert resolve([*history, assistant("4"), user("x")], tenant="globex").parent_turn_id is None
    assert resolve([user("boom"), assistant(""), user("again")]).parent_turn_id is None
    store.close()


def test_a_conversation_alternating_between_replicas_links_to_its_latest_turn(tmp_path: Path) -> None:
    """This replica served turn 1, the other one turn 2: turn 3 continues turn 2, which only the store knows
    here, not turn 1, which this replica remembers."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    upgrade(url)
    store = Store(url)
    here = SessionLinker(lookup=store.find_link)
    here.remember("acme", "sess-1", "turn-1", [user("hi")], assistant("hello"))
    _stored(store, "acme", "sess-1", "turn-1", [user("hi")], assistant("hello"))
    _stored(store, "acme", "sess-1", "turn-2", [user("hi"), assistant("hello"), user("bye")], assistant("ciao"))
    third = asyncio.run(here.resolve("acme", [user("hi"), assistant("hello"), user("bye"), assistant("ciao"),
                                               user("again")]))
    assert (third.session_id, third.parent_turn_id, third.next_state) == ("sess-1", "turn-2", [user("again")])
    branch = asyncio.run(here.resolve("acme", [user("hi"), assistant("hello"), user("other")]))
    assert branch.parent_turn_id == "turn-1"  # nothing longer anywhere: this replica's memory decides
    store.close()


def test_linking_does_not_fail_a_request_when_the_store_cannot_answer() -> None:
    def unavailable(tenant: str, keys: list[str], session: str | None) -> tuple[str, str, str] | None:
        raise StoreUnavailable("the database is down")

    linker = SessionLinker(lookup=unavailable)
    link = asyncio.run(linker.resolve("acme", [user("hi"), assistant("hello"), user("more")]))
    assert link.parent_turn_id is None and link.session_id.startswith("sess-")
