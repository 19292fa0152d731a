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
