"""Real models' tool-call formats: Hermes/Qwen ``<tool_call>``, Llama 3 JSON, Mistral ``[TOOL_CALLS]`` and the
local models' own, each on a local model whose chat template writes it, streamed and whole."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import openai
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from gateway.app import build_engine, create_app
from gateway.engines import Delta, Generation
from gateway.engines.decoding import TextDecoder
from gateway.engines.embedded import EmbeddedEngine
from gateway.schemas import ChatCompletionRequest
from nextturn import events
from nextturn.local_models import init_model
from nextturn.settings import Settings
from nextturn.tool_formats import FORMATS, format_of

from support.adapters import taught_adapter
from support.services import Uvicorn

TOOLS = [{"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}
         for name in ("read_file", "run_tests")]
CALLS = [("read_file", {"path": "src/app.py"}), ("run_tests", {"only": "test_app", "verbose": True})]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny local model per format, its chat template writing calls that way."""
    root = tmp_path_factory.mktemp("format-models")
    return {name: init_model(root / name, size="tiny", seed=0, tool_format=name) for name in FORMATS}


def assistant_text(tokenizer: Any, message: events.ChatMessage) -> str:
    """What the template has the model write for ``message``: the text after the assistant's role marker."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "q"}, message.model_dump(exclude_none=True)],
                                             tokenize=False)
    text: str = rendered.split("<|assistant|>", 1)[1].removesuffix("<|end|>")
    return text


def with_calls(calls: list[tuple[str, dict[str, Any]]], content: str | None = None) -> events.ChatMessage:
    return events.ChatMessage(role="assistant", content=content, tool_calls=[
        events.ToolCall(id=f"call{i}abcd", function=events.ToolCallFunction(name=name, arguments=json.dumps(args)))
        for i, (name, args) in enumerate(calls)] or None)


def named(calls: list[events.ToolCall] | None) -> list[tuple[str, Any]]:
    return [(call.function.name, json.loads(call.function.arguments)) for call in calls or []]


def test_each_models_format_is_read_off_its_chat_template(models: dict[str, Path]) -> None:
    for name, model in models.items():
        found = format_of(AutoTokenizer.from_pretrained(model).chat_template)
        assert found is not None and found.name == name


names = st.text("abcdefgh_", min_size=1, max_size=8)
texts = st.text(st.characters(codec="utf-8", exclude_characters="<[{"), max_size=30)
calls = st.lists(st.tuples(names, st.dictionaries(names, st.integers() | texts, max_size=3)), max_size=3)


@pytest.mark.parametrize("name", list(FORMATS))
@settings(max_examples=40, deadline=None)
@given(content=texts, tool_calls=calls)
@example(content="\ufffd", tool_calls=[])  # a reply that ends in U+FFFD: held back while streaming, then released
def test_the_decoder_reads_back_what_each_template_writes(models: dict[str, Path], name: str, content: str,
                                                         tool_calls: list[tuple[str, dict[str, Any]]]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(models[name])
    if name == "llama3" and tool_calls:
        content = ""  # a Llama 3 answer is either text or calls
    message = with_calls(tool_calls, content or None)
    decoder = TextDecoder(tokenizer, calls=FORMATS[name])
    deltas = [delta for token in tokenizer(assistant_text(tokenizer, message), add_special_tokens=False)["input_ids"]
              for delta in decoder.feed(token)] + decoder.finish()
    read = decoder.message()
    assert (read.content, named(read.tool_calls)) == (message.content, named(message.tool_calls))
    if name in ("nextturn", "mistral"):  # the formats that carry the call's id
        assert [c.id for c in read.tool_calls or []] == [c.id for c in message.tool_calls or []]
    assert "".join(delta.content or "" for delta in deltas) == (content or "")
    streamed = [call for delta in deltas for call in delta.tool_calls or []]
    assert [(call["index"], call["function"]["name"]) for call in streamed] == [
        (i, call_name) for i, (call_name, _) in enumerate(tool_calls)]


def test_an_answer_that_only_looks_like_calls_stays_text(models: dict[str, Path]) -> None:
    """A Llama 3 answer that is JSON but no call, and a Mistral marker followed by no calls, reach the client
    as the text they are."""
    for name, text in (("llama3", '  {"answer": 42}'), ("mistral", "Sure [TOOL_CALLS] none"),
                       ("hermes", "<tool_call>\nnot json\n</tool_call> done")):
        tokenizer = AutoTokenizer.from_pretrained(models[name])
        decoder = TextDecoder(tokenizer, calls=FORMATS[name])
        deltas = [d for token in tokenizer(text, add_special_tokens=False)["input_ids"]
                  for d in decoder.feed(token)] + decoder.finish()
        assert decoder.message() == events.ChatMessage(role="assistant", content=text), name
        assert "".join(d.content or "" for d in deltas) == text


@pytest.fixture(scope="module")
def callers(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Per format, an adapter taught to answer with two parallel calls written the template's way."""
    root = tmp_path_factory.mktemp("callers")
    found = {}
    for name, model in models.items():
        answer = assistant_text(AutoTokenizer.from_pretrained(model), with_calls(CALLS))
        found[name] = taught_adapter(model, root / name, answer, steps=150, learning_rate=1e-2, tools=TOOLS)
    return found


