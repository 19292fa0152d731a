"""Load and soak: the whole stack (``nextturn up``: gateway with its recorder, signals worker, rollout
controller; no trainer, as the scripted upstream returns no logprobs to train on) under mixed traffic for
minutes at the highest rate this machine sustains, with every process's memory sampled each minute.

Traffic, from concurrent clients in a closed loop: plain answers, streamed answers, tool calls whose results
come back as the next request (parallel calls, linked implicitly), conversations continued, and a rating or
a comment on half of the answers. The model is the scripted upstream (tests/support/upstream.py), so the rate
is the middleware's own. First a short ramp finds the concurrency with the most requests per second and no
errors; then the soak runs at it. Each minute prints requests/s, p50/p99, errors, the publisher's queue and
spool, and each process's resident memory (the gateway's recorder child counted with the gateway).

The bound it checks: from the second minute on, no process's resident memory grows by more than
``--bound-mb`` (default 64 MB) by the last minute. What is bounded by construction: the gateway's session
links (100,000 turns), its recent turns (100,000), the publisher's queue (10,000 events), the spool (empty
while the log is up), the signals worker's open cases (store-backed), the trainer's waiting signals (its
ledger, on disk).

Run: .venv/bin/python bench/load.py [--minutes 10] [--concurrency N] [--bound-mb 64]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from nextturn.settings import Settings  # noqa: E402
from nextturn.stack import Stack  # noqa: E402

from support.services import free_port  # noqa: E402  (the same helpers the tests use)
from support.upstream import MODEL  # noqa: E402

KEY = {"Authorization": "Bearer sk-load"}


@dataclass
class Window:
    latencies: list[float] = field(default_factory=list)  # ms, per request (a stream: to its last byte)
    errors: int = 0
    kinds: Counter[str] = field(default_factory=Counter)  # what the errors were


async def client(http: httpx.AsyncClient, rng: random.Random, window: list[Window], stop: asyncio.Event) -> None:
    """One user: a conversation of a few turns, each answer sometimes rated, then a new one."""
    while not stop.is_set():
        messages: list[dict[str, object]] = [{"role": "user", "content": f"question {rng.random():.6f}"}]
        if rng.random() < 0.15:
            messages[0]["content"] = "please run the tools"  # two parallel tool calls come back
        for _ in range(rng.randint(1, 4)):
            if stop.is_set():
                return
            stream = rng.random() < 0.4
            began = time.perf_counter()
            try:
                answer = await ask(http, messages, stream)
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                window[0].errors += 1
                window[0].kinds[type(exc).__name__] += 1
                if os.environ.get("LOAD_DEBUG"):
                    detail = exc.response.text[:300] if isinstance(exc, httpx.HTTPStatusError) else ""
                    print("error:", type(exc).__name__, exc, detail, flush=True)
                break
            window[0].latencies.append((time.perf_counter() - began) * 1000)
            turn_id, message = answer
            if rng.random() < 0.5:
                kind = rng.choice(["rating", "comment"])
                body = {"turn_id": turn_id, "kind": kind, **({"value": rng.choice([-1, 1])} if kind == "rating"
                                                             else {"text": "shorter, please"})}
                try:
                    rated = await http.post("/v1/feedback", json=body)
                except httpx.HTTPError as exc:
                    window[0].errors += 1
                    window[0].kinds[type(exc).__name__] += 1
                    break
                if rated.status_code != 200:
                    window[0].errors += 1
                    if os.environ.get("LOAD_DEBUG"):
                        print("feedback error:", rated.status_code, rated.text[:300], flush=True)
            messages = [*messages, message]
            calls: list[dict[str, object]] = message.get("tool_calls") or []  # type: ignore[assignment]
            if calls:
                messages += [{"role": "tool", "tool_call_id": call["id"], "content": "3 passed"} for call in calls]
            else:
                messages.append({"role": "user", "content": f"and then {rng.random():.6f}?"})


async def ask(http: httpx.AsyncClient, messages: list[dict[str, object]],
              stream: bool) -> tuple[str, dict[str, object]]:
    body = {"model": MODEL, "messages": messages, "stream": stream}
    if not stream:
        answered = await http.post("/v1/chat/completions", json=body)
        answered.raise_for_status()
        found = answered.json()
        whole: dict[str, object] = found["choices"][0]["message"]
        return found["id"], {key: value for key, value in whole.items() if value is not None}
    import json

    content, turn_id = "", ""
    calls: list[dict[str, Any]] = []
    async with http.stream("POST", "/v1/chat/completions", json=body) as answered:
        answered.raise_for_status()
        async for line in answered.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise ValueError(chunk["error"]["message"])
            turn_id = chunk["id"]
            delta = chunk["choices"][0]["delta"]
            content += delta.get("content") or ""
            for part in delta.get("tool_calls") or []:  # OpenAI's stream: a call's pieces share its index
                index = part.get("index", len(calls))
                while len(calls) <= index:
                    calls.append({"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
                call, function = calls[index], calls[index]["function"]
                call["id"] = part.get("id") or call["id"]
                function["name"] += part.get("function", {}).get("name") or ""
                function["arguments"] += part.get("function", {}).get("arguments") or ""
    message: dict[str, object] = {"role": "assistant", "content": content or None}
    if calls:
        message["tool_calls"] = calls
    return turn_id, {key: value for key, value in message.items() if value is not None}


async def run_for(url: str, concurrency: int, seconds: float, on_minute: object = None) -> list[Window]:
    """Traffic from ``concurrency`` clients for ``seconds``; one window per minute (or one for a short run)."""
    stop = asyncio.Event()
    windows = [Window()]
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers=KEY, timeout=60, limits=limits) as http:
        current = [windows[0]]
        rng = random.Random(concurrency)
        tasks = [asyncio.create_task(client(http, random.Random(rng.random()), current, stop))
                 for _ in range(concurrency)]
        began = time.monotonic()
        next_minute = began + 60
        while (now := time.monotonic()) < began + seconds:
            await asyncio.sleep(min(1.0, began + seconds - now))
            if time.monotonic() >= next_minute:
                if callable(on_minute):
                    on_minute(len(windows), current[0])
                current[0] = Window()
                windows.append(current[0])
                next_minute += 60
        stop.set()
        await asyncio.gather(*tasks)
    if not windows[-1].latencies:
        windows.pop()  # the minute that had just begun
    return windows


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (the gateway's recorder), in MB."""
    total = 0.0
    for candidate in [pid, *children(pid)]:
        try:
            for line in Path(f"/proc/{candidate}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            pass
    return total


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return found


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=None, help="skip the ramp and use this many clients")
    parser.add_argument("--bound-mb", type=float, default=64.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        upstream_port = free_port()
        import subprocess

        upstream = subprocess.Popen([sys.executable, "-m", "uvicorn", "support.upstream:create_upstream", "--factory",
                                     "--app-dir", str(ROOT / "tests"), "--port", str(upstream_port),
                                     "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        settings = Settings(data_dir=Path(root) / "data", engine="openai", model=MODEL,
                            upstream_url=f"http://127.0.0.1:{upstream_port}/v1", api_keys="sk-load:load",
                            port=free_port(), metrics=True, signals_idle_timeout_s=30,
                            train_method="none")  # the scripted upstream gives no logprobs: nothing to train
        stack = Stack(settings, environment=dict(os.environ))
        stack.start()
        try:
            soak(stack, args)
        finally:
            stack.stop()
            upstream.terminate()
            upstream.wait()


def soak(stack: Stack, args: argparse.Namespace) -> None:
    concurrency = args.concurrency
    if concurrency is None:
        print("ramp: 15 s at each concurrency")
        best = (0.0, 1)
        for level in (1, 2, 4, 8, 16, 32):
            window = asyncio.run(run_for(stack.url, level, 15))[0]
            rate = len(window.latencies) / 15
            print(f"  {level:>3} clients: {rate:7.1f} requests/s, p50 {pct(window.latencies, 0.5):6.1f} ms, "
                  f"p99 {pct(window.latencies, 0.99):7.1f} ms, errors {window.errors} {dict(window.kinds) or ''}")
            if window.errors == 0 and rate > best[0] * 1.05:
                best = (rate, level)
        concurrency = best[1]
    names = [child.component.name for child in stack.children]
    print(f"soak: {args.minutes:g} minutes at {concurrency} clients")
    print(f"{'minute':>6}{'req/s':>8}{'p50 ms':>8}{'p99 ms':>9}{'errors':>7}{'queue':>7}{'spool':>7}"
          + "".join(f"{name + ' MB':>13}" for name in names))
    memory: list[list[float]] = []

    def on_minute(minute: int, window: Window) -> None:
        sizes = [rss_mb(child.process.pid) if child.process is not None else float("nan")
                 for child in stack.children]
        memory.append(sizes)
        depths = gauges(stack.url)
        print(f"{minute:>6}{len(window.latencies) / 60:>8.1f}{statistics.median(window.latencies or [0]):>8.1f}"
              f"{pct(window.latencies, 0.99):>9.1f}{window.errors:>7}{depths[0]:>7.0f}{depths[1]:>7.0f}"
              + "".join(f"{size:>13.0f}" for size in sizes), flush=True)

    windows = asyncio.run(run_for(stack.url, concurrency, args.minutes * 60, on_minute))
    latencies = [value for window in windows for value in window.latencies]
    errors = sum(window.errors for window in windows)
    kinds = sum((window.kinds for window in windows), Counter())
    print(f"all: {len(latencies):,} requests, {len(latencies) / (args.minutes * 60):.1f}/s, p50 "
          f"{statistics.median(latencies):.1f} ms, p99 {pct(latencies, 0.99):.1f} ms, "
          f"errors {errors} {dict(kinds) or ''}")
    if len(memory) >= 3:
        growth = {name: memory[-1][n] - memory[1][n] for n, name in enumerate(names)}
        within = all(value <= args.bound_mb for value in growth.values())
        print("memory growth from minute 2 to the last: " + ", ".join(f"{name} {value:+.0f} MB"
                                                                       for name, value in growth.items())
              + f" ({'within' if within else 'BEYOND'} the bound of {args.bound_mb:g} MB)")


def gauges(url: str) -> tuple[float, float]:
    """The gateway's publish queue and spool depths, from /metrics."""
    found = {"nextturn_publish_queue_depth": float("nan"), "nextturn_spool_depth": float("nan")}
    try:
        for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
            name, _, value = line.partition(" ")
            if name in found:
                found[name] = float(value)
    except httpx.HTTPError:
        pass
    return found["nextturn_publish_queue_depth"], found["nextturn_spool_depth"]


if __name__ == "__main__":
    main()
