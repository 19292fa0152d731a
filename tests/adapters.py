"""LoRA adapters and reference computations for tests of the embedded engine."""

from __future__ import annotations

from pathlib import Path

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
