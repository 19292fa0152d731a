"""The policy being trained: the local base model with a scope's LoRA adapter (peft), and its tokenizer.

The base weights are frozen; only the adapter trains. The frozen base stays reachable with
:meth:`Policy.base` (peft switches the adapter off), so the teacher and the KL anchor need no second copy
of the model. On CUDA the base runs in bf16 and peft keeps the adapter in fp32; on CPU everything is fp32.

A trainer of many scopes keeps one copy of the base model (:class:`SharedBase`): each scope's adapter is a
named adapter of one PeftModel, and a scope's :class:`Policy` makes its adapter the active (and only
trainable) one whenever its model is used. The trainer process is single-threaded, so a policy is never
used while another scope's is active. Each scope's adapter and optimizer state stay in memory, beside the
others'.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import save_file
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
        self._model = model  # a PeftModel with one trainable adapter, "default"
        self.tokenizer = tokenizer
        self.base_model = base_model
        self.device: torch.device = next(model.parameters()).device

    @property
    def model(self) -> Any:
        return self._model

    @classmethod
    def load(cls, model_dir: Path, *, rank: int, adapter: Path | None = None, device: str = "auto") -> Policy:
        """The base model from ``model_dir`` with ``adapter`` (a saved version, to go on training it) or a new
        LoRA adapter of ``rank`` on every linear layer (B starts at zero: the new policy equals the base)."""
        base, tokenizer = _base(model_dir, device)
        if adapter is not None:
            model = PeftModel.from_pretrained(base, adapter, is_trainable=True)
        else:
            model = get_peft_model(base, _config(rank))
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


SPARE = "spare"  # an adapter kept when a shared base has no scope's left (no scope's name starts so)


class SharedBase:
    """One copy of the base model for every scope a trainer process trains (see the module docstring)."""

    def __init__(self, model_dir: Path, *, device: str = "auto") -> None:
        self._base, self.tokenizer = _base(model_dir, device)
        self.base_model = str(Path(model_dir).resolve())
        self.peft: Any = None
        self._active: str | None = None

    def policy(self, scope: str, *, rank: int, adapter: Path | None = None) -> Policy:
        """``scope``'s policy: its adapter loaded from ``adapter`` (or new, of ``rank``), replacing any it had."""
        name = adapter_name(scope)
        self.drop(scope)
        if adapter is not None and self.peft is None:
            self.peft = PeftModel.from_pretrained(self._base, adapter, adapter_name=name, is_trainable=True)
        elif adapter is not None:
            self.peft.load_adapter(adapter, adapter_name=name, is_trainable=True)
        elif self.peft is None:
            self.peft = get_peft_model(self._base, _config(rank), adapter_name=name)
        else:
            self.peft.add_adapter(name, _config(rank))
        self._active = None
        return _ScopePolicy(self, name)

    def activate(self, name: str) -> Any:
        """The model, with ``name`` the active and only trainable adapter."""
        if self._active != name:
            self.peft.set_adapter(name)
            self._active = name
        return self.peft

    def drop(self, scope: str) -> None:
        """Free ``scope``'s adapter (its optimizer goes with its policy)."""
        name = adapter_name(scope)
        if self.peft is None or name not in self.peft.peft_config:
            return
        others = [other for other in self.peft.peft_config if other != name]
        if not others:  # peft keeps one adapter at least
            self.peft.add_adapter(SPARE, _config(1))
            others = [SPARE]
        if self.peft.active_adapter == name:
            self.peft.set_adapter(others[0])  # peft warns when the active adapter is deleted
        self.peft.delete_adapter(name)
        self._active = None


class _ScopePolicy(Policy):
    """A scope's policy on a :class:`SharedBase`: using its model makes its adapter the active one."""

    def __init__(self, shared: SharedBase, name: str) -> None:
        self._shared = shared
        self._name = name
        super().__init__(shared.activate(name), shared.tokenizer, shared.base_model)

    @property
    def model(self) -> Any:
        return self._shared.activate(self._name)

    def save(self, directory: Path) -> None:
        """The adapter alone, in the same PEFT format as :meth:`Policy.save` (keys without the adapter's name)."""
        model = self.model
        directory.mkdir(parents=True, exist_ok=True)
        state = get_peft_model_state_dict(model, adapter_name=self._name)
        save_file({key: value.detach().contiguous() for key, value in state.items()},
                  str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
        config = copy.copy(model.peft_config[self._name])
        config.inference_mode = True
        config.save_pretrained(str(directory))


def adapter_name(scope: str) -> str:
    """The name peft holds a scope's adapter under: its names become module names, which hold no dots.
    One to one (``_`` is escaped too).

    >>> adapter_name("t.acme.u.0a5b"), adapter_name("my_team")
    ('s_t_dacme_du_d0a5b', 's_my__team')
    """
    return "s_" + scope.replace("_", "__").replace(".", "_d")


def _base(model_dir: Path, device: str) -> tuple[Any, Any]:
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Loading weights" bars, in a worker's log
    where = pick_device(device)
    dtype = torch.bfloat16 if where.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(where)
    return model, AutoTokenizer.from_pretrained(model_dir)


def _config(rank: int) -> LoraConfig:
    return LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear")
