"""Collapse guards: how a new version behaves on a replay set of recent prompts, beside the base model.

Self-improvement loops fail in known ways: the policy stops exploring (entropy falls), says the same thing
to everything (distinct-n falls), rambles or goes mute (length), drifts from the base (KL), or learns to
please the evaluator rather than the user. For each new version the trainer samples answers to the replay
prompts, from the version and from the base model with the same seed, and stores in ``meta.json``:

- ``entropy``: mean next-token entropy (nats) over the version's own sampled answers;
- ``distinct_1``, ``distinct_2``: distinct token n-grams over all answers / all n-grams;
- ``length``: mean answer length in tokens;
- ``kl_to_base``: mean KL(version ‖ base) over the positions of the version's answers;
- ``reward``: where replay turns have outcomes, the version's expected reward estimated from the recorded
  answers by self-normalised importance sampling (weights π_version / π_behav per answer); None without;
- ``offline``: with outcomes, the low-traffic gate's evidence (:func:`lift`, rollout.gates.offline): the
  version's estimated reward minus the mean reward of what was served on the same turns, the standard error
  of that difference, and the effective sample size of the version's estimate.

- ``probe``: diversity where a scope's preference does not reach: the version's and the base model's
  answers to :data:`PROBES`, fixed prompts about nothing any user asked, measured on their words only
  (:func:`content_distinct`: markup, brackets, quotes and numbering are not content). A version that learnt
  its user's format (JSON arrays, numbered lists) repeats that markup in every answer, and its distinct-n on
  the replay falls though it still says different things; one that says the same thing to everything has
  few distinct words anywhere. The rollout's distinct-n guard reads this.

The replay prompts are held out of training (one turn in ``trainer_holdout_every``), so the reward
estimate is on data the version never trained on. The rollout controller compares them with ``base``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from trl.trainer.utils import entropy_from_logits, selective_log_softmax

from nextturn.conversation import prompt_token_ids
from nextturn.events import ChatMessage
from trainer.packing import pack, response_logits, response_values
from trainer.policy import Policy

# Prompts no scope's preference is about: where a version's diversity is measured for the collapse guard.
PROBES = (
    "Describe a quiet morning in a small town.", "What makes a good friend?", "Explain how rain forms.",
    "Tell me about an animal that lives in the sea.", "What would you cook for a cold evening?",
    "Describe the sound of a busy market.", "Why do people keep old letters?", "What is a bridge for?",
    "Give some advice to someone starting a garden.", "Describe your favourite kind of weather.",
    "What happens at a railway station at night?", "Tell a short story about a lost key.",
)


@dataclass(frozen=True)
class Outcome:
    prompt_ids: list[int]
    response_ids: list[int]
    behaviour_logprobs: list[float]
    reward: float


@dataclass(frozen=True)
class Replay:
    prompts: list[list[int]]
    outcomes: list[Outcome]
    held_out: bool  # False: too few held-out turns yet, so these are recent trained prompts


def measure(policy: Policy, replay: Replay, *, max_new_tokens: int = 32, seed: int = 0) -> dict[str, Any]:
    """The guards for the policy as it is now, with the base model's under ``base``."""
    if not replay.prompts:
        return {"prompts": 0}
    policy.model.eval()
    answers = _sample(policy, replay.prompts, max_new_tokens, seed)
    with policy.base():
        base_answers = _sample(policy, replay.prompts, max_new_tokens, seed)
    guards: dict[str, Any] = {"prompts": len(replay.prompts), "held_out": replay.held_out,
                              **_behaviour(policy, replay.prompts, answers, kl=True)}
    log_weights = _log_weights(policy, replay.outcomes)
    guards["reward"] = _reward(log_weights, replay.outcomes)
    if log_weights is not None:
        rewards = torch.tensor([o.reward for o in replay.outcomes], dtype=log_weights.dtype)
        found, se, ess = lift(log_weights.cpu(), rewards)
        guards["offline"] = {"lift": found, "se": se, "ess": ess, "turns": len(replay.outcomes)}
    with policy.base():
        guards["base"] = {**_behaviour(policy, replay.prompts, base_answers, kl=False),
                          "reward": _reward(_log_weights(policy, replay.outcomes), replay.outcomes)}
    guards["probe"] = probe(policy, max_new_tokens=max_new_tokens, seed=seed)
    return guards


def probe(policy: Policy, *, max_new_tokens: int = 32, seed: int = 0) -> dict[str, float]:
    """On the fixed unrelated prompts (:data:`PROBES`): content distinct-1 and -2 of the version's answers and
    the mean entropy of its next-token distributions along them, and the same of the base model (the same
    for every version and scope of a base model, so measured once per process). A version that learnt its
    scope's format exactly is sure of itself on its scope's prompts; collapse shows on the others."""
    prompts = [prompt_token_ids(policy.tokenizer, [ChatMessage(role="user", content=text)], None) for text in PROBES]
    key = (policy.base_model, str(policy.device), max_new_tokens, seed)
    if key not in _BASE_PROBES:
        with policy.base():
            _BASE_PROBES[key] = _probed(policy, prompts, _sample(policy, prompts, max_new_tokens, seed), "base_")
    return {**_probed(policy, prompts, _sample(policy, prompts, max_new_tokens, seed), ""), **_BASE_PROBES[key]}


_BASE_PROBES: dict[tuple[str, str, int, int], dict[str, float]] = {}


