"""Served turns with real token data for the tiny model, their signals, and trainers (for trainer tests)."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import torch
from trl.trainer.utils import selective_log_softmax

from nextturn import events
from nextturn.bus import EventLog
from nextturn.conversation import prompt_token_ids
from nextturn.store import Store
from trainer.packing import pack, response_logits
from trainer.policy import Policy
from trainer.worker import TrainerConfig, TrainerWorker

from support.event_logs import open_log

QUESTIONS = ("Name a flower.", "Give me a color.", "Say a number.", "Name a day of the week.")
ANSWERS = ("Lotus.", "Blue, I think.", "Seven.", "Monday is one.")


def served(policy: Policy, n: int, *, adapter_version: str = events.BASE_VERSION, tenant: str = "acme",
           status: str = "ok", logprobs: bool = True) -> events.TurnRecorded:
    """Turn ``n`` as the engine would record it: the template's prompt ids, the answer's ids and the base
    model's logprob of each answer token. Ids are deterministic in ``n``."""
    tokenizer = policy.tokenizer
    messages = [events.ChatMessage(role="user", content=QUESTIONS[n % 4])]
    prompt = prompt_token_ids(tokenizer, messages, None)
    response = tokenizer(ANSWERS[n % 4], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    packed = pack([prompt], [response], tokenizer.pad_token_id, policy.device)
    with torch.no_grad(), policy.base():
        behaviour = selective_log_softmax(response_logits(policy.model, packed), packed.response_ids)[0].tolist()
    started = events.utc_now()
    return events.TurnRecorded(
        event_id=f"turn-event-{n}", tenant=tenant, session_id=f"s{n}", turn_id=f"chatcmpl-test-{n}", model="tiny",
        adapter_version=adapter_version, messages=messages,
        response=events.ChatMessage(role="assistant", content=ANSWERS[n % 4]) if status == "ok" else None,
        prompt_token_ids=prompt, response_token_ids=response if status == "ok" else [],
        response_logprobs=behaviour if status == "ok" and logprobs else None,
        finish_reason="stop" if status == "ok" else "error", status=status,  # type: ignore[arg-type]
        error=None if status == "ok" else "the engine failed", latency_ms=5.0, started_at=started,
        finished_at=started + timedelta(milliseconds=5))


def signal(turn: events.TurnRecorded, *, reward: float | None = 1.0, hint: str | None = None,
           revision: int = 0, hint_source: events.HintSource = "user") -> events.SignalExtracted:
    signal_id = f"{turn.turn_id}:extractor-v1"
    return events.SignalExtracted(
        event_id=f"{signal_id}.{revision}", signal_id=signal_id, revision=revision, tenant=turn.tenant,
        scope=turn.scope, session_id=turn.session_id, turn_id=turn.turn_id, adapter_version=turn.adapter_version,
        reward=reward, hint=hint, hint_source=hint_source if hint else None, confidence=1.0,
        extractor_version="extractor-v1")


def record(store: Store, log: EventLog, *items: events.Event) -> None:
    """What the recorder and the signals worker leave behind: rows in the store, signals on the log."""
    store.apply(list(items))
    log.append([item for item in items if isinstance(item, events.SignalExtracted)])


def config(**fields: object) -> TrainerConfig:
    """Small and quick: batches of 4, 2 optimizer steps, nothing held out, short guard samples, the CPU."""
    defaults: dict[str, object] = {"batch_size": 4, "steps_per_batch": 2, "holdout_every": 0, "guard_tokens": 8,
                                   "device": "cpu"}
    return TrainerConfig(**{**defaults, **fields})  # type: ignore[arg-type]


def trainer(log: EventLog, store: Store, model: Path, root: Path, **fields: object) -> TrainerWorker:
    return TrainerWorker(log, store, model_dir=model, adapters_root=root / "adapters", trainer_root=root / "trainer",
                         config=config(**fields))


def published(root: Path, scope: str = events.DEFAULT_SCOPE) -> dict[int, dict]:  # type: ignore[type-arg]
    """version -> meta.json of every version on disk."""
    import json

    directory = root / "adapters" / scope
    if not directory.exists():
        return {}
    return {int(p.name): json.loads((p / "meta.json").read_text())
            for p in sorted(directory.iterdir()) if p.name.isdigit()}


STAGES = ("mid-update", "before-publish", "after-publish", "before-commit")


def run_until_crash(backend: str, where: str, store_url: str, model: str, root: str, stage: str) -> None:
    """A trainer that dies at ``stage`` of its first update (``os._exit``: no cleanup, like a kill): during
    the update (weights changed in memory only), after its checkpoint but before publishing, after the
    version's rename but before the ledger knows it, or after all that but before committing offsets."""
    assert stage in STAGES

    class Dying(TrainerWorker):
        def _update(self, batch):  # type: ignore[no-untyped-def]
            train = self._train

            def dying(policy, optimizer, samples):  # type: ignore[no-untyped-def]
                result = train(policy, optimizer, samples)
                if stage == "mid-update":
                    os._exit(70)
                return result

            self._train = dying
            super()._update(batch)
            if stage == "before-commit":
                os._exit(70)

        def save(self) -> None:
            if stage == "after-publish" and self.ledger.head >= 1:
                os._exit(70)
            super().save()

        def finish_publish(self) -> bool:
            if stage == "before-publish" and self.ledger.publish_pending is not None:
                os._exit(70)
            return super().finish_publish()

    worker = Dying(open_log(backend, where), Store(store_url), model_dir=Path(model),
                   adapters_root=Path(root) / "adapters", trainer_root=Path(root) / "trainer", config=config())
    while True:
        worker.run_once(0.5)


def run_scope_trainers(backend: str, where: str, store_url: str, model: str, root: str) -> None:
    """``trainer run`` without ``--scope``, as a member of the trainers' group, until killed; it says on
    stderr which scopes it takes (the test reads it)."""
    import logging
    import sys

    from trainer.policy import SharedBase
    from trainer.scopes import ScopeTrainers

    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(name)s %(message)s")
    log, store = open_log(backend, where), Store(store_url)
    shared = SharedBase(Path(model), device="cpu")
    trainers = ScopeTrainers(log, lambda scope: TrainerWorker(
        log, store, model_dir=Path(model), adapters_root=Path(root) / "adapters", trainer_root=Path(root) / "trainer",
        scope=scope, config=config(), shared=shared, consume=False), store=store, max_resident=2)
    while True:
        trainers.run_once(0.5)
