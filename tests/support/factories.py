"""Realistic events for tests."""

from __future__ import annotations

from datetime import timedelta

from nextturn import events


def turn(session: str = "s1", n: int = 0, *, content: str | None = None, tenant: str = "acme") -> events.TurnRecorded:
    started = events.utc_now()
    return events.TurnRecorded(
        tenant=tenant,
        session_id=session,
        turn_id=f"chatcmpl-{session}-{n}-{events.new_id()[:6]}",
        model="tiny",
        messages=[
            events.ChatMessage(role="system", content="Be brief."),
            events.ChatMessage(role="user", content=content if content is not None else f"question {n}"),
        ],
        params=events.SamplingParams(temperature=0.7, max_tokens=32, seed=n),
        response=events.ChatMessage(role="assistant", content=f"answer {n}"),
        prompt_token_ids=[1, 2, 3, n],
        response_token_ids=[7, 8, n],
        response_logprobs=[-0.1, -0.2, -0.3],
        finish_reason="stop",
        latency_ms=12.5,
        started_at=started,
        finished_at=started + timedelta(milliseconds=12.5),
    )


def sequence_of(event: events.Event) -> int:
    """The ``n`` a factory turn was made with."""
    assert isinstance(event, events.TurnRecorded)
    return event.prompt_token_ids[-1]


def follow(parent: events.TurnRecorded, *after: events.ChatMessage, answer: str = "next answer",
           tool_calls: list[events.ToolCall] | None = None) -> events.TurnRecorded:
    """The session's next request after ``parent``: its messages, its response, then ``after``."""
    assert parent.response is not None
    started = events.utc_now()
    return parent.model_copy(update={
        "event_id": events.new_id(),
        "turn_id": f"chatcmpl-{parent.session_id}-{events.new_id()[:8]}",
        "parent_turn_id": parent.turn_id,
        "messages": [*parent.messages, parent.response, *after],
        "response": events.ChatMessage(role="assistant", content=None if tool_calls else answer,
                                       tool_calls=tool_calls),
        "started_at": started,
        "finished_at": started + timedelta(milliseconds=12.5),
    })


def says(text: str) -> events.ChatMessage:
    return events.ChatMessage(role="user", content=text)


def feedback(turn: events.TurnRecorded, kind: str = "rating", **fields: object) -> events.FeedbackReceived:
    return events.FeedbackReceived(tenant=turn.tenant, session_id=turn.session_id, turn_id=turn.turn_id,
                                   kind=kind, **fields)  # type: ignore[arg-type]
