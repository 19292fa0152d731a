"""Postgres restarts (stopped at once, as a crash stops it, then started on the same data) under steady
traffic, with the recorder and the signals worker running: no client request fails, and every turn, rating
and signal answered is stored exactly once."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from gateway.app import create_app
from nextturn import tables
from nextturn.bus import open_event_log
from nextturn.settings import Settings
from nextturn.store import Store, upgrade
from signals import worker as signals_worker

from support.eventually import eventually
from support.faults import Traffic
from support.services import PostgresCluster, Uvicorn
from support.upstream import MODEL

pytestmark = [pytest.mark.postgres, pytest.mark.slow]
DOWN_S = 5.0


def per_turn(store: Store, table: type, ids: list[str]) -> dict[str, int]:
    """Rows per turn id (signals: distinct signals, each counted once however many revisions it has)."""
    found = tables.table_of(table)
    column = found.c.id if table is tables.Turn else found.c.turn_id
    counted = func.count(func.distinct(found.c.signal_id)) if table is tables.Signal else func.count()
    with store.engine.connect() as conn:
        return dict(conn.execute(select(column, counted).where(column.in_(ids)).group_by(column)).all())


def test_a_database_restarted_under_traffic_fails_no_request_and_loses_or_doubles_nothing(
    upstream: Uvicorn, tmp_path: Path
) -> None:
    cluster = PostgresCluster()
    cluster.start()
    stop = threading.Event()
    signals: threading.Thread | None = None
    try:
        url = cluster.create_database("faults")
        upgrade(url)
        settings = Settings(data_dir=tmp_path, engine="openai", upstream_url=f"{upstream.url}/v1", model=MODEL,
                            api_keys="sk-acme:acme", database_url=url, signals_idle_timeout_s=1.0)
        store, event_log = Store(url), open_event_log(settings)
        worker = signals_worker.from_settings(settings, event_log, store)
        signals = threading.Thread(target=worker.run, args=(stop,), daemon=True)
        signals.start()
        with Uvicorn(create_app(settings)) as gateway:
            with Traffic(gateway.url, "sk-acme", rate_per_s=20) as traffic:
                time.sleep(3)
                before = len(traffic.answered)
                cluster.restart(down_s=DOWN_S)
                during = len(traffic.answered) - before
                time.sleep(4)
            answered = list(traffic.answered)

            def stored() -> tuple[int, ...]:
                return tuple(len(per_turn(store, table, answered)) for table in (tables.Turn, tables.Feedback,
                                                                                  tables.Signal))

            eventually(stored, f"all {len(answered)} answered turns, ratings and signals in the store",
                       until=lambda found: found == (len(answered),) * 3, timeout_s=120)
        assert signals.is_alive(), "the signals worker died"
        failures = dict(traffic.failures)
        doubled = {table.__name__: sum(n > 1 for n in per_turn(store, table, answered).values())
                   for table in (tables.Turn, tables.Feedback, tables.Signal)}
        extra = store.count(tables.Turn) - len(answered)
        print(f"\ndatabase down {DOWN_S:.0f} s under 20 requests/s: {len(answered)} turns answered ({during} "
              f"while it was down), failed requests {sum(failures.values())}, lost 0 (turns, ratings, signals "
              f"all stored), doubled {doubled}, extra turns {extra}; the signals worker retried "
              f"{worker.counts['retries']} batch(es)")
        assert failures == {} and during > 0 and extra == 0 and not any(doubled.values())
        assert worker.counts["retries"] > 0  # the worker met the outage and went on
    finally:
        stop.set()
        if signals is not None:
            signals.join(30)
            worker.close()
            event_log.close()
            store.close()
        cluster.stop()
