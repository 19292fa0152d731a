"""The trainer worker: signals in, numbered versions out, each signal used once, through crashes."""

from __future__ import annotations

import asyncio
import multiprocessing
import sqlite3
from pathlib import Path

import pytest
import sqlalchemy
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from gateway.engines.embedded import EmbeddedEngine
from gateway.schemas import ChatCompletionRequest
from nextturn import deployments, erasure, events, tables
from nextturn.bus import EventLog
from nextturn.errors import ConfigError
from nextturn.settings import Settings
from nextturn.store import Store, upgrade
from trainer import distillation
from trainer.checkpoint import OPTIMIZER, Checkpoints
from trainer.errors import TrainerBusy
from trainer.policy import Policy, SharedBase, pick_device
from trainer.scopes import ScopeTrainers
from trainer.worker import TrainerConfig, TrainerWorker

from support.event_logs import open_log
from support.eventually import eventually
from support.trained import STAGES, config, published, record, run_until_crash, served, signal, trainer

pytestmark = pytest.mark.slow  # trainers on a real model, killed at every step


@pytest.fixture(scope="module")
def base(tiny_model: Path) -> Policy:
    """The tiny base model, to compute the behaviour logprobs of served turns."""
    return Policy.load(tiny_model, rank=4, device="cpu")


@pytest.fixture
def sqlite_log(tmp_path: Path) -> EventLog:
    return open_log("sqlite", str(tmp_path / "events.db"))


def _adapters_announced(log: EventLog) -> list[events.AdapterPublished]:
    reader = log.consumer(None, [events.ADAPTERS], start="beginning")
    found = [d.event for d in reader.poll(100, 0.5) if isinstance(d.event, events.AdapterPublished)]
    reader.close()
    return found


def test_a_batch_of_signals_becomes_a_version_that_the_embedded_engine_serves_differently(
        base: Policy, tiny_model: Path, store: Store, sqlite_log: EventLog, tmp_path: Path) -> None:
    turns = [served(base, n) for n in range(4)]
    signals = [signal(turns[0], reward=1.0), signal(turns[1], reward=-1.0),
               signal(turns[2], reward=None, hint="Answer with one word."),
               signal(turns[3], reward=1.0, hint="Always end with a full stop.")]
    record(store, sqlite_log, *turns, *signals)
    worker = trainer(sqlite_log, store, tiny_model, tmp_path)
    worker.drain(0.3)
    worker.close()

    versions = published(tmp_path)
    assert list(versions) == [1]
    meta = versions[1]
    assert meta["step"] == 1 and meta["parent_version"] is None and meta["scope"] == "default"
    assert sorted(meta["data"]["signals"]) == sorted(s.event_id for s in signals)
    assert (meta["data"]["rewards"], meta["data"]["hints"], meta["data"]["served_by"]) == (3, 2, {"base": 4})
    assert meta["metrics"]["optimizer_steps"] == 2
    for guard in ("entropy", "distinct_1", "distinct_2", "length", "kl_to_base"):
        assert isinstance(meta["guards"][guard], float)
    assert meta["guards"]["kl_to_base"] > 0 and set(meta["guards"]["base"]) >= {"entropy", "distinct_2", "length"}
    [announced] = _adapters_announced(sqlite_log)
    assert (announced.version, announced.scope, announced.path) == (1, "default", str(tmp_path.resolve() / "adapters"
                                                                                         / "default" / "000001"))
    assert worker.ledger.counts["samples_trained"] == 4 and worker.ledger.head == 1

    async def answers() -> tuple[list[float] | None, list[float] | None]:
        engine = EmbeddedEngine(tiny_model, device="cpu")
        await engine.start()
        try:
            await engine.add_adapter(events.adapter_name("default", 1), announced.path)
            ask = {"messages": [{"role": "user", "content": "Name a flower."}], "temperature": 0, "max_tokens": 6}
            before = await engine.complete(ChatCompletionRequest(model="tiny", **ask), events.BASE_VERSION)
            after = await engine.complete(ChatCompletionRequest(model="tiny", **ask), "default-v1")
            return before.response_logprobs, after.response_logprobs
        finally:
            await engine.close()

    before, after = asyncio.run(answers())
    assert before is not None and after is not None
    assert max(abs(a - b) for a, b in zip(before, after, strict=False)) > 1e-3


def test_stale_samples_are_refused_and_counted(base: Policy, tiny_model: Path, store: Store,
                                               sqlite_log: EventLog, tmp_path: Path) -> None:
    first = [served(base, n) for n in range(4)]
    record(store, sqlite_log, *first, *(signal(t) for t in first))
    worker = trainer(sqlite_log, store, tiny_model, tmp_path, max_version_lag=0)
    worker.drain(0.3)
    assert worker.ledger.head == 1
    # Now the head is version 1: turns the base served are one version behind, the limit is 0.
    old = [served(base, n) for n in range(4, 8)]
    new = [served(base, n, adapter_version="default-v1") for n in range(8, 12)]
    record(store, sqlite_log, *old, *new, *(signal(t) for t in old + new))
    worker.drain(0.3)
    worker.close()
    assert worker.ledger.counts["refused_stale"] == 4
    versions = published(tmp_path)
    assert list(versions) == [1, 2] and versions[2]["data"]["served_by"] == {"default-v1": 4}
    assert versions[2]["parent_version"] == 1


