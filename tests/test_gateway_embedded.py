"""The gateway on the embedded engine, driven by the openai SDK over real uvicorn: adapters swap under load."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import create_app
from nextturn.flaws import flaw
from nextturn.settings import Settings

from support.event_logs import recorded
from support.rolling import swap_under_load
from support.services import Uvicorn

ADMIN = {"Authorization": "Bearer sk-admin"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("embedded")


@pytest.fixture(scope="module")
def gateway(tiny_model: Path, tiny_adapters: dict[str, Path], data_dir: Path) -> Iterator[Uvicorn]:
    settings = Settings(data_dir=data_dir, engine="embedded", model=str(tiny_model), api_keys="sk-acme:acme",
                        admin_key="sk-admin", max_request_bytes=64 * 1024,
                        adapter_load_dirs=[tiny_adapters["a1"].parent])
    with Uvicorn(create_app(settings)) as server:
        yield server


def test_streamed_and_whole_answers_are_recorded_with_their_tokens(client: openai.OpenAI, data_dir: Path) -> None:
    whole = client.chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=12, seed=3)
    completion = whole.parse()
    assert whole.headers["X-Nextturn-Adapter"] == "base"
    turn = recorded(data_dir, completion.id)
    assert turn.response_logprobs is not None and len(turn.response_token_ids) == len(turn.response_logprobs)
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (
        len(turn.prompt_token_ids), len(turn.response_token_ids))
    assert turn.response is not None and turn.response.content == completion.choices[0].message.content

    pieces, turn_id = [], ""
    for chunk in client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                                max_tokens=12, seed=3, stream=True):
        turn_id = chunk.id
        pieces.append(chunk.choices[0].delta.content or "")
    streamed = recorded(data_dir, turn_id)
    assert streamed.response_token_ids == turn.response_token_ids  # same seed, same tokens, streamed or not
    assert "".join(pieces) == (streamed.response.content or "")  # type: ignore[union-attr]


def test_versions_swap_under_load_without_a_failed_request(
    client: openai.OpenAI, gateway: Uvicorn, tiny_adapters: dict[str, Path], data_dir: Path
) -> None:
    served, failures = swap_under_load(gateway.url, client, data_dir, "tiny", {1: tiny_adapters["a1"],
                                                                               2: tiny_adapters["a2"]})
    assert failures == []
    assert set(served) == {"base", "default-v1", "default-v2"}
    assert httpx.get(f"{gateway.url}/v1/admin/adapters", headers=ADMIN).json() == {
        "serving": "default-v1", "adapters": ["default-v1"]}


def test_admin_routes_need_the_admin_key_and_say_what_is_wrong(gateway: Uvicorn, tiny_adapters: dict[str, Path],
                                                                tmp_path: Path) -> None:
    url = f"{gateway.url}/v1/admin/adapters"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer sk-acme"}).status_code == 403
    assert httpx.get(url, headers={"Authorization": "Bearer sk-nope"}).status_code == 401
    missing = str(tiny_adapters["a1"].parent / "missing")
    bad = httpx.post(url, headers=ADMIN, json={"version": "v7", "path": missing}, timeout=30)
    assert bad.status_code == 400 and "cannot load the adapter" in bad.json()["error"]["message"]
    # Only from the adapters directory or NEXTTURN_ADAPTER_LOAD_DIRS, and never a published version's name.
    shutil.copytree(tiny_adapters["a1"], tmp_path / "adapter")  # a real adapter, but not where they may come from
    elsewhere = httpx.post(url, headers=ADMIN, json={"version": "v7", "path": str(tmp_path / "adapter")})
    assert elsewhere.status_code == 400 and elsewhere.json()["error"]["param"] == "path"
    escaping = httpx.post(url, headers=ADMIN, json={"version": "v7", "path": f"{tiny_adapters['a1']}/../../.."})
    assert escaping.status_code == 400 and escaping.json()["error"]["param"] == "path"
    claimed = httpx.post(url, headers=ADMIN, json={"version": "default-v9", "path": str(tiny_adapters["a1"])})
    assert claimed.status_code == 400 and claimed.json()["error"]["param"] == "version"
    assert httpx.post(url, headers=ADMIN, json={"version": "v8", "path": str(tiny_adapters["a1"])},
                      timeout=30).status_code == 201
    assert httpx.post(url, headers=ADMIN, json={"version": "v8", "path": str(tiny_adapters["a1"])},
                      timeout=30).status_code == 400  # already loaded
    serving = httpx.delete(f"{url}/base", headers=ADMIN)
    assert serving.status_code == 409 and "part of a deployment" in serving.json()["error"]["message"]
    assert httpx.delete(f"{url}/v8", headers=ADMIN, timeout=60).status_code == 200
    assert httpx.delete(f"{url}/v8", headers=ADMIN).status_code == 404


def test_a_version_is_a_model_a_client_can_pin(client: openai.OpenAI, gateway: Uvicorn,
                                               tiny_adapters: dict[str, Path], data_dir: Path) -> None:
    httpx.post(f"{gateway.url}/v1/admin/adapters", headers=ADMIN, timeout=30,
               json={"version": "pinned", "path": str(tiny_adapters["a2"])}).raise_for_status()
    try:
        models = [model.id for model in client.models.list()]
        assert models[0] == "tiny" and "pinned" in models
        raw = client.chat.completions.with_raw_response.create(
            model="pinned", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert raw.headers["X-Nextturn-Adapter"] == "pinned"
        # A pinned turn is recorded as such: the rollout does not count it as evidence for a version.
        assert recorded(data_dir, raw.parse().id).pinned
        routed = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=3)
        assert not recorded(data_dir, routed.id).pinned
    finally:
        httpx.delete(f"{gateway.url}/v1/admin/adapters/pinned", headers=ADMIN, timeout=60).raise_for_status()


def test_too_many_tokens_and_too_large_bodies_are_clear_errors(client: openai.OpenAI, gateway: Uvicorn,
                                                               data_dir: Path) -> None:
    asked = "a request longer than the context"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": asked}], max_tokens=5000)
    assert too_long.value.code == "context_length_exceeded"
    turn = recorded(data_dir, None, asked=asked)  # failed by the client's doing: no flaw of the version
    assert (turn.status, turn.cause, flaw(turn)) == ("failed", "client", None)
    with pytest.raises(openai.BadRequestError, match="context"):  # a stream is refused before it starts
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5000,
                                       stream=True)
    big = "x" * (65 * 1024)  # the gateway above allows 64 KiB (NEXTTURN_MAX_REQUEST_BYTES)
    with pytest.raises(openai.APIStatusError) as too_large:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": big}])
    assert too_large.value.status_code == 413 and "NEXTTURN_MAX_REQUEST_BYTES" in too_large.value.message

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit is counted as the body arrives
        yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
        for _ in range(70):
            yield b"y" * 1024
        yield b'"}]}'

    response = httpx.post(f"{gateway.url}/v1/chat/completions", content=chunked(),
                          headers={"Authorization": "Bearer sk-acme", "Content-Type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["type"] == "invalid_request_error"


def test_metrics_count_requests_turns_and_tokens_by_adapter(client: openai.OpenAI, gateway: Uvicorn) -> None:
    def samples() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = httpx.get(f"{gateway.url}/metrics").text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    serving = httpx.get(f"{gateway.url}/v1/admin/adapters", headers=ADMIN).json()["serving"]
    before = samples()
    for _ in range(3):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "count me"}], max_tokens=4)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    after = samples()

    def grew(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert grew("nextturn_turns_total", adapter=serving, status="ok") == 3
    assert grew("nextturn_turn_seconds_count", adapter=serving, stream="false") == 3
    assert 3 <= grew("nextturn_tokens_total", adapter=serving, kind="completion") <= 12
    assert grew("nextturn_http_requests_total", route="/v1/chat/completions", method="POST", status="200") == 3
    assert grew("nextturn_http_requests_total", route="/v1/chat/completions", method="POST", status="404") == 1
    assert after[("nextturn_turns_in_flight", ())] == 0
    assert ("nextturn_spool_depth", ()) in after and ("nextturn_publish_queue_depth", ()) in after


def test_a_client_that_leaves_a_stream_stops_its_generation_and_the_turn_is_recorded_failed(
    gateway: Uvicorn, data_dir: Path
) -> None:
    asked = "a long answer I will not wait for"
    body = {"model": "tiny", "messages": [{"role": "user", "content": asked}], "max_tokens": 400,
            "temperature": 0, "stream": True}  # greedy: this model runs to max_tokens without an end token
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body,
                      headers={"Authorization": "Bearer sk-acme"}) as response:
        assert response.status_code == 200
        next(response.iter_lines())  # the first chunk, then the connection closes
    turn = recorded(data_dir, None, asked=asked)
    assert turn.status == "failed" and turn.error == "the client left before the stream ended"
    assert turn.cause == "client" and flaw(turn) is None
    assert httpx.get(f"{gateway.url}/healthz").status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_a_reply_cut_inside_a_character_still_links_the_next_turn(client: openai.OpenAI, data_dir: Path,
                                                                  stream: bool) -> None:
    """``max_tokens`` can cut a reply inside a multi-byte character: the client sees U+FFFD, echoes it in the
    next request, and that request must continue the same session."""
    for seed in range(100):  # the tiny model writes such replies often; find one that ends in one
        asked = [{"role": "user", "content": f"tell me {seed} ü"}]
        if stream:
            chunks = list(client.chat.completions.create(model="tiny", messages=asked, max_tokens=7, seed=seed,
                                                         stream=True))  # type: ignore[arg-type]
            turn_id = chunks[0].id
            reply = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
        else:
            whole = client.chat.completions.create(model="tiny", messages=asked, max_tokens=7, seed=seed)  # type: ignore[arg-type]
            turn_id, reply = whole.id, whole.choices[0].message.content or ""
        if reply.endswith("\ufffd"):
            break
    else:
        raise AssertionError("no reply of the tiny model ended inside a character in 100 tries")
    following = client.chat.completions.create(model="tiny", max_tokens=2, messages=[  # type: ignore[arg-type]
        *asked, {"role": "assistant", "content": reply}, {"role": "user", "content": "and?"}])
    first, second = recorded(data_dir, turn_id), recorded(data_dir, following.id)
    assert first.response is not None and first.response.content == reply
    assert (second.parent_turn_id, second.session_id) == (turn_id, first.session_id)
