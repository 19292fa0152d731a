"""The embedded engine: continuous batching over a real tiny model, exact logprobs, adapters in flight."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from gateway.engines import Delta, Generation
from gateway.engines.decoding import TextDecoder
from gateway.engines.embedded import EmbeddedEngine
from gateway.errors import InvalidRequest, NotFound
from gateway.schemas import ChatCompletionRequest
from nextturn import events

from support.adapters import reference_logprobs


def ask(text: str, **params: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="tiny", messages=[{"role": "user", "content": text}], **params)


def run(model: Path, scenario: Callable[[EmbeddedEngine], Awaitable[None]], **engine_options: Any) -> None:
    async def main() -> None:
        engine = EmbeddedEngine(model, max_batch=4, **engine_options)
        await engine.start()
        try:
            await scenario(engine)
        finally:
            await engine.close()
        assert engine.failure is None

    asyncio.run(main())


def test_concurrent_requests_record_the_logprobs_of_the_tokens_they_sampled(
    tiny_model: Path, tiny_adapters: dict[str, Path]
) -> None:
    """Rows join a running batch at different lengths and adapters: each one's logprobs are its own."""
    results: list[tuple[str, Generation]] = []

    async def scenario(engine: EmbeddedEngine) -> None:
        await engine.add_adapter("v1", tiny_adapters["a1"])
        await engine.add_adapter("v2", tiny_adapters["a2"])
        plan = [("base", "hi", 40), ("v1", "a much longer question about the tests " * 3, 25),
                ("v2", "run", 33), ("base", "tools " * 9, 12), ("v1", "x", 30), ("v2", "fix the bug", 18)]

        async def one(adapter: str, text: str, max_tokens: int, delay: int) -> None:
            await asyncio.sleep(delay * 0.01)  # arrivals spread over the steps of the others
            generation = await engine.complete(ask(text, max_tokens=max_tokens, seed=delay), adapter)
            results.append((adapter, generation))

        await asyncio.gather(*(one(*step, delay) for delay, step in enumerate(plan)))

    run(tiny_model, scenario)
    assert len(results) == 6 and {adapter for adapter, _ in results} == {"base", "v1", "v2"}
    for adapter, generation in results:
        assert generation.response_logprobs is not None
        assert len(generation.response_token_ids) == len(generation.response_logprobs) == generation.completion_tokens
        path = None if adapter == "base" else tiny_adapters[{"v1": "a1", "v2": "a2"}[adapter]]
        expected = reference_logprobs(tiny_model, path, generation.prompt_token_ids, generation.response_token_ids)
        assert generation.response_logprobs == pytest.approx(expected, abs=1e-4)


def test_a_short_request_finishes_while_a_long_one_runs(tiny_model: Path) -> None:
    order: list[str] = []

    async def scenario(engine: EmbeddedEngine) -> None:
        long_items = await engine.stream(ask("count", max_tokens=400, temperature=0), "base")

        async def long() -> None:
            async for item in long_items:
                if isinstance(item, Generation):
                    assert item.finish_reason == "length"  # it ran its full length: the test saw it running
                    order.append("long")

        task = asyncio.create_task(long())
        await asyncio.sleep(0.05)
        short = await engine.complete(ask("hi", max_tokens=3), "base")
        order.append("short")
        assert short.completion_tokens <= 3
        await task

    run(tiny_model, scenario)
    assert order == ["short", "long"]


def test_a_removed_adapter_finishes_its_requests_and_takes_no_new_ones(
    tiny_model: Path, tiny_adapters: dict[str, Path]
) -> None:
    seen: list[str] = []

    async def scenario(engine: EmbeddedEngine) -> None:
        await engine.add_adapter("v1", tiny_adapters["a1"])
        assert engine.models() == ["tiny", "v1"]
        running = await engine.stream(ask("count", max_tokens=200, temperature=0), "v1")

        async def finish() -> Generation:
            async for item in running:
                if isinstance(item, Generation):
                    seen.append("generation finished")
                    return item
            raise AssertionError("no generation")

        task = asyncio.create_task(finish())
        await asyncio.sleep(0.02)
        removal = asyncio.create_task(engine.remove_adapter("v1"))
        await asyncio.sleep(0)
        assert engine.models() == ["tiny"] and engine.adapter_for("v1") is None
        with pytest.raises(NotFound):
            await engine.complete(ask("hi", max_tokens=2), "v1")
        await removal
        seen.append("adapter removed")
        generation = await task
        assert generation.completion_tokens == 200
        expected = reference_logprobs(tiny_model, tiny_adapters["a1"], generation.prompt_token_ids,
                                      generation.response_token_ids)
        assert generation.response_logprobs == pytest.approx(expected, abs=1e-4)  # it finished on v1
        await engine.add_adapter("v1", tiny_adapters["a2"])  # the name is free again
        assert (await engine.complete(ask("hi", max_tokens=2), "v1")).completion_tokens <= 2

    run(tiny_model, scenario)
    assert seen == ["generation finished", "adapter removed"]


