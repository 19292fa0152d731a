"""Property-based requests against a running gateway: whatever a client sends, the answer is below 500, every
error is OpenAI-style JSON, and the gateway goes on answering and recording.

Each case starts from a valid request and replaces one field (or one message field) with an arbitrary JSON
value: lone surrogates, huge and tiny numbers, deep nesting, long lists, wrong types. The upstream is the
scripted one, so a case that is valid costs a millisecond.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.app import create_app
from nextturn.settings import Settings

from support.event_logs import recorded
from support.services import Uvicorn
from support.upstream import MODEL

HEADERS = {"Authorization": "Bearer sk-acme", "Content-Type": "application/json"}
ODD_TEXT = st.one_of(st.text(max_size=20), st.sampled_from(["\ud800", "a\udfffb", "\x00", "\u202e", "x" * 5000]))
NUMBERS = st.one_of(st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=True),
                    st.sampled_from([1e-300, 1e300, -0.0, 2**63, 2**64]))
VALUES = st.recursive(st.one_of(st.none(), st.booleans(), NUMBERS, ODD_TEXT),
                      lambda inner: st.one_of(st.lists(inner, max_size=4),
                                              st.dictionaries(ODD_TEXT, inner, max_size=4)),
                      max_leaves=12)
CHAT_FIELDS = ["model", "messages", "stream", "temperature", "top_p", "max_tokens", "max_completion_tokens",
               "stop", "seed", "n", "tools", "tool_choice", "user", "extra"]
MESSAGE_FIELDS = ["role", "content", "name", "tool_calls", "tool_call_id", "extra"]
FEEDBACK_FIELDS = ["turn_id", "kind", "value", "text", "tool", "idempotency_key", "extra"]
pytestmark = pytest.mark.slow  # ~750 requests: make test runs them, make check does not
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def gateway(upstream: Uvicorn, data_dir: Path) -> Iterator[Uvicorn]:
    settings = Settings(data_dir=data_dir, engine="openai", upstream_url=f"{upstream.url}/v1", model=MODEL,
                        api_keys="sk-acme:acme", admin_key="sk-admin")
    with Uvicorn(create_app(settings)) as server:
        yield server


def send(gateway: Uvicorn, path: str, body: Any, headers: dict[str, str] = HEADERS) -> httpx.Response:
    # ensure_ascii: a lone surrogate travels as its escape, as any JSON encoder may send it
    raw = json.dumps(body, ensure_ascii=True, allow_nan=True).encode()
    return httpx.post(f"{gateway.url}{path}", content=raw, headers=headers, timeout=30)


def acceptable(response: httpx.Response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], error


def still_recording(gateway: Uvicorn, data_dir: Path, content: str) -> None:
    answered = send(gateway, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user",
                                                                                      "content": content}]})
    assert answered.status_code == 200, answered.text
    assert recorded(data_dir, answered.json()["id"]).messages[-1].content == content


@FUZZ
@given(field=st.sampled_from(CHAT_FIELDS), value=VALUES, stream=st.booleans())
def test_chat_requests_with_any_field_never_get_a_500(gateway: Uvicorn, field: str, value: Any,
                                                      stream: bool) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": stream, field: value}
    acceptable(send(gateway, "/v1/chat/completions", body))


@FUZZ
@given(field=st.sampled_from(MESSAGE_FIELDS), value=VALUES)
def test_messages_with_any_field_never_get_a_500(gateway: Uvicorn, field: str, value: Any) -> None:
    message = {"role": "user", "content": "hi", field: value}
    acceptable(send(gateway, "/v1/chat/completions", {"model": MODEL, "messages": [message]}))


@FUZZ
@given(field=st.sampled_from(FEEDBACK_FIELDS), value=VALUES)
def test_feedback_with_any_field_never_gets_a_500(gateway: Uvicorn, field: str, value: Any) -> None:
    body = {"turn_id": "chatcmpl-none", "kind": "rating", "value": 1.0, field: value}
    acceptable(send(gateway, "/v1/feedback", body))


@FUZZ
@given(path=st.sampled_from(["/v1/admin/adapters", "/v1/admin/rollout/pause", "/v1/admin/rollout/promote"]),
       body=st.dictionaries(st.sampled_from(["version", "path", "actor", "reason", "extra"]), VALUES, max_size=4))
def test_admin_requests_with_any_body_never_get_a_500(gateway: Uvicorn, path: str, body: Any) -> None:
    acceptable(send(gateway, path, body, {**HEADERS, "Authorization": "Bearer sk-admin"}))


@FUZZ
@given(body=VALUES)
def test_any_json_at_all_never_gets_a_500(gateway: Uvicorn, body: Any) -> None:
    for path in ("/v1/chat/completions", "/v1/feedback"):
        acceptable(send(gateway, path, body))


def test_after_all_of_it_the_gateway_still_answers_and_records(gateway: Uvicorn, data_dir: Path) -> None:
    """Runs last in this module (pytest keeps the file's order): nothing above stopped the pipeline."""
    still_recording(gateway, data_dir, "still here after the fuzzing")
    assert httpx.get(f"{gateway.url}/healthz").json() == {"status": "ok"}
