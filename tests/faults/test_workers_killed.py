"""The signals worker and the trainer, each SIGKILLed at 20 random points of its life under steady traffic
and started again at once: every turn gets its signal, no signal is trained twice, and every version on disk
is whole and announced."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import func, select

from gateway.app import create_app
from nextturn import tables
from nextturn.bus import open_event_log
from nextturn.recorder import Recorder
from nextturn.settings import Settings
from nextturn.store import Store
from signals.worker import from_settings as signals_worker
from trainer.checkpoint import Checkpoints
from trainer.policy import SharedBase
from trainer.scopes import ScopeTrainers
from trainer.worker import TrainerWorker

from support.eventually import eventually
from support.faults import Traffic
from support.services import Uvicorn

pytestmark = pytest.mark.slow
KILLS = 20  # of each
LIFE_S = {"signals": (0.5, 4.0), "trainer": (2.0, 12.0)}  # how long each lives before it is killed, drawn


def test_the_signals_worker_and_the_trainer_killed_at_random_points_lose_and_repeat_nothing(
    tiny_model: Path, tmp_path: Path
) -> None:
    env = {"NEXTTURN_DATA_DIR": str(tmp_path), "NEXTTURN_ENGINE": "embedded", "NEXTTURN_MODEL": str(tiny_model),
           "NEXTTURN_API_KEYS": "sk-acme:acme", "NEXTTURN_SIGNALS_IDLE_TIMEOUT_S": "1",
           "NEXTTURN_TRAINER_BATCH_SIZE": "8", "NEXTTURN_TRAINER_STEPS_PER_BATCH": "1",
           "NEXTTURN_TRAINER_MAX_VERSION_LAG": "1000",  # no rollout here: the base serves every turn
           "NEXTTURN_TRAINER_KEEP_VERSIONS": "1000",
           "NEXTTURN_TRAINER_MAX_AHEAD": "0", "NEXTTURN_TRAINER_HOLDOUT_EVERY": "0",
           "NEXTTURN_TRAINER_PARTIAL_AFTER_S": "2", "NEXTTURN_TRAINER_MIN_BATCH": "2",
           "NEXTTURN_TRAINER_DEVICE": "cpu"}
    settings = Settings(**{key.removeprefix("NEXTTURN_").lower(): value for key, value in env.items()})
    clean = {key: value for key, value in os.environ.items() if not key.startswith("NEXTTURN_")}
    rng = random.Random(20261206)

    def start(stage: str) -> tuple[subprocess.Popen[bytes], float]:
        process = subprocess.Popen([sys.executable, "-m", "nextturn", stage, "run"], env={**clean, **env},
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return process, time.monotonic() + rng.uniform(*LIFE_S[stage])

    kills: Counter[str] = Counter()
    with Uvicorn(create_app(settings)) as gateway:
        with Traffic(gateway.url, "sk-acme", rate_per_s=4, model="tiny", max_tokens=6) as traffic:
            running = {stage: start(stage) for stage in LIFE_S}
            while min(kills[stage] for stage in LIFE_S) < KILLS:
                time.sleep(0.05)
                for stage, (process, deadline) in list(running.items()):
                    if kills[stage] < KILLS and time.monotonic() >= deadline:
                        process.kill()
                        process.wait()
                        kills[stage] += 1
                        running[stage] = start(stage)
            for process, _ in running.values():
                process.kill()
                process.wait()
        answered, failures = list(traffic.answered), dict(traffic.failures)
        store = Store(settings.store_url)
        eventually(lambda: store.count(tables.Turn) >= len(answered), "every answered turn in the store")

    # Once the faults are over, one clean round of each: what the killed ones left must finish, once.
    event_log = open_event_log(settings)
    worker = signals_worker(settings, event_log, store)
    eventually(lambda: worker.drain(0.5) >= 0 and signalled(store) >= len(answered),
               "a signal for every answered turn", timeout_s=60)
    worker.close()
    shared = SharedBase(tiny_model, device="cpu")
    trainers = ScopeTrainers(event_log, lambda scope: TrainerWorker.from_settings(
        settings, event_log, store, scope, shared), store=store, max_resident=2)
    time.sleep(2.5)  # the partial-batch timer
    trainers.drain(1.0)
    trainers.close()
    saved = Checkpoints(settings.trainer_path / "t.acme").state()
    ledger = saved["counts"] if saved is not None else {}

    versions = sorted(path for path in (settings.adapters_path / "t.acme").iterdir() if path.name.isdigit())
    trained = Counter(signal for path in versions
                      for signal in json_of(path / "meta.json")["data"]["signals"])
    whole = [path for path in versions if all((path / name).is_file() for name in
                                              ("meta.json", "adapter_config.json", "adapter_model.safetensors"))]
    recorder = Recorder(event_log, store)  # the gateway, and its recorder, are gone
    eventually(lambda: recorder.drain(0.5) >= 0 and store.count(tables.Adapter) >= len(versions),
               "every version announced and recorded")
    recorder.close()
    twice = sum(count > 1 for count in trained.values())
    print(f"\nsignals worker and trainer each SIGKILLed {KILLS} times under traffic: {len(answered)} turns "
          f"answered, failed requests {sum(failures.values())}, turns stored {store.count(tables.Turn)}, "
          f"turns with a signal {signalled(store)}, versions {len(versions)} (whole {len(whole)}, announced "
          f"{store.count(tables.Adapter)}), signals trained {sum(trained.values())}, trained twice {twice}; "
          f"the last trainer's ledger: {dict(sorted(ledger.items()))}")
    assert failures == {} and store.count(tables.Turn) == len(answered) and signalled(store) == len(answered)
    assert versions and len(whole) == len(versions) and store.count(tables.Adapter) == len(versions)
    assert [int(path.name) for path in versions] == list(range(1, len(versions) + 1)) and twice == 0
    event_log.close()
    store.close()


def signalled(store: Store) -> int:
    found = tables.table_of(tables.Signal)
    with store.engine.connect() as conn:
        return int(conn.execute(select(func.count(func.distinct(found.c.turn_id)))).scalar_one())


def json_of(path: Path) -> dict:  # type: ignore[type-arg]
    import json

    return json.loads(path.read_text())  # type: ignore[no-any-return]

