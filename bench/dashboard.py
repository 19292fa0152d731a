"""How long the operator's page takes with many scopes: ``GET /dashboard`` (every scope's row and the last day's
signals) and one scope's page, on a gateway over real uvicorn, in front of a real SQLite store holding 10,
100 and 1,000 scopes, each with two versions (half of them behind a canary), collapse guards and 20 resolved
turns a scope in the last day. The baseline, measured in the same run against the same store, is the JSON
the CLI's ``scopes list`` prints (``GET /v1/admin/scopes``: the same read of every scope, without the page).

Prints median and p99 over the requests, and the ratio to the baseline. Target: the page with 1,000 scopes
in under a second (docs/dashboard.md).

Run: .venv/bin/python bench/dashboard.py [--requests 30]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gateway.app import create_app  # noqa: E402
from nextturn import deployments, events  # noqa: E402
from nextturn.settings import Settings  # noqa: E402
from nextturn.store import Store, upgrade  # noqa: E402

GUARDS = {"prompts": 8, "length": 14.0, "kl_to_base": 0.05, "reward": 0.3, "base": {"length": 12.0, "reward": 0.1},
          "probe": {"entropy": 1.3, "base_entropy": 1.4, "distinct_1": 0.55, "base_distinct_1": 0.6}}
TURNS_PER_SCOPE = 20


def fill(store: Store, count: int) -> None:
    now = events.utc_now()
    for n in range(count):
        scope = f"t.tenant-{n:05d}"
        store.apply([events.AdapterPublished(scope=scope, version=v, base_model="m", path=f"/a/{scope}/{v}",
                                             meta={"guards": GUARDS, "data": {"signals": ["s"] * 16}})
                     for v in (1, 2)])
        deployments.operate(store, scope, "promote", "ops", "first", lambda _: None, version=1)
        if n % 2:
            deployments.commit(store, scope, lambda state: deployments.canary(state, 2, [0.25], "controller", "new",
                                                                              now), lambda _: None)
        store.apply([events.SignalExtracted(
            signal_id=f"{scope}-{t}", tenant=scope, scope=scope, session_id=f"{scope}-s{t}", turn_id=f"{scope}-{t}",
            adapter_version=f"{scope}-v{1 + t % 2}", reward=1.0 if t % 3 else -1.0, confidence=0.9,
            verdicts=[events.Verdict(evaluator="rating", source="explicit", score=1.0 if t % 3 else -1.0,
                                     confidence=1.0)], extractor_version="extractor-v1")
            for t in range(TURNS_PER_SCOPE)])


def timed(client: httpx.Client, path: str, requests: int, **kwargs: object) -> list[float]:
    client.get(path, **kwargs)  # warm
    found = []
    for _ in range(requests):
        started = time.perf_counter()
        answer = client.get(path, **kwargs)
        found.append(time.perf_counter() - started)
        answer.raise_for_status()
    return found


def figures(seconds: list[float]) -> tuple[float, float]:
    ordered = sorted(seconds)
    return statistics.median(ordered) * 1000, ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=30)
    args = parser.parse_args()
    logging.disable(logging.ERROR)  # the upstream engine cannot load the versions: said once per version
    print(f"{'scopes':>7} {'page p50 ms':>12} {'page p99 ms':>12} {'scope p50 ms':>13} {'JSON p50 ms':>12} "
          f"{'page/JSON':>10}")
    for count in (10, 100, 1000):
        with tempfile.TemporaryDirectory() as tmp:
            settings = Settings(data_dir=Path(tmp), engine="openai", upstream_url="http://127.0.0.1:9/v1",
                                model="m", api_keys="sk-t:t", admin_key="sk-admin")
            upgrade(settings.store_url)
            store = Store.from_settings(settings)
            fill(store, count)
            store.close()
            server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=0,
                                                   log_level="error"))
            thread = threading.Thread(target=server.run, daemon=True)
            thread.start()
            while not server.started:
                time.sleep(0.05)
            port = server.servers[0].sockets[0].getsockname()[1]
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
                assert client.post("/dashboard/login", data={"key": "sk-admin", "name": "bench"}).status_code == 303
                page = timed(client, "/dashboard", args.requests)
                one = timed(client, "/dashboard/scopes/t.tenant-00001", args.requests)
                baseline = timed(client, "/v1/admin/scopes", args.requests,
                                 headers={"Authorization": "Bearer sk-admin"})
            server.should_exit = True
            thread.join()
        (p50, p99), (one50, _), (json50, _) = figures(page), figures(one), figures(baseline)
        print(f"{count:>7} {p50:>12.1f} {p99:>12.1f} {one50:>13.1f} {json50:>12.1f} {p50 / json50:>10.2f}")


if __name__ == "__main__":
    main()