class Rollout:
    """Four samples served by a version, and the rollout's decisions, as the recorder stores them."""

    def __init__(self, base: Policy, store: Store, log: EventLog) -> None:
        self.base, self.store, self.log, self.served = base, store, log, 0

    def samples(self, version: str) -> None:
        turns = [served(self.base, n, adapter_version=version) for n in range(self.served, self.served + 4)]
        self.served += 4
        record(self.store, self.log, *turns, *(signal(t) for t in turns))

    def decide(self, move: deployments.Move) -> None:
        self.store.apply(list(_adapters_announced(self.log)))  # the recorder stores each published version
        deployments.commit(self.store, "default", move, lambda change: self.log.append([change]))


def test_the_trainer_waits_for_the_rollout_to_promote_what_it_published(
        base: Policy, tiny_model: Path, store: Store, sqlite_log: EventLog, tmp_path: Path) -> None:
    rollout = Rollout(base, store, sqlite_log)
    worker = trainer(sqlite_log, store, tiny_model, tmp_path, max_ahead=1)
    rollout.samples("base")
    rollout.samples("base")
    worker.drain(0.3)
    assert worker.ledger.head == 2  # no rollout acts on the scope yet: nothing to wait for
    rollout.decide(lambda state: deployments.promote(state, "ops", "looks right", version=1))
    rollout.samples("default-v1")
    rollout.samples("default-v1")
    worker.drain(0.3)
    assert worker.ledger.head == 2 and len(worker.ledger.waiting) == 8  # v2 is one past stable: they wait
    rollout.decide(lambda state: deployments.promote(state, "ops", "better", version=2))
    worker.drain(0.3)
    worker.close()
    assert worker.ledger.head == 3 and len(worker.ledger.waiting) == 4  # one more, then it waits again
    assert published(tmp_path)[3]["parent_version"] == 2 and "rebased" not in worker.ledger.counts


def test_the_trainer_trains_on_from_the_stable_version_when_the_rollout_refused_the_rest(
        base: Policy, tiny_model: Path, store: Store, sqlite_log: EventLog, tmp_path: Path) -> None:
    rollout = Rollout(base, store, sqlite_log)
    worker = trainer(sqlite_log, store, tiny_model, tmp_path, max_ahead=1)
    rollout.samples("base")
    worker.drain(0.3)
    rollout.decide(lambda state: deployments.promote(state, "ops", "looks right", version=1))
    rollout.samples("default-v1")
    worker.drain(0.3)
    assert worker.ledger.head == 2
    rollout.decide(lambda state: deployments.reject(state, 2, "controller", "collapse guard"))
    worker.drain(0.3)  # nothing past the stable v1 is left to decide on: its weights again
    assert worker.ledger.counts["rebased"] == 1 and worker.ledger.head == 2
    v1 = Policy.load(tiny_model, rank=4, adapter=tmp_path / "adapters" / "default" / "000001", device="cpu")
    for mine, theirs in zip(worker.policy.parameters(), v1.parameters(), strict=True):
        assert torch.equal(mine, theirs)
    rollout.samples("default-v1")
    worker.drain(0.3)
    worker.close()
    assert worker.ledger.counts["rebased"] == 1 and worker.ledger.head == 3
    assert published(tmp_path)[3]["parent_version"] == 1


def test_what_cannot_teach_is_turned_away_and_counted(base: Policy, tiny_model: Path, store: Store,
                                                      sqlite_log: EventLog, tmp_path: Path) -> None:
    failed = served(base, 0, status="failed")
    blind = served(base, 1, logprobs=False)
    by_hand = served(base, 2, adapter_version="my-lora")
    elsewhere = served(base, 3, adapter_version="acme-v2")
    silent = served(base, 4)
    good = [served(base, n) for n in range(5, 8)]
    record(store, sqlite_log, failed, blind, by_hand, elsewhere, silent, *good,
           *(signal(t) for t in (failed, blind, by_hand, elsewhere, *good)), signal(silent, reward=None))
    worker = trainer(sqlite_log, store, tiny_model, tmp_path, standing_hints=0)
    worker.drain(0.3)
    worker.close()
    counts = worker.ledger.counts
    assert [counts[f"refused_{why}"] for why in ("failed", "no_logprobs", "unknown_adapter", "foreign_adapter",
                                                 "no_signal")] == [1, 1, 1, 1, 1]
    assert published(tmp_path) == {} and len(worker.ledger.waiting) == 3  # three good ones wait for a fourth


