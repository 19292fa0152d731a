"""How the loop is learning, read from the store: what ``nextturn signals status`` prints, what the gateway
exports as loop metrics, and what the operator's page (``/dashboard``, :mod:`gateway.dashboard`) draws. One
module for all three, so that they never disagree.

:func:`signals`, the figures an operator watches:

- resolved turns, revisions, abstentions, hints, dead letters, cases still open, signals not yet published;
- rewards by the source that decided them (explicit, tool, judge, rules);
- per adapter version: how many signals, their mean reward, the share of rewards the judge decided, and the
  share where the judge was the only evidence at all. A rising judge share means the loop is grading
  itself: the guard against self-deception;
- the judge's agreement with external evidence (explicit ratings and tool outcomes) on turns that have
  both: how often they point the same way. A falling agreement means the judge is saturated or gamed;
- lag: seconds from a turn's end to its first signal (median and p99).

Only the latest revision of each signal counts, for one extractor version (by default the one that wrote
the newest signal: the signals workers' own).

Per scope, for the dashboard: each version's reward over time (:func:`reward_history`), each version's
collapse guards beside the base model's (:func:`guards`), and how far the trainer is behind its signals
(:func:`trainer_lag`).
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, func, or_, select
from sqlalchemy.exc import SQLAlchemyError

from nextturn import events, tables
from nextturn.errors import StoreUnavailable
from nextturn.events import DECISIVE, PRECEDENCE
from nextturn.store import Store

_SIGNALS = tables.table_of(tables.Signal)
_TURNS = tables.table_of(tables.Turn)
_CASES = tables.table_of(tables.SignalCase)
_ADAPTERS = tables.table_of(tables.Adapter)


def newest_extractor(store: Store) -> str | None:
    """The extractor version of the newest signal: what the signals workers write now."""
    with _connected(store) as conn:
        return conn.execute(select(_SIGNALS.c.extractor_version).order_by(_SIGNALS.c.created_at.desc())
                            .limit(1)).scalar_one_or_none()


def signals(store: Store, *, scope: str | None = None, since: datetime | None = None,
            extractor_version: str | None = None) -> dict[str, Any]:
    """The signals' figures (module docstring), of every scope or of ``scope``, since ``since`` or ever."""
    extractor_version = extractor_version or newest_extractor(store) or "none"
    columns = (_SIGNALS.c.signal_id, _SIGNALS.c.revision, _SIGNALS.c.turn_id, _SIGNALS.c.adapter_version,
               _SIGNALS.c.reward, _SIGNALS.c.hint.is_not(None).label("hinted"), _SIGNALS.c.verdicts,
               _SIGNALS.c.published, _SIGNALS.c.created_at)
    query = select(*columns).where(_SIGNALS.c.extractor_version == extractor_version)
    if since is not None:
        query = query.where(_SIGNALS.c.created_at >= since)
    if scope is not None:
        query = query.where(_SIGNALS.c.scope == scope)
    with _connected(store) as conn:
        rows = conn.execute(query).all()
        finished: dict[str, Any] = dict(conn.execute(
            select(_TURNS.c.id, _TURNS.c.finished_at).where(_TURNS.c.id.in_({row.turn_id for row in rows}))
        ).all()) if rows else {}
        dead_letters = conn.execute(select(func.count()).select_from(tables.DeadLetter)).scalar_one()
    latest: dict[str, Any] = {}
    first: dict[str, Any] = {}
    for row in rows:
        if row.signal_id not in latest or row.revision > latest[row.signal_id].revision:
            latest[row.signal_id] = row
        if row.revision == 0:
            first[row.signal_id] = row
    by_source: Counter[str] = Counter()
    per_adapter: dict[str, list[tuple[float | None, str | None]]] = defaultdict(list)
    agree = both = 0
    for row in latest.values():
        # The stored verdicts are events.Verdict dumps, read as they are: validating each costs more than the rest.
        spoke = [(v["source"], v["score"]) for v in row.verdicts if v.get("score") is not None]
        decided = _decider({source for source, _ in spoke}) if row.reward is not None else None
        by_source[decided or "abstained"] += 1
        per_adapter[row.adapter_version].append((row.reward, decided))
        judge = [score for source, score in spoke if source == "judge"]
        external = [score for source, score in spoke if source in ("explicit", "tool")]
        if judge and external and abs(judge[0]) >= DECISIVE and abs(external[0]) >= DECISIVE:
            both += 1
            agree += (judge[0] > 0) == (external[0] > 0)
    lags = sorted(max(0.0, (_utc(row.created_at) - _utc(finished[row.turn_id])).total_seconds())
                  for row in first.values() if row.turn_id in finished)
    return {
        "extractor_version": extractor_version,
        "resolved_turns": len(latest),
        "revisions": len(rows),
        "abstentions": sum(1 for row in latest.values() if row.reward is None),
        "hints": sum(1 for row in latest.values() if row.hinted),
        "rewards_by_source": dict(sorted(by_source.items())),
        "per_adapter": {
            version: {
                "signals": len(items),
                "mean_reward": _mean([reward for reward, _ in items if reward is not None]),
                "judge_share": _share(sum(1 for _, decided in items if decided in ("judge", "judge-only")),
                                      sum(1 for reward, _ in items if reward is not None)),
                "judge_only_share": _share(sum(1 for _, decided in items if decided == "judge-only"),
                                           sum(1 for reward, _ in items if reward is not None)),
            }
            for version, items in sorted(per_adapter.items())
        },
        "judge_agreement": _share(agree, both),
        "judge_agreement_turns": both,
        "open_cases": open_cases(store, scope),
        "unpublished": sum(1 for row in rows if not row.published),
        "dead_letters": dead_letters,
        "lag_s": {"median": statistics.median(lags) if lags else None,
                  "p99": lags[min(len(lags) - 1, int(0.99 * len(lags)))] if lags else None},
    }


