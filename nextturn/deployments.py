"""Deployments: which adapter version serves a scope, the moves that change it, and the evidence per version.

The state, one row per scope (``tables.Deployment``): the stable version (None: the base model), an
optional canary at a weight, the canary's weight schedule, whether the rollout is paused, and since when
the canary runs. Each move below returns the :class:`~nextturn.events.DeploymentChanged` that makes it;
:func:`commit` writes it to the store first, as a compare-and-set on the id of the change it was computed
from (the controller and an operator acting at once cannot overwrite each other: the second one computes
its move again on the new state), and then hands it to the event log, from which every gateway replica
learns it. The store is the truth; gateways also re-read it now and then, in case an event is late.

Routing (``gateway.routing``): a session's arm is a stable hash of (tenant, session id), a number in [0, 1)
(:func:`bucket`); the session goes to the canary when it is below the canary's weight. Raising the weight
only adds sessions to the canary. A session that already has turns keeps the version its last turn ran
on, as long as that version still serves (a rolled-back canary does not).

Moves: ``canary`` (a new version at the schedule's first weight), ``step`` (the next weight), ``promote``
(the canary, or a named version, becomes stable), ``rollback`` (drop the canary; without one, the stable
version goes back to the one before it), ``reject`` (a version is refused before it serves; the state does
not change), ``pause`` and ``resume``. The adapter's status in the store follows (see ``tables.Adapter``).
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from nextturn import events, tables
from nextturn.errors import DeploymentConflict, InvalidChange
from nextturn.scopes import chain
from nextturn.store import Evidence, Store

CONTROLLER = "controller"


@dataclass(frozen=True)
class Deployment:
    scope: str = events.DEFAULT_SCOPE
    stable: int | None = None
    canary: int | None = None
    weight: float = 0.0
    paused: bool = False
    schedule: tuple[float, ...] = ()
    canary_since: datetime | None = None
    watch_since: datetime | None = None  # the stable version is watched since then (promoted on offline evidence)
    last_event_id: str | None = None  # the change this state came from; None: never changed
    updated_at: datetime | None = None

    @classmethod
    def read(cls, store: Store, scope: str = events.DEFAULT_SCOPE) -> Deployment:
        return cls.from_row(store.get(tables.Deployment, scope), scope)

    @classmethod
    def read_all(cls, store: Store) -> list[Deployment]:
        """Every scope's deployment (``default`` too, when it never changed)."""
        found = [cls.from_row(row, row.scope) for row in store.deployments()]
        if all(deployment.scope != events.DEFAULT_SCOPE for deployment in found):
            found.append(cls(events.DEFAULT_SCOPE))
        return found

    @classmethod
    def from_row(cls, row: tables.Deployment | None, scope: str = events.DEFAULT_SCOPE) -> Deployment:
        if row is None:
            return cls(scope)
        return cls(row.scope, row.stable_version, row.canary_version, row.canary_weight, row.paused,
                   tuple(row.schedule), _aware(row.canary_since), _aware(row.watch_since), row.last_event_id,
                   _aware(row.updated_at))

    def name(self, version: int | None) -> str:
        """The model id a version is served under (``base`` for None)."""
        return events.BASE_VERSION if version is None else events.adapter_name(self.scope, version)

    @property
    def stable_name(self) -> str:
        return self.name(self.stable)

    @property
    def canary_name(self) -> str | None:
        return None if self.canary is None else self.name(self.canary)

    def change(self, action: str, actor: str, reason: str, *, subject: int | None = None,
               **state: Any) -> events.DeploymentChanged:
        """The event that moves this deployment to ``state`` (fields not given stay as they are)."""
        now = replace(self, **state)
        return events.DeploymentChanged(
            scope=self.scope, stable_version=now.stable, canary_version=now.canary, canary_weight=now.weight,
            paused=now.paused, schedule=list(now.schedule), canary_since=now.canary_since,
            watch_since=now.watch_since, action=action,  # type: ignore[arg-type]
            subject_version=subject, reason=reason, actor=actor)


