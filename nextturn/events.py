"""Event contracts: the only wire format between gateway, signals, trainer and rollout controller.

Every event has a unique ``event_id``, a ``type`` that names it, and a ``schema_version``. A change to an
event's fields bumps its version; a reader reads every version up to its own (a new field has a default that
says what an older event meant) and rejects later ones with a clear error instead of guessing (the event log
dead-letters such records, so they can be replayed after an upgrade: upgrade readers before writers).

Messages and tool calls mirror the OpenAI chat wire format. We do not reuse the ``openai`` SDK's request
types here: they are TypedDicts with ``Iterable`` fields, which pydantic validates lazily into one-shot
iterators, so they do not round-trip through JSON.
"""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from nextturn.errors import MalformedEvent, UnknownEventType, UnsupportedSchemaVersion

TURNS = "turns"
FEEDBACK = "feedback"
SIGNALS = "signals"
ADAPTERS = "adapters"
DEPLOYMENTS = "deployments"
DEAD_LETTERS = "dead-letters"
TOPICS: tuple[str, ...] = (TURNS, FEEDBACK, SIGNALS, ADAPTERS, DEPLOYMENTS, DEAD_LETTERS)

DEFAULT_SCOPE = "default"
BASE_VERSION = "base"
# Pieces of feedback a turn's signal is built from; the gateway refuses more (a flood would make every
# revision of the signal hold all of it).
MAX_FEEDBACK_PER_TURN = 64
# A failed turn's error when the client went away: the client's doing, not a fault of the version that served it.
CLIENT_LEFT = "the client left before the stream ended"
Cause = Literal["client", "server"]

Unit = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Reward = Annotated[float, Field(ge=-1.0, le=1.0, allow_inf_nan=False)]
# Where a signal's hint came from: the user's own words (a correction, a comment), what failed tool calls
# reported, or the judge. Only the user's words say what the user wants of later answers (standing hints).
HintSource = Literal["user", "tools", "judge"]
# A sampled token has non-zero probability, so its logprob is finite; JSON could not carry -inf anyway.
Logprob = Annotated[float, Field(allow_inf_nan=False)]


def adapter_name(scope: str, version: int) -> str:
    """The name a published version is served under (a model id). It names the version, so a new version is
    loaded under a new name and never in place of a running one.

    >>> adapter_name("default", 7)
    'default-v7'
    """
    return f"{scope}-v{version}"


def served_version(name: str) -> tuple[str | None, int] | None:
    """The (scope, version) an ``adapter_version`` names: ``(None, 0)`` for the base model, None for a name
    that :func:`adapter_name` did not make (an adapter an operator loaded by hand).

    >>> served_version("default-v7"), served_version("base"), served_version("my-lora")
    (('default', 7), (None, 0), None)
    """
    if name == BASE_VERSION:
        return None, 0
    scope, sep, number = name.rpartition("-v")
    if not sep or not scope or not number.isdigit():
        return None
    return scope, int(number)


def new_id() -> str:
    return uuid.uuid4().hex


def utc_now() -> datetime:
    return datetime.now(UTC)


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# --- messages --------------------------------------------------------------------------------------


class ToolCallFunction(_Model):
    name: str
    arguments: str  # JSON text, exactly as the model produced it


