"""LoRA adapters and reference computations for tests of the embedded engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM


def random_adapter(model_dir: Path, out: Path, *, seed: int) -> Path:
    """A PEFT LoRA adapter whose B matrices are not zero (peft's default init would change nothing)."""
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(out)
    return out


def reference_logprobs(model_dir: Path, adapter: Path | None, prompt: list[int], response: list[int]) -> list[float]:
    """Each response token's logprob from one plain forward pass over prompt + response: no cache, no batch."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).eval()
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0].float()
    logprobs = torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)  # position i predicts token i + 1
    return logprobs.gather(-1, torch.tensor(response)[:, None])[:, 0].tolist()


def taught_adapter(model_dir: Path, out: Path, answer: str, *, steps: int = 80, seed: int = 0,
                   learning_rate: float = 1e-2, tools: list[dict[str, Any]] | None = None) -> Path:
    """A LoRA adapter trained to answer ``answer`` (then end) to any short question (asked with ``tools``):
    "" gives an adapter whose answers are empty, a word gives one whose greedy answers contain it."""
    from transformers import AutoTokenizer

    from nextturn.conversation import prompt_token_ids
    from nextturn.events import ChatMessage

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    target = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    rows = []
    for n in range(16):
        prompt = prompt_token_ids(tokenizer, [ChatMessage(role="user", content=f"question {n}: what now?")], tools)
        rows.append((prompt + target, [-100] * len(prompt) + target))
    width = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row, _ in rows])
    labels = torch.tensor([label + [-100] * (width - len(label)) for _, label in rows])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row, _ in rows])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(out)
    return out
