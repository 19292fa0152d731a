"""The operator's page over real uvicorn, read as a browser's HTTP client would (the page in a real browser:
test_dashboard_browser.py), and the figures it draws (nextturn.progress) on a store filled as the loop fills it."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import create_app
from gateway.dashboard import COOKIE
from nextturn import deployments, events, progress
from nextturn.keys import create_key, revoke_key
from nextturn.settings import Settings
from nextturn.store import Store, upgrade

from support.eventually import eventually
from support.services import Uvicorn
from support.upstream import MODEL

GUARDS = {"prompts": 4, "length": 12.0, "kl_to_base": 0.08, "reward": 0.4, "base": {"length": 10.0, "reward": 0.1},
          "probe": {"entropy": 1.4, "base_entropy": 1.5, "distinct_1": 0.6, "base_distinct_1": 0.62,
                    "distinct_2": 0.8, "base_distinct_2": 0.85}}


def signal(turn: str, scope: str, version: str, reward: float | None, *, judge: float | None = None,
           rating: float | None = None, revision: int = 0, hint: str | None = None) -> events.SignalExtracted:
    verdicts = [events.Verdict(evaluator="rating", source="explicit", score=rating, confidence=1.0)] if rating else []
    verdicts += [events.Verdict(evaluator="judge", source="judge", score=judge, confidence=0.8)] if judge else []
    return events.SignalExtracted(signal_id=f"sig-{turn}", revision=revision, tenant=scope.removeprefix("t."),
                                  scope=scope, session_id=f"s-{turn}", turn_id=turn, adapter_version=version,
                                  reward=reward, hint=hint, confidence=0.9, verdicts=verdicts,
                                  extractor_version="extractor-v1")


def fill(store: Store) -> None:
    """Two tenants' scopes: acme with a stable version and a canary, globex with a stable version; rewards."""
    for scope, versions in (("t.acme", (1, 2)), ("t.globex", (1,))):
        for version in versions:
            store.apply([events.AdapterPublished(scope=scope, version=version, base_model="tiny", path="/nowhere",
                                                 meta={"guards": GUARDS, "data": {"signals": ["a", "b", "c"]}})])
        deployments.operate(store, scope, "promote", "ops", "first version", lambda _: None, version=1)
    deployments.commit(store, "t.acme", lambda state: deployments.canary(state, 2, [0.5], "controller", "published",
                                                                          events.utc_now()), lambda _: None)
    store.apply([signal("a1", "t.acme", "t.acme-v1", -1.0, rating=-1.0, judge=-0.9),
                 signal("a2", "t.acme", "t.acme-v2", 1.0, rating=1.0, judge=0.8),
                 signal("a3", "t.acme", "t.acme-v2", 0.5, judge=0.5, hint="answer in a list"),
                 signal("g1", "t.globex", "t.globex-v1", 1.0, rating=1.0, judge=-0.8)])


