"""The rollout controller and the deployment's moves against a real store (SQLite and Postgres): turns and
signals are stored as the recorder stores them, and the controller decides from them."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from nextturn import deployments, events, tables
from nextturn.bus import EventLog
from nextturn.deployments import Deployment
from nextturn.errors import DeploymentConflict, InvalidChange, StoreUnavailable
from nextturn.settings import Settings
from nextturn.store import Store, upgrade
from rollout.controller import RolloutController
from rollout.gates import GatePolicy

from support.event_logs import open_log
from support.eventually import eventually
from support.factories import turn
from support.rolling import publish

POLICY = GatePolicy(schedule=(0.2, 0.5), min_resolved=10, guard_min_turns=10, timeout_s=600.0)
GUARDS_BASE = {"entropy": 2.0, "distinct_1": 0.5, "distinct_2": 0.8, "length": 20.0}


@pytest.fixture
def log(tmp_path: Path) -> Iterator[EventLog]:
    event_log = open_log("sqlite", str(tmp_path / "events.db"))
    yield event_log
    event_log.close()


class Clock:
    def __init__(self) -> None:
        self.now = events.utc_now()

    def __call__(self) -> datetime:
        return self.now


def controller(log: EventLog, store: Store, clock: Clock | None = None, **policy: object) -> RolloutController:
    fields = {**POLICY.__dict__, **policy}
    return RolloutController(log, store, policy=GatePolicy(**fields), clock=clock or events.utc_now)  # type: ignore[arg-type]


def served(store: Store, version: str, n: int, *, reward: float | None = None, content: str | None = "fine",
           latency_ms: float = 20.0, tenant: str = "acme", pinned: bool = False,
           failed_by: events.Cause | None = None, scope: str = events.DEFAULT_SCOPE) -> None:
    """``n`` turns served by ``version`` now, each with a signal carrying ``reward`` (None: no signal);
    ``failed_by``: each failed, caused by the client or the server."""
    batch: list[events.Event] = []
    for k in range(n):
        failed = {"status": "failed", "error": "refused", "cause": failed_by, "response": None} if failed_by else {}
        item = turn(f"{version}-{events.new_id()[:8]}", k).model_copy(update={
            "adapter_version": version, "latency_ms": latency_ms, "tenant": tenant, "pinned": pinned, "scope": scope,
            "response": events.ChatMessage(role="assistant", content=content), **failed})
        batch.append(item)
        if reward is not None:
            batch.append(events.SignalExtracted(
                signal_id=f"{item.turn_id}:x", tenant=tenant, scope=scope, session_id=item.session_id,
                turn_id=item.turn_id,
                adapter_version=version, reward=reward, confidence=1.0, extractor_version="x"))
    store.apply(batch)


def canary_of(log: EventLog, store: Store, ctl: RolloutController, version: int, tmp_path: Path,
              meta: dict | None = None) -> events.DeploymentChanged | None:  # type: ignore[type-arg]
    publish(log, version, tmp_path / f"v{version}", meta)
    return ctl.run_once(0.5)


def test_a_published_version_becomes_the_canary_and_a_good_one_steps_up_to_promotion(
    log: EventLog, store: Store, tmp_path: Path
) -> None:
    ctl = controller(log, store)
    assert ctl.run_once(0.1) is None and ctl.verdict is not None and ctl.verdict.reason == "no new version"
    began = canary_of(log, store, ctl, 1, tmp_path)
    assert began is not None and (began.action, began.canary_version, began.canary_weight) == ("canary", 1, 0.2)
    assert "no collapse guards measured" in began.reason
    assert log.consumer(None, [events.DEPLOYMENTS]).poll(10, 1.0)[0].event == began  # on the log, too
    served(store, "base", 12, reward=-0.5)
    served(store, "default-v1", 9, reward=1.0)
    assert ctl.check() is None and "collecting evidence: 9 resolved canary turns" in ctl.verdict.reason  # type: ignore[union-attr]
    served(store, "default-v1", 1, reward=1.0)
    stepped = ctl.check()
    assert stepped is not None and (stepped.action, stepped.canary_weight) == ("step", 0.5)
    assert stepped.reason.startswith("reward: P(canary >= stable - 0.05) = 1.000")
    assert ctl.check() is None and "served 0 of 10 turns at weight 0.5" in ctl.verdict.reason  # type: ignore[union-attr]
    served(store, "default-v1", 10, reward=1.0)
    promoted = ctl.check()
    assert promoted is not None and (promoted.action, promoted.stable_version, promoted.canary_version) == (
        "promote", 1, None)
    assert store.get(tables.Adapter, ("default", 1)).status == "stable"  # type: ignore[union-attr]


def test_a_worse_version_is_rolled_back_by_the_reward_gate(log: EventLog, store: Store, tmp_path: Path) -> None:
    ctl = controller(log, store)
    canary_of(log, store, ctl, 1, tmp_path)
    served(store, "base", 30, reward=0.8)
    served(store, "default-v1", 30, reward=-0.2)
    rolled = ctl.check()
    assert rolled is not None and rolled.action == "rollback" and rolled.canary_version is None
    assert rolled.reason.startswith("reward: P(canary worse than stable by > 0.05) = 1.000")
    assert store.get(tables.Adapter, ("default", 1)).status == "rolled_back"  # type: ignore[union-attr]
    assert ctl.check() is None  # a rolled-back version is not tried again


@pytest.mark.parametrize(("content", "latency_ms", "says"), [
    ("", 20.0, "empty outputs in 10 of 10"),
    ("<|tool_call|>{not json", 20.0, "tool calls that do not parse in 10 of 10"),
    ("fine", 5000.0, "latency p99 5000 ms against 20 ms"),
])
def test_fast_guardrails_roll_back_at_once_even_when_paused(
    log: EventLog, store: Store, tmp_path: Path, content: str, latency_ms: float, says: str
) -> None:
    ctl = controller(log, store)
    canary_of(log, store, ctl, 1, tmp_path)
    deployments.operate(store, "default", "pause", "ops", "watching", _drop)
    served(store, "base", 20)
    served(store, "default-v1", 9, content=content, latency_ms=latency_ms)
    assert ctl.check() is None  # fewer than guard_min_turns canary turns
    served(store, "default-v1", 1, content=content, latency_ms=latency_ms)
    rolled = ctl.check()
    assert rolled is not None and rolled.action == "rollback", ctl.verdict
    assert rolled.reason.startswith("fast guardrail: ") and says in rolled.reason, rolled.reason


def test_flaws_as_common_on_stable_do_not_roll_back(log: EventLog, store: Store, tmp_path: Path) -> None:
    ctl = controller(log, store)
    canary_of(log, store, ctl, 1, tmp_path)
    served(store, "base", 40, content="")
    served(store, "default-v1", 20, content="")
    assert ctl.check() is None and ctl.verdict.action == "wait"  # type: ignore[union-attr]


@pytest.mark.parametrize("failed_by", ["client", "server"])
def test_only_failures_the_server_caused_are_a_canarys_flaws(
    log: EventLog, store: Store, tmp_path: Path, failed_by: events.Cause
) -> None:
    """A tenant that sends requests the engine refuses (a context too long) cannot roll a canary back."""
    ctl = controller(log, store)
    canary_of(log, store, ctl, 1, tmp_path)
    served(store, "base", 20)
    served(store, "default-v1", 10, failed_by=failed_by)
    change = ctl.check()
    if failed_by == "client":
        assert change is None and ctl.verdict is not None and ctl.verdict.action == "wait", ctl.verdict
    else:
        assert change is not None and change.action == "rollback" and "failed turns in 10 of 10" in change.reason


def test_turns_pinned_to_a_version_are_no_evidence(log: EventLog, store: Store, tmp_path: Path) -> None:
    """A tenant that names the canary's version and rewards it, or floods it with bad turns, moves nothing."""
    ctl = controller(log, store)
    canary_of(log, store, ctl, 1, tmp_path)
    served(store, "base", 30, reward=0.0)
    served(store, "default-v1", 40, reward=1.0, pinned=True)
    served(store, "default-v1", 40, content="", pinned=True)
    assert ctl.check() is None and ctl.verdict is not None, ctl.verdict
    assert ctl.verdict.action == "wait" and "0 resolved canary turns" in ctl.verdict.reason
    figures = deployments.status(store, "default")
    assert figures["arms"]["canary"]["turns"] == 0
    served(store, "default-v1", 30, reward=1.0)  # routed by the deployment: evidence
    stepped = ctl.check()
    assert stepped is not None and stepped.action == "step", ctl.verdict