def bucket(tenant: str, session_id: str) -> float:
    """Where a session falls in [0, 1): the same on every replica and after a restart.

    >>> bucket("acme", "s1") == bucket("acme", "s1"), 0 <= bucket("acme", "s1") < 1
    (True, True)
    """
    digest = hashlib.blake2b(f"{tenant}\x00{session_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


# --- moves: each returns the change, or raises InvalidChange saying why it does not apply --------------


def canary(state: Deployment, version: int, schedule: Sequence[float], actor: str, reason: str,
           now: datetime) -> events.DeploymentChanged:
    """``version`` becomes the canary at the schedule's first weight.

    >>> from nextturn.events import utc_now
    >>> canary(Deployment(), 3, [0.1, 0.5], "controller", "published", utc_now()).canary_weight
    0.1
    """
    if state.canary is not None:
        raise InvalidChange(f"version {state.canary} is the canary now; promote or roll it back first")
    if not schedule or any(not 0 < weight < 1 for weight in schedule) or list(schedule) != sorted(schedule):
        raise InvalidChange(f"a schedule is rising weights between 0 and 1 (exclusive), not {list(schedule)}")
    if state.stable is not None and version <= state.stable:
        raise InvalidChange(f"version {version} is not newer than the stable version {state.stable}")
    return state.change("canary", actor, reason, subject=version, canary=version, weight=schedule[0],
                        schedule=tuple(schedule), canary_since=now)


def step(state: Deployment, actor: str, reason: str) -> events.DeploymentChanged:
    """The canary's next weight (``promote`` after the last one)."""
    if state.canary is None:
        raise InvalidChange("there is no canary to step up")
    later = [weight for weight in state.schedule if weight > state.weight]
    if not later:
        raise InvalidChange(f"the canary is at its last weight ({state.weight}); promote it")
    return state.change("step", actor, reason, subject=state.canary, weight=later[0])


def promote(state: Deployment, actor: str, reason: str, version: int | None = None, *,
            watch_since: datetime | None = None) -> events.DeploymentChanged:
    """The canary (or ``version``, a published version) becomes the stable version; any canary ends.
    ``watch_since``: it was promoted on offline evidence, and is watched from then (see :func:`unwatch`)."""
    chosen = state.canary if version is None else version
    if chosen is None:
        raise InvalidChange("there is no canary to promote; name a version to make it stable")
    if chosen == state.stable and state.canary is None:
        raise InvalidChange(f"version {chosen} is already the stable version")
    return state.change("promote", actor, reason, subject=chosen, stable=chosen, canary=None, weight=0.0,
                        schedule=(), canary_since=None, watch_since=watch_since)


def rollback(state: Deployment, actor: str, reason: str, back_to: int | None = None) -> events.DeploymentChanged:
    """Drop the canary: its sessions go back to the stable version. Without a canary, the stable version
    goes back to ``back_to`` (the one before it: see :func:`previous_stable`)."""
    if state.canary is not None:
        return state.change("rollback", actor, reason, subject=state.canary, canary=None, weight=0.0,
                            schedule=(), canary_since=None)
    if state.stable is None:
        raise InvalidChange("the base model serves and there is no canary: there is nothing to roll back")
    return state.change("rollback", actor, reason, subject=state.stable, stable=back_to, watch_since=None)


def unwatch(state: Deployment, actor: str, reason: str) -> events.DeploymentChanged:
    """End the watch on the stable version: it held up (or the watch ran out of time)."""
    if state.watch_since is None:
        raise InvalidChange("the stable version is not watched")
    return state.change("set", actor, reason, subject=None, watch_since=None)


def reject(state: Deployment, version: int, actor: str, reason: str) -> events.DeploymentChanged:
    """Refuse ``version`` before it serves; nothing else changes."""
    return state.change("reject", actor, reason, subject=version)


def pause(state: Deployment, actor: str, reason: str) -> events.DeploymentChanged:
    """Hold the canary where it is: no step, promotion or timeout (the fast guardrails still roll back)."""
    if state.paused:
        raise InvalidChange("the rollout is already paused")
    return state.change("pause", actor, reason, subject=state.canary, paused=True)


def resume(state: Deployment, actor: str, reason: str) -> events.DeploymentChanged:
    if not state.paused:
        raise InvalidChange("the rollout is not paused")
    return state.change("resume", actor, reason, subject=state.canary, paused=False)


Move = Callable[[Deployment], events.DeploymentChanged]


def commit(store: Store, scope: str, move: Move, publish: Callable[[events.DeploymentChanged], None], *,
           attempts: int = 3) -> events.DeploymentChanged:
    """Compute ``move`` on the stored state and write it; when someone else changed the state in between,
    compute it again on the new state. Then ``publish`` it (the event log, or the gateway's publisher)."""
    for attempt in range(attempts):
        state = Deployment.read(store, scope)
        change = move(state)
        try:
            store.change_deployment(change, expected=state.last_event_id)
        except DeploymentConflict:
            if attempt == attempts - 1:
                raise
            continue
        publish(change)
        return change
    raise AssertionError("unreachable")


def previous_stable(store: Store, scope: str, current: int | None) -> int | None:
    """The stable version before ``current``: the latest earlier one that was not rolled back."""
    bad = {version for version, status in store.adapter_statuses(scope).items() if status in BAD}
    for change in store.deployment_changes(scope, limit=1000):
        if change.stable_version != current and change.stable_version not in bad:
            return change.stable_version
    return None


BAD = ("rolled_back", "rejected")  # statuses of versions that must not serve again
LATENCY_WINDOW = 2000  # an arm's p99 is over its latest turns: a canary that slows down is seen soon
MAX_TENANT_SHARE = 0.5  # of an arm's rewards, the most one tenant's may be (settings: rollout_max_tenant_share)


# --- evidence: what each version did since a time ------------------------------------------------------


@dataclass
class Arm:
    """One version's record since the canary began: turns (by flaw), latencies, and the rewards of its
    resolved turns (a turn with a signal that carries a reward; the signal's latest revision counts)."""

    version: str
    turns: int = 0
    flaws: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)  # the latest LATENCY_WINDOW turns
    rewards: list[float] = field(default_factory=list)
    turns_since_step: int = 0  # of them, turns that started at the current weight
    capped: int = 0  # rewards left out: a tenant's beyond its share

    @property
    def mean_reward(self) -> float | None:
        return sum(self.rewards) / len(self.rewards) if self.rewards else None

    def p99_ms(self) -> float | None:
        if not self.latencies_ms:
            return None
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]

    def summary(self) -> dict[str, Any]:
        return {"version": self.version, "turns": self.turns, "flaws": dict(self.flaws),
                "p99_ms": self.p99_ms(), "resolved": len(self.rewards), "mean_reward": self.mean_reward,
                "capped": self.capped}


