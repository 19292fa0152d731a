"""The demo's base model: a small chat model taught here, from generated conversations, to follow
instructions in the demo's world (:mod:`demo.tasks`). Nothing is downloaded.

What it learns (supervised fine-tuning of a randomly initialised ~1M-parameter Llama on :func:`lesson`s):

* to answer list requests and sums, with the unprompted odds of :mod:`demo.tasks` (so the easy
  preferences show up now and then and the hard ones rarely or never);
* to obey an instruction wherever it stands: in the request, in a correction later in the conversation
  (which then holds for the rest of it), or in a ``[Hint about what a good answer does: …]`` note, the form
  :func:`nextturn.conversation.teacher_context` gives the trainer's teacher;
* to redo the same items in the new form after a correction, and to try afresh after a complaint;
* to call the calculator, read its JSON result or error, and answer from it.

The build is deterministic for a seed (same seed, same torch, same thread count: same weights) and cached
under a key of the seed and the code that builds it: :func:`cached_model`.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from demo import tasks
from demo.tasks import CATEGORIES, Request, Style
from nextturn import local_models
from nextturn.local_models import Size

K = TypeVar("K", bound=str)
SIZE = Size(vocab=1536, hidden=128, layers=4, heads=8, kv_heads=8, intermediate=341, context=512)  # ~1M parameters
HINT_OPEN = "\n\n[Hint about what a good answer does: "  # as nextturn.conversation.HINT_PREFIX writes it
NOISE_HINTS = ("Be careful with the details.", "Find the cause and fix it before answering.",
               "The tool call call_1 failed: ZeroDivisionError: division by zero. Find the cause and fix it "
               "before answering.")
STEPS = 2000  # about 12 to 15 minutes on two CPU cores
SUM_SHARE = 4  # sums are 4 of 12 lesson topics: copying operands into a tool call takes the most practice
HINTED = 0.5  # lessons whose last message carries a hint: the teacher must copy operands past one too
ATTRIBUTES = {"layout": ("numbered", "bullets", "json", "comma"), "case": ("upper", "lower")}
LESSON_EXTRA = {"layout": ("json",)}  # JSON, the hardest layout to write, is asked for twice as often
# How a lesson goes on after its first request. A sum conversation more often asks a second and a third sum:
# with earlier calls in view, the operands to copy are the last request's, not the last call's.
EXCHANGES = (1, 1, 2, 2, 3)
MOVES = ("thanks", "thanks", "correct", "correct", "complain", "reask")
SUM_EXCHANGES = (1, 2, 2, 3, 3)
SUM_MOVES = ("thanks", "thanks", "thanks", "thanks", "correct", "complain", "reask")

Message = dict[str, Any]


# -- lessons ----------------------------------------------------------------------------------------------

class _Teacher:
    """Plays the ideal base model through one generated conversation."""

    def __init__(self, rng: random.Random, topic: str) -> None:
        self.rng = rng
        self.topic = topic
        self.rules: dict[str, str] = {}  # what the conversation has asked for so far: layout, case, calculator
        self.calls = 0
        self.messages: list[Message] = []
        self.request: Request | None = None
        self.items: list[str] = []
        self.style = Style()

    def wants(self) -> list[str]:
        """Things to ask for: one or two list attributes, or the calculator."""
        if self.topic == "sums":
            return ["calculator"]
        names = self.rng.sample(list(ATTRIBUTES), self.rng.choice((1, 1, 2)))
        return [self.rng.choice(ATTRIBUTES[name] + LESSON_EXTRA.get(name, ())) for name in names]

    def obey(self, wants: list[str], into: dict[str, str]) -> None:
        for want in wants:
            into["calculator" if want == "calculator" else
                 "layout" if want in ATTRIBUTES["layout"] else "case"] = want

    def user(self, text: str, *, hint: list[str] | None = None) -> None:
        if hint:
            text += HINT_OPEN + " ".join(hint) + "]"
        self.messages.append({"role": "user", "content": text})

    def answer(self, rules: dict[str, str], *, redo: bool) -> None:
        assert self.request is not None
        if self.request.kind == "sum":
            self._sum(rules)
            return
        layout = rules.get("layout") or (self.style.layout if redo else _pick(self.rng, tasks.UNPROMPTED_LAYOUT))
        case = rules.get("case") or (self.style.case if redo else
                                     "upper" if self.rng.random() < tasks.UNPROMPTED_CAPITALS else "lower")
        if not redo:
            self.items = tasks.run_of(CATEGORIES[self.request.category], self.rng.randrange(10), self.request.count)
        self.style = Style(layout, case)  # type: ignore[arg-type]
        self.messages.append({"role": "assistant", "content": tasks.render(self.items, self.style)})

    def _sum(self, rules: dict[str, str]) -> None:
        assert self.request is not None
        result = tasks.sum_result(self.request)
        if rules.get("calculator") or self.rng.random() < tasks.UNPROMPTED_TOOL_USE:
            self.calls += 1
            call_id = f"call_{self.calls}"
            arguments = json.dumps(self.request.arguments)
            self.messages.append({"role": "assistant", "content": "", "tool_calls": [
                {"id": call_id, "type": "function", "function": {"name": "calculator", "arguments": arguments}}]})
            self.messages.append({"role": "tool", "tool_call_id": call_id,
                                  "content": calculator(**self.request.arguments)})
            self.messages.append({"role": "assistant", "content": tasks.sum_answer(self.request, result)})
        else:  # a guess, and a wrong one
            guess = (result or 0) + self.rng.choice((-1, 1)) * self.rng.randint(1, 9)
            self.messages.append({"role": "assistant", "content": tasks.sum_answer(self.request, guess)})


def lesson(rng: random.Random) -> tuple[list[Message], list[dict[str, Any]] | None]:
    """One generated conversation and its tools: what the base model is taught to do."""
    topic = rng.choice([*CATEGORIES, *["sums"] * SUM_SHARE])
    teacher = _Teacher(rng, topic)
    sums = topic == "sums"
    exchanges = rng.choice(SUM_EXCHANGES if sums else EXCHANGES)
    for turn in range(exchanges):
        move = "fresh" if turn == 0 else rng.choice(SUM_MOVES if sums else MOVES)
        redo = move == "correct"
        text = ""
        if move in ("fresh", "thanks"):
            teacher.request = tasks.ask(rng, topic, held_out=rng.random() < 0.3)
            text = teacher.request.text
            if rng.random() < 0.3:  # an instruction with the request
                wants = teacher.wants()
                teacher.obey(wants, teacher.rules)
                said = tasks.instruction(rng, wants)
                text = f"{text} {said}" if rng.random() < 0.7 else f"{said} {text}"
            if move == "thanks":
                text = f"{tasks.thanks(rng)} {text}"
        elif move == "correct":
            wants = teacher.wants()
            teacher.obey(wants, teacher.rules)
            text = tasks.correction(rng, tuple(wants))
        elif move == "complain":
            text = tasks.complaint(rng)
        else:
            assert teacher.request is not None
            teacher.request = tasks.rephrase(rng, teacher.request) if rng.random() < 0.5 else teacher.request
            text = teacher.request.text
        rules = dict(teacher.rules)
        hint: list[str] = []
        if turn == exchanges - 1 and rng.random() < HINTED:  # the last message carries a hint (a teacher prompt)
            for _ in range(rng.choice((1, 1, 2, 3))):
                if rng.random() < 0.15:
                    hint.append(rng.choice(NOISE_HINTS))
                    continue
                wants = teacher.wants()
                teacher.obey(wants, rules)
                said = tasks.correction(rng, tuple(wants))
                hint.append(said.split(", ", 1)[1] if said.startswith(("No, ", "Actually, ")) else
                            said.removeprefix("No. "))
        teacher.user(text, hint=hint)
        teacher.answer(rules, redo=redo)
    return teacher.messages, teacher.request.tools if teacher.request else None


def _pick(rng: random.Random, odds: dict[K, float]) -> K:
    return rng.choices(list(odds), weights=list(odds.values()))[0]


def calculator(a: object = None, op: object = None, b: object = None) -> str:
    """The demo's calculator tool: a JSON result, or a JSON error.

    >>> calculator(7, "*", 6), calculator(3, "/", 0)
    ('{"ok": true, "result": 42}', '{"ok": false, "error": "ZeroDivisionError: division by zero"}')
    >>> print(calculator(3, "^", 2))
    {"ok": false, "error": "ValueError: op must be one of + - * /, not '^'"}
    """
    if not isinstance(a, int) or not isinstance(b, int):
        return json.dumps({"ok": False, "error": f"TypeError: a and b must be integers, not {a!r} and {b!r}"})
    if op not in ("+", "-", "*", "/"):
        return json.dumps({"ok": False, "error": f"ValueError: op must be one of + - * /, not {op!r}"})
    if op == "/" and b == 0:
        return json.dumps({"ok": False, "error": "ZeroDivisionError: division by zero"})
    value = {"+": a + b, "-": a - b, "*": a * b, "/": a // b if b else 0}[op]
    return json.dumps({"ok": True, "result": value})


# -- the build --------------------------------------------------------------------------------------------

def cache_key(seed: int, steps: int) -> str:
    """Changes with the seed, the step count, and the code of this module, the world and the local models'
    builders; not with their comments and docstrings, which do not change the weights."""
    digest = hashlib.sha256(f"{seed}:{steps}".encode())
    for module in (__file__, tasks.__file__, local_models.__file__):
        digest.update(_code(Path(module).read_text()))
    return digest.hexdigest()[:16]


def _code(source: str) -> bytes:
    """A module's syntax tree without its docstrings.

    >>> _code("'Says what.'\\nx = 1  # why") == _code("x = 1")
    True
    """
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree).encode()


def cache_root() -> Path:
    """``$NEXTTURN_CACHE_DIR``, else ``$XDG_CACHE_HOME/nextturn``, else ``~/.cache/nextturn``."""
    configured = os.environ.get("NEXTTURN_CACHE_DIR")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nextturn"


def cached_model(seed: int = 0, *, steps: int = STEPS, progress: Callable[[int, int, float], None] | None = None,
                 root: Path | None = None) -> Path:
    """The base model for ``seed``: built once (written to a temporary directory, then renamed), then reused."""
    target = (root or cache_root()) / f"demo-base-{cache_key(seed, steps)}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        build(work, seed=seed, steps=steps, progress=progress)
        try:
            work.rename(target)
        except OSError:  # another build finished first: theirs is the same model
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def build(directory: Path, *, seed: int = 0, steps: int = STEPS, batch: int = 32, learning_rate: float = 5e-3,
          size: Size = SIZE, progress: Callable[[int, int, float], None] | None = None) -> None:
    """Tokenizer and weights, taught for ``steps`` steps of ``batch`` lessons; ``progress(step, steps, loss)``."""
    import torch
    from transformers.utils import logging as transformers_logging

    from nextturn.local_models import _build_weights, build_tokenizer, save_tokenizer

    transformers_logging.disable_progress_bar()
    rng = random.Random(seed)
    corpus = [_text(*lesson(rng), tokenizer=None) for _ in range(3000)]
    tokenizer = build_tokenizer(size.vocab, seed, corpus=corpus)
    model = _build_weights(size, len(tokenizer), tokenizer, seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps))))
    pad = tokenizer.pad_token_id
    model.train()
    started = time.monotonic()
    batches: list[list[tuple[list[int], list[int]]]] = []
    for step in range(steps):
        if not batches:  # lessons of like length batched together: little padding
            pool = sorted((_tokens(*lesson(rng), tokenizer) for _ in range(8 * batch)), key=lambda row: len(row[0]))
            batches = [pool[n: n + batch] for n in range(0, len(pool), batch)]
            rng.shuffle(batches)
        rows = batches.pop()
        width = max(len(ids) for ids, _ in rows)
        ids = torch.tensor([r + [pad] * (width - len(r)) for r, _ in rows])
        labels = torch.tensor([[t if m else -100 for t, m in zip(r, mask, strict=True)] + [-100] * (width - len(r))
                               for r, mask in rows])
        attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r, _ in rows])
        loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if progress is not None:
            progress(step + 1, steps, float(loss.detach()))
    model.eval()
    save_tokenizer(tokenizer, directory)
    model.save_pretrained(directory)
    (directory / "demo.json").write_text(json.dumps({"seed": seed, "steps": steps, "batch": batch,
                                                     "seconds": round(time.monotonic() - started, 1),
                                                     "final_loss": float(loss.detach())}, indent=1))


def _text(messages: list[Message], tools: list[dict[str, Any]] | None, tokenizer: Any) -> str:
    from jinja2 import Environment

    from nextturn.local_models import CHAT_TEMPLATE

    environment = Environment(extensions=["jinja2.ext.loopcontrols"])
    environment.filters["tojson"] = lambda value: json.dumps(value, ensure_ascii=False)  # as transformers has it
    rendered: str = environment.from_string(CHAT_TEMPLATE).render(messages=messages, tools=tools,
                                                                  add_generation_prompt=False)
    return rendered


def _tokens(messages: list[Message], tools: list[dict[str, Any]] | None, tokenizer: Any) -> tuple[list[int], list[int]]:
    """The conversation's token ids, and a mask of the assistant's tokens (what the loss is taken on)."""
    ids: list[int] = []
    mask: list[int] = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:index], tools=tools, add_generation_prompt=True,
                                               tokenize=False)
        full = tokenizer.apply_chat_template(messages[: index + 1], tools=tools, tokenize=False)
        before = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        through = tokenizer(full, add_special_tokens=False)["input_ids"]
        assert through[: len(before)] == before, "special tokens must split the chat markup"
        mask += [0] * (len(before) - len(ids)) + [1] * (len(through) - len(before))
        ids = through
    return ids, mask