def test_a_scope_is_decided_on_its_own_turns_against_what_its_chain_serves_it(
    log: EventLog, store: Store, tmp_path: Path
) -> None:
    """t.acme has no stable version: its sessions off the canary are served the shared default-v3, and that
    is what its canary is compared with; other tenants' turns on default-v3, and a user scope's own
    versions, are no evidence for it."""
    ana = "t.acme.u.ana"
    ctl = RolloutController(log, store, scope="t.acme", policy=POLICY)
    publish(log, 1, tmp_path / "acme-v1", scope="t.acme")
    began = ctl.run_once(0.5)
    assert began is not None and (began.scope, began.canary_version) == ("t.acme", 1)
    served(store, "t.acme-v1", 30, reward=0.5, scope="t.acme")
    served(store, "default-v3", 30, reward=0.0, scope="t.acme")
    served(store, "default-v3", 5, reward=0.0, scope=ana)  # ana has no version: through t.acme's lane
    served(store, "default-v3", 100, reward=1.0, tenant="globex", scope="t.globex")
    served(store, f"{ana}-v1", 50, reward=-1.0, scope=ana)
    evidence = deployments.status(store, "t.acme")["arms"]
    assert (evidence["canary"]["turns"], evidence["stable"]["turns"]) == (30, 35)
    assert (evidence["canary"]["mean_reward"], evidence["stable"]["mean_reward"]) == (0.5, 0.0)
    stepped = ctl.check()
    assert stepped is not None and stepped.action == "step", ctl.verdict


