"""Alembic migrations for the store. Run them with `nextturn db upgrade` (see nextturn.store.upgrade)."""
