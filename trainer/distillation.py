"""Distribution distillation: the hinted teacher's whole next-token distribution, plus RL from rewards.

Why: the sampled-token objective (:mod:`trainer.combined`) can only reweight tokens the policy sampled. A
hint pushes the wrong ones down but cannot lift a preferred token the policy never samples, and in a trial
on a small model the freed probability leaked into broken outputs. Here, at every response position t of a
sample with a hint, the student's next-token distribution moves toward the teacher's:

    p_T = π_teacher(· | x ⊕ hint, y_<t)        (frozen base, or the current policy; no gradient)
    p_θ = π_θ(· | x, y_<t)
    D_t = KL(p_T ‖ p_θ)   forward (the default), or
    D_t = KL(p_θ ‖ p_T)   reverse
          over the teacher's top-k tokens plus one tail bucket holding every other token
          (or over the full vocabulary when it has at most ``full_vocabulary_up_to`` tokens),
          at positions t ≤ t* (see below)

Which KL: the gradient of the forward KL on the student's logit of token j is p_θ(j) − p_T(j): a token the
teacher prefers is lifted by the teacher's probability of it, even when the student never samples it. The
reverse KL's gradient there is p_θ(j) · (log p_θ(j)/p_T(j) − D_t), which vanishes as p_θ(j) → 0: it pushes the
student's wrong favourite down, and the freed mass goes to the tokens the student already likes, not to the
teacher's: on the demo, a format the base model never shows appeared several times sooner with the forward
KL (docs/experiments.md). The price: forward KL is mass covering, so the student also copies what the
teacher gets wrong.
Reverse KL is mode seeking once the student puts mass on the teacher's mode, and stays available.

Which positions (``span``): by default only t ≤ t*, where t* is the first position whose sampled token is
not the teacher's favourite (argmax). Past t* the response is one the teacher would not have written, and
its distributions there are guesses about a text it already rejected: distilling them taught the demo's
student to garble the rest of its answers. Up to t* the teacher says what to write instead, and once the
student writes that, the next update reaches further (docs/experiments.md compares the two).
``span="response"`` keeps every position, as on-policy distillation is usually written.

The positions come from the behaviour policy's sample, so D_t is weighted by the same truncated importance
weight as in :mod:`trainer.combined`. Rewards train through the same decoupled-PPO surrogate as there, with
A_t = w_rl · r. Per token:

  w_t = min(π_old(y_t) / π_behav(y_t), cap)
  ℓ_t = −w_t · min(ρ_t · A_t, clip(ρ_t, 1 − ε, 1 + ε) · A_t) + w_opd · w_t · D_t · [hint, t ≤ t*] + β · k3(π_θ ‖ π_base)

and the loss is the mean of ℓ_t over response tokens of samples that carry a signal. A sample the policy has
drifted from (mean |log π_old − log π_behav| above ``max_drift``: :func:`trainer.packing.drifted`) has r
dropped and keeps its hint: RL on an answer the policy no longer gives pushes on a policy that is gone,
while the teacher's distributions do not depend on who served the answer. A batch in which no
token has a non-zero reward advantage and no hinted position has a teacher that disagrees takes no step.
Deviation from top-k distillation as usually written (renormalised over the top-k): the tail bucket keeps
the two distributions proper, so D_t ≥ 0 and it is 0 exactly when they agree on the buckets.
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
    top_k: int = 64
    full_vocabulary_up_to: int = 8192  # a vocabulary this small is distilled whole
    ratio_clip: float = 0.2  # ε
    importance_cap: float = 2.0
    kl_to_base: float = 0.0  # β; 0 skips the base model's forward pass
    steps: int = 4
    teacher: Literal["base", "policy"] = "base"
    divergence: Literal["forward", "reverse"] = "forward"
    span: Literal["response", "to_divergence"] = "to_divergence"
    max_drift: float = 0.3  # a sample further from the policy than this (nats per token) loses its reward


def divergence(student: torch.Tensor, teacher: torch.Tensor, objective: Objective) -> torch.Tensor:
    """D_t, [B, R]: the KL between student and teacher (forward or reverse, as ``objective`` says) from
    logits [B, R, V], over top-k + tail or the full vocabulary."""
    vocabulary = teacher.shape[-1]
    if vocabulary <= objective.full_vocabulary_up_to or objective.top_k >= vocabulary:
        s, t = student.log_softmax(-1), teacher.log_softmax(-1)  # [B, R, V]
        s_tail = t_tail = None
    else:
        top = teacher.topk(objective.top_k, dim=-1).indices  # [B, R, k]: the teacher's favourites
        s = selective_log_softmax(student, top)  # [B, R, k]
        t = selective_log_softmax(teacher, top)
        # The tail bucket: log(1 − Σ top-k probabilities); clamped so that a saturated top-k stays finite.
        s_tail = torch.log1p(-s.exp().sum(-1).clamp(max=1 - 1e-6))  # [B, R]
        t_tail = torch.log1p(-t.exp().sum(-1).clamp(max=1 - 1e-6))
    p, q = (t, s) if objective.divergence == "forward" else (s, t)  # KL(p ‖ q)
    kl = (p.exp() * (p - q)).sum(-1)
    if s_tail is not None and t_tail is not None:
        p_tail, q_tail = (t_tail, s_tail) if objective.divergence == "forward" else (s_tail, t_tail)
        kl = kl + p_tail.exp() * (p_tail - q_tail)
    return kl


def to_divergence(teacher: torch.Tensor, response_ids: torch.Tensor) -> torch.Tensor:
    """[B, R] of 0/1: the positions up to and including the first where the sampled token is not the
    teacher's favourite. Past that point the response is one the teacher would not have written.

    >>> teacher = torch.tensor([[[0.0, 9.0], [9.0, 0.0], [0.0, 9.0]]])  # favourites: 1, 0, 1
    >>> to_divergence(teacher, torch.tensor([[1, 1, 1]])).tolist()
    [[1.0, 1.0, 0.0]]
    """
    differs = (teacher.argmax(-1) != response_ids).long()  # [B, R]
    before = differs.cumsum(-1) - differs  # divergences strictly before t
    return (before == 0).to(teacher.dtype)


def token_loss(student: torch.Tensor, teacher: torch.Tensor, response_ids: torch.Tensor, old: torch.Tensor,
               behaviour: torch.Tensor, rewards: torch.Tensor, hinted: torch.Tensor, mask: torch.Tensor,
               objective: Objective, base: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The mean of ℓ_t over ``mask``. student/teacher: logits [B, R, V] (only ``student`` carries a gradient);
    response_ids/old/behaviour/mask: [B, R]; rewards (0 without one): [B]; hinted: 1 where the teacher
    teaches, [B, R]."""
    logprobs = selective_log_softmax(student, response_ids)  # [B, R]
    weight = torch.exp(old - behaviour).clamp(max=objective.importance_cap)  # [B, R], w_t
    advantage = (objective.w_rl * rewards)[:, None].expand_as(logprobs)  # [B, R]
    ratio = torch.exp(logprobs - old)
    clipped = ratio.clamp(1 - objective.ratio_clip, 1 + objective.ratio_clip)
    rl = -weight * torch.minimum(ratio * advantage, clipped * advantage)  # [B, R]
    distil = objective.w_opd * weight * divergence(student, teacher, objective) * hinted  # [B, R]
    loss = rl + distil
    tokens = mask.sum().clamp(min=1)
    stats = {"distillation_kl": float((distil.detach() * mask).sum() / tokens),
             "importance_weight": float((weight * mask).sum() / tokens)}
    if base is not None and objective.kl_to_base > 0:
        log_ratio = base - logprobs
        kl = torch.exp(log_ratio) - log_ratio - 1  # k3 ≥ 0
        loss = loss + objective.kl_to_base * kl
        stats["kl_to_base"] = float((kl.detach() * mask).sum() / tokens)
    return (loss * mask).sum() / tokens, stats


