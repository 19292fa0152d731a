"""Samples: a signal joined with its turn's token data, and the rules for admitting one into training.

A sample is the response the serving policy sampled (its token ids and the logprob of each, as
recorded), the prompt it answered (token ids, as served), the signal's reward and hint, and the teacher's
prompt: the conversation with a hint appended (:func:`nextturn.conversation.teacher_context`), rendered
with the model's chat template. A sample without a hint of its own may be taught with its tenant's
*standing hints*, the latest hints its tenant gave in its own words (a user's preferences persist; what
failed tools reported and the judge's hints are about their own turn), unless its response calls a tool
(:func:`standing_applies`).

Admission (:func:`refusal`): a turn that failed, or that has no recorded logprobs, cannot be trained on;
a turn served by a version more than ``max_lag`` versions behind the trainer's weights is stale (its
importance weights would be mostly cap). Both are counted by the trainer, never dropped silently.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from nextturn import tables
from nextturn.conversation import prompt_token_ids, teacher_context
from nextturn.events import ChatMessage, served_version
from nextturn.scopes import chain


@dataclass(frozen=True)
class Sample:
    signal_event_id: str
    signal_id: str
    revision: int
    turn_id: str
    tenant: str
    adapter_version: str
    prompt_ids: list[int]
    response_ids: list[int]
    behaviour_logprobs: list[float]  # log π_behav of each response token, recorded when it was served
    reward: float | None  # None: no evaluative signal
    hint: str | None  # the signal's own hint
    teacher_hint: str | None  # what the teacher was told: the own hint, else the standing hints, else None
    teacher_prompt_ids: list[int] | None  # the prompt with teacher_hint; None without one
    session_id: str = ""  # the turn's session: an erasure of it drops the sample


def refusal(turn: tables.Turn, *, scope: str, lag: Callable[[int], int], max_lag: int,
            shared: bool = False) -> str | None:
    """Why a turn cannot be trained on now, or None. ``lag``: how far the trainer has moved on from a version
    (:meth:`trainer.ledger.Ledger.lag`).

    A turn served by a version of a scope above this one (a tenant's turn served the shared version while
    the tenant had none of its own), or below it when the signal was ``shared`` with this scope (a tenant
    that feeds the shared lineage: NEXTTURN_SHARED_LEARNING), is not of this lineage, so it has no lag: it
    is trained on as an off-policy sample, and the drift guard takes its reward away when the served answer
    is too far from the trainer's policy (``trainer_max_drift``). A version of any other scope is foreign.

    >>> from datetime import UTC, datetime
    >>> now = datetime.now(UTC)
    >>> turn = tables.Turn(id="t", event_id="e", tenant="a", scope="default", session_id="s", model="m",
    ...     adapter_version="default-v3", messages=[], params={}, prompt_token_ids=[1], response_token_ids=[2],
    ...     response_logprobs=[-0.5], status="ok", latency_ms=1.0, started_at=now, finished_at=now)
    >>> [refusal(turn, scope="default", lag=lambda version: head - version, max_lag=2) for head in (5, 6)]
    [None, 'stale']
    >>> [refusal(turn, scope=scope, lag=lambda version: 9, max_lag=2) for scope in ("t.acme", "t.acme.u.x")]
    [None, None]
    >>> globex = turn.model_copy(update={"adapter_version": "t.globex-v1"})
    >>> [refusal(globex, scope=scope, lag=len, max_lag=2, shared=shared)
    ...  for scope, shared in (("t.acme", False), ("default", False), ("default", True))]
    ['foreign_adapter', 'foreign_adapter', None]
    """
    if turn.status != "ok" or not turn.response_token_ids:
        return "failed"
    if not turn.response_logprobs or len(turn.response_logprobs) != len(turn.response_token_ids):
        return "no_logprobs"
    served = served_version(turn.adapter_version)
    if served is None:
        return "unknown_adapter"  # loaded by hand under a name the trainer did not give: no lineage to place
    served_scope, version = served
    if served_scope is not None and served_scope != scope:
        related = served_scope in chain(scope) or (shared and scope in chain(served_scope))
        return None if related else "foreign_adapter"
    if lag(version) > max_lag:
        return "stale"
    return None


def held_out(turn_id: str, every: int) -> bool:
    """One turn in ``every``, by a hash of its id, is kept out of training for the collapse guards.

    >>> sum(held_out(f"turn-{n}", 16) for n in range(1600)) in range(70, 131), held_out("turn-1", 0)
    (True, False)
    """
    return every > 0 and zlib.crc32(turn_id.encode()) % every == 0


def standing_applies(turn: tables.Turn) -> bool:
    """Whether standing hints may teach this turn: not when its response calls a tool.

    A standing hint was written about another request: it says what the tenant wants of answers (a layout,
    a tone, using a tool). A tool call's arguments are read from this request, and the teacher's prompt
    puts the hint after it: a small teacher shown a note after a sum copies the operands wrongly, and
    distilling that teaches calls that were right to be wrong (docs/experiments.md). The hint's use, calling
    the tool at all, is still taught on answers that did not call it, and a tool call's own hint (a
    correction of this very call) still teaches it.

    >>> from datetime import UTC, datetime
    >>> now = datetime.now(UTC)
    >>> call = {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{}"}}]}
    >>> turns = [tables.Turn(id="t", event_id="e", tenant="a", scope="default", session_id="s", model="m",
    ...     adapter_version="base", messages=[], params={}, prompt_token_ids=[1], response_token_ids=[2],
    ...     status="ok", latency_ms=1.0, started_at=now, finished_at=now, response=response)
    ...     for response in ({"role": "assistant", "content": "Hi."}, call)]
    >>> [standing_applies(turn) for turn in turns]
    [True, False]
    """
    return not (turn.response or {}).get("tool_calls")


def batch_of(ready: Sequence[Sample], size: int, quota: int, minimum: int | None = None) -> list[Sample] | None:
    """The first ``size`` ready samples, in order, with at most ``quota`` from one tenant; None while there
    are not enough (the rest of a tenant over its quota wait for the next batch). ``minimum``: a partial
    batch of at least that many will do (a quiet scope's samples that waited long enough).

    >>> def sample(tenant):
    ...     return Sample("e", "s", 0, "t", tenant, "base", [1], [2], [-0.1], 1.0, None, None, None)
    >>> ready = [sample(tenant) for tenant in "aaaaab"]
    >>> batch_of(ready, 4, 4) == ready[:4], batch_of(ready, 4, 2)
    (True, None)
    >>> [s.tenant for s in batch_of(ready + [sample("c")], 4, 2)]
    ['a', 'a', 'b', 'c']
    >>> len(batch_of(ready[:3], 4, 4, minimum=2)), batch_of(ready[:1], 4, 4, minimum=2)
    (3, None)
    """
    taken: Counter[str] = Counter()
    batch = []
    for sample in ready:
        if taken[sample.tenant] < quota:
            taken[sample.tenant] += 1
            batch.append(sample)
            if len(batch) == size:
                return batch
    return batch if minimum is not None and len(batch) >= minimum else None


def build(signal: tables.Signal, turn: tables.Turn, tokenizer: Any, standing: list[str]) -> Sample:
    """The sample for a signal and its turn; ``standing``: the tenant's standing hints (newest last)."""
    teacher_hint = signal.hint or (" ".join(standing) if standing else None)
    teacher_prompt = None
    if teacher_hint is not None:
        messages = [ChatMessage.model_validate(message) for message in turn.messages]
        teacher_prompt = prompt_token_ids(tokenizer, teacher_context(messages, teacher_hint), turn.tools)
    assert turn.response_logprobs is not None  # refusal() turned away turns without them
    return Sample(
        signal_event_id=signal.id, signal_id=signal.signal_id, revision=signal.revision, turn_id=turn.id,
        tenant=turn.tenant, adapter_version=turn.adapter_version, prompt_ids=list(turn.prompt_token_ids),
        response_ids=list(turn.response_token_ids), behaviour_logprobs=list(turn.response_logprobs),
        reward=signal.reward, hint=signal.hint, teacher_hint=teacher_hint, teacher_prompt_ids=teacher_prompt,
        session_id=turn.session_id,
    )