class ToolCall(_Model):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(BaseModel):
    """One chat message; unknown fields are kept so that nothing a client sent is lost."""

    model_config = ConfigDict(frozen=True, extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class SamplingParams(_Model):
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: list[str] | None = None
    seed: int | None = None


class ToolOutcome(_Model):
    """What happened when a tool call was executed."""

    name: str
    call_id: str | None = None
    exit_code: int | None = None
    passed: bool | None = None
    output: str | None = None


# The sources of evidence in the order a signal's reward is decided by (signals.composition): the first one
# that speaks decides. A score at least DECISIVE away from 0 takes a side (composition's dissent; the judge's
# agreement with external evidence in nextturn.progress).
PRECEDENCE = ("explicit", "tool", "judge", "rules")
DECISIVE = 0.25


class Verdict(_Model):
    """One evaluator's say on a turn: the provenance of a signal."""

    evaluator: str  # e.g. "rating", "tool", "rules", "judge"
    # Where the evidence came from. Everything but "judge" comes from outside the model being trained.
    source: Literal["explicit", "tool", "rules", "judge"]
    score: Reward | None  # None: abstained
    confidence: Unit
    votes: list[Reward | None] = []
    detail: str | None = None


# --- events ----------------------------------------------------------------------------------------


class _Event(_Model):
    TOPIC: ClassVar[str]

    event_id: str = Field(default_factory=new_id, min_length=1)
    schema_version: Literal[1] = 1
    occurred_at: datetime = Field(default_factory=utc_now)

    @property
    def partition_key(self) -> str:
        """Events with the same key are delivered in order (one partition)."""
        raise NotImplementedError

    @property
    def record_keys(self) -> tuple[str, ...]:
        """The keys the event is written under: one record per key, the same event (and id) in each."""
        return (self.partition_key,)

    def encode(self) -> bytes:
        return self.model_dump_json().encode()


class TurnRecorded(_Event):
    """One model turn as served: the exact tokens sampled and their behaviour logprobs."""

    TOPIC: ClassVar[str] = TURNS

    type: Literal["turn.recorded"] = "turn.recorded"
    tenant: str
    scope: str = DEFAULT_SCOPE
    session_id: str
    turn_id: str  # = the completion id the client saw
    parent_turn_id: str | None = None
    model: str
    adapter_version: str = BASE_VERSION
    messages: list[ChatMessage]
    tools: list[dict[str, Any]] | None = None  # OpenAI tool definitions, as sent
    params: SamplingParams = SamplingParams()
    response: ChatMessage | None = None  # None when the turn failed before producing a message
    prompt_token_ids: list[int] = []
    response_token_ids: list[int] = []
    response_logprobs: list[Logprob] | None = None  # one per response token; None when the engine gave none
    finish_reason: Literal["stop", "length", "tool_calls", "content_filter", "error"] | None = None
    status: Literal["ok", "failed"] = "ok"
    error: str | None = None
    # Whose doing a failed turn was: "client" (a request the engine refused, e.g. a context too long, or a
    # client that left) is no flaw of the version that served it. None on version 1: see ``failed_by``.
    cause: Cause | None = None
    # The client named the version (a model id) instead of being routed by the deployment: such turns are no
    # evidence for the rollout (a tenant could otherwise steer a canary). Version 1 had no pinned turns on file.
    pinned: bool = False
    # The end user the request named (its `user` field or X-Nextturn-User), as nextturn.scopes.user_id: so that
    # `nextturn users forget` finds every turn of the user whatever NEXTTURN_SCOPE_BY is. None: it named none.
    user: str | None = None
    latency_ms: float = Field(ge=0.0)
    started_at: datetime
    finished_at: datetime

    # reads 1 to 3; 2 added cause and pinned, 3 added user
    schema_version: Literal[1, 2, 3] = 3  # type: ignore[assignment]

    @model_validator(mode="after")
    def _consistent(self) -> TurnRecorded:
        if self.response_logprobs is not None and len(self.response_logprobs) != len(self.response_token_ids):
            raise ValueError(
                f"response_logprobs has {len(self.response_logprobs)} entries for "
                f"{len(self.response_token_ids)} response tokens; they must align one to one"
            )
        if self.status == "failed" and not self.error:
            raise ValueError("a failed turn must say why in `error`")
        if self.cause is not None and self.status != "failed":
            raise ValueError("only a failed turn has a cause")
        return self

    @property
    def failed_by(self) -> Cause | None:
        """Whose doing the failure was (None for a turn that did not fail). A version-1 event names no cause:
        a client that left is the client's doing, anything else the server's."""
        if self.status != "failed":
            return None
        return self.cause or ("client" if self.error == CLIENT_LEFT else "server")

    @property
    def partition_key(self) -> str:
        return self.session_id


class FeedbackReceived(_Event):
    """Feedback a client sent about a turn: a rating, a correction, a tool's outcome, or a comment."""

    TOPIC: ClassVar[str] = FEEDBACK

    type: Literal["feedback.received"] = "feedback.received"
    tenant: str
    session_id: str  # the turn's session: keys feedback onto the same partition as the session's turns
    turn_id: str
    kind: Literal["rating", "correction", "tool_result", "comment"]
    value: Reward | None = None  # rating: -1 (bad) … 1 (good)
    text: str | None = None
    tool: ToolOutcome | None = None
    idempotency_key: str | None = None

    @model_validator(mode="after")
    def _complete(self) -> FeedbackReceived:
        needs = {"rating": self.value is not None, "correction": bool(self.text), "comment": bool(self.text),
                 "tool_result": self.tool is not None}
        field = {"rating": "value", "correction": "text", "comment": "text", "tool_result": "tool"}[self.kind]
        if not needs[self.kind]:
            raise ValueError(f"feedback of kind {self.kind!r} needs `{field}`")
        return self

    @property
    def partition_key(self) -> str:
        return self.session_id


class SignalExtracted(_Event):
    """Training signal for one turn: an evaluative reward, a directive hint, or both."""

    TOPIC: ClassVar[str] = SIGNALS

    type: Literal["signal.extracted"] = "signal.extracted"
    signal_id: str  # stable for (turn, extractor version); later revisions of it supersede earlier ones
    revision: int = Field(default=0, ge=0)
    tenant: str
    scope: str = DEFAULT_SCOPE
    session_id: str
    turn_id: str
    adapter_version: str = BASE_VERSION
    reward: Reward | None = None  # None: abstained, no RL sample
    hint: str | None = None
    hint_source: HintSource | None = None  # None: no hint, or a signal written before sources were recorded
    confidence: Unit
    verdicts: list[Verdict] = []
    extractor_version: str
    evidence: list[str] = []  # event ids this revision was computed from; "idle": the session went quiet
    # Scopes besides `scope` whose trainers learn from it: the shared one, when the tenant opted in to feed
    # it (NEXTTURN_SHARED_LEARNING). Version 1 had none.
    also_trains: list[str] = []

    schema_version: Literal[1, 2] = 2  # type: ignore[assignment]  # reads 1 and 2; 2 added also_trains

    @property
    def partition_key(self) -> str:
        """The scope: all of a scope's signals land in one partition, so one trainer of a group owns it."""
        return self.scope

    @property
    def record_keys(self) -> tuple[str, ...]:
        """One record per scope it trains: the shared scope's trainer finds it in the shared scope's partition."""
        return (self.scope, *(scope for scope in self.also_trains if scope != self.scope))

    def trains(self, scope: str) -> bool:
        """Whether the trainer of ``scope`` learns from this signal."""
        return scope == self.scope or scope in self.also_trains


class AdapterPublished(_Event):
    """A new adapter version directory is complete on disk (written to a temp dir, then renamed)."""

    TOPIC: ClassVar[str] = ADAPTERS

    type: Literal["adapter.published"] = "adapter.published"
    scope: str = DEFAULT_SCOPE
    version: int = Field(ge=1)
    parent_version: int | None = None
    base_model: str
    path: str
    meta: dict[str, Any] = {}

    @property
    def partition_key(self) -> str:
        return self.scope


class DeploymentChanged(_Event):
    """What serves a scope now (the stable version and an optional canary at a weight), what changed it
    (``action`` on ``subject_version``), who (``actor``) and why (``reason``). See :mod:`nextturn.deployments`."""

    TOPIC: ClassVar[str] = DEPLOYMENTS

    type: Literal["deployment.changed"] = "deployment.changed"
    scope: str = DEFAULT_SCOPE
    stable_version: int | None = None  # None: the base model
    canary_version: int | None = None
    canary_weight: Unit = 0.0
    paused: bool = False
    schedule: list[Unit] = []  # the canary's weight steps; it is promoted after the last one
    canary_since: datetime | None = None  # when the canary began: its evidence counts from here
    # Since when the stable version is watched after a promotion on offline evidence (rollout.gates.watch).
    watch_since: datetime | None = None
    action: Literal["set", "canary", "step", "promote", "rollback", "reject", "pause", "resume"] = "set"
    subject_version: int | None = None  # the version the action is about (the canary rolled back, ...)
    reason: str
    actor: str  # "controller" or the operator who acted

    schema_version: Literal[1, 2] = 2  # type: ignore[assignment]  # reads 1 and 2; 2 added watch_since

    @property
    def partition_key(self) -> str:
        return self.scope


class DeadLettered(_Event):
    """A record that could not be read as an event, set aside so that its consumer keeps going."""

    TOPIC: ClassVar[str] = DEAD_LETTERS

    type: Literal["dead.lettered"] = "dead.lettered"
    source_topic: str
    partition: int
    offset: int
    key: str | None
    payload_b64: str
    reason: str

    @property
    def payload(self) -> bytes:
        return base64.b64decode(self.payload_b64)

    @property
    def partition_key(self) -> str:
        return self.key or self.source_topic


Event = Annotated[
    TurnRecorded | FeedbackReceived | SignalExtracted | AdapterPublished | DeploymentChanged | DeadLettered,
    Field(discriminator="type"),
]
EVENT_TYPES: dict[str, type[_Event]] = {
    cls.model_fields["type"].default: cls
    for cls in (TurnRecorded, FeedbackReceived, SignalExtracted, AdapterPublished, DeploymentChanged, DeadLettered)
}
_EVENT = TypeAdapter[Event](Event)


def decode(payload: bytes | str) -> Event:
    """Parse one encoded event, or raise an EventError that says what is wrong with it.

    >>> decode(DeploymentChanged(reason="init", actor="me").encode()).reason
    'init'
    """
    try:
        return _EVENT.validate_json(payload)
    except ValidationError as exc:
        raise _diagnose(payload, exc) from exc


def _diagnose(payload: bytes | str, exc: ValidationError) -> Exception:
    """The fast path failed: say whether the type, the version or the fields are at fault."""
    try:
        head = TypeAdapter(dict[str, Any]).validate_json(payload)
    except ValidationError:
        return MalformedEvent("payload is not a JSON object")
    kind = head.get("type")
    cls = EVENT_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        return UnknownEventType(f"unknown event type {kind!r}; this nextturn reads {sorted(EVENT_TYPES)}")
    version = head.get("schema_version", 1)  # absent means the model default
    known = get_args(cls.model_fields["schema_version"].annotation)
    if version not in known:
        return UnsupportedSchemaVersion(
            f"{kind} schema_version {version!r} is not supported (this nextturn reads "
            f"{', '.join(map(str, known))}); upgrade nextturn to read it"
        )
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"][1:]) or "event"
    return MalformedEvent(f"{kind} is invalid at {where}: {first['msg']} ({exc.error_count()} error(s))")
