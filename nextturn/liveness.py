"""Whether a worker's loop still turns, for health checks (docker-compose, Kubernetes probes).

Every worker (recorder, signals, trainer, rollout controller) asks its stop event once a round whether to stop.
The CLI hands them a :class:`Heartbeat`: a stop event that also touches a file when it is asked, at most once a
second. A file older than the worker's longest round means its loop is stuck (a wait that never ends, a
deadlock), which a live process does not show; ``nextturn alive --within S`` says so with its exit status.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

TOUCH_EVERY_S = 1.0


class Heartbeat(threading.Event):
    def __init__(self, path: Path | None) -> None:
        super().__init__()
        self._path = path
        self._next = 0.0
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def is_set(self) -> bool:
        now = time.monotonic()
        if self._path is not None and now >= self._next:
            self._next = now + TOUCH_EVERY_S
            try:
                self._path.touch()
            except OSError:
                pass  # an unwritable file reads as a stopped loop, which is what a health check should see
        return super().is_set()


def age_s(path: Path) -> float | None:
    """Seconds since the loop behind ``path`` last turned; None if it never has."""
    try:
        return max(0.0, time.time() - os.stat(path).st_mtime)
    except FileNotFoundError:
        return None
