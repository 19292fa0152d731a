"""Sessions: which earlier turn a request continues, and what happened after it.

With an ``X-Session-Id`` header the client names its session. Without one, the request is linked to the
turn whose messages plus response are the longest prefix of the request's messages (see
:mod:`nextturn.conversation`); the messages after that prefix are the parent turn's next state: the
user's reply, or every tool result of a parallel tool call. A request that continues nothing starts a
new session.

The index is bounded: at most ``capacity`` turns, each forgotten after ``idle_timeout_s`` without use, so
millions of sessions cannot exhaust memory. It is one replica's memory: a request it cannot link is
looked up in the store (``lookup``, by the same hashes, which the recorder stores with each turn), so
that a request served by another replica, or before a restart, links too. So is a request this replica
links only to an earlier turn than its longest prefix could be: a conversation whose turns alternate
between replicas has its latest turn on the other one. Only prefixes that end with an assistant message can
be a turn's key, so a request that continues nothing (its first turn) costs no lookup. The store is a
fallback: when it cannot answer, the request links as this replica's memory says, or starts a new session.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from nextturn.conversation import prefix_hashes, turn_key
from nextturn.erasure import Rules
from nextturn.errors import NextturnError
from nextturn.events import BASE_VERSION, ChatMessage

log = logging.getLogger(__name__)

# (tenant, candidate turn keys, session id or None)
#   -> (turn id, session id, the key that matched, the adapter version that served the turn) or None
Lookup = Callable[[str, list[str], str | None], tuple[str, str, str, str] | None]


@dataclass(frozen=True)
class Link:
    session_id: str
    parent_turn_id: str | None
    next_state: list[ChatMessage]  # of the parent turn; empty when there is no parent
    parent_adapter: str | None = None  # the adapter version that served the parent turn (a session keeps it)


@dataclass
class _Known:
    turn_id: str
    session_id: str
    adapter: str
    last_used: float
    tenant: str


class SessionLinker:
    def __init__(
        self, *, capacity: int = 100_000, idle_timeout_s: float = 3600.0, clock: Callable[[], float] = time.monotonic,
        lookup: Lookup | None = None,
    ) -> None:
        self._lookup = lookup
        self._capacity = capacity
        self._idle_timeout_s = idle_timeout_s
        self._clock = clock
        self._turns: OrderedDict[str, _Known] = OrderedDict()  # turn key -> turn, least recently used first

    def link(self, tenant: str, messages: Sequence[ChatMessage], session_id: str | None = None) -> Link:
        """The session and parent of a new request, from this replica's memory. With a session id, only
        that session's turns link."""
        return self._link(tenant, messages, prefix_hashes(tenant, messages), session_id)[0]

    async def resolve(self, tenant: str, messages: Sequence[ChatMessage], session_id: str | None = None,
                      namespace: str | None = None) -> Link:
        """:meth:`link`, and for a request it cannot link, the store. ``namespace``: what the turns' keys are
        hashed under, when not the tenant alone (:func:`nextturn.scopes.link_namespace`)."""
        hashes = prefix_hashes(namespace or tenant, messages)
        link, matched = self._link(tenant, messages, hashes, session_id)
        if self._lookup is None:
            return link
        ends = {hashes[end - 1]: end for end in range(len(messages) - 1, matched, -1)
                if messages[end - 1].role == "assistant"}
        if not ends:  # nothing longer than what this replica linked could be a turn
            return link
        try:
            found = await asyncio.to_thread(self._lookup, tenant, list(ends), session_id)
        except NextturnError as exc:
            log.warning("cannot look the conversation up in the store; linking by this replica alone: %s", exc)
            return link
        if found is None:
            return link
        turn_id, found_session, key, adapter = found
        return Link(found_session, turn_id, list(messages[ends[key]:]), adapter)

    def _link(self, tenant: str, messages: Sequence[ChatMessage], hashes: list[str],
              session_id: str | None) -> tuple[Link, int]:
        """The link from memory, and how many messages its parent turn covers (0: none)."""
        self._forget_idle()
        # The longest prefix that leaves at least one new message: the most recent turn continued.
        for end in range(len(messages) - 1, 0, -1):
            known = self._turns.get(hashes[end - 1])
            if known is None or (session_id is not None and known.session_id != session_id):
                continue
            known.last_used = self._clock()
            self._turns.move_to_end(hashes[end - 1])
            return Link(known.session_id, known.turn_id, list(messages[end:]), known.adapter), end
        return Link(session_id or f"sess-{uuid.uuid4().hex}", None, []), 0

    def remember(
        self, tenant: str, session_id: str, turn_id: str, messages: Sequence[ChatMessage], response: ChatMessage,
        adapter: str = BASE_VERSION, namespace: str | None = None,
    ) -> None:
        """Make a served turn linkable by the requests that continue it."""
        key = turn_key(namespace or tenant, messages, response)
        self._turns[key] = _Known(turn_id, session_id, adapter, self._clock(), tenant)
        self._turns.move_to_end(key)
        while len(self._turns) > self._capacity:
            self._turns.popitem(last=False)

    def __len__(self) -> int:
        return len(self._turns)

    def forget(self, rules: Rules) -> None:
        """Unlink the turns of forgotten sessions (nextturn.erasure): a request that continues one starts anew."""
        for key in [key for key, known in self._turns.items() if rules.covers_session(known.tenant, known.session_id)]:
            del self._turns[key]

    def _forget_idle(self) -> None:
        horizon = self._clock() - self._idle_timeout_s
        while self._turns:
            oldest = next(iter(self._turns.values()))
            if oldest.last_used >= horizon:
                break
            self._turns.popitem(last=False)
