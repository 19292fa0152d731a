"""Scopes served side by side on the embedded engine: each tenant (and user) its own versions, falling back
along its chain, with the openai SDK over real uvicorn and deployments made in the real store."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from gateway.app import create_app
from nextturn import deployments, events, scopes, tables
from nextturn.bus import open_event_log
from nextturn.deployments import Deployment
from nextturn.settings import Settings
from nextturn.store import Store, downgrade, upgrade
from rollout.controller import RolloutController

from support.cli import nextturn
from support.event_logs import recorded
from support.eventually import eventually
from support.rolling import promote, publish
from support.services import PostgresCluster, Tansu, Uvicorn

KEYS = "sk-acme:acme,sk-globex:globex,sk-initech:initech"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("scoped")


@pytest.fixture(scope="module")
def gateway(tiny_model: Path, data_dir: Path) -> Iterator[Uvicorn]:
    settings = Settings(data_dir=data_dir, engine="embedded", model=str(tiny_model), api_keys=KEYS,
                        scope_by="user", rollout_check_interval_s=0.2, admin_key="sk-admin")
    with Uvicorn(create_app(settings)) as server:
        yield server


def ask(gateway: Uvicorn, key: str, *, user: str | None = None, header: str | None = None) -> tuple[str, str]:
    """(the adapter that served, the turn id) of one question as ``key``'s tenant."""
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="tiny", messages=[{"role": "user", "content": f"who serves {user or header}?"}], max_tokens=2,
            user=user or openai.NOT_GIVEN, extra_headers={"X-Nextturn-User": header} if header else None)
    return raw.headers["X-Nextturn-Adapter"], raw.parse().id


def test_tenants_and_users_are_served_their_own_versions_and_fall_back_along_their_chain(
    gateway: Uvicorn, data_dir: Path, tiny_adapters: dict[str, Path]
) -> None:
    store = Store(Settings(data_dir=data_dir).store_url)
    ana = scopes.user_scope("acme", "ana")
    for scope, adapter in ((events.DEFAULT_SCOPE, "a1"), ("t.acme", "a2"), ("t.globex", "a1"), (ana, "a2")):
        promote(store, scope, tiny_adapters[adapter])
    store.close()
    expected = {("sk-acme", None): "t.acme-v1", ("sk-globex", None): "t.globex-v1",
                ("sk-initech", None): "default-v1",  # no version of its own: the shared one
                ("sk-acme", "ana"): f"{ana}-v1", ("sk-acme", "ben"): "t.acme-v1",  # ben: his tenant's
                ("sk-globex", "ana"): "t.globex-v1"}  # another tenant's ana is not acme's

    def served() -> dict[tuple[str, str | None], str]:
        return {(key, user): ask(gateway, key, user=user)[0] for key, user in expected}

    eventually(served, "every scope's version to serve", until=lambda found: found == expected, timeout_s=30)
    adapter, turn_id = ask(gateway, "sk-acme", header="ana")  # the header names the user too
    turn = recorded(data_dir, turn_id)
    assert (adapter, turn.scope, turn.adapter_version) == (f"{ana}-v1", ana, f"{ana}-v1")
    _, turn_id = ask(gateway, "sk-initech", user="carl")
    turn = recorded(data_dir, turn_id)  # learns into its own scope while the shared version serves it
    assert (turn.scope, turn.adapter_version) == (scopes.user_scope("initech", "carl"), "default-v1")


def test_a_user_longer_than_the_limit_is_a_400(gateway: Uvicorn) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        ask(gateway, "sk-acme", user="x" * (scopes.MAX_USER_CHARS + 1))
    assert refused.value.body["param"] == "user"  # type: ignore[index]