def open_cases(store: Store, scope: str | None = None) -> int:
    """Turns the signals workers hold open (waiting for their next state), of every scope or of ``scope``."""
    query = select(func.count()).select_from(_CASES).where(_CASES.c.state == "open")
    if scope is not None:
        query = query.join(_TURNS, _TURNS.c.id == _CASES.c.turn_id).where(_TURNS.c.scope == scope)
    with _connected(store) as conn:
        return int(conn.execute(query).scalar_one())


@dataclass(frozen=True)
class Point:
    start: datetime  # the bucket's start
    mean_reward: float
    turns: int


def reward_history(store: Store, scope: str, *, since: datetime, buckets: int = 24,
                   now: datetime | None = None) -> dict[str, list[Point]]:
    """Per version that served ``scope`` (the base model and ancestors' versions too): the mean reward of its
    turns resolved in each of ``buckets`` equal spans from ``since`` to ``now``, by when the signal came
    (each signal's latest revision). Spans without a resolved turn are left out."""
    now = now or events.utc_now()
    span = max((now - since) / buckets, timedelta(seconds=1))
    latest = (select(_SIGNALS.c.signal_id, func.max(_SIGNALS.c.revision).label("revision"))
              .where(_SIGNALS.c.scope == scope, _SIGNALS.c.created_at >= since)
              .group_by(_SIGNALS.c.signal_id).subquery())
    query = (select(_SIGNALS.c.adapter_version, _SIGNALS.c.created_at, _SIGNALS.c.reward)
             .join(latest, (_SIGNALS.c.signal_id == latest.c.signal_id) & (_SIGNALS.c.revision == latest.c.revision))
             .where(_SIGNALS.c.reward.is_not(None)))
    with _connected(store) as conn:
        rows = conn.execute(query).all()
    sums: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for version, created, reward in rows:
        index = min(buckets - 1, max(0, int((_utc(created) - since) / span)))
        sums[version][index].append(float(reward))
    return {version: [Point(since + index * span, round(statistics.fmean(values), 4), len(values))
                      for index, values in sorted(by_index.items())]
            for version, by_index in sorted(sums.items())}


def first_signal(store: Store, scope: str) -> datetime | None:
    """When the scope's first signal came (None: it has none)."""
    with _connected(store) as conn:
        found = conn.execute(select(func.min(_SIGNALS.c.created_at)).where(_SIGNALS.c.scope == scope)).scalar_one()
    return _utc(found) if found is not None else None


# The collapse guards shown beside the base model's: (name, where the version's figure is, where the base's).
# Diversity and entropy are read on the unrelated probe prompts where the trainer measured them there
# (trainer.guards.probe), as the rollout's gate reads them.
GUARDS = (
    ("entropy", ("probe", "entropy"), ("probe", "base_entropy")),
    ("distinct-1", ("probe", "distinct_1"), ("probe", "base_distinct_1")),
    ("distinct-2", ("probe", "distinct_2"), ("probe", "base_distinct_2")),
    ("length", ("length",), ("base", "length")),
    ("KL to base", ("kl_to_base",), None),
    ("replay reward", ("reward",), ("base", "reward")),
)


