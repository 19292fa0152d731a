"""Restarting the gateway's background parts that died: the publisher's thread and the recorder's process.

Every background part has a ``name`` and a ``failure`` (why it died; None while it runs). The supervisor
looks at them every ``interval_s``. A part that can be restarted (it has ``restart()``) is restarted after a
back-off (1 s, doubling while it keeps dying within a minute, up to 30 s) and counted:
``nextturn_gateway_restarts_total{part}`` on /metrics, ``restarts`` on /healthz. Nothing is lost across a
restart: the publisher's queue and the batch it was writing outlive its thread, and the recorder resumes
from its group's committed offsets. A part that cannot be restarted (the engine, the deployment watcher)
stays dead and /healthz is a 503 that names it, as it is while a restart waits for its back-off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from gateway.metrics import Metrics

log = logging.getLogger(__name__)

WINDOW_S = 60.0  # restarts within this long of each other count toward the back-off


class Part(Protocol):
    name: str

    @property
    def failure(self) -> BaseException | None: ...


@runtime_checkable
class Restartable(Part, Protocol):
    def restart(self) -> None: ...


class Supervisor:
    def __init__(self, parts: Sequence[Part], metrics: Metrics, *, interval_s: float = 0.5,
                 backoff_s: tuple[float, float] = (1.0, 30.0), clock: Callable[[], float] = time.monotonic) -> None:
        self.parts = list(parts)
        self.restarts: Counter[str] = Counter()
        self._metrics = metrics
        self._interval_s = interval_s
        self._first_s, self._max_s = backoff_s
        self._clock = clock
        self._recent: dict[str, deque[float]] = {}  # part -> when it was restarted, within WINDOW_S
        self._due: dict[str, float] = {}  # part -> when to restart it (clock)
        self._task: asyncio.Task[None] | None = None

    def dead(self) -> list[str]:
        """The parts not running now (dead, or waiting for their restart)."""
        return [part.name for part in self.parts if part.failure is not None]

    def check(self) -> None:
        """Restart what died and whose back-off has passed."""
        now = self._clock()
        for part in self.parts:
            if part.failure is None or not isinstance(part, Restartable):
                continue
            recent = self._recent.setdefault(part.name, deque())
            while recent and now - recent[0] > WINDOW_S:
                recent.popleft()
            if part.name not in self._due:
                self._due[part.name] = now + min(self._max_s, self._first_s * 2.0 ** len(recent))
                log.error("the gateway's %s died (%s); restarting it in %.0f s", part.name, part.failure,
                          self._due[part.name] - now)
            if now < self._due[part.name]:
                continue
            del self._due[part.name]
            try:
                part.restart()
            except Exception:  # it is still dead: the next check tries again, later
                log.exception("could not restart the gateway's %s", part.name)
            recent.append(now)
            self.restarts[part.name] += 1
            self._metrics.restarts.labels(part.name).inc()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="nextturn-supervisor")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                self.check()
            except Exception:  # the supervisor itself must not die of one bad check
                log.exception("the gateway's supervisor failed a check")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