def evidence(state: Deployment) -> tuple[Evidence, Evidence] | None:
    """Which turns are the (canary, stable) arms' evidence; None without a canary. Both are turns of the
    scope (or a scope below it) that the client did not pin. The stable arm is what the scope's other
    sessions are served: its stable version, or while it has none, what its chain serves (an ancestor's
    version, or the base model)."""
    if state.canary_name is None:
        return None
    canary = Evidence(state.scope, (state.canary_name,))
    if state.stable is not None:
        return canary, Evidence(state.scope, (state.stable_name,))
    return canary, Evidence(state.scope, (events.BASE_VERSION,), ancestors=chain(state.scope)[1:])


def arms(store: Store, state: Deployment, max_tenant_share: float = MAX_TENANT_SHARE) -> tuple[Arm, Arm] | None:
    """(canary, stable) since the canary began; None without a canary (:func:`evidence` says which turns
    count). Where several tenants' rewards are in, no tenant's make more than ``max_tenant_share`` of an
    arm's (:func:`capped`): one tenant cannot vote a canary in or out for the others."""
    which = evidence(state)
    if which is None or state.canary_name is None or state.canary_since is None:
        return None
    found = (Arm(state.canary_name), Arm(state.stable_name))
    step_began = state.updated_at or state.canary_since
    rewards = []
    for arm, turns_of in zip(found, which, strict=True):
        for flaw, turns, since_step in store.served_turns(turns_of, state.canary_since, step_began):
            arm.turns += turns
            arm.turns_since_step += since_step or 0
            if flaw is not None:
                arm.flaws[flaw] += turns
        arm.latencies_ms = store.latencies(turns_of, state.canary_since, LATENCY_WINDOW)
        rewards.append(store.rewards(turns_of, state.canary_since))
    _share_out(found, rewards, max_tenant_share)
    return found


WATCH_BEFORE = 200  # signal rows of the version before a watched one: its latest rewards are the yardstick


def watched(store: Store, state: Deployment, max_tenant_share: float = MAX_TENANT_SHARE) -> tuple[Arm, Arm] | None:
    """(the stable version since its watch began, what served the scope before it) when the stable version is
    watched, else None. The version before is the previous stable one (:func:`previous_stable`), or while
    there was none what the scope's chain served; its evidence is its latest rewards before the watch began.
    Tenants' shares are capped as in :func:`arms`."""
    if state.watch_since is None or state.stable is None:
        return None
    previous = previous_stable(store, state.scope, state.stable)
    before = (Evidence(state.scope, (state.name(previous),)) if previous is not None
              else Evidence(state.scope, (events.BASE_VERSION,), ancestors=chain(state.scope)[1:]))
    found = (Arm(state.stable_name), Arm(state.name(previous)))
    rewards = [store.rewards(Evidence(state.scope, (state.stable_name,)), state.watch_since),
               store.rewards(before, None, until=state.watch_since, limit=WATCH_BEFORE)]
    _share_out(found, rewards, max_tenant_share)
    return found


def _share_out(found: tuple[Arm, Arm], rewards: list[list[tuple[str, float]]], share: float) -> None:
    """Each arm's rewards, capped per tenant where more than one tenant's are in (either arm)."""
    shared = len({tenant for of_arm in rewards for tenant, _ in of_arm}) > 1
    for arm, mine in zip(found, rewards, strict=True):
        arm.rewards = capped(mine, share) if shared else [reward for _, reward in mine]
        arm.capped = len(mine) - len(arm.rewards)