def test_one_tenant_fills_at_most_its_share_of_a_batch_where_tenants_share_a_scope(
    base: Policy, tiny_model: Path, store: Store, sqlite_log: EventLog, tmp_path: Path
) -> None:
    """A tenant that floods a shared scope with signals cannot make an update of its samples alone: with a
    batch of 4 and a share of 0.5, two of its samples go in each batch; the rest wait for others'."""
    flood = [served(base, n, tenant="mallory") for n in range(8)]
    alice = served(base, 8, tenant="alice")
    record(store, sqlite_log, *flood, alice, *(signal(t) for t in (*flood, alice)))
    worker = trainer(sqlite_log, store, tiny_model, tmp_path, standing_hints=0)
    worker.drain(0.3)
    assert published(tmp_path) == {} and len(worker.ledger.waiting) == 9  # 2 of mallory's and alice's: 3 of 4
    bob = served(base, 9, tenant="bob")
    record(store, sqlite_log, bob, signal(bob))
    worker.drain(0.3)
    worker.close()
    assert list(published(tmp_path)) == [1] and worker.ledger.counts["samples_trained"] == 4
    assert len(worker.ledger.waiting) == 6  # mallory's other six
    again = open_log("sqlite", str(tmp_path / "again.db"))  # the same signals, to a trainer without the cap
    again.append([signal(t) for t in (*flood, alice, bob)])
    uncapped = trainer(again, store, tiny_model, tmp_path / "uncapped", standing_hints=0, max_tenant_share=1.0)
    uncapped.drain(0.3)
    uncapped.close()
    assert uncapped.ledger.counts["samples_trained"] == 8 and len(uncapped.ledger.waiting) == 2


def test_a_tenant_scope_learns_from_its_turns_that_the_shared_version_served(
    base: Policy, tiny_model: Path, store: Store, sqlite_log: EventLog, tmp_path: Path
) -> None:
    """Until a tenant has a version of its own, the shared one serves it: those turns teach the tenant's
    lineage (as off-policy samples: the drift guard applies), while another tenant's versions stay foreign."""
    mine = [served(base, n, adapter_version="default-v3").model_copy(update={"scope": "t.acme"}) for n in range(4)]
    foreign = served(base, 4, adapter_version="t.globex-v1").model_copy(update={"scope": "t.acme"})
    record(store, sqlite_log, *mine, foreign, *(signal(t) for t in (*mine, foreign)))
    worker = TrainerWorker(sqlite_log, store, model_dir=tiny_model, adapters_root=tmp_path / "adapters",
                           trainer_root=tmp_path / "trainer", scope="t.acme", config=config(standing_hints=0))
    worker.drain(0.3)
    worker.close()
    assert worker.ledger.counts["refused_foreign_adapter"] == 1 and worker.ledger.counts["samples_trained"] == 4
    assert list(published(tmp_path, "t.acme")) == [1]


def test_the_shared_scope_learns_from_the_tenants_that_feed_it_and_only_those(
    base: Policy, tiny_model: Path, store: Store, sqlite_log: EventLog, tmp_path: Path
) -> None:
    fed = [served(base, n, adapter_version="t.acme-v1").model_copy(update={"scope": "t.acme"}) for n in range(4)]
    kept = [served(base, n, adapter_version="t.globex-v1", tenant="globex").model_copy(update={"scope": "t.globex"})
            for n in range(4, 8)]
    record(store, sqlite_log, *fed, *kept, *(signal(t).model_copy(update={"also_trains": ["default"]}) for t in fed),
           *(signal(t) for t in kept))
    worker = trainer(sqlite_log, store, tiny_model, tmp_path, standing_hints=0)
    worker.drain(0.3)
    worker.close()
    assert worker.ledger.counts["received"] == 4 and worker.ledger.counts["samples_trained"] == 4
    assert list(published(tmp_path)) == [1]


def _scoped(base: Policy, tenant: str,
            numbers: range) -> tuple[list[events.TurnRecorded], list[events.SignalExtracted]]:
    turns = [served(base, n, tenant=tenant).model_copy(update={"scope": f"t.{tenant}"}) for n in numbers]
    return turns, [signal(t) for t in turns]


def _every_scope(log: EventLog, store: Store, tiny_model: Path, root: Path, *, max_resident: int,
                 **fields: object) -> ScopeTrainers:
    shared = SharedBase(tiny_model, device="cpu")
    chosen = config(**{"standing_hints": 0, **fields})

    def start(scope: str) -> TrainerWorker:
        return TrainerWorker(log, store, model_dir=tiny_model, adapters_root=root / "adapters",
                             trainer_root=root / "trainer", scope=scope, config=chosen, shared=shared, consume=False)

    return ScopeTrainers(log, start, store=store, max_resident=max_resident)


