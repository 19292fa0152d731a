"""Measuring a model version away from the loop: held-out satisfaction and diversity.

**Held-out satisfaction**: each person's preference checked on requests phrased in ways nobody used online
(:data:`demo.tasks.HELD_OUT_LIST_ASKS`, ``HELD_OUT_SUM_ASKS``), answered by sampling as the
gateway serves (temperature 1, the raw distribution). A sum's answer includes the tool round: a tool call
the model writes is run by :func:`demo.base_model.calculator` and the model answers from it.

**Diversity**: distinct-2 (distinct word pairs over all word pairs) of answers to *unrelated* requests,
about categories no simulated person asks about. A version that collapsed (the same few answers to
everything) scores lower than the base model; the target is within 10% of it.

torch, transformers and peft are imported inside the functions.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from demo import tasks
from demo.base_model import calculator
from nextturn.local_models import END, TOOL_CALL_CLOSE, TOOL_CALL_OPEN

MAX_NEW_TOKENS = 48


@dataclass
class Sampler:
    """A model version (the base model, or the base with one adapter) that answers conversations."""

    model: Any
    tokenizer: Any

    @classmethod
    def load(cls, model_dir: Path, adapter: Path | None = None) -> Sampler:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        tokenizer.padding_side = "left"
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter)
        return cls(model.eval(), tokenizer)

    def answer(self, conversations: list[list[dict[str, Any]]], tools: list[Any], seed: int) -> list[str]:
        """One sampled answer per conversation (raw text: a tool call stays in its markup)."""
        import torch

        texts = [self.tokenizer.apply_chat_template(messages, tools=tool, add_generation_prompt=True, tokenize=False)
                 for messages, tool in zip(conversations, tools, strict=True)]
        batch = self.tokenizer(texts, add_special_tokens=False, return_tensors="pt", padding=True)
        torch.manual_seed(seed)
        end = self.tokenizer.convert_tokens_to_ids(END)
        with torch.no_grad():
            out = self.model.generate(**batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                      max_new_tokens=MAX_NEW_TOKENS, eos_token_id=end,
                                      pad_token_id=self.tokenizer.pad_token_id)
        width = batch["input_ids"].shape[1]
        return [self.tokenizer.decode(row[width:], skip_special_tokens=False).split(END)[0] for row in out]


def tool_call(text: str) -> dict[str, Any] | None:
    """The tool call in a raw answer, or None.

    >>> tool_call('<|tool_call|>{"id": "c", "name": "calculator", "arguments": {"a": 1}}<|/tool_call|>')
    {'id': 'c', 'name': 'calculator', 'arguments': {'a': 1}}
    """
    if not text.startswith(TOOL_CALL_OPEN) or TOOL_CALL_CLOSE not in text:
        return None
    try:
        call = json.loads(text[len(TOOL_CALL_OPEN): text.index(TOOL_CALL_CLOSE)])
    except ValueError:
        return None
    return call if isinstance(call, dict) and isinstance(call.get("arguments"), dict) else None


def run_tool(call: dict[str, Any]) -> str:
    """What the calculator says to a call (an error for a call it cannot run)."""
    if call.get("name") != "calculator":
        return json.dumps({"ok": False, "error": f"NameError: no tool named {call.get('name')!r}"})
    arguments = call.get("arguments")
    if not isinstance(arguments, dict) or set(arguments) - {"a", "op", "b"}:
        return json.dumps({"ok": False, "error": f"TypeError: the calculator takes a, op and b, not {arguments!r}"})
    return calculator(**arguments)


def satisfaction(sampler: Sampler, people: tuple[tasks.Person, ...], *, per_person: int, seed: int) -> dict[str, float]:
    """Each person's share of satisfying first answers to held-out requests."""
    rng = random.Random(seed)
    requests = [(person, tasks.ask(rng, person.topic, held_out=True)) for person in people for _ in range(per_person)]
    conversations = [[{"role": "user", "content": request.text}] for _, request in requests]
    tools = [request.tools for _, request in requests]
    first = sampler.answer(conversations, tools, seed)
    finals = list(first)
    used = [False] * len(requests)
    tool_rounds = [n for n, text in enumerate(first) if tool_call(text) is not None]
    if tool_rounds:
        follow: list[list[dict[str, Any]]] = []
        for n in tool_rounds:
            call = tool_call(first[n])
            assert call is not None
            call_id = str(call.get("id") or "call_1")
            arguments = json.dumps(call["arguments"])
            follow.append([*conversations[n],
                           {"role": "assistant", "content": "", "tool_calls": [{"id": call_id, "type": "function",
                            "function": {"name": str(call.get("name")), "arguments": arguments}}]},
                           {"role": "tool", "tool_call_id": call_id, "content": run_tool(call)}])
        for n, text in zip(tool_rounds, sampler.answer(follow, [tools[n] for n in tool_rounds], seed + 1), strict=True):
            finals[n], used[n] = text, True
    met: dict[str, list[bool]] = {person.name: [] for person in people}
    for (person, request), text, tool_used in zip(requests, finals, used, strict=True):
        if request.kind == "sum":
            outcome = tasks.judge_sum(request, text, tool_used, person.preference)
        else:
            outcome = tasks.judge_list(request, text, person.preference)
        met[person.name].append(outcome.satisfied)
    return {name: sum(values) / len(values) for name, values in met.items()}


def distinct_2(answers: list[str]) -> float:
    """Distinct word pairs over all word pairs in the answers.

    >>> distinct_2(["a b c", "a b d"])
    0.75
    """
    pairs = [tuple(words[i: i + 2]) for words in (re.findall(r"\w+", a.lower()) for a in answers)
             for i in range(len(words) - 1)]
    return len(set(pairs)) / len(pairs) if pairs else 0.0


def diversity(sampler: Sampler, *, samples: int, seed: int) -> float:
    """distinct-2 of answers to requests about categories nobody in the demo asks about."""
    rng = random.Random(seed)
    requests = [tasks.ask(rng, rng.choice(tasks.UNRELATED), held_out=rng.random() < 0.5) for _ in range(samples)]
    answers = sampler.answer([[{"role": "user", "content": r.text}] for r in requests], [None] * samples, seed)
    return distinct_2(answers)
