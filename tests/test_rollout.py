"""Canary rollouts end to end: the gateway on the embedded engine over real uvicorn, the real signals worker
turning the simulated users' ratings into rewards, and the rollout controller, on the SQLite event log
and store. Versions are published as the trainer publishes them (AdapterPublished for a PEFT directory)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import create_app
from nextturn import events, tables
from nextturn.bus import EventLog
from nextturn.deployments import bucket, rollback
from nextturn.settings import Settings
from nextturn.store import Store
from rollout.gates import GatePolicy

from support.adapters import random_adapter, taught_adapter
from support.eventually import eventually
from support.rolling import (
    ADMIN,
    ANSWER,
    ControllerThread,
    Conversation,
    Traffic,
    actions,
    deployment,
    publish,
    signals_running,
)
from support.services import Uvicorn

pytestmark = pytest.mark.slow  # a gateway, a controller and traffic, end to end


@pytest.fixture(scope="module")
def settings(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(data_dir=tmp_path_factory.mktemp("rollout"), engine="embedded", model=str(tiny_model),
                    api_keys="sk-acme:acme", admin_key="sk-admin", signals_idle_timeout_s=0.5,
                    rollout_check_interval_s=0.2, rollout_drain_s=3600.0, rollout_schedule=[0.3, 0.6],
                    rollout_min_resolved=8, rollout_guard_min_turns=8,
                    scope_by="deployment")  # the shared deployment's rollouts; a tenant's: test_scoped_serving.py


@pytest.fixture(scope="module")
def taught(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A broken version (its answers are empty) and a better one (it answers what the users reward)."""
    root = tmp_path_factory.mktemp("taught")
    return {"empty": taught_adapter(tiny_model, root / "empty", ""),
            "better": taught_adapter(tiny_model, root / "better", f"{ANSWER}.")}


@pytest.fixture(scope="module")
def parts(settings: Settings) -> Iterator[tuple[Uvicorn, EventLog, Store]]:
    """The gateway and a signals worker; tests start their own controllers."""
    with Uvicorn(create_app(settings)) as gateway, signals_running(settings) as (event_log, store):
        yield gateway, event_log, store


def policy(settings: Settings) -> GatePolicy:
    return GatePolicy.from_settings(settings)


def test_a_broken_version_is_rolled_back_and_only_canary_sessions_saw_it(
    settings: Settings, parts: tuple[Uvicorn, EventLog, Store], taught: dict[str, Path]
) -> None:
    gateway, event_log, store = parts
    controller = ControllerThread(event_log, store, policy=policy(settings))
    try:
        with Traffic(gateway.url) as traffic:
            eventually(lambda: len(traffic.served) >= 10, "traffic on the base model", timeout_s=120)
            publish(event_log, 1, taught["empty"])
            eventually(lambda: "rollback" in actions(store, 1), "the broken version to be rolled back", timeout_s=120)
            rolled_back = time.monotonic()
            eventually(lambda: len(traffic.since(rolled_back + 0.5)) >= 10, "traffic after the rollback", timeout_s=120)
    finally:
        controller.stop()
    assert traffic.failures == []
    assert actions(store, 1) == ["canary", "rollback"]
    change = store.deployment_changes(events.DEFAULT_SCOPE, limit=1)[0]
    assert change.actor == "controller" and change.reason.startswith("fast guardrail: empty outputs")
    assert store.get(tables.Adapter, ("default", 1)).status == "rolled_back"  # type: ignore[union-attr]
    broken = [item for item in traffic.served if item.adapter == "default-v1"]
    assert broken and all(item.content == "" for item in broken)
    assert all(bucket("acme", item.session) < 0.3 for item in broken)  # only sessions hashed to the canary
    assert {item.adapter for item in traffic.since(rolled_back + 0.5)} == {"base"}  # its sessions moved at once
    eventually(lambda: "default-v1" not in httpx.get(f"{gateway.url}/v1/admin/adapters", headers=ADMIN).json()[
        "adapters"], "the gateway to unload it", timeout_s=120)