def test_one_trainer_process_trains_every_scope_with_signals_each_on_its_own(
    base: Policy, tiny_model: Path, store: Store, sqlite_log: EventLog, tmp_path: Path
) -> None:
    """``trainer run`` without ``--scope``: a worker per scope whose signals arrive, each trained on its own
    signals only, on one base model; with one scope in memory, the others are parked in their checkpoints
    and come back with the weights and optimizer state they had."""
    trainers = _every_scope(sqlite_log, store, tiny_model, tmp_path, max_resident=1)
    acme, acme_signals = _scoped(base, "acme", range(4))
    record(store, sqlite_log, *acme, *acme_signals)
    trainers.drain(0.3)
    assert sorted(trainers.workers) == ["t.acme"]
    acme_worker = trainers.workers["t.acme"]
    ids = torch.tensor([[5, 17, 42, 9]])
    with torch.no_grad():
        trained = acme_worker.policy.model(input_ids=ids).logits
    moments = {k: v.clone() for k, v in acme_worker._weights()[1].state_dict()["state"][0].items()}
    for tenant, numbers in (("globex", range(4, 8)), ("initech", range(8, 12))):
        turns, signals = _scoped(base, tenant, numbers)
        record(store, sqlite_log, *turns, *signals)
    trainers.drain(0.3)
    assert sorted(trainers.workers) == ["t.acme", "t.globex", "t.initech"]
    assert sum(worker.resident for worker in trainers.workers.values()) == 1
    assert trainers.counts["parked"] >= 2
    # One base model for all; training one scope left the others' weights as they published them; a parked
    # scope's weights and optimizer state come back as they were; what was published loads as any PEFT adapter.
    assert trainers.workers["t.acme"].policy.model is trainers.workers["t.globex"].policy.model
    acme_policy = trainers.workers["t.acme"].policy
    published_acme = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model),
                                               tmp_path / "adapters" / "t.acme" / "000001")
    with torch.no_grad():
        assert torch.allclose(acme_policy.model(input_ids=ids).logits, trained, atol=1e-6)
        assert torch.allclose(acme_policy.model(input_ids=ids).logits, published_acme(input_ids=ids).logits,
                              atol=1e-5)
        with acme_policy.base():
            plain = acme_policy.model(input_ids=ids).logits
        assert not torch.allclose(plain, trained, atol=1e-5)  # it learnt something
    back = trainers.workers["t.acme"]._weights()[1].state_dict()["state"][0]
    assert all(torch.equal(back[k], moments[k]) for k in moments)
    trainers.close()
    assert published(tmp_path) == {}
    for tenant, numbers in (("acme", range(4)), ("globex", range(4, 8)), ("initech", range(8, 12))):
        versions = published(tmp_path, f"t.{tenant}")
        assert list(versions) == [1]
        assert sorted(versions[1]["data"]["signals"]) == sorted(signal(t).event_id for t in _scoped(
            base, tenant, numbers)[0])


def test_a_scope_its_old_owner_still_holds_waits_while_the_others_train(
    base: Policy, tiny_model: Path, store: Store, sqlite_log: EventLog, tmp_path: Path
) -> None:
    """t.acme's partition came here while the trainer that held it is still in its round (its lock held): this
    trainer trains its other scopes, reads t.acme's records again each round, and takes t.acme once the old
    owner lets go. Nothing is lost or trained twice, and the trainer never stops."""
    old_owner = TrainerWorker(sqlite_log, store, model_dir=tiny_model, adapters_root=tmp_path / "adapters",
                              trainer_root=tmp_path / "trainer", scope="t.acme", config=config(),
                              consume=False)
    trainers = _every_scope(sqlite_log, store, tiny_model, tmp_path, max_resident=2)
    globex, globex_signals = _scoped(base, "globex", range(4, 8))
    acme, acme_signals = _scoped(base, "acme", range(4))
    record(store, sqlite_log, *globex, *globex_signals)
    record(store, sqlite_log, *acme, *acme_signals)
    for _ in range(4):
        trainers.run_once(0.3)
    assert sorted(trainers.workers) == ["t.globex"] and list(published(tmp_path, "t.globex")) == [1]
    assert published(tmp_path, "t.acme") == {}
    old_owner.close()
    for _ in range(4):
        trainers.run_once(0.3)
    trainers.close()
    assert sorted(trainers.workers) == ["t.acme", "t.globex"]
    versions = published(tmp_path, "t.acme")
    assert list(versions) == [1]
    assert sorted(versions[1]["data"]["signals"]) == sorted(s.event_id for s in acme_signals)


def test_the_scope_whose_samples_waited_longest_trains_first(
    base: Policy, tiny_model: Path, store: Store, sqlite_log: EventLog, tmp_path: Path
) -> None:
    """t.beta's first samples were ready a round before t.alpha's: when both have a batch, beta goes first."""
    trainers = _every_scope(sqlite_log, store, tiny_model, tmp_path, max_resident=2)
    beta, beta_signals = _scoped(base, "beta", range(4))
    alpha, alpha_signals = _scoped(base, "alpha", range(4, 8))
    record(store, sqlite_log, *beta[:3], *beta_signals[:3])
    trainers.drain(0.3)
    assert published(tmp_path, "t.beta") == {}  # three of a batch of four
    record(store, sqlite_log, *alpha, *alpha_signals, beta[3], beta_signals[3])
    trainers.drain(0.3)
    trainers.close()
    assert [(a.scope, a.version) for a in _adapters_announced(sqlite_log)] == [("t.beta", 1), ("t.alpha", 1)]


def test_signals_keyed_by_their_session_are_keyed_again_by_scope_and_trained_once(
    base: Policy, tiny_model: Path, store: Store, sqlite_log: EventLog, tmp_path: Path
) -> None:
    """Signals written before they were keyed by scope (keyed by session) still train, once each."""
    turns, signals = _scoped(base, "acme", range(4))
    store.apply([*turns, *signals])
    for item in signals:
        sqlite_log.append_raw(events.SIGNALS, item.session_id, item.encode())
    trainers = _every_scope(sqlite_log, store, tiny_model, tmp_path, max_resident=1)
    trainers.drain(0.3)
    trainers.close()
    assert trainers.counts["rerouted"] == 4
    versions = published(tmp_path, "t.acme")
    assert list(versions) == [1] and sorted(versions[1]["data"]["signals"]) == sorted(s.event_id for s in signals)