def test_one_controller_decides_every_scope_on_its_own(log: EventLog, store: Store, tmp_path: Path) -> None:
    ctl = RolloutController(log, store, scope=None, policy=POLICY)
    for scope in (events.DEFAULT_SCOPE, "t.acme", "t.globex"):
        publish(log, 1, tmp_path / scope, scope=scope)
    ctl.run_once(0.5)
    assert {scope: Deployment.read(store, scope).canary for scope in ("default", "t.acme", "t.globex")} == {
        "default": 1, "t.acme": 1, "t.globex": 1}
    # acme's canary answers worse than what acme is otherwise served; globex's better; default has no evidence
    served(store, "base", 30, reward=0.5, scope="t.acme")
    served(store, "t.globex-v1", 30, reward=0.5, tenant="globex", scope="t.globex")
    served(store, "base", 30, reward=0.0, tenant="globex", scope="t.globex")
    served(store, "t.acme-v1", 30, reward=-1.0, scope="t.acme")
    ctl.check()
    assert store.get(tables.Adapter, ("t.acme", 1)).status == "rolled_back"  # type: ignore[union-attr]
    assert Deployment.read(store, "t.globex").weight == 0.5  # stepped up
    assert Deployment.read(store, events.DEFAULT_SCOPE).weight == 0.2  # waits for evidence of its own
    assert ctl.verdict == ctl.verdicts["default"] and ctl.verdict.action == "wait"
    assert "0 resolved canary turns" in ctl.verdict.reason


def test_one_tenant_cannot_vote_a_canary_in_for_the_others(log: EventLog, store: Store, tmp_path: Path) -> None:
    ctl = controller(log, store)
    canary_of(log, store, ctl, 1, tmp_path)
    served(store, "base", 15, reward=0.0, tenant="alice")
    served(store, "base", 15, reward=0.0, tenant="bob")
    served(store, "default-v1", 4, reward=0.0, tenant="alice")
    served(store, "default-v1", 100, reward=1.0, tenant="mallory")
    assert ctl.check() is None and ctl.verdict is not None and ctl.verdict.action == "wait", ctl.verdict
    canary = deployments.status(store, "default")["arms"]["canary"]
    assert (canary["resolved"], canary["capped"], canary["mean_reward"]) == (8, 96, 0.5)  # 4 of mallory's kept
    served(store, "default-v1", 6, reward=0.0, tenant="bob")  # others' evidence lets more of mallory's in
    canary = deployments.status(store, "default")["arms"]["canary"]
    assert (canary["resolved"], canary["capped"], canary["mean_reward"]) == (20, 90, 0.5)  # half, at most
    uncapped = deployments.status(store, "default", max_tenant_share=1.0)["arms"]["canary"]
    assert (uncapped["resolved"], uncapped["capped"], round(uncapped["mean_reward"], 2)) == (110, 0, 0.91)


