from __future__ import annotations

from pathlib import Path

import pytest

from nextturn.errors import ConfigError
from nextturn.settings import Settings


def test_defaults_are_the_embedded_setup() -> None:
    settings = Settings.load()
    assert settings.bus == "sqlite"
    assert settings.data_dir == Path(".nextturn")
    assert settings.store_url == "sqlite:///.nextturn/nextturn.db"
    assert settings.event_log_path == Path(".nextturn/events.db")


def test_the_environment_sets_fields(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NEXTTURN_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("NEXTTURN_BUS", "kafka")
    monkeypatch.setenv("NEXTTURN_KAFKA_BOOTSTRAP_SERVERS", "broker-1:9092,broker-2:9092")
    settings = Settings.load()
    assert settings.bus == "kafka"
    assert settings.kafka_bootstrap_servers == "broker-1:9092,broker-2:9092"
    assert settings.store_url == f"sqlite:///{tmp_path}/nextturn.db"  # derived from the data dir


def test_a_toml_file_sits_below_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "nextturn.toml"
    config.write_text('data_dir = "/srv/nextturn"\ndatabase_url = "postgresql+psycopg://nt@db/nextturn"\n')
    from_file = Settings.load(config)
    assert from_file.data_dir == Path("/srv/nextturn")
    assert from_file.store_url == "postgresql+psycopg://nt@db/nextturn"

    monkeypatch.setenv("NEXTTURN_DATA_DIR", "/elsewhere")
    assert Settings.load(config).data_dir == Path("/elsewhere")
    assert Settings.load(config, data_dir=Path("/explicit")).data_dir == Path("/explicit")


def test_kafka_without_servers_says_how_to_fix_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEXTTURN_BUS", "kafka")
    with pytest.raises(ConfigError, match="NEXTTURN_BUS=kafka needs NEXTTURN_KAFKA_BOOTSTRAP_SERVERS"):
        Settings.load()


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("NEXTTURN_BUS", "rabbitmq", "NEXTTURN_BUS: Input should be 'sqlite' or 'kafka'"),
        ("NEXTTURN_DATABASE_URL", "mysql://db/x", "NEXTTURN_DATABASE_URL: must be a SQLAlchemy URL"),
    ],
)
def test_invalid_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=message):
        Settings.load()


def test_config_file_problems_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        Settings.load(tmp_path / "missing.toml")
    typo = tmp_path / "typo.toml"
    typo.write_text('bsu = "kafka"\n')
    with pytest.raises(ConfigError, match="NEXTTURN_BSU: Extra inputs are not permitted"):
        Settings.load(typo)
    broken = tmp_path / "broken.toml"
    broken.write_text("data_dir = \n")
    with pytest.raises(ConfigError, match="cannot read config file"):
        Settings.load(broken)


def test_the_gateway_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEXTTURN_ENGINE", "openai")
    monkeypatch.setenv("NEXTTURN_UPSTREAM_URL", "http://upstream:9000/v1")
    monkeypatch.setenv("NEXTTURN_MODEL", "big-model")
    monkeypatch.setenv("NEXTTURN_API_KEYS", "sk-a:acme, sk-b:globex")
    monkeypatch.setenv("NEXTTURN_PORT", "9001")
    monkeypatch.setenv("NEXTTURN_HOST", "0.0.0.0")
    monkeypatch.setenv("NEXTTURN_ADMIN_KEY", "sk-admin")
    settings = Settings.load()
    assert settings.engine == "openai"
    assert (settings.upstream_url, settings.model) == ("http://upstream:9000/v1", "big-model")
    assert settings.tenant_keys == {"sk-a": "acme", "sk-b": "globex"}
    assert (settings.host, settings.port, settings.admin_key) == ("0.0.0.0", 9001, "sk-admin")
    assert settings.spool_dir == Path(".nextturn/spool")


def test_an_upstream_engine_needs_its_url_and_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEXTTURN_ENGINE", "openai")
    with pytest.raises(ConfigError, match="NEXTTURN_ENGINE=openai needs NEXTTURN_UPSTREAM_URL"):
        Settings.load()


def test_malformed_api_keys_fail_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEXTTURN_API_KEYS", "sk-a:acme,oops")
    with pytest.raises(ConfigError, match="entries look like key:tenant, not 'oops'"):
        Settings.load()


def test_the_vllm_settings_decide_how_vllm_is_started(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from gateway.engines.vllm_server import VllmServer

    monkeypatch.setenv("NEXTTURN_ENGINE", "vllm")
    monkeypatch.setenv("NEXTTURN_MODEL", str(tmp_path / "base"))
    monkeypatch.setenv("NEXTTURN_VLLM_URL", "http://10.0.0.5:9001")
    monkeypatch.setenv("NEXTTURN_VLLM_PYTHON", "/opt/vllm/bin/python")
    monkeypatch.setenv("NEXTTURN_VLLM_MAX_LORAS", "6")
    monkeypatch.setenv("NEXTTURN_VLLM_MAX_LORA_RANK", "32")
    monkeypatch.setenv("NEXTTURN_VLLM_MAX_CPU_LORAS", "128")
    monkeypatch.setenv("NEXTTURN_VLLM_API_KEY", "sk-vllm")
    command = VllmServer.from_settings(Settings.load(), extra=["--enforce-eager"]).command()
    assert command == ["/opt/vllm/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model",
                       str(tmp_path / "base"), "--served-model-name", "base", "--host", "10.0.0.5", "--port", "9001",
                       "--enable-lora", "--max-loras", "6", "--max-lora-rank", "32", "--max-cpu-loras", "128",
                       "--api-key", "sk-vllm", "--enforce-eager"]
    monkeypatch.setenv("NEXTTURN_VLLM_URL", "https://vllm.example:443")
    with pytest.raises(ConfigError, match="http://"):
        VllmServer.from_settings(Settings.load())


def test_vllm_must_take_adapters_of_the_trainers_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEXTTURN_ENGINE", "vllm")
    monkeypatch.setenv("NEXTTURN_TRAINER_LORA_RANK", "32")
    with pytest.raises(ConfigError, match="NEXTTURN_VLLM_MAX_LORA_RANK"):
        Settings.load()
    monkeypatch.setenv("NEXTTURN_VLLM_MAX_LORA_RANK", "32")
    assert Settings.load().vllm_max_lora_rank == 32
