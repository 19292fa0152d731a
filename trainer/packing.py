"""Parts both training algorithms use: packing samples into tensors, and a response's logits.

Prompts are left-padded and responses right-padded, so that every response starts at the same column
``P`` and the logits that predict response token ``j`` are column ``P - 1 + j`` of every row::

    row 0:  pad pad p p p | r r r pad
    row 1:  p p p p p p p | r r r r r
                          ^ column P

Position ids count real tokens only (a row's first real token is position 0), as the serving engine
computed them, so the logprobs match what was served.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class Packed:
    input_ids: torch.Tensor  # [B, P + R]
    attention_mask: torch.Tensor  # [B, P + R]
    position_ids: torch.Tensor  # [B, P + R]
    width: int  # P: the column where every response starts
    response_ids: torch.Tensor  # [B, R], 0 past a response's end
    mask: torch.Tensor  # [B, R] float: 1 on response tokens, 0 on padding


def pack(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int,
         device: torch.device) -> Packed:
    width = max(len(p) for p in prompts)
    length = max(len(r) for r in responses)
    rows, masks, answers, answer_masks = [], [], [], []
    for prompt, response in zip(prompts, responses, strict=True):
        left, right = width - len(prompt), length - len(response)
        rows.append([pad_id] * left + list(prompt) + list(response) + [pad_id] * right)
        masks.append([0] * left + [1] * (len(prompt) + len(response)) + [0] * right)
        answers.append(list(response) + [0] * right)
        answer_masks.append([1.0] * len(response) + [0.0] * right)
    attention = torch.tensor(masks, device=device)
    return Packed(
        input_ids=torch.tensor(rows, device=device),
        attention_mask=attention,
        position_ids=(attention.cumsum(-1) - 1).clamp(min=0),
        width=width,
        response_ids=torch.tensor(answers, device=device),
        mask=torch.tensor(answer_masks, device=device),
    )


def response_values(values: Sequence[Sequence[float]], like: torch.Tensor) -> torch.Tensor:
    """Per-token values (e.g. recorded logprobs) as a [B, R] tensor shaped like ``like``, 0 past the end."""
    out = torch.zeros(like.shape, dtype=torch.float32, device=like.device)
    for row, items in enumerate(values):
        out[row, : len(items)] = torch.tensor(list(items), dtype=torch.float32)
    return out


def drifted(old: torch.Tensor, behaviour: torch.Tensor, mask: torch.Tensor, max_drift: float) -> torch.Tensor:
    """[B] bool: the samples the policy has moved away from since a version served them, i.e. whose mean over
    response tokens of |log π_old − log π_behav| is above ``max_drift`` nats (0: none). Both objectives drop
    the reward of such a sample and keep its hint (see :class:`trainer.distillation.Objective`).

    >>> old = torch.tensor([[-0.1, -0.2], [-3.0, -0.2]])
    >>> drifted(old, torch.tensor([[-0.1, -0.2], [-0.1, -0.2]]), torch.ones(2, 2), 0.3).tolist()
    [False, True]
    """
    if max_drift <= 0:
        return torch.zeros(old.shape[0], dtype=torch.bool, device=old.device)
    gap = ((old - behaviour).abs() * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # [B]
    return gap > max_drift


def response_logits(model: Any, packed: Packed) -> torch.Tensor:
    """[B, R, V] float32: at column j, the logits that predicted response token j."""
    logits = model(input_ids=packed.input_ids, attention_mask=packed.attention_mask,
                   position_ids=packed.position_ids).logits
    length = packed.response_ids.shape[1]
    return logits[:, packed.width - 1: packed.width - 1 + length].float()


@dataclass
class Update:
    """What one training update did. ``steps`` is 0 when it took no optimizer step, and ``skipped`` says why."""

    steps: int = 0
    skipped: str | None = None
    tokens: int = 0  # response tokens that carried a learning signal
    losses: list[float] = field(default_factory=list)  # one per optimizer step
    stats: dict[str, float] = field(default_factory=dict)
