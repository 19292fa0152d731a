"""The sampled-token objective: RL from rewards and on-policy distillation (OPD) from hints, in one loss.

For response token t of a logged sample (y_t was sampled by the serving policy π_behav, which recorded its
logprob), with reward r and the teacher = the frozen base model (or the current policy) shown the hint:

    A_t = w_rl · r + w_opd · clip(log π_teacher(y_t | x ⊕ hint) − log π_behav(y_t | x), −c, c)

``train_method`` picks the weights: rl = (1, 0), opd = (0, 1), combined = (1, 1). The loss per token is
decoupled PPO (Hilton et al. 2021, "Batch size-invariance for policy optimization"):

    w_t = min(π_old(y_t) / π_behav(y_t), cap)                   truncated importance weight, no gradient
    ρ_t = π_θ(y_t) / π_old(y_t)
    ℓ_t = −w_t · min(ρ_t · A_t, clip(ρ_t, 1 − ε, 1 + ε) · A_t)  + β · k3(π_θ ‖ π_base)

π_old is the policy as it was when this update began. The product w_t · ρ_t is the DESIGN's ratio
π_θ / π_behav; splitting it keeps PPO's trust region around the policy we step from (the behaviour policy
may be versions behind) and puts staleness into a capped weight (truncated importance sampling, as in
V-trace). The loss is the mean of ℓ_t over response tokens of samples that carry a signal; prompt tokens
(which hold every tool result) and padding are masked out. A sample the policy has drifted from (mean
|log π_old − log π_behav| above ``max_drift``: :func:`trainer.packing.drifted`) has r dropped and keeps its
hint: the cap alone did not stop RL on stale answers from undoing what was learnt.

How it deviates from the papers it borrows from: no value function and no group baseline (the reward
is an outside judgement of this very response, and traffic gives one response per prompt); the OPD term
uses the recorded behaviour logprob where on-policy distillation uses the student's own, which is the same
quantity for fresh samples and makes the advantage a constant of the batch.

Limitation (why :mod:`trainer.distillation` exists): this can only reweight tokens that were sampled.
A hint pushes the wrong tokens down but cannot lift a preferred token the policy never sampled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from trl.trainer.utils import selective_log_softmax

from trainer.packing import Update, drifted, pack, response_logits, response_values
from trainer.policy import Policy
from trainer.samples import Sample


@dataclass(frozen=True)
class Objective:
    w_rl: float = 1.0
    w_opd: float = 1.0
    advantage_clip: float = 2.0  # c: a hint moves a token's advantage by at most this much
    ratio_clip: float = 0.2  # ε
    importance_cap: float = 2.0
    kl_to_base: float = 0.0  # β; 0 skips the base model's forward pass
    steps: int = 4  # optimizer steps on one batch
    teacher: Literal["base", "policy"] = "base"
    max_drift: float = 0.3  # a sample further from the policy than this (nats per token) loses its reward


def advantages(rewards: torch.Tensor, has_reward: torch.Tensor, teacher: torch.Tensor, behaviour: torch.Tensor,
               has_hint: torch.Tensor, objective: Objective) -> torch.Tensor:
    """A_t, [B, R]. rewards/has_reward/has_hint: [B]; teacher/behaviour: [B, R] logprobs of the sampled tokens."""
    rl = objective.w_rl * rewards * has_reward  # [B]
    gap = (teacher - behaviour).clamp(-objective.advantage_clip, objective.advantage_clip)  # [B, R]
    opd = objective.w_opd * gap * has_hint[:, None]  # [B, R]
    return rl[:, None] + opd


def contributes(has_reward: torch.Tensor, has_hint: torch.Tensor, objective: Objective) -> torch.Tensor:
    """[B] bool: the samples that carry a signal this objective uses; the others contribute nothing."""
    return (has_reward & (objective.w_rl != 0)) | (has_hint & (objective.w_opd != 0))


def token_loss(logprobs: torch.Tensor, old: torch.Tensor, behaviour: torch.Tensor, advantage: torch.Tensor,
               mask: torch.Tensor, objective: Objective, base: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, dict[str, float]]:
    """The mean of ℓ_t over ``mask``. All inputs [B, R]; only ``logprobs`` carries a gradient."""
    weight = torch.exp(old - behaviour).clamp(max=objective.importance_cap)  # [B, R], w_t
    ratio = torch.exp(logprobs - old)  # [B, R], ρ_t
    clipped = ratio.clamp(1 - objective.ratio_clip, 1 + objective.ratio_clip)
    loss = -weight * torch.minimum(ratio * advantage, clipped * advantage)  # [B, R]
    stats: dict[str, float] = {}
    if base is not None and objective.kl_to_base > 0:
        log_ratio = base - logprobs  # k3 = e^x − x − 1 ≥ 0 with x = log π_base − log π_θ: unbiased, low variance
        kl = torch.exp(log_ratio) - log_ratio - 1
        loss = loss + objective.kl_to_base * kl
        stats["kl_to_base"] = float((kl.detach() * mask).sum() / mask.sum())
    tokens = mask.sum().clamp(min=1)
    stats["importance_weight"] = float((weight * mask).sum() / tokens)
    stats["importance_capped"] = float(((weight >= objective.importance_cap) * mask).sum() / tokens)
    stats["ratio_clipped"] = float((((ratio - clipped).abs() > 0) * mask).sum() / tokens)
    return (loss * mask).sum() / tokens, stats


def update(policy: Policy, optimizer: torch.optim.Optimizer, samples: Sequence[Sample],
           objective: Objective) -> Update:
    """Train the policy's adapter on one batch: ``objective.steps`` optimizer steps, or none without signal."""
    device = policy.device
    pad = policy.tokenizer.pad_token_id
    student = pack([s.prompt_ids for s in samples], [s.response_ids for s in samples], pad, device)
    behaviour = response_values([s.behaviour_logprobs for s in samples], student.mask)  # [B, R]
    rewards = torch.tensor([s.reward or 0.0 for s in samples], device=device)  # [B]
    has_reward = torch.tensor([s.reward is not None for s in samples], device=device)  # [B]
    has_hint = torch.tensor([s.teacher_prompt_ids is not None for s in samples], device=device)  # [B]

    # What the teacher, the update's starting policy and the base think of the sampled tokens. No gradient.
    policy.model.eval()
    with torch.no_grad():
        old = selective_log_softmax(response_logits(policy.model, student), student.response_ids)  # [B, R]
        stale = drifted(old, behaviour, student.mask, objective.max_drift)  # [B]
        has_reward = has_reward & ~stale
        teacher = behaviour.clone()  # without a hint the OPD term is off (has_hint), any value would do
        hinted = [i for i, s in enumerate(samples) if s.teacher_prompt_ids is not None]
        if hinted and objective.w_opd != 0:
            shown = pack([samples[i].teacher_prompt_ids or [] for i in hinted],
                         [samples[i].response_ids for i in hinted], pad, device)
            if objective.teacher == "base":
                with policy.base():
                    logits = response_logits(policy.model, shown)
            else:
                logits = response_logits(policy.model, shown)
            teacher[hinted, : shown.response_ids.shape[1]] = selective_log_softmax(logits, shown.response_ids)
        base = None
        if objective.kl_to_base > 0:
            with policy.base():
                base = selective_log_softmax(response_logits(policy.model, student), student.response_ids)

    advantage = advantages(rewards, has_reward, teacher, behaviour, has_hint, objective)  # [B, R]
    mask = student.mask * contributes(has_reward, has_hint, objective)[:, None]  # [B, R]
    result = Update(tokens=int(mask.sum()), stats={"advantage_abs": float((advantage.abs() * mask).sum()
                                                                          / mask.sum().clamp(min=1)),
                                                    "drifted": float(stale.sum())})
    if not bool(((advantage != 0) & (mask > 0)).any()):
        # Adam's momentum would move the weights even at zero gradient: no signal, no step.
        result.skipped = "no sample carries a non-zero advantage"
        return result

    policy.model.train()
    for _ in range(objective.steps):
        logprobs = selective_log_softmax(response_logits(policy.model, student), student.response_ids)  # [B, R]
        loss, stats = token_loss(logprobs, old, behaviour, advantage, mask, objective, base)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        result.steps += 1
        result.losses.append(float(loss.detach()))
        result.stats.update(stats)
    policy.model.eval()
    return result
