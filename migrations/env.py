"""Alembic environment: migrates the URL that nextturn.store.alembic_config puts in the config."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import context
from sqlalchemy import Connection, make_url, pool

from nextturn import tables
from nextturn.store import create_db_engine

config = context.config
target_metadata = tables.metadata


def run_offline() -> None:
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata,
                      literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    url = config.get_main_option("sqlalchemy.url")
    assert url is not None
    engine = create_db_engine(url, poolclass=pool.NullPool)  # one-shot: no connection outlives the run
    try:
        with _one_at_a_time(url), engine.connect() as connection:
            # render_as_batch: SQLite cannot ALTER most things in place; batch mode rebuilds the table.
            context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True,
                              compare_type=True)
            with context.begin_transaction():
                _lock_postgres(connection)
                context.run_migrations()  # reads the current revision first: after the lock, so a second
                # process that waited finds the schema at head and does nothing
    finally:
        engine.dispose()


@contextmanager
def _one_at_a_time(url: str) -> Iterator[None]:
    """Processes that start together (the gateway, workers, a status command) each migrate the embedded
    SQLite store; without a lock two of them create the same table and one fails. A file lock beside the
    database serialises them."""
    database = make_url(url).database if url.startswith("sqlite") else None
    if not database or database == ":memory:":
        yield
        return
    with Path(f"{database}.migrate-lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _lock_postgres(connection: Connection) -> None:
    """The same on Postgres: a transaction-scoped advisory lock (released at commit)."""
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql("SELECT pg_advisory_xact_lock(7470527)")


if context.is_offline_mode():
    run_offline()
else:
    run_online()
