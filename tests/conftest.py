"""Fixtures: real services (Tansu, Postgres) and both event-log backends."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from nextturn.bus import EventLog
from nextturn.store import Store, upgrade

from support.event_logs import open_log
from support.services import PostgresCluster, Tansu, Uvicorn

SLOW_TIERS = ("demo_model", "vllm")  # each implies slow: `make check` runs -m "not slow"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if any(item.get_closest_marker(tier) for tier in SLOW_TIERS):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _no_nextturn_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings read NEXTTURN_* variables; a developer's shell must not change what a test sees."""
    for name in list(os.environ):
        if name.startswith("NEXTTURN_"):
            monkeypatch.delenv(name)


@pytest.fixture
def tansu() -> Iterator[Tansu]:
    broker = Tansu()
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    cluster = PostgresCluster()
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(params=["sqlite", pytest.param("kafka", marks=pytest.mark.kafka)])
def log_spec(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(backend, where) for a fresh, empty event log."""
    if request.param == "sqlite":
        yield "sqlite", str(tmp_path / "events.db")
        return
    broker = Tansu()
    broker.start()
    yield "kafka", broker.bootstrap_servers
    broker.stop()


@pytest.fixture
def event_log(log_spec: tuple[str, str]) -> Iterator[EventLog]:
    log = open_log(*log_spec)
    yield log
    log.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database: a SQLite file, or a fresh database in the private Postgres cluster."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'nextturn.db'}"
    cluster: PostgresCluster = request.getfixturevalue("postgres")
    return cluster.create_database(f"test_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    """A migrated, empty store on each database."""
    upgrade(database_url)
    store = Store(database_url)
    yield store
    store.close()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny local model directory, built once per test run (nothing is downloaded)."""
    from nextturn.local_models import init_model

    return init_model(tmp_path_factory.mktemp("models") / "tiny", size="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_adapters(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two LoRA adapters for the tiny model, with random (non-zero) weights, so each changes its outputs."""
    from support.adapters import random_adapter

    root = tmp_path_factory.mktemp("adapters")
    return {name: random_adapter(tiny_model, root / name, seed=seed) for seed, name in enumerate(("a1", "a2"), 1)}


@pytest.fixture(scope="module")
def upstream() -> Iterator[Uvicorn]:
    """The scripted OpenAI-compatible upstream (tests/upstream.py) on loopback."""
    from support.upstream import create_upstream

    with Uvicorn(create_upstream()) as server:
        yield server


@pytest.fixture
def client(gateway: Uvicorn) -> Iterator[openai.OpenAI]:
    """The stock openai SDK against the test module's ``gateway`` fixture, as tenant acme (key sk-acme)."""
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="sk-acme", max_retries=0) as client:
        yield client