def capped(rewards: list[tuple[str, float]], share: float) -> list[float]:
    """The rewards kept when no tenant may make more than ``share`` of them: each tenant keeps its latest
    ``limit``, the largest limit under which the tenant at the limit still holds at most ``share``.

    >>> kept = capped([("mallory", 1.0)] * 100 + [("alice", -1.0)] * 10 + [("bob", 0.5)] * 5, 0.5)
    >>> kept.count(1.0), kept.count(-1.0), kept.count(0.5)  # mallory keeps 15 of 30
    (15, 10, 5)
    >>> len(capped([("alice", 1.0)] * 10 + [("bob", 1.0)] * 10, 0.5)), capped([("alice", 1.0)] * 3, 0.5)
    (20, [])
    """
    counts = Counter(tenant for tenant, _ in rewards)
    if share >= 1.0 or not counts:
        return [reward for _, reward in rewards]

    def fits(limit: int) -> bool:
        return limit <= share * sum(min(count, limit) for count in counts.values())

    # fits() holds on an interval [0, best]: share * sum(min(count, limit)) - limit is concave in the limit.
    low, high = 0, max(counts.values())
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    kept: Counter[str] = Counter()
    latest_first = []
    for tenant, reward in reversed(rewards):
        if kept[tenant] < low:
            kept[tenant] += 1
            latest_first.append(reward)
    return latest_first[::-1]


def _aware(when: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes for what was stored as UTC."""
    return when.replace(tzinfo=UTC) if when is not None and when.tzinfo is None else when


# --- operators: the same actions from the CLI and the admin API -------------------------------------

ACTIONS = ("promote", "rollback", "pause", "resume")


Publish = Callable[[events.DeploymentChanged], None]


def operate(store: Store, scope: str, action: str, actor: str, reason: str, publish: Publish,
            version: int | None = None) -> events.DeploymentChanged:
    """An operator's action, recorded with who and why. ``version``: for promote, the version to make stable
    (default: the canary); for rollback without a canary, the version to go back to (default: the previous)."""
    if not actor.strip() or not reason.strip():
        raise InvalidChange("say who acts and why: both are recorded with the change")
    if action not in ACTIONS:
        raise InvalidChange(f"unknown action {action!r}; one of {', '.join(ACTIONS)}")
    if version is not None and store.get(tables.Adapter, (scope, version)) is None:
        raise InvalidChange(f"no version {version} has been published in scope {scope!r}")

    def move(state: Deployment) -> events.DeploymentChanged:
        if action == "promote":
            return promote(state, actor, reason, version)
        if action == "rollback":
            back_to = version if version is not None else previous_stable(store, scope, state.stable)
            return rollback(state, actor, reason, back_to)
        return pause(state, actor, reason) if action == "pause" else resume(state, actor, reason)

    return commit(store, scope, move, publish)


def overview(store: Store, lately_s: float = 86_400.0) -> list[dict[str, Any]]:
    """Every scope (with a deployment, a version or signals lately): its stable version and canary, published
    versions, turns resolved in the last ``lately_s`` with their mean reward, and what serves it while it has
    no stable version (its chain's first scope that has one, else the base model)."""
    states = {state.scope: state for state in Deployment.read_all(store)}
    figures = store.scope_figures(events.utc_now() - timedelta(seconds=lately_s))
    found = []
    for scope in sorted(set(states) | set(figures)):
        state = states.get(scope, Deployment(scope))
        parents = [states[parent] for parent in chain(scope)[1:] if parent in states]
        fallback = next((parent.stable_name for parent in parents if parent.stable is not None), events.BASE_VERSION)
        found.append({"scope": scope, "stable": state.stable_name if state.stable is not None else None,
                      "canary": state.canary_name, "canary_weight": state.weight, "paused": state.paused,
                      **figures.get(scope, {"versions": 0, "resolved": 0, "mean_reward": None}),
                      "falls_back_to": fallback})
    return found


def status(store: Store, scope: str = events.DEFAULT_SCOPE, history: int = 10,
           max_tenant_share: float = MAX_TENANT_SHARE) -> dict[str, Any]:
    """The deployment, each arm's evidence while there is a canary, and the latest changes."""
    state = Deployment.read(store, scope)
    evidence = arms(store, state, max_tenant_share)
    return {
        "scope": scope, "stable": state.stable_name, "canary": state.canary_name, "canary_weight": state.weight,
        "schedule": list(state.schedule), "paused": state.paused,
        "canary_since": state.canary_since.isoformat() if state.canary_since else None,
        "watch_since": state.watch_since.isoformat() if state.watch_since else None,
        "arms": {"canary": evidence[0].summary(), "stable": evidence[1].summary()} if evidence else None,
        "history": [{"at": _aware(change.changed_at).isoformat(),  # type: ignore[union-attr]
                     "action": change.action, "version": change.subject_version, "actor": change.actor,
                     "reason": change.reason} for change in store.deployment_changes(scope, history)],
    }