@pytest.mark.parametrize("scope_init", ["parent", "base"])
def test_a_new_scope_begins_from_what_its_parent_serves(
    base: Policy, tiny_model: Path, store: Store, sqlite_log: EventLog, tmp_path: Path, scope_init: str
) -> None:
    """A tenant's lineage starts from the shared stable version that serves it (and says so), unless told
    to start from the base model."""
    shared_version = tmp_path / "shared-v2"
    torch.manual_seed(7)
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                   LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
                   ).save_pretrained(shared_version)
    store.apply([events.AdapterPublished(scope="default", version=2, base_model="tiny", path=str(shared_version))])
    deployments.operate(store, "default", "promote", "ops", "the shared version", lambda _: None, version=2)
    worker = TrainerWorker(sqlite_log, store, model_dir=tiny_model, adapters_root=tmp_path / "adapters",
                           trainer_root=tmp_path / "trainer", scope="t.acme",
                           config=config(standing_hints=0, scope_init=scope_init))
    ids = torch.tensor([[5, 17, 42, 9]])
    with torch.no_grad():
        mine = worker.policy.model(input_ids=ids).logits
        reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), shared_version)
        theirs = reference(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_model)(input_ids=ids).logits
    assert torch.allclose(mine, theirs if scope_init == "parent" else plain, atol=1e-5)
    turns = [served(base, n).model_copy(update={"scope": "t.acme"}) for n in range(4)]
    record(store, sqlite_log, *turns, *(signal(t) for t in turns))
    worker.drain(0.3)
    worker.close()
    meta = published(tmp_path, "t.acme")[1]
    assert meta["init_from"] == ("default-v2" if scope_init == "parent" else None)


@pytest.mark.parametrize("partial_after_s", [None, 0.2])
def test_a_quiet_scope_trains_a_partial_batch_once_its_samples_waited(
    base: Policy, tiny_model: Path, store: Store, sqlite_log: EventLog, tmp_path: Path, partial_after_s: float | None
) -> None:
    """Three signals, batches of eight: only full batches train nothing; with partial batches after 0.2 s
    (at least two samples), the three train as one update once the oldest waited."""
    turns = [served(base, n) for n in range(3)]
    record(store, sqlite_log, *turns, *(signal(t, reward=r) for t, r in zip(turns, (1.0, -1.0, 1.0), strict=True)))
    worker = trainer(sqlite_log, store, tiny_model, tmp_path, batch_size=8, min_batch=2,
                     partial_after_s=partial_after_s)
    worker.drain(0.3)
    worker.close()
    versions = published(tmp_path)
    if partial_after_s is None:
        assert versions == {} and len(worker.ledger.waiting) == 3
    else:
        assert list(versions) == [1] and len(versions[1]["data"]["signals"]) == 3


def test_a_signal_is_trained_once_and_again_only_when_a_later_revision_changes_it(
        base: Policy, tiny_model: Path, store: Store, sqlite_log: EventLog, tmp_path: Path) -> None:
    turns = [served(base, n) for n in range(8)]
    first = [signal(t) for t in turns[:4]]
    record(store, sqlite_log, *turns[:4], *first)
    sqlite_log.append(first)  # the outbox published them twice
    worker = trainer(sqlite_log, store, tiny_model, tmp_path)
    worker.drain(0.3)
    assert list(published(tmp_path)) == [1]
    same = signal(turns[0], revision=1)  # a new revision that says the same: nothing new to learn
    changed = signal(turns[1], reward=-1.0, revision=1)  # late feedback turned the label around
    record(store, sqlite_log, same, changed, *turns[4:7], *(signal(t) for t in turns[4:7]))
    worker.drain(0.3)
    worker.close()
    versions = published(tmp_path)
    assert list(versions) == [1, 2]
    assert changed.event_id in versions[2]["data"]["signals"] and same.event_id not in versions[2]["data"]["signals"]
    counts = worker.ledger.counts
    assert (counts["duplicates"], counts["unchanged_revisions"], counts["revised"]) == (4, 1, 1)


def test_standing_hints_teach_a_tenants_later_samples(base: Policy, tiny_model: Path, store: Store,
                                                      sqlite_log: EventLog, tmp_path: Path) -> None:
    hinted = served(base, 0)
    thanked = [served(base, n) for n in range(1, 4)]
    call = events.ToolCall(id="call_1", function=events.ToolCallFunction(name="calculator", arguments='{"a": 1}'))
    called = served(base, 5).model_copy(update={"response": events.ChatMessage(role="assistant", tool_calls=[call])})
    other = served(base, 4, tenant="globex")
    record(store, sqlite_log, hinted, signal(hinted, reward=None, hint="Answer with one word."))
    record(store, sqlite_log, *thanked, called, other, *(signal(t) for t in [*thanked, called, other]))
    # Five of acme's samples and one of globex's in a batch: no cap on a tenant's share here.
    worker = trainer(sqlite_log, store, tiny_model, tmp_path, batch_size=6, max_tenant_share=1.0)
    worker.drain(0.3)
    worker.close()
    data = published(tmp_path)[1]["data"]
    # acme's thanked answers; not its tool call (its arguments come from its own request), not globex's
    assert (data["hints"], data["standing_hints"]) == (1, 3)
    assert worker.ledger.standing_hints("acme") == ["Answer with one word."]


