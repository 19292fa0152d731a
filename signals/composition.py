"""Composition: several evaluators' verdicts on one turn become one reward, or an abstention.

Independent verifiers catch different errors, and they are not equally trustworthy. The rule:

1. Precedence: explicit > tool > judge > rules. The first source (in that order) with a non-abstaining
   verdict is the *primary*; its score is the reward.
2. Dissent: a verdict from another source that points the other way (both scores at least
   ``DECISIVE`` away from 0, opposite signs) lowers the confidence, by half the dissenter's confidence.
3. A primary from inside the model or from rules (judge, rules) is not trusted against dissent: if any
   dissenter is at least ``DOUBT`` confident, the turn abstains. External evidence (explicit, tool) is
   kept, at the lowered confidence.
4. Nothing to say (no verdicts, or all abstain) is an abstention: reward None, no RL sample.

The result does not depend on the order of the verdicts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from nextturn.events import DECISIVE, PRECEDENCE, Verdict

EXTERNAL = frozenset({"explicit", "tool", "rules"})  # evidence from outside the model being trained
DOUBT = 0.5


@dataclass(frozen=True)
class Composite:
    reward: float | None  # None: abstain
    confidence: float
    reason: str


def compose(verdicts: Sequence[Verdict]) -> Composite:
    """One reward from many verdicts (see the module docstring).

    >>> explicit = Verdict(evaluator="rating", source="explicit", score=1.0, confidence=1.0)
    >>> judge = Verdict(evaluator="judge", source="judge", score=-1.0, confidence=0.67)
    >>> compose([judge, explicit])
    Composite(reward=1.0, confidence=0.665, reason='explicit, against judge')
    """
    speaking = _speaking(verdicts)
    if not speaking:
        return Composite(None, 0.0, "no evaluator had anything to say")
    primary = speaking[0]
    assert primary.score is not None
    dissent = [v for v in speaking if v.source != primary.source and _opposed(primary.score, v.score)]
    doubt = max((v.confidence for v in dissent), default=0.0)
    against = ", ".join(sorted({v.source for v in dissent}))
    if dissent and primary.source in ("judge", "rules") and doubt >= DOUBT:
        return Composite(None, 0.0, f"{primary.source} and {against} disagree")
    confidence = round(primary.confidence * (1 - doubt / 2), 4)
    return Composite(primary.score, confidence, f"{primary.source}, against {against}" if dissent else primary.source)


def primary(verdicts: Sequence[Verdict]) -> Verdict | None:
    """The verdict whose score :func:`compose` takes as the reward; None when all abstain."""
    speaking = _speaking(verdicts)
    return speaking[0] if speaking else None


def _speaking(verdicts: Sequence[Verdict]) -> list[Verdict]:
    """The verdicts that did not abstain, the primary first: by precedence, then the more confident."""
    return sorted((v for v in verdicts if v.score is not None),
                  key=lambda v: (PRECEDENCE.index(v.source), -v.confidence, v.score, v.evaluator))


def _opposed(a: float, b: float | None) -> bool:
    return b is not None and abs(a) >= DECISIVE and abs(b) >= DECISIVE and (a > 0) != (b > 0)
