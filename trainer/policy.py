"""The policy being trained: the local base model with a scope's LoRA adapter (peft), and its tokenizer.

The base weights are frozen; only the adapter trains. The frozen base stays reachable with
:meth:`Policy.base` (peft switches the adapter off), so the teacher and the KL anchor need no second copy
of the model. On CUDA the base runs in bf16 and peft keeps the adapter in fp32; on CPU everything is fp32.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from nextturn.errors import ConfigError


def pick_device(wanted: str) -> torch.device:
    """``auto``: CUDA when there is one, else the CPU."""
    if wanted == "cuda" and not torch.cuda.is_available():
        raise ConfigError("NEXTTURN_TRAINER_DEVICE=cuda, but torch sees no CUDA device; use auto or cpu")
    if wanted == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(wanted)


class Policy:
    def __init__(self, model: Any, tokenizer: Any, base_model: str) -> None:
        self.model = model  # a PeftModel with one trainable adapter, "default"
        self.tokenizer = tokenizer
        self.base_model = base_model
        self.device: torch.device = next(model.parameters()).device

    @classmethod
    def load(cls, model_dir: Path, *, rank: int, adapter: Path | None = None, device: str = "auto") -> Policy:
        """The base model from ``model_dir`` with ``adapter`` (a saved version, to go on training it) or a new
        LoRA adapter of ``rank`` on every linear layer (B starts at zero: the new policy equals the base)."""
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # "Loading weights" bars, in a worker's log
        where = pick_device(device)
        dtype = torch.bfloat16 if where.type == "cuda" else torch.float32
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(where)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if adapter is not None:
            model = PeftModel.from_pretrained(base, adapter, is_trainable=True)
        else:
            config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear")
            model = get_peft_model(base, config)
        return cls(model, tokenizer, str(Path(model_dir).resolve()))

    def parameters(self) -> list[torch.nn.Parameter]:
        """The adapter's weights: the only ones an optimizer may change."""
        return [p for p in self.model.parameters() if p.requires_grad]

    @contextmanager
    def base(self) -> Iterator[None]:
        """Within this block the model computes as the frozen base model (the adapter is off)."""
        with self.model.disable_adapter():
            yield

    def save(self, directory: Path) -> None:
        """The adapter in PEFT format: what vLLM and the embedded engine load."""
        self.model.save_pretrained(directory)
