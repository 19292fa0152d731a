"""The rollout controller (``nextturn rollout run``): puts each published version behind a canary and
promotes it or rolls it back by itself (rules: :mod:`rollout.gates`; state and moves:
:mod:`nextturn.deployments`).

One controller serves every scope (``scope=None``; ``nextturn rollout run`` without ``--scope``), or one.
Each check, in order:
1. poll ``adapters`` (group ``rollout``, or ``rollout-<scope>`` for one scope) and store what was published
   (the recorder may not have yet), so that a new version is seen at once rather than at the next check;
2. publish any change a previous check wrote to the store but could not put on the event log;
3. read every scope's deployment and each scope's newest published version from the store (two reads,
   however many scopes). For each scope, on its own: without a canary, the newest published version newer
   than the stable one is rejected (collapse guards) or becomes the canary; older published ones are
   skipped (paused: no new canary). With one, gather each arm's evidence and decide: wait, step, promote
   or roll back. Where the scope is too quiet for the reward gate and the version carries the trainer's
   offline evidence, the canary is a short one and that evidence may promote it; a version so promoted is
   watched, and rolled back if it does worse than the one before (:mod:`rollout.gates`). The reads grow
   with the number of canaries and watches, not of scopes;
4. write the change to the store as a compare-and-set on the state it was decided on (an operator who
   acted meanwhile wins, and the next check decides again on the new state), then append it to the log;
5. commit the polled offsets.
All the state is in the store, so a controller that restarts goes on from where the last one was. Run one
controller for all scopes (or one per scope); a second one is harmless (its compare-and-set fails) but
useless.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta

from nextturn import deployments, events, tables
from nextturn.bus import EventLog
from nextturn.deployments import CONTROLLER, Deployment
from nextturn.errors import CommitFailed, DeploymentConflict, EventLogUnavailable, InvalidChange, StoreUnavailable
from nextturn.store import Store
from rollout.gates import GatePolicy, Verdict, collapse, decide, offline, offline_evidence, quiet, watch

log = logging.getLogger(__name__)


class RolloutController:
    def __init__(self, event_log: EventLog, store: Store, *, scope: str | None = events.DEFAULT_SCOPE,
                 policy: GatePolicy | None = None, clock: Callable[[], datetime] = events.utc_now) -> None:
        self.scope = scope  # None: every scope
        self.policy = policy or GatePolicy()
        self.verdicts: dict[str, Verdict] = {}  # each scope's last decision, "wait" included
        self._log = event_log
        self._store = store
        self._clock = clock
        self._unpublished: list[events.DeploymentChanged] = []
        self._consumer = event_log.consumer("rollout" if scope is None else f"rollout-{scope}", [events.ADAPTERS])

    @property
    def verdict(self) -> Verdict | None:
        """The last decision on the controller's scope (``default`` when it serves every scope)."""
        return self.verdicts.get(self.scope or events.DEFAULT_SCOPE)

    def run(self, stop: threading.Event, interval_s: float = 2.0, pause_s: tuple[float, float] = (0.5, 30.0)) -> None:
        """Check until ``stop`` is set. A store or log that is down is a pause (doubling up to its maximum),
        not an end: the state is in the store, and a version announced meanwhile is found there (the recorder
        stores the announcements too)."""
        pause = pause_s[0]
        while not stop.is_set():
            try:
                self.run_once(interval_s)
                pause = pause_s[0]
            except (StoreUnavailable, EventLogUnavailable) as exc:
                log.warning("rollout checks paused for %.1f s: %s", pause, exc)
                stop.wait(pause)
                pause = min(pause * 2, pause_s[1])

    def run_once(self, timeout_s: float = 1.0) -> events.DeploymentChanged | None:
        """One check (waiting up to ``timeout_s`` for a published version); the change it made, if any."""
        deliveries = self._consumer.poll(100, timeout_s)
        published = [d.event for d in deliveries if isinstance(d.event, events.AdapterPublished)
                     and self.scope in (None, d.event.scope)]
        if published:
            self._store.apply(published)
        self._publish()
        change = self.check()
        try:
            self._consumer.commit()
        except CommitFailed:
            pass  # the versions are in the store already; seeing them again changes nothing
        return change

    def check(self) -> events.DeploymentChanged | None:
        """Decide every scope this controller serves; return the last change made, if any."""
        newest = self._store.newest_published()
        if self.scope is not None:
            states = [Deployment.read(self._store, self.scope)]
        else:
            known = {state.scope: state for state in Deployment.read_all(self._store)}
            states = [*known.values(), *(Deployment(scope) for scope in newest if scope not in known)]
        change = None
        for state in states:
            change = self._check(state, newest.get(state.scope)) or change
        return change

    def _check(self, state: Deployment, newest: int | None) -> events.DeploymentChanged | None:
        if state.watch_since is not None:
            moved = self._watch(state)
            if moved is not None:
                return moved
        if state.canary is None:
            return self._begin(state, newest)
        verdict = judge(self._store, state, self.policy, self._clock())
        assert verdict is not None  # there is a canary
        self.verdicts[state.scope] = verdict
        if verdict.action == "wait":
            return None
        if verdict.action == "promote":
            watch_since = self._clock() if verdict.offline else None
            return self._make(state, deployments.promote(state, CONTROLLER, verdict.reason, watch_since=watch_since))
        moves = {"step": deployments.step, "rollback": deployments.rollback}
        return self._make(state, moves[verdict.action](state, CONTROLLER, verdict.reason))

    def _watch(self, state: Deployment) -> events.DeploymentChanged | None:
        """The watch on a version promoted on offline evidence: roll it back (its canary first), end the
        watch, or nothing yet (nothing while the rollout is paused)."""
        if state.paused:
            return None
        found = deployments.watched(self._store, state, self.policy.max_tenant_share)
        if found is None or state.watch_since is None:
            return None
        verdict = watch(*found, self.policy, (self._clock() - state.watch_since).total_seconds())
        if verdict.action == "wait":
            return None
        self.verdicts[state.scope] = verdict
        if verdict.action == "keep":
            return self._make(state, deployments.unwatch(state, CONTROLLER, verdict.reason))
        if state.canary is not None:  # it descends from the version going back: it goes first
            return self._make(state, deployments.rollback(state, CONTROLLER, f"{verdict.reason}; its canary first"))
        back_to = deployments.previous_stable(self._store, state.scope, state.stable)
        return self._make(state, deployments.rollback(state, CONTROLLER, verdict.reason, back_to))

    def close(self) -> None:
        self._consumer.close()

    def _begin(self, state: Deployment, newest: int | None) -> events.DeploymentChanged | None:
        """The newest published version (``newest``, read for every scope at once): rejected, or the new
        canary."""
        scope = state.scope
        if state.paused:
            self.verdicts[scope] = Verdict("wait", "paused")
            return None
        found = self._store.get(tables.Adapter, (scope, newest)) if newest and newest > (state.stable or 0) else None
        if found is None or found.status != "published":
            self.verdicts[scope] = Verdict("wait", "no new version")
            return None
        guards = found.meta.get("guards")
        rejected = collapse(guards, self.policy)
        if rejected is not None:
            verdict = self.verdicts[scope] = Verdict("rollback", f"collapse guard: {rejected}")
            return self._make(state, deployments.reject(state, found.version, CONTROLLER, verdict.reason))
        checked = "collapse guards within bounds" if guards and guards.get("prompts") else "no collapse guards measured"
        schedule = self.policy.schedule
        if offline_for(self._store, state.scope, found.version, schedule[0], self.policy, self._clock()):
            schedule = (self.policy.offline_weight,)
            checked += (f"; the scope is too quiet for the reward gate: a short canary at {schedule[0]:g}, "
                        "then its offline evidence decides")
        verdict = self.verdicts[scope] = Verdict("step", f"published; {checked}")
        try:
            change = deployments.canary(state, found.version, schedule, CONTROLLER, verdict.reason, self._clock())
        except InvalidChange as exc:
            log.error("version %s cannot become the canary: %s", found.version, exc)
            return None
        return self._make(state, change)

    def _make(self, state: Deployment, change: events.DeploymentChanged) -> events.DeploymentChanged | None:
        try:
            self._store.change_deployment(change, expected=state.last_event_id)
        except DeploymentConflict:
            log.info("the deployment changed while deciding; deciding again on the new state")
            return None
        log.info("%s %s: %s", change.action, change.subject_version, change.reason)
        self._unpublished.append(change)
        self._publish()
        return change

    def _publish(self) -> None:
        """Append the changes written to the store; gateways read the store anyway, so a log that is down
        only delays them."""
        if not self._unpublished:
            return
        try:
            self._log.append(self._unpublished)
        except EventLogUnavailable as exc:
            log.warning("cannot append %d deployment change(s) to the event log yet: %s", len(self._unpublished), exc)
            return
        self._unpublished.clear()