class _DownForAWhile(Store):
    """A real store whose first reads fail the way an unreachable database's do."""

    failures = 3

    def get(self, model, key):  # type: ignore[no-untyped-def]
        if self.failures:
            self.failures -= 1
            raise StoreUnavailable("cannot read the store: connection refused")
        return super().get(model, key)


def test_a_store_that_is_down_for_a_while_pauses_the_controller_and_it_goes_on(log: EventLog, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'down.db'}"
    upgrade(url)
    store = _DownForAWhile(url)
    publish(log, 1, tmp_path / "v1")
    ctl = controller(log, store)
    stop = threading.Event()
    running = threading.Thread(target=ctl.run, args=(stop,), kwargs={"interval_s": 0.1, "pause_s": (0.05, 0.2)})
    running.start()
    try:
        reader = Store(url)
        eventually(lambda: Deployment.read(reader).canary == 1, "the canary, once the store is back")
        reader.close()
        assert running.is_alive() and store.failures == 0
    finally:
        stop.set()
        running.join()
        store.close()


def test_low_traffic_waits_then_times_out_and_pause_holds_it(log: EventLog, store: Store, tmp_path: Path) -> None:
    clock = Clock()
    ctl = controller(log, store, clock)
    canary_of(log, store, ctl, 1, tmp_path)
    served(store, "base", 50, reward=0.5)
    served(store, "default-v1", 3, reward=1.0)
    clock.now += timedelta(seconds=599)
    assert ctl.check() is None
    deployments.operate(store, "default", "pause", "ops", "holiday", _drop)
    clock.now += timedelta(seconds=10)
    assert ctl.check() is None and ctl.verdict.reason == "paused"  # type: ignore[union-attr]
    resumed = deployments.operate(store, "default", "resume", "ops", "back", _drop)
    clock.now = resumed.occurred_at + timedelta(seconds=601)  # the timeout counts from the last change
    rolled = ctl.check()
    assert rolled is not None and rolled.action == "rollback"
    assert rolled.reason.startswith("not enough evidence after 601 s (timeout 600 s): 3 resolved canary turns")


def offline_meta(lift: float, se: float = 0.1, ess: float = 16.0) -> dict:  # type: ignore[type-arg]
    """A version's meta.json with the trainer's offline evidence only."""
    return {"guards": {"offline": {"lift": lift, "se": se, "ess": ess, "turns": 20}}}


def test_a_quiet_scope_promotes_on_offline_evidence_after_a_short_canary_and_rolls_back_a_worse_version(
    log: EventLog, store: Store, tmp_path: Path
) -> None:
    """12 resolved turns in the timeout: a canary at 0.2 would never gather 10 of them. So the version, with
    offline evidence that clears the bar, serves a short canary at 0.5, is promoted once the fast
    guardrails saw 10 canary turns, and is watched: doing worse than the base model did, it goes back."""
    ctl = controller(log, store)
    served(store, "base", 12, reward=1.0)
    began = canary_of(log, store, ctl, 1, tmp_path, offline_meta(0.3))
    assert began is not None and (began.action, began.canary_weight, began.schedule) == ("canary", 0.5, [0.5])
    assert "too quiet for the reward gate" in began.reason
    served(store, "default-v1", 9)
    assert ctl.check() is None
    assert ctl.verdict is not None and "fast guardrails have seen 9 of 10" in ctl.verdict.reason
    served(store, "default-v1", 1)
    promoted = ctl.check()
    assert promoted is not None and (promoted.action, promoted.stable_version) == ("promote", 1)
    assert promoted.reason.startswith("offline: estimated lift +0.30 ± 0.10 on an effective 16.0 turns")
    assert deployments.status(store)["watch_since"] == Deployment.read(store).watch_since.isoformat()  # type: ignore[union-attr]
    served(store, "default-v1", 9, reward=-1.0)
    assert ctl.check() is None and Deployment.read(store).stable == 1  # 9 < 10: too few to judge yet
    served(store, "default-v1", 1, reward=-1.0)
    deployments.operate(store, "default", "pause", "ops", "looking into it", _drop)
    assert ctl.check() is None and Deployment.read(store).stable == 1  # paused: the watch holds too
    deployments.operate(store, "default", "resume", "ops", "go on", _drop)
    back = ctl.check()
    assert back is not None and (back.action, back.stable_version, back.subject_version) == ("rollback", None, 1)
    assert back.reason.startswith("watch: P(worse than base by > 0.05) = 1.000")
    assert Deployment.read(store).watch_since is None
    assert store.get(tables.Adapter, ("default", 1)).status == "rolled_back"  # type: ignore[union-attr]


