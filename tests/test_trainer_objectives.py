"""Reference tests of the training objectives: the vectorised losses against naive per-token loops, and
what an update does to a real (tiny) model's adapter."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from trl.trainer.utils import selective_log_softmax

from nextturn.conversation import prompt_token_ids, teacher_context
from nextturn.events import ChatMessage
from trainer import combined, distillation
from trainer.packing import pack, response_logits
from trainer.policy import Policy
from trainer.samples import Sample

ALGORITHMS = [combined, distillation]


# -- the vectorised losses equal a naive loop ------------------------------------------------------------

def _case(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batch, length = 3, 5
    behaviour = -torch.rand(batch, length, generator=g) * 3
    return {
        "logprobs": behaviour + torch.randn(batch, length, generator=g) * 0.4,
        "old": behaviour + torch.randn(batch, length, generator=g) * 1.5,  # some weights exceed the cap
        "behaviour": behaviour,
        "teacher": behaviour + torch.randn(batch, length, generator=g) * 3,  # some gaps exceed the clip
        "base": behaviour + torch.randn(batch, length, generator=g) * 0.3,
        "rewards": torch.tensor([1.0, -0.5, 0.0]),
        "has_reward": torch.tensor([True, True, False]),
        "has_hint": torch.tensor([False, True, True]),
        "mask": torch.tensor([[1.0] * 5, [1.0] * 3 + [0.0] * 2, [1.0] * 4 + [0.0]]),
    }


@pytest.mark.parametrize("seed", range(5))
def test_the_sampled_token_loss_equals_a_naive_per_token_loop(seed: int) -> None:
    case = _case(seed)
    objective = combined.Objective(w_rl=0.7, w_opd=1.3, advantage_clip=1.0, importance_cap=1.5, kl_to_base=0.1)
    advantage = combined.advantages(case["rewards"], case["has_reward"], case["teacher"], case["behaviour"],
                                    case["has_hint"], objective)
    loss, stats = combined.token_loss(case["logprobs"], case["old"], case["behaviour"], advantage, case["mask"],
                                      objective, case["base"])
    total, tokens, capped = 0.0, 0, 0
    for i in range(3):
        for t in range(5):
            if not case["mask"][i, t]:
                continue
            lp, old, behav = (float(case[k][i, t]) for k in ("logprobs", "old", "behaviour"))
            a = objective.w_rl * float(case["rewards"][i]) * bool(case["has_reward"][i])
            if case["has_hint"][i]:
                a += objective.w_opd * max(-1.0, min(1.0, float(case["teacher"][i, t]) - behav))
            w = min(math.exp(old - behav), objective.importance_cap)
            capped += w == objective.importance_cap
            rho = math.exp(lp - old)
            surrogate = min(rho * a, max(0.8, min(1.2, rho)) * a)
            x = float(case["base"][i, t]) - lp
            total += -w * surrogate + objective.kl_to_base * (math.exp(x) - x - 1)
            tokens += 1
    assert float(loss) == pytest.approx(total / tokens, rel=1e-5, abs=1e-6)
    assert stats["importance_capped"] == pytest.approx(capped / tokens)
    assert capped > 0  # the case exercises the cap


def _naive_kl(student: list[float], teacher: list[float], top_k: int | None, divergence: str) -> float:
    """KL(teacher ‖ student) (forward) or KL(student ‖ teacher) (reverse) over the teacher's top-k tokens
    plus a tail bucket (all tokens when None)."""
    def probs(logits: list[float]) -> list[float]:
        top = max(logits)
        exps = [math.exp(x - top) for x in logits]
        return [e / sum(exps) for e in exps]

    p, q = (probs(teacher), probs(student)) if divergence == "forward" else (probs(student), probs(teacher))
    chosen = sorted(range(len(teacher)), key=lambda j: -teacher[j])[:top_k] if top_k else range(len(teacher))
    kl = sum(p[j] * math.log(p[j] / q[j]) for j in chosen)
    if top_k:
        p_tail, q_tail = 1 - sum(p[j] for j in chosen), 1 - sum(q[j] for j in chosen)
        kl += p_tail * math.log(p_tail / q_tail)
    return kl


@pytest.mark.parametrize("positions", ["every", "some"])
@pytest.mark.parametrize("divergence", ["forward", "reverse"])
@pytest.mark.parametrize("top_k", [None, 3])
def test_the_distillation_loss_equals_a_naive_per_position_loop(top_k: int | None, divergence: str,
                                                                positions: str) -> None:
    """``positions``: the hint teaches a hinted sample's every position, or only some (a [B, R] mask)."""
    case = _case(7)
    g = torch.Generator().manual_seed(3)
    vocabulary = 9
    student = torch.randn(3, 5, vocabulary, generator=g)
    teacher = torch.randn(3, 5, vocabulary, generator=g) * 2
    ids = torch.randint(0, vocabulary, (3, 5), generator=g)
    hinted = case["has_hint"][:, None] * (torch.ones(3, 5) if positions == "every" else
                                          torch.randint(0, 2, (3, 5), generator=g).float())
    objective = distillation.Objective(w_rl=0.5, w_opd=2.0, importance_cap=1.5, kl_to_base=0.2,
                                       top_k=top_k or 64, full_vocabulary_up_to=0 if top_k else 8192,
                                       divergence=divergence)  # type: ignore[arg-type]
    rewards = case["rewards"] * case["has_reward"]
    loss, _ = distillation.token_loss(student, teacher, ids, case["old"], case["behaviour"], rewards,
                                      hinted, case["mask"], objective, case["base"])
    total, tokens = 0.0, 0
    for i in range(3):
        for t in range(5):
            if not case["mask"][i, t]:
                continue
            row = student[i, t].tolist()
            lp = row[int(ids[i, t])] - math.log(sum(math.exp(x) for x in row))
            old, behav = float(case["old"][i, t]), float(case["behaviour"][i, t])
            w = min(math.exp(old - behav), objective.importance_cap)
            a = objective.w_rl * float(rewards[i])
            rho = math.exp(lp - old)
            value = -w * min(rho * a, max(0.8, min(1.2, rho)) * a)
            if hinted[i, t]:
                value += objective.w_opd * w * _naive_kl(row, teacher[i, t].tolist(), top_k, divergence)
            x = float(case["base"][i, t]) - lp
            total += value + objective.kl_to_base * (math.exp(x) - x - 1)
            tokens += 1
    assert float(loss) == pytest.approx(total / tokens, rel=1e-5, abs=1e-6)


