"""The demo's world: what simulated people ask, the ways an answer can look, and what each person prefers.

Two kinds of request:

* **lists**: "List three fruits." The answer is that many items of the category (a run of them, in the
  category's order from a random start: "plum, cherry, mango"), in a *layout* (commas,
  a numbered list, bullets, a JSON array) and a *case* (lower or capitals). Unprompted, the base model
  picks a layout and a case at random with :data:`UNPROMPTED` odds: commas 60%, numbered 25%, bullets 15%,
  JSON never; capitals 20%. Told ("Use a numbered list.", inline, as a correction, or as a hint), it obeys.
* **sums**: "What is 23 plus 19?" with a ``calculator`` tool. The right move is a tool call, then an
  answer from the tool's result (or its error: dividing by zero). Unprompted, the base model calls the tool
  half of the time and otherwise guesses a number, which is wrong.

A :class:`Preference` is what a person wants and never says until the answer misses it. Easy ones the base
model already shows now and then (numbered lists 25%, capitals 20%, the calculator 50%): exploration and a
scalar reward can find them. Hard ones it shows rarely or never unprompted: a JSON array (never), or two
constraints at once (capitals *and* numbered, 5%). Only a hint that says what to do can teach those.

Everything here is plain data and pure functions, seeded by the caller's ``random.Random``.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from typing import Literal

Layout = Literal["comma", "numbered", "bullets", "json"]
Case = Literal["lower", "upper"]

CATEGORIES: dict[str, tuple[str, ...]] = {
    "fruits": ("apple", "pear", "plum", "cherry", "mango", "peach", "lemon", "grape", "melon", "kiwi"),
    "animals": ("horse", "tiger", "zebra", "otter", "camel", "sheep", "mouse", "whale", "goat", "wolf"),
    "colors": ("red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "grey", "white"),
    "tools": ("hammer", "saw", "drill", "wrench", "chisel", "pliers", "spanner", "file", "level", "vise"),
    "birds": ("robin", "eagle", "owl", "crow", "swan", "finch", "heron", "duck", "parrot", "hawk"),
    "trees": ("oak", "pine", "birch", "maple", "cedar", "willow", "elm", "ash", "beech", "fir"),
    "drinks": ("tea", "coffee", "juice", "water", "milk", "cocoa", "lemonade", "soda", "cider", "punch"),
    "sports": ("tennis", "golf", "rugby", "hockey", "boxing", "rowing", "cricket", "judo", "skiing", "chess"),
}
COUNTS = {2: "two", 3: "three", 4: "four"}
# The phrasings people use online; the held-out ones are kept for measuring (the base model knows them all).
LIST_ASKS = ("List {n} {c}.", "Name {n} {c}.", "Give me {n} {c}.", "Can you list {n} {c}?", "I need {n} {c}.")
HELD_OUT_LIST_ASKS = ("Tell me {n} {c}.", "Suggest {n} {c}.", "Write down {n} {c}.")
OPERATIONS = {"plus": "+", "minus": "-", "times": "*", "divided by": "/"}
SUM_ASKS = ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "How much is {a} {op} {b}?")
HELD_OUT_SUM_ASKS = ("Calculate {a} {op} {b}.", "Work out {a} {op} {b}.")

UNPROMPTED_LAYOUT: dict[Layout, float] = {"comma": 0.6, "numbered": 0.25, "bullets": 0.15, "json": 0.0}
UNPROMPTED_CAPITALS = 0.2
UNPROMPTED_TOOL_USE = 0.5

CALCULATOR: dict[str, object] = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Compute a op b for integers a and b.",
        "parameters": {"type": "object", "properties": {
            "a": {"type": "integer"}, "op": {"type": "string", "enum": ["+", "-", "*", "/"]}, "b": {"type": "integer"}},
            "required": ["a", "op", "b"]},
    },
}

# How people say what they want. Each is an instruction a chat model follows; each also works as a
# correction after "No, " or "Actually, " (the signals worker reads those as corrections with a hint).
SAY: dict[str, tuple[str, ...]] = {
    "numbered": ("Use a numbered list.", "Please number the items.", "Put them in a numbered list."),
    "bullets": ("Use bullet points.", "Please make it a bulleted list.", "Put a dash before each item."),
    "json": ("Reply with a JSON list.", "Give them as a JSON array.", "Write them as a JSON list."),
    "comma": ("Please separate them with commas.", "Keep them on one line.", "Write them with commas."),
    "upper": ("Write in capital letters.", "Answer in capitals.", "Use upper case."),
    "lower": ("Use lower case.", "Write in small letters.", "Please avoid capitals."),
    "calculator": ("Use the calculator.", "Check it with the calculator.", "Please use the calculator tool."),
}
THANKS = ("Thanks!", "Thank you.", "Perfect, thanks.", "Great, thanks!", "Exactly what I needed, thanks.")
COMPLAINTS = ("Hmm, that's not helpful.", "Not quite.", "That doesn't work for me.", "Ugh, useless.",
              "That's wrong.")
CORRECTION_OPENERS = ("No, {s}", "Actually, {s}", "No. {S}")


@dataclass(frozen=True)
class Style:
    """How a list answer looks."""

    layout: Layout = "comma"
    case: Case = "lower"


@dataclass(frozen=True)
class Request:
    """One thing a person asks: a list of ``count`` items of ``category``, or a sum ``a op b``."""

    kind: Literal["list", "sum"]
    text: str
    category: str = ""
    count: int = 0
    a: int = 0
    op: str = ""
    b: int = 0

    @property
    def tools(self) -> list[dict[str, object]] | None:
        return [CALCULATOR] if self.kind == "sum" else None

    @property
    def arguments(self) -> dict[str, object]:
        """The calculator call that answers a sum."""
        return {"a": self.a, "op": OPERATIONS[self.op], "b": self.b}


@dataclass(frozen=True)
class Preference:
    """What a person wants: a layout, a case, both, or the calculator. ``hard``: the base model shows it
    rarely or never unprompted."""

    layout: Layout | None = None
    case: Case | None = None
    calculator: bool = False

    @property
    def wants(self) -> list[str]:
        return [w for w in (self.layout, self.case, "calculator" if self.calculator else None) if w]

    @property
    def base_rate(self) -> float:
        """How often the base model meets it unprompted (by construction of its training data)."""
        rate = UNPROMPTED_TOOL_USE if self.calculator else 1.0
        if self.layout:
            rate *= UNPROMPTED_LAYOUT[self.layout]
        if self.case:
            rate *= UNPROMPTED_CAPITALS if self.case == "upper" else 1 - UNPROMPTED_CAPITALS
        return rate

    @property
    def hard(self) -> bool:
        return self.base_rate < 0.1

    def describe(self) -> str:
        return " and ".join({"numbered": "numbered lists", "bullets": "bullet points", "json": "JSON arrays",
                             "comma": "commas", "upper": "capitals", "lower": "lower case",
                             "calculator": "the calculator"}[w] for w in self.wants)


@dataclass(frozen=True)
class Person:
    """A simulated user: a tenant of the gateway with one kind of request and a hidden preference.
    ``patience``: how a miss is answered, as odds of (a concrete correction, a vague complaint, asking again)."""

    name: str
    topic: str  # a category, or "sums"
    preference: Preference
    patience: tuple[float, float, float] = (0.6, 0.2, 0.2)
    turns_per_conversation: tuple[int, int] = (1, 3)


PEOPLE = (
    Person("ana", "fruits", Preference(layout="numbered")),
    Person("ben", "animals", Preference(case="upper")),
    Person("eli", "sums", Preference(calculator=True)),
    Person("caro", "colors", Preference(layout="json")),
    Person("dev", "tools", Preference(layout="numbered", case="upper")),
)
# Unrelated prompts, for the diversity measure: categories nobody in PEOPLE asks about.
UNRELATED = tuple(c for c in CATEGORIES if c not in {p.topic for p in PEOPLE})


# -- requests ---------------------------------------------------------------------------------------------

def ask(rng: random.Random, topic: str, *, held_out: bool = False) -> Request:
    """A fresh request about ``topic`` (a category or "sums"), phrased the online way or the held-out way."""
    if topic == "sums":
        op = rng.choice(list(OPERATIONS))
        if op == "times":
            a, b = rng.randint(2, 12), rng.randint(2, 12)
        elif op == "divided by":
            b = 0 if rng.random() < 0.15 else rng.randint(2, 9)
            a = b * rng.randint(2, 12) if b else rng.randint(2, 99)
        else:
            a, b = rng.randint(2, 99), rng.randint(2, 99)
            if op == "minus" and b > a:
                a, b = b, a
        template = rng.choice(HELD_OUT_SUM_ASKS if held_out else SUM_ASKS)
        return Request("sum", template.format(a=a, op=op, b=b), a=a, op=op, b=b)
    count = rng.choice(list(COUNTS))
    template = rng.choice(HELD_OUT_LIST_ASKS if held_out else LIST_ASKS)
    return Request("list", template.format(n=COUNTS[count], c=topic), category=topic, count=count)


def rephrase(rng: random.Random, request: Request) -> Request:
    """The same request in other words (a person asking again)."""
    if request.kind == "sum":
        text = rng.choice(SUM_ASKS).format(a=request.a, op=request.op, b=request.b)
    else:
        text = rng.choice(LIST_ASKS).format(n=COUNTS[request.count], c=request.category)
    return Request(request.kind, text, request.category, request.count, request.a, request.op, request.b)


# -- answers ----------------------------------------------------------------------------------------------

def render(items: list[str], style: Style) -> str:
    """A list answer in ``style``.

    >>> render(["apple", "pear"], Style("numbered", "upper"))
    '1. APPLE\\n2. PEAR'
    >>> render(["apple", "pear"], Style("json"))
    '["apple", "pear"]'
    """
    shown = [item.upper() if style.case == "upper" else item for item in items]
    if style.layout == "numbered":
        return "\n".join(f"{n}. {item}" for n, item in enumerate(shown, 1))
    if style.layout == "bullets":
        return "\n".join(f"- {item}" for item in shown)
    if style.layout == "json":
        return json.dumps(shown)
    return ", ".join(shown)


_NUMBERED = re.compile(r"^(\d+)\. (\S+)$")


def read_list(text: str) -> tuple[Style, list[str]] | None:
    """The style and items of a list answer, or None when it is not a well-formed list.

    >>> read_list('1. APPLE\\n2. PEAR')
    (Style(layout='numbered', case='upper'), ['apple', 'pear'])
    >>> read_list('apple, PEAR') is None
    True
    """
    text = text.strip()
    items: list[str]
    layout: Layout
    if text.startswith("["):
        try:
            parsed = json.loads(text)
        except ValueError:
            return None
        if not isinstance(parsed, list) or not all(isinstance(item, str) for item in parsed):
            return None
        items, layout = parsed, "json"
    elif text.startswith("1. "):
        lines = text.split("\n")
        found = [_NUMBERED.match(line) for line in lines]
        if not all(found) or [int(m.group(1)) for m in found if m] != list(range(1, len(lines) + 1)):
            return None
        items, layout = [m.group(2) for m in found if m], "numbered"
    elif text.startswith("- "):
        lines = text.split("\n")
        if not all(line.startswith("- ") and " " not in line[2:] for line in lines):
            return None
        items, layout = [line[2:] for line in lines], "bullets"
    else:
        items, layout = text.split(", "), "comma"
        if not all(item and re.fullmatch(r"[A-Za-z]+", item) for item in items):
            return None
    if not items or not all(item.isalpha() for item in items):
        return None
    if all(item.isupper() for item in items):
        case: Case = "upper"
    elif all(item.islower() for item in items):
        case = "lower"
    else:
        return None
    return Style(layout, case), [item.lower() for item in items]


def run_of(items: tuple[str, ...], start: int, count: int) -> list[str]:
    """``count`` items in the category's order from ``start``, wrapping around: how the base model lists.

    >>> run_of(("a", "b", "c"), 2, 2)
    ['c', 'a']
    """
    return [items[(start + n) % len(items)] for n in range(count)]


def sum_result(request: Request) -> int | None:
    """The true result (None: division by zero)."""
    if request.op == "divided by":
        return None if request.b == 0 else request.a // request.b
    return {"plus": request.a + request.b, "minus": request.a - request.b, "times": request.a * request.b}[request.op]


def sum_answer(request: Request, result: int | None) -> str:
    """The final answer to a sum, from a result (None: the tool said it cannot be done). It opens with a
    word so that the numbers are the same tokens as in the question (" 23", not "23" at the start).

    >>> sum_answer(Request("sum", "", a=7, op="times", b=6), 42)
    'So 7 times 6 is 42.'
    """
    if result is None:
        return f"So {request.a} divided by 0 cannot be computed."
    return f"So {request.a} {request.op} {request.b} is {result}."


# -- judging ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Outcome:
    """What a person thinks of the answer: ``misses`` names what the preference did not get (empty: happy)."""

    satisfied: bool
    misses: tuple[str, ...] = ()


def judge_list(request: Request, answer: str, preference: Preference) -> Outcome:
    """A list answer is right when it is a well-formed list of ``count`` distinct items of the category, in
    the preferred layout and case."""
    read = read_list(answer)
    if read is None:
        return Outcome(False, tuple(preference.wants))
    style, items = read
    valid = len(items) == request.count and len(set(items)) == len(items) and \
        all(item in CATEGORIES[request.category] for item in items)
    misses = tuple(w for w, got in ((preference.layout, style.layout), (preference.case, style.case))
                   if w is not None and w != got)
    if not valid and not misses:
        return Outcome(False, tuple(preference.wants) or ("content",))
    return Outcome(valid and not misses, misses)


def judge_sum(request: Request, answer: str, used_tool: bool, preference: Preference) -> Outcome:
    """A sum is right when the answer says the true result (or that it cannot be computed)."""
    right = sum_answer(request, sum_result(request)).removeprefix("So ").rstrip(".")
    correct = right in answer
    if preference.calculator and not used_tool:
        return Outcome(False, ("calculator",))
    return Outcome(correct, () if correct else ("calculator",))


# -- how people talk --------------------------------------------------------------------------------------

def instruction(rng: random.Random, wants: list[str]) -> str:
    """One sentence per wanted thing, e.g. "Use a numbered list. Answer in capitals." """
    return " ".join(rng.choice(SAY[want]) for want in wants)


def correction(rng: random.Random, misses: tuple[str, ...]) -> str:
    """A concrete correction naming what was missed, e.g. "No, use a numbered list."

    >>> correction(random.Random(1), ("json",))
    'No. Reply with a JSON list.'
    """
    said = instruction(rng, list(misses))
    opener = rng.choice(CORRECTION_OPENERS)
    return opener.format(s=said[0].lower() + said[1:], S=said)


def thanks(rng: random.Random) -> str:
    return rng.choice(THANKS)


def complaint(rng: random.Random) -> str:
    return rng.choice(COMPLAINTS)