def _probed(policy: Policy, prompts: list[list[int]], answers: list[list[int]], prefix: str) -> dict[str, float]:
    texts = policy.tokenizer.batch_decode(answers, skip_special_tokens=True)
    return {f"{prefix}distinct_1": content_distinct(texts, 1), f"{prefix}distinct_2": content_distinct(texts, 2),
            f"{prefix}entropy": _behaviour(policy, prompts, answers, kl=False)["entropy"]}


def content_distinct(texts: Sequence[str], n: int) -> float:
    """Distinct word n-grams over all word n-grams (1.0 with none): what an answer says, not its markup
    (brackets, quotes, a list's numbers).

    >>> content_distinct(['["apple", "pear"]', '["oak", "elm"]'], 1), content_distinct(["1. oak 2. elm", "1. fig"], 1)
    (1.0, 1.0)
    >>> content_distinct(["1. a", "1. a"], 1)
    0.5
    """
    grams = [tuple(words[i: i + n]) for words in ([word for word in re.findall(r"[^\W_]+", text.lower())
                                                   if not word.isdigit()] for text in texts)
             for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def distinct(answers: Sequence[Sequence[int]], n: int) -> float:
    """Distinct n-grams over all answers / all n-grams (1.0 with none).

    >>> distinct([[1, 2, 1, 2], [1, 2]], 2)
    0.5
    """
    grams = [tuple(answer[i: i + n]) for answer in answers for i in range(len(answer) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def _sample(policy: Policy, prompts: list[list[int]], max_new_tokens: int, seed: int) -> list[list[int]]:
    """Sampled answers (temperature 1), each cut after its end-of-turn token."""
    eos = policy.tokenizer.eos_token_id
    packed = pack(prompts, [[]] * len(prompts), policy.tokenizer.pad_token_id, policy.device)
    devices = [policy.device] if policy.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        output = policy.model.generate(
            input_ids=packed.input_ids, attention_mask=packed.attention_mask, do_sample=True, temperature=1.0,
            top_p=1.0, top_k=0, max_new_tokens=max_new_tokens, eos_token_id=eos,
            pad_token_id=policy.tokenizer.pad_token_id)
    answers = []
    for row in output[:, packed.width:].tolist():
        answers.append(row[: row.index(eos) + 1] if eos in row else row)
    return answers


def _behaviour(policy: Policy, prompts: list[list[int]], answers: list[list[int]], *, kl: bool) -> dict[str, float]:
    answered = [(p, a) for p, a in zip(prompts, answers, strict=True) if a]
    result = {"distinct_1": distinct(answers, 1), "distinct_2": distinct(answers, 2),
              "length": sum(map(len, answers)) / len(answers), "entropy": 0.0}
    if not answered:
        return {**result, **({"kl_to_base": 0.0} if kl else {})}
    packed = pack([p for p, _ in answered], [a for _, a in answered], policy.tokenizer.pad_token_id, policy.device)
    with torch.no_grad():
        logits = response_logits(policy.model, packed)  # [N, R, V]
        tokens = packed.mask.sum()
        result["entropy"] = float((entropy_from_logits(logits) * packed.mask).sum() / tokens)
        if kl:
            with policy.base():
                base = response_logits(policy.model, packed).log_softmax(-1)
            mine = logits.log_softmax(-1)
            result["kl_to_base"] = float(((mine.exp() * (mine - base)).sum(-1) * packed.mask).sum() / tokens)
    return result


def lift(log_weights: torch.Tensor, rewards: torch.Tensor) -> tuple[float, float, float]:
    """(lift, standard error, effective sample size) of a version against what was served, on the same turns.

    ``log_weights[i]`` is log π_version(answer i) − log π_served(answer i), ``rewards[i]`` what answer i earned.
    The version's reward is the self-normalised importance-sampling estimate; the served policy's is the mean
    (its weights are all 1). The variance of the difference is the delta method's, turn by turn: each turn's
    influence on the version's estimate less its influence on the mean. The two estimates share their noise,
    so the difference is far surer than either.

    >>> found, se, ess = lift(torch.zeros(4), torch.tensor([1.0, -1.0, 1.0, 1.0]))
    >>> round(found, 6), round(se, 6), ess  # the version is what was served: no lift, no doubt
    (0.0, 0.0, 4.0)
    """
    weights = torch.softmax(log_weights.double(), dim=0)
    rewards = rewards.double()
    estimate, mean = float((weights * rewards).sum()), float(rewards.mean())
    influence = weights * (rewards - estimate) - (rewards - mean) / len(rewards)
    return estimate - mean, float(influence.pow(2).sum().sqrt()), float(1.0 / weights.pow(2).sum())


def _log_weights(policy: Policy, outcomes: list[Outcome]) -> torch.Tensor | None:
    """log π_now(answer) − log π_behav(answer) per outcome; None without outcomes."""
    if not outcomes:
        return None
    packed = pack([o.prompt_ids for o in outcomes], [o.response_ids for o in outcomes],
                  policy.tokenizer.pad_token_id, policy.device)
    behaviour = response_values([o.behaviour_logprobs for o in outcomes], packed.mask)
    with torch.no_grad():
        logprobs = selective_log_softmax(response_logits(policy.model, packed), packed.response_ids)
    return ((logprobs - behaviour) * packed.mask).sum(-1)  # [N]


def _reward(log_weights: torch.Tensor | None, outcomes: list[Outcome]) -> float | None:
    """Self-normalised importance-sampling estimate of the expected reward of the policy the weights are of."""
    if log_weights is None:
        return None
    weights = torch.softmax(log_weights, dim=0)
    rewards = torch.tensor([o.reward for o in outcomes], device=weights.device)
    return float((weights * rewards).sum())
