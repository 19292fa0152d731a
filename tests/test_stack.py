"""``nextturn up``: the loop's components as supervised processes, started from one Settings object."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from nextturn.errors import ConfigError
from nextturn.settings import Settings, child_environment
from nextturn.stack import Component, Stack, StackFailed, activity, components
from nextturn.store import Store

from support.eventually import eventually
from support.services import free_port


def test_a_child_builds_exactly_the_parents_settings(tmp_path: Path) -> None:
    parent = Settings(data_dir=tmp_path, rollout_schedule=[0.2, 0.6], access_log=True, judge_url="http://j/v1",
                      judge_model="m", trainer_learning_rate=0.01, api_keys="k:a,k2:b", port=9123)
    inherited = {"NEXTTURN_TRAIN_METHOD": "rl", "NEXTTURN_CONFIG": "/nowhere.toml", "PATH": "/bin"}
    environment = child_environment(parent, inherited)
    assert environment["PATH"] == "/bin" and "NEXTTURN_CONFIG" not in environment
    probe = ("import json; from nextturn.settings import Settings; "
             "print(Settings.load().model_dump_json())")
    result = subprocess.run([sys.executable, "-c", probe], env=environment, capture_output=True, text=True, check=True)
    assert Settings.model_validate_json(result.stdout) == parent  # the shell's NEXTTURN_TRAIN_METHOD did not leak


def test_without_a_trainer_method_up_runs_no_trainer(tmp_path: Path) -> None:
    names = [c.name for c in components(Settings(data_dir=tmp_path, train_method="none"))]
    assert names == ["gateway", "signals", "rollout"]
    assert "trainer" in [c.name for c in components(Settings(data_dir=tmp_path))]


def test_up_refuses_to_start_without_a_model(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nextturn model init"):
        Stack(Settings(data_dir=tmp_path)).start()
    assert not (tmp_path / "logs").exists()  # nothing was started


def test_a_gateway_that_keeps_failing_stops_the_stack_with_its_log(tmp_path: Path, tiny_model: Path) -> None:
    stack = Stack(Settings(data_dir=tmp_path, model=str(tiny_model)), backoff_s=0.01,
                  parts=[Component("broken", ("no-such-command",))])
    with pytest.raises(StackFailed, match=r"broken exited 5 times(.|\n)*No such command"):
        stack.start(health_timeout_s=60)
    assert stack.children[0].restarts == 4


def test_a_worker_that_keeps_failing_is_retried_while_the_gateway_serves(tmp_path: Path, tiny_model: Path) -> None:
    """One worker crash-looping (a poison event, a bad setting) must not stop serving and recording for
    everyone: it is marked failing and retried every 30 s."""
    stack = Stack(Settings(data_dir=tmp_path, model=str(tiny_model), port=free_port()), backoff_s=0.01,
                  parts=[Component("gateway", ("serve",)), Component("broken", ("no-such-command",))])
    with stack:
        broken = stack.children[1]
        eventually(lambda: (stack.check(), broken.state == "failing")[1], "the worker marked failing",
                   timeout_s=60, interval_s=0.05)
        assert broken.failing and broken.restart_at is not None  # retried later, while the rest goes on
        stack.check()
        assert stack.children[0].state == "running"
        assert httpx.get(f"{stack.url}/healthz", timeout=5).status_code == 200
        assert "No such command" in stack.tail("broken")


@pytest.mark.slow
def test_up_runs_the_loop_restarts_a_killed_worker_and_stops_cleanly_on_ctrl_c(tmp_path: Path,
                                                                                 tiny_model: Path) -> None:
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NEXTTURN_")}
    env = {**clean, "NEXTTURN_DATA_DIR": str(tmp_path), "NEXTTURN_MODEL": str(tiny_model),
           "NEXTTURN_PORT": str(port), "NEXTTURN_API_KEYS": "sk-acme:acme", "NEXTTURN_SIGNALS_IDLE_TIMEOUT_S": "1"}
    up = subprocess.Popen([sys.executable, "-m", "nextturn", "up"], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    store = Store(Settings(data_dir=tmp_path).store_url)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-acme", max_retries=0)
        model = eventually(lambda: _models(client), "the gateway", timeout_s=120)[0]
        ask = [{"role": "user", "content": "Name a flower."}]
        first = client.chat.completions.create(model=model, messages=ask, max_tokens=4)  # type: ignore[arg-type]
        # The signals worker resolves the turn once the session is quiet: the loop runs end to end.
        # (acme's scope, t.acme, is the busiest: what `up` shows)
        eventually(lambda: activity(store, None).resolved >= 1, "a signal for the first turn", timeout_s=120)

        workers = _children(up.pid)
        signals_pid = next(pid for pid, argv in workers.items() if "signals" in argv)
        os.kill(signals_pid, signal.SIGKILL)
        eventually(lambda: any("signals" in argv and pid != signals_pid for pid, argv in _children(up.pid).items()),
                   "the supervisor to start the signals worker again", timeout_s=120)
        again = [*ask, {"role": "assistant", "content": first.choices[0].message.content or ""},
                 {"role": "user", "content": "Another one, please."}]
        client.chat.completions.create(model=model, messages=again, max_tokens=4)  # type: ignore[arg-type]
        eventually(lambda: activity(store, None).resolved >= 2, "the restarted worker to resolve the second turn",
                   timeout_s=120)
        client.close()

        everyone = _children(up.pid)
        up.send_signal(signal.SIGINT)
        output, _ = up.communicate(timeout=90)
    finally:
        _stop(up)
        store.close()
    assert up.returncode == 0, output
    assert "stopped: gateway, signals, trainer, rollout" in output
    assert not [pid for pid in everyone if _alive(pid)]  # no component outlived the supervisor


@pytest.mark.slow
def test_up_with_scopes_per_tenant_gives_each_tenant_versions_of_its_own(tmp_path: Path, tiny_model: Path) -> None:
    """The newcomer's check: ``nextturn up`` (scopes per tenant by default), two tenants rate a few answers, and each
    gets versions of its own (in ``nextturn scopes list`` and the X-Nextturn-Adapter header) that the other
    cannot see or pin."""
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NEXTTURN_")}
    env = {**clean, "NEXTTURN_DATA_DIR": str(tmp_path), "NEXTTURN_MODEL": str(tiny_model), "NEXTTURN_PORT": str(port),
           "NEXTTURN_API_KEYS": "sk-acme:acme,sk-globex:globex",
           "NEXTTURN_SIGNALS_IDLE_TIMEOUT_S": "1", "NEXTTURN_TRAINER_BATCH_SIZE": "2",
           "NEXTTURN_TRAINER_STEPS_PER_BATCH": "1", "NEXTTURN_TRAINER_HOLDOUT_EVERY": "0"}
    up = subprocess.Popen([sys.executable, "-m", "nextturn", "up"], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    keys = {"acme": {"Authorization": "Bearer sk-acme"}, "globex": {"Authorization": "Bearer sk-globex"}}

    def scopes() -> dict[str, dict[str, object]]:
        listed = subprocess.run([sys.executable, "-m", "nextturn", "scopes", "list", "--json"], env=env,
                                capture_output=True, text=True, check=True)
        return {row["scope"]: row for row in json.loads(listed.stdout)}

    def ask(tenant: str, model: str, text: str) -> httpx.Response:
        return httpx.post(f"{url}/v1/chat/completions", headers=keys[tenant], timeout=60,
                          json={"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 4})

    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-acme", max_retries=0)
        base = eventually(lambda: _models(client), "the gateway", timeout_s=120)[0]
        client.close()
        for tenant in keys:
            for n, rating in enumerate((1.0, -1.0, 1.0, -1.0)):
                answer = ask(tenant, base, f"{tenant} asks question {n}")
                assert answer.status_code == 200 and answer.headers["X-Nextturn-Adapter"] == "base"
                rated = httpx.post(f"{url}/v1/feedback", headers=keys[tenant], timeout=30,
                                   json={"turn_id": answer.json()["id"], "kind": "rating", "value": rating})
                assert rated.status_code == 200, rated.text
        found = eventually(scopes, "a canary of its own in each tenant's scope", timeout_s=240, interval_s=2.0,
                           until=lambda rows: all(rows.get(f"t.{tenant}", {}).get("canary") for tenant in keys))
        for tenant, other in (("acme", "globex"), ("globex", "acme")):
            mine, theirs = str(found[f"t.{tenant}"]["canary"]), str(found[f"t.{other}"]["canary"])
            assert mine.startswith(f"t.{tenant}-v")
            pinned = ask(tenant, mine, "again")
            assert pinned.status_code == 200 and pinned.headers["X-Nextturn-Adapter"] == mine
            assert ask(tenant, theirs, "again").status_code == 404  # another tenant's version: not found
            listed = httpx.get(f"{url}/v1/models", headers=keys[tenant], timeout=30).json()["data"]
            assert mine in {model["id"] for model in listed} and theirs not in {model["id"] for model in listed}
        assert found["default"]["versions"] == 0  # no tenant taught the shared lineage
        store = Store(Settings(data_dir=tmp_path).store_url)
        shown = activity(store, every_scope=True).scopes  # what up's live view lists under "scopes"
        store.close()
        assert {line.split(":")[0] for line in shown} == {"t.acme", "t.globex"}
        assert all("canary t." in line for line in shown), shown
        up.send_signal(signal.SIGINT)
        output, _ = up.communicate(timeout=90)
    finally:
        _stop(up)
    assert up.returncode == 0, output


def _stop(up: subprocess.Popen[str]) -> None:
    """After a failure: stop ``up`` as Ctrl-C would (it stops its components), and kill it only if it hangs."""
    if up.poll() is not None:
        return
    up.send_signal(signal.SIGINT)
    try:
        up.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        up.kill()
        up.communicate()


def _models(client: openai.OpenAI) -> list[str] | None:
    try:
        return [model.id for model in client.models.list().data]
    except openai.APIConnectionError:
        return None


def _children(parent: int) -> dict[int, str]:
    """Direct child processes of ``parent``: pid -> command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
            found[int(entry.name)] = argv
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_a_clean_stop_reports_every_component(tmp_path: Path, tiny_model: Path) -> None:
    settings = Settings(data_dir=tmp_path, model=str(tiny_model), port=free_port(), train_method="none")
    stack = Stack(settings)
    stack.start()
    try:
        assert [child.state for child in stack.children] == ["running"] * 3
    finally:
        statuses = stack.stop()
    assert set(statuses) == {"gateway", "signals", "rollout"}
    assert all(code in (0, -signal.SIGTERM) for code in statuses.values()), statuses
    assert [child.state for child in stack.children] == ["stopped"] * 3


def test_library_warnings_go_to_the_log_once_and_never_to_the_terminal(tmp_path: Path) -> None:
    """What `up` and `demo` do before their live views: a FutureWarning a library raises on every call (peft
    on transformers 5 does, loading an adapter) lands in the log once; the terminal shows only our output."""
    log = tmp_path / "logs" / "demo.log"
    program = (
        "import logging, warnings\n"
        "from pathlib import Path\n"
        "from nextturn.stack import log_library_output\n"
        f"log_library_output(Path({str(log)!r}))\n"
        "def library_call():\n"
        "    warnings.warn('`is_gradient_checkpointing` is deprecated', FutureWarning, stacklevel=2)\n"
        "for _ in range(3):\n"
        "    library_call()\n"
        "logging.getLogger('somelibrary').warning('a record for the log')\n"
        "print('progress 3/3')\n"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONWARNINGS": "default"})
    assert result.returncode == 0, result.stderr
    assert (result.stdout, result.stderr) == ("progress 3/3\n", "")
    written = log.read_text()
    assert written.count("`is_gradient_checkpointing` is deprecated") == 1, written
    assert "FutureWarning" in written and "a record for the log" in written