def test_a_watched_version_that_holds_up_is_kept_and_the_next_one_may_begin(
    log: EventLog, store: Store, tmp_path: Path
) -> None:
    ctl = controller(log, store)
    served(store, "base", 12, reward=0.0)
    canary_of(log, store, ctl, 1, tmp_path, offline_meta(0.3))
    served(store, "default-v1", 10)
    assert ctl.check() is not None and Deployment.read(store).stable == 1
    publish(log, 2, tmp_path / "v2", offline_meta(0.3))
    assert ctl.run_once(0.5) is not None and Deployment.read(store).canary == 2  # a watch does not hold it up
    served(store, "default-v1", 10, reward=0.5)
    kept = ctl.check()
    assert kept is not None and (kept.action, kept.stable_version, kept.canary_version) == ("set", 1, 2)
    assert kept.reason.startswith("watch passed: 10 resolved turns since the promotion (mean +0.50)")
    assert Deployment.read(store).watch_since is None


@pytest.mark.parametrize(("meta", "gate", "says"), [
    (offline_meta(0.05), "auto", "offline: estimated lift +0.05 ± 0.10 on an effective 16.0 turns (lower bound -0.11)"),
    (offline_meta(0.9, ess=3.0), "auto", "offline evidence on an effective 3.0 turns; 8 needed"),
    (offline_meta(0.9), "reward", "collecting evidence"),
    ({}, "auto", "collecting evidence"),
])
def test_weak_or_missing_offline_evidence_or_the_reward_gate_alone_never_promotes_a_quiet_canary(
    log: EventLog, store: Store, tmp_path: Path, meta: dict, gate: str, says: str  # type: ignore[type-arg]
) -> None:
    ctl = controller(log, store, gate=gate)
    canary_of(log, store, ctl, 1, tmp_path, meta)
    assert Deployment.read(store).weight == (0.5 if gate == "auto" and meta.get("guards") else 0.2)
    served(store, "default-v1", 20)
    assert ctl.check() is None and Deployment.read(store).canary == 1
    assert ctl.verdict is not None and says in ctl.verdict.reason


def test_a_busy_scope_is_decided_by_the_reward_gate_whatever_its_offline_evidence(
    log: EventLog, store: Store, tmp_path: Path
) -> None:
    served(store, "base", 60, reward=0.0)  # 60 in the timeout: a canary at 0.2 gathers 12, enough
    ctl = controller(log, store)
    began = canary_of(log, store, ctl, 1, tmp_path, offline_meta(0.9))
    assert began is not None and began.canary_weight == 0.2 and "too quiet" not in began.reason
    served(store, "default-v1", 20)
    assert ctl.check() is None and ctl.verdict is not None and ctl.verdict.reason.startswith("collecting evidence")


def test_collapse_guards_reject_a_version_before_it_serves(log: EventLog, store: Store, tmp_path: Path) -> None:
    ctl = controller(log, store)
    collapsed = {**GUARDS_BASE, "distinct_2": 0.2, "kl_to_base": 0.1, "prompts": 8, "base": GUARDS_BASE}
    rejected = canary_of(log, store, ctl, 1, tmp_path, {"guards": collapsed})
    assert rejected is not None and rejected.action == "reject" and rejected.canary_version is None
    assert rejected.reason == "collapse guard: distinct_2 0.2 is below 90% of the base model's 0.8"
    assert store.get(tables.Adapter, ("default", 1)).status == "rejected"  # type: ignore[union-attr]
    healthy = {**GUARDS_BASE, "kl_to_base": 0.3, "prompts": 8, "base": GUARDS_BASE}
    began = canary_of(log, store, ctl, 2, tmp_path, {"guards": healthy})
    assert began is not None and began.canary_version == 2 and "collapse guards within bounds" in began.reason


