"""The `nextturn` command, run as a user runs it: a separate process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from sqlmodel import select

from nextturn.bus.sqlite import SqliteEventLog
from nextturn.store import Store
from nextturn.tables import ApiKey

from support.cli import nextturn
from support.eventually import eventually
from support.factories import turn
from support.services import Uvicorn, free_port, wait_for_port


def test_help_lists_the_commands(tmp_path: Path) -> None:
    result = nextturn("--help", data_dir=tmp_path)
    assert result.returncode == 0
    for command in ("db", "events", "model", "demo"):
        assert command in result.stdout


def test_db_upgrade_brings_a_new_store_to_head(tmp_path: Path) -> None:
    result = nextturn("db", "upgrade", data_dir=tmp_path / "data")
    assert result.returncode == 0, result.stderr
    store = Store(f"sqlite:///{tmp_path / 'data' / 'nextturn.db'}")
    store.check_schema()
    store.close()


def test_events_tail_prints_json_lines(tmp_path: Path) -> None:
    log = SqliteEventLog(tmp_path / "events.db")
    sent = [turn("s", n) for n in range(3)]
    log.append(sent)
    log.append_raw("turns", "s", b"not an event")
    log.close()
    result = nextturn("events", "tail", "turns", data_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    printed = [json.loads(line) for line in result.stdout.splitlines()]
    assert [event["event_id"] for event in printed] == [e.event_id for e in sent]
    assert "is not an event" in result.stderr  # reported, not dead-lettered: tail only reads


def test_errors_are_one_clear_line_and_a_non_zero_exit(tmp_path: Path) -> None:
    unknown_topic = nextturn("events", "tail", "turnz", data_dir=tmp_path)
    assert unknown_topic.returncode == 1
    assert unknown_topic.stderr.strip().splitlines() == [
        "nextturn: error: unknown topic(s) turnz; the topics are turns, feedback, signals, adapters, "
        "deployments, dead-letters"
    ]
    bad_settings = nextturn("db", "upgrade", data_dir=tmp_path, NEXTTURN_BUS="kafka")
    assert bad_settings.returncode == 1
    assert len(bad_settings.stderr.strip().splitlines()) == 1
    assert "NEXTTURN_KAFKA_BOOTSTRAP_SERVERS" in bad_settings.stderr
    for scope in ("../x", "T.Acme", "a/b"):  # a scope names directories: never a path out of them
        refused = nextturn("rollout", "status", "--scope", scope, data_dir=tmp_path)
        assert refused.returncode == 2 and "a scope is at most 64" in refused.stderr, refused.stderr


def test_model_init_writes_a_loadable_model(tmp_path: Path) -> None:
    result = nextturn("model", "init", str(tmp_path / "model"), "--seed", "3", data_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    assert {p.name for p in (tmp_path / "model").iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}


def test_demo_refuses_an_unknown_method_and_quick_with_compare(tmp_path: Path) -> None:
    unknown = nextturn("demo", "--method", "sgd", data_dir=tmp_path)
    both = nextturn("demo", "--quick", "--compare", data_dir=tmp_path)
    assert unknown.returncode == 2 and "none, rl, opd, combined" in unknown.stderr
    assert both.returncode == 2 and "choose one of --compare, --quick and --method" in both.stderr
    policy = nextturn("demo", "--scope-by", "user", data_dir=tmp_path)
    assert policy.returncode == 2 and "choose tenant or deployment" in policy.stderr


def test_keys_create_prints_a_key_the_gateway_accepts_for_its_tenant(tmp_path: Path) -> None:
    import httpx

    from gateway.app import create_app
    from nextturn.settings import Settings

    from support.services import Uvicorn
    from support.upstream import MODEL, create_upstream

    created = [nextturn("keys", "create", "--tenant", "acme", *extra, data_dir=tmp_path) for extra in ([], ["--admin"])]
    assert all(result.returncode == 0 for result in created), [result.stderr for result in created]
    key, admin_key = (result.stdout.strip() for result in created)
    assert key.startswith("nt-") and key != admin_key
    store = Store(f"sqlite:///{tmp_path / 'nextturn.db'}")
    assert key not in json.dumps([row.model_dump(mode="json") for row in store.session().exec(select(ApiKey))])
    store.close()

    upstream = Uvicorn(create_upstream())
    upstream.start()
    server = Uvicorn(create_app(Settings(data_dir=tmp_path, engine="openai", upstream_url=f"{upstream.url}/v1",
                                         model=MODEL)))
    server.start()
    try:
        def call(path: str, key: str | None, **kwargs: object) -> httpx.Response:
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            return httpx.request("POST" if "json" in kwargs else "GET", f"{server.url}{path}", headers=headers,
                                 timeout=10, **kwargs)  # type: ignore[arg-type]

        chat = {"json": {"model": MODEL, "messages": [{"role": "user", "content": "whose?"}]}}
        answered = call("/v1/chat/completions", key, **chat)
        assert answered.status_code == 200
        assert call("/v1/chat/completions", None, **chat).status_code == 401  # keys exist: no longer open
        assert call("/v1/chat/completions", "nt-guessed", **chat).status_code == 401
        assert call("/v1/admin/adapters", key).status_code == 403
        assert call("/v1/admin/adapters", admin_key).status_code == 200
        turn_id = answered.json()["id"]
        # the turn is found with a key of the tenant that made it, once recorded
        eventually(lambda: call(f"/v1/turns/{turn_id}", key).status_code == 200, "the turn to be recorded")
    finally:
        server.stop()
        upstream.stop()


@pytest.mark.parametrize("access_log", [True, False])
def test_serve_runs_the_gateway_and_logs_requests_only_when_asked(
    upstream: Uvicorn, tmp_path: Path, access_log: bool
) -> None:
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NEXTTURN_")}
    env = {**clean, "NEXTTURN_DATA_DIR": str(tmp_path), "NEXTTURN_ENGINE": "openai", "NEXTTURN_MODEL": "m",
           "NEXTTURN_UPSTREAM_URL": f"{upstream.url}/v1", "NEXTTURN_PORT": str(port),
           "NEXTTURN_ACCESS_LOG": str(access_log).lower()}
    server = subprocess.Popen([sys.executable, "-m", "nextturn", "serve"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_port(port, timeout_s=60)
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").json() == {"status": "ok"}
    finally:
        server.send_signal(signal.SIGINT)
        output, _ = server.communicate(timeout=60)
    assert server.returncode == 0, output
    assert "Application startup complete" in output
    assert ('"GET /healthz HTTP/1.1" 200' in output) is access_log


def test_record_stores_what_gateways_without_a_recorder_publish(upstream: Uvicorn, tmp_path: Path) -> None:
    """With NEXTTURN_GATEWAY_RECORDER=false the gateways only publish; `nextturn record`, run on its own,
    copies their turns into the store, and stops cleanly on Ctrl-C."""
    from gateway.app import create_app
    from nextturn.settings import Settings

    from support.event_logs import recorded
    from support.upstream import MODEL

    app = create_app(Settings(data_dir=tmp_path, engine="openai", upstream_url=f"{upstream.url}/v1", model=MODEL,
                              gateway_recorder=False))
    with Uvicorn(app) as gateway:
        assert [part.name for part in app.state.supervisor.parts] == ["publisher", "engine", "deployments"]
        answered = httpx.post(f"{gateway.url}/v1/chat/completions", timeout=10,
                              json={"model": MODEL, "messages": [{"role": "user", "content": "who records?"}]})
        turn_id = answered.json()["id"]
        recorded(tmp_path, turn_id)  # on the event log, and no recorder of the gateway's will store it
        clean = {k: v for k, v in os.environ.items() if not k.startswith("NEXTTURN_")}
        recorder = subprocess.Popen([sys.executable, "-m", "nextturn", "record"], stderr=subprocess.PIPE, text=True,
                                    env={**clean, "NEXTTURN_DATA_DIR": str(tmp_path)})
        try:
            eventually(lambda: httpx.get(f"{gateway.url}/v1/turns/{turn_id}").status_code == 200,
                       "the recorder to store the turn", timeout_s=60)
        finally:
            recorder.send_signal(signal.SIGINT)
            _, stderr = recorder.communicate(timeout=60)
    assert recorder.returncode == 0, stderr
    assert "recorder stopped" in stderr


def test_an_open_gateway_closes_when_a_key_appears_and_a_revoked_key_is_refused(
    upstream: Uvicorn, tmp_path: Path
) -> None:
    from gateway.app import create_app
    from nextturn.settings import Settings

    from support.upstream import MODEL

    settings = Settings(data_dir=tmp_path, engine="openai", upstream_url=f"{upstream.url}/v1", model=MODEL)
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "who is there?"}]}

    def ask(gateway: Uvicorn, key: str | None) -> int:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.post(f"{gateway.url}/v1/chat/completions", json=chat, headers=headers, timeout=10).status_code

    with Uvicorn(create_app(settings)) as gateway:
        assert ask(gateway, None) == 200  # no key anywhere: open, on loopback
        created = nextturn("keys", "create", "--tenant", "acme", data_dir=tmp_path)
        assert created.returncode == 0, created.stderr
        key = created.stdout.strip()
        eventually(lambda: ask(gateway, None) == 401, "the gateway to close once a key exists")
        assert ask(gateway, key) == 200

    listed = json.loads(nextturn("keys", "list", "--json", data_dir=tmp_path).stdout)
    assert [(k["tenant"], k["is_admin"], k["revoked_at"]) for k in listed] == [("acme", False, None)]
    assert key not in json.dumps(listed) and len(listed[0]["id"]) == 12
    revoked = nextturn("keys", "revoke", listed[0]["id"], data_dir=tmp_path)
    assert revoked.returncode == 0 and "revoked key" in revoked.stdout, revoked.stderr
    assert json.loads(nextturn("keys", "list", "--json", data_dir=tmp_path).stdout)[0]["revoked_at"] is not None
    unknown = nextturn("keys", "revoke", "nt-never-made", data_dir=tmp_path)
    assert unknown.returncode == 1 and "0 keys match" in unknown.stderr
    with Uvicorn(create_app(settings)) as gateway:  # a gateway that has not seen the key before
        assert ask(gateway, key) == 401
        assert ask(gateway, None) == 401  # a revoked key still counts: the gateway stays closed
