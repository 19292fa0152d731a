"""Recording under faults and load: the event log goes away and comes back; many conversations at once."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from gateway.app import create_app
from nextturn import events
from nextturn.settings import Settings

from support.event_logs import open_log
from support.eventually import eventually
from support.services import Tansu, Uvicorn
from support.upstream import MODEL


def turns_in(backend: str, where: str, count: int, timeout_s: float = 60) -> list[events.TurnRecorded]:
    """The first ``count`` turns on the log, in log order (waits for them)."""
    log = open_log(backend, where)
    reader = log.consumer(None, [events.TURNS], start="beginning")
    found: list[events.TurnRecorded] = []

    def enough() -> bool:
        found.extend(d.event for d in reader.poll(timeout_s=0.2) if isinstance(d.event, events.TurnRecorded))
        return len(found) >= count

    try:
        eventually(enough, f"{count} turns on the log", timeout_s=timeout_s, interval_s=0)
        # a little longer: a duplicate would show up now
        found += [d.event for d in reader.poll(timeout_s=1.0) if isinstance(d.event, events.TurnRecorded)]
        return found
    finally:
        reader.close()
        log.close()


@pytest.mark.kafka
def test_turns_served_while_the_broker_is_down_arrive_once_and_in_order(
    upstream: Uvicorn, tansu: Tansu, tmp_path: Path
) -> None:
    settings = Settings(data_dir=tmp_path, bus="kafka", kafka_bootstrap_servers=tansu.bootstrap_servers,
                        engine="openai", upstream_url=f"{upstream.url}/v1", model=MODEL)
    server = Uvicorn(create_app(settings))
    server.start()
    try:
        tansu.stop()
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0) as client:
            served = [client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"while down {n}"}],
                extra_headers={"X-Session-Id": "one-session"}).id for n in range(20)]  # one key: one partition
        tansu.start()  # an empty broker: whatever is on it now came from the spool
        found = turns_in("kafka", tansu.bootstrap_servers, len(served))
    finally:
        server.stop()
    assert [turn.turn_id for turn in found] == served


def test_concurrent_conversations_never_link_to_each_other(upstream: Uvicorn, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, engine="openai", upstream_url=f"{upstream.url}/v1", model=MODEL)
    server = Uvicorn(create_app(settings))
    server.start()

    def converse(client: openai.OpenAI, n: int) -> list[str]:
        messages: list[dict] = [{"role": "user", "content": f"conversation {n} starts"}]
        ids = []
        for step in range(4):
            completion = client.chat.completions.create(model=MODEL, messages=messages)
            ids.append(completion.id)
            messages += [{"role": "assistant", "content": completion.choices[0].message.content},
                         {"role": "user", "content": f"conversation {n}, reply {step}"}]
        return ids

    try:
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0) as client, \
                ThreadPoolExecutor(8) as pool:
            conversations = list(pool.map(lambda n: converse(client, n), range(24)))
            # The same turn continued twice at once (a retry, a regenerate): both link to it, in its session.
            forks = list(pool.map(lambda _: client.chat.completions.create(model=MODEL, messages=[
                {"role": "user", "content": "conversation 0 starts"},
                {"role": "assistant", "content": "echo: conversation 0 starts"},
                {"role": "user", "content": "conversation 0, reply 0"}]).id, range(4)))
        turns = {turn.turn_id: turn for turn in turns_in("sqlite", str(tmp_path / "events.db"), 24 * 4 + 4)}
    finally:
        server.stop()
    sessions = set()
    for ids in conversations:
        assert [turns[turn_id].parent_turn_id for turn_id in ids] == [None, *ids[:-1]]
        assert len({turns[turn_id].session_id for turn_id in ids}) == 1
        sessions.add(turns[ids[0]].session_id)
    assert len(sessions) == 24
    assert {(turns[f].parent_turn_id, turns[f].session_id) for f in forks} == {
        (conversations[0][0], turns[conversations[0][0]].session_id)}
