"""Forgetting a session, a user or a tenant (nextturn.erasure): everything recorded of it goes, from the store,
the event log, the spool and the trainer's memory; what arrives late is dropped; the report names the versions
trained on it. End to end with the openai SDK over real uvicorn, and on both databases."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from sqlalchemy import func, select

from gateway.app import create_app
from nextturn import erasure, events, scopes, tables
from nextturn.bus import EventLog
from nextturn.bus.sqlite import SqliteEventLog
from nextturn.erasure import Places, Rules
from nextturn.errors import CannotForget, NothingToForget
from nextturn.keys import TenantForgotten, create_key
from nextturn.settings import Settings
from nextturn.store import Store
from signals.worker import SignalsWorker

from support.cli import nextturn
from support.event_logs import open_log, recorded
from support.eventually import eventually
from support.factories import feedback, turn
from support.rolling import promote
from support.services import Tansu, Uvicorn

KEYS = "sk-acme:acme,sk-globex:globex"
PERSONAL = (tables.Turn, tables.Feedback, tables.Signal, tables.SignalCase)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("erasure")


@pytest.fixture(scope="module")
def gateway(tiny_model: Path, data_dir: Path) -> Iterator[Uvicorn]:
    settings = Settings(data_dir=data_dir, engine="embedded", model=str(tiny_model), api_keys=KEYS,
                        scope_by="user", rollout_check_interval_s=0.2, admin_key="sk-admin")
    with Uvicorn(create_app(settings)) as server:
        yield server


def chat(gateway: Uvicorn, key: str, messages: list[dict[str, str]], *, user: str | None = None,
         session: str | None = None) -> tuple[str, str, str]:
    """(turn id, the answer, the adapter that served it)."""
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="tiny", messages=messages, max_tokens=4, user=user or openai.NOT_GIVEN,  # type: ignore[arg-type]
            extra_headers={"X-Session-Id": session} if session else None)
    completion = raw.parse()
    return completion.id, completion.choices[0].message.content or "", raw.headers["X-Nextturn-Adapter"]


def rows(store: Store, table: type, session_id: str) -> int:
    column = tables.table_of(table).c.id if table is tables.Session else tables.table_of(table).c.session_id
    with store.engine.connect() as conn:
        return int(conn.execute(select(func.count()).where(column == session_id)).scalar_one())


def on_log(data_dir: Path, session_id: str) -> list[events.Event]:
    """Every event on the SQLite log that belongs to the session."""
    log = SqliteEventLog(data_dir / "events.db")
    reader = log.consumer(None, list(events.TOPICS), start="beginning")
    found: list[events.Event] = []
    while batch := reader.poll(5000, timeout_s=0.3):
        found += [d.event for d in batch if getattr(d.event, "session_id", None) == session_id
                  or (isinstance(d.event, events.DeadLettered) and d.event.key == session_id)]
    reader.close()
    log.close()
    return found


def test_a_forgotten_session_is_gone_from_every_place_and_stays_gone(gateway: Uvicorn, data_dir: Path) -> None:
    settings = Settings(data_dir=data_dir, signals_idle_timeout_s=0.5)
    store = Store(settings.store_url)
    log = SqliteEventLog(settings.event_log_path)
    worker = SignalsWorker(log, store, idle_timeout_s=0.5)
    # Two conversations of acme's (the first linked implicitly), one of globex's.
    question = [{"role": "user", "content": "my card number is 4111"}]
    first, answer, _ = chat(gateway, "sk-acme", question)
    second, _, _ = chat(gateway, "sk-acme", [*question, {"role": "assistant", "content": answer},
                                             {"role": "user", "content": "no, I meant the other one"}])
    kept, _, _ = chat(gateway, "sk-acme", [{"role": "user", "content": "weather?"}], session="keep-me")
    other, _, _ = chat(gateway, "sk-globex", [{"role": "user", "content": "hello"}])
    gone = recorded(data_dir, first).session_id
    assert recorded(data_dir, second).session_id == gone
    with httpx.Client(base_url=gateway.url, headers={"Authorization": "Bearer sk-acme"}) as http:
        http.post("/v1/feedback", json={"turn_id": second, "kind": "correction",
                                        "text": "Call me Ana and never repeat my card"}).raise_for_status()
    eventually(lambda: worker.drain(0.3) >= 0 and rows(store, tables.Signal, gone) >= 2 and
               rows(store, tables.Signal, "keep-me") >= 1, "both sessions' signals", timeout_s=30)
    before_log = on_log(data_dir, gone)
    assert any(isinstance(event, events.FeedbackReceived) for event in before_log)
    # A version of the shared lineage that trained on the forgotten session, and one that did not.
    with store.engine.connect() as conn:
        ids = list(conn.execute(select(tables.table_of(tables.Signal).c.id)
                                .where(tables.table_of(tables.Signal).c.session_id == gone)).scalars())
    store.apply([events.AdapterPublished(version=version, base_model="tiny", path="/nowhere",
                                         meta={"data": {"signals": used}}) for version, used in ((1, ids), (2, []))])

    with httpx.Client(base_url=gateway.url) as http:
        refused = http.delete(f"/v1/sessions/{gone}", headers={"Authorization": "Bearer sk-globex"})
        assert refused.status_code == 404 and refused.json()["error"]["code"] == "session_not_found"
        answered = http.delete(f"/v1/sessions/{gone}", headers={"Authorization": "Bearer sk-acme"})
        assert answered.status_code == 200, answered.text
        body = answered.json()
        assert (body["id"], body["object"], body["deleted"]) == (gone, "session.deleted", True)
        assert [found["version"] for found in body["trained_versions"]] == ["default-v1"]
        assert body["removed"]["turns"] == 2 and body["removed"]["feedback"] == 1 and body["removed"]["log_records"] > 0

        for table in (*PERSONAL, tables.Session):
            assert rows(store, table, gone) == 0, table
            assert rows(store, table, "keep-me") > 0 or table is tables.Feedback, table
        assert on_log(data_dir, gone) == []
        assert store.get(tables.Turn, other) is not None and store.get(tables.Turn, kept) is not None

        # Feedback on a forgotten turn finds nothing; a request that continues the conversation starts anew.
        late = http.post("/v1/feedback", headers={"Authorization": "Bearer sk-acme"},
                         json={"turn_id": first, "kind": "rating", "value": 1})
        assert late.status_code == 404
        again, _, _ = chat(gateway, "sk-acme", [*question, {"role": "assistant", "content": answer},
                                                {"role": "user", "content": "and now?"}])
        assert recorded(data_dir, again).session_id != gone
        assert http.delete(f"/v1/sessions/{gone}", headers={"Authorization": "Bearer sk-acme"}).status_code == 404

    # What was on its way arrives late (a spool replayed, a lagging partition): every reader drops it.
    log.append(before_log)
    marker, _, _ = chat(gateway, "sk-acme", [{"role": "user", "content": "still here"}], session="keep-me")
    eventually(lambda: store.get(tables.Turn, marker), "the gateway's recorder to catch up")
    worker.drain(0.3)
    store.apply(before_log)
    assert worker.counts["forgotten"] >= 1
    for table in (*PERSONAL, tables.Session):
        assert rows(store, table, gone) == 0, table
    worker.close()
    log.close()
    store.close()


def test_a_forgotten_user_loses_their_scope_and_is_served_by_their_tenants_version(
    gateway: Uvicorn, data_dir: Path, tiny_adapters: dict[str, Path]
) -> None:
    settings = Settings(data_dir=data_dir)
    store = Store(settings.store_url)
    ana = scopes.user_scope("acme", "ana")
    promote(store, "t.acme", tiny_adapters["a1"])
    own = settings.adapters_path / ana / "000001"
    shutil.copytree(tiny_adapters["a2"], own)
    promote(store, ana, own)
    eventually(lambda: chat(gateway, "sk-acme", [{"role": "user", "content": "hi"}], user="ana")[2],
               "ana's own version to serve", until=lambda adapter: adapter == f"{ana}-v1", timeout_s=30)
    turn_id, _, _ = chat(gateway, "sk-acme", [{"role": "user", "content": "I am Ana"}], user="ana")
    bens, _, _ = chat(gateway, "sk-acme", [{"role": "user", "content": "I am Ben"}], user="ben")
    session = recorded(data_dir, turn_id).session_id
    eventually(lambda: store.get(tables.Turn, turn_id), "ana's turn in the store")

    done = nextturn("users", "forget", "acme", "ana", "--json", data_dir=data_dir)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["removed_scopes"] == [ana] and report["removed"]["scope_files"] == 1
    assert report["subject"] == scopes.user_id("acme", "ana") and report["sessions"] >= 1
    assert not (settings.adapters_path / ana).exists()
    assert store.get(tables.Deployment, ana) is None and store.get(tables.Adapter, (ana, 1)) is None
    assert rows(store, tables.Turn, session) == 0 and store.get(tables.Turn, bens) is not None
    # Her requests fall back to her tenant's version; what she sends now is hers again, and kept.
    eventually(lambda: chat(gateway, "sk-acme", [{"role": "user", "content": "back"}], user="ana")[2],
               "ana's requests to fall back to acme's version", until=lambda adapter: adapter == "t.acme-v1",
               timeout_s=30)
    new, _, _ = chat(gateway, "sk-acme", [{"role": "user", "content": "a new start"}], user="ana")
    eventually(lambda: store.get(tables.Turn, new), "a turn of hers made after the erasure to be kept")
    store.close()


def test_a_forgotten_tenant_loses_its_keys_and_its_name(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    done = nextturn("keys", "create", "--tenant", "initech", data_dir=tmp_path)
    assert done.returncode == 0, done.stderr
    store = Store(settings.store_url)
    mine = turn("initech-1", tenant="initech")
    store.apply([mine, feedback(mine, value=1.0)])
    refused = nextturn("tenants", "forget", "default", "--yes", data_dir=tmp_path)
    assert refused.returncode != 0 and "gateway without keys" in refused.stderr
    done = nextturn("tenants", "forget", "initech", "--yes", data_dir=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "forgot tenant initech" in done.stdout and "api keys 1" in done.stdout
    assert store.count(tables.ApiKey) == 0 and store.get(tables.Tenant, "initech") is None
    assert rows(store, tables.Turn, "initech-1") == 0 and rows(store, tables.Feedback, "initech-1") == 0
    with pytest.raises(TenantForgotten, match="choose another name"):
        create_key(store, "initech")
    store.apply([turn("initech-2", tenant="initech")])  # a key left in NEXTTURN_API_KEYS: nothing is kept
    assert rows(store, tables.Turn, "initech-2") == 0
    store.close()


def test_what_arrives_after_an_erasure_is_dropped_and_the_report_names_what_trained_on_it(
    store: Store, tmp_path: Path
) -> None:
    """On both databases: a user's turn that arrives after the erasure is dropped and its session with it
    (feedback that came first is removed); a tenant's rows are gone whatever the sessions table knew."""
    log = SqliteEventLog(tmp_path / "events.db")
    places = Places(tmp_path / "adapters", tmp_path / "trainer")
    ana = scopes.user_id("acme", "ana")
    early = turn("early").model_copy(update={"user": ana})
    store.apply([early, turn("other")])
    signal = events.SignalExtracted(signal_id="x", tenant="acme", session_id="early", turn_id=early.turn_id,
                                    reward=1.0, confidence=1.0, extractor_version="v", scope="t.acme")
    store.apply([signal, events.AdapterPublished(scope="t.acme", version=3, base_model="m", path="/p",
                                                 meta={"data": {"signals": [signal.event_id]}})])
    report = erasure.forget_user(store, log, places, "acme", "ana", actor="test")
    assert report.sessions == 1 and report.removed["turns"] == 1 and report.removed["signals"] == 1
    assert [(found["version"], found["status"]) for found in report.trained_versions] == [("t.acme-v3", "published")]

    late = turn("late").model_copy(update={"user": ana, "started_at": early.started_at})  # began before it
    store.apply([feedback(late, value=1.0)])  # feedback that overtook its turn
    store.apply([late])
    assert rows(store, tables.Turn, "late") == 0 and rows(store, tables.Feedback, "late") == 0
    store.apply([feedback(late, value=-1.0)])
    assert rows(store, tables.Feedback, "late") == 0
    after = turn("after").model_copy(update={"user": ana})  # she came back: kept
    store.apply([after])
    assert rows(store, tables.Turn, "after") == 1 and rows(store, tables.Turn, "other") == 1

    with pytest.raises(NothingToForget):
        erasure.forget_session(store, log, places, "globex", "other", actor="test")
    with pytest.raises(CannotForget):
        erasure.forget_tenant(store, log, places, "default", actor="test")
    erasure.forget_tenant(store, log, places, "acme", actor="test")
    assert store.count(tables.Turn) == 0
    rules = store.erasures.read_store(store)
    assert rules.covers(turn("anything", tenant="acme")) and not rules.covers(turn("anything", tenant="globex"))
    log.close()