def guards(store: Store, scope: str, *, limit: int = 12) -> list[dict[str, Any]]:
    """The scope's newest ``limit`` versions, newest first: status, when published, how many signals trained
    them, and each collapse guard (:data:`GUARDS`) as ``(version's, base model's)``."""
    query = (select(_ADAPTERS.c.version, _ADAPTERS.c.status, _ADAPTERS.c.published_at, _ADAPTERS.c.meta)
             .where(_ADAPTERS.c.scope == scope).order_by(_ADAPTERS.c.version.desc()).limit(limit))
    with _connected(store) as conn:
        rows = conn.execute(query).all()
    found = []
    for version, status, published_at, meta in rows:
        measured = (meta or {}).get("guards") or {}
        found.append({
            "version": events.adapter_name(scope, version), "status": status, "published_at": _utc(published_at),
            "signals": len(((meta or {}).get("data") or {}).get("signals") or []),
            "guards": {name: (_dig(measured, mine), _dig(measured, base) if base else None)
                       for name, mine, base in GUARDS},
        })
    return found


def trainer_lag(store: Store, scope: str, *, now: datetime | None = None) -> dict[str, Any]:
    """How far the scope's trainer is behind: its newest version and when it was published, the trainable
    signals (a reward or a hint) that came after it, and the age of the oldest of them (0 when none wait)."""
    now = now or events.utc_now()
    with _connected(store) as conn:
        newest = conn.execute(select(_ADAPTERS.c.version, _ADAPTERS.c.published_at)
                              .where(_ADAPTERS.c.scope == scope).order_by(_ADAPTERS.c.version.desc())
                              .limit(1)).first()
        after = [_SIGNALS.c.scope == scope, _SIGNALS.c.revision == 0,
                 or_(_SIGNALS.c.reward.is_not(None), _SIGNALS.c.hint.is_not(None))]
        if newest is not None:
            after.append(_SIGNALS.c.created_at > newest.published_at)
        waiting, oldest = conn.execute(select(func.count(), func.min(_SIGNALS.c.created_at)).where(*after)).one()
    return {"newest": events.adapter_name(scope, newest.version) if newest is not None else None,
            "published_at": _utc(newest.published_at) if newest is not None else None,
            "waiting": int(waiting),
            "lag_s": round((now - _utc(oldest)).total_seconds(), 1) if oldest is not None else 0.0}


def trainer_backlog(store: Store, *, now: datetime | None = None) -> dict[str, Any]:
    """:func:`trainer_lag` over every scope in one read: the trainable signals that came after their scope's
    newest version (or of a scope with none yet), and the age of the oldest of them."""
    now = now or events.utc_now()
    newest = (select(_ADAPTERS.c.scope, func.max(_ADAPTERS.c.published_at).label("at"))
              .group_by(_ADAPTERS.c.scope).subquery())
    query = (select(func.count(), func.min(_SIGNALS.c.created_at))
             .select_from(_SIGNALS.outerjoin(newest, newest.c.scope == _SIGNALS.c.scope))
             .where(_SIGNALS.c.revision == 0, or_(_SIGNALS.c.reward.is_not(None), _SIGNALS.c.hint.is_not(None)),
                    or_(newest.c.at.is_(None), _SIGNALS.c.created_at > newest.c.at)))
    with _connected(store) as conn:
        waiting, oldest = conn.execute(query).one()
    return {"waiting": int(waiting), "lag_s": round((now - _utc(oldest)).total_seconds(), 1) if oldest else 0.0}


@contextmanager
def _connected(store: Store) -> Iterator[Connection]:
    try:
        with store.engine.connect() as conn:
            yield conn
    except SQLAlchemyError as exc:
        raise StoreUnavailable(f"cannot read the loop's figures from the store: {exc}") from exc


def _dig(found: dict[str, Any], path: tuple[str, ...]) -> float | None:
    for key in path:
        found = found.get(key) if isinstance(found, dict) else None  # type: ignore[assignment]
    return float(found) if isinstance(found, int | float) and not isinstance(found, bool) else None


def _decider(speaking: set[str]) -> str:
    """The source whose verdict became the reward (of the sources that did not abstain); "judge-only" when no
    external evidence spoke at all."""
    if speaking == {"judge"}:
        return "judge-only"
    return next(source for source in PRECEDENCE if source in speaking)


def _mean(values: list[float]) -> float | None:
    return round(statistics.fmean(values), 4) if values else None


def _share(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
