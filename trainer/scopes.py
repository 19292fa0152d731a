"""Every scope trained from one process, and scopes shared between trainer processes: ``nextturn trainer
run`` without ``--scope``.

Signals are keyed by scope (a signal that also trains the shared scope is written under that key too:
:attr:`nextturn.events.SignalExtracted.record_keys`), so all of a scope's records land in one partition.
The trainers are members of one consumer group (``trainers``) and the group splits the partitions: a scope
is trained by the one trainer that holds its partition. Each round:

1. poll; a record's key names the scope it trains (a record whose key is not a scope it trains, written
   before signals were keyed by scope, is written again under its scopes' keys and trains from there);
2. let go of the scopes whose partitions the group moved to another member (their ledgers were saved
   and committed last round); take a scope whose records arrive: a :class:`~trainer.worker.TrainerWorker`
   of its own (adapter, optimizer, ledger, checkpoint, lock), resumed from its checkpoint, so a scope that
   moves between trainers goes on where its last owner saved it, and the log redelivers what that owner
   had not committed: nothing trained twice, nothing skipped. While the old owner still holds the scope's
   lock (it lets go at its next poll, after the round it is in, which may train for minutes), the new one
   reads that partition again from the scope's first record the next round, and trains its other scopes;
3. refresh every scope (pacing, samples), then one update for each scope that has a batch, **oldest
   waiting sample first**, so a busy scope cannot starve a quiet one;
4. save every scope's ledger, then commit the group's offsets.

Weights: one copy of the base model (:class:`trainer.policy.SharedBase`); at most ``max_resident`` scopes
keep their adapter and optimizer state in memory (on the training device). The least recently used one
beyond that is parked: its checkpoint holds its weights, loaded again when it next trains.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from nextturn import events
from nextturn.bus import BadRecordPolicy, EventLog
from nextturn.erasure import Rules
from nextturn.errors import CommitFailed, EventLogUnavailable, StoreUnavailable
from nextturn.events import SignalExtracted
from nextturn.store import Store
from trainer.errors import TrainerBusy
from trainer.worker import TrainerWorker

log = logging.getLogger(__name__)

GROUP = "trainers"
FIGURES_KEPT = 1000


class ScopeTrainers:
    def __init__(self, event_log: EventLog, start: Callable[[str], TrainerWorker], *, store: Store,
                 max_resident: int, lock_wait_s: float = 600.0, on_bad_record: BadRecordPolicy | None = None) -> None:
        """``start(scope)``: the scope's worker, made with ``consume=False`` (this reads its signals)."""
        self._log = event_log
        self._store = store
        self._rules = Rules()  # the erasures, read once a round for every scope held
        self._start = start
        self._max_resident = max_resident
        self._lock_wait_s = lock_wait_s  # a scope locked longer than this is logged: a trainer of it alone?
        self._busy_since: dict[str, float] = {}  # scope -> since when another trainer holds its lock
        self._consumer = event_log.consumer(GROUP, [events.SIGNALS], on_bad_record=on_bad_record)
        self.workers: dict[str, TrainerWorker] = {}
        self._partition: dict[str, int] = {}  # scope -> the partition its records come on
        self._used: dict[str, float] = {}  # scope -> when its weights were last used (parking order)
        self.counts: dict[str, int] = {"scopes_taken": 0, "scopes_let_go": 0, "parked": 0, "rerouted": 0}
        # The latest figures (bench/trainer_scaling.py): seconds a parked scope's weights took to load again, and
        # seconds from a scope's batch being complete (its newest sample ready) to its update.
        self.switches: deque[float] = deque(maxlen=FIGURES_KEPT)
        self.waits: deque[float] = deque(maxlen=FIGURES_KEPT)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.run_once(0.5)

    def run_once(self, timeout_s: float = 1.0) -> int:
        """One round (see the module docstring); the records read."""
        if not all(worker.finish_publish() for worker in self.workers.values()):
            return 0  # the log is down: nothing may be committed before a pending version is out
        deliveries = self._consumer.poll(500, timeout_s)
        self._let_go(self._consumer.held())
        try:
            self._rules = self._store.erasures.read_store(self._store)
        except StoreUnavailable as exc:  # what this round takes of a newer erasure is dropped the next round
            log.warning("cannot read the erasures now: %s", exc)
        for worker in self.workers.values():
            worker.forget(self._rules)
        misrouted: list[SignalExtracted] = []
        waiting: dict[int, int] = {}  # partition -> the offset it is read again from (a scope still locked)
        for item in deliveries:
            if not isinstance(item.event, SignalExtracted) or item.partition in waiting:
                continue
            if item.key is None or not item.event.trains(item.key):
                misrouted.append(item.event)
                continue
            taker = self._worker(item.key, item.partition)
            if taker is None:
                waiting[item.partition] = item.offset
                continue
            taker.take(item.event)
        if misrouted and not self._reroute(misrouted):
            return len(deliveries)  # not committed: the records come again
        for partition, offset in waiting.items():
            self._consumer.seek(events.SIGNALS, partition, offset)  # committed up to there, and read again
        for worker in self.workers.values():
            worker.refresh()
        due = sorted((at, scope) for scope, worker in self.workers.items() if (at := worker.due()) is not None)
        for _, scope in due:
            complete = self.workers[scope].complete_at()
            if complete is not None:
                self.waits.append(time.monotonic() - complete)
            self._train(scope)
        for scope, worker in self.workers.items():
            worker.save()
            if worker.resident:
                self._used.setdefault(scope, time.monotonic())  # loaded to write its first checkpoint
        self._park_beyond(None)
        try:
            self._consumer.commit()
        except CommitFailed:
            pass  # the group moved on: the records come again to their new owner, whose ledger knows them
        return len(deliveries)

    def drain(self, idle_s: float = 0.5) -> int:
        """Rounds until a poll waits ``idle_s`` for nothing and no scope has an update due (tests)."""
        total = 0
        while (read := self.run_once(idle_s)) or any(w.due() is not None for w in self.workers.values()):
            total += read
        return total

    def close(self) -> None:
        for worker in self.workers.values():
            worker.close()
        self._consumer.close()

    # -- scopes coming and going ----------------------------------------------------------------------

    def _worker(self, scope: str, partition: int) -> TrainerWorker | None:
        """The scope's worker; None while the trainer that held the scope before has not let go of it."""
        worker = self.workers.get(scope)
        if worker is None:
            taken = self._take(scope)
            if taken is None:
                return None
            worker = self.workers[scope] = taken
            worker.forget(self._rules)  # its checkpoint may hold what was forgotten since it was saved
            self.counts["scopes_taken"] += 1
            log.info("training scope %s (partition %d)", scope, partition)
        self._partition[scope] = partition
        return worker

    def _take(self, scope: str) -> TrainerWorker | None:
        """The scope's worker, or None while another trainer holds its lock."""
        try:
            taken = self._start(scope)
        except TrainerBusy:
            since = self._busy_since.setdefault(scope, time.monotonic())
            waited = time.monotonic() - since
            if waited >= self._lock_wait_s:
                log.warning("another trainer has held scope %s for %.0f s: a trainer of that scope alone "
                            "(trainer run --scope) beside this group? Run one or the other", scope, waited)
                self._busy_since[scope] = time.monotonic()
            return None
        self._busy_since.pop(scope, None)
        return taken

    def _let_go(self, held: frozenset[int]) -> None:
        for scope in [s for s, partition in self._partition.items() if partition not in held]:
            worker = self.workers.pop(scope)
            worker.save()
            worker.close()
            del self._partition[scope]
            self._used.pop(scope, None)
            self.counts["scopes_let_go"] += 1
            log.info("scope %s moved to another trainer", scope)

    def _reroute(self, signals: list[SignalExtracted]) -> bool:
        """Write records keyed otherwise (before signals were keyed by scope) again under their scopes."""
        try:
            self._log.append(signals)
        except EventLogUnavailable as exc:
            log.warning("cannot write %d signal(s) again under their scopes (%s); trying again", len(signals), exc)
            return False
        self.counts["rerouted"] += len(signals)
        return True

    # -- weights in memory ----------------------------------------------------------------------------

    def _train(self, scope: str) -> None:
        worker = self.workers[scope]
        if not worker.resident:
            self._park_beyond(scope, room_for_one=True)
            began = time.perf_counter()
            worker.policy  # noqa: B018  (loads the weights and the optimizer state)
            self.switches.append(time.perf_counter() - began)
        self._used[scope] = time.monotonic()
        worker.train()

    def _park_beyond(self, keep: str | None, *, room_for_one: bool = False) -> None:
        """Park the least recently used scopes until at most ``max_resident`` (one fewer with
        ``room_for_one``) keep their weights in memory; never ``keep``."""
        bound = self._max_resident - (1 if room_for_one else 0)
        resident = sorted((self._used.get(scope, 0.0), scope) for scope, worker in self.workers.items()
                          if worker.resident and scope != keep)
        for _, scope in resident[:max(0, len(resident) - bound)]:
            self.workers[scope].park()
            self._used.pop(scope, None)
            self.counts["parked"] += 1