def test_more_adapters_than_fit_are_dropped_and_loaded_again_without_a_wrong_or_failed_answer(
    tiny_model: Path, tiny_adapters: dict[str, Path]
) -> None:
    """Three times as many scopes' versions as slots, asked all at once, round after round: each answer is
    sampled on its own adapter (its logprobs are that adapter's), and none fails because of an eviction."""
    paths = {f"t.s{n}-v1": tiny_adapters["a1" if n % 2 else "a2"] for n in range(6)}

    async def scenario(engine: EmbeddedEngine) -> None:
        for name, path in paths.items():
            await engine.add_adapter(name, path)
        assert engine.models() == ["tiny", *sorted(paths)]
        for round_ in range(3):
            asked = [(name, ask(f"round {round_} for {name}", max_tokens=6, temperature=0)) for name in paths]
            answers = await asyncio.gather(*(engine.complete(request, name) for name, request in asked))
            for (name, _), answer in zip(asked, answers, strict=True):
                expected = reference_logprobs(tiny_model, paths[name], answer.prompt_token_ids,
                                              answer.response_token_ids)
                assert answer.response_logprobs == pytest.approx(expected, abs=1e-4), name
        assert engine.evictions > 0 and engine.loads > 0
        with pytest.raises(InvalidRequest, match="no adapter_config.json"):  # full: checked, not loaded
            await engine.add_adapter("t.s9-v1", tiny_model)

    run(tiny_model, scenario, max_adapters=2)


def test_bad_adapters_and_oversized_requests_are_refused_clearly(tiny_model: Path, tmp_path: Path) -> None:
    async def scenario(engine: EmbeddedEngine) -> None:
        with pytest.raises(InvalidRequest, match="cannot load the adapter"):
            await engine.add_adapter("v9", tmp_path)
        with pytest.raises(InvalidRequest, match="reserved"):
            await engine.add_adapter("base", tmp_path)
        with pytest.raises(InvalidRequest, match="context is 1024 tokens") as too_long:
            await engine.stream(ask("word " * 1200), "base")
        assert too_long.value.code == "context_length_exceeded"
        with pytest.raises(InvalidRequest, match="context is 1024 tokens"):
            await engine.complete(ask("hi", max_tokens=1020), "base")
        assert (await engine.complete(ask("hi", max_tokens=5), "base")).finish_reason in ("stop", "length")

    run(tiny_model, scenario)


def test_sampling_follows_the_request(tiny_model: Path) -> None:
    async def scenario(engine: EmbeddedEngine) -> None:
        seeded = [await engine.complete(ask("hello", max_tokens=30, seed=11), "base") for _ in range(2)]
        assert seeded[0].response_token_ids == seeded[1].response_token_ids
        other = await engine.complete(ask("hello", max_tokens=30, seed=12), "base")
        assert other.response_token_ids != seeded[0].response_token_ids
        greedy = await engine.complete(ask("hello", max_tokens=30, temperature=0), "base")
        narrow = await engine.complete(ask("hello", max_tokens=30, top_p=1e-6, seed=5), "base")
        assert narrow.response_token_ids == greedy.response_token_ids  # top-p that small keeps the argmax only

    run(tiny_model, scenario)


def test_a_client_that_leaves_frees_its_row(tiny_model: Path) -> None:
    async def scenario(engine: EmbeddedEngine) -> None:
        items = await engine.stream(ask("count", max_tokens=900, temperature=0), "base")
        async for item in items:
            assert isinstance(item, Delta)
            break
        await items.aclose()  # type: ignore[attr-defined]
        # The abandoned row is dropped at the next step; a new request runs alone and is done long before
        # the abandoned one could have reached 900 tokens.
        await engine.complete(ask("hi", max_tokens=2), "base")
        for _ in range(100):
            if engine.load() == 0:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the abandoned request still holds a row")

    run(tiny_model, scenario)


# --- decoding: any tokens (what each template writes is read back: tests/test_tool_formats.py) -------


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_what_streams_is_what_is_recorded_for_any_tokens(tiny_model: Path, data: st.DataObject) -> None:
    """Sampled tokens need not decode: a reply cut inside a multi-byte character (max_tokens), or bytes that
    are no UTF-8 at all. The deltas a client joins must still equal the recorded message, character for
    character: the client echoes what it received, and the next turn links by that text."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokens = data.draw(st.lists(st.integers(0, tokenizer.vocab_size - 1).filter(
        lambda token: token not in tokenizer.all_special_ids), max_size=12))
    decoder = TextDecoder(tokenizer)
    deltas = [delta for token in tokens for delta in decoder.feed(token)] + decoder.finish()
    assert "".join(delta.content or "" for delta in deltas) == (decoder.message().content or "")


def test_an_answer_releases_its_request_once_whether_closed_unstarted_or_finished() -> None:
    """A client may leave before the first token: closing the answer then must still free its request
    (an async generator closed before its first step never runs its ``finally``)."""
    from gateway.engines.decoding import Answer

    released: list[str] = []
    message = events.ChatMessage(role="assistant", content="ok")

    async def items() -> AsyncIterator[Delta | Generation]:
        yield Delta(content="ok")
        yield Generation(message=message, finish_reason="stop")

    def release(name: str) -> Callable[[], Awaitable[None]]:
        async def done() -> None:
            released.append(name)
        return done

    async def main() -> None:
        unstarted = Answer(items(), release("unstarted"))
        await unstarted.aclose()
        finished = Answer(items(), release("finished"))
        got = [item async for item in finished]  # released with the Generation, before the caller closes
        assert released == ["unstarted", "finished"] and isinstance(got[-1], Generation)
        await finished.aclose()

    asyncio.run(main())
    assert released == ["unstarted", "finished"]  # once each
