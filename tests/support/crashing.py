"""A signals worker that dies abruptly at a chosen point of a batch (run in a child process)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from nextturn.events import SignalExtracted
from nextturn.store import Store
from signals.worker import SignalsWorker

from support.event_logs import open_log

STAGES = ("before-publish", "before-commit")


def run_until_crash(backend: str, where: str, store_url: str, stage: str, batch: int, batch_size: int) -> None:
    """Handle batches until the ``batch``-th one that writes signals, then exit at once at ``stage``:
    after its store transaction but before publishing, or after publishing but before committing offsets.
    ``os._exit`` skips every cleanup, as a killed process would."""
    assert stage in STAGES

    class Dying(SignalsWorker):
        written = 0

        def _publish(self, signals: Sequence[SignalExtracted]) -> None:
            if signals:
                self.written += 1
            if stage == "before-publish" and self.written == batch:
                os._exit(70)
            super()._publish(signals)
            if stage == "before-commit" and self.written == batch:
                os._exit(70)

    worker = Dying(open_log(backend, where), Store(store_url), batch_size=batch_size, idle_timeout_s=3600)
    while True:
        worker.run_once(0.5)