def test_a_scope_s_standing_hints_come_from_its_own_signals_only(base: Policy, tiny_model: Path, store: Store,
                                                                 sqlite_log: EventLog, tmp_path: Path) -> None:
    """One trainer, two tenants' scopes: acme's correction stands for acme's later answers, never globex's."""
    acme, _ = _scoped(base, "acme", range(4))
    globex, globex_signals = _scoped(base, "globex", range(4, 8))
    record(store, sqlite_log, acme[0], signal(acme[0], reward=None, hint="Answer with one word."),
           *acme[1:], *(signal(t) for t in acme[1:]), *globex, *globex_signals)
    trainers = _every_scope(sqlite_log, store, tiny_model, tmp_path, max_resident=2, standing_hints=3)
    trainers.drain(0.3)
    trainers.close()
    assert trainers.workers["t.acme"].ledger.standing_hints("acme") == ["Answer with one word."]
    assert trainers.workers["t.globex"].ledger.standing == {}
    assert published(tmp_path, "t.acme")[1]["data"]["standing_hints"] == 3
    assert published(tmp_path, "t.globex")[1]["data"]["standing_hints"] == 0


def test_without_standing_hints_a_reward_less_sample_teaches_nothing(
        base: Policy, tiny_model: Path, store: Store, sqlite_log: EventLog, tmp_path: Path) -> None:
    hinted, later = served(base, 0), served(base, 1)
    record(store, sqlite_log, hinted, later, signal(hinted, reward=None, hint="Answer with one word."),
           signal(later, reward=None))
    for keep, refused in ((0, 1), (3, 0)):
        worker = trainer(sqlite_log, store, tiny_model, tmp_path / str(keep), standing_hints=keep, method="opd")
        worker.drain(0.3)
        worker.close()
        assert worker.ledger.counts.get("refused_no_signal", 0) == refused


@pytest.mark.parametrize("source", ["tools", "judge"])
def test_only_the_users_own_words_become_standing_hints(source: events.HintSource, base: Policy, tiny_model: Path,
                                                        store: Store, sqlite_log: EventLog, tmp_path: Path) -> None:
    hinted, later = served(base, 0), served(base, 1)
    record(store, sqlite_log, hinted, later,
           signal(hinted, reward=-1.0, hint="The tool call call_1 failed: division by zero. Fix it.",
                  hint_source=source),
           signal(later, reward=None))
    worker = trainer(sqlite_log, store, tiny_model, tmp_path, standing_hints=3, method="opd")
    worker.drain(0.3)
    worker.close()
    assert worker.ledger.standing == {} and worker.ledger.counts["refused_no_signal"] == 1


def test_held_out_turns_are_kept_for_the_collapse_guards(base: Policy, tiny_model: Path, store: Store,
                                                        sqlite_log: EventLog, tmp_path: Path) -> None:
    turns = [served(base, n) for n in range(24)]
    record(store, sqlite_log, *turns, *(signal(t, reward=1.0 if n % 2 else -1.0) for n, t in enumerate(turns)))
    worker = trainer(sqlite_log, store, tiny_model, tmp_path, holdout_every=3)
    worker.drain(0.3)
    worker.close()
    held = worker.ledger.counts["held_out"]
    assert 0 < held < 24 and len(worker.ledger.replay) == held
    versions = published(tmp_path)
    # Every batch of four made a version, unless its every sample had drifted past max_drift from the trained
    # weights (borderline at 0.3 nats here: floating point decides, so the count may vary by one).
    skipped = worker.ledger.counts.get("updates_skipped", 0)
    assert versions and len(versions) + skipped == (24 - held) // 4, worker.ledger.counts
    last = versions[max(versions)]["guards"]
    assert last["held_out"] is True and last["prompts"] == held and isinstance(last["reward"], float)
    evidence = last["offline"]  # the low-traffic gate's: lift over what was served on the held-out turns
    assert evidence["turns"] == held and 1.0 <= evidence["ess"] <= held and evidence["se"] > 0
    mean = sum(1.0 if n % 2 else -1.0 for n, t in enumerate(turns) if t.turn_id in worker.ledger.replay) / held
    assert evidence["lift"] == pytest.approx(last["reward"] - mean, abs=1e-5)
    trained = {s for meta in versions.values() for s in meta["data"]["signals"]}
    assert not trained & {f"{turn_id}:extractor-v1.0" for turn_id in worker.ledger.replay}


def test_old_versions_are_pruned_unless_a_deployment_serves_them(base: Policy, tiny_model: Path, store: Store,
                                                                 sqlite_log: EventLog, tmp_path: Path) -> None:
    store.apply([events.DeploymentChanged(stable_version=1, reason="test", actor="test")])
    assert store.get(tables.Deployment, "default") is not None
    turns = [served(base, n) for n in range(12)]
    record(store, sqlite_log, *turns, *(signal(t) for t in turns))
    worker = trainer(sqlite_log, store, tiny_model, tmp_path, keep_versions=1, max_version_lag=10)
    worker.drain(0.3)
    worker.close()
    assert sorted(published(tmp_path)) == [1, 3]  # 1 is deployed, 3 is the newest; 2 is gone