@pytest.fixture(scope="module")
def settings(upstream: Uvicorn, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(data_dir=tmp_path_factory.mktemp("dashboard"), engine="openai", upstream_url=f"{upstream.url}/v1",
                    model=MODEL, api_keys="sk-acme:acme,sk-globex:globex", admin_key="sk-admin", scope_by="tenant")


@pytest.fixture(scope="module")
def store(settings: Settings) -> Iterator[Store]:
    upgrade(settings.store_url)
    found = Store.from_settings(settings)
    fill(found)
    yield found
    found.close()


@pytest.fixture(scope="module")
def gateway(settings: Settings, store: Store) -> Iterator[Uvicorn]:
    with Uvicorn(create_app(settings)) as server:
        yield server


def browser(gateway: Uvicorn) -> httpx.Client:
    return httpx.Client(base_url=gateway.url, follow_redirects=False, timeout=30)


@contextmanager
def logged_in(gateway: Uvicorn, key: str = "sk-admin", name: str = "ana") -> Iterator[httpx.Client]:
    with browser(gateway) as client:
        answer = client.post("/dashboard/login", data={"key": key, "name": name, "next": "/dashboard"})
        assert answer.status_code == 303, answer.text
        yield client


def form_token(page: str) -> str:
    found = re.search(r'name="form_token" value="([0-9a-f]+)"', page)
    assert found is not None, "the page has no form"
    return found.group(1)


def test_without_a_session_every_page_sends_the_browser_to_the_login(gateway: Uvicorn) -> None:
    with browser(gateway) as client:
        for path in ("/dashboard", "/dashboard/scopes/t.acme"):
            answer = client.get(path, headers={"Authorization": "Bearer sk-admin"})  # a key is not a session
            assert answer.status_code == 303
            assert answer.headers["location"] == f"/dashboard/login?next={path}"
        assert client.get("/dashboard/login").status_code == 200


def test_a_tenant_key_or_a_wrong_key_cannot_open_it(gateway: Uvicorn) -> None:
    with browser(gateway) as client:
        tenant = client.post("/dashboard/login", data={"key": "sk-acme", "name": "mallory"})
        assert tenant.status_code == 403
        assert "not an admin key" in tenant.text
        assert COOKIE not in tenant.cookies
        wrong = client.post("/dashboard/login", data={"key": "sk-nope", "name": "mallory"})
        assert wrong.status_code == 401
        assert client.get("/dashboard").status_code == 303
        nameless = client.post("/dashboard/login", data={"key": "sk-admin", "name": " "})
        assert nameless.status_code == 400
        elsewhere = client.post("/dashboard/login", data={"key": "sk-admin", "name": "ana"},
                                headers={"Origin": "https://evil.example"})
        assert elsewhere.status_code == 403 and COOKIE not in elsewhere.cookies
        garbled = client.post("/dashboard/login", content=b"key=\xff\xfe&name=ana",
                              headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert garbled.status_code == 400


def test_a_login_is_a_session_cookie_that_logout_ends_everywhere(gateway: Uvicorn) -> None:
    with browser(gateway) as client:
        login = client.post("/dashboard/login", data={"key": "sk-admin", "name": "ana"})
        header = login.headers["set-cookie"]
        assert "HttpOnly" in header and "SameSite=strict" in header and "Path=/dashboard" in header
        assert "sk-admin" not in header
        cookie = client.cookies[COOKIE]
        page = client.get("/dashboard")
        assert page.status_code == 200
        assert page.headers["content-security-policy"].startswith("default-src 'none'")
        client.post("/dashboard/logout", data={"form_token": form_token(page.text)})
    with browser(gateway) as replay:  # the cookie, replayed after the logout
        replay.cookies.set(COOKIE, cookie)
        assert replay.get("/dashboard").status_code == 303


def test_a_session_ends_when_its_store_key_is_revoked(gateway: Uvicorn, store: Store) -> None:
    key = create_key(store, "ops", admin=True)
    with logged_in(gateway, key, "ops") as client:
        assert client.get("/dashboard").status_code == 200
        revoke_key(store, key)
        assert client.get("/dashboard").status_code == 303


def test_the_index_lists_every_scope_with_its_versions(gateway: Uvicorn) -> None:
    with logged_in(gateway) as client:
        page = client.get("/dashboard").text
        filtered = client.get("/dashboard", params={"q": "globex"}).text
    acme = re.search(r'<tr data-scope="t.acme">(.*?)</tr>', page, re.S)
    globex = re.search(r'<tr data-scope="t.globex">(.*?)</tr>', page, re.S)
    assert acme is not None and globex is not None
    assert "t.acme-v1" in acme.group(1) and "t.acme-v2 at 50%" in acme.group(1)
    assert "t.globex-v1" in globex.group(1) and "–" in globex.group(1)
    assert 'data-scope="t.globex"' in filtered and 'data-scope="t.acme"' not in filtered


def test_a_scope_page_draws_rewards_guards_and_history(gateway: Uvicorn) -> None:
    with logged_in(gateway) as client:
        page = client.get("/dashboard/scopes/t.acme").text
    assert page.count("<circle") == 2  # one point per version that has rewards in the window
    assert "t.acme-v2: +0.75 over 2 turn(s)" in page
    assert 'data-version="t.acme-v2"' in page and 'data-version="t.acme-v1"' in page
    assert "1.4 <small>base 1.5</small>" in page  # entropy on the probes, beside the base model's
    assert "first version" in page and "published" in page  # the history, with why
    assert 'id="pause"' in page and 'id="promote"' in page
    assert "<script" not in page


def test_an_action_asks_for_a_reason_and_a_confirmation_then_records_who(gateway: Uvicorn, store: Store) -> None:
    with logged_in(gateway, name="ana <ops>") as client:
        acted(client, store)


def acted(client: httpx.Client, store: Store) -> None:
    token = form_token(client.get("/dashboard/scopes/t.globex").text)
    act = {"form_token": token, "action": "pause"}
    assert client.post("/dashboard/scopes/t.globex/act", data={**act, "reason": " "}).status_code == 400
    asked = client.post("/dashboard/scopes/t.globex/act", data={**act, "reason": "<b>looking</b>"})
    assert asked.status_code == 200 and 'id="confirm"' in asked.text
    assert "&lt;b&gt;looking&lt;/b&gt;" in asked.text
    assert not deployments.Deployment.read(store, "t.globex").paused  # nothing happens before the confirmation
    done = client.post("/dashboard/scopes/t.globex/act", data={**act, "reason": "<b>looking</b>", "confirm": "yes"})
    assert done.status_code == 303 and done.headers["location"] == "/dashboard/scopes/t.globex?done=pause"
    assert deployments.Deployment.read(store, "t.globex").paused
    latest = store.deployment_changes("t.globex", 1)[0]
    assert (latest.action, latest.actor, latest.reason) == ("pause", "ana <ops> (dashboard)", "<b>looking</b>")
    again = client.post("/dashboard/scopes/t.globex/act", data={**act, "reason": "twice", "confirm": "yes"})
    assert again.status_code == 409 and "paused" in again.text
    resume = {"form_token": token, "action": "resume", "reason": "seen", "confirm": "yes"}
    assert client.post("/dashboard/scopes/t.globex/act", data=resume).status_code == 303
    assert not deployments.Deployment.read(store, "t.globex").paused


def test_forms_from_elsewhere_or_without_the_session_token_are_refused(gateway: Uvicorn, store: Store) -> None:
    with logged_in(gateway) as client:
        refused(client, store)


def refused(client: httpx.Client, store: Store) -> None:
    token = form_token(client.get("/dashboard/scopes/t.acme").text)
    act = {"action": "pause", "reason": "x", "confirm": "yes"}
    assert client.post("/dashboard/scopes/t.acme/act", data=act).status_code == 403
    assert client.post("/dashboard/scopes/t.acme/act", data={**act, "form_token": "0" * 40}).status_code == 403
    elsewhere = client.post("/dashboard/scopes/t.acme/act", data={**act, "form_token": token},
                            headers={"Origin": "https://evil.example"})
    assert elsewhere.status_code == 403
    assert not deployments.Deployment.read(store, "t.acme").paused
    # The API still takes JSON only: the dashboard's exception is its own paths.
    api = client.post("/v1/admin/rollout/pause", data={"reason": "x"}, headers={"Authorization": "Bearer sk-admin"})
    assert api.status_code == 415


@pytest.mark.parametrize("path", ["/dashboard/scopes/t.nobody", "/dashboard/scopes/%3Cscript%3E",
                                  "/dashboard/scopes/" + "x" * 300])
def test_an_unknown_or_hostile_scope_is_a_clear_404(gateway: Uvicorn, path: str) -> None:
    with logged_in(gateway) as client:
        answer = client.get(path)
    assert answer.status_code == 404
    assert "<script>" not in answer.text and "there is no scope" in answer.text


def test_a_login_never_sends_the_browser_to_another_site(gateway: Uvicorn) -> None:
    with browser(gateway) as client:
        for target in ("https://evil.example/", "//evil.example", "/dashboard/../v1/models"):
            answer = client.post("/dashboard/login", data={"key": "sk-admin", "name": "ana", "next": target})
            assert answer.headers["location"] == "/dashboard"


# --- the figures ---------------------------------------------------------------------------------


def test_signals_figures_per_scope_and_the_judges_agreement(store: Store) -> None:
    acme = progress.signals(store, scope="t.acme")
    assert acme["resolved_turns"] == 3 and acme["hints"] == 1
    assert acme["rewards_by_source"] == {"explicit": 2, "judge-only": 1}
    assert acme["judge_agreement"] == 1.0 and acme["judge_agreement_turns"] == 2
    everyone = progress.signals(store)
    assert everyone["judge_agreement_turns"] == 3 and everyone["judge_agreement"] == pytest.approx(2 / 3, abs=1e-3)


def test_reward_history_buckets_each_versions_latest_revisions(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'history.db'}"
    upgrade(url)
    store = Store(url)
    start = events.utc_now() - timedelta(hours=2)
    rows: list[Any] = []
    for n, (minutes, version, reward) in enumerate([(10, "v1", -1.0), (20, "v1", 0.0), (70, "v1", 1.0),
                                                    (75, "v2", 1.0)]):
        row = signal(f"t{n}", "t.acme", version, reward)
        rows.append(row.model_copy(update={"occurred_at": start + timedelta(minutes=minutes)}))
    revised = rows[0].model_copy(update={"event_id": "revised", "revision": 1, "reward": 0.5})  # the latest counts
    store.apply([*rows, revised])
    history = progress.reward_history(store, "t.acme", since=start, buckets=2, now=start + timedelta(hours=2))
    assert {version: [(p.mean_reward, p.turns) for p in points] for version, points in history.items()} == {
        "v1": [(0.25, 2), (1.0, 1)], "v2": [(1.0, 1)]}
    store.close()


def test_trainer_lag_counts_trainable_signals_after_the_newest_version(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'lag.db'}"
    upgrade(url)
    store = Store(url)
    t0 = events.utc_now() - timedelta(minutes=5)
    assert progress.trainer_lag(store, "t.acme", now=t0)["lag_s"] == 0.0
    store.apply([events.AdapterPublished(scope="t.acme", version=1, base_model="tiny", path="/v1",
                                         occurred_at=t0)])
    late = [signal("before", "t.acme", "t.acme-v1", 1.0), signal("hinted", "t.acme", "t.acme-v1", None, hint="shorter"),
            signal("silent", "t.acme", "t.acme-v1", None), signal("elsewhere", "t.globex", "base", 1.0)]
    at = [t0 - timedelta(seconds=5), t0 + timedelta(seconds=10), t0 + timedelta(seconds=20), t0 + timedelta(seconds=1)]
    store.apply([row.model_copy(update={"occurred_at": when}) for row, when in zip(late, at, strict=True)])
    lag = progress.trainer_lag(store, "t.acme", now=t0 + timedelta(seconds=40))
    assert (lag["newest"], lag["waiting"], lag["lag_s"]) == ("t.acme-v1", 1, 30.0)
    nobody = progress.trainer_lag(store, "t.nobody")
    assert (nobody["newest"], nobody["waiting"], nobody["lag_s"]) == (None, 0, 0.0)
    store.close()


def test_grafana_and_alert_rules_read_only_metrics_a_running_gateway_exports(gateway: Uvicorn) -> None:
    """Every nextturn_* series a Grafana panel or an alert reads is on a running gateway's /metrics (a renamed
    metric would leave its panel empty and its alert silent for good), and the loop's figures are there."""
    def exported() -> set[str]:
        text = httpx.get(f"{gateway.url}/metrics").text
        if 'nextturn_loop_reward{adapter="t.acme-v2"}' not in text:
            return set()  # the loop's figures are read once the watcher runs
        names = set()
        for family in text_string_to_metric_families(text):
            suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created")}
            names |= {family.name, *(family.name + suffix for suffix in suffixes.get(family.type, ()))}
        return names

    found = eventually(exported, "the loop's figures on /metrics")
    root = Path(__file__).resolve().parents[1] / "deploy"
    panels = [panel for path in sorted((root / "grafana" / "dashboards").glob("*.json"))
              for panel in json.loads(path.read_text())["panels"]]
    assert len(panels) >= 16
    expressions = [target["expr"] for panel in panels for target in panel["targets"]]
    rules = yaml.safe_load((root / "prometheus" / "alerts.yaml").read_text())
    expressions += [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    read = {name for expr in expressions for name in re.findall(r"\b(nextturn_[a-z_]+)", expr)}
    assert read and read <= found, sorted(read - found)
    assert {"nextturn_loop_trainer_lag_seconds", "nextturn_loop_judge_agreement", "nextturn_version_weight",
            "nextturn_spool_depth"} <= read
    samples = {(sample.name, sample.labels.get("adapter") or sample.labels.get("source")): sample.value
               for family in text_string_to_metric_families(httpx.get(f"{gateway.url}/metrics").text)
               for sample in family.samples}
    assert samples[("nextturn_loop_reward", "t.acme-v2")] == 0.75  # the canary's two rewards, 1.0 and 0.5
    assert samples[("nextturn_loop_resolved_turns", "judge-only")] == 1


def test_an_open_gateway_s_dashboard_is_open_too_until_a_key_appears(upstream: Uvicorn, tmp_path: Path) -> None:
    """On loopback with no key anywhere (the embedded default) the gateway is open, and its dashboard takes any
    login; the session ends once the first key exists and the gateway closes."""
    settings = Settings(data_dir=tmp_path, engine="openai", upstream_url=f"{upstream.url}/v1", model=MODEL)
    with Uvicorn(create_app(settings)) as server, browser(server) as client:
        assert client.post("/dashboard/login", data={"key": "", "name": "dev"}).status_code == 303
        assert client.get("/dashboard").status_code == 200
        store = Store.from_settings(settings)
        create_key(store, "acme")
        store.close()
        eventually(lambda: client.get("/dashboard").status_code == 303, "the dashboard closing with the gateway",
                   timeout_s=30, interval_s=0.5)  # an open gateway looks for keys every RECHECK_S
