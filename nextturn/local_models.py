"""Small models built here, never downloaded: ``nextturn model init DIR``.

A Llama-architecture causal LM with randomly initialised weights and a byte-level BPE tokenizer trained
on a generated corpus, saved in Hugging Face format (loadable by transformers, peft and vLLM). Everything
is deterministic for a seed: the same seed gives the same files, byte for byte.

The chat template renders every role the gateway sees, tool definitions, and tool calls::

    <|system|>Be brief.<|end|>
    <|tools|>[{"type": "function", ...}]<|end|>
    <|user|>Run the tests.<|end|>
    <|assistant|><|tool_call|>{"id": "call_1", "name": "pytest", "arguments": {}}<|/tool_call|><|end|>
    <|tool|>{"id": "call_1", "content": "2 passed"}<|end|>
    <|assistant|>

A tool call is JSON between ``<|tool_call|>`` and ``<|/tool_call|>``, so that a gateway can parse what
the model generated back into OpenAI ``tool_calls``. ``init_model(tool_format=…)`` builds a model whose
template writes calls as a production model family does instead (``nextturn.tool_formats``: Hermes/Qwen
``<tool_call>``, Llama 3 JSON with an ``ipython`` role for tool results, Mistral ``[TOOL_CALLS]``), with those
markers as special tokens: the gateway's parsing of each format is tested on a model that writes it. torch,
transformers and tokenizers are imported inside the functions: importing this module loads none of them.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from nextturn.errors import NextturnError
from nextturn.tool_formats import FORMATS

END = "<|end|>"
TOOL_CALL_OPEN = "<|tool_call|>"  # the markers of nextturn.tool_formats.NEXTTURN
TOOL_CALL_CLOSE = "<|/tool_call|>"
ROLES = ("system", "developer", "user", "assistant", "tool")
SPECIAL_TOKENS = [END, "<|tools|>", TOOL_CALL_OPEN, TOOL_CALL_CLOSE, "<|pad|>"] + [f"<|{role}|>" for role in ROLES]

_CALLS = '<|tool_call|>{"id": {{ call.id | tojson }}, "name": {{ call.function.name | tojson }}, ' \
         '"arguments": {{ call.function.arguments or "{}" }}}<|/tool_call|>'
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and tools -%}"
    "{%- if message.role == 'system' -%}<|system|>{{ message.content }}<|end|>{%- endif -%}"
    "<|tools|>{{ tools | tojson }}<|end|>"
    "{%- if message.role == 'system' -%}{%- continue -%}{%- endif -%}"
    "{%- endif -%}"
    "<|{{ message.role }}|>"
    "{%- if message.role == 'tool' -%}"
    '{{ {"id": message.tool_call_id, "content": message.content} | tojson }}'
    "{%- else -%}"
    "{%- if message.content is string -%}{{ message.content }}"
    "{%- elif message.content -%}{%- for part in message.content -%}{{ part.text }}{%- endfor -%}"
    "{%- endif -%}"
    "{%- for call in message.tool_calls or [] -%}" + _CALLS + "{%- endfor -%}"
    "{%- endif -%}"
    "<|end|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)
# How each format's template writes an assistant message's calls, and the markers it adds as special tokens.
_FORMAT_CALLS = {
    "hermes": ("{%- for call in message.tool_calls or [] -%}"
               '<tool_call>\n{"name": {{ call.function.name | tojson }}, '
               '"arguments": {{ call.function.arguments or "{}" }}}\n</tool_call>'
               "{%- endfor -%}", ["<tool_call>", "</tool_call>"]),
    "llama3": ("{%- for call in message.tool_calls or [] -%}{{ '; ' if not loop.first else '' }}"
               '{"name": {{ call.function.name | tojson }}, "parameters": {{ call.function.arguments or "{}" }}}'
               "{%- endfor -%}", ["<|python_tag|>", "<|ipython|>"]),
    "mistral": ("{%- if message.tool_calls -%}[TOOL_CALLS]["
                "{%- for call in message.tool_calls -%}{{ ', ' if not loop.first else '' }}"
                '{"name": {{ call.function.name | tojson }}, "arguments": {{ call.function.arguments or "{}" }}, '
                '"id": {{ call.id | tojson }}}'
                "{%- endfor -%}]{%- endif -%}", ["[TOOL_CALLS]"]),
}


def chat_template(tool_format: str = "nextturn") -> tuple[str, list[str]]:
    """The chat template of a local model whose calls are in ``tool_format``, and its special tokens."""
    if tool_format == "nextturn":
        return CHAT_TEMPLATE, SPECIAL_TOKENS
    if tool_format not in _FORMAT_CALLS:
        raise NextturnError(f"unknown tool-call format {tool_format!r}; choose one of {', '.join(FORMATS)}")
    calls, markers = _FORMAT_CALLS[tool_format]
    template = CHAT_TEMPLATE.replace("{%- for call in message.tool_calls or [] -%}" + _CALLS + "{%- endfor -%}", calls)
    if tool_format == "llama3":  # Llama 3 names the tool results' role ipython
        template = template.replace("<|{{ message.role }}|>",
                                    "<|{{ 'ipython' if message.role == 'tool' else message.role }}|>")
    return template, [t for t in SPECIAL_TOKENS if t not in (TOOL_CALL_OPEN, TOOL_CALL_CLOSE)] + markers


@dataclass(frozen=True)
class Size:
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    context: int


SIZES = {
    # Tests: loads and generates in milliseconds.
    "tiny": Size(vocab=512, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, context=1024),
    # The demo and benchmarks: a few million parameters, still fast on two CPU cores.
    "small": Size(vocab=2048, hidden=256, layers=4, heads=8, kv_heads=4, intermediate=688, context=2048),
    # Benchmarks of the trainer at a realistic width: about 100 M parameters.
    "100m": Size(vocab=2048, hidden=768, layers=14, heads=12, kv_heads=4, intermediate=2304, context=2048),
}

_WORDS = (
    "the a an and or but if then else when while for to of in on at by with from as is are was were be "
    "been it this that these those you your we our they their he she his her i me my not no yes please "
    "thanks thank sure okay ok one two three four five six seven eight nine ten first second last next "
    "answer question word words name list short long brief detail explain summary example code test tests "
    "file files error errors fail failed pass passed run running check fix bug line lines function value "
    "result results tool tools call calls use used make made give show tell say said ask asked should "
    "could would can will do does did done have has had more less very much many few some any all each "
    "flower lotus rose tulip color red blue green yellow time day week today format json text number "
    "python shell command output input user assistant system again instead actually mean meant wrong right"
).split()


def _corpus(seed: int, lines: int = 4000) -> list[str]:
    """Text for the tokenizer: words, sentences, numbers, JSON and the chat markup, all generated."""
    rng = random.Random(seed)
    corpus = []
    for n in range(lines):
        sentence = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 14)))
        kind = n % 4
        if kind == 0:
            corpus.append(sentence.capitalize() + rng.choice(".?!"))
        elif kind == 1:
            corpus.append(json.dumps({rng.choice(_WORDS): rng.randint(0, 999), "text": sentence}))
        elif kind == 2:
            corpus.append(f"<|user|>{sentence}?<|end|><|assistant|>{sentence.capitalize()}.<|end|>")
        else:
            corpus.append(f"{rng.randint(0, 10**6)} {sentence} ({rng.random():.3f})\n\t- {sentence.upper()}")
    return corpus


def init_model(directory: Path, *, size: str = "tiny", seed: int = 0, tool_format: str = "nextturn") -> Path:
    """Build and save a tokenizer and a randomly initialised model; return the directory."""
    if size not in SIZES:
        raise NextturnError(f"unknown model size {size!r}; choose one of {', '.join(SIZES)}")
    if directory.exists() and any(directory.iterdir()):
        raise NextturnError(f"{directory} is not empty; pick a new directory for the model")
    try:
        from transformers.utils import logging as transformers_logging
    except ImportError as exc:
        raise NextturnError("building a model needs the ml extra: pip install 'nextturn[ml]'") from exc
    transformers_logging.disable_progress_bar()
    directory.mkdir(parents=True, exist_ok=True)
    spec = SIZES[size]
    tokenizer = build_tokenizer(spec.vocab, seed, tool_format=tool_format)
    save_tokenizer(tokenizer, directory)
    _build_weights(spec, len(tokenizer), tokenizer, seed).save_pretrained(directory)
    return directory


def build_tokenizer(vocab_size: int, seed: int, corpus: list[str] | None = None, tool_format: str = "nextturn"):
    """A byte-level BPE tokenizer (a PreTrainedTokenizerFast) trained on ``corpus``, by default a generated one,
    with the chat template that writes tool calls in ``tool_format``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    template, special_tokens = chat_template(tool_format)
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: any text can be encoded
        show_progress=False,
    )
    core.train_from_iterator(corpus if corpus is not None else _corpus(seed), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=END,
        pad_token="<|pad|>",
        chat_template=template,
        model_max_length=max(size.context for size in SIZES.values()),
        # A Llama model takes no token_type_ids; transformers 4 would return them, and generate() refuses them.
        model_input_names=["input_ids", "attention_mask"],
    )


def save_tokenizer(tokenizer, directory: Path) -> None:
    """Save a tokenizer that transformers 4 and 5 both load.

    transformers 5 names the class ``TokenizersBackend`` in tokenizer_config.json, which transformers 4
    cannot load; ``PreTrainedTokenizerFast``, the same tokenizer under its older name, is known to both.
    """
    tokenizer.save_pretrained(directory)
    path = Path(directory) / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _build_weights(spec: Size, vocab: int, tokenizer, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=spec.context,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids(END),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|pad|>"),
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)
