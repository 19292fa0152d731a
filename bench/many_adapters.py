"""Request latency of the embedded engine serving 64 scopes' adapters at once, against one adapter.

Builds the "small" local model and ``--adapters`` LoRA adapters of the trainer's shape (rank 8 on every
linear layer, random weights) in a temporary directory; nothing is downloaded. Then, at the same load
(``--concurrent`` requests at once, each ``--tokens`` tokens, rounds one after another):

- **one adapter**: every request on the same adapter;
- **64 adapters**: every adapter resident (``max_adapters`` = their number), each request on the next
  adapter in turn, so a batch mixes as many adapters as it has rows (peft's mixed-adapter batch);
- **cold loads**: an engine already holding ``--adapters`` adapters is given as many new ones; the first
  request on each waits for its adapter to be read from disk (and another to be dropped). Its time to
  first token, against a warm adapter's in the same engine, is the load's cost.

Prints p50/p99 of the request latency (first byte sent to the last token) and the ratio of the p50s;
p50/p99 of the time to the first token for cold and warm adapters.

Run: .venv/bin/python bench/many_adapters.py [--adapters 64] [--concurrent 8] [--tokens 32] [--rounds 12]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gateway.engines import Delta, Generation  # noqa: E402
from gateway.engines.embedded import EmbeddedEngine  # noqa: E402
from gateway.schemas import ChatCompletionRequest  # noqa: E402
from nextturn.local_models import init_model  # noqa: E402


def make_adapters(model_dir: Path, root: Path, count: int, offset: int = 0) -> dict[str, Path]:
    """``count`` adapters shaped as the trainer writes them (rank 8, all linear layers), random weights."""
    found = {}
    for n in range(offset, offset + count):
        base = AutoModelForCausalLM.from_pretrained(model_dir)
        torch.manual_seed(n)
        config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
        path = root / f"a{n}"
        get_peft_model(base, config).save_pretrained(path)
        found[f"t.s{n}-v1"] = path
    return found


def ask(n: int, tokens: int) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="small", messages=[{"role": "user", "content": f"question number {n}"}],
                                 max_tokens=tokens, seed=n)


async def timed(engine: EmbeddedEngine, n: int, adapter: str, tokens: int) -> tuple[float, float]:
    """(ms to the first token, ms to the last) of one streamed request."""
    started = time.perf_counter()
    first = 0.0
    async for item in await engine.stream(ask(n, tokens), adapter):
        if isinstance(item, Delta) and not first:
            first = time.perf_counter()
        elif isinstance(item, Generation):
            break
    done = time.perf_counter()
    return (first or done) - started, done - started


async def load(engine: EmbeddedEngine, adapters: list[str], concurrent: int, tokens: int,
               rounds: int) -> list[float]:
    """Request latencies (ms) over ``rounds`` rounds of ``concurrent`` requests, the adapters taken in turn."""
    latencies: list[float] = []
    n = 0
    for _ in range(rounds):
        batch = []
        for _ in range(concurrent):
            batch.append(timed(engine, n, adapters[n % len(adapters)], tokens))
            n += 1
        latencies += [total * 1000 for _, total in await asyncio.gather(*batch)]
    return latencies


def p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--adapters", type=int, default=64)
    parser.add_argument("--concurrent", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = init_model(Path(tmp) / "small", size="small", seed=0)
        adapters = make_adapters(model_dir, Path(tmp), args.adapters)
        engine = EmbeddedEngine(model_dir, device=args.device, max_adapters=args.adapters)
        await engine.start()
        for name, path in adapters.items():
            await engine.add_adapter(name, path)  # room for all: each is loaded now
        names = list(adapters)
        await load(engine, names, args.concurrent, args.tokens, 2)  # warm up
        print(f"embedded engine, small model, {args.adapters} adapters of rank 8 resident, {args.concurrent} "
              f"requests at once, {args.tokens} tokens each, {args.rounds} rounds, {args.device}, "
              f"torch {torch.get_num_threads()} threads")
        # Interleave the two so that a drift in the machine's speed falls on both.
        one: list[float] = []
        many: list[float] = []
        for _ in range(args.rounds):
            one += await load(engine, names[:1], args.concurrent, args.tokens, 1)
            many += await load(engine, names, args.concurrent, args.tokens, 1)
        print(f"{'':28} {'p50 ms':>8} {'p99 ms':>8}")
        print(f"{'one adapter':28} {p(one, 0.5):8.1f} {p(one, 0.99):8.1f}")
        print(f"{f'{args.adapters} adapters in turn':28} {p(many, 0.5):8.1f} {p(many, 0.99):8.1f}")
        print(f"{args.adapters} adapters / one, p50: {p(many, 0.5) / p(one, 0.5):.3f}x")

        cold = make_adapters(model_dir, Path(tmp), args.adapters, offset=args.adapters)
        for name, path in cold.items():
            await engine.add_adapter(name, path)  # no room: loaded by its first request
        cold_ttft, warm_ttft = [], []
        for n, name in enumerate(cold):
            first, _ = await timed(engine, n, name, 4)
            cold_ttft.append(first * 1000)
            again, _ = await timed(engine, n, name, 4)  # the same adapter, now resident
            warm_ttft.append(again * 1000)
        print(f"first token, {len(cold)} cold adapters: p50 {p(cold_ttft, 0.5):.1f} ms, p99 {p(cold_ttft, 0.99):.1f} "
              f"ms; warm: p50 {p(warm_ttft, 0.5):.1f} ms, p99 {p(warm_ttft, 0.99):.1f} ms "
              f"(loads {engine.loads}, evictions {engine.evictions})")
        await engine.close()


if __name__ == "__main__":
    asyncio.run(main())
