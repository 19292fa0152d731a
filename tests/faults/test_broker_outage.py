"""The event log's broker goes away under steady traffic and comes back with its records, as a restarted Kafka
broker does: no client request fails, and every turn and rating answered is recorded exactly once."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from gateway.app import create_app
from nextturn import tables
from nextturn.settings import Settings
from nextturn.store import Store

from support.eventually import eventually
from support.faults import TcpProxy, Traffic
from support.services import Tansu, Uvicorn, free_port
from support.upstream import MODEL

pytestmark = [pytest.mark.kafka, pytest.mark.slow]
DOWN_S = 8.0


def stored(store: Store, table: type, ids: list[str]) -> int:
    column = tables.table_of(table).c.id if table is tables.Turn else tables.table_of(table).c.turn_id
    with store.engine.connect() as conn:
        return int(conn.execute(select(func.count()).where(column.in_(ids))).scalar_one())


def test_a_broker_gone_for_seconds_under_traffic_fails_no_request_and_loses_no_turn(
    upstream: Uvicorn, tmp_path: Path
) -> None:
    proxy_port = free_port()
    broker = Tansu(advertised_port=proxy_port)
    proxy = TcpProxy(broker.port, port=proxy_port)
    broker.start()
    proxy.start()
    settings = Settings(data_dir=tmp_path, engine="openai", upstream_url=f"{upstream.url}/v1", model=MODEL,
                        api_keys="sk-acme:acme", bus="kafka", kafka_bootstrap_servers=broker.bootstrap_servers)
    app = create_app(settings)
    waiting = 0
    try:
        with Uvicorn(app) as gateway:
            publisher = app.state.turns.publisher
            with Traffic(gateway.url, "sk-acme", rate_per_s=20) as traffic:
                time.sleep(3)
                before = len(traffic.answered)
                proxy.stop()  # every connection to the broker drops; new ones are refused
                down_until = time.monotonic() + DOWN_S
                while time.monotonic() < down_until:
                    waiting = max(waiting, publisher.queued + len(publisher.spool))
                    time.sleep(0.2)
                during = len(traffic.answered) - before
                proxy.start()
                time.sleep(4)
            store = Store(settings.store_url)
            answered = list(traffic.answered)
            eventually(lambda: stored(store, tables.Turn, answered) == len(answered) and
                       stored(store, tables.Feedback, answered) == len(answered),
                       "every answered turn and its rating in the store", timeout_s=180)
        failures = dict(traffic.failures)
        extra = store.count(tables.Turn) - len(answered)
        print(f"\nbroker gone {DOWN_S:.0f} s under 20 requests/s: {len(answered)} turns answered "
              f"({during} while it was gone, {waiting} events waiting at most), failed requests "
              f"{sum(failures.values())}, turns lost {len(answered) - stored(store, tables.Turn, answered)}, "
              f"duplicated or extra {extra}")
        assert failures == {} and during > 0 and waiting > 0
        assert extra == 0 and store.count(tables.Feedback) == len(answered)
        store.close()
    finally:
        proxy.stop()
        broker.stop()