def test_the_divergence_is_zero_only_where_student_and_teacher_agree() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 50, generator=g)
    for divergence in ("forward", "reverse"):
        for objective in (distillation.Objective(divergence=divergence),  # type: ignore[arg-type]
                          distillation.Objective(top_k=5, full_vocabulary_up_to=0, divergence=divergence)):  # type: ignore[arg-type]
            same = distillation.divergence(logits, logits.clone(), objective)
            other = distillation.divergence(logits, torch.randn(2, 4, 50, generator=g), objective)
            assert same.abs().max() < 1e-5 and bool((other > 1e-3).all())


def test_the_forward_kl_lifts_a_token_the_student_never_samples() -> None:
    """The reason forward is the default: the gradient on a token the student gives ~0 and the teacher
    prefers is about −p_T under forward KL, and about 0 under reverse KL."""
    student = torch.tensor([[[8.0, 0.0, -8.0]]], requires_grad=True)  # token 2: p_θ ≈ 1e-7
    teacher = torch.tensor([[[0.0, 0.0, 4.0]]])  # the teacher prefers token 2
    lifts = {}
    for divergence in ("forward", "reverse"):
        student.grad = None
        distillation.divergence(student, teacher, distillation.Objective(divergence=divergence)).sum().backward()  # type: ignore[arg-type]
        assert student.grad is not None
        lifts[divergence] = -float(student.grad[0, 0, 2])  # descending the loss raises the logit by this much
    assert lifts["forward"] > 0.9 and abs(lifts["reverse"]) < 1e-4


def test_importance_weights_are_capped_in_the_gradient() -> None:
    """A token the starting policy likes far more than the behaviour policy did is pushed with weight = cap."""
    objective = combined.Objective(importance_cap=2.0)
    logprobs = torch.tensor([[-1.0, -1.0]], requires_grad=True)
    old = logprobs.detach().clone()
    behaviour = torch.tensor([[-6.0, -1.0]])  # weights e^5 (capped to 2) and 1
    advantage = torch.tensor([[1.0, 1.0]])
    loss, _ = combined.token_loss(logprobs, old, behaviour, advantage, torch.ones(1, 2), objective)
    loss.backward()
    assert logprobs.grad is not None
    assert logprobs.grad[0].tolist() == pytest.approx([-2.0 / 2, -1.0 / 2])


