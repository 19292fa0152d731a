"""`nextturn trainer run | status`, run as a user runs them: separate processes, settings from the environment."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from nextturn.bus.sqlite import SqliteEventLog
from nextturn.store import Store, upgrade
from trainer.policy import Policy

from support.cli import nextturn, read_status
from support.eventually import eventually
from support.trained import record, served
from support.trained import signal as signal_of

pytestmark = pytest.mark.slow  # a trainer process training a real model

SETTINGS = {"NEXTTURN_TRAINER_BATCH_SIZE": "4", "NEXTTURN_TRAINER_HOLDOUT_EVERY": "0",
            "NEXTTURN_TRAINER_DEVICE": "cpu", "NEXTTURN_TRAINER_STEPS_PER_BATCH": "1"}



def test_trainer_run_publishes_a_version_until_interrupted(tiny_model: Path, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'nextturn.db'}"
    upgrade(url)
    store = Store(url)
    log = SqliteEventLog(tmp_path / "events.db")
    base = Policy.load(tiny_model, rank=4, device="cpu")
    turns = [served(base, n) for n in range(5)]
    record(store, log, *turns, *(signal_of(t) for t in turns))
    store.close()
    log.close()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXTTURN_")}
    worker = subprocess.Popen([sys.executable, "-m", "nextturn", "trainer", "run"], stderr=subprocess.PIPE, text=True,
                              env={**env, "NEXTTURN_DATA_DIR": str(tmp_path), "NEXTTURN_MODEL": str(tiny_model),
                                   **SETTINGS})
    try:
        status = eventually(lambda: read_status("trainer", tmp_path), "version 1 with one sample waiting", timeout_s=90,
                            interval_s=0.3, until=lambda s: s["head"] == 1 and s["waiting"] == 1)
    finally:
        worker.send_signal(signal.SIGINT)
        _, stderr = worker.communicate(timeout=60)
    assert worker.returncode == 0, stderr
    assert "versions_published 1" in stderr and "samples_trained 4" in stderr
    assert status["head"] == 1 and status["waiting"] == 1  # the fifth waits for three more
    guards = status["versions"]["default-v1"]["guards"]  # type: ignore[index]
    assert {"entropy", "distinct_2", "length", "kl_to_base"} <= set(guards)


def test_trainer_run_refuses_method_none(tmp_path: Path) -> None:
    result = nextturn("trainer", "run", data_dir=tmp_path, NEXTTURN_TRAIN_METHOD="none")
    assert result.returncode == 1
    assert "NEXTTURN_TRAIN_METHOD=none: there is nothing to train" in result.stderr
