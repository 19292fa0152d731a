"""Every scope trained from one process: ``nextturn trainer run`` without ``--scope`` when scopes are per
tenant or per user (``NEXTTURN_SCOPE_BY``).

One :class:`~trainer.worker.TrainerWorker` per scope that has signals (``default`` always): each with its
own adapter, optimizer, ledger, checkpoint, lock and consumer group (``trainer-<scope>``), exactly as
``trainer run --scope`` would run it, so a scope moves between this and a trainer of its own without a
signal trained twice or skipped. New scopes are found in the store every ``discover_s`` (one read: the
scopes signals were stored for) and their workers start then; a new scope's group reads the signals topic
from its beginning, so no signal of the scope is missed. Each round runs every worker's round in turn.

The workers share one copy of the base model (:class:`trainer.policy.SharedBase`: each scope's adapter is a
named adapter of one model); each scope's adapter and optimizer state stay in memory. Its limits, stated:
every worker reads the whole signals topic, and at most ``max_scopes`` scopes are trained (the first
found; the rest are logged and wait).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from nextturn import events
from nextturn.store import Store
from trainer.worker import TrainerWorker

log = logging.getLogger(__name__)


class ScopeTrainers:
    def __init__(self, start: Callable[[str], TrainerWorker], store: Store, *, max_scopes: int,
                 discover_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._start = start
        self._store = store
        self._max_scopes = max_scopes
        self._discover_s = discover_s
        self._clock = clock
        self._due = 0.0
        self._waiting: set[str] = set()  # scopes beyond max_scopes, logged once each
        self.workers: dict[str, TrainerWorker] = {}

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.run_once(0.5)

    def run_once(self, timeout_s: float = 1.0) -> int:
        """One round of every scope's worker (after finding new scopes, when due); the signals read."""
        if self._clock() >= self._due:
            self.discover()
            self._due = self._clock() + self._discover_s
        share = timeout_s / max(1, len(self.workers))
        return sum(worker.run_once(share) for worker in list(self.workers.values()))

    def drain(self, idle_s: float = 0.5) -> int:
        """Rounds until a round reads nothing (tests)."""
        total = 0
        while read := self.run_once(idle_s):
            total += read
        return total

    def discover(self) -> list[str]:
        """Start a worker for each scope with signals that has none yet; the scopes started."""
        found = sorted({events.DEFAULT_SCOPE, *self._store.signal_scopes()} - self.workers.keys())
        started = []
        for scope in found:
            if len(self.workers) >= self._max_scopes:
                if scope not in self._waiting:
                    self._waiting.add(scope)
                    log.warning("scope %s waits: this trainer trains at most %d scopes "
                                "(NEXTTURN_TRAINER_MAX_SCOPES)", scope, self._max_scopes)
                continue
            self.workers[scope] = self._start(scope)
            started.append(scope)
            log.info("training scope %s", scope)
        return started

    def close(self) -> None:
        for worker in self.workers.values():
            worker.close()
