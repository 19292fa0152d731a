"""What the signals say, from the store (``nextturn signals status``): the figures an operator watches.

- resolved turns, revisions, abstentions, hints, dead letters, cases still open, signals not yet published;
- rewards by the source that decided them (explicit, tool, judge, rules);
- per adapter version: how many signals, their mean reward, the share of rewards the judge decided, and the
  share where the judge was the only evidence at all. A rising judge share means the loop is grading
  itself: the guard against self-deception;
- the judge's agreement with external evidence (explicit ratings and tool outcomes) on turns that have
  both: how often they point the same way. A falling agreement means the judge is saturated or gamed;
- lag: seconds from a turn's end to its first signal (median and p99).

Only the latest revision of each signal counts, for one extractor version (the current one by default).
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select

from nextturn import tables
from nextturn.events import Verdict
from nextturn.store import Store
from signals.cases import EXTRACTOR_VERSION
from signals.composition import DECISIVE, PRECEDENCE

_SIGNALS = tables.table_of(tables.Signal)
_TURNS = tables.table_of(tables.Turn)


def summarize(store: Store, *, since: datetime | None = None, extractor_version: str = EXTRACTOR_VERSION) -> dict[
        str, Any]:
    query = select(_SIGNALS).where(_SIGNALS.c.extractor_version == extractor_version)
    if since is not None:
        query = query.where(_SIGNALS.c.created_at >= since)
    with store.engine.connect() as conn:
        rows = conn.execute(query).all()
        finished: dict[str, Any] = dict(conn.execute(
            select(_TURNS.c.id, _TURNS.c.finished_at).where(_TURNS.c.id.in_({row.turn_id for row in rows}))
        ).all()) if rows else {}
        open_cases = conn.execute(select(func.count()).select_from(tables.SignalCase)
                                  .where(tables.table_of(tables.SignalCase).c.state == "open")).scalar_one()
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
        verdicts = [Verdict.model_validate(v) for v in row.verdicts]
        decided = _decider(verdicts) if row.reward is not None else None
        by_source[decided or "abstained"] += 1
        per_adapter[row.adapter_version].append((row.reward, decided))
        judge = [v.score for v in verdicts if v.source == "judge" and v.score is not None]
        external = [v.score for v in verdicts if v.source in ("explicit", "tool") and v.score is not None]
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
        "hints": sum(1 for row in latest.values() if row.hint),
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
        "open_cases": open_cases,
        "unpublished": sum(1 for row in rows if not row.published),
        "dead_letters": dead_letters,
        "lag_s": {"median": statistics.median(lags) if lags else None,
                  "p99": lags[min(len(lags) - 1, int(0.99 * len(lags)))] if lags else None},
    }


def _decider(verdicts: list[Verdict]) -> str:
    """The source whose verdict became the reward; "judge-only" when no external evidence spoke at all."""
    speaking = {v.source for v in verdicts if v.score is not None}
    if speaking == {"judge"}:
        return "judge-only"
    return next(source for source in PRECEDENCE if source in speaking)


def _mean(values: list[float]) -> float | None:
    return round(statistics.fmean(values), 4) if values else None


def _share(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