def test_the_newest_version_goes_first_and_older_ones_are_skipped(log: EventLog, store: Store, tmp_path: Path) -> None:
    ctl = controller(log, store)
    for version in (1, 2):
        publish(log, version, tmp_path / f"v{version}")
    began = ctl.run_once(0.5)
    assert began is not None and began.canary_version == 2
    assert store.get(tables.Adapter, ("default", 1)).status == "skipped"  # type: ignore[union-attr]


def test_a_restarted_controller_goes_on_from_the_stored_state(log: EventLog, store: Store, tmp_path: Path) -> None:
    first = controller(log, store)
    canary_of(log, store, first, 1, tmp_path)
    first.close()
    served(store, "base", 10, reward=0.0)
    served(store, "default-v1", 10, reward=1.0)
    second = controller(log, store)
    stepped = second.run_once(0.2)
    assert stepped is not None and (stepped.action, stepped.canary_version) == ("step", 1)


def test_a_decision_on_a_state_that_moved_is_not_written(log: EventLog, store: Store, tmp_path: Path) -> None:
    ctl = controller(log, store)
    canary_of(log, store, ctl, 1, tmp_path)
    stale = Deployment.read(store)
    deployments.operate(store, "default", "rollback", "ops", "no", _drop)
    with pytest.raises(DeploymentConflict):
        store.change_deployment(deployments.step(stale, "controller", "late"), expected=stale.last_event_id)
    assert Deployment.read(store).canary is None


def test_operators_promote_a_named_version_and_roll_back_to_the_one_before(store: Store, tmp_path: Path) -> None:
    for version in (1, 2):
        store.apply([events.AdapterPublished(version=version, base_model="tiny", path=str(tmp_path))])
    published: list[events.DeploymentChanged] = []
    with pytest.raises(InvalidChange, match="no canary to promote"):
        deployments.operate(store, "default", "promote", "ops", "why not", published.append)
    with pytest.raises(InvalidChange, match="no version 9"):
        deployments.operate(store, "default", "promote", "ops", "typo", published.append, version=9)
    with pytest.raises(InvalidChange, match="say who acts and why"):
        deployments.operate(store, "default", "promote", "ops", " ", published.append, version=1)
    deployments.operate(store, "default", "promote", "ops", "first", published.append, version=1)
    deployments.operate(store, "default", "promote", "ops", "second", published.append, version=2)
    back = deployments.operate(store, "default", "rollback", "ops", "2 is bad", published.append)
    assert (back.stable_version, back.subject_version) == (1, 2)
    assert store.adapter_statuses("default") == {1: "stable", 2: "rolled_back"}
    base = deployments.operate(store, "default", "rollback", "ops", "1 too", published.append)
    assert base.stable_version is None  # nothing before 1: the base model
    assert [change.action for change in published] == ["promote", "promote", "rollback", "rollback"]
    with pytest.raises(InvalidChange, match="nothing to roll back"):
        deployments.operate(store, "default", "rollback", "ops", "again", published.append)


def test_the_recorder_applies_changes_idempotently_and_the_latest_wins(store: Store) -> None:
    older = Deployment().change("promote", "ops", "old", subject=1, stable=1)
    newer = Deployment().change("promote", "ops", "new", subject=2, stable=2)
    assert store.apply([newer, older, newer]) == 2
    assert Deployment.read(store).stable == 2 and len(store.deployment_changes("default")) == 2


def test_every_rollout_setting_reaches_the_policy() -> None:
    settings = Settings(rollout_schedule=[0.05, 0.2, 0.7], rollout_min_resolved=99, rollout_confidence=0.9,
                        rollout_reward_margin=0.2, rollout_guard_min_turns=7, rollout_canary_timeout_s=42.0,
                        rollout_min_distinct=0.6, rollout_max_tenant_share=0.3, rollout_gate="reward",
                        rollout_offline_timeout_s=99.0)
    assert GatePolicy.from_settings(settings) == GatePolicy(schedule=(0.05, 0.2, 0.7), min_resolved=99,
                                                            confidence=0.9, margin=0.2, guard_min_turns=7,
                                                            timeout_s=42.0, min_distinct=0.6, max_tenant_share=0.3,
                                                            gate="reward", offline_timeout_s=99.0)
    assert GatePolicy.from_settings(Settings()) == GatePolicy()


def _drop(_: events.DeploymentChanged) -> None:
    """A publisher for changes only the store needs to see here."""