def test_a_tenant_sees_and_pins_only_the_versions_of_its_chain(gateway: Uvicorn, data_dir: Path,
                                                               tiny_adapters: dict[str, Path]) -> None:
    ana = scopes.user_scope("acme", "ana")
    store = Store(Settings(data_dir=data_dir).store_url)
    for scope, adapter in ((events.DEFAULT_SCOPE, "a1"), ("t.acme", "a2"), ("t.globex", "a1"), (ana, "a2")):
        if store.get(tables.Deployment, scope) is None:  # run alone, this test makes the versions it needs
            promote(store, scope, tiny_adapters[adapter])
    store.close()

    def models(key: str, user: str | None = None) -> set[str]:
        with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0) as client:
            return {model.id for model in client.models.list(extra_headers={"X-Nextturn-User": user} if user else None)}

    eventually(lambda: models("sk-acme", "ana") | models("sk-globex"), "every version to be loaded",
               until=lambda found: {"t.acme-v1", f"{ana}-v1", "t.globex-v1", "default-v1"} <= found, timeout_s=30)
    assert {"tiny", "default-v1", "t.acme-v1"} <= models("sk-acme") and "t.globex-v1" not in models("sk-acme")
    assert "t.acme-v1" not in models("sk-globex") and "t.globex-v1" in models("sk-globex")
    assert f"{ana}-v1" in models("sk-acme", "ana")
    assert f"{ana}-v1" not in models("sk-acme", "ben") and f"{ana}-v1" not in models("sk-acme")
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="sk-acme", max_retries=0) as client:
        with pytest.raises(openai.NotFoundError) as missing:
            client.chat.completions.create(model="t.globex-v1", messages=[{"role": "user", "content": "hi"}])
        assert missing.value.code == "model_not_found"  # exactly as a model that does not exist
        pinned = client.chat.completions.with_raw_response.create(
            model="t.acme-v1", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert pinned.headers["X-Nextturn-Adapter"] == "t.acme-v1"


def test_scopes_list_shows_each_scope_its_versions_and_what_it_falls_back_to(
    gateway: Uvicorn, data_dir: Path, tiny_adapters: dict[str, Path]
) -> None:
    ana = scopes.user_scope("acme", "ana")
    store = Store(Settings(data_dir=data_dir).store_url)
    for scope, adapter in ((events.DEFAULT_SCOPE, "a1"), ("t.acme", "a2"), (ana, "a2")):
        if store.get(tables.Deployment, scope) is None:
            promote(store, scope, tiny_adapters[adapter])
    store.apply([events.AdapterPublished(scope="t.initech", version=1, base_model="tiny",
                                         path=str(tiny_adapters["a1"]))])  # published, not deployed
    store.apply([events.SignalExtracted(event_id=f"sig-{n}.{revision}", signal_id=f"sig-{n}", revision=revision,
                                        tenant="globex", scope="t.globex", session_id="s", turn_id=f"turn-{n}",
                                        adapter_version="default-v1", reward=reward, confidence=1.0,
                                        extractor_version="x")
                 for n, revision, reward in ((0, 0, -1.0), (0, 1, 1.0), (1, 0, 0.5))])  # sig-0 revised
    store.close()
    listed = nextturn("scopes", "list", "--json", data_dir=data_dir)
    assert listed.returncode == 0, listed.stderr
    found = {scope["scope"]: scope for scope in json.loads(listed.stdout)}
    assert {name: (found[name]["stable"], found[name]["falls_back_to"]) for name in
            (events.DEFAULT_SCOPE, "t.acme", ana, "t.initech")} == {
        events.DEFAULT_SCOPE: ("default-v1", "base"), "t.acme": ("t.acme-v1", "default-v1"),
        ana: (f"{ana}-v1", "t.acme-v1"), "t.initech": (None, "default-v1")}
    assert found["t.initech"]["versions"] == 1
    assert (found["t.globex"]["resolved"], found["t.globex"]["mean_reward"]) == (2, 0.75)  # latest revisions
    admin = httpx.get(f"{gateway.url}/v1/admin/scopes", headers={"Authorization": "Bearer sk-admin"}, timeout=10)
    assert {scope["scope"] for scope in admin.json()["data"]} == set(found)
    tenant = httpx.get(f"{gateway.url}/v1/admin/scopes", headers={"Authorization": "Bearer sk-acme"}, timeout=10)
    assert tenant.status_code == 403


def test_an_install_upgraded_from_before_scopes_serves_what_it_served(tiny_model: Path, tiny_adapters: dict[str, Path],
                                                                      tmp_path: Path) -> None:
    """A store made before scopes (revision 0005) holds the shared deployment: after the upgrade, with
    tenant scopes on, every tenant is still served its version (no tenant has one of its own yet)."""
    settings = Settings(data_dir=tmp_path, engine="embedded", model=str(tiny_model), api_keys="sk-acme:acme",
                        scope_by="tenant", rollout_check_interval_s=0.2)
    upgrade(settings.store_url)
    store = Store(settings.store_url)
    promote(store, events.DEFAULT_SCOPE, tiny_adapters["a1"])
    store.close()
    downgrade(settings.store_url, "0005")  # what a store of that revision holds: the shared version, stable
    with Uvicorn(create_app(settings)) as server:  # the embedded default migrates its store as it starts
        eventually(lambda: ask(server, "sk-acme")[0], "the shared version", until=lambda found: found == "default-v1",
                   timeout_s=30)
        _, turn_id = ask(server, "sk-acme")
    assert recorded(tmp_path, turn_id).scope == "t.acme"  # it learns into the tenant's own scope from now on


def test_two_users_of_a_tenant_with_the_same_conversation_keep_their_own_sessions(gateway: Uvicorn,
                                                                                    data_dir: Path) -> None:
    """With scopes per user, implicit linking is per user too: ben, sending exactly what ana sent and was
    answered, starts his own session instead of continuing hers (and learning into her scope's turns)."""
    asked = [{"role": "user", "content": "the same question from two people"}]
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="sk-acme", max_retries=0) as client:
        first = client.chat.completions.create(model="tiny", messages=asked, max_tokens=3, temperature=0,  # type: ignore[arg-type]
                                               user="ana")
        history = [*asked, {"role": "assistant", "content": first.choices[0].message.content},
                   {"role": "user", "content": "and then?"}]
        ben = client.chat.completions.create(model="tiny", messages=history, max_tokens=2, user="ben")  # type: ignore[arg-type]
        ana = client.chat.completions.create(model="tiny", messages=history, max_tokens=2, user="ana")  # type: ignore[arg-type]
    turns = {name: recorded(data_dir, completion.id) for name, completion in
             (("first", first), ("ben", ben), ("ana", ana))}
    assert turns["ana"].parent_turn_id == first.id and turns["ana"].session_id == turns["first"].session_id
    assert turns["ben"].parent_turn_id is None and turns["ben"].session_id != turns["first"].session_id
    assert turns["ben"].scope == scopes.user_scope("acme", "ben")


