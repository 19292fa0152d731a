"""The trainer's ledger: which signals wait, which were trained (or turned away), and what it remembers
between batches (standing hints, the held-out replay turns, counts). It is saved with every checkpoint,
so that after a crash the trainer knows exactly which replayed signals it has already used.

Pure bookkeeping over plain data: no model, no store, no log.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from nextturn.events import SignalExtracted

DONE_LIMIT = 200_000  # signals remembered as done; older ones are far beyond any version lag
REPLAY_LIMIT = 32  # held-out turns kept for the collapse guards


@dataclass
class Ledger:
    step: int = 0  # updates that took optimizer steps
    head: int = 0  # the newest published version of this lineage (0: the base model)
    waiting: dict[str, str] = field(default_factory=dict)  # signal id -> event id of its newest revision
    # signal id -> [revision, reward, hint] of what was trained on, or turned away; insertion order = age
    done: dict[str, list[Any]] = field(default_factory=dict)
    standing: dict[str, list[str]] = field(default_factory=dict)  # tenant -> its latest hints, newest last
    replay: list[str] = field(default_factory=list)  # held-out turn ids, newest last
    counts: dict[str, int] = field(default_factory=dict)
    publish_pending: int | None = None  # a step checkpointed but not yet published as a version
    # [version, head]: the weights were reset to ``version`` (the stable one) when the head was ``head``
    rebased: list[int] | None = None
    init_from: str | None = None  # the lineage began from this version of a parent scope (None: the base)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Ledger:
        known = set(cls.__dataclass_fields__)
        return cls(**{key: value for key, value in data.items() if key in known})  # checkpoints also hold "meta"

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
            if (reward, hint) == (signal.reward, signal.hint):
                self.done[key] = [signal.revision, reward, hint]
                self.count("unchanged_revisions")
                return False
            self.count("revised")
        self.waiting[key] = _event_key(signal)
        return True

    def finish(self, signal_id: str, revision: int, reward: float | None, hint: str | None) -> None:
        """The signal was trained on, or turned away: it waits no more, and its replays are duplicates."""
        self.waiting.pop(signal_id, None)
        self.done.pop(signal_id, None)
        self.done[signal_id] = [revision, reward, hint]
        while len(self.done) > DONE_LIMIT:
            del self.done[next(iter(self.done))]

    def hold_out(self, signal_id: str, revision: int, turn_id: str) -> None:
        self.finish(signal_id, revision, None, None)
        if turn_id not in self.replay:
            self.replay = [*self.replay, turn_id][-REPLAY_LIMIT:]

    def remember_hint(self, tenant: str, hint: str, keep: int) -> None:
        if keep <= 0:
            return
        hints = [h for h in self.standing.get(tenant, []) if h != hint]
        self.standing[tenant] = [*hints, hint][-keep:]


def _event_key(signal: SignalExtracted) -> str:
    """The waiting entry: the revision first (zero-padded, so that strings order like numbers), then the id."""
    return f"{signal.revision:09d}:{signal.event_id}"


def event_id_of(entry: str) -> str:
    return entry.split(":", 1)[1]
