"""How the low-traffic gate decides on versions whose true worth is known (rollout.gates.offline).

A personal scope cannot fill a canary's 30 resolved turns per arm, so its versions are to be judged
offline: the trainer estimates each version's expected reward on the scope's held-out turns by
self-normalised importance sampling from the answers that were served and rewarded (trainer.guards),
beside what is served now, on the same turns. This script simulates that estimator on bandit scopes where
the truth is known: each held-out turn has K candidate answers, each worth an expected reward in [-1, 1];
the served (behaviour) policy sampled one, and the person's verdict on it was +1 or -1 (+1 with
probability (1 + worth) / 2: a thumbs up or down, noisy as people are); a new version moves probability
along a direction that is partly the answers' worth and partly not, by a known true lift over the served
policy. For each number of held-out turns and each true lift it runs many scopes and prints how often the
gate promotes (mean and spread over seeds): a worse version promoted is the gate's error, a better one
held back its cost.

Run: .venv/bin/python bench/low_traffic_gate.py [--trials 2000] [--seeds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rollout.gates import GatePolicy, offline  # noqa: E402  (the rule under test, as the controller uses it)
from trainer.guards import lift  # noqa: E402  (the estimator, as the trainer uses it)

K = 4  # candidate answers per held-out turn
MISALIGNMENT = 1.0  # how much of a version's change is not about the answers' worth (standard deviations)


def scope_trial(turns: int, wanted: float, generator: torch.Generator) -> tuple[float, float, float]:
    """One simulated scope: the new version's estimated lift over the served policy, its standard error, and
    the version's estimate's effective sample size."""
    rewards = torch.rand(turns, K, generator=generator) * 2 - 1  # each answer's reward
    behaviour = torch.softmax(torch.randn(turns, K, generator=generator), dim=-1)
    # The new version tilts the served policy by `strength` along a direction that is only partly the
    # answers' worth (training learns more than the reward: formats, phrasings), with the strength chosen so
    # that its true expected reward beats the served one's by `wanted` on average over the held-out turns.
    direction = rewards + MISALIGNMENT * torch.randn(turns, K, generator=generator)
    strength = _strength_for(wanted, rewards, behaviour, direction)
    version = torch.softmax(behaviour.log() + strength * direction, dim=-1)
    served = torch.multinomial(behaviour, 1, generator=generator).squeeze(1)
    # What a person says of an answer is a noisy verdict on it: +1 or -1, +1 with probability (1 + r) / 2.
    worth = rewards.gather(1, served[:, None]).squeeze(1)
    observed = torch.where(torch.rand(turns, generator=generator) < (1 + worth) / 2, 1.0, -1.0)
    log_weights = (version.gather(1, served[:, None]) / behaviour.gather(1, served[:, None])).squeeze(1).log()
    return lift(log_weights, observed)  # the trainer's own estimator


def _strength_for(wanted: float, rewards: torch.Tensor, behaviour: torch.Tensor, direction: torch.Tensor) -> float:
    """The tilt whose true lift over the behaviour policy is ``wanted`` (bisection; the lift grows with it)."""
    def true_lift(strength: float) -> float:
        version = torch.softmax(behaviour.log() + strength * direction, dim=-1)
        return float(((version - behaviour) * rewards).sum(-1).mean())

    low, high = -20.0, 20.0
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (middle, high) if true_lift(middle) < wanted else (low, middle)
    return (low + high) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=2000)
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    policy = GatePolicy()
    lifts = (-0.2, -0.1, -0.05, 0.05, 0.1, 0.2)
    print(f"low-traffic gate: share of versions promoted, {args.trials} scopes per cell, mean ± spread over "
          f"{args.seeds} seeds (offline margin {policy.offline_margin:g}, z {policy.offline_z:g}, "
          f"min ESS {policy.offline_min_ess:g})")
    print("held-out turns  " + "  ".join(f"lift {true:+.2f}   " for true in lifts))
    for turns in (8, 16, 32, 64):
        cells = []
        for true in lifts:
            shares = []
            for seed in range(args.seeds):
                generator = torch.Generator().manual_seed(seed * 1_000_003 + turns)
                promoted = 0
                for _ in range(args.trials):
                    estimate, se, ess = scope_trial(turns, true, generator)
                    promoted += offline(estimate, se, ess, policy).action == "promote"
                shares.append(promoted / args.trials)
            spread = statistics.stdev(shares) if len(shares) > 1 else 0.0
            cells.append(f"{statistics.mean(shares):6.1%} ±{spread:4.1%}")
        print(f"{turns:>14}  " + "  ".join(cells))


if __name__ == "__main__":
    main()
