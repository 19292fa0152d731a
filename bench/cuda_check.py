"""On a CUDA machine: do the trainer and the embedded engine do on the GPU what they do on the CPU?

Not a test (CI has no GPU) and not timed: a check to run by hand where a GPU is lent, printing what it
finds, exiting 1 when something is off.

Trainer: the tiny model, the same LoRA weights on the CPU (fp32) and on CUDA (bf16 base, fp32 adapter);
one distribution-distillation update on the same batch on each (the first losses must agree within bf16
rounding); 40 more updates on CUDA (the loss must go down); the CUDA adapter saved and loaded on the CPU
(its logprobs must match the CUDA model's).

Engine: the small model behind the embedded engine on CUDA, with a LoRA adapter of random weights loaded;
eight concurrent sampled requests, half on the base and half on the adapter. The logprobs it records must
equal a teacher-forced pass of the same model over the same tokens, and greedy answers must differ
between base and adapter.

Run: .venv/bin/python bench/cuda_check.py
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from gateway.engines.embedded import EmbeddedEngine
from gateway.schemas import ChatCompletionRequest
from nextturn.local_models import init_model
from trainer import distillation
from trainer.packing import pack, response_logits
from trainer.policy import Policy

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trainer_step import batch  # noqa: E402  (a sibling script: its synthetic batch)


def check(ok: bool, what: str) -> bool:
    print(("ok    " if ok else "FAILED"), what)
    return ok


def trainer(root: Path) -> bool:
    init_model(root / "tiny", size="tiny", seed=0)
    torch.manual_seed(0)
    cpu = Policy.load(root / "tiny", rank=8, device="cpu")
    gpu = Policy.load(root / "tiny", rank=8, device="cuda")
    with torch.no_grad():
        for mine, theirs in zip(cpu.parameters(), gpu.parameters(), strict=True):
            theirs.copy_(mine)
    kinds = {(p.dtype, p.requires_grad) for p in gpu.model.parameters()}
    good = check(kinds == {(torch.bfloat16, False), (torch.float32, True)},
                 f"CUDA: base bf16, adapter fp32 ({sorted(str(k) for k in kinds)})")
    samples = batch(cpu, 8, 48, 48, seed=0)
    first = [distillation.update(policy, torch.optim.AdamW(policy.parameters(), lr=1e-3), samples,
                                 distillation.Objective(steps=1)).losses[0] for policy in (cpu, gpu)]
    good &= check(abs(first[0] - first[1]) <= 0.25 * abs(first[0]) + 1e-4,
                  f"first update's loss, CPU fp32 {first[0]:.6f} and CUDA bf16 {first[1]:.6f}")
    optimizer = torch.optim.AdamW(gpu.parameters(), lr=1e-3)
    losses = [distillation.update(gpu, optimizer, samples, distillation.Objective(steps=1)).losses[0]
              for _ in range(40)]
    good &= check(losses[-1] < losses[0], f"40 CUDA updates on one batch: loss {losses[0]:.4f} → {losses[-1]:.4f}")
    gpu.save(root / "adapter")
    back = Policy.load(root / "tiny", rank=8, adapter=root / "adapter", device="cpu")
    prompts, answers = [s.prompt_ids for s in samples[:2]], [s.response_ids for s in samples[:2]]
    with torch.no_grad():
        here = response_logits(back.model.eval(), pack(prompts, answers, back.tokenizer.pad_token_id, back.device))
        there = response_logits(gpu.model.eval(), pack(prompts, answers, gpu.tokenizer.pad_token_id, gpu.device))
    gap = float((here.float().log_softmax(-1) - there.float().log_softmax(-1).cpu()).abs().max())
    return good & check(gap < 0.05, f"adapter trained on CUDA, loaded on the CPU: logprobs within {gap:.4f}")


def forced(model: Any, prompt: list[int], response: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt + response], device="cuda")
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
    return logits.log_softmax(-1).gather(-1, torch.tensor(response, device="cuda")[:, None])[:, 0].cpu()


async def engine(root: Path) -> bool:
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    init_model(root / "small", size="small", seed=0)
    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(root / "small"), config).save_pretrained(root / "lora")
    served = EmbeddedEngine(root / "small", device="cuda")
    await served.start()
    try:
        await served.add_adapter("default-v1", root / "lora")
        adapters = ["base" if n % 2 else "default-v1" for n in range(8)]
        asks = [ChatCompletionRequest(model="small", messages=[{"role": "user", "content": f"Tell me about {n}"}],
                                      max_tokens=48, temperature=1.0, seed=n) for n in range(8)]
        results = await asyncio.gather(*(served.complete(ask, a) for ask, a in zip(asks, adapters, strict=True)))
        greedy = ChatCompletionRequest(model="small", messages=[{"role": "user", "content": "Hello"}], max_tokens=16,
                                       temperature=0.0)
        plain_answer, tuned_answer = await asyncio.gather(served.complete(greedy, "base"),
                                                          served.complete(greedy, "default-v1"))
    finally:
        await served.close()
    plain = AutoModelForCausalLM.from_pretrained(root / "small").to("cuda").eval()
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "small"), root / "lora")
    tuned = tuned.to("cuda").eval()
    worst = 0.0
    for adapter, result in zip(adapters, results, strict=True):
        assert result.response_logprobs is not None
        again = forced(plain if adapter == "base" else tuned, result.prompt_token_ids, result.response_token_ids)
        worst = max(worst, float((torch.tensor(result.response_logprobs) - again).abs().max()))
    good = check(worst < 1e-3, f"8 concurrent requests: recorded logprobs within {worst:.2g} of a forced pass")
    return good & check(plain_answer.response_token_ids != tuned_answer.response_token_ids,
                        "greedy answers differ between the base model and the adapter")


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this check is for a GPU machine")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    with tempfile.TemporaryDirectory() as directory:
        good = trainer(Path(directory))
        good &= asyncio.run(engine(Path(directory)))
    sys.exit(0 if good else 1)


if __name__ == "__main__":
    main()