@pytest.mark.parametrize("stage", STAGES)
def test_a_trainer_killed_mid_update_resumes_without_losing_or_reusing_signals(
        base: Policy, tiny_model: Path, tmp_path: Path, stage: str) -> None:
    from nextturn.store import upgrade

    database_url = f"sqlite:///{tmp_path / 'nextturn.db'}"
    upgrade(database_url)
    store = Store(database_url)
    where = str(tmp_path / "events.db")
    log = open_log("sqlite", where)
    turns = [served(base, n) for n in range(12)]
    signals = [signal(t) for t in turns]
    record(store, log, *turns, *signals)

    child = multiprocessing.get_context("spawn").Process(
        target=run_until_crash, args=("sqlite", where, database_url, str(tiny_model), str(tmp_path), stage))
    child.start()
    child.join(120)
    assert child.exitcode == 70, "the trainer should have died at the injected point"
    assert len(published(tmp_path)) == (1 if stage in ("after-publish", "before-commit") else 0)

    worker = trainer(log, store, tiny_model, tmp_path)
    def three_published() -> bool:
        if len(published(tmp_path)) >= 3:
            return True
        worker.run_once(0.5)  # waits out the dead member's session first
        return False

    eventually(three_published, "three versions", timeout_s=60, interval_s=0)
    worker.drain(0.5)
    worker.close()
    announced = [a.version for a in _adapters_announced(log)]
    log.close()
    store.close()

    versions = published(tmp_path)
    assert sorted(versions) == [1, 2, 3]
    used = [s for meta in versions.values() for s in meta["data"]["signals"]]
    assert sorted(used) == sorted(s.event_id for s in signals)  # each exactly once
    assert [versions[v]["parent_version"] for v in (1, 2, 3)] == [None, 1, 2]
    assert sorted(set(announced)) == [1, 2, 3]  # announced at least once each (ids make repeats harmless)


def test_one_trainer_per_scope(base: Policy, tiny_model: Path, store: Store, sqlite_log: EventLog,
                               tmp_path: Path) -> None:
    worker = trainer(sqlite_log, store, tiny_model, tmp_path)
    with pytest.raises(TrainerBusy, match="one trainer per scope"):
        trainer(sqlite_log, store, tiny_model, tmp_path)
    worker.close()
    trainer(sqlite_log, store, tiny_model, tmp_path).close()  # the lock went with the first one


def test_settings_reach_the_trainer(base: Policy, tiny_model: Path, store: Store, sqlite_log: EventLog,
                                    tmp_path: Path) -> None:
    """Each trainer setting, flipped from its default, changes what a version is made of."""
    settings = Settings(data_dir=tmp_path, model=str(tiny_model), train_method="rl", trainer_opd_form="sampled",
                        trainer_teacher="policy", trainer_batch_size=2, trainer_steps_per_batch=3,
                        trainer_learning_rate=1e-4, trainer_lora_rank=2, trainer_kl_to_base=0.5,
                        trainer_max_drift=0.7, trainer_max_version_lag=1, trainer_max_ahead=5, trainer_standing_hints=1,
                        trainer_holdout_every=0, trainer_keep_versions=2, trainer_device="cpu")
    config = TrainerConfig.from_settings(settings)
    assert (config.method, config.opd_form, config.teacher, config.batch_size, config.steps_per_batch,
            config.learning_rate, config.lora_rank, config.kl_to_base, config.max_drift, config.max_version_lag,
            config.max_ahead, config.standing_hints, config.holdout_every, config.keep_versions, config.device) == (
        "rl", "sampled", "policy", 2, 3, 1e-4, 2, 0.5, 0.7, 1, 5, 1, 0, 2, "cpu")
    assert config.objective().max_drift == 0.7
    turns = [served(base, n) for n in range(2)]
    record(store, sqlite_log, *turns, signal(turns[0]), signal(turns[1], reward=None, hint="Answer in one word."))
    worker = TrainerWorker.from_settings(settings, sqlite_log, store)
    worker.drain(0.3)
    turns = [served(base, n) for n in range(2, 4)]
    record(store, sqlite_log, *turns, *(signal(t) for t in turns))
    worker.drain(0.3)
    worker.close()
    import json

    version = tmp_path / "adapters" / "default" / "000001"
    meta = json.loads((version / "meta.json").read_text())
    assert json.loads((version / "adapter_config.json").read_text())["r"] == 2
    assert meta["metrics"]["optimizer_steps"] == 3 and "kl_to_base" in meta["metrics"]
    assert "advantage_abs" in meta["metrics"]  # the sampled-token objective
    assert worker.ledger.counts["refused_no_signal"] == 1  # rl: a hint alone teaches nothing
    checkpoint = Checkpoints(settings.trainer_path / "default").current()
    assert checkpoint is not None
    optimizer = torch.load(checkpoint / OPTIMIZER, weights_only=True)
    assert optimizer["param_groups"][0]["lr"] == 1e-4


def test_the_distillation_divergence_and_span_follow_settings(tmp_path: Path) -> None:
    for divergence, span in (("forward", "response"), ("reverse", "to_divergence")):
        config = TrainerConfig.from_settings(Settings(data_dir=tmp_path, trainer_opd_divergence=divergence,
                                                      trainer_opd_span=span))
        objective = config.objective()
        assert isinstance(objective, distillation.Objective)
        assert (objective.divergence, objective.span) == (divergence, span)


