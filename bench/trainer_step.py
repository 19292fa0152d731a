"""Trainer step: response tokens per second and peak memory of one training update, per algorithm and
model size, on the CPU (and on CUDA when there is one).

An update is what the trainer does with a batch: pack it, the no-gradient passes (the hinted teacher on
the samples with a hint, the starting policy), then one optimizer step (``steps_per_batch=1``). The batch
is synthetic but shaped like traffic: prompts and answers of the given lengths, answers scored with the
base model's logprobs (on-policy), rewards of ±1 on every sample, a hint on every other one.

The baseline, measured in the same run on the same batch and model, is a plain LoRA fine-tuning step:
one forward and backward pass with cross-entropy on the answer tokens. The ratio says what the objective's
extra passes cost.

Memory: on CUDA the peak allocated during a step (torch.cuda.max_memory_allocated); on the CPU the
process's peak resident set after the step (it includes the model and Python), and its growth over the
model already loaded.

Run: .venv/bin/python bench/trainer_step.py [--sizes tiny,100m] [--batch 8] [--prompt 48] [--answer 48]
     [--repeats 5] [--device auto]
"""

from __future__ import annotations

import argparse
import random
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from trl.trainer.utils import selective_log_softmax

from nextturn.local_models import init_model
from trainer import combined, distillation
from trainer.packing import pack, response_logits
from trainer.policy import Policy
from trainer.samples import Sample


def batch(policy: Policy, size: int, prompt_len: int, answer_len: int, seed: int = 0) -> list[Sample]:
    rng = random.Random(seed)
    vocabulary = len(policy.tokenizer) - 16  # ordinary tokens; the special ones sit at the start
    samples = []
    for n in range(size):
        prompt = [16 + rng.randrange(vocabulary) for _ in range(prompt_len)]
        answer = [16 + rng.randrange(vocabulary) for _ in range(answer_len)]
        packed = pack([prompt], [answer], policy.tokenizer.pad_token_id, policy.device)
        with torch.no_grad():
            behaviour = selective_log_softmax(response_logits(policy.model, packed), packed.response_ids)[0].tolist()
        hinted = n % 2 == 0
        teacher = prompt + [16 + rng.randrange(vocabulary) for _ in range(12)] if hinted else None
        samples.append(Sample(signal_event_id=f"e{n}", signal_id=f"s{n}", revision=0, turn_id=f"t{n}",
                              tenant="bench", adapter_version="base", prompt_ids=prompt, response_ids=answer,
                              behaviour_logprobs=behaviour, reward=1.0 if n % 4 < 2 else -1.0,
                              hint="hint" if hinted else None, teacher_hint="hint" if hinted else None,
                              teacher_prompt_ids=teacher))
    return samples


def plain_step(policy: Policy, optimizer: torch.optim.Optimizer, samples: list[Sample]) -> None:
    """The baseline: LoRA fine-tuning on the answers, one forward and backward pass."""
    packed = pack([s.prompt_ids for s in samples], [s.response_ids for s in samples],
                  policy.tokenizer.pad_token_id, policy.device)
    policy.model.train()
    logprobs = selective_log_softmax(response_logits(policy.model, packed), packed.response_ids)
    loss = -(logprobs * packed.mask).sum() / packed.mask.sum()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def timed(step: Callable[[], None], repeats: int, device: torch.device) -> tuple[list[float], float]:
    """Seconds per step (after one warm-up step) and peak memory in MiB."""
    step()
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return times, peak


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny,100m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=48)
    parser.add_argument("--answer", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--models", type=Path, default=Path(tempfile.gettempdir()) / "nextturn-bench-models")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {args.batch} x "
          f"({args.prompt} prompt + {args.answer} answer tokens); {args.repeats} timed steps after a warm-up")
    print(f"{'model':>6} {'params':>8} {'device':>6} {'update':>13} {'median s':>9} {'p99 s':>7} "
          f"{'answer tok/s':>12} {'vs plain':>8} {'peak MiB':>9}")
    for size in args.sizes.split(","):
        measure(size, args)


def measure(size: str, args: argparse.Namespace) -> None:
    directory = args.models / size
    if not directory.exists():
        init_model(directory, size=size, seed=0)
    policy = Policy.load(directory, rank=8, device=args.device)
    params = sum(p.numel() for p in policy.model.parameters()) / 1e6
    resident = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    samples = batch(policy, args.batch, args.prompt, args.answer)
    tokens = args.batch * args.answer
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4)
    plain, plain_peak = timed(lambda: plain_step(policy, optimizer, samples), args.repeats, policy.device)
    rows = [("plain SFT", plain, plain_peak)]
    sampled = combined.Objective(steps=1)
    times, peak = timed(lambda: combined.update(policy, optimizer, samples, sampled), args.repeats, policy.device)
    rows.append(("sampled", times, peak))
    distribution = distillation.Objective(steps=1)
    times, peak = timed(lambda: distillation.update(policy, optimizer, samples, distribution), args.repeats,
                        policy.device)
    rows.append(("distribution", times, peak))
    for name, times, peak in rows:
        median = statistics.median(times)
        note = f"{peak:9.0f}" if policy.device.type == "cuda" else f"{peak:9.0f} (+{peak - resident:.0f})"
        print(f"{size:>6} {params:7.1f}M {policy.device.type:>6} {name:>13} {median:9.3f} {p99(times):7.3f} "
              f"{tokens / median:12.0f} {median / statistics.median(plain):7.2f}x {note}")

if __name__ == "__main__":
    main()
