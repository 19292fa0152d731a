from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nextturn import events
from nextturn.errors import MalformedEvent, UnknownEventType, UnsupportedSchemaVersion

from support.factories import turn

EXAMPLES: list[events.Event] = [
    turn("s1", 3),
    events.TurnRecorded(
        tenant="acme", session_id="s", turn_id="chatcmpl-x", parent_turn_id="chatcmpl-w", model="m",
        messages=[events.ChatMessage(role="user", content="run the tests")],
        tools=[{"type": "function", "function": {"name": "pytest", "parameters": {"type": "object"}}}],
        response=events.ChatMessage(role="assistant", tool_calls=[
            events.ToolCall(id="call_1", function=events.ToolCallFunction(name="pytest", arguments="{}")),
            events.ToolCall(id="call_2", function=events.ToolCallFunction(name="pytest", arguments='{"k":1}')),
        ]),
        finish_reason="tool_calls", latency_ms=3, started_at=events.utc_now(), finished_at=events.utc_now(),
    ),
    events.TurnRecorded(
        tenant="acme", session_id="s", turn_id="chatcmpl-y", model="m",
        messages=[events.ChatMessage(role="user", content=[{"type": "text", "text": "hi"}], extra_field=1)],
        status="failed", error="engine crashed mid-stream", finish_reason="error", latency_ms=1,
        started_at=events.utc_now(), finished_at=events.utc_now(),
    ),
    events.FeedbackReceived(tenant="acme", session_id="s", turn_id="t", kind="rating", value=-1.0),
    events.FeedbackReceived(tenant="acme", session_id="s", turn_id="t", kind="correction",
                            text="Check the file first.", idempotency_key="retry-1"),
    events.FeedbackReceived(tenant="acme", session_id="s", turn_id="t", kind="tool_result",
                            tool=events.ToolOutcome(name="pytest", call_id="call_1", exit_code=1, passed=False,
                                                    output="1 failed")),
    events.SignalExtracted(
        signal_id="t:rules-1", tenant="acme", session_id="s", turn_id="t", reward=-0.5, hint="Ask first.",
        confidence=0.8, extractor_version="rules-1",
        verdicts=[events.Verdict(evaluator="judge", source="judge", score=None, confidence=0.0,
                                 votes=[1.0, -1.0, None])],
    ),
    events.AdapterPublished(version=3, parent_version=2, base_model="tiny", path="/adapters/default/3",
                            meta={"metrics": {"entropy": 1.2}}),
    events.DeploymentChanged(stable_version=2, canary_version=3, canary_weight=0.1, reason="new", actor="controller"),
    events.DeadLettered(source_topic="turns", partition=0, offset=7, key=None, payload_b64="AA==", reason="bad"),
]


@pytest.mark.parametrize("event", EXAMPLES, ids=lambda e: e.type)
def test_every_event_round_trips(event: events.Event) -> None:
    assert events.decode(event.encode()) == event


@given(
    prompt=st.lists(st.integers(min_value=0, max_value=2**31 - 1), max_size=50),
    sampled=st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=2**31 - 1),
            st.floats(max_value=0.0, allow_nan=False, allow_infinity=False),
        ),
        max_size=50,
    ),
    text=st.text(),
)
def test_token_ids_and_logprobs_survive_exactly(prompt: list[int], sampled: list[tuple[int, float]], text: str) -> None:
    base = turn("s", 0)
    recorded = base.model_copy(update={
        "prompt_token_ids": prompt,
        "response_token_ids": [token for token, _ in sampled],
        "response_logprobs": [logprob for _, logprob in sampled],
        "response": events.ChatMessage(role="assistant", content=text),
    })
    assert events.decode(recorded.encode()) == recorded


def test_an_unknown_schema_version_is_refused_clearly() -> None:
    payload = turn().model_dump(mode="json") | {"schema_version": 4}
    with pytest.raises(UnsupportedSchemaVersion, match="turn.recorded schema_version 4 is not supported .*1, 2, 3"):
        events.decode(json.dumps(payload))


def test_a_version_1_turn_is_read_with_what_its_failure_meant() -> None:
    """Version 2 added ``cause`` and ``pinned``: a version-1 turn has neither, and is read as it was meant."""

    def version_1(error: str) -> events.TurnRecorded:
        payload = turn().model_dump(mode="json", exclude={"cause", "pinned"})
        decoded = events.decode(json.dumps(payload | {"schema_version": 1, "status": "failed", "error": error,
                                                      "response": None}))
        assert isinstance(decoded, events.TurnRecorded) and decoded.schema_version == 1
        return decoded

    assert version_1(events.CLIENT_LEFT).failed_by == "client"
    assert version_1("EngineUnavailable: down").failed_by == "server"
    assert not version_1("x").pinned
    assert turn().schema_version == 3 and turn().failed_by is None and turn().user is None
    refused = turn().model_copy(update={"status": "failed", "error": "context too long", "cause": "client"})
    assert events.decode(refused.encode()).failed_by == "client"  # type: ignore[union-attr]
    with pytest.raises(MalformedEvent, match="only a failed turn has a cause"):
        events.decode(turn().model_dump_json() .replace('"cause":null', '"cause":"client"'))


def test_unknown_types_and_malformed_payloads_are_refused_clearly() -> None:
    with pytest.raises(UnknownEventType, match="unknown event type 'turn.deleted'"):
        events.decode('{"type": "turn.deleted", "schema_version": 1}')
    with pytest.raises(MalformedEvent, match="not a JSON object"):
        events.decode(b"[1, 2")
    with pytest.raises(MalformedEvent, match="feedback.received is invalid at value"):
        events.decode(json.dumps({"type": "feedback.received", "tenant": "a", "session_id": "s", "turn_id": "t",
                                  "kind": "rating", "value": 5}))


def test_logprobs_must_align_with_the_sampled_tokens() -> None:
    payload = turn().model_dump(mode="json") | {"response_logprobs": [-0.1]}
    with pytest.raises(MalformedEvent, match="must align one to one"):
        events.decode(json.dumps(payload))


def test_logprobs_must_be_finite() -> None:
    with pytest.raises(ValueError, match="finite number"):
        events.TurnRecorded.model_validate(turn().model_dump() | {"response_logprobs": [0.0, float("-inf"), -1.0]})


@pytest.mark.parametrize(
    ("kind", "missing"), [("rating", "value"), ("correction", "text"), ("tool_result", "tool"), ("comment", "text")]
)
def test_feedback_needs_what_its_kind_carries(kind: str, missing: str) -> None:
    with pytest.raises(ValueError, match=f"needs `{missing}`"):
        events.FeedbackReceived(tenant="a", session_id="s", turn_id="t", kind=kind)  # type: ignore[arg-type]


def test_session_events_are_keyed_by_session_and_others_by_scope() -> None:
    assert turn("abc").partition_key == "abc"
    assert events.AdapterPublished(scope="team-a", version=1, base_model="m", path="p").partition_key == "team-a"
