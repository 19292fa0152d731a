"""What the gateway adds to a request: the same fast upstream called directly and through the gateway.

Each runs in its own process on loopback (the upstream under uvicorn, the gateway as `nextturn serve`),
so that neither shares an interpreter lock with the client; the client is httpx (one pooled
connection), sequential requests, recording on (SQLite event log, spool, recorder). Prints p50/p99 of
each path and of the difference, non-streaming and streaming, and requests/s through the gateway.
Budget (DESIGN): p50 added <= 1 ms, p99 added <= 5 ms.

Run: .venv/bin/python bench/gateway_overhead.py [--requests 1000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from services import free_port, wait_for_port  # noqa: E402  (the same helpers the tests use)
from upstream import MODEL  # noqa: E402


def serve(command: list[str], port: int, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(command, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    wait_for_port(port, timeout_s=60)
    return process


def timed(client: httpx.Client, url: str, body: dict, headers: dict[str, str], count: int) -> list[float]:
    samples = []
    for n in range(count):
        payload = body | {"messages": [{"role": "user", "content": f"request {n} of the benchmark"}]}
        started = time.perf_counter()
        if body.get("stream"):
            with client.stream("POST", url, json=payload, headers=headers) as response:
                for _ in response.iter_bytes():
                    pass
        else:
            client.post(url, json=payload, headers=headers).raise_for_status()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def p(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    args = parser.parse_args()
    upstream_port, gateway_port = free_port(), free_port()
    upstream = serve([sys.executable, "-m", "uvicorn", "upstream:create_upstream", "--factory", "--app-dir",
                      str(ROOT / "tests"), "--port", str(upstream_port), "--log-level", "warning"], upstream_port)
    upstream_url, gateway_url = f"http://127.0.0.1:{upstream_port}", f"http://127.0.0.1:{gateway_port}"
    with tempfile.TemporaryDirectory() as data_dir:
        gateway = serve([sys.executable, "-m", "nextturn", "serve"], gateway_port, {
            "NEXTTURN_DATA_DIR": data_dir, "NEXTTURN_ENGINE": "openai", "NEXTTURN_UPSTREAM_URL": f"{upstream_url}/v1",
            "NEXTTURN_MODEL": MODEL, "NEXTTURN_API_KEYS": "sk-bench:bench", "NEXTTURN_PORT": str(gateway_port),
        })
        auth = {"Authorization": "Bearer sk-bench"}
        print(f"gateway overhead: {args.requests} sequential requests per path, recording on")
        print(f"{'mode':<12}{'direct p50':>12}{'p99':>9}{'gateway p50':>13}{'p99':>9}{'added p50':>11}"
              f"{'added p99':>11}{'gateway req/s':>15}")
        with httpx.Client(timeout=30) as client:
            for stream in (False, True):
                body = {"model": MODEL, "stream": stream}
                timed(client, f"{upstream_url}/v1/chat/completions", body, {}, 50)  # warm up both paths
                timed(client, f"{gateway_url}/v1/chat/completions", body, auth, 50)
                direct = timed(client, f"{upstream_url}/v1/chat/completions", body, {}, args.requests)
                through = timed(client, f"{gateway_url}/v1/chat/completions", body, auth, args.requests)
                print(f"{'stream' if stream else 'non-stream':<12}{statistics.median(direct):>10.2f}ms"
                      f"{p(direct, 0.99):>7.2f}ms{statistics.median(through):>11.2f}ms{p(through, 0.99):>7.2f}ms"
                      f"{statistics.median(through) - statistics.median(direct):>9.2f}ms"
                      f"{p(through, 0.99) - p(direct, 0.99):>9.2f}ms{1000 / statistics.mean(through):>15,.0f}")
        gateway.terminate()
        gateway.wait()
    upstream.terminate()
    upstream.wait()


if __name__ == "__main__":
    main()
