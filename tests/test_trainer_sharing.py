"""Trainers share scopes through the event log: one consumer group splits the signals' partitions (keyed by
scope), and when a trainer dies its scopes move to the others, which resume from the checkpoints."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
from pathlib import Path

import pytest

from nextturn import events
from nextturn.store import Store, upgrade
from trainer.policy import Policy

from support.event_logs import open_log
from support.eventually import eventually
from support.services import Tansu
from support.trained import published, record, run_scope_trainers, served
from support.trained import signal as signal_of

pytestmark = [pytest.mark.slow, pytest.mark.kafka]

TENANTS = ("acme", "globex", "initech", "umbrella", "hooli", "stark", "wayne", "tyrell")


def _taken(log_path: Path) -> set[str]:
    """The scopes a trainer's log says it took."""
    text = log_path.read_text() if log_path.exists() else ""
    return {line.split()[3] for line in text.splitlines() if line.startswith("trainer.scopes training scope ")}


def test_two_trainers_share_scopes_and_one_killed_loses_and_repeats_nothing(
    tiny_model: Path, tansu: Tansu, tmp_path: Path
) -> None:
    """Eight tenants' scopes, two trainers on the Tansu broker: each takes the scopes of its partitions;
    the first is SIGKILLed while it trains, the second takes its scopes over, and in the end every signal
    is in exactly one published version of its scope, versions numbered 1, 2 with none published twice."""
    url = f"sqlite:///{tmp_path / 'nextturn.db'}"
    upgrade(url)
    store = Store(url)
    log = open_log("kafka", tansu.bootstrap_servers)
    base = Policy.load(tiny_model, rank=4, device="cpu")
    turns = {tenant: [served(base, 8 * i + n, tenant=tenant).model_copy(update={"scope": f"t.{tenant}"})
                      for n in range(8)] for i, tenant in enumerate(TENANTS)}
    sent = {tenant: [signal_of(t, reward=1.0 if n % 2 else -1.0) for n, t in enumerate(mine)]
            for tenant, mine in turns.items()}
    for tenant in TENANTS:
        record(store, log, *turns[tenant][:4], *sent[tenant][:4])

    spawn = multiprocessing.get_context("spawn")
    logs = {name: tmp_path / f"trainer-{name}.log" for name in ("first", "second")}
    children = {}
    for name, path in logs.items():
        children[name] = spawn.Process(target=_trainer_with_log, args=(
            str(path), "kafka", tansu.bootstrap_servers, url, str(tiny_model), str(tmp_path)))
        children[name].start()
    try:
        def both_took_scopes_and_versions_came() -> bool:
            done = sum(len(published(tmp_path, f"t.{tenant}")) for tenant in TENANTS)
            return bool(_taken(logs["first"])) and bool(_taken(logs["second"])) and done >= 3

        eventually(both_took_scopes_and_versions_came, "both trainers holding scopes, three versions out",
                   timeout_s=180, interval_s=0.2)
        first_held = _taken(logs["first"])
        os.kill(children["first"].pid, signal.SIGKILL)  # while it trains: no cleanup, no lock released by it
        children["first"].join()
        for tenant in TENANTS:
            record(store, log, *turns[tenant][4:], *sent[tenant][4:])

        def every_scope_has_two_versions() -> bool:
            return all(len(published(tmp_path, f"t.{tenant}")) >= 2 for tenant in TENANTS)

        eventually(every_scope_has_two_versions, "two versions of every scope", timeout_s=300, interval_s=0.5)
    finally:
        for child in children.values():
            if child.is_alive():
                child.kill()
            child.join()
    assert first_held and first_held <= _taken(logs["second"])  # the survivor took over the dead one's scopes
    reader = log.consumer(None, [events.ADAPTERS], start="beginning")
    announced = [d.event for d in reader.poll(500, 2.0) if isinstance(d.event, events.AdapterPublished)]
    reader.close()
    log.close()
    store.close()
    for tenant in TENANTS:
        versions = published(tmp_path, f"t.{tenant}")
        assert sorted(versions) == [1, 2], tenant
        used = [s for meta in versions.values() for s in meta["data"]["signals"]]
        assert sorted(used) == sorted(s.event_id for s in sent[tenant]), tenant  # each exactly once
        paths = {a.path for a in announced if a.scope == f"t.{tenant}"}
        assert len(paths) == 2, tenant  # announcements may repeat (same event), a version is never made twice
        assert [json.loads((Path(p) / "meta.json").read_text())["step"] for p in sorted(paths)] == [1, 2]


def _trainer_with_log(log_path: str, *args: str) -> None:
    handle = open(log_path, "w", buffering=1)  # noqa: SIM115  (the child's stderr until it dies)
    os.dup2(handle.fileno(), 2)
    run_scope_trainers(*args)
