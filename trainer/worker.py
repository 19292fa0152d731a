"""The trainer worker (``nextturn trainer run``): trains a scope's adapter from its signals and publishes
each update as a new version.

Alone (``trainer run --scope``) it consumes ``signals`` in the consumer group ``trainer-<scope>``; as one
scope of :class:`trainer.scopes.ScopeTrainers` (``trainer run``) it is handed its scope's signals, and the
weights may be parked between updates (:meth:`TrainerWorker.park`). Order of operations, each round:

1. poll a batch of signals; keep this scope's, and offer each to the ledger (:mod:`trainer.ledger`), which
   turns away revisions it has already seen (replays after a crash, an outbox publishing twice);
2. resolve the waiting signals against the store: the signal row and its turn's token data (a turn the
   recorder has not stored yet keeps waiting). Refused samples (stale, failed, no logprobs) and held-out
   turns (the collapse guards' replay set) are done, and counted;
3. when ``batch_size`` samples are ready and the pacing allows (below): one update with the configured
   algorithm. Where the scope has signals from several tenants, one tenant's samples fill at most
   ``max_tenant_share`` of a batch (the rest wait for others' samples): no tenant alone teaches a shared
   adapter. If it took optimizer steps: measure the collapse guards, write a checkpoint (adapter,
   optimizer, ledger, with the step marked "publish pending"), publish the adapter as the next version
   (``meta.json`` names the step), then clear the mark. An update without signal (every advantage zero)
   takes no step and publishes nothing;
4. save the ledger, then commit the offsets.

**Pacing.** With ``max_ahead`` set and a rollout acting on the scope, the trainer publishes at most that
many versions past the stable one, then waits (its signals wait with it) until the rollout promotes one.
Samples that versions far behind the trainer served are off-policy, and learning from them undoes what was
learnt (docs/experiments.md). A canary holds the stable version back by design, so without pacing the
trainer runs ahead and learns from its own past. When every version past the stable one was rolled back,
rejected or replaced, the trainer **rebases**: it resets its weights (and optimizer) to the stable
version's and trains on from there, so that it neither builds on what the rollout refused nor waits
forever; samples the stable version served then count as fresh.

A crash before the checkpoint of 3 (a kill mid-step) loses only work: the trainer resumes from the last
checkpoint, and the log redelivers what was polled after the last commit; the ledger knows which of those
were trained or are waiting, so every signal is used once. A crash between the checkpoint and the publish
is finished at start: the pending step is published from the checkpoint, unless a version with that step
exists already (the crash came after the rename). One trainer per scope: a lock file makes a second fail.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import col, select

from nextturn import events, tables
from nextturn.bus import BadRecordPolicy, EventLog
from nextturn.deployments import Deployment
from nextturn.erasure import Rules
from nextturn.errors import CommitFailed, ConfigError, EventLogUnavailable, StoreUnavailable
from nextturn.events import SignalExtracted
from nextturn.scopes import chain
from nextturn.settings import Settings
from nextturn.store import Store
from trainer import combined, distillation, guards
from trainer.adapters import AdapterShelf, referenced_versions
from trainer.checkpoint import ADAPTER, OPTIMIZER, Checkpoints
from trainer.ledger import REPLAY_LIMIT, Ledger, event_id_of
from trainer.packing import Update
from trainer.policy import Policy, SharedBase
from trainer.samples import Sample, batch_of, build, held_out, refusal, standing_applies

log = logging.getLogger(__name__)

WEIGHTS = {"rl": (1.0, 0.0), "opd": (0.0, 1.0), "combined": (1.0, 1.0)}
MAX_READY = 8  # batches of samples built and kept in memory while the trainer waits


@dataclass(frozen=True)
class TrainerConfig:
    method: str = "combined"  # rl | opd | combined
    opd_form: str = "distribution"  # distribution | sampled
    divergence: str = "forward"  # forward | reverse (the distribution form's KL)
    span: str = "to_divergence"  # response | to_divergence (the distribution form's positions)
    teacher: str = "base"
    batch_size: int = 16
    steps_per_batch: int = 4
    learning_rate: float = 3e-3
    lora_rank: int = 8
    kl_to_base: float = 0.0
    max_drift: float = 0.3
    max_version_lag: int = 4
    max_ahead: int = 2  # versions published past the stable one before waiting for the rollout; 0: no limit
    standing_hints: int = 3
    holdout_every: int = 16
    keep_versions: int = 10
    device: str = "auto"
    scope_init: str = "parent"  # parent | base: where a new scope's lineage begins
    guard_tokens: int = 32  # tokens sampled per replay prompt for the collapse guards
    # A quiet scope trains a partial batch (at least min_batch samples) once its oldest ready sample has waited
    # this long; None: only full batches.
    partial_after_s: float | None = None
    min_batch: int = 4
    max_tenant_share: float = 0.5  # of a batch, where the scope has several tenants' signals

    def quota(self, shared: bool) -> int:
        """Samples one tenant may put in a batch."""
        return max(1, int(self.max_tenant_share * self.batch_size)) if shared else self.batch_size

    @classmethod
    def from_settings(cls, settings: Settings) -> TrainerConfig:
        if settings.train_method == "none":
            raise ConfigError("NEXTTURN_TRAIN_METHOD=none: there is nothing to train; do not start the trainer")
        return cls(
            method=settings.train_method, opd_form=settings.trainer_opd_form,
            divergence=settings.trainer_opd_divergence, span=settings.trainer_opd_span,
            teacher=settings.trainer_teacher,
            batch_size=settings.trainer_batch_size, steps_per_batch=settings.trainer_steps_per_batch,
            learning_rate=settings.trainer_learning_rate, lora_rank=settings.trainer_lora_rank,
            kl_to_base=settings.trainer_kl_to_base, max_drift=settings.trainer_max_drift,
            max_version_lag=settings.trainer_max_version_lag,
            max_ahead=settings.trainer_max_ahead, standing_hints=settings.trainer_standing_hints,
            holdout_every=settings.trainer_holdout_every,
            keep_versions=settings.trainer_keep_versions, device=settings.trainer_device,
            max_tenant_share=settings.trainer_max_tenant_share, scope_init=settings.trainer_scope_init,
            partial_after_s=settings.trainer_partial_after_s or None, min_batch=settings.trainer_min_batch,
        )

    def objective(self) -> combined.Objective | distillation.Objective:
        w_rl, w_opd = WEIGHTS[self.method]
        shared = {"w_rl": w_rl, "w_opd": w_opd, "kl_to_base": self.kl_to_base, "steps": self.steps_per_batch,
                  "teacher": self.teacher, "max_drift": self.max_drift}
        if self.opd_form == "sampled":
            return combined.Objective(**shared)  # type: ignore[arg-type]
        return distillation.Objective(**shared, divergence=self.divergence, span=self.span)  # type: ignore[arg-type]

    def algorithm(self) -> Callable[[Policy, torch.optim.Optimizer, Sequence[Sample]], Update]:
        objective = self.objective()
        if isinstance(objective, combined.Objective):
            return lambda policy, optimizer, batch: combined.update(policy, optimizer, batch, objective)
        return lambda policy, optimizer, batch: distillation.update(policy, optimizer, batch, objective)


class TrainerWorker:
    def __init__(self, event_log: EventLog, store: Store, *, model_dir: Path, adapters_root: Path,
                 trainer_root: Path, scope: str = events.DEFAULT_SCOPE, config: TrainerConfig = TrainerConfig(),
                 on_bad_record: BadRecordPolicy | None = None, shared: SharedBase | None = None,
                 consume: bool = True) -> None:
        """``consume``: read the signals in a consumer group of this scope's own (``trainer-<scope>``); False
        when a :class:`trainer.scopes.ScopeTrainers` reads them for every scope and hands them over."""
        self.scope = scope
        self._base = shared  # one base model for every scope of this process (None: a copy of its own)
        self.config = config
        self._log = event_log
        self._store = store
        self._model_dir = model_dir
        self.shelf = AdapterShelf(adapters_root, scope)
        self._checkpoints = Checkpoints(trainer_root / scope)
        self._checkpoints.lock()
        self._train = config.algorithm()
        self._ready: dict[str, Sample] = {}  # signal id -> sample built from the store, waiting for a batch
        self._ready_at: dict[str, float] = {}  # signal id -> when its sample became ready (monotonic)
        # Whether the scope has signals from more than one tenant (then it stays so): read from the store once,
        # then from the signals offered.
        self._shared: bool | None = None
        self._tenant: str | None = None
        self._has_room = False  # whether pacing allowed a version at the last refresh()
        self._rules = Rules()  # the erasures this worker has applied (see forget)
        # The weights and the optimizer, loaded when first used and dropped by park(); until the first
        # checkpoint, loaded from ``_start`` (the newest version, the parent's stable one or the base model).
        self._loaded: tuple[Policy, torch.optim.Optimizer] | None = None
        self.ledger, self._start = self._resume()
        self._saved = json.dumps(self.ledger.to_json(), sort_keys=True) if self._checkpoints.current() else ""
        self._consumer = (event_log.consumer(f"trainer-{scope}", [events.SIGNALS], on_bad_record=on_bad_record)
                          if consume else None)
        self.finish_publish()

    @classmethod
    def from_settings(cls, settings: Settings, event_log: EventLog, store: Store,
                      scope: str = events.DEFAULT_SCOPE, shared: SharedBase | None = None) -> TrainerWorker:
        """A trainer of ``scope`` alone; with ``shared``, one scope of a :class:`trainer.scopes.ScopeTrainers`."""
        return cls(event_log, store, model_dir=settings.model_path, adapters_root=settings.adapters_path,
                   trainer_root=settings.trainer_path, scope=scope, config=TrainerConfig.from_settings(settings),
                   shared=shared, consume=shared is None)

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
        self._checkpoints.release()
        self._loaded = None
        if self._base is not None:
            self._base.drop(self.scope)

    # -- start, and the weights -----------------------------------------------------------------------

    def _resume(self) -> tuple[Ledger, Path | None]:
        """The last checkpoint's ledger; else a new one on the newest published version (a lost checkpoint);
        else a new lineage. With it, where the weights start until a checkpoint holds them."""
        saved = self._checkpoints.state()
        if saved is not None:
            return Ledger.from_json(saved), None
        latest = self.shelf.latest()
        ledger = Ledger(head=latest or 0)
        start = self.shelf.path(latest) if latest is not None else None
        if start is None:
            start, ledger.init_from = self._parent_start()
        return ledger, start

    @property
    def policy(self) -> Policy:
        return self._weights()[0]

    @property
    def resident(self) -> bool:
        """Whether the weights and the optimizer state are in memory (see :meth:`park`)."""
        return self._loaded is not None

    def _weights(self) -> tuple[Policy, torch.optim.Optimizer]:
        if self._loaded is None:
            path = self._checkpoints.current()
            if path is None:
                policy = self._load_policy(self._start)
                self._loaded = policy, self._new_optimizer(policy)
            else:
                policy = self._load_policy(path / ADAPTER)
                optimizer = self._new_optimizer(policy)
                # Tensors and numbers only: no pickled code runs (torch 2.6 made this the default).
                optimizer.load_state_dict(torch.load(path / OPTIMIZER, map_location=policy.device, weights_only=True))
                self._loaded = policy, optimizer
        return self._loaded

    def park(self) -> None:
        """Free the weights and the optimizer state; the next use loads them from the checkpoint, which holds
        them as they are (every step and rebase is checkpointed before anything else happens)."""
        if self._loaded is None:
            return
        if self._checkpoints.current() is None:
            self._checkpoints.save(self._write_weights, self.ledger.to_json())
            self._saved = json.dumps(self.ledger.to_json(), sort_keys=True)
        self._loaded = None
        if self._base is not None:
            self._base.drop(self.scope)

    @property
    def _tokenizer(self) -> Any:
        return self._base.tokenizer if self._base is not None else self.policy.tokenizer

    @property
    def _base_model(self) -> str:
        return self._base.base_model if self._base is not None else self.policy.base_model

    def _parent_start(self) -> tuple[Path | None, str | None]:
        """Where a lineage with no version of its own begins: its chain's first stable version (the one its
        scope is served now), with ``scope_init`` parent; else the base model."""
        if self.config.scope_init != "parent":
            return None, None
        for parent in chain(self.scope)[1:]:
            state = Deployment.read(self._store, parent)
            if state.stable is None:
                continue
            row = self._store.get(tables.Adapter, (parent, state.stable))
            path = Path(row.path) if row is not None else None
            if path is not None and (path / "adapter_config.json").is_file():
                log.info("scope %s begins from %s", self.scope, state.stable_name)
                return path, state.stable_name
            log.warning("scope %s cannot begin from %s (no adapter at %s): from the base model",
                        self.scope, state.stable_name, path)
            return None, None
        return None, None

    def _load_policy(self, adapter: Path | None) -> Policy:
        if self._base is not None:
            return self._base.policy(self.scope, rank=self.config.lora_rank, adapter=adapter)
        return Policy.load(self._model_dir, rank=self.config.lora_rank, adapter=adapter, device=self.config.device)

    def _new_optimizer(self, policy: Policy) -> torch.optim.Optimizer:
        return torch.optim.AdamW(policy.parameters(), lr=self.config.learning_rate, weight_decay=0.0)

    # -- the loop -------------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.run_once(timeout_s=0.5)

    def run_once(self, timeout_s: float = 1.0) -> int:
        """One round (see the module docstring); return how many signals were read."""
        assert self._consumer is not None, "this worker's signals are handed to it (consume=False)"
        if not self.finish_publish():
            return 0  # the log is down: nothing new may be committed before the pending version is out
        deliveries = self._consumer.poll(500, timeout_s)
        try:
            self.forget(self._store.erasures.read_store(self._store))
        except StoreUnavailable as exc:  # what this round takes of a newer erasure is dropped the next round
            log.warning("cannot read the erasures now: %s", exc)
        for item in deliveries:
            # A signal that trains several scopes is written once under each one's key: take ours (or one
            # written before signals were keyed by scope).
            if isinstance(item.event, SignalExtracted) and (
                    item.key == self.scope or item.key is None or not item.event.trains(item.key)):
                self.take(item.event)
        self.refresh()
        while self.train():
            self.refresh()
        self.save()
        try:
            self._consumer.commit()
        except CommitFailed:
            pass  # the group moved on: the records come again, and the ledger knows them
        return len(deliveries)

    def drain(self, idle_s: float = 0.5) -> int:
        """Rounds until a poll waits ``idle_s`` for nothing (tests, benchmarks)."""
        total = 0
        while read := self.run_once(idle_s):
            total += read
        return total

    def take(self, signal: SignalExtracted) -> None:
        """Offer a signal read from the log (one not for this scope is ignored)."""
        if not signal.trains(self.scope):
            return  # another scope's trainer takes it
        if self._rules.covers(signal):
            self.ledger.count("forgotten")
            return
        self.ledger.count("received")
        self._saw(signal.tenant)
        if self.ledger.offer(signal):
            self._ready.pop(signal.signal_id, None)  # a newer revision replaces a ready older one

    def forget(self, rules: Rules) -> None:
        """Apply the erasures (:mod:`nextturn.erasure`) it has not applied yet: a removed scope starts over
        (its state from before the removal is dropped, in memory and on disk); otherwise the waiting signals,
        ready samples, standing hints and held-out turns of forgotten sessions are dropped. Saved at once,
        so no checkpoint keeps a forgotten hint."""
        if rules is self._rules:
            return
        self._rules = rules
        removed = rules.scopes.get(self.scope)
        if removed is not None and (self.ledger.removed_at is None or self.ledger.removed_at < removed.timestamp()):
            self._start_over(removed.timestamp())
            return
        self.ledger.forget(rules)
        for key, sample in list(self._ready.items()):
            if rules.covers_session(sample.tenant, sample.session_id):
                del self._ready[key]
        if self.ledger.replay and (rules.sessions or rules.tenants):
            kept = self._store.turn_ids(self.ledger.replay)
            self.ledger.replay = [turn_id for turn_id in self.ledger.replay if turn_id in kept]
        self.save()

    def _start_over(self, removed_at: float) -> None:
        """The scope was removed: drop its state from before ``removed_at`` (checkpoints and versions written
        before it, which the erasure deleted unless this trainer wrote them meanwhile) and begin a new lineage."""
        log.warning("scope %s was removed by an erasure: its trainer starts over", self.scope)
        self._checkpoints.clear(before=removed_at)
        self.shelf.remove_written_before(removed_at)
        self._loaded = None
        if self._base is not None:
            self._base.drop(self.scope)
        self._ready.clear()
        self._ready_at.clear()
        self._shared, self._tenant = None, None
        self.ledger, self._start = self._resume()
        self.ledger.removed_at = removed_at
        self._saved = ""

    def refresh(self) -> None:
        """Pacing first (a rebase changes which samples are stale), then build the samples that can be."""
        try:
            self._has_room = self._room()
            self._resolve()
        except StoreUnavailable as exc:
            log.warning("cannot read the store (%s); trying again next round", exc)
            self.ledger.count("store_retries")
            self._has_room = False

    def due(self) -> float | None:
        """When the oldest sample of the batch that would train now became ready (monotonic seconds); None
        when pacing or the samples allow no update (as of the last :meth:`refresh`)."""
        if not self._has_room or self._batch() is None:
            return None
        return min(self._ready_at.values())

    def complete_at(self) -> float | None:
        """When the batch that would train now was complete: its newest sample became ready (monotonic)."""
        if not self._has_room or (batch := self._batch()) is None:
            return None
        return max(self._ready_at[sample.signal_id] for sample in batch)

    def train(self) -> bool:
        """One update, if one is due (it may publish a version); whether one was made."""
        if not self._has_room or (batch := self._batch()) is None:
            return False
        try:
            self._update(batch)
        except StoreUnavailable as exc:
            log.warning("cannot read the store (%s); trying again next round", exc)
            self.ledger.count("store_retries")
            return False
        self._has_room = False  # until the next refresh() asks the rollout again
        return True

    # -- samples --------------------------------------------------------------------------------------

    def _resolve(self) -> None:
        """Build the samples of waiting signals whose turn is in the store; turn away what cannot train."""
        pending = {event_id_of(entry): key for key, entry in self.ledger.waiting.items() if key not in self._ready}
        if not pending:
            return
        signals, turns = self._rows(list(pending))
        found = [(signals[e], turns[signals[e].turn_id], key) for e, key in pending.items()
                 if e in signals and signals[e].turn_id in turns]  # the others wait for the recorder
        if self._shared is None:
            for tenant in self._store.scope_tenants(self.scope, limit=2):
                self._saw(tenant)
            self._shared = bool(self._shared)
        # The trainer waits for the rollout, or for other tenants: the rest wait in the ledger, not in memory,
        # and a tenant over its share does not crowd the others' samples out.
        per_tenant = Counter(sample.tenant for sample in self._ready.values())
        bound = MAX_READY * self.config.quota(bool(self._shared))
        # In the order the turns were served: a tenant's hint becomes standing for the turns after it.
        for signal, turn, key in sorted(found, key=lambda item: (_aware(item[1].started_at), item[1].id)):
            if len(self._ready) >= MAX_READY * self.config.batch_size:
                break
            if per_tenant[turn.tenant] >= bound:
                continue
            if held_out(turn.id, self.config.holdout_every):
                self.ledger.hold_out(key, signal.revision, turn.id)
                self.ledger.count("held_out")
                continue
            why = refusal(turn, scope=self.scope, lag=self.ledger.lag, max_lag=self.config.max_version_lag,
                          shared=self.scope in (signal.also_trains or []))
            w_rl, w_opd = WEIGHTS[self.config.method]
            standing = [] if signal.hint else self._standing(turn)
            teaches = (signal.reward is not None and w_rl) or ((signal.hint or standing) and w_opd)
            if why is None and not teaches:
                why = "no_signal"  # nothing this method learns from (rl: no reward; opd: no hint)
            if why is not None:
                self.ledger.finish(key, signal.revision, signal.reward, signal.hint)
                self.ledger.count(f"refused_{why}")
                continue
            if signal.hint and signal.hint_source in (None, "user"):
                # Only the user's own words become standing: a failed tool call's report, or the judge's hint,
                # is about that turn (a "division by zero" note made the teacher garble later sums).
                self.ledger.remember_hint(turn.tenant, signal.hint, self.config.standing_hints, turn.session_id)
            self._ready[key] = build(signal, turn, self._tokenizer, standing)
            self._ready_at.setdefault(key, time.monotonic())
            per_tenant[turn.tenant] += 1

    def _saw(self, tenant: str) -> None:
        if self._tenant is None:
            self._tenant = tenant
        elif tenant != self._tenant:
            self._shared = True

    def _batch(self) -> list[Sample] | None:
        """A full batch; or, once the oldest ready sample waited ``partial_after_s``, a partial one."""
        self._ready_at = {key: at for key, at in self._ready_at.items() if key in self._ready}
        minimum = None
        waited = time.monotonic() - min(self._ready_at.values(), default=time.monotonic())
        if self.config.partial_after_s is not None and waited >= self.config.partial_after_s:
            minimum = self.config.min_batch
        return batch_of(list(self._ready.values()), self.config.batch_size, self.config.quota(bool(self._shared)),
                        minimum)

    def _standing(self, turn: tables.Turn) -> list[str]:
        if not self.config.standing_hints or not standing_applies(turn):
            return []
        return self.ledger.standing_hints(turn.tenant)

    def _rows(self, event_ids: list[str]) -> tuple[dict[str, tables.Signal], dict[str, tables.Turn]]:
        """The signal rows and their turns, read IN_CHUNK ids at a time: a paced trainer may hold tens of
        thousands of waiting signals, and databases cap the parameters of one query (SQLite 32,766)."""
        try:
            with self._store.session() as db:
                signals = {row.id: row for chunk in _chunks(event_ids) for row in db.exec(
                    select(tables.Signal).where(col(tables.Signal.id).in_(chunk)))}
                turn_ids = list({row.turn_id for row in signals.values()})
                turns = {row.id: row for chunk in _chunks(turn_ids) for row in db.exec(
                    select(tables.Turn).where(col(tables.Turn.id).in_(chunk)))}
        except SQLAlchemyError as exc:
            raise StoreUnavailable(f"cannot read signals and turns from the store: {exc}") from exc
        return signals, turns

    # -- pacing -----------------------------------------------------------------------------------------

    def _room(self) -> bool:
        """Whether the trainer may publish another version now (see Pacing in the module docstring)."""
        if not self.config.max_ahead:
            return True
        state = Deployment.read(self._store, self.scope)
        if state.last_event_id is None:
            return True  # no rollout has acted on this scope: nothing to follow
        stable = state.stable or 0
        if self.ledger.head - stable < self.config.max_ahead or self.ledger.rebased == [stable, self.ledger.head]:
            return True  # room ahead, or just reset to the stable version
        statuses = self._store.adapter_statuses(self.scope)
        # A version not in the store yet was just published: the rollout has yet to see it.
        if any(statuses.get(version, "published") in ("published", "canary")
               for version in range(stable + 1, self.ledger.head + 1)):
            return False
        self._rebase(state.stable)
        return True

    def _rebase(self, stable: int | None) -> None:
        """Reset the weights and the optimizer to the stable version's (the base model's for None)."""
        log.warning("every version after %s was rolled back, rejected or replaced: training on from it",
                    events.adapter_name(self.scope, stable) if stable else events.BASE_VERSION)
        start = self.shelf.path(stable) if stable else None
        if start is None:  # what serves the scope: its parent's stable version, or the base model
            start, self.ledger.init_from = self._parent_start()
        policy = self._load_policy(start)
        self._loaded = policy, self._new_optimizer(policy)
        self.ledger.rebased = [stable or 0, self.ledger.head]
        self.ledger.count("rebased")
        self._checkpoints.save(self._write_weights, self.ledger.to_json())
        self._saved = json.dumps(self.ledger.to_json(), sort_keys=True)

    # -- an update ------------------------------------------------------------------------------------

    def _update(self, batch: list[Sample]) -> None:
        # A sample whose version fell too far behind while it waited is stale now.
        fresh = []
        for sample in batch:
            served = events.served_version(sample.adapter_version)
            ours = served is not None and served[0] in (None, self.scope)  # an ancestor's version has no lag here
            if served is not None and ours and self.ledger.lag(served[1]) > self.config.max_version_lag:
                self._ready.pop(sample.signal_id)
                self.ledger.finish(sample.signal_id, sample.revision, sample.reward, sample.hint)
                self.ledger.count("refused_stale")
            else:
                fresh.append(sample)
        if len(fresh) < len(batch):
            return  # the batch shrank: wait for more samples
        policy, optimizer = self._weights()
        result = self._train(policy, optimizer, batch)
        for sample in batch:
            self._ready.pop(sample.signal_id)
            self.ledger.finish(sample.signal_id, sample.revision, sample.reward, sample.hint)
        self.ledger.count("samples_trained" if result.steps else "samples_without_signal", len(batch))
        if not result.steps:
            self.ledger.count("updates_skipped")
            log.info("batch of %d took no step: %s", len(batch), result.skipped)
            return
        self.ledger.step += 1
        self.ledger.count("updates")
        self.ledger.publish_pending = self.ledger.step
        meta = self._describe(batch, result)
        self._checkpoints.save(self._write_weights, {**self.ledger.to_json(), "meta": meta})
        self._saved = ""
        self.finish_publish()

    def _write_weights(self, directory: Path) -> None:
        policy, optimizer = self._weights()
        policy.save(directory / ADAPTER)
        torch.save(optimizer.state_dict(), directory / OPTIMIZER)

    def _describe(self, batch: list[Sample], result: Update) -> dict[str, Any]:
        served: dict[str, int] = {}
        for sample in batch:
            served[sample.adapter_version] = served.get(sample.adapter_version, 0) + 1
        return {
            "step": self.ledger.step,
            "init_from": self.ledger.init_from,  # the parent version the lineage began from (None: the base)
            "config": asdict(self.config),
            "data": {"signals": [s.signal_event_id for s in batch], "served_by": served,
                     "rewards": sum(s.reward is not None for s in batch),
                     "hints": sum(s.hint is not None for s in batch),
                     "standing_hints": sum(s.hint is None and s.teacher_hint is not None for s in batch)},
            "metrics": {"optimizer_steps": result.steps, "tokens": result.tokens, "losses": result.losses,
                        **result.stats},
            "guards": guards.measure(self.policy, self._replay(batch), max_new_tokens=self.config.guard_tokens),
        }

    def _replay(self, batch: list[Sample]) -> guards.Replay:
        """The held-out turns, with their latest signals' rewards as outcomes; the batch's prompts until
        enough turns are held out."""
        if len(self.ledger.replay) < 4:
            return guards.Replay([s.prompt_ids for s in batch[:REPLAY_LIMIT]], [], held_out=False)
        with self._store.session() as db:
            turns = list(db.exec(select(tables.Turn).where(col(tables.Turn.id).in_(self.ledger.replay))))
            rows = db.exec(select(tables.Signal).where(col(tables.Signal.turn_id).in_(self.ledger.replay)))
            reward: dict[str, tuple[int, float | None]] = {}
            for row in rows:
                if row.turn_id not in reward or row.revision > reward[row.turn_id][0]:
                    reward[row.turn_id] = (row.revision, row.reward)
        outcomes = [guards.Outcome(t.prompt_token_ids, t.response_token_ids, t.response_logprobs or [],
                                   reward[t.id][1] or 0.0)
                    for t in turns if t.response_logprobs and t.id in reward and reward[t.id][1] is not None]
        return guards.Replay([t.prompt_token_ids for t in turns], outcomes, held_out=True)

    # -- publishing -----------------------------------------------------------------------------------

    def finish_publish(self) -> bool:
        """Publish the checkpointed step as the next version (once); False when the log is unavailable."""
        step = self.ledger.publish_pending
        if step is None:
            return True
        checkpoint = self._checkpoints.current()
        assert checkpoint is not None
        saved = self._checkpoints.state() or {}
        existing = [v for v in self.shelf.versions() if self.shelf.meta(v).get("step") == step]
        try:
            if existing:
                version = existing[0]  # the crash came after the rename: announce it, do not train it again
                self._log.append([self.shelf.event(version)])
            else:
                version = self.shelf.publish(
                    lambda target: _copy_adapter(checkpoint / ADAPTER, target),
                    base_model=self._base_model, parent_version=self.ledger.parent() or None,
                    meta=saved.get("meta", {"step": step}), event_log=self._log).version
        except EventLogUnavailable as exc:
            log.warning("published step %d, but cannot announce it (%s); trying again", step, exc)
            return False
        self.ledger.head = version
        self.ledger.publish_pending = None
        self.save()
        self.ledger.count("versions_published")
        self.shelf.prune(self.config.keep_versions, referenced_versions(self._store, self.scope))
        log.info("published %s", events.adapter_name(self.scope, version))
        return True

    def save(self) -> None:
        """Write the ledger when it changed (the offsets are committed only after this)."""
        now = json.dumps(self.ledger.to_json(), sort_keys=True)
        if now == self._saved:
            return
        if self._checkpoints.current() is None:
            self._checkpoints.save(self._write_weights, self.ledger.to_json())
        else:
            saved = self._checkpoints.state() or {}
            self._checkpoints.save_state({**self.ledger.to_json(), "meta": saved.get("meta")})
        self._saved = now


def _aware(moment: datetime) -> datetime:
    """SQLite hands datetimes back without their zone; they were written in UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _copy_adapter(source: Path, target: Path) -> None:
    for entry in source.iterdir():
        shutil.copy2(entry, target / entry.name)


IN_CHUNK = 500  # ids per IN (...) query


def _chunks(ids: list[str]) -> list[list[str]]:
    """
    >>> [len(chunk) for chunk in _chunks([str(n) for n in range(1001)])]
    [500, 500, 1]
    """
    return [ids[start:start + IN_CHUNK] for start in range(0, len(ids), IN_CHUNK)]
