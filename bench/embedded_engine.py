"""Tokens per second of the embedded engine, at 1 and 8 concurrent requests.

Builds the "small" local model in a temporary directory (nothing is downloaded), then generates
``--tokens`` tokens per request (stop strings and EOS cannot end it early: the count is fixed by
max_tokens and by ignoring EOS in the baseline). Baseline, same run, same model: transformers'
``generate()`` on one request, and on 8 requests one after another. Prints the median over
``--rounds`` of tokens/s and the p50/p99 time between tokens a client sees.

Run: .venv/bin/python bench/embedded_engine.py [--tokens 128] [--rounds 5] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gateway.engines import Delta, Generation
from gateway.engines.embedded import EmbeddedEngine
from gateway.schemas import ChatCompletionRequest
from nextturn.local_models import init_model


def request(n: int, tokens: int) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="small", messages=[{"role": "user", "content": f"question number {n}"}],
                                 max_tokens=tokens, seed=n)


async def engine_round(engine: EmbeddedEngine, concurrent: int, tokens: int) -> tuple[float, list[float]]:
    """(tokens/s over the round, gaps between tokens in ms)."""
    gaps: list[float] = []

    async def one(n: int) -> int:
        last = time.perf_counter()
        count = 0
        async for item in await engine.stream(request(n, tokens), "base"):
            now = time.perf_counter()
            if isinstance(item, Delta):
                gaps.append((now - last) * 1000)
                last = now
            elif isinstance(item, Generation):
                count = item.completion_tokens
        return count

    started = time.perf_counter()
    counts = await asyncio.gather(*(one(n) for n in range(concurrent)))
    return sum(counts) / (time.perf_counter() - started), gaps


def baseline_round(model: AutoModelForCausalLM, tokenizer: AutoTokenizer, requests: int, tokens: int,
                   device: str) -> float:
    """transformers generate(), one request after another: tokens/s."""
    started = time.perf_counter()
    for n in range(requests):
        text = tokenizer.apply_chat_template([{"role": "user", "content": f"question number {n}"}],
                                             add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids.to(device)
        torch.manual_seed(n)
        model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=True,
                       pad_token_id=tokenizer.pad_token_id)
    return requests * tokens / (time.perf_counter() - started)


def p(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = init_model(Path(tmp) / "small", size="small", seed=0)
        engine = EmbeddedEngine(directory, device=args.device)
        await engine.start()
        model = AutoModelForCausalLM.from_pretrained(directory).to(args.device).eval()
        tokenizer = AutoTokenizer.from_pretrained(directory)
        await engine_round(engine, 8, 8)  # warm up both
        baseline_round(model, tokenizer, 1, 8, args.device)
        print(f"embedded engine, small model ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters), "
              f"{args.tokens} tokens per request, {args.device}, torch {torch.get_num_threads()} threads, "
              f"median of {args.rounds} rounds")
        print(f"{'':34} {'tokens/s':>9} {'gap p50 ms':>11} {'gap p99 ms':>11}")
        results = {}
        for concurrent in (1, 8):
            rates, gaps = [], []
            for _ in range(args.rounds):
                rate, round_gaps = await engine_round(engine, concurrent, args.tokens)
                rates.append(rate)
                gaps += round_gaps
            results[concurrent] = statistics.median(rates)
            print(f"{f'engine, {concurrent} concurrent':34} {results[concurrent]:9.0f} {p(gaps, 0.5):11.2f} "
                  f"{p(gaps, 0.99):11.2f}")
        with torch.inference_mode():
            single = statistics.median(baseline_round(model, tokenizer, 1, args.tokens, args.device)
                                       for _ in range(args.rounds))
            serial = statistics.median(baseline_round(model, tokenizer, 8, args.tokens, args.device)
                                       for _ in range(max(1, args.rounds // 2)))
        print(f"{'generate(), 1 request':34} {single:9.0f}")
        print(f"{'generate(), 8 one after another':34} {serial:9.0f}")
        print(f"engine 1 concurrent / generate(): {results[1] / single:.2f}x; "
              f"engine 8 concurrent / generate() serial: {results[8] / serial:.2f}x")
        await engine.close()


if __name__ == "__main__":
    asyncio.run(main())