# -- updates on the tiny model ---------------------------------------------------------------------------

QUESTION = [ChatMessage(role="user", content="Name a flower.")]
HINT = "Answer with one word."


def _sample(policy: Policy, answer: str, *, reward: float | None = None, hint: str | None = None) -> Sample:
    tokenizer = policy.tokenizer
    prompt = prompt_token_ids(tokenizer, QUESTION, None)
    response = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    teacher = prompt_token_ids(tokenizer, teacher_context(QUESTION, hint), None) if hint else None
    return Sample(signal_event_id="e", signal_id="s", revision=0, turn_id="t", tenant="acme",
                  adapter_version="base", prompt_ids=prompt, response_ids=response,
                  behaviour_logprobs=_logprobs(policy, prompt, response), reward=reward, hint=hint,
                  teacher_hint=hint, teacher_prompt_ids=teacher)


def _logprobs(policy: Policy, prompt: list[int], response: list[int]) -> list[float]:
    packed = pack([prompt], [response], policy.tokenizer.pad_token_id, policy.device)
    with torch.no_grad():
        return selective_log_softmax(response_logits(policy.model, packed), packed.response_ids)[0].tolist()


def _weights(policy: Policy) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in policy.model.named_parameters()}


def _objective(module, **fields):  # type: ignore[no-untyped-def]
    return module.Objective(**fields)


@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=lambda m: m.__name__)
def test_an_update_changes_the_lora_weights_and_leaves_the_base_weights_equal(tiny_model: Path, algorithm) -> None:
    policy = Policy.load(tiny_model, rank=4, device="cpu")
    before = _weights(policy)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    result = algorithm.update(policy, optimizer, [_sample(policy, "Lotus.", reward=1.0, hint=HINT)],
                              _objective(algorithm, steps=2))
    assert result.steps == 2
    after = _weights(policy)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all("lora_" in name for name in changed)
    assert any("lora_B" in name for name in changed)


@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=lambda m: m.__name__)
@pytest.mark.parametrize("reward", [1.0, -1.0])
def test_the_reward_sign_moves_the_response_logprob(tiny_model: Path, algorithm, reward: float) -> None:
    policy = Policy.load(tiny_model, rank=4, device="cpu")
    sample = _sample(policy, "Lotus is my pick.", reward=reward)
    before = sum(sample.behaviour_logprobs)
    algorithm.update(policy, torch.optim.AdamW(policy.parameters(), lr=3e-3), [sample],
                     _objective(algorithm, w_opd=0.0))
    after = sum(_logprobs(policy, sample.prompt_ids, sample.response_ids))
    assert (after - before) * reward > 0.05


@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=lambda m: m.__name__)
def test_opd_moves_the_students_logprobs_toward_the_hinted_teachers(tiny_model: Path, algorithm) -> None:
    """On the response tokens, the student (no hint) ends closer to the base model shown the hint: every
    token's logprob moves toward the teacher's, on the whole (the gaps and the moves point the same way),
    and the squared distance shrinks."""
    policy = Policy.load(tiny_model, rank=4, device="cpu")
    samples = [_sample(policy, answer, hint=HINT) for answer in ("Lotus.", "The rose, and the tulip too.")]
    teacher: list[float] = []
    for s in samples:
        assert s.teacher_prompt_ids is not None
        with policy.base():
            teacher += _logprobs(policy, s.teacher_prompt_ids, s.response_ids)
    before = [lp for s in samples for lp in s.behaviour_logprobs]
    result = algorithm.update(policy, torch.optim.AdamW(policy.parameters(), lr=1e-3), samples,
                              _objective(algorithm, w_rl=0.0, steps=2))
    assert result.steps == 2
    after = [lp for s in samples for lp in _logprobs(policy, s.prompt_ids, s.response_ids)]
    alignment = sum((t - b) * (a - b) for t, b, a in zip(teacher, before, after, strict=True))
    assert alignment > 0
    assert sum((t - a) ** 2 for t, a in zip(teacher, after, strict=True)) < \
        sum((t - b) ** 2 for t, b in zip(teacher, before, strict=True))


