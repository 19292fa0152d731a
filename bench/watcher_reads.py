"""How many store reads a gateway's deployment watcher makes as the number of scopes grows.

Every replica follows every scope's deployment (gateway.watcher). This deploys 10, 100 and 1,000 scopes
(each a stable version) in a real SQLite store, lets a watcher load them once, then counts the statements
its refreshes send to the store in steady state (nothing changed: the periodic re-read every
``NEXTTURN_ROLLOUT_CHECK_INTERVAL_S``, 2 s by default), and after one scope's deployment changed. The
baseline is the single shared deployment. Prints reads per refresh and per second at the default interval,
and the time a refresh takes (median over the refreshes).

Run: .venv/bin/python bench/watcher_reads.py [--refreshes 50]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import sqlalchemy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gateway.metrics import Metrics  # noqa: E402
from gateway.routing import Router  # noqa: E402
from gateway.watcher import DeploymentWatcher  # noqa: E402
from nextturn import deployments, events  # noqa: E402
from nextturn.bus.sqlite import SqliteEventLog  # noqa: E402
from nextturn.store import Store, upgrade  # noqa: E402

INTERVAL_S = 2.0


class Engine:
    """What the watcher asks of an engine: add and remove adapters, and which ones it holds."""

    name = "engine"
    failure = None

    def __init__(self) -> None:
        self.held: set[str] = set()

    def models(self) -> list[str]:
        return ["served", *sorted(self.held)]

    def adapter_for(self, model: str) -> str | None:
        return events.BASE_VERSION if model == "served" else model if model in self.held else None

    async def add_adapter(self, version: str, path: str) -> None:
        self.held.add(version)

    async def remove_adapter(self, version: str) -> None:
        self.held.discard(version)


def deploy(store: Store, scopes: list[str], version: int) -> None:
    store.apply([events.AdapterPublished(scope=scope, version=version, base_model="m", path=f"/a/{scope}/{version}")
                 for scope in scopes])
    for scope in scopes:
        deployments.operate(store, scope, "promote", "bench", "bench", lambda _: None, version=version)


async def measure(count: int, refreshes: int, root: Path) -> tuple[float, float, float]:
    """(reads per steady refresh, reads for a refresh after one change, median seconds per refresh)."""
    url = f"sqlite:///{root / f'store-{count}.db'}"
    upgrade(url)
    store = Store(url)
    scopes = [events.DEFAULT_SCOPE, *(f"t.tenant{n}" for n in range(count - 1))]
    deploy(store, scopes, 1)
    statements = [0]
    def counted(*_: object) -> None:
        statements[0] += 1

    sqlalchemy.event.listen(store.engine, "before_cursor_execute", counted)
    log = SqliteEventLog(root / f"events-{count}.db")
    engine = Engine()
    watcher = DeploymentWatcher(Router(engine), engine, store, log, Metrics(), interval_s=INTERVAL_S)  # type: ignore[arg-type]
    await watcher.refresh()  # loads every scope's version once
    assert len(engine.held) == count
    seconds = []
    statements[0] = 0
    for _ in range(refreshes):
        began = time.perf_counter()
        await watcher.refresh()
        seconds.append(time.perf_counter() - began)
    steady = statements[0] / refreshes
    deploy(store, scopes[-1:], 2)
    statements[0] = 0
    await watcher.refresh()
    changed = statements[0]
    log.close()
    store.close()
    return steady, changed, statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--refreshes", type=int, default=50)
    args = parser.parse_args()
    print(f"deployment watcher: store reads per refresh ({args.refreshes} refreshes), one every {INTERVAL_S:g} s")
    print(f"{'scopes':>7}  {'reads/refresh':>13}  {'reads/s':>8}  {'after a change':>14}  {'refresh p50 ms':>14}")
    with tempfile.TemporaryDirectory() as directory:
        for count in (1, 10, 100, 1_000):
            steady, changed, seconds = asyncio.run(measure(count, args.refreshes, Path(directory)))
            print(f"{count:>7,}  {steady:13.1f}  {steady / INTERVAL_S:8.1f}  {changed:14.0f}  {seconds * 1e3:14.2f}")


if __name__ == "__main__":
    main()
