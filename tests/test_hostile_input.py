"""What one client sends cannot stop recording or serving for the others: each case was once a 500 or a dead
publisher, and is now a clear 4xx (or a normal answer) after which the gateway goes on recording."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.app import create_app
from nextturn.events import MAX_FEEDBACK_PER_TURN
from nextturn.keys import create_key
from nextturn.settings import Settings
from nextturn.store import Store

from support.event_logs import recorded
from support.eventually import eventually
from support.services import Uvicorn

KEY = {"Authorization": "Bearer sk-acme", "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hostile")


@pytest.fixture(scope="module")
def gateway(tiny_model: Path, data_dir: Path) -> Iterator[Uvicorn]:
    settings = Settings(data_dir=data_dir, engine="embedded", model=str(tiny_model), api_keys="sk-acme:acme")
    with Uvicorn(create_app(settings)) as server:
        yield server


def post(gateway: Uvicorn, path: str, body: bytes) -> httpx.Response:
    return httpx.post(f"{gateway.url}{path}", content=body, headers=KEY, timeout=60)


def chat(gateway: Uvicorn, content: str = "hi", **fields: object) -> httpx.Response:
    body = {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 4, **fields}
    return post(gateway, "/v1/chat/completions", json.dumps(body).encode())


def still_serving_and_recording(gateway: Uvicorn, data_dir: Path, content: str) -> None:
    answered = chat(gateway, content)
    assert answered.status_code == 200, answered.text
    assert httpx.get(f"{gateway.url}/healthz", timeout=60).json() == {"status": "ok"}
    assert recorded(data_dir, answered.json()["id"]).messages[-1].content == content


def openai_error(response: httpx.Response, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    return error


@pytest.mark.parametrize("field", ["text", "turn_id"])
def test_feedback_holding_a_lone_surrogate_is_a_400_and_recording_goes_on(
    gateway: Uvicorn, data_dir: Path, field: str
) -> None:
    """``"\\ud800"`` is valid JSON but not UTF-8: accepted, it once killed the publisher, and every later
    completion was a 500 until a restart."""
    turn_id = chat(gateway).json()["id"]
    feedback = {"turn_id": turn_id, "kind": "comment", "text": "fine"}
    body = json.dumps(feedback).replace(json.dumps(feedback[field]), '"\\ud800"').encode()
    openai_error(post(gateway, "/v1/feedback", body), 400)
    still_serving_and_recording(gateway, data_dir, f"after a surrogate in {field}")


def test_a_message_holding_a_lone_surrogate_is_a_400(gateway: Uvicorn, data_dir: Path) -> None:
    body = b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}'
    openai_error(post(gateway, "/v1/chat/completions", body), 400)
    still_serving_and_recording(gateway, data_dir, "after a surrogate in a message")


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/feedback"])
@pytest.mark.parametrize("raw", [b"\xff\xfe", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"])
def test_bytes_that_are_not_utf8_are_a_400(gateway: Uvicorn, data_dir: Path, path: str, raw: bytes) -> None:
    """Invalid UTF-8 inside a JSON string: a stray byte, a cut sequence, an encoded surrogate, a 5-byte form."""
    body = (b'{"model": "tiny", "messages": [{"role": "user", "content": "a' + raw + b'b"}]}'
            if path == "/v1/chat/completions" else b'{"turn_id": "x' + raw + b'", "kind": "comment", "text": "t"}')
    openai_error(post(gateway, path, body), 400)
    still_serving_and_recording(gateway, data_dir, f"after {raw!r} to {path}")


def test_a_seed_beyond_64_bits_is_a_400_naming_it(gateway: Uvicorn, data_dir: Path) -> None:
    assert openai_error(chat(gateway, seed=2**64), 400)["param"] == "seed"
    assert chat(gateway, seed=2**63 - 1).status_code == 200
    still_serving_and_recording(gateway, data_dir, "after a huge seed")


def test_a_vanishing_temperature_samples_greedily(gateway: Uvicorn) -> None:
    """Dividing the logits by 1e-300 overflowed (a 502); such a temperature is greedy decoding."""
    tiny = chat(gateway, "what now?", temperature=1e-300)
    assert tiny.status_code == 200, tiny.text
    greedy = chat(gateway, "what now?", temperature=0)
    assert tiny.json()["choices"][0]["message"] == greedy.json()["choices"][0]["message"]


def test_a_huge_stop_list_is_refused_before_any_work(gateway: Uvicorn, data_dir: Path) -> None:
    """200,000 stop strings were searched for in every piece of the answer, blocking the event loop ~10 s."""
    assert openai_error(chat(gateway, stop=["a"] * 200_000), 400)["param"] == "stop"
    assert openai_error(chat(gateway, stop="x" * 5000), 400)["param"] == "stop"
    assert chat(gateway, stop=["a", "b", "c", "d"]).status_code == 200
    still_serving_and_recording(gateway, data_dir, "after a huge stop list")


def test_oversized_lists_and_feedback_are_refused_naming_the_field(gateway: Uvicorn, data_dir: Path) -> None:
    many = [{"role": "user", "content": "hi"}] * 4097
    assert openai_error(post(gateway, "/v1/chat/completions", json.dumps(
        {"model": "tiny", "messages": many}).encode()), 400)["param"] == "messages"
    tools = [{"type": "function", "function": {"name": f"f{n}"}} for n in range(129)]
    assert openai_error(chat(gateway, tools=tools), 400)["param"] == "tools"
    turn_id = chat(gateway).json()["id"]
    for feedback, field in [({"kind": "comment", "text": "x" * (64 * 1024 + 1)}, "text"),
                            ({"kind": "tool_result", "tool": {"name": "pytest", "output": "x" * (64 * 1024 + 1)}},
                             "tool"),
                            ({"kind": "rating", "value": float("inf")}, "value")]:
        body = json.dumps({"turn_id": turn_id, **feedback}).encode()
        assert openai_error(post(gateway, "/v1/feedback", body), 400)["param"] == field
    still_serving_and_recording(gateway, data_dir, "after oversized requests")


def test_a_tenant_over_its_share_gets_429s_with_retry_after_and_others_are_served(
    tiny_model: Path, tmp_path: Path
) -> None:
    settings = Settings(data_dir=tmp_path, engine="embedded", model=str(tiny_model),
                        api_keys="sk-acme:acme,sk-globex:globex", tenant_requests_per_minute=2)
    with Uvicorn(create_app(settings)) as gateway:
        def ask(key: str, stream: bool = False) -> httpx.Response:
            body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                    "stream": stream}
            return httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=60,
                              headers={"Authorization": f"Bearer {key}"})

        assert [ask("sk-acme").status_code, ask("sk-acme", stream=True).status_code] == [200, 200]
        for refused in (ask("sk-acme"), ask("sk-acme", stream=True)):
            assert openai_error_of_type(refused, 429, "rate_limit_error")["code"] == "rate_limit_exceeded"
            assert 1 <= int(refused.headers["Retry-After"]) <= 30  # a request refills every 30 s
        assert ask("sk-globex").status_code == 200  # another tenant's share is its own


def openai_error_of_type(response: httpx.Response, status: int, kind: str) -> dict[str, object]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == kind
    return error


def test_a_request_slot_is_released_however_the_request_ended(tiny_model: Path, tmp_path: Path) -> None:
    """One request at a time: each kind of ending (answered, streamed, refused by the router, the client
    leaving mid-stream) must give the slot back, or the tenant would be locked out for good."""
    settings = Settings(data_dir=tmp_path, engine="embedded", model=str(tiny_model), api_keys="sk-acme:acme",
                        tenant_concurrent_requests=1)
    headers = {"Authorization": "Bearer sk-acme"}
    with Uvicorn(create_app(settings)) as gateway:
        def ask(model: str = "tiny", stream: bool = False) -> int:
            body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                    "stream": stream}
            return httpx.post(f"{gateway.url}/v1/chat/completions", json=body, headers=headers,
                              timeout=60).status_code

        assert [ask(), ask(stream=True), ask(model="no-such-model")] == [200, 200, 404]
        body = {"model": "tiny", "messages": [{"role": "user", "content": "go on"}], "max_tokens": 200,
                "stream": True}
        with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, headers=headers,
                          timeout=60) as left:
            next(left.iter_raw())  # the first chunk, then the client leaves
        assert eventually(ask, "the slot to come back", until=lambda status: status == 200) == 200


def test_a_body_that_is_not_json_is_a_415(gateway: Uvicorn) -> None:
    """A browser sends a cross-site form or text/plain without asking first; JSON it cannot."""
    body = b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}'
    for path in ("/v1/chat/completions", "/v1/feedback"):
        for kind in ("text/plain", "application/x-www-form-urlencoded", None):
            headers = {"Authorization": "Bearer sk-acme", **({"Content-Type": kind} if kind else {})}
            refused = httpx.post(f"{gateway.url}{path}", content=body, headers=headers, timeout=60)
            assert openai_error(refused, 415)["message"] == "send the body as JSON: Content-Type: application/json"
    utf8 = httpx.post(f"{gateway.url}/v1/chat/completions", content=body,
                      headers={"Authorization": "Bearer sk-acme", "Content-Type": "application/json; charset=utf-8"},
                      timeout=60)
    assert utf8.status_code == 200


def test_an_open_gateway_answers_only_requests_to_a_loopback_name(tiny_model: Path, tmp_path: Path) -> None:
    """Without keys the gateway is open on loopback; a page whose name resolves to 127.0.0.1 (DNS rebinding)
    must not reach it."""
    with Uvicorn(create_app(Settings(data_dir=tmp_path, engine="embedded", model=str(tiny_model)))) as gateway:
        for host, status in (("evil.example", 403), (f"evil.example:{gateway.port}", 403),
                             (f"127.0.0.1:{gateway.port}", 200), (f"localhost:{gateway.port}", 200)):
            answer = httpx.get(f"{gateway.url}/v1/models", headers={"Host": host}, timeout=60)
            assert answer.status_code == status, (host, answer.text)


def test_a_gateway_on_a_public_address_is_never_open_and_takes_the_stores_keys(tiny_model: Path,
                                                                               tmp_path: Path) -> None:
    """Bound to every address with no key in Settings, the gateway starts, refuses everyone until a key is
    created in the store, then takes that key (as docker-compose and Kubernetes run it)."""
    settings = Settings(data_dir=tmp_path, engine="embedded", model=str(tiny_model), host="0.0.0.0")
    with Uvicorn(create_app(settings)) as gateway:
        models = f"{gateway.url}/v1/models"
        assert httpx.get(models, timeout=60).status_code == 401
        store = Store.from_settings(settings)
        key = create_key(store, "acme")
        store.close()
        assert httpx.get(models, headers={"Authorization": f"Bearer {key}"}, timeout=60).status_code == 200
        assert httpx.get(models, timeout=60).status_code == 401


def test_feedback_beyond_the_cap_per_turn_is_refused_and_a_retry_is_not(gateway: Uvicorn) -> None:
    turn_id = chat(gateway).json()["id"]

    def rate(key: str) -> httpx.Response:
        body = json.dumps({"turn_id": turn_id, "kind": "rating", "value": 1.0, "idempotency_key": key}).encode()
        return post(gateway, "/v1/feedback", body)

    assert {rate(f"k{n}").status_code for n in range(MAX_FEEDBACK_PER_TURN)} == {200}
    stored = f"{gateway.url}/v1/turns/{turn_id}"
    eventually(lambda: httpx.get(stored, headers=KEY, timeout=60).json().get("feedback", []),
               "the feedback to be stored", until=lambda found: len(found) == MAX_FEEDBACK_PER_TURN)
    refused = openai_error_of_type(rate("one more"), 409, "invalid_request_error")
    assert refused["code"] == "feedback_limit_reached" and refused["param"] == "turn_id"
    assert rate("k3").status_code == 200  # a retry of feedback that was kept


@pytest.mark.parametrize("shown", [False, True])
def test_metrics_and_api_docs_are_served_only_when_the_settings_say(tiny_model: Path, tmp_path: Path,
                                                                   shown: bool) -> None:
    settings = Settings(data_dir=tmp_path, engine="embedded", model=str(tiny_model), api_keys="sk-acme:acme",
                        metrics=shown, api_docs=shown)
    with Uvicorn(create_app(settings)) as gateway:
        statuses = {path: httpx.get(f"{gateway.url}{path}", timeout=60).status_code
                    for path in ("/metrics", "/docs", "/redoc", "/openapi.json")}
    assert statuses == dict.fromkeys(statuses, 200 if shown else 404)


SURROGATE = "\ud800"
CALL = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": "{}"}}
CHAT_STRINGS: dict[str, object] = {
    "model": {"model": SURROGATE},
    "content": {"messages": [{"role": "user", "content": SURROGATE}]},
    "content part": {"messages": [{"role": "user", "content": [{"type": "text", "text": SURROGATE}]}]},
    "name": {"messages": [{"role": "user", "content": "hi", "name": SURROGATE}]},
    "tool call id": {"messages": [{"role": "user", "content": "add"}, {"role": "assistant", "tool_calls": [
        {**CALL, "id": SURROGATE}]}, {"role": "tool", "tool_call_id": SURROGATE, "content": "2"}]},
    "tool call arguments": {"messages": [{"role": "user", "content": "add"}, {"role": "assistant", "tool_calls": [
        {**CALL, "function": {"name": "add", "arguments": SURROGATE}}]}, {"role": "tool", "tool_call_id": "call_1",
                                                                           "content": "2"}]},
    "tool description": {"tools": [{"type": "function", "function": {"name": "add", "description": SURROGATE}}]},
    "tool_choice": {"tool_choice": SURROGATE},
    "stop": {"stop": SURROGATE},
    "stop list": {"stop": ["x", SURROGATE]},
    "user": {"user": SURROGATE},
    "unknown field": {"metadata": {"note": SURROGATE}},
}
FEEDBACK_STRINGS: dict[str, dict[str, object]] = {
    "idempotency_key": {"idempotency_key": SURROGATE},
    "tool name": {"kind": "tool_result", "tool": {"name": SURROGATE, "exit_code": 0}},
    "tool output": {"kind": "tool_result", "tool": {"name": "pytest", "output": SURROGATE}},
    "tool call id": {"kind": "tool_result", "tool": {"name": "pytest", "call_id": SURROGATE}},
}


@pytest.mark.parametrize("field", sorted(CHAT_STRINGS))
def test_a_lone_surrogate_in_any_string_of_a_chat_request_is_a_400(gateway: Uvicorn, field: str) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            **CHAT_STRINGS[field]}  # type: ignore[dict-item]
    openai_error(post(gateway, "/v1/chat/completions", json.dumps(body).encode()), 400)


@pytest.mark.parametrize("field", sorted(FEEDBACK_STRINGS))
def test_a_lone_surrogate_in_any_string_of_feedback_is_a_400(gateway: Uvicorn, field: str) -> None:
    turn_id = chat(gateway).json()["id"]
    body = {"turn_id": turn_id, "kind": "comment", "text": "fine", **FEEDBACK_STRINGS[field]}
    openai_error(post(gateway, "/v1/feedback", json.dumps(body).encode()), 400)


@pytest.mark.parametrize("method, path", [("GET", "/v1/turns/"), ("DELETE", "/v1/sessions/")])
@pytest.mark.parametrize("raw", ["%ED%A0%80", "%FF", "%C3"])
def test_a_path_that_is_not_utf8_is_a_4xx(gateway: Uvicorn, data_dir: Path, method: str, path: str,
                                          raw: str) -> None:
    answered = httpx.request(method, f"{gateway.url}{path}x{raw}y", headers=KEY, timeout=60)
    assert 400 <= answered.status_code < 500, answered.text
    assert set(answered.json()["error"]) == {"message", "type", "param", "code"}
    still_serving_and_recording(gateway, data_dir, f"after {raw} in {path}")
