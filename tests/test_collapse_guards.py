"""Collapse guards: a learnt format is not collapse, saying the same thing to everything is."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from rollout.gates import GatePolicy, collapse
from trainer import guards
from trainer.policy import Policy

LISTS = [["apple", "pear", "plum"], ["oak", "elm", "ash"], ["red", "blue", "green"], ["cod", "eel", "ray"]]
SAID = ["A harbour wakes slowly under grey light.", "Rain forms when cooled vapour condenses.",
        "A good friend listens before answering.", "Soup with bread suits a cold evening."]


def verdict(version: list[str], base: list[str]) -> str | None:
    """The rollout's collapse verdict on a version whose probe answers were ``version`` (the base's ``base``),
    everything else as the base's."""
    figures = {"entropy": 2.0, "distinct_1": 0.5, "distinct_2": 0.8, "length": 20.0}
    probe = {"distinct_1": guards.content_distinct(version, 1), "distinct_2": guards.content_distinct(version, 2),
             "base_distinct_1": guards.content_distinct(base, 1), "base_distinct_2": guards.content_distinct(base, 2)}
    return collapse({**figures, "kl_to_base": 0.1, "base": figures, "prompts": 4, "probe": probe}, GatePolicy())


def test_a_learnt_format_repeats_markup_but_not_content(tiny_model: Path) -> None:
    """Lists written as JSON arrays repeat brackets and quotes: their token distinct-2 (what the guard read
    before) falls below the same lists in plain words; their words (what it reads now) do not, and the
    version passes."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    as_json = ['["' + '", "'.join(words) + '"]' for words in LISTS]
    plain = [", ".join(words) for words in LISTS]
    tokens = [[tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts] for texts in (as_json, plain)]
    assert guards.distinct(tokens[0], 2) < GatePolicy().min_distinct * guards.distinct(tokens[1], 2)
    assert verdict(as_json, plain) is None
    numbered = [" ".join(f"{n}. {word}" for n, word in enumerate(words, 1)) for words in LISTS]  # "1. apple 2. pear"
    assert verdict(numbered, plain) is None  # a list's numbers are markup too


def test_saying_the_same_thing_to_everything_is_rejected_whatever_its_markup() -> None:
    same = ["I cannot say that."] * len(SAID)
    assert verdict(same, SAID) == "distinct_1 on unrelated prompts 0.25 is below 90% of the base model's 0.923"
    assert verdict([f'["{text}"]' for text in same], SAID) is not None


def test_the_trainer_measures_the_probe_beside_the_base_model_and_an_unchanged_version_passes(
    tiny_model: Path
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    replay = guards.Replay([tokenizer(f"question {n}", add_special_tokens=False)["input_ids"] for n in range(4)], [],
                           held_out=False)
    found = guards.measure(Policy.load(tiny_model, rank=4, device="cpu"), replay, max_new_tokens=16)
    probe = found["probe"]
    assert set(probe) == {"distinct_1", "distinct_2", "entropy", "base_distinct_1", "base_distinct_2", "base_entropy"}
    assert probe["distinct_2"] == probe["base_distinct_2"]  # a new adapter changes nothing yet
    assert probe["entropy"] == pytest.approx(probe["base_entropy"]) and probe["entropy"] > 0
    assert collapse(found, GatePolicy()) is None
