"""Local models: deterministic builds, a byte-level tokenizer, a chat template the gateway can parse."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nextturn.errors import NextturnError
from nextturn.local_models import init_model


def digests(directory: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model, local_files_only=True)


def test_the_same_seed_builds_the_same_files(tmp_path: Path, tiny_model: Path) -> None:
    again = init_model(tmp_path / "again", size="tiny", seed=0)
    other = init_model(tmp_path / "other", size="tiny", seed=1)
    assert digests(again) == digests(tiny_model)
    assert digests(other)["model.safetensors"] != digests(tiny_model)["model.safetensors"]


@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_any_text_survives_the_tokenizer(tokenizer: Any, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_the_chat_template_renders_roles_tools_and_tool_calls(tokenizer: Any) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Run "}, {"type": "text", "text": "the tests."}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "pytest", "arguments": '{"k": 1}'}},
            {"id": "call_2", "type": "function", "function": {"name": "ls", "arguments": ""}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "2 passed"},
        {"role": "tool", "tool_call_id": "call_2", "content": "a.py"},
    ]
    tools = [{"type": "function", "function": {"name": "pytest", "parameters": {"type": "object"}}}]
    rendered = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|system|>Be brief.<|end|>"
        '<|tools|>[{"type": "function", "function": {"name": "pytest", "parameters": {"type": "object"}}}]<|end|>'
        "<|user|>Run the tests.<|end|>"
        '<|assistant|><|tool_call|>{"id": "call_1", "name": "pytest", "arguments": {"k": 1}}<|/tool_call|>'
        '<|tool_call|>{"id": "call_2", "name": "ls", "arguments": {}}<|/tool_call|><|end|>'
        '<|tool|>{"id": "call_1", "content": "2 passed"}<|end|>'
        '<|tool|>{"id": "call_2", "content": "a.py"}<|end|>'
        "<|assistant|>"
    )
    special = tokenizer.convert_tokens_to_ids(["<|assistant|>", "<|tool_call|>", "<|end|>"])
    assert all(token in tokenizer.encode(rendered) for token in special)  # markup is one token each


def test_the_model_loads_from_disk_and_generates(tiny_model: Path, tokenizer: Any) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, local_files_only=True)
    assert model.config.eos_token_id == tokenizer.convert_tokens_to_ids("<|end|>")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    torch.manual_seed(0)
    out = model.generate(**prompt, max_new_tokens=8, min_new_tokens=8, do_sample=True,
                         pad_token_id=tokenizer.pad_token_id)
    assert out.shape == (1, prompt["input_ids"].shape[1] + 8)


def test_refuses_a_non_empty_directory_and_unknown_sizes(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(NextturnError, match="is not empty"):
        init_model(tmp_path / "taken")
    with pytest.raises(NextturnError, match="unknown model size 'huge'"):
        init_model(tmp_path / "new", size="huge")


def test_the_tokenizer_names_a_class_transformers_4_and_5_both_load(tiny_model: Path, tokenizer: Any) -> None:
    """A model built on one side of transformers 5 is served or trained on the other (``make test-lowest``
    loads the demo's cached base model); transformers 5 would write a class name that 4 does not know."""
    config = json.loads((tiny_model / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["model_input_names"] == ["input_ids", "attention_mask"]
    assert list(tokenizer("hi")) == ["input_ids", "attention_mask"]  # no token_type_ids for a Llama model
