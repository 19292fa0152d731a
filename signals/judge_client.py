"""Asking the judge: m votes per turn from any OpenAI-compatible chat endpoint.

The endpoint may be a separate, stronger model (recommended: a model that judges itself saturates and is
easy to please), a hosted API, or a nextturn gateway. A vote that fails (the endpoint is down, times out,
or answers with an error) counts as unreadable, so a judge that cannot be reached makes turns abstain on
the judge's part; it never stops the worker. The votes of one turn, and the turns of one batch, are asked
concurrently.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx

from nextturn.events import ChatMessage, Verdict
from signals import judge

log = logging.getLogger(__name__)

TEMPERATURE = 0.7  # votes must be able to differ, or m votes are one vote asked m times
MAX_TOKENS = 160  # a verdict line and up to three sentences of hint


@dataclass(frozen=True)
class Question:
    messages: list[ChatMessage]
    response: ChatMessage
    next_state: list[ChatMessage]


class JudgeClient:
    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, votes: int = 3,
                 timeout_s: float = 30.0, concurrency: int = 16) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=base_url.rstrip("/") + "/", headers=headers, timeout=timeout_s)
        self._model = model
        self.votes = votes
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="judge")
        self.failures = 0  # votes that could not be asked

    def judge_many(self, questions: Sequence[Question]) -> list[tuple[Verdict, str | None]]:
        """The judge's verdict and hint for each question, in order."""
        asked = [[self._pool.submit(self._ask, q) for _ in range(self.votes)] for q in questions]
        return [judge.tally([future.result() for future in futures]) for futures in asked]

    def _ask(self, question: Question) -> str:
        body = {"model": self._model, "temperature": TEMPERATURE, "max_tokens": MAX_TOKENS,
                "messages": judge.prompt(question.messages, question.response, question.next_state)}
        try:
            answer = self._http.post("chat/completions", json=body)
            answer.raise_for_status()
            content = answer.json()["choices"][0]["message"]["content"]
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
            self.failures += 1
            log.warning("a judge vote failed (%s: %s); it counts as unreadable", type(exc).__name__, exc)
            return ""
        return content if isinstance(content, str) else ""

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._http.close()