def test_a_trainer_without_a_method_or_a_gpu_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nothing to train"):
        TrainerConfig.from_settings(Settings(data_dir=tmp_path, train_method="none"))
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            pick_device("cuda")
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")



def test_more_waiting_signals_than_one_query_may_name_are_read_in_chunks(tiny_model: Path, sqlite_log: EventLog,
                                                                          tmp_path: Path) -> None:
    """A paced trainer may hold tens of thousands of waiting signals; reading them with one IN (...) broke past
    the database's cap on bound parameters, and the trainer retried that read forever, training nothing. Here
    the cap is SQLite's old default, 999, and 1,200 wait (their turns are not stored yet)."""
    url = f"sqlite:///{tmp_path / 'capped.db'}"
    upgrade(url)
    store = Store(url)
    sqlalchemy.event.listen(store.engine, "connect", lambda connection, _: connection.setlimit(
        sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999))
    store.engine.dispose()  # connections opened from now on carry the cap
    waiting = [events.SignalExtracted(event_id=f"sig-{n}.0", signal_id=f"sig-{n}", revision=0, tenant="acme",
                                      session_id=f"s{n}", turn_id=f"not-yet-{n}", adapter_version="base",
                                      reward=1.0, confidence=1.0, extractor_version="extractor-v1")
               for n in range(1200)]
    record(store, sqlite_log, *waiting)
    worker = trainer(sqlite_log, store, tiny_model, tmp_path)
    worker.drain(0.3)
    assert len(worker.ledger.waiting) == 1200 and worker.ledger.counts["received"] == 1200
    assert worker.ledger.counts.get("store_retries", 0) == 0  # every round read them all; none failed
    worker.close()
    store.close()


def test_a_forgotten_session_leaves_the_trainers_memory_and_its_checkpoint(
        base: Policy, tiny_model: Path, store: Store, sqlite_log: EventLog, tmp_path: Path) -> None:
    """The waiting signals, ready samples and standing hints of a forgotten session are dropped and the
    checkpoint is rewritten without them; its signal read again later is turned away; the next version is
    trained without it."""
    secret = "Call me Ana, my card is 4111"
    hinted, *others = [served(base, n) for n in range(5)]
    record(store, sqlite_log, hinted, signal(hinted, reward=1.0, hint=secret),
           *others[:2], *(signal(t) for t in others[:2]))
    worker = trainer(sqlite_log, store, tiny_model, tmp_path, batch_size=4, standing_hints=3)
    worker.drain(0.3)
    assert worker.ledger.standing_hints("acme") == [secret] and len(worker.ledger.waiting) == 3
    checkpoint = tmp_path / "trainer" / events.DEFAULT_SCOPE
    assert any(secret in path.read_text() for path in checkpoint.rglob("*.json"))

    places = erasure.Places(tmp_path / "adapters", tmp_path / "trainer")
    erasure.forget_session(store, sqlite_log, places, "acme", hinted.session_id, actor="test")
    worker.drain(0.3)
    assert worker.ledger.standing == {} and len(worker.ledger.waiting) == 2
    assert not any(secret in path.read_text() for path in checkpoint.rglob("*.json"))
    sqlite_log.append([signal(hinted, reward=1.0, hint=secret).model_copy(update={"revision": 1})])  # a late copy
    record(store, sqlite_log, *others[2:], *(signal(t) for t in others[2:]))
    worker.drain(0.3)
    worker.close()
    assert worker.ledger.counts["forgotten"] == 2  # once from memory, once as it came again
    trained = published(tmp_path)[1]["data"]["signals"]
    assert len(trained) == 4 and signal(hinted).event_id not in trained


def test_a_removed_scope_starts_over_in_the_trainer_that_held_it(
        base: Policy, tiny_model: Path, store: Store, sqlite_log: EventLog, tmp_path: Path) -> None:
    turns, signals = _scoped(base, "acme", range(4))
    record(store, sqlite_log, *turns, *signals)
    trainers = _every_scope(sqlite_log, store, tiny_model, tmp_path, max_resident=2)
    trainers.drain(0.3)
    assert list(published(tmp_path, "t.acme")) == [1] and trainers.workers["t.acme"].ledger.head == 1

    places = erasure.Places(tmp_path / "adapters", tmp_path / "trainer")
    report = erasure.forget_tenant(store, sqlite_log, places, "acme", actor="test")
    assert report.removed_scopes == ["t.acme"] and report.removed["scope_files"] == 1
    sqlite_log.append(signals)  # what was on its way: dropped
    trainers.drain(0.3)
    worker = trainers.workers["t.acme"]
    trainers.close()
    assert (worker.ledger.head, worker.ledger.waiting) == (0, {})
    assert worker.ledger.removed_at is not None and worker.ledger.counts["forgotten"] == 4
    assert published(tmp_path, "t.acme") == {}
    saved = Checkpoints(tmp_path / "trainer" / "t.acme").state()  # the new lineage's, not the removed one's
    assert saved is not None and (saved["head"], saved["removed_at"]) == (0, worker.ledger.removed_at)