def test_a_better_version_is_promoted_and_a_restarted_controller_goes_on(
    settings: Settings, parts: tuple[Uvicorn, EventLog, Store], taught: dict[str, Path]
) -> None:
    gateway, event_log, store = parts
    controller = ControllerThread(event_log, store, policy=policy(settings))
    before = Conversation(gateway.url, "begun before")
    assert [before.say(), before.say()] == ["base", "base"]
    with Traffic(gateway.url) as traffic:
        publish(event_log, 2, taught["better"])
        eventually(lambda: deployment(store).canary == 2, "the canary", timeout_s=120)
        during = [Conversation(gateway.url, f"begun during {n}") for n in range(20)]
        first = [conversation.say() for conversation in during]
        assert set(first) == {"base", "default-v2"}, first  # a share of new sessions on each version
        eventually(lambda: "step" in actions(store, 2), "the next weight", timeout_s=120)
        assert [conversation.say() for conversation in during] == first  # sessions keep their version
        controller.stop()  # in the middle of the rollout: the next controller reads where it was from the store
        controller = ControllerThread(event_log, store, policy=policy(settings))
        try:
            eventually(lambda: deployment(store).stable == 2, "the better version to be promoted", timeout_s=120)
        finally:
            controller.stop()
        promoted = time.monotonic()
        eventually(lambda: len(traffic.since(promoted + 0.5)) >= 10, "traffic after the promotion", timeout_s=120)
        metrics = _metrics(gateway.url)
    assert traffic.failures == []
    assert actions(store, 2) == ["canary", "step", "promote"]
    reason = store.deployment_changes(events.DEFAULT_SCOPE, limit=1)[0].reason
    assert reason.startswith("reward: P(canary >= stable - 0.05)"), reason
    assert store.get(tables.Adapter, ("default", 2)).status == "stable"  # type: ignore[union-attr]
    after = traffic.since(promoted + 0.5)
    assert {item.adapter for item in after} == {"default-v2"} and all(ANSWER in item.content for item in after)
    # A session that began before a change keeps its version until it ends: base drains.
    assert before.say() == "base" and [conversation.say() for conversation in during] == first
    assert Conversation(gateway.url, "begun after").say() == "default-v2"
    assert metrics[("nextturn_version_weight", (("adapter", "default-v2"), ("role", "stable")))] == 1.0
    assert metrics[("nextturn_version_weight", (("adapter", "base"), ("role", "draining")))] == 0.0
    assert metrics[("nextturn_turns_total", (("adapter", "default-v1"), ("status", "ok")))] > 0
    assert metrics[("nextturn_turn_flaws_total", (("adapter", "default-v1"), ("flaw", "empty")))] > 0


def test_operators_promote_pause_and_roll_back_with_who_and_why(
    settings: Settings, parts: tuple[Uvicorn, EventLog, Store], tiny_model: Path, tmp_path: Path
) -> None:
    gateway, event_log, store = parts
    publish(event_log, 3, random_adapter(tiny_model, tmp_path / "v3", seed=3))
    controller = ControllerThread(event_log, store, policy=policy(settings))
    try:
        eventually(lambda: deployment(store).canary == 3, "the canary", timeout_s=120)
        act = _admin(gateway.url)
        paused = act("pause", actor="ops-alice", reason="looking at the canary")
        assert paused["paused"] is True and paused["canary"] == "default-v3"
        assert act("pause", actor="ops-alice", reason="twice", status=409)["error"]["code"] == "rollout_conflict"
        assert act("promote", actor="", reason="no one", status=400)["error"]["type"] == "invalid_request_error"
        promoted = act("promote", actor="ops-alice", reason="looks fine to me")
        assert (promoted["stable"], promoted["canary"]) == ("default-v3", None)
        assert promoted["replica"]["stable"] == "default-v3"  # the replica that answered routes by it already
        with Traffic(gateway.url, workers=2) as traffic:
            eventually(lambda: [s for s in traffic.served if s.adapter == "default-v3"], "v3 serving", timeout_s=120)
            rolled = _cli(settings, "rollout", "rollback", "--reason", "users complain", "--actor", "ops-bob")
            assert "rollback 3 by ops-bob: stable 2" in rolled.stdout
            after = time.monotonic()
            eventually(lambda: len(traffic.since(after + 1.0)) >= 5, "traffic after the rollback", timeout_s=120)
        assert traffic.failures == []
        assert {item.adapter for item in traffic.since(after + 1.0)} == {"default-v2"}
        assert _cli(settings, "rollout", "resume", "--reason", "done", "--actor", "ops-alice").returncode == 0
    finally:
        controller.stop()
    history = [(c.action, c.subject_version, c.actor, c.reason)
               for c in reversed(store.deployment_changes(events.DEFAULT_SCOPE, limit=5))]
    assert history[-4:] == [("pause", 3, "ops-alice", "looking at the canary"),
                            ("promote", 3, "ops-alice", "looks fine to me"),
                            ("rollback", 3, "ops-bob", "users complain"), ("resume", None, "ops-alice", "done")]
    assert store.get(tables.Adapter, ("default", 3)).status == "rolled_back"  # type: ignore[union-attr]
    status = json.loads(_cli(settings, "rollout", "status", "--json").stdout)
    assert status["stable"] == "default-v2" and status["history"][0]["actor"] == "ops-alice"


def test_replicas_see_a_change_without_its_event(settings: Settings, parts: tuple[Uvicorn, EventLog, Store]) -> None:
    """The periodic check: a change in the store whose event never reached the log still takes effect."""
    gateway, _, store = parts
    state = deployment(store)
    assert state.stable == 2
    store.change_deployment(rollback(state, "ops-carol", "written to the store only", back_to=None),
                            expected=state.last_event_id)
    replica = f"{gateway.url}/v1/admin/rollout"
    eventually(lambda: httpx.get(replica, headers=ADMIN).json()["replica"]["stable"] == "base",
               "the replica to route by the change", timeout_s=120)


def _admin(url: str):  # type: ignore[no-untyped-def]
    def act(action: str, *, actor: str, reason: str, status: int = 200) -> dict:  # type: ignore[type-arg]
        response = httpx.post(f"{url}/v1/admin/rollout/{action}", headers=ADMIN, timeout=30,
                              json={"actor": actor, "reason": reason})
        assert response.status_code == status, response.text
        return response.json()  # type: ignore[no-any-return]
    return act


def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"NEXTTURN_DATA_DIR": str(settings.data_dir), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "nextturn", *args], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done


def _metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{url}/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}
