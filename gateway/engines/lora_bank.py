"""Many LoRA adapters in one batch: each row of a batch on its own adapter, for the cost of one.

peft's mixed-adapter batch runs each distinct adapter of a batch on its own rows, one after another, in
every adapted layer: on the small model (CPU, 8 rows, one decode step) that is 10.2 ms on one adapter and
23.9 ms on eight different ones, so a gateway serving many scopes slows with every scope a batch mixes.
The bank keeps the adapters in numbered slots of stacked weights, one stack per adapted linear layer
(``A``: [slots, rank, in]; ``B``: [slots, out, rank], with the adapter's scaling folded in), and a forward
hook on each of those layers adds ``x · A[slot of the row]ᵀ · B[slot of the row]ᵀ`` as two batched matrix
products, however many adapters the batch mixes: 6.2 ms and 6.3 ms on the same step (the idea of vLLM's
punica kernels, in plain torch; docs/experiments.md). Slot 0 is all zeros: the rows on the base model.

It serves what the trainer writes: plain LoRA (any rank, rsLoRA scaling too) on any of the model's linear
layers, in ``adapter_model.safetensors``. Anything else (DoRA, LoRA on embeddings, trained biases,
``modules_to_save``, per-layer rank or alpha patterns) is refused when it is loaded, saying why.
All of it runs on the engine's generation thread.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."  # where peft saves the model's own module names


class LoraBank:
    def __init__(self, model: torch.nn.Module, *, slots: int = 8) -> None:
        self._linear = {name: module for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
        self._device = next(model.parameters()).device
        self._dtype = next(model.parameters()).dtype
        self._slots = slots + 1  # slot 0: the base model
        self._rank = 0
        self._a: dict[str, torch.Tensor] = {}  # layer -> [slots, rank, in]
        self._b: dict[str, torch.Tensor] = {}  # layer -> [slots, out, rank]
        self._free = list(range(self._slots - 1, 0, -1))
        self._rows: torch.Tensor | None = None  # each row's slot during a forward pass; None: all on the base

    def load(self, path: Path) -> int:
        """Read an adapter into a free slot (more slots when none is); its slot. ValueError: not servable."""
        config, pairs = _read(path, set(self._linear))
        scaling = config["lora_alpha"] / (math.sqrt(config["r"]) if config.get("use_rslora") else config["r"])
        rank = max(a.shape[0] for a, _ in pairs.values())
        if not self._free:
            self._resize(self._slots * 2, self._rank)
        if rank > self._rank:
            self._resize(self._slots, rank)
        slot = self._free.pop()
        for layer in pairs.keys() - self._a.keys():
            self._add_layer(layer)
        for layer in self._a:
            self._a[layer][slot].zero_()
            self._b[layer][slot].zero_()
        for layer, (a, b) in pairs.items():
            self._a[layer][slot, : a.shape[0]] = a.to(self._device, self._dtype)
            self._b[layer][slot, :, : b.shape[1]] = (b * scaling).to(self._device, self._dtype)
        return slot

    def free(self, slot: int) -> None:
        self._free.append(slot)

    @contextmanager
    def rows(self, slots: Sequence[int]) -> Iterator[None]:
        """Within it, the model's forward passes run row i on ``slots[i]``."""
        self._rows = torch.tensor(slots, device=self._device) if any(slots) else None
        try:
            yield
        finally:
            self._rows = None

    def _add_layer(self, layer: str) -> None:
        module = self._linear[layer]
        where = {"device": self._device, "dtype": self._dtype}
        self._a[layer] = torch.zeros(self._slots, self._rank, module.in_features, **where)
        self._b[layer] = torch.zeros(self._slots, module.out_features, self._rank, **where)
        module.register_forward_hook(self._hook(layer))

    def _resize(self, slots: int, rank: int) -> None:
        for stacks in (self._a, self._b):
            for layer, old in stacks.items():
                shape = (slots, rank, old.shape[2]) if stacks is self._a else (slots, old.shape[1], rank)
                new = torch.zeros(shape, device=self._device, dtype=self._dtype)
                new[: old.shape[0], : old.shape[1], : old.shape[2]] = old
                stacks[layer] = new
        self._free += range(slots - 1, self._slots - 1, -1)
        self._slots, self._rank = slots, rank

    def _hook(self, layer: str) -> Any:
        def add_lora(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            if self._rows is None:
                return output
            a = self._a[layer][self._rows]  # [rows, rank, in]
            b = self._b[layer][self._rows]  # [rows, out, rank]
            return output + torch.bmm(torch.bmm(inputs[0], a.transpose(1, 2)), b.transpose(1, 2))

        return add_lora


def _read(path: Path, linear: set[str]) -> tuple[dict[str, Any], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The adapter's config and its (A, B) per layer of the model."""
    config = json.loads((path / "adapter_config.json").read_text())
    refused = [what for what, bad in (
        (f"peft_type {config.get('peft_type')}", config.get("peft_type", "LORA") != "LORA"),
        ("DoRA", config.get("use_dora")), (f"bias {config.get('bias')!r}", config.get("bias", "none") != "none"),
        ("modules_to_save", config.get("modules_to_save")), ("fan_in_fan_out", config.get("fan_in_fan_out")),
        ("rank_pattern", config.get("rank_pattern")), ("alpha_pattern", config.get("alpha_pattern")),
    ) if bad]
    if refused:
        raise ValueError(f"only plain LoRA on linear layers is served, not {', '.join(refused)}")
    if not (path / WEIGHTS).is_file():
        raise ValueError(f"no {WEIGHTS} there")
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(path / WEIGHTS).items():
        layer, _, part = key.removeprefix(_PREFIX).rpartition(".lora_")
        if part not in ("A.weight", "B.weight") or layer not in linear:
            raise ValueError(f"{key} is not the LoRA weight of a linear layer of this model")
        found.setdefault(layer, {})[part[0]] = tensor
    pairs = {}
    for layer, parts in found.items():
        if set(parts) != {"A", "B"} or parts["A"].shape[0] != parts["B"].shape[1]:
            raise ValueError(f"{layer}'s LoRA weights do not pair up (A and B of one rank)")
        pairs[layer] = (parts["A"], parts["B"])
    if not pairs:
        raise ValueError(f"{WEIGHTS} holds no LoRA weights")
    return config, pairs
