"""The recorder: copies events from the event log into the store.

Order of operations, for each batch:
1. poll a batch (bad records are dead-lettered by the consumer's policy and reach the store through the
   ``dead-letters`` topic);
2. write the batch to the store in one transaction, idempotently by event id;
3. commit the offsets.
A crash before 3 redelivers the batch, and step 2 makes the second write a no-op: every event is stored
exactly once.

Each gateway runs a recorder in a child process (:class:`RecorderProcess`), not a thread: decoding events
and writing the store would otherwise hold the interpreter lock while requests wait for it, which cost
about 1.2 ms at p50 and most of the p99 tail of the gateway's added latency (bench/gateway_overhead.py).
Several recorders (one per gateway replica) share the work as members of one consumer group.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from dataclasses import dataclass
from multiprocessing.synchronize import Event as ProcessEvent

from nextturn import events
from nextturn.bus import EventLog, open_event_log
from nextturn.errors import CommitFailed, EventLogUnavailable, StoreUnavailable
from nextturn.settings import Settings
from nextturn.store import Store

log = logging.getLogger(__name__)

GROUP = "recorder"
RECORDED_TOPICS = (events.TURNS, events.FEEDBACK, events.SIGNALS, events.ADAPTERS, events.DEPLOYMENTS,
                   events.DEAD_LETTERS)


@dataclass(frozen=True)
class Batch:
    polled: int  # events delivered (bad records are dead-lettered, not counted)
    new: int  # of those, events the store did not have yet


class Recorder:
    def __init__(self, log: EventLog, store: Store, *, group: str = GROUP, batch_size: int = 500) -> None:
        self._log, self._group = log, group
        self._consumer = log.consumer(group, RECORDED_TOPICS)
        self._store = store
        self._batch_size = batch_size

    def run_once(self, timeout_s: float = 1.0) -> Batch:
        """Record one batch."""
        deliveries = self._consumer.poll(self._batch_size, timeout_s)
        new = self._store.apply([delivery.event for delivery in deliveries]) if deliveries else 0
        try:
            self._consumer.commit()
        except CommitFailed:
            pass  # the group moved on; the batch comes again to its new owner and is a no-op there
        return Batch(polled=len(deliveries), new=new)

    def drain(self, idle_s: float = 0.5) -> int:
        """Record until a poll waits ``idle_s`` for nothing; return how many events were new."""
        new = 0
        while (batch := self.run_once(idle_s)).polled:
            new += batch.new
        return new

    def run(self, stop: threading.Event | ProcessEvent, *, child: bool = False,
            pause_s: tuple[float, float] = (0.5, 30.0)) -> None:
        """Record until ``stop`` is set; a ``child`` also stops when its parent dies (it outlives no killed
        gateway). The store or the log being unavailable is a pause, not an end: the recorder waits (the pause
        doubling up to its maximum), rejoins its group so that the batch it could not write comes again from
        the last commit, and goes on."""
        parent = os.getppid()
        pause, rejoin = pause_s[0], False
        while not stop.is_set() and (not child or os.getppid() == parent):
            try:
                if rejoin:
                    self._rejoin()
                    rejoin = False
                self.run_once(timeout_s=0.5)
                pause = pause_s[0]
            except (StoreUnavailable, EventLogUnavailable) as exc:
                log.warning("recording paused for %.1f s: %s", pause, exc)
                stop.wait(pause)
                pause, rejoin = min(pause * 2, pause_s[1]), True

    def _rejoin(self) -> None:
        try:
            self._consumer.close()
        except EventLogUnavailable:
            pass  # it leaves the group by its session timeout instead
        self._consumer = self._log.consumer(self._group, RECORDED_TOPICS)

    def close(self) -> None:
        self._consumer.close()


def record(settings: Settings, stop: threading.Event | ProcessEvent, *, child: bool = False) -> None:
    """Run a recorder on the configured event log and store until ``stop`` is set (``nextturn record``, or a
    gateway's child process)."""
    event_log = open_event_log(settings)
    store = Store.from_settings(settings)
    recorder = Recorder(event_log, store)
    try:
        recorder.run(stop, child=child)
    finally:
        recorder.close()
        event_log.close()
        store.close()


class RecorderProcess:
    """A recorder in a child process, started with ``spawn`` (a fork would copy the parent's threads'
    locks mid-use). ``failure`` says why it ended if it ended on its own; the gateway's supervisor then
    starts a new one (:meth:`restart`), which resumes from the group's committed offsets."""

    name = "recorder"

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._context = multiprocessing.get_context("spawn")
        self._stop = self._context.Event()
        self._process = self._new_process()

    def _new_process(self) -> multiprocessing.process.BaseProcess:
        return self._context.Process(target=record, args=(self._settings, self._stop), kwargs={"child": True},
                                     name="nextturn-recorder", daemon=True)

    def start(self) -> None:
        self._process.start()

    def restart(self) -> None:
        if self._stop.is_set() or self._process.exitcode is None:
            return  # stopped, or still running
        self._process.close()
        self._process = self._new_process()
        self._process.start()

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def failure(self) -> BaseException | None:
        code = self._process.exitcode
        if code is None or self._stop.is_set():
            return None
        return RuntimeError(f"the recorder process exited with code {code}")

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._process.join(timeout_s)
        if self._process.is_alive():  # harmless: a batch not committed is recorded again, idempotently
            log.warning("the recorder process did not stop within %s s; terminating it", timeout_s)
            self._process.terminate()
            self._process.join(timeout_s)
