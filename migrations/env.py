"""Alembic environment: migrates the URL that nextturn.store.alembic_config puts in the config."""

from __future__ import annotations

from alembic import context
from sqlalchemy import pool

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
        with engine.connect() as connection:
            # render_as_batch: SQLite cannot ALTER most things in place; batch mode rebuilds the table.
            context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True,
                              compare_type=True)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
