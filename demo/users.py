"""Simulated people talking to the gateway through the real ``openai`` SDK, the way people talk to a chat
model. Each is a tenant with its own API key and never sends a session header: the gateway links their
conversations from the messages themselves.

A person asks for something (:func:`demo.tasks.ask`). When the answer is what they want, they
say thanks and ask the next thing in the same conversation, or leave. When it is not, they react as their
``patience`` says: a concrete correction naming what they want ("No, use a numbered list."), a vague
complaint ("Not quite."), or the same request again in other words; after two misses in a row they give
up on the conversation. A sum comes with the calculator tool: when the model calls it, the person's agent
runs it and sends back its JSON result or error, and the model answers from that.

They never tell anyone their preference, never rate, and never touch the trainer: whatever the loop
learns, it learns from the signals worker reading these replies. They pause before each message (about
two seconds, ``think_s``): people do, and without it five simulated people send a few hundred messages in
the time the trainer takes for a few updates, so the curve would measure the trainer's speed, not what it
learns per interaction (docs/experiments.md has the figures).

Every model answer is an *interaction* (a tool call and the answer after it are two). The first answer to
a new request in a conversation with no correction so far is a *fresh answer*: its satisfaction is what
the demo's learning curve plots.
"""

from __future__ import annotations

import json
import random
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import openai

from demo import tasks
from demo.evaluation import run_tool

MAX_MISSES = 2


@dataclass(frozen=True)
class Judged:
    """A fresh answer, judged."""

    person: str
    interaction: int  # interactions so far (all people) when it was judged
    satisfied: bool
    adapter: str  # the version that served it (X-Nextturn-Adapter)
    hard: bool
    at: float  # monotonic


@dataclass
class Budget:
    """Interactions left, shared by every person's thread."""

    total: int
    used: int = 0
    failures: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self) -> int | None:
        """The number of the interaction taken, or None when none is left."""
        with self._lock:
            if self.used >= self.total:
                return None
            self.used += 1
            return self.used

    def untake(self) -> None:
        """An interaction taken but not had (the request was refused)."""
        with self._lock:
            self.used -= 1


@dataclass
class Population:
    """People talking to the gateway at ``url``, each on their own thread, until the budget is spent."""

    url: str
    keys: dict[str, str]  # person -> API key
    people: tuple[tasks.Person, ...]
    seed: int
    budget: Budget
    think_s: float = 2.0  # a person's pause before each message, on average (uniform in [0.5, 1.5] of it)
    on_judged: Callable[[Judged], None] = lambda judged: None
    judged: list[Judged] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self) -> None:
        threads = [threading.Thread(target=self._live, args=(person,), name=f"person-{person.name}", daemon=True)
                   for person in self.people]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def _live(self, person: tasks.Person) -> None:
        rng = random.Random(zlib.crc32(f"{self.seed}:{person.name}".encode()))
        client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.keys[person.name], max_retries=3,
                               timeout=120.0)
        try:
            model = client.models.list().data[0].id
            while self.budget.used < self.budget.total:
                if not self._conversation(person, rng, client, model):
                    break
        except openai.APIError as exc:
            with self._lock:
                self.errors.append(f"{person.name}: {exc}")
        finally:
            client.close()

    def _conversation(self, person: tasks.Person, rng: random.Random, client: openai.OpenAI, model: str) -> bool:
        """One conversation; False when the budget ran out during it."""
        messages: list[dict[str, Any]] = []
        request = tasks.ask(rng, person.topic)
        text: str | None = request.text
        requests_left = rng.randint(*person.turns_per_conversation)
        corrected = False  # a correction in the conversation: later answers are no longer fresh
        misses = 0
        used_tool = False
        while True:
            interaction = self.budget.take()
            if interaction is None:
                return False
            if text is not None:
                time.sleep(self.think_s * rng.uniform(0.5, 1.5))  # reading the answer, typing the next message
                messages.append({"role": "user", "content": text})
            try:
                raw = client.chat.completions.with_raw_response.create(
                    model=model, messages=messages, tools=request.tools or openai.NOT_GIVEN,  # type: ignore[arg-type]
                    seed=rng.randrange(2**31))
            except openai.BadRequestError as exc:
                if exc.code == "context_length_exceeded":
                    self.budget.untake()
                    return True  # the conversation outgrew the small model's context: start a new one
                raise
            adapter = raw.headers.get("x-nextturn-adapter", "?")
            message = raw.parse().choices[0].message
            calls = message.tool_calls or []
            messages.append({"role": "assistant", "content": message.content or "",
                             **({"tool_calls": [call.model_dump() for call in calls]} if calls else {})})
            if calls:  # the agent runs the tools; the model answers from their results (the next interaction)
                for call in calls:
                    function = getattr(call, "function", None)
                    arguments = _json_object(function.arguments if function else "")
                    output = run_tool({"name": function.name if function else "", "arguments": arguments})
                    messages.append({"role": "tool", "tool_call_id": call.id, "content": output})
                used_tool, text = True, None
                continue
            answer = message.content or ""
            if request.kind == "sum":
                outcome = tasks.judge_sum(request, answer, used_tool, person.preference)
            else:
                outcome = tasks.judge_list(request, answer, person.preference)
            if misses == 0 and not corrected:
                self._record(Judged(person.name, interaction, outcome.satisfied, adapter, person.preference.hard,
                                    time.monotonic()))
            if outcome.satisfied:
                requests_left -= 1
                if requests_left == 0:
                    return True  # leaves; the signals worker closes the last turn when the session goes quiet
                request, misses, used_tool = tasks.ask(rng, person.topic), 0, False
                text = f"{tasks.thanks(rng)} {request.text}"
                continue
            misses += 1
            if misses > MAX_MISSES:
                return True  # gives up on this conversation
            reaction = rng.choices(("correct", "complain", "ask again"), weights=person.patience)[0]
            used_tool = False
            if reaction == "correct":
                text, corrected = tasks.correction(rng, outcome.misses or tuple(person.preference.wants)), True
            elif reaction == "complain":
                text = tasks.complaint(rng)
            else:
                request = tasks.rephrase(rng, request)
                text = request.text

    def _record(self, judged: Judged) -> None:
        with self._lock:
            self.judged.append(judged)
        self.on_judged(judged)


def _json_object(text: str) -> dict[str, Any]:
    try:
        parsed = json.loads(text or "{}")
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}
