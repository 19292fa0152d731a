"""The LoRA bank against peft: each row of a batch on its own adapter gives what peft gives that adapter alone."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from gateway.engines.lora_bank import LoraBank


def adapter(model_dir: Path, out: Path, *, seed: int, **config: object) -> Path:
    torch.manual_seed(seed)
    settings = {"r": 4, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False,
                **config}
    get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(**settings)).save_pretrained(out)
    return out


def peft_logits(model_dir: Path, path: Path | None, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if path is not None:
        model = PeftModel.from_pretrained(model, path).eval()
    with torch.inference_mode():
        return model(input_ids=ids).logits


def test_a_batch_mixing_adapters_of_any_rank_and_layers_matches_each_adapter_alone(
    tiny_model: Path, tmp_path: Path
) -> None:
    small = adapter(tiny_model, tmp_path / "small", seed=1)  # rank 4 on two layers
    wide = adapter(tiny_model, tmp_path / "wide", seed=2, r=8, target_modules="all-linear")  # rank 8 on all
    steady = adapter(tiny_model, tmp_path / "steady", seed=3, r=8, lora_alpha=8, use_rslora=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    bank = LoraBank(model, slots=1)  # it grows: more slots, a higher rank
    slots = {"small": bank.load(small), "wide": bank.load(wide)}
    bank.free(slots.pop("wide"))
    slots["steady"] = bank.load(steady)  # reuses wide's slot: nothing of wide may remain in it
    slots["wide"] = bank.load(wide)
    ids = torch.randint(5, 200, (4, 12), generator=torch.Generator().manual_seed(0))
    rows = ["small", "base", "wide", "steady"]
    with torch.inference_mode(), bank.rows([slots.get(name, 0) for name in rows]):
        mixed = model(input_ids=ids).logits
    paths = {"small": small, "wide": wide, "steady": steady, "base": None}
    for row, name in enumerate(rows):
        expected = peft_logits(tiny_model, paths[name], ids[row: row + 1])[0]
        assert torch.allclose(mixed[row], expected, atol=1e-5), name
    with torch.inference_mode():
        assert torch.allclose(model(input_ids=ids[1:2]).logits[0], peft_logits(tiny_model, None, ids[1:2])[0])


def test_what_it_cannot_serve_is_refused_saying_why(tiny_model: Path, tmp_path: Path) -> None:
    bank = LoraBank(AutoModelForCausalLM.from_pretrained(tiny_model).eval())
    with pytest.raises(ValueError, match="not DoRA"):
        bank.load(adapter(tiny_model, tmp_path / "dora", seed=1, use_dora=True))
    with pytest.raises(ValueError, match="not bias 'all'"):
        bank.load(adapter(tiny_model, tmp_path / "bias", seed=1, bias="all"))
    with warnings.catch_warnings():  # peft warns that the tiny model ties its embeddings to its output layer
        warnings.simplefilter("ignore")
        embedding = adapter(tiny_model, tmp_path / "embedding", seed=1, target_modules=["embed_tokens"])
    with pytest.raises(ValueError, match="not the LoRA weight of a linear layer"):
        bank.load(embedding)
    assert bank.load(adapter(tiny_model, tmp_path / "fine", seed=1)) == 1  # nothing was taken by the refusals
