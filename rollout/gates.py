"""The rollout's decision rules, as pure functions: what to do with a canary, given the evidence.

Before a version serves at all, its **collapse guards** (``meta.json``, measured by the trainer on held-out
prompts beside the base model: :mod:`trainer.guards`) must be within bounds, or it is rejected:
entropy at least half the base model's, distinct-1 and distinct-2 at least ``min_distinct`` (90%) of the
base's, mean length between half and twice the base's, KL to the base at most ``max_kl`` nats per token.
Distinct-n is read from the guards' ``probe`` where the trainer measured it: the words of answers to fixed
prompts no user asked about, so that a version that learnt its user's format (which repeats brackets,
quotes or numbering in every answer) is told from one that says the same thing to everything; else
(versions from before the probe) from the replay's tokens. A version without
guards (the trainer had no prompts to measure on) passes, and the canary's reason says so.

While it is the canary, at every check:

1. **Fast guardrails**, always (paused too): for each flaw (:mod:`nextturn.flaws`: failed turns, tool calls
   that do not parse, malformed and empty outputs), once the canary served ``guard_min_turns``, roll back
   when the canary's rate is above the stable version's by more than ``flaw_tolerance`` with 95%
   confidence (the Wilson lower bound of the canary's rate against the stable rate plus the tolerance);
   and roll back when the canary's latency p99 is above ``latency_factor`` times the stable p99 plus
   ``latency_slack_ms`` (each arm with ``guard_min_turns``).
2. **Slow gate** on reward, not while paused: with at least ``min_resolved`` resolved turns in each arm
   (turns since the canary began, the stable ones in the same window), the difference of mean rewards
   d = canary − stable has the approximate posterior N(d̂, s²) (flat prior; s² = var_c/n_c + var_s/n_s, each
   variance floored at ``variance_floor`` so that a few identical rewards do not claim certainty).
   P(d > −margin) ≥ ``confidence``: the canary is no worse than stable, within the margin → the next weight,
   or promotion after the last; the current weight must first have served ``guard_min_turns`` canary turns
   (so the guardrails saw it there). P(d < −margin) ≥ ``confidence``: the canary is worse → roll back.
   The rule is evaluated at every check; each look is a fresh posterior, not a fixed-size test, so the
   minimum counts, not a p-value, are what stop an early lucky streak from promoting.
3. **Low traffic**: without enough evidence either way, the canary waits; after ``timeout_s`` without a
   change (since it began, stepped up, or resumed; never while paused) it is rolled back, with the counts in
   the reason.

**Scopes too quiet for the reward gate** (``gate`` ``auto``, the default; ``offline`` always, ``reward``
never): a scope is quiet at a weight when its resolved turns over the last ``timeout_s``, times the weight,
fall short of ``min_resolved`` (:func:`quiet`): a canary there would time out whatever its worth. A version
whose ``meta.json`` carries the trainer's offline evidence (``guards.offline``: its estimated lift over
what was served on the scope's held-out turns, the standard error, the effective sample size) then
becomes a short canary at ``offline_weight`` (0.5); while the scope stays quiet at that weight, the canary
is promoted once :func:`offline` passes and the fast guardrails have seen ``guard_min_turns`` canary turns,
and its timeout is ``offline_timeout_s``. The reward gate still decides first whenever it has its counts.
A version promoted so is **watched** (:func:`watch`): its rewards since the promotion against the previous
stable version's latest ones; worse with ``confidence``, it is rolled back (a canary that descends from it
first); the watch ends once it has ``min_resolved`` rewards, or after ``offline_timeout_s``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from statistics import NormalDist
from typing import Any, Literal

from nextturn.deployments import Arm, Deployment
from nextturn.flaws import FLAWS
from nextturn.settings import Settings

_Z95 = NormalDist().inv_cdf(0.95)


@dataclass(frozen=True)
class GatePolicy:
    schedule: tuple[float, ...] = (0.1, 0.5)
    min_resolved: int = 30
    confidence: float = 0.95
    margin: float = 0.05
    guard_min_turns: int = 10
    timeout_s: float = 3600.0
    flaw_tolerance: float = 0.02
    latency_factor: float = 2.0
    latency_slack_ms: float = 1000.0
    variance_floor: float = 0.05
    max_kl: float = 2.0
    min_distinct: float = 0.9
    max_tenant_share: float = 0.5  # of an arm's rewards (nextturn.deployments.arms)
    # The low-traffic gate (offline): promote when the estimated lift over what the scope is served, less
    # z standard errors, is at least the margin, on an effective sample of at least min ESS turns.
    offline_margin: float = 0.0
    offline_z: float = 1.645
    offline_min_ess: float = 8.0
    gate: Literal["auto", "reward", "offline"] = "auto"  # when the offline evidence may promote (see above)
    offline_weight: float = 0.5  # the short canary's weight
    offline_timeout_s: float = 86_400.0  # a quiet scope's canary and watch: a day

    @classmethod
    def from_settings(cls, settings: Settings) -> GatePolicy:
        return cls(schedule=tuple(settings.rollout_schedule), min_resolved=settings.rollout_min_resolved,
                   confidence=settings.rollout_confidence, margin=settings.rollout_reward_margin,
                   guard_min_turns=settings.rollout_guard_min_turns, timeout_s=settings.rollout_canary_timeout_s,
                   min_distinct=settings.rollout_min_distinct,
                   max_tenant_share=settings.rollout_max_tenant_share, gate=settings.rollout_gate,
                   offline_timeout_s=settings.rollout_offline_timeout_s)


@dataclass(frozen=True)
class Verdict:
    action: Literal["wait", "step", "promote", "rollback", "keep"]  # keep: a watched version held up
    reason: str
    offline: bool = False  # promoted on offline evidence: watch it


def collapse(guards: dict[str, Any] | None, policy: GatePolicy) -> str | None:
    """Why a version's collapse guards reject it, or None when they are within bounds (or absent).

    >>> base = {"entropy": 2.0, "distinct_1": 0.5, "distinct_2": 0.8, "length": 20.0}
    >>> collapse({**base, "kl_to_base": 0.1, "base": base}, GatePolicy()) is None
    True
    >>> print(collapse({**base, "distinct_2": 0.3, "kl_to_base": 0.1, "base": base}, GatePolicy()))
    distinct_2 0.3 is below 90% of the base model's 0.8
    >>> formatted = {**base, "distinct_1": 0.4, "kl_to_base": 0.1, "base": base}  # 80% of the base's
    >>> collapse(formatted, GatePolicy()), collapse(formatted, GatePolicy(min_distinct=0.75))
    ("distinct_1 0.4 is below 90% of the base model's 0.5", None)
    >>> words = {"distinct_1": 0.7, "distinct_2": 0.9, "base_distinct_1": 0.72, "base_distinct_2": 0.93}
    >>> collapse({**formatted, "probe": words}, GatePolicy()) is None  # its replay repeats markup; its words vary
    True
    >>> print(collapse({**formatted, "probe": {**words, "distinct_2": 0.2}}, GatePolicy()))
    distinct_2 on unrelated prompts 0.2 is below 90% of the base model's 0.93
    >>> sure = {**formatted, "entropy": 0.03, "base": {**base, "entropy": 0.08}}  # learnt its own format exactly
    >>> collapse({**sure, "probe": {**words, "entropy": 1.9, "base_entropy": 2.1}}, GatePolicy()) is None
    True
    >>> print(collapse({**sure, "probe": {**words, "entropy": 0.4, "base_entropy": 2.1}}, GatePolicy()))
    entropy on unrelated prompts 0.4 is below 50% of the base model's 2.1
    """
    if not guards or not guards.get("prompts") and "base" not in guards:
        return None
    base = guards.get("base") or {}

    def value(name: str, of: dict[str, Any]) -> float | None:
        found = of.get(name)
        return float(found) if isinstance(found, int | float) else None

    # Diversity and entropy on unrelated prompts where the trainer measured them (guards.probe), else on the
    # scope's own replay: there a version that learnt its person's format (JSON, a tool call) repeats markup
    # and is sure of itself, which is what it was taught.
    probe = guards.get("probe") or {}
    for name, low in (("distinct_1", policy.min_distinct), ("distinct_2", policy.min_distinct), ("entropy", 0.5)):
        mine, theirs = value(name, probe), value(f"base_{name}", probe)
        if mine is not None and theirs is not None and mine < low * theirs:
            return f"{name} on unrelated prompts {mine:.3g} is below {low:.0%} of the base model's {theirs:.3g}"
    on_replay = [name for name in ("entropy", "distinct_1", "distinct_2") if value(f"base_{name}", probe) is None]
    low_of = {"entropy": 0.5, "distinct_1": policy.min_distinct, "distinct_2": policy.min_distinct}
    checks = (*((name, low_of[name], None) for name in on_replay), ("length", 0.5, 2.0))
    for name, low, high in checks:
        mine, theirs = value(name, guards), value(name, base)
        if mine is None or theirs is None:
            continue
        if mine < low * theirs:
            return f"{name} {mine:.3g} is below {low:.0%} of the base model's {theirs:.3g}"
        if high is not None and mine > high * theirs:
            return f"{name} {mine:.3g} is above {high:.0%} of the base model's {theirs:.3g}"
    kl = value("kl_to_base", guards)
    if kl is not None and kl > policy.max_kl:
        return f"kl_to_base {kl:.3g} is above {policy.max_kl:g} nats per token"
    return None


def decide(state: Deployment, canary: Arm, stable: Arm, policy: GatePolicy, now: datetime) -> Verdict:
    """What to do with the canary now (see the module docstring for the rules)."""
    alarm = guardrails(canary, stable, policy)
    if alarm is not None:
        return Verdict("rollback", f"fast guardrail: {alarm}")
    if state.paused:
        return Verdict("wait", "paused")
    counts = (f"{len(canary.rewards)} resolved canary turns (mean reward {_mean(canary)}), "
              f"{len(stable.rewards)} stable (mean {_mean(stable)})")
    if min(len(canary.rewards), len(stable.rewards)) >= policy.min_resolved:
        better, worse = posterior(canary, stable, policy)
        if worse >= policy.confidence:
            return Verdict("rollback", f"reward: P(canary worse than stable by > {policy.margin:g}) = "
                                       f"{worse:.3f} on {counts}")
        if better >= policy.confidence:
            if canary.turns_since_step < policy.guard_min_turns:
                return Verdict("wait", f"reward gate passed; the canary served {canary.turns_since_step} of "
                                       f"{policy.guard_min_turns} turns at weight {state.weight:g}")
            last = not [weight for weight in state.schedule if weight > state.weight]
            return Verdict("promote" if last else "step",
                           f"reward: P(canary >= stable - {policy.margin:g}) = {better:.3f} on {counts}")
    since = state.updated_at or state.canary_since
    assert since is not None  # a canary always has its start
    waited = (now - since).total_seconds()
    if waited > policy.timeout_s:
        return Verdict("rollback", f"not enough evidence after {waited:.0f} s (timeout {policy.timeout_s:g} s): "
                                   f"{counts}; each arm needs {policy.min_resolved}")
    return Verdict("wait", f"collecting evidence: {counts}")


def guardrails(canary: Arm, stable: Arm, policy: GatePolicy) -> str | None:
    """Why the canary must be rolled back at once, or None.

    >>> from collections import Counter
    >>> empty = Arm("c", turns=10, flaws=Counter(empty=9), latencies_ms=[5.0] * 10)
    >>> guardrails(empty, Arm("s", turns=100, latencies_ms=[5.0] * 100), GatePolicy())
    'empty outputs in 9 of 10 canary turns (90%) against 0 of 100 stable (0%)'
    >>> guardrails(Arm("c", turns=10, flaws=Counter(empty=1), latencies_ms=[5.0] * 10),
    ...            Arm("s", turns=100, flaws=Counter(empty=10), latencies_ms=[5.0] * 100), GatePolicy()) is None
    True
    """
    if canary.turns < policy.guard_min_turns:
        return None
    names = {"error": "failed turns", "tool_call": "tool calls that do not parse", "malformed": "malformed outputs",
             "empty": "empty outputs"}
    for flaw in FLAWS:
        mine, theirs = canary.flaws[flaw], stable.flaws[flaw]
        stable_rate = theirs / stable.turns if stable.turns else 0.0
        if _wilson_low(mine, canary.turns) > stable_rate + policy.flaw_tolerance:
            return (f"{names[flaw]} in {mine} of {canary.turns} canary turns ({mine / canary.turns:.0%}) against "
                    f"{theirs} of {stable.turns} stable ({stable_rate:.0%})")
    mine_p99, theirs_p99 = canary.p99_ms(), stable.p99_ms()
    if stable.turns >= policy.guard_min_turns and mine_p99 is not None and theirs_p99 is not None:
        if mine_p99 > policy.latency_factor * theirs_p99 + policy.latency_slack_ms:
            return f"latency p99 {mine_p99:.0f} ms against {theirs_p99:.0f} ms on stable"
    return None


def offline(lift: float, se: float, ess: float, policy: GatePolicy) -> Verdict:
    """The low-traffic gate: whether a version's offline evidence alone may promote it.

    ``lift`` is the version's expected reward minus what the scope is served now, both estimated on the
    scope's held-out turns (the version's by self-normalised importance sampling from the answers that were
    served and rewarded: trainer.guards), ``se`` the standard error of that difference, and ``ess`` the
    version's estimate's effective sample size (few turns carry the estimate when the version moved far
    from what was served). Promote when the lift's lower bound (``offline_z`` standard errors below it)
    clears ``offline_margin``. The rule's error rates on simulated scopes whose truth is known are printed
    by bench/low_traffic_gate.py (docs/rollouts.md).

    >>> [offline(lift, se, ess, GatePolicy()).action for lift, se, ess in ((0.3, 0.1, 16), (0.1, 0.1, 16),
    ...                                                                        (0.9, 0.1, 3))]
    ['promote', 'wait', 'wait']
    """
    if ess < policy.offline_min_ess:
        return Verdict("wait", f"offline evidence on an effective {ess:.1f} turns; {policy.offline_min_ess:g} needed")
    bound = lift - policy.offline_z * se
    said = f"offline: estimated lift {lift:+.2f} ± {se:.2f} on an effective {ess:.1f} turns (lower bound {bound:+.2f})"
    return Verdict("promote", said) if bound >= policy.offline_margin else Verdict("wait", said)


def quiet(resolved: int, weight: float, policy: GatePolicy) -> bool:
    """Whether the offline evidence may decide for a canary at ``weight`` in a scope that resolved ``resolved``
    turns over the last ``timeout_s``: always under gate ``offline``, never under ``reward``, and under
    ``auto`` when a canary at that weight would not gather ``min_resolved`` resolved turns in the timeout.

    >>> quiet(100, 0.1, GatePolicy()), quiet(100, 0.5, GatePolicy()), quiet(10_000, 0.1, GatePolicy(gate="offline"))
    (True, False, True)
    """
    if policy.gate != "auto":
        return policy.gate == "offline"
    return resolved * weight < policy.min_resolved


def offline_evidence(guards: dict[str, Any] | None) -> tuple[float, float, float] | None:
    """(lift, se, ess) from a version's collapse guards (the trainer's ``guards.offline``), or None."""
    found = (guards or {}).get("offline") or {}
    values = [found.get(name) for name in ("lift", "se", "ess")]
    if not all(isinstance(value, int | float) and math.isfinite(value) for value in values):
        return None
    return float(values[0]), float(values[1]), float(values[2])  # type: ignore[arg-type]


def watch(stable: Arm, before: Arm, policy: GatePolicy, waited_s: float) -> Verdict:
    """A version promoted on offline evidence, against the version before it: roll it back when its rewards
    since the promotion are worse by more than the margin with ``confidence`` (each side with at least
    ``guard_min_turns``); keep it once it has ``min_resolved`` rewards, or after ``offline_timeout_s``.

    >>> watch(Arm("v2", rewards=[-1.0] * 12), Arm("v1", rewards=[1.0] * 40), GatePolicy(), 60).action
    'rollback'
    >>> [watch(Arm("v2", rewards=[1.0] * n), Arm("v1", rewards=[1.0] * 40), GatePolicy(), 60).action for n in (5, 30)]
    ['wait', 'keep']
    """
    counts = (f"{len(stable.rewards)} resolved turns since the promotion (mean {_mean(stable)}) against "
              f"{len(before.rewards)} of {before.version} before (mean {_mean(before)})")
    if min(len(stable.rewards), len(before.rewards)) >= policy.guard_min_turns:
        _, worse = posterior(stable, before, policy)
        if worse >= policy.confidence:
            return Verdict("rollback", f"watch: P(worse than {before.version} by > {policy.margin:g}) = "
                                       f"{worse:.3f} on {counts}")
    if len(stable.rewards) >= policy.min_resolved:
        return Verdict("keep", f"watch passed: {counts}")
    if waited_s > policy.offline_timeout_s:
        return Verdict("keep", f"watch ended after {waited_s:.0f} s: {counts}")
    return Verdict("wait", f"watching: {counts}")


def posterior(canary: Arm, stable: Arm, policy: GatePolicy) -> tuple[float, float]:
    """(P(d > -margin), P(d < -margin)) for d = canary's mean reward - stable's, under N(d̂, s²).

    >>> good = Arm("c", rewards=[1.0] * 30); bad = Arm("s", rewards=[-1.0] * 30)
    >>> [round(p, 3) for p in posterior(good, bad, GatePolicy())]
    [1.0, 0.0]
    """
    def moments(rewards: list[float]) -> tuple[float, float]:
        mean = sum(rewards) / len(rewards)
        variance = sum((r - mean) ** 2 for r in rewards) / max(1, len(rewards) - 1)
        return mean, max(variance, policy.variance_floor) / len(rewards)

    (mean_c, var_c), (mean_s, var_s) = moments(canary.rewards), moments(stable.rewards)
    spread = NormalDist(mean_c - mean_s, math.sqrt(var_c + var_s))
    worse = spread.cdf(-policy.margin)
    return 1.0 - worse, worse


def _wilson_low(hits: int, n: int) -> float:
    """The 95% one-sided Wilson lower bound of a rate."""
    if n == 0:
        return 0.0
    rate, z2 = hits / n, _Z95**2
    centre = rate + z2 / (2 * n)
    spread = _Z95 * math.sqrt(rate * (1 - rate) / n + z2 / (4 * n * n))
    return max(0.0, (centre - spread) / (1 + z2 / n))


def _mean(arm: Arm) -> str:
    mean = arm.mean_reward
    return "n/a" if mean is None else f"{mean:+.2f}"
