"""Feedback on a turn, and a turn as its tenant may read it back.

Feedback names a turn by id (the completion id). The turn must belong to the caller's tenant; one that
does not is "not found", as one that does not exist, so tenants learn nothing of each other. With an
idempotency key, the event id is derived from (tenant, key): a retried request publishes the same
event, and every consumer keeps it once.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator
from sqlmodel import col, select

from gateway.errors import InvalidRequest, NotFound
from gateway.turns import TurnService
from nextturn import events, tables
from nextturn.store import Store

_IDEMPOTENCY = uuid.UUID("6f1d3c1e-8a52-4be4-9c59-0c0d5f1e7a11")


MAX_FEEDBACK_CHARS = 64 * 1024  # a correction, or a tool's output (a test log): kept whole in the store


class FeedbackRequest(BaseModel):
    turn_id: str = Field(min_length=1, max_length=200)
    kind: Literal["rating", "correction", "tool_result", "comment"]
    value: float | None = Field(default=None, allow_inf_nan=False)
    text: str | None = Field(default=None, max_length=MAX_FEEDBACK_CHARS)
    tool: events.ToolOutcome | None = None
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200)

    @field_validator("tool")
    @classmethod
    def _bounded_output(cls, tool: events.ToolOutcome | None) -> events.ToolOutcome | None:
        if tool is not None and tool.output is not None and len(tool.output) > MAX_FEEDBACK_CHARS:
            raise ValueError(f"a tool's output has at most {MAX_FEEDBACK_CHARS:,} characters; send its end")
        return tool


def owner_session(turns: TurnService, store: Store, tenant: str, turn_id: str) -> str:
    """The session of the caller's turn ``turn_id``, or NotFound."""
    served = turns.served(turn_id)
    if served is None:
        row = store.get(tables.Turn, turn_id)
        served = (row.tenant, row.session_id) if row is not None else None
    if served is None or served[0] != tenant:
        raise NotFound(f"no turn {turn_id!r}", param="turn_id", code="turn_not_found")
    return served[1]


def feedback_event(tenant: str, session_id: str, body: FeedbackRequest, key: str | None) -> events.FeedbackReceived:
    key = key or body.idempotency_key
    identity: dict[str, Any] = {"event_id": uuid.uuid5(_IDEMPOTENCY, f"{tenant}\x00{key}").hex} if key else {}
    try:
        return events.FeedbackReceived(
            tenant=tenant, session_id=session_id, turn_id=body.turn_id, kind=body.kind, value=body.value,
            text=body.text, tool=body.tool, idempotency_key=key, **identity,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise InvalidRequest(f"{where + ': ' if where else ''}{first['msg'].removeprefix('Value error, ')}",
                             param=where or None) from exc


def turn_view(store: Store, tenant: str, turn_id: str) -> dict[str, Any]:
    """A stored turn with its feedback and its signals (the latest revision of each)."""
    row = store.get(tables.Turn, turn_id)
    if row is None or row.tenant != tenant:
        raise NotFound(f"no turn {turn_id!r} (recent turns may take a moment to be stored)", code="turn_not_found")
    with store.session() as db:
        feedback = db.exec(select(tables.Feedback).where(col(tables.Feedback.turn_id) == turn_id)
                           .order_by(col(tables.Feedback.received_at))).all()
        signals = db.exec(select(tables.Signal).where(col(tables.Signal.turn_id) == turn_id)
                          .order_by(col(tables.Signal.revision))).all()
    latest = {signal.signal_id: signal for signal in signals}  # ordered by revision: the last one wins
    return {
        "id": row.id, "object": "turn", "session_id": row.session_id, "parent_turn_id": row.parent_turn_id,
        "adapter_version": row.adapter_version, "status": row.status, "model": row.model,
        "messages": row.messages, "response": row.response, "finish_reason": row.finish_reason,
        "feedback": [{"id": f.id, "kind": f.kind, "value": f.value, "text": f.text, "tool": f.tool}
                     for f in feedback],
        "signals": [{"reward": s.reward, "hint": s.hint, "confidence": s.confidence,
                     "sources": sorted({v["source"] for v in s.verdicts}), "extractor_version": s.extractor_version}
                    for s in latest.values()],
    }