@pytest.mark.kafka
@pytest.mark.postgres
def test_on_kafka_and_postgres_one_controller_starts_each_scopes_canary_and_gateways_follow_each_change(
    tiny_model: Path, tiny_adapters: dict[str, Path], tansu: Tansu, postgres: PostgresCluster, tmp_path: Path
) -> None:
    """The production parts: versions announced on the broker, one controller for every scope storing them
    in Postgres and starting each scope's canary, operators promoting them, and a gateway that learns each
    change from the broker (its periodic re-read is an hour away)."""
    settings = Settings(data_dir=tmp_path, bus="kafka", kafka_bootstrap_servers=tansu.bootstrap_servers,
                        database_url=postgres.create_database(f"scoped_{uuid.uuid4().hex[:12]}"), engine="embedded",
                        model=str(tiny_model), api_keys=KEYS, scope_by="tenant", rollout_check_interval_s=3600.0)
    upgrade(settings.store_url)
    log = open_event_log(settings)
    store = Store(settings.store_url)
    try:
        with Uvicorn(create_app(settings)) as server:
            for tenant, adapter in (("acme", "a1"), ("globex", "a2")):
                publish(log, 1, tiny_adapters[adapter], scope=f"t.{tenant}")
            controller = RolloutController(log, store, scope=None)
            eventually(lambda: (controller.run_once(0.5), {s.scope: s.canary for s in Deployment.read_all(store)})[1],
                       "a canary in each tenant's scope", until=lambda found: found.get("t.acme") == 1
                       and found.get("t.globex") == 1, timeout_s=60)
            controller.close()
            for scope in ("t.acme", "t.globex"):
                deployments.operate(store, scope, "promote", "ops", "checked by hand", lambda c: log.append([c]))
            expected = {"sk-acme": "t.acme-v1", "sk-globex": "t.globex-v1", "sk-initech": "base"}
            eventually(lambda: {key: ask(server, key)[0] for key in expected}, "each tenant's own version",
                       until=lambda found: found == expected, timeout_s=60)
    finally:
        store.close()
        log.close()
