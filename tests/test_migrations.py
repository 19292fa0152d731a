"""Alembic owns the schema: upgrade, downgrade, and agreement with the SQLModel tables, on both databases."""

from __future__ import annotations

import multiprocessing

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from nextturn import tables
from nextturn.store import Store, create_db_engine, downgrade, upgrade

TABLES = {"tenants", "api_keys", "sessions", "turns", "feedback", "signals", "adapters", "deployments",
          "deployment_changes", "dead_letters", "signal_cases", "erasures", "erased_sessions", "operator_sessions"}


def table_names(url: str) -> set[str]:
    engine = create_db_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_upgrade_then_downgrade_then_upgrade_again(database_url: str) -> None:
    upgrade(database_url)
    assert table_names(database_url) == TABLES
    store = Store(database_url)
    store.check_schema()
    store.close()

    downgrade(database_url, "base")
    assert table_names(database_url) == set()

    upgrade(database_url)
    assert table_names(database_url) == TABLES


def test_the_migrations_match_the_tables(database_url: str) -> None:
    upgrade(database_url)
    engine = create_db_engine(database_url)
    try:
        with engine.connect() as conn:
            differences = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}),
                                           tables.metadata)
    finally:
        engine.dispose()
    assert differences == []


def test_processes_that_start_together_migrate_one_at_a_time(database_url: str) -> None:
    """The gateway, the workers and a status command each migrate the store when they start; when they
    start at once, one migrates and the others find the schema at head (before the lock, one of them
    failed with "table already exists")."""
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=upgrade, args=(database_url,)) for _ in range(4)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
    assert [process.exitcode for process in processes] == [0, 0, 0, 0]
    assert table_names(database_url) == TABLES