def update(policy: Policy, optimizer: torch.optim.Optimizer, samples: Sequence[Sample],
           objective: Objective) -> Update:
    """Train the policy's adapter on one batch: ``objective.steps`` optimizer steps, or none without signal."""
    device = policy.device
    pad = policy.tokenizer.pad_token_id
    student = pack([s.prompt_ids for s in samples], [s.response_ids for s in samples], pad, device)
    behaviour = response_values([s.behaviour_logprobs for s in samples], student.mask)  # [B, R]
    rewards = torch.tensor([s.reward or 0.0 for s in samples], device=device)  # [B]
    has_reward = torch.tensor([s.reward is not None for s in samples], device=device)
    has_hint = torch.tensor([s.teacher_prompt_ids is not None for s in samples], device=device)

    # The teacher's distributions, the starting policy's logprobs and the base's, all without gradient.
    policy.model.eval()
    with torch.no_grad():
        start = response_logits(policy.model, student)  # [B, R, V]
        old = selective_log_softmax(start, student.response_ids)  # [B, R]
        stale = drifted(old, behaviour, student.mask, objective.max_drift)  # [B]
        has_reward = has_reward & ~stale
        teacher = start.clone()  # rows without a hint keep the student's own logits: D_t = 0 there
        hinted = [i for i, s in enumerate(samples) if s.teacher_prompt_ids is not None]
        if hinted and objective.w_opd != 0:
            shown = pack([samples[i].teacher_prompt_ids or [] for i in hinted],
                         [samples[i].response_ids for i in hinted], pad, device)
            if objective.teacher == "base":
                with policy.base():
                    teacher[hinted, : shown.response_ids.shape[1]] = response_logits(policy.model, shown)
            else:
                teacher[hinted, : shown.response_ids.shape[1]] = response_logits(policy.model, shown)
        base = None
        if objective.kl_to_base > 0:
            with policy.base():
                base = selective_log_softmax(response_logits(policy.model, student), student.response_ids)
        hinted_positions = has_hint[:, None] * student.mask  # [B, R]
        if objective.span == "to_divergence":
            hinted_positions = hinted_positions * to_divergence(teacher, student.response_ids)
        disagreement = divergence(start, teacher, objective) * hinted_positions  # [B, R]

    contributes = (has_reward & (objective.w_rl != 0)) | (has_hint & (objective.w_opd != 0))  # [B]
    mask = student.mask * contributes[:, None]  # [B, R]
    signal = ((rewards * has_reward != 0)[:, None] & (objective.w_rl != 0)) | \
             ((disagreement > 0) & (objective.w_opd != 0))  # [B, R]
    result = Update(tokens=int(mask.sum()), stats={"teacher_kl": float((disagreement * student.mask).sum()
                                                                       / student.mask.sum()),
                                                    "drifted": float(stale.sum())})
    if not bool((signal & (mask > 0)).any()):
        # Adam's momentum would move the weights even at zero gradient: no signal, no step.
        result.skipped = "no sample carries a non-zero advantage"
        return result

    policy.model.train()
    for _ in range(objective.steps):
        logits = response_logits(policy.model, student)  # [B, R, V], with gradient
        loss, stats = token_loss(logits, teacher, student.response_ids, old, behaviour, rewards * has_reward,
                                 hinted_positions, mask, objective, base)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        result.steps += 1
        result.losses.append(float(loss.detach()))
        result.stats.update(stats)
    policy.model.eval()
    return result
