"""`nextturn signals run | relabel | status`, run as a user runs them: separate processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from nextturn.bus.sqlite import SqliteEventLog
from nextturn.store import Store, upgrade

from support.cli import nextturn, read_status
from support.eventually import eventually
from support.factories import feedback, follow, says, turn


def test_signals_run_resolves_turns_until_interrupted(tmp_path: Path) -> None:
    first = turn("s1", 1, content="What is 2 + 2?")
    second = follow(first, says("Thanks, that's exactly right!"))
    log = SqliteEventLog(tmp_path / "events.db")
    log.append([first, second, feedback(second, value=-1.0)])
    log.close()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXTTURN_")}
    worker = subprocess.Popen([sys.executable, "-m", "nextturn", "signals", "run"],
                              env={**env, "NEXTTURN_DATA_DIR": str(tmp_path)}, stderr=subprocess.PIPE, text=True)
    try:
        status = eventually(lambda: read_status("signals", tmp_path), "two resolved turns", timeout_s=60,
                            interval_s=0.3, until=lambda s: s["resolved_turns"] == 2)
    finally:
        worker.send_signal(signal.SIGINT)
        _, stderr = worker.communicate(timeout=30)
    assert worker.returncode == 0, stderr
    assert "resolved 2" in stderr and "published 2" in stderr
    assert status["resolved_turns"] == 2
    assert status["rewards_by_source"] == {"explicit": 1, "rules": 1}
    assert status["open_cases"] == 1  # the second turn waits for its session to go on or go quiet
    assert status["unpublished"] == 0


def test_relabel_scores_stored_turns_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'nextturn.db'}"
    upgrade(url)
    store = Store(url)
    first = turn("s1", 1, content="Convert 10 km to miles.")
    second = follow(first, says("No, I meant nautical miles."))
    store.apply([first, second, feedback(second, value=1.0)])  # stored by the recorder; no worker ran
    store.close()

    once = nextturn("signals", "relabel", "--since", "2020-01-01", data_dir=tmp_path)
    assert once.returncode == 0, once.stderr
    assert "relabelled 2 turn(s): 2 new signal revision(s), 1 still open" in once.stdout
    twice = nextturn("signals", "relabel", "--since", "2020-01-01", data_dir=tmp_path)
    assert "2 turn(s): 0 new signal revision(s)" in twice.stdout
    status = json.loads(nextturn("signals", "status", "--json", data_dir=tmp_path).stdout)
    assert status["rewards_by_source"] == {"explicit": 1, "rules": 1}
    assert status["hints"] == 1  # "I meant nautical miles."
    events_published = SqliteEventLog(tmp_path / "events.db")
    reader = events_published.consumer(None, ["signals"], start="beginning")
    assert len(reader.poll(timeout_s=1.0)) == 2
    reader.close()
    events_published.close()


def test_relabel_refuses_a_date_it_cannot_read(tmp_path: Path) -> None:
    result = nextturn("signals", "relabel", "--since", "last tuesday", data_dir=tmp_path)
    assert result.returncode == 2 and "--since" in result.stderr


def test_alive_tells_a_turning_loop_from_a_stuck_one(tmp_path: Path) -> None:
    """The health check of docker-compose and Kubernetes: the worker's loop touches its heartbeat file each
    round; a worker that stops turning (here: SIGSTOP) fails `nextturn alive` though its process lives."""
    beat = {"NEXTTURN_HEARTBEAT_FILE": str(tmp_path / "run" / "alive")}
    assert nextturn("alive", data_dir=tmp_path, **beat).returncode == 1  # no round yet
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXTTURN_")}
    worker = subprocess.Popen([sys.executable, "-m", "nextturn", "signals", "run"],
                              env={**env, "NEXTTURN_DATA_DIR": str(tmp_path), **beat}, stderr=subprocess.DEVNULL)
    try:
        alive = eventually(lambda: nextturn("alive", "--within", "3", data_dir=tmp_path, **beat),
                           "the worker's first rounds", timeout_s=60, until=lambda done: done.returncode == 0)
        assert "alive: the loop turned" in alive.stdout
        worker.send_signal(signal.SIGSTOP)
        stuck = eventually(lambda: nextturn("alive", "--within", "3", data_dir=tmp_path, **beat),
                           "the check to notice", timeout_s=30, until=lambda done: done.returncode == 1)
        assert "s old" in stuck.stderr
        worker.send_signal(signal.SIGCONT)
        eventually(lambda: nextturn("alive", "--within", "3", data_dir=tmp_path, **beat).returncode,
                   "the loop to turn again", timeout_s=30, until=lambda code: code == 0)
    finally:
        worker.kill()
        worker.wait(30)
    unset = nextturn("alive", data_dir=tmp_path)
    assert unset.returncode == 1 and "set NEXTTURN_HEARTBEAT_FILE" in unset.stderr