def judge(store: Store, state: Deployment, policy: GatePolicy, now: datetime) -> Verdict | None:
    """What the controller decides on a deployment's canary now (None without a canary): the reward gate,
    or in a scope too quiet for it, the version's offline evidence (:mod:`rollout.gates`)."""
    evidence = deployments.arms(store, state, policy.max_tenant_share)
    if evidence is None or state.canary is None:
        return None
    canary, stable = evidence
    found = offline_for(store, state.scope, state.canary, state.weight, policy, now)
    verdict = decide(state, canary, stable, policy if found is None else
                     replace(policy, timeout_s=policy.offline_timeout_s), now)
    if found is not None and verdict.action == "wait" and not state.paused:
        verdict = _offline_verdict(found, canary, verdict, policy)
    return verdict


def offline_for(store: Store, scope: str, version: int, weight: float, policy: GatePolicy,
                now: datetime) -> tuple[float, float, float] | None:
    """The version's offline evidence, when the scope is too quiet at ``weight`` for the reward gate (so that
    evidence decides); else None."""
    if policy.gate == "reward":
        return None
    row = store.get(tables.Adapter, (scope, version))
    found = offline_evidence((row.meta if row is not None else {}).get("guards"))
    if found is None:
        return None
    return found if quiet(store.resolved(scope, now - timedelta(seconds=policy.timeout_s)), weight, policy) else None


def _offline_verdict(found: tuple[float, float, float], canary: deployments.Arm, waiting: Verdict,
                     policy: GatePolicy) -> Verdict:
    """What the offline evidence says of a canary the reward gate cannot decide yet."""
    said = offline(*found, policy)
    if said.action != "promote":
        return Verdict("wait", f"{waiting.reason}; {said.reason}")
    if canary.turns_since_step < policy.guard_min_turns:
        return Verdict("wait", f"{said.reason}; the fast guardrails have seen {canary.turns_since_step} of "
                               f"{policy.guard_min_turns} canary turns")
    return Verdict("promote", f"{said.reason}; fast guardrails clean on {canary.turns} canary turns", offline=True)
