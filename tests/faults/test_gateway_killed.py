"""A gateway SIGKILLed while its spool holds what the event log could not take, and one whose disk is full
under the spool: no client request fails, and every turn it answered reaches the store once the log is back
(a spool left behind is adopted by the next gateway on the same data directory)."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from nextturn import tables
from nextturn.bus import open_event_log
from nextturn.recorder import Recorder
from nextturn.settings import Settings
from nextturn.store import Store, upgrade

from support.eventually import eventually
from support.faults import TcpProxy, Traffic
from support.services import Tansu, Uvicorn, free_port, wait_for_port
from support.upstream import MODEL

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


@contextmanager
def broker_behind_proxy() -> Iterator[tuple[Tansu, TcpProxy]]:
    port = free_port()
    broker = Tansu(advertised_port=port)
    proxy = TcpProxy(broker.port, port=port)
    broker.start()
    proxy.start()
    try:
        yield broker, proxy
    finally:
        proxy.stop()
        broker.stop()


def gateway_process(settings: Settings, port: int, *, file_limit: int | None = None) -> subprocess.Popen[bytes]:
    """``nextturn serve`` as its own process; ``file_limit``: the most bytes it may write to one file (a disk
    that is full once its spool reaches that size)."""
    clean = {key: value for key, value in os.environ.items() if not key.startswith("NEXTTURN_")}
    env = {**clean, **settings.environment(), "NEXTTURN_PORT": str(port)}

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        if file_limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    process = subprocess.Popen([sys.executable, "-m", "nextturn", "serve"], env=env, preexec_fn=limited,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port, timeout_s=60)
    return process


def on_kafka(data_dir: Path, upstream: Uvicorn, broker: Tansu) -> Settings:
    """A gateway's settings: the scripted upstream, the event log on ``broker``, no recorder of its own (the
    test records, after the gateway is gone), the store migrated."""
    settings = Settings(data_dir=data_dir, engine="openai", upstream_url=f"{upstream.url}/v1", model=MODEL,
                        api_keys="sk-acme:acme", bus="kafka", kafka_bootstrap_servers=broker.bootstrap_servers,
                        gateway_recorder=False)
    upgrade(settings.store_url)
    return settings


def recorded(store: Store, ids: list[str]) -> int:
    turns = tables.table_of(tables.Turn)
    with store.engine.connect() as conn:
        return int(conn.execute(select(func.count()).where(turns.c.id.in_(ids))).scalar_one())


LIMIT = 64 << 10


def spool_bytes(data_dir: Path) -> int:
    return sum(path.stat().st_size for path in (data_dir / "spool").glob("*.jsonl"))


def stalled(data_dir: Path, traffic: Traffic) -> bool:
    """Whether the spool stayed the same size for 2 s while requests were answered."""
    size, answered = spool_bytes(data_dir), len(traffic.answered)
    time.sleep(2)
    return spool_bytes(data_dir) == size and len(traffic.answered) > answered


def spooled(data_dir: Path) -> int:
    return sum(path.read_bytes().count(b"\n") for path in (data_dir / "spool").glob("*.jsonl"))


def test_a_gateway_killed_with_a_full_spool_loses_none_of_it(upstream: Uvicorn, tmp_path: Path) -> None:
    with broker_behind_proxy() as (broker, proxy):
        settings, port = on_kafka(tmp_path, upstream, broker), free_port()
        first = gateway_process(settings, port)
        url = f"http://127.0.0.1:{port}"
        proxy.stop()  # the log is gone: what the gateway answers now waits in its queue, then its spool
        with Traffic(url, "sk-acme", rate_per_s=20) as traffic:
            eventually(lambda: spooled(tmp_path) >= 200, "200 events in the spool", timeout_s=120)
        answered = list(traffic.answered)
        eventually(lambda: spooled(tmp_path) >= 2 * len(answered), "every answered turn and rating spooled")
        first.send_signal(signal.SIGKILL)
        first.wait()
        held = spooled(tmp_path)

        proxy.start()
        second = gateway_process(settings, port)  # adopts the spool it finds, and replays it
        try:
            store, event_log = Store(settings.store_url), open_event_log(settings)
            recorder = Recorder(event_log, store)
            eventually(lambda: recorder.drain(1.0) >= 0 and recorded(store, answered) == len(answered),
                       "every turn the killed gateway answered in the store", timeout_s=120)
            assert httpx.get(f"{url}/healthz").json()["status"] == "ok"
        finally:
            second.send_signal(signal.SIGTERM)
            second.wait(30)
        extra = store.count(tables.Turn) - len(answered)
        print(f"\ngateway SIGKILLed holding {held} spooled events: {len(answered)} turns answered, failed requests "
              f"{sum(traffic.failures.values())}, turns lost {len(answered) - recorded(store, answered)}, "
              f"extra {extra}, spool left {spooled(tmp_path)}")
        assert traffic.failures == {} and extra == 0 and spooled(tmp_path) == 0
        assert store.count(tables.Feedback) == len(answered)
        recorder.close()
        event_log.close()
        store.close()


def test_a_full_disk_under_the_spool_fails_no_request_and_the_queue_keeps_what_it_cannot_spool(
    upstream: Uvicorn, tmp_path: Path
) -> None:
    with broker_behind_proxy() as (broker, proxy):
        settings, port = on_kafka(tmp_path, upstream, broker), free_port()
        gateway = gateway_process(settings, port, file_limit=LIMIT)  # the disk is full at 64 KiB of spool
        url = f"http://127.0.0.1:{port}"
        try:
            proxy.stop()
            with Traffic(url, "sk-acme", rate_per_s=20) as traffic:
                eventually(lambda: spool_bytes(tmp_path) > 0, "the spool to begin", timeout_s=120)
                eventually(lambda: stalled(tmp_path, traffic), "the spool to stop growing: the disk is full",
                           timeout_s=120)
                full_at, answered_then = spooled(tmp_path), len(traffic.answered)
                time.sleep(5)  # and the gateway goes on answering, with nowhere to write
                beyond = len(traffic.answered) - answered_then
                proxy.start()
            answered = list(traffic.answered)
            store, event_log = Store(settings.store_url), open_event_log(settings)
            recorder = Recorder(event_log, store)
            eventually(lambda: recorder.drain(1.0) >= 0 and recorded(store, answered) == len(answered),
                       "every answered turn in the store", timeout_s=120)
            health = httpx.get(f"{url}/healthz").json()
        finally:
            gateway.send_signal(signal.SIGTERM)
            gateway.wait(30)
        print(f"\nthe disk under the spool full (64 KiB, {full_at} events fitted), the log down meanwhile: "
              f"{len(answered)} turns "
              f"answered ({beyond} in 5 s after the disk was full), failed requests "
              f"{sum(traffic.failures.values())}, turns lost {len(answered) - recorded(store, answered)}, "
              f"extra {store.count(tables.Turn) - len(answered)}")
        assert traffic.failures == {} and store.count(tables.Turn) == len(answered)
        assert health["status"] == "ok", health
        recorder.close()
        event_log.close()
        store.close()
