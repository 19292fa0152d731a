"""The gateway as clients see it: the real openai SDK against real uvicorn, in front of an upstream."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from gateway.app import create_app
from nextturn.settings import Settings

from support.event_logs import recorded
from support.eventually import eventually
from support.services import Uvicorn
from support.upstream import CALLS, MODEL, TALKING


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gateway")


@pytest.fixture(scope="module")
def gateway(upstream: Uvicorn, data_dir: Path) -> Iterator[Uvicorn]:
    settings = Settings(data_dir=data_dir, engine="openai", upstream_url=f"{upstream.url}/v1", model=MODEL,
                        api_keys="sk-acme:acme,sk-globex:globex")
    with Uvicorn(create_app(settings)) as server:
        yield server


def test_a_completion_is_answered_and_recorded_under_its_id(client: openai.OpenAI, data_dir: Path) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "hello there"}], temperature=0.5, seed=7)
    completion = raw.parse()
    assert completion.choices[0].message.content == "echo: hello there"
    assert completion.id.startswith("chatcmpl-")
    assert raw.headers["X-Nextturn-Adapter"] == "base"
    turn = recorded(data_dir, completion.id)
    assert (turn.tenant, turn.status, turn.parent_turn_id) == ("acme", "ok", None)
    assert turn.response is not None and turn.response.content == "echo: hello there"
    assert (turn.params.temperature, turn.params.seed) == (0.5, 7)


def test_a_stream_arrives_in_pieces_and_is_recorded_whole(client: openai.OpenAI, data_dir: Path) -> None:
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "one two three four"}], stream=True)
    pieces, turn_id, finish = [], None, None
    for chunk in stream:
        turn_id = chunk.id
        pieces.append(chunk.choices[0].delta.content or "")
        finish = chunk.choices[0].finish_reason or finish
    assert len([p for p in pieces if p]) == 5  # "echo:" and four words, one chunk each
    assert "".join(pieces) == "echo: one two three four"
    assert finish == "stop"
    assert recorded(data_dir, turn_id).response.content == "echo: one two three four"  # type: ignore[union-attr,arg-type]


@pytest.mark.parametrize("stream", [False, True])
def test_a_conversation_with_a_parallel_tool_call_links_itself(
    client: openai.OpenAI, data_dir: Path, stream: bool
) -> None:
    messages: list[dict] = [{"role": "system", "content": "You run tests."},
                            {"role": "user", "content": f"run the tools (stream={stream})"}]

    def ask() -> tuple[str, dict]:
        if not stream:
            completion = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS)
            return completion.id, completion.choices[0].message.model_dump(exclude_none=True)
        content, calls, turn_id = "", {}, ""
        for chunk in client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, stream=True):
            turn_id, delta = chunk.id, chunk.choices[0].delta
            content += delta.content or ""
            for call in delta.tool_calls or []:
                into = calls.setdefault(call.index, {"id": call.id, "type": "function",
                                                     "function": {"name": "", "arguments": ""}})
                into["function"]["name"] += call.function.name or ""
                into["function"]["arguments"] += call.function.arguments or ""
        message = {"role": "assistant", "content": content or None}
        return turn_id, message | ({"tool_calls": list(calls.values())} if calls else {})

    first_id, first = ask()
    assert [call["function"] for call in first["tool_calls"]] == [call["function"] for call in CALLS]
    messages += [first, {"role": "tool", "tool_call_id": "call_a", "content": "3 passed"},
                 {"role": "tool", "tool_call_id": "call_b", "content": "1 failed"}]
    second_id, second = ask()
    assert second["content"] == "results: 3 passed | 1 failed"
    messages += [second, {"role": "user", "content": "No, I meant only b."}]
    third_id, third = ask()
    messages += [third, {"role": "user", "content": "Thanks!"}]
    fourth_id, _ = ask()

    turns = [recorded(data_dir, turn_id) for turn_id in (first_id, second_id, third_id, fourth_id)]
    assert [t.parent_turn_id for t in turns] == [None, first_id, second_id, third_id]
    assert len({t.session_id for t in turns}) == 1
    assert [c.function.arguments for c in turns[0].response.tool_calls] == ['{"path": "a"}', '{"path": "b"}']  # type: ignore[union-attr]


TOOLS = [{"type": "function", "function": {"name": "pytest", "parameters": {"type": "object"}}}]


def test_another_tenant_never_continues_a_conversation(gateway: Uvicorn, data_dir: Path) -> None:
    question = [{"role": "user", "content": "shared words"}]
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="sk-acme", max_retries=0) as acme, \
            openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="sk-globex", max_retries=0) as globex:
        answer = acme.chat.completions.create(model=MODEL, messages=question)
        follow_up = [*question, {"role": "assistant", "content": answer.choices[0].message.content},
                     {"role": "user", "content": "and?"}]
        theirs = globex.chat.completions.create(model=MODEL, messages=follow_up)
    turn = recorded(data_dir, theirs.id)
    assert (turn.tenant, turn.parent_turn_id) == ("globex", None)


def test_missing_or_wrong_keys_are_refused(gateway: Uvicorn) -> None:
    for key in ("", "sk-wrong"):
        with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key or "x", max_retries=0,
                           default_headers={"Authorization": ""} if not key else None) as client:
            with pytest.raises(openai.AuthenticationError) as refused:
                client.models.list()
            assert refused.value.status_code == 401
            assert refused.value.body["type"] == "invalid_request_error"  # type: ignore[index]


def test_bad_requests_get_clear_openai_errors(client: openai.OpenAI, gateway: Uvicorn) -> None:
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=MODEL, messages=[])
    with pytest.raises(openai.BadRequestError, match="n"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2)
    with pytest.raises(openai.BadRequestError, match="JSON Schema of type 'object'"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       tools=[{"type": "function", "function": {"name": "f",
                                                                                "parameters": {"type": "string"}}}])
    malformed = httpx.post(f"{gateway.url}/v1/chat/completions", content=b"{not json",
                           headers={"Authorization": "Bearer sk-acme", "Content-Type": "application/json"})
    assert malformed.status_code == 400
    assert malformed.json()["error"]["message"] == "the request body is not valid JSON"
    wrong_method = httpx.get(f"{gateway.url}/v1/chat/completions", headers={"Authorization": "Bearer sk-acme"})
    assert (wrong_method.status_code, wrong_method.headers["allow"]) == (405, "POST")
    assert wrong_method.json()["error"]["type"] == "invalid_request_error"


def test_an_upstream_failure_is_a_clean_error_and_a_failed_turn(client: openai.OpenAI, data_dir: Path) -> None:
    with pytest.raises(openai.APIStatusError) as failed:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "please fail"}])
    assert failed.value.status_code == 502
    assert "upstream exploded" in failed.value.message

    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "break it"}],
                                            stream=True)
    with pytest.raises(openai.APIError, match="mid-stream"):
        for chunk in stream:
            turn_id = chunk.id
    turn = recorded(data_dir, turn_id)
    assert turn.status == "failed" and "mid-stream" in (turn.error or "")


def test_models_and_health(client: openai.OpenAI, gateway: Uvicorn) -> None:
    assert [model.id for model in client.models.list()] == [MODEL]
    assert httpx.get(f"{gateway.url}/healthz").json() == {"status": "ok"}  # publisher and recorder alive
    assert json.loads(httpx.get(f"{gateway.url}/nope").text)["error"]["type"] == "invalid_request_error"


def api(gateway: Uvicorn, method: str, path: str, key: str = "sk-acme", **kwargs: object) -> httpx.Response:
    return httpx.request(method, f"{gateway.url}{path}", headers={"Authorization": f"Bearer {key}"},
                         timeout=10, **kwargs)  # type: ignore[arg-type]


def stored_turn(gateway: Uvicorn, turn_id: str, until: str = "", timeout_s: float = 20) -> dict:
    """GET /v1/turns/{id} once the recorder has stored the turn (and ``until`` holds, e.g. feedback)."""
    def found() -> dict | None:
        response = api(gateway, "GET", f"/v1/turns/{turn_id}")
        return response.json() if response.status_code == 200 and (not until or response.json()[until]) else None

    return eventually(found, f"{turn_id} to be stored", timeout_s=timeout_s, interval_s=0.1)


def test_feedback_reaches_the_turn_once_even_when_retried(client: openai.OpenAI, gateway: Uvicorn) -> None:
    completion = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "rate me"}])
    rating = {"turn_id": completion.id, "kind": "rating", "value": 1.0}
    first = httpx.post(f"{gateway.url}/v1/feedback", json=rating,
                       headers={"Authorization": "Bearer sk-acme", "Idempotency-Key": "retry-1"})
    again = httpx.post(f"{gateway.url}/v1/feedback", json=rating,
                       headers={"Authorization": "Bearer sk-acme", "Idempotency-Key": "retry-1"})
    assert first.status_code == again.status_code == 200
    assert first.json()["id"] == again.json()["id"]
    tool = {"turn_id": completion.id, "kind": "tool_result",
            "tool": {"name": "pytest", "call_id": "call_a", "exit_code": 1, "passed": False, "output": "1 failed"}}
    assert api(gateway, "POST", "/v1/feedback", json=tool).status_code == 200

    turn = eventually(lambda: stored_turn(gateway, completion.id), "both pieces of feedback",
                      until=lambda t: len(t["feedback"]) >= 2)
    assert sorted(f["kind"] for f in turn["feedback"]) == ["rating", "tool_result"]  # the retry counted once
    assert (turn["id"], turn["status"], turn["adapter_version"]) == (completion.id, "ok", "base")
    assert turn["response"]["content"] == "echo: rate me" and turn["signals"] == []


def test_another_tenants_turn_is_not_found_exactly_like_a_missing_one(
    client: openai.OpenAI, gateway: Uvicorn
) -> None:
    completion = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "mine"}])
    stored_turn(gateway, completion.id)
    theirs = api(gateway, "POST", "/v1/feedback", key="sk-globex",
                 json={"turn_id": completion.id, "kind": "rating", "value": -1})
    missing = api(gateway, "POST", "/v1/feedback", json={"turn_id": "chatcmpl-nope", "kind": "rating", "value": -1})
    assert theirs.status_code == missing.status_code == 404
    assert theirs.json()["error"]["code"] == missing.json()["error"]["code"] == "turn_not_found"
    assert api(gateway, "GET", f"/v1/turns/{completion.id}", key="sk-globex").status_code == 404


def test_invalid_feedback_is_a_clear_400(client: openai.OpenAI, gateway: Uvicorn) -> None:
    completion = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    no_value = api(gateway, "POST", "/v1/feedback", json={"turn_id": completion.id, "kind": "rating"})
    assert no_value.status_code == 400 and "needs `value`" in no_value.json()["error"]["message"]
    too_big = api(gateway, "POST", "/v1/feedback", json={"turn_id": completion.id, "kind": "rating", "value": 5})
    assert too_big.status_code == 400 and too_big.json()["error"]["param"] == "value"
    unknown_kind = api(gateway, "POST", "/v1/feedback", json={"turn_id": completion.id, "kind": "vibes"})
    assert unknown_kind.status_code == 400


@pytest.mark.parametrize("stream", [False, True])
def test_an_upstream_reply_that_is_not_a_completion_is_a_clean_error_and_a_failed_turn(
    client: openai.OpenAI, gateway: Uvicorn, data_dir: Path, stream: bool
) -> None:
    asked = f"garble it {stream}"
    body = {"model": MODEL, "messages": [{"role": "user", "content": asked}], "stream": stream}
    response = api(gateway, "POST", "/v1/chat/completions", json=body)
    if stream:
        assert response.status_code == 200
        frames = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
        assert "not a completion" in json.loads(frames[-1])["error"]["message"]  # the stream ends with an error
    else:
        assert response.status_code == 502
        assert "not a completion" in response.json()["error"]["message"]
    turn = recorded(data_dir, "", asked=asked)
    assert turn.status == "failed" and "not a completion" in (turn.error or "")


def test_a_slow_upstream_is_a_504_and_a_failed_turn_and_a_killed_recorder_is_restarted(
    upstream: Uvicorn, tmp_path: Path
) -> None:
    settings = Settings(data_dir=tmp_path, engine="openai", upstream_url=f"{upstream.url}/v1", model=MODEL,
                        engine_read_timeout_s=0.3)
    app = create_app(settings)
    with Uvicorn(app) as gateway, openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="-", max_retries=0) as client:
        with pytest.raises(openai.APIStatusError) as slow:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "take your time"}])
        assert slow.value.status_code == 504
        turn = recorded(tmp_path, None, asked="take your time")
        assert turn.status == "failed" and "did not answer in time" in (turn.error or "")

        recorder = next(part for part in app.state.supervisor.parts if part.name == "recorder")
        os.kill(recorder.pid, signal.SIGKILL)
        health = eventually(lambda: httpx.get(f"{gateway.url}/healthz"), "/healthz to notice",
                            until=lambda r: r.status_code != 200)
        assert (health.status_code, health.json()) == (503, {"status": "degraded", "dead": "recorder"})
        health = eventually(lambda: httpx.get(f"{gateway.url}/healthz"), "the recorder to be restarted",
                            until=lambda r: r.status_code == 200)
        assert health.json() == {"status": "ok", "restarts": {"recorder": 1}}
        metrics = httpx.get(f"{gateway.url}/metrics").text
        assert 'nextturn_gateway_restarts_total{part="recorder"} 1.0' in metrics
        after = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "still there?"}])
        stored_turn(gateway, after.id)  # the new recorder stores what is served now


def test_a_client_that_stops_reading_a_stream_frees_its_generation_after_the_stall_timeout(
    upstream: Uvicorn, tmp_path: Path
) -> None:
    """A client may keep its connection open and read nothing: once the connection's buffers are full, the
    gateway's sends wait, and without a timeout the model server's stream would be held for ever."""
    settings = Settings(data_dir=tmp_path, engine="openai", upstream_url=f"{upstream.url}/v1", model=MODEL,
                        stream_stall_timeout_s=1.0)
    with Uvicorn(create_app(settings)) as gateway, socket.socket() as stalled:
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        host, port = gateway.url.removeprefix("http://").split(":")
        stalled.connect((host, int(port)))
        body = json.dumps({"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "keep talking"}]})
        stalled.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(body)}\r\n\r\n{body}".encode())  # and then reads nothing
        turn = recorded(tmp_path, None, asked="keep talking", timeout_s=60)
        assert (turn.status, turn.cause, turn.error) == ("failed", "client", "the client left before the stream ended")
        eventually(lambda: TALKING["open"] == 0, "the upstream's endless stream to be closed")
        assert httpx.get(f"{gateway.url}/healthz").json() == {"status": "ok"}


def test_a_conversation_continues_on_another_replica_and_after_a_restart(upstream: Uvicorn, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, engine="openai", upstream_url=f"{upstream.url}/v1", model=MODEL)

    def ask(gateway: Uvicorn, messages: list[dict]) -> tuple[str, dict]:
        with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="-", max_retries=0) as client:
            completion = client.chat.completions.create(model=MODEL, messages=messages)  # type: ignore[arg-type]
        stored_turn(gateway, completion.id)  # in the shared store: what another replica can look up
        return completion.id, {"role": "assistant", "content": completion.choices[0].message.content}

    history: list[dict] = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "first"}]
    with Uvicorn(create_app(settings)) as one, Uvicorn(create_app(settings)) as two:
        first, answer = ask(one, history)
        history += [answer, {"role": "user", "content": "second"}]
        second, answer = ask(two, history)  # a replica that never served `first`
    history += [answer, {"role": "user", "content": "third"}]
    with Uvicorn(create_app(settings)) as restarted:
        third, _ = ask(restarted, history)

    turns = [recorded(tmp_path, turn_id) for turn_id in (first, second, third)]
    assert [turn.parent_turn_id for turn in turns] == [None, first, second]
    assert len({turn.session_id for turn in turns}) == 1


def test_a_store_that_breaks_is_a_503_on_admin_routes_and_the_deployment_watcher_survives_it(
    upstream: Uvicorn, tmp_path: Path
) -> None:
    settings = Settings(data_dir=tmp_path, engine="openai", upstream_url=f"{upstream.url}/v1", model=MODEL,
                        admin_key="sk-admin", rollout_check_interval_s=0.1)
    with Uvicorn(create_app(settings)) as gateway:
        admin = {"Authorization": "Bearer sk-admin"}
        assert httpx.get(f"{gateway.url}/v1/admin/rollout", headers=admin).json()["stable"] == "base"
        with sqlite3.connect(tmp_path / "nextturn.db") as db:
            db.execute("ALTER TABLE deployments RENAME TO deployments_away")
        broken = httpx.get(f"{gateway.url}/v1/admin/rollout", headers=admin)
        assert broken.status_code == 503 and broken.json()["error"]["type"] == "api_error"
        assert "the store is unavailable" in broken.json()["error"]["message"]
        time.sleep(0.5)  # several of the watcher's checks fail meanwhile
        assert httpx.get(f"{gateway.url}/healthz").status_code == 200
        with sqlite3.connect(tmp_path / "nextturn.db") as db:
            db.execute("ALTER TABLE deployments_away RENAME TO deployments")
        assert httpx.get(f"{gateway.url}/v1/admin/rollout", headers=admin).status_code == 200
