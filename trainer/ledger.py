"""The trainer's ledger: which signals wait, which were trained (or turned away), and what it remembers
between batches (standing hints, the held-out replay turns, counts). It is saved with every checkpoint,
so that after a crash the trainer knows exactly which replayed signals it has already used.

What it keeps of people's words is what an erasure must reach (:meth:`Ledger.forget`): standing hints carry
the session they came from; a signal trained on is remembered by a digest of its hint, not the hint.

Pure bookkeeping over plain data: no model, no store, no log.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any

from nextturn.erasure import Rules
from nextturn.events import SignalExtracted

DONE_LIMIT = 200_000  # signals remembered as done; older ones are far beyond any version lag
REPLAY_LIMIT = 32  # held-out turns kept for the collapse guards


@dataclass
class Ledger:
    step: int = 0  # updates that took optimizer steps
    head: int = 0  # the newest published version of this lineage (0: the base model)
    waiting: dict[str, str] = field(default_factory=dict)  # signal id -> event id of its newest revision
    origins: dict[str, list[str]] = field(default_factory=dict)  # waiting signal id -> [tenant, session id]
    # signal id -> [revision, reward, hint digest] of what was trained on, or turned away; insertion order = age
    done: dict[str, list[Any]] = field(default_factory=dict)
    # tenant -> its latest hints, newest last, each [hint, the session it came from]
    standing: dict[str, list[list[str]]] = field(default_factory=dict)
    replay: list[str] = field(default_factory=list)  # held-out turn ids, newest last
    counts: dict[str, int] = field(default_factory=dict)
    publish_pending: int | None = None  # a step checkpointed but not yet published as a version
    # [version, head]: the weights were reset to ``version`` (the stable one) when the head was ``head``
    rebased: list[int] | None = None
    init_from: str | None = None  # the lineage began from this version of a parent scope (None: the base)
    # The scope's removal (nextturn.erasure, epoch seconds) this lineage began after; None: never removed.
    removed_at: float | None = None
    hints_hashed: bool = True  # done holds hint digests (ledgers saved before held the hints themselves)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Ledger:
        known = set(cls.__dataclass_fields__)
        ledger = cls(**{key: value for key, value in data.items() if key in known})  # checkpoints also hold "meta"
        if "hints_hashed" not in data:  # an older ledger: hints as text, standing hints without their session
            ledger.done = {key: [revision, reward, hint_digest(hint)] for key, (revision, reward, hint)
                           in ledger.done.items()}
            ledger.standing = {tenant: [[hint, ""] if isinstance(hint, str) else hint for hint in hints]
                               for tenant, hints in ledger.standing.items()}
        return ledger

    def lag(self, version: int) -> int:
        """How many versions the trainer's weights have moved on from ``version`` (0: the base model).

        >>> ledger = Ledger(head=10)
        >>> ledger.lag(7)
        3
        >>> ledger.rebased = [5, 10]  # reset to version 5's weights when the head was 10
        >>> ledger.lag(5), ledger.lag(7)
        (0, 3)
        >>> ledger.head = 11
        >>> ledger.lag(5), ledger.parent()
        (1, 11)
        """
        if self.rebased is not None and version == self.rebased[0]:
            return self.head - self.rebased[1]
        return self.head - version

    def parent(self) -> int:
        """The version the trainer's weights come from (0: the base model): the head, or the version it was
        reset to since."""
        if self.rebased is not None and self.head == self.rebased[1]:
            return self.rebased[0]
        return self.head

    def count(self, what: str, n: int = 1) -> None:
        self.counts[what] = self.counts.get(what, 0) + n

    def offer(self, signal: SignalExtracted) -> bool:
        """Take a signal revision to wait for training; False (and counted) for one already seen.

        A later revision replaces a waiting one. A revision of a signal already trained on is taken again
        only when it says something new (another reward or hint: late feedback corrected the label).

        >>> from nextturn.events import SignalExtracted as S
        >>> ledger = Ledger()
        >>> first = S(signal_id="x", revision=0, tenant="a", session_id="s", turn_id="t", reward=1.0,
        ...           confidence=1.0, extractor_version="v")
        >>> ledger.offer(first), ledger.offer(first)
        (True, False)
        >>> ledger.finish("x", 0, 1.0, None); ledger.offer(first.model_copy(update={"revision": 1}))
        False
        >>> ledger.offer(first.model_copy(update={"revision": 2, "reward": -1.0}))
        True
        """
        key = signal.signal_id
        waiting = self.waiting.get(key)
        if waiting is not None and waiting >= _event_key(signal):
            self.count("duplicates")
            return False
        done = self.done.get(key)
        if done is not None and waiting is None:
            revision, reward, hint = done
            if signal.revision <= revision:
                self.count("duplicates")
                return False
            if (reward, hint) == (signal.reward, hint_digest(signal.hint)):
                self.done[key] = [signal.revision, reward, hint]
                self.count("unchanged_revisions")
                return False
            self.count("revised")
        self.waiting[key] = _event_key(signal)
        self.origins[key] = [signal.tenant, signal.session_id]
        return True

    def finish(self, signal_id: str, revision: int, reward: float | None, hint: str | None) -> None:
        """The signal was trained on, or turned away: it waits no more, and its replays are duplicates."""
        self.waiting.pop(signal_id, None)
        self.origins.pop(signal_id, None)
        self.done.pop(signal_id, None)
        self.done[signal_id] = [revision, reward, hint_digest(hint)]
        while len(self.done) > DONE_LIMIT:
            del self.done[next(iter(self.done))]

    def forget(self, rules: Rules) -> int:
        """Drop the waiting signals and the standing hints of what an erasure covers; how many signals.

        >>> from nextturn.events import SignalExtracted as S
        >>> ledger = Ledger()
        >>> ledger.offer(S(signal_id="x", tenant="a", session_id="s1", turn_id="t", reward=1.0, confidence=1.0,
        ...                extractor_version="v"))
        True
        >>> ledger.remember_hint("a", "use bullets", 3, "s1"); ledger.remember_hint("a", "be brief", 3, "s2")
        >>> ledger.forget(Rules(sessions=frozenset({"s1"}))), ledger.waiting, ledger.standing
        (1, {}, {'a': [['be brief', 's2']]})
        """
        gone = [key for key, (tenant, session) in self.origins.items() if rules.covers_session(tenant, session)]
        for key in gone:
            self.waiting.pop(key, None)
            self.origins.pop(key, None)
        for tenant in list(self.standing):
            kept = [entry for entry in self.standing[tenant] if not rules.covers_session(tenant, entry[1])]
            if kept:
                self.standing[tenant] = kept
            else:
                del self.standing[tenant]
        if gone:
            self.count("forgotten", len(gone))
        return len(gone)

    def hold_out(self, signal_id: str, revision: int, turn_id: str) -> None:
        self.finish(signal_id, revision, None, None)
        if turn_id not in self.replay:
            self.replay = [*self.replay, turn_id][-REPLAY_LIMIT:]

    def remember_hint(self, tenant: str, hint: str, keep: int, session_id: str) -> None:
        if keep <= 0:
            return
        hints = [entry for entry in self.standing.get(tenant, []) if entry[0] != hint]
        self.standing[tenant] = [*hints, [hint, session_id]][-keep:]

    def standing_hints(self, tenant: str) -> list[str]:
        """The tenant's standing hints, newest last."""
        return [hint for hint, _ in self.standing.get(tenant, [])]


def hint_digest(hint: str | None) -> str | None:
    """What the ledger keeps of a hint it is done with: enough to tell a changed hint, nothing to read.

    >>> hint_digest("use bullets") == hint_digest("use bullets") != hint_digest("be brief"), hint_digest(None)
    (True, None)
    """
    return None if hint is None else hashlib.sha256(hint.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _event_key(signal: SignalExtracted) -> str:
    """The waiting entry: the revision first (zero-padded, so that strings order like numbers), then the id."""
    return f"{signal.revision:09d}:{signal.event_id}"


def event_id_of(entry: str) -> str:
    return entry.split(":", 1)[1]
