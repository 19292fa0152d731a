"""The gateway's view of the deployments: learn each change, load what it needs, route, unload what it dropped.

Every replica reads the same state, from the store (:mod:`nextturn.deployments`): every scope's deployment
in one read, so the reads do not grow with the number of scopes. It re-reads them when a
``DeploymentChanged`` arrives on the event log (read from the end, in no consumer group: every replica sees
every change), and every ``interval_s`` in any case, so a late or lost event only delays a change. For a
scope whose state changed it adds the stable version and the canary to the engine first (an engine loads an
adapter on its first request and keeps the recently used ones, so 1,000 scopes start as fast as one),
then routes by the new state (:class:`gateway.routing.Router`, one lane per scope), then unloads what the
state dropped: a rolled-back version at once, a replaced one once its sessions went quiet for ``drain_s``. The engine
finishes the requests running on a version before it unloads it.

The watcher is one background task; /healthz names it if it dies. The store or the event log being down
is not a death: it logs, and tries again at the next interval.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from gateway.engines import Engine
from gateway.errors import GatewayError
from gateway.metrics import Metrics
from gateway.routing import Router
from nextturn import events, progress, tables
from nextturn.bus import Consumer, EventLog
from nextturn.deployments import BAD, Deployment
from nextturn.erasure import Rules
from nextturn.errors import NextturnError
from nextturn.store import Evidence, Store

log = logging.getLogger(__name__)
LOOP_EVERY_S = 30.0  # the loop's figures (gateway.metrics) move on the scale of minutes


class DeploymentWatcher:
    name = "deployments"

    def __init__(self, router: Router, engine: Engine, store: Store, event_log: EventLog, metrics: Metrics, *,
                 interval_s: float = 2.0, drain_s: float = 600.0,
                 on_erasure: Callable[[Rules], None] | None = None) -> None:
        """``on_erasure``: told the erasure rules whenever they change (the replica's spool and session links
        drop what they cover)."""
        self._router = router
        self._on_erasure = on_erasure
        self._rules = Rules()
        self._engine = engine
        self._store = store
        self._log = event_log
        self._metrics = metrics
        self._interval_s = interval_s
        self._drain_s = drain_s
        self._applied: dict[str, str | None] = {}  # scope -> the last change applied in full
        self._deployed: set[str] = set()  # every scope's stable version and canary, as the store has them
        self.loop: tuple[datetime, dict[str, Any]] | None = None  # the last hour's signals (progress.signals), as of
        self._failed_loads: set[str] = set()  # logged once each
        self._lock = asyncio.Lock()
        self._consumer: Consumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._unloading: set[asyncio.Task[None]] = set()
        self._stopping = False
        self.failure: BaseException | None = None

    async def start(self) -> None:
        """Read the deployment and load its versions before the gateway takes requests."""
        # Subscribe before reading, so that no change falls between the read and the first poll.
        self._consumer = await asyncio.to_thread(self._log.consumer, None, [events.DEPLOYMENTS], start="end")
        try:
            await self.refresh()
        except NextturnError as exc:
            log.warning("cannot read the deployment yet; serving the base model until it can: %s", exc)
        self._task = asyncio.create_task(self._run(), name="deployment-watcher")

    async def close(self) -> None:
        self._stopping = True
        if self._task is not None:
            await self._task  # ends after its current poll
        if self._unloading:
            await asyncio.wait(self._unloading)
        if self._consumer is not None:
            self._consumer.close()

    async def refresh(self) -> Deployment:
        """Read every scope's deployment from the store and apply those that changed; return ``default``'s."""
        async with self._lock:
            found = await asyncio.to_thread(Deployment.read_all, self._store)
            self._deployed = {name for state in found for name in (state.stable_name, state.canary_name) if name}
            for deployment in found:
                if deployment.scope not in self._applied or deployment.last_event_id != self._applied[deployment.scope]:
                    await self._apply(deployment)
            await self._forget({deployment.scope for deployment in found})
            shared = next(deployment for deployment in found if deployment.scope == events.DEFAULT_SCOPE)
            await self._rewards(shared)
            return shared

    async def _forget(self, deployed: set[str]) -> None:
        """A scope whose deployment is gone was removed by an erasure: its versions stop serving here. New
        erasure rules go to ``on_erasure``."""
        for scope in [scope for scope in self._router.lanes if scope not in deployed]:
            for name in self._router.drop(scope):
                self._unload(name, f"its scope {scope} was removed")
            self._applied.pop(scope, None)
        rules = await asyncio.to_thread(self._store.erasures.read_store, self._store)
        if rules is not self._rules:
            self._rules = rules
            if self._on_erasure is not None:
                self._on_erasure(rules)

    async def _run(self) -> None:
        due = time.monotonic() + self._interval_s
        loop_due = time.monotonic()
        while not self._stopping:
            try:
                assert self._consumer is not None
                deliveries = await asyncio.to_thread(self._consumer.poll, 100, min(0.25, self._interval_s))
                news = any(isinstance(d.event, events.DeploymentChanged) for d in deliveries)
                if news or time.monotonic() >= due:
                    due = time.monotonic() + self._interval_s
                    await self.refresh()
                for version in self._router.drained(self._drain_s):
                    self._unload(version, "its sessions went quiet")
                if time.monotonic() >= loop_due:
                    loop_due = time.monotonic() + LOOP_EVERY_S
                    await self._loop_figures()
            except NextturnError as exc:
                log.warning("cannot follow the deployment now (trying again in %s s): %s", self._interval_s, exc)
                await asyncio.sleep(self._interval_s)
            except Exception as exc:
                log.exception("the deployment watcher died")
                self.failure = exc
                return

    async def _apply(self, deployment: Deployment) -> None:
        complete = True
        for version in (deployment.stable, deployment.canary):
            if version is not None and not await self._load(deployment, version):
                complete = False
        statuses = await asyncio.to_thread(self._store.adapter_statuses, deployment.scope)
        bad = {deployment.name(version) for version, status in statuses.items() if status in BAD}
        for name in self._router.apply(deployment, self._loaded, bad):
            self._unload(name, "it was rolled back")
        if complete:
            self._applied[deployment.scope] = deployment.last_event_id
        self._metrics.weight.clear()
        for lane in self._router.lanes.values():
            if lane.stable != events.BASE_VERSION or lane.deployment.scope == events.DEFAULT_SCOPE:
                self._metrics.weight.labels(lane.stable, "stable").set(1.0 - lane.weight)
            if lane.canary is not None:
                self._metrics.weight.labels(lane.canary, "canary").set(lane.weight)
            for name in lane.draining:
                self._metrics.weight.labels(name, "draining").set(0.0)

    def _loaded(self, name: str) -> bool:
        return name == events.BASE_VERSION or self._engine.adapter_for(name) is not None

    async def _load(self, deployment: Deployment, version: int) -> bool:
        name = deployment.name(version)
        if self._loaded(name):
            return True
        row = await asyncio.to_thread(self._store.get, tables.Adapter, (deployment.scope, version))
        try:
            if row is None:
                raise GatewayError(f"version {version} of {deployment.scope!r} is not in the store")
            await self._engine.add_adapter(name, row.path)
        except GatewayError as exc:
            if name not in self._failed_loads:
                self._failed_loads.add(name)
                self._metrics.load_failures.labels(name).inc()
                log.error("cannot load %s, so it gets no traffic here (trying again each %s s): %s",
                          name, self._interval_s, exc)
            return False
        self._failed_loads.discard(name)
        log.info("loaded %s", name)
        return True

    def _unload(self, version: str, why: str) -> None:
        async def unload() -> None:
            try:
                await self._engine.remove_adapter(version)  # after the requests running on it finish
                log.info("unloaded %s: %s", version, why)
            except GatewayError as exc:
                log.warning("could not unload %s: %s", version, exc)

        task = asyncio.create_task(unload())
        self._unloading.add(task)
        task.add_done_callback(self._unloading.discard)

    async def _rewards(self, deployment: Deployment) -> None:
        """Each serving version's resolved turns and mean reward since the deployment last changed."""
        since = deployment.canary_since or deployment.updated_at
        names = sorted({self._router.stable, *([self._router.canary] if self._router.canary else [])})
        by_version: dict[str, list[float]] = {name: [] for name in names}
        if since is not None:
            for name in names:
                found = await asyncio.to_thread(self._store.rewards, Evidence(events.DEFAULT_SCOPE, (name,)), since)
                by_version[name] = [reward for _, reward in found]
        self._metrics.resolved.clear()
        self._metrics.reward.clear()
        for version, values in by_version.items():
            self._metrics.resolved.labels(version).set(len(values))
            if values:
                self._metrics.reward.labels(version).set(sum(values) / len(values))

    async def _loop_figures(self) -> None:
        """The loop's figures for /metrics (gateway.metrics) and the dashboard's first page: the last hour's
        signals and the trainers' backlog."""
        now = events.utc_now()
        found = await asyncio.to_thread(progress.signals, self._store, since=now - timedelta(hours=1))
        backlog = await asyncio.to_thread(progress.trainer_backlog, self._store, now=now)
        self._metrics.loop(found, backlog, self._deployed)
        self.loop = (now, found)

    def status(self) -> dict[str, Any]:
        return {"stable": self._router.stable, "canary": self._router.canary, "weight": self._router.weight,
                "draining": self._router.draining}
