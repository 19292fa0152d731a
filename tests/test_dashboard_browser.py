"""The operator's page in a real browser: headless Chromium (Debian's) driven by Selenium, against a running
stack: the gateway on the embedded engine over real uvicorn with two tenants' scopes, each with versions
(LoRA adapters the engine loads), their traffic from the openai SDK with ratings, and the signals worker
turning them into rewards. An operator logs in, sees both scopes with their versions, pauses and resumes a
canary; a tenant's key is refused. The page's screenshot is left in the test artifacts
(support.browser.artifacts)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from gateway.app import create_app
from nextturn import deployments, events, progress
from nextturn.settings import Settings
from nextturn.store import Store

from support.browser import artifacts, chromium
from support.eventually import eventually
from support.rolling import signals_running
from support.services import Uvicorn

pytestmark = pytest.mark.slow  # a stack, a browser

KEYS = {"acme": "sk-acme", "globex": "sk-globex"}


@pytest.fixture(scope="module")
def stack(tiny_model: Path, tiny_adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[tuple[Uvicorn, Store]]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("dashboard-stack"), engine="embedded", model=str(tiny_model),
                        api_keys=",".join(f"{key}:{tenant}" for tenant, key in KEYS.items()), admin_key="sk-admin",
                        scope_by="tenant", signals_idle_timeout_s=0.5, rollout_check_interval_s=0.2)
    with Uvicorn(create_app(settings)) as gateway, signals_running(settings) as (event_log, store):
        # What the trainer and the rollout controller publish: acme has a stable version and a canary, globex
        # a stable version.
        for scope, versions in (("t.acme", ("a1", "a2")), ("t.globex", ("a1",))):
            event_log.append([events.AdapterPublished(scope=scope, version=n, base_model="tiny",
                                                      path=str(tiny_adapters[name]))
                              for n, name in enumerate(versions, 1)])
        eventually(lambda: len(progress.guards(store, "t.acme")) + len(progress.guards(store, "t.globex")) == 3,
                   "the versions recorded")

        def publish(change: events.DeploymentChanged) -> None:
            event_log.append([change])

        for scope in ("t.acme", "t.globex"):
            deployments.operate(store, scope, "promote", "ops", "its first version", publish, version=1)
        deployments.commit(store, "t.acme", lambda state: deployments.canary(
            state, 2, [0.5], "controller", "published", events.utc_now()), publish)
        talk(gateway.url)
        eventually(lambda: progress.signals(store, scope="t.acme")["resolved_turns"] >= 4, "acme's rewards",
                   timeout_s=60)
        yield gateway, store


def talk(url: str) -> None:
    """Each tenant's conversations, each answer rated (acme likes its answers, globex does not)."""
    for tenant, key in KEYS.items():
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as http:
            for n in range(6):
                answer = client.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": f"{tenant} asks question {n}"}],
                    max_tokens=4, temperature=0, extra_headers={"X-Session-Id": f"{tenant}-{n}"})
                http.post("/v1/feedback", json={"turn_id": answer.id, "kind": "rating",
                                                "value": 1.0 if tenant == "acme" else -1.0}).raise_for_status()


def text(driver: WebDriver, selector: str) -> str:
    """The text of the element ``selector`` finds, once the page that has it has loaded (a click that sends a
    form returns before the next page is there)."""
    found = WebDriverWait(driver, 60).until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR,
                                                                                              selector)))
    return str(found.text)


def log_in(driver: WebDriver, url: str, key: str, name: str) -> None:
    driver.get(f"{url}/dashboard")
    assert driver.current_url == f"{url}/dashboard/login?next=/dashboard"
    text(driver, "#key")
    driver.find_element(By.ID, "key").send_keys(key)
    driver.find_element(By.ID, "name").send_keys(name)
    driver.find_element(By.ID, "login").click()


def act(driver: WebDriver, action: str, reason: str) -> None:
    """Fill the action's reason, send it, and confirm on the page that asks."""
    form = driver.find_element(By.ID, f"{action}-form")
    form.find_element(By.NAME, "reason").send_keys(reason)
    driver.find_element(By.ID, action).click()
    assert reason in text(driver, "section.confirm")
    driver.find_element(By.ID, "confirm").click()


def test_an_operator_sees_both_scopes_and_pauses_and_resumes_a_canary(stack: tuple[Uvicorn, Store],
                                                                       tmp_path: Path) -> None:
    gateway, store = stack
    with chromium(tmp_path / "profile") as driver:
        log_in(driver, gateway.url, "sk-admin", "Olu")
        acme = text(driver, 'tr[data-scope="t.acme"]')
        assert driver.current_url == f"{gateway.url}/dashboard"
        globex = text(driver, 'tr[data-scope="t.globex"]')
        assert "t.acme-v1" in acme and "t.acme-v2 at 50%" in acme
        assert "t.globex-v1" in globex

        driver.find_element(By.LINK_TEXT, "t.acme").click()
        assert text(driver, "#canary") == "t.acme-v2 at 50%"
        assert len(driver.find_elements(By.CSS_SELECTOR, "svg.chart circle")) >= 1  # rewards drawn
        assert {row.get_attribute("data-version") for row in driver.find_elements(
            By.CSS_SELECTOR, "#versions tr[data-version]")} == {"t.acme-v1", "t.acme-v2"}
        driver.save_screenshot(str(artifacts() / "dashboard-scope.png"))

        act(driver, "pause", "checking the canary's answers")
        assert text(driver, "#done") == "Done: pause."
        assert text(driver, "#paused") == "paused"
        assert deployments.Deployment.read(store, "t.acme").paused
        act(driver, "resume", "they look right")
        assert text(driver, "#done") == "Done: resume."
        assert driver.find_elements(By.ID, "paused") == []
        state = deployments.Deployment.read(store, "t.acme")
        assert not state.paused and state.canary == 2
        changes = [(c.action, c.actor, c.reason) for c in store.deployment_changes("t.acme", 2)]
        assert changes == [("resume", "Olu (dashboard)", "they look right"),
                           ("pause", "Olu (dashboard)", "checking the canary's answers")]
        driver.get(f"{gateway.url}/dashboard")
        text(driver, "#scopes")
        driver.save_screenshot(str(artifacts() / "dashboard.png"))

        driver.find_element(By.ID, "logout").click()
        text(driver, "#login")
        log_in(driver, gateway.url, KEYS["acme"], "Mallory")
        assert "not an admin key" in text(driver, ".error")
        driver.get(f"{gateway.url}/dashboard")
        text(driver, "#login")
        assert driver.current_url.startswith(f"{gateway.url}/dashboard/login")