@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=lambda m: m.__name__)
def test_a_batch_without_signal_takes_no_optimizer_step(tiny_model: Path, algorithm) -> None:
    policy = Policy.load(tiny_model, rank=4, device="cpu")
    before = _weights(policy)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    neutral = [_sample(policy, "Lotus.", reward=0.0), _sample(policy, "Rose.", hint=HINT)]
    result = algorithm.update(policy, optimizer, neutral, _objective(algorithm, w_opd=0.0))  # rl: all zero
    assert (result.steps, result.skipped) == (0, "no sample carries a non-zero advantage")
    assert optimizer.state_dict()["state"] == {}  # Adam never stepped: no momentum to move the weights later
    assert all(torch.equal(before[name], p) for name, p in policy.model.named_parameters())


@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=lambda m: m.__name__)
def test_a_sample_the_policy_has_drifted_from_keeps_its_hint_and_loses_its_reward(tiny_model: Path,
                                                                                  algorithm) -> None:
    """Served when the policy gave that answer a nat per token less likely than it does now: its reward is
    about a policy that is gone, and is dropped (unless max_drift is 0); its hint still teaches."""
    policy = Policy.load(tiny_model, rank=4, device="cpu")

    def stale(sample: Sample) -> Sample:
        return replace(sample, behaviour_logprobs=[lp - 1.0 for lp in sample.behaviour_logprobs])

    rewarded = [stale(_sample(policy, "Lotus.", reward=1.0))]
    result = algorithm.update(policy, torch.optim.AdamW(policy.parameters(), lr=3e-3), rewarded,
                              _objective(algorithm, w_opd=0.0))
    assert (result.steps, result.skipped, result.stats["drifted"]) == (0, "no sample carries a non-zero advantage",
                                                                      1.0)
    kept = algorithm.update(policy, torch.optim.AdamW(policy.parameters(), lr=3e-3), rewarded,
                            _objective(algorithm, w_opd=0.0, max_drift=0.0))
    assert kept.steps > 0 and kept.stats["drifted"] == 0.0
    hinted = [stale(_sample(policy, "Lotus.", reward=1.0, hint=HINT))]
    taught = algorithm.update(policy, torch.optim.AdamW(policy.parameters(), lr=3e-3), hinted,
                              _objective(algorithm, w_rl=0.0))
    assert taught.steps > 0


def test_the_teacher_teaches_up_to_its_first_disagreement(tiny_model: Path) -> None:
    """With span "to_divergence", only the positions up to the first token the hinted teacher would not
    have picked carry its KL: less than over the whole response when the response strays from it, the
    same when the response is the teacher's own greedy answer."""
    policy = Policy.load(tiny_model, rank=4, device="cpu")
    hinted = prompt_token_ids(policy.tokenizer, teacher_context(QUESTION, HINT), None)
    with torch.no_grad():
        greedy = policy.model.generate(input_ids=torch.tensor([hinted]), max_new_tokens=6, do_sample=False,
                                       pad_token_id=policy.tokenizer.pad_token_id)[0, len(hinted):].tolist()
    own = _sample(policy, "", hint=HINT)
    own = dataclasses.replace(own, response_ids=greedy, behaviour_logprobs=_logprobs(policy, own.prompt_ids, greedy))
    strays = _sample(policy, "Lotus, rose and tulip.", hint=HINT)
    measured: dict[tuple[str, str], float] = {}
    for name, sample in (("own", own), ("strays", strays)):
        for span in ("response", "to_divergence"):
            result = distillation.update(policy, torch.optim.AdamW(policy.parameters(), lr=1e-3), [sample],
                                         distillation.Objective(w_rl=0.0, steps=0, span=span))  # type: ignore[arg-type]
            measured[name, span] = result.stats["teacher_kl"]
    assert 0 < measured["strays", "to_divergence"] < measured["strays", "response"]
    assert measured["own", "to_divergence"] == pytest.approx(measured["own", "response"])


def test_the_teacher_can_be_the_current_policy(tiny_model: Path, tmp_path: Path) -> None:
    """With an adapter that is not the base, the teacher 'policy' and the teacher 'base' disagree."""
    from support.adapters import random_adapter

    adapter = random_adapter(tiny_model, tmp_path / "adapter", seed=5)
    measured = {}
    for teacher in ("base", "policy"):
        policy = Policy.load(tiny_model, rank=4, adapter=adapter, device="cpu")
        result = distillation.update(policy, torch.optim.AdamW(policy.parameters(), lr=1e-3),
                                     [_sample(policy, "Lotus.", hint=HINT)],
                                     distillation.Objective(w_rl=0.0, steps=1, teacher=teacher))  # type: ignore[arg-type]
        measured[teacher] = result.stats["teacher_kl"]
    assert measured["base"] != pytest.approx(measured["policy"], rel=1e-3)