@pytest.mark.slow  # each format's adapter is taught first (about a minute for the four)
@pytest.mark.parametrize("name", list(FORMATS))
def test_a_model_calls_tools_in_its_format_streamed_and_whole(models: dict[str, Path], callers: dict[str, Path],
                                                              name: str) -> None:
    """The embedded engine reads the format off the model's template; the answer's calls arrive as OpenAI
    tool_calls, whole and streamed, from the same sampled tokens."""
    results: dict[str, Any] = {}

    async def scenario() -> None:
        engine = EmbeddedEngine(models[name], max_batch=2)
        await engine.start()
        try:
            await engine.add_adapter("caller", callers[name])
            request = ChatCompletionRequest(model="tiny", tools=TOOLS, temperature=0, max_tokens=300,
                                            messages=[{"role": "user", "content": "question 3: what now?"}])
            results["whole"] = await engine.complete(request, "caller")
            items = [item async for item in await engine.stream(request, "caller")]
            results["deltas"] = [item for item in items if isinstance(item, Delta)]
            results["streamed"] = items[-1]
        finally:
            await engine.close()

    asyncio.run(scenario())
    whole: Generation = results["whole"]
    assert whole.finish_reason == "tool_calls", whole.message
    assert named(whole.message.tool_calls) == CALLS and whole.message.content is None
    streamed: Generation = results["streamed"]
    assert streamed.response_token_ids == whole.response_token_ids
    assert named(streamed.message.tool_calls) == CALLS
    deltas = [call for delta in results["deltas"] for call in delta.tool_calls or []]
    assert [(c["index"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in deltas] == [
        (i, call_name, args) for i, (call_name, args) in enumerate(CALLS)]
    assert not any(delta.content for delta in results["deltas"])


@pytest.mark.slow  # each format's adapter is taught first (about a minute for the four)
def test_hermes_calls_through_the_gateway_with_the_openai_sdk(models: dict[str, Path], callers: dict[str, Path],
                                                              tmp_path: Path) -> None:
    """The whole path a client sees, on a Qwen-style model: the SDK's tool_calls, whole and streamed."""
    settings_ = Settings(data_dir=tmp_path, engine="embedded", model=str(models["hermes"]),
                         adapter_load_dirs=[callers["hermes"].parent])
    with Uvicorn(create_app(settings_)) as gateway:
        client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="none")
        loaded = client.post("/admin/adapters", cast_to=object,
                             body={"version": "caller", "path": str(callers["hermes"])})
        assert loaded is not None
        ask: dict[str, Any] = {"model": "caller", "messages": [{"role": "user", "content": "question 3: what now?"}],
                               "tools": TOOLS, "temperature": 0, "max_tokens": 300}
        whole = client.chat.completions.create(**ask)
        assert whole.choices[0].finish_reason == "tool_calls"
        got = [(c.function.name, json.loads(c.function.arguments)) for c in whole.choices[0].message.tool_calls or []]
        assert got == CALLS
        pieces: dict[int, list[str]] = {}
        names_: dict[int, str] = {}
        for chunk in client.chat.completions.create(**ask, stream=True):
            for call in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
                if call.function and call.function.name:
                    names_[call.index] = call.function.name
                pieces.setdefault(call.index, []).append(call.function.arguments or "" if call.function else "")
        assert [(names_[i], json.loads("".join(pieces[i]))) for i in sorted(pieces)] == CALLS


@pytest.mark.slow  # each format's adapter is taught first (about a minute for the four)
def test_the_setting_overrides_what_the_template_says(models: dict[str, Path], callers: dict[str, Path]) -> None:
    """NEXTTURN_TOOL_CALL_FORMAT=none: the calls stay the text the model wrote (a model whose template says
    nothing of its calls, or a deployment that parses them itself)."""
    found: dict[str, Generation] = {}

    async def scenario() -> None:
        engine = build_engine(Settings(engine="embedded", model=str(models["hermes"]), tool_call_format="none"))
        await engine.start()
        try:
            await engine.add_adapter("caller", str(callers["hermes"]))
            found["whole"] = await engine.complete(ChatCompletionRequest(
                model="tiny", tools=TOOLS, temperature=0, max_tokens=300,
                messages=[{"role": "user", "content": "question 3: what now?"}]), "caller")
        finally:
            await engine.close()

    asyncio.run(scenario())
    message = found["whole"].message
    assert message.tool_calls is None and isinstance(message.content, str)
    assert message.content.startswith("<tool_call>\n{\"name\": \"read_file\"")