@pytest.mark.kafka
def test_on_kafka_an_erasure_writes_tombstones_every_reader_skips(event_log_kafka: EventLog) -> None:
    """Kafka cannot delete a record: the erasure writes a tombstone under each erased key (a compacted topic
    drops the records before it); consumers read past tombstones, and the rules drop the records."""
    gone, kept = turn("gone"), turn("kept")
    event_log_kafka.append([gone, kept])
    written = event_log_kafka.erase(erasure.Subject(frozenset({"gone"}), None, frozenset({"t.gone"})))
    assert written == 3 + 3  # turns, feedback, dead letters under the session; signals, adapters, deployments
    reader = event_log_kafka.consumer(None, list(events.TOPICS), start="beginning")
    seen = []
    for _ in range(20):
        seen += [d.event for d in reader.poll(timeout_s=0.3)]
    reader.close()
    assert {event.event_id for event in seen} == {gone.event_id, kept.event_id}  # no dead letter of a tombstone
    rules = Rules(sessions=frozenset({"gone"}))
    assert [event.event_id for event in seen if not rules.covers(event)] == [kept.event_id]


@pytest.fixture
def event_log_kafka(tansu: Tansu) -> Iterator[EventLog]:
    log = open_log("kafka", tansu.bootstrap_servers)
    yield log
    log.close()
