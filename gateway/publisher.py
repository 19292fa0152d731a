"""The publisher: events leave the request path at once and reach the event log in order, eventually.

``publish`` never waits on the log. It puts the event in a bounded in-memory queue; a background thread
drains the queue in batches into the log. Once an event arrives, the thread lingers (10 ms by default)
to let others join it, so that one write and one fsync serve many events instead of one each: with the
SQLite log, writing every event on its own cost the gateway about 0.3 ms of CPU per request
(bench/gateway_overhead.py), and the thread's wake-ups competed with requests for the interpreter lock.

When the log is slow or down, a batch goes to the spool instead, an append-only file (one encoded event
per line, fsynced), and while the spool holds anything, newer events queue up behind it, so the log
receives everything in the order it was published. The thread retries the spool with a growing pause and
deletes it once every event in it is on the log.

Each publisher has a spool of its own in the spool directory (``<data dir>/spool``), held with an exclusive
lock on ``<name>.lock`` for as long as the publisher lives: gateway replicas that share a data directory
never write one file. A spool whose lock is free belonged to a publisher that is gone (stopped with the log
down, killed, a container recreated); a publisher adopts such spools when it starts and once a minute: it
appends their events to its own spool, then deletes them, so they are replayed before what it publishes.

If the queue is full (the thread cannot keep up), ``publish`` writes the event to the spool itself:
slower for that request, but nothing is lost. Such an event may overtake events still in the queue;
order holds as long as the queue has room (``capacity``, 10,000 events by default).

An event that cannot be written as it is (not UTF-8 encodable, or over the log's per-event limit) goes to
the ``dead-letters`` topic with its reason instead, so that it never stops the events behind it.

When the spool cannot be written either (the disk is full), the batch stays in memory and the thread tries
it again with the same growing pause, replaying what the spool holds as soon as the log is back; newer events
wait in the queue behind it, and requests are served all along. Only when the queue is full as well is an
event dropped (``dropped``, counted on /metrics); a write cut short by the full disk is cut from the spool.

If the thread dies (a bug), ``publish`` keeps queueing (and spooling once the queue is full) and the
gateway's supervisor (:mod:`gateway.supervisor`) starts a new thread with :meth:`Publisher.restart`, which
writes the batch the dead one held first: nothing is lost.

Delivery is at least once: a replay cut short is replayed again from the start of the spool, so the
log may receive an event twice under one event id, and its consumers write idempotently.
"""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import IO

from nextturn import events
from nextturn.bus import EventLog
from nextturn.bus.log import MAX_EVENT_BYTES, unwritable
from nextturn.erasure import Rules
from nextturn.errors import EventError, EventLogError, EventTooLarge, NextturnError

log = logging.getLogger(__name__)


class PublisherStopped(NextturnError):
    """The publisher was stopped: it takes no more events."""


class Spool:
    """An append-only file of encoded events, one per line (JSON has no raw newlines)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._repair()
        self._count = self._read_bytes().count(b"\n")

    def _read_bytes(self) -> bytes:
        return self.path.read_bytes() if self.path.exists() else b""

    def _repair(self) -> None:
        """Cut a line torn by a crash mid-write: it was never acknowledged, and the next write would
        otherwise be glued to it."""
        content = self._read_bytes()
        if content and not content.endswith(b"\n"):
            kept = content[: content.rfind(b"\n") + 1]
            log.warning("cutting %d bytes of a torn write from %s", len(content) - len(kept), self.path)
            self._rewrite(kept)

    def _rewrite(self, content: bytes) -> None:
        if not content:
            self.path.unlink(missing_ok=True)
            return
        temporary = self.path.with_suffix(".tmp")
        with temporary.open("wb") as file:
            file.write(content)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, self.path)

    def write(self, batch: Sequence[events.Event]) -> None:
        """Append the batch, durably; raises OSError (a full disk) with the file as it was before."""
        lines = b"".join(event.encode() + b"\n" for event in batch)
        with self._lock, self.path.open("ab") as file:
            size = file.tell()
            try:
                file.write(lines)
                file.flush()
                os.fsync(file.fileno())
            except OSError:
                file.truncate(size)  # no torn line for the next write to be glued to
                raise
            self._count += len(batch)

    def read(self) -> list[tuple[int, events.Event]]:
        """Every spooled event, oldest first, with its line number (an unreadable line reads as nothing)."""
        with self._lock:
            lines = self._read_bytes().splitlines()
        spooled = []
        for number, line in enumerate(lines, 1):
            try:
                spooled.append((number, events.decode(line)))
            except EventError as exc:
                log.error("dropping unreadable line %d of %s: %s", number, self.path, exc)
        return spooled

    def drop(self, lines: int) -> None:
        """Remove the first ``lines`` lines: their events are on the log now. Later writes are kept."""
        with self._lock:
            rest = b"".join(self._read_bytes().splitlines(keepends=True)[lines:])
            self._rewrite(rest)
            self._count = rest.count(b"\n")

    def keep(self, wanted: Callable[[events.Event], bool]) -> int:
        """Rewrite the spool with only the events ``wanted`` says to keep (an erasure); how many went."""
        with self._lock:
            lines = self._read_bytes().splitlines(keepends=True)
            kept = []
            for line in lines:
                try:
                    if not wanted(events.decode(line)):
                        continue
                except EventError:
                    pass  # unreadable: read() drops and logs it
                kept.append(line)
            if len(kept) < len(lines):
                self._rewrite(b"".join(kept))
                self._count = len(kept)
            return len(lines) - len(kept)

    def __len__(self) -> int:
        return self._count


ADOPT_EVERY_S = 60.0


def _lock(path: Path) -> IO[bytes] | None:
    """The open lock file, locked exclusively; None when another process holds it."""
    handle = path.open("ab")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


class Publisher:
    def __init__(
        self,
        event_log: EventLog,
        spool_dir: Path,
        *,
        capacity: int = 10_000,
        batch_size: int = 500,
        linger_s: float = 0.01,
        retry_pause_s: tuple[float, float] = (0.1, 5.0),
        adopt: Sequence[Path] = (),
    ) -> None:
        self._log = event_log
        spool_dir.mkdir(parents=True, exist_ok=True)
        self._spool_dir = spool_dir
        self._adopt_also = list(adopt)  # spools outside the directory (the single spool of earlier versions)
        name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        claim = _lock(spool_dir / f"{name}.lock")
        assert claim is not None  # a new name: nobody else holds it
        self._claim = claim
        self.spool = Spool(spool_dir / f"{name}.jsonl")
        self._queue: queue.Queue[events.Event] = queue.Queue(maxsize=capacity)
        self._batch_size = batch_size
        self._linger_s = linger_s
        self._first_pause_s, self._max_pause_s = retry_pause_s
        self._stopping = threading.Event()
        self._failure: BaseException | None = None
        self._holding: list[events.Event] = []  # the batch being written: a restarted thread writes it first
        self.disk_full = False  # the last spool write failed (a full disk): events wait in memory
        self.dropped = 0  # events lost because the queue was full and the spool could not be written
        self._rules = Rules()  # what erasures cover is never delivered (see forget)
        self._spool_forgets = False  # the thread rewrites the spool without what the rules cover
        self._thread = self._new_thread()

    name = "publisher"

    def _new_thread(self) -> threading.Thread:
        return threading.Thread(target=self._run, name="nextturn-publisher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def restart(self) -> None:
        """Start a new thread after the last one died (the supervisor calls this)."""
        if self._thread.is_alive() or self._stopping.is_set():
            return
        self._failure = None
        self._thread = self._new_thread()
        self._thread.start()

    def publish(self, event: events.Event) -> None:
        """Hand an event over; returns at once (raises PublisherStopped once the publisher was stopped). While
        the thread is dead and not yet restarted, events wait in the queue, or in the spool once it is full."""
        if self._stopping.is_set():
            raise PublisherStopped("the event publisher was stopped")
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            try:
                self.spool.write([event])
            except OSError as exc:  # the log down, the queue full and the disk full: the request is served
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 1000 == 0:
                    log.error("dropped %d event(s): the queue is full and the spool cannot be written (%s)",
                              self.dropped, exc)

    def forget(self, rules: Rules) -> None:
        """Deliver nothing an erasure covers (:mod:`nextturn.erasure`) from now on, and have the thread rewrite
        the spool without it (the thread alone moves the spool, so a replay never loses its place)."""
        self._rules = rules
        self._spool_forgets = True

    @property
    def failure(self) -> BaseException | None:
        """Why the thread died, or None while it runs (the same check as the gateway's other parts)."""
        if self._failure is None and self._thread.ident is not None and not self._thread.is_alive() \
                and not self._stopping.is_set():
            return PublisherStopped("the publisher's thread ended")
        return self._failure

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Deliver or spool what is queued, then stop the thread and give up the spool: a spool still holding
        events is left for the next publisher to adopt."""
        self._stopping.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            return  # still writing: the lock goes with the process
        if not len(self.spool):
            Path(self._claim.name).unlink(missing_ok=True)
        self._claim.close()

    def adopt(self) -> int:
        """Move the events of spools no publisher holds into this one's; return how many were moved."""
        moved = 0
        candidates = [path for path in sorted(self._spool_dir.glob("*.jsonl")) if path != self.spool.path]
        for path in [*self._adopt_also, *candidates]:
            lock = _lock(path.with_suffix(".lock"))
            if lock is None:
                continue  # its publisher is alive
            try:
                if path.exists():
                    orphaned = [event for _, event in Spool(path).read()]
                    if orphaned:
                        self.spool.write(orphaned)  # durable here before it is deleted there
                        log.warning("adopted %d spooled event(s) from %s", len(orphaned), path)
                        moved += len(orphaned)
                    path.unlink()
                path.with_suffix(".lock").unlink(missing_ok=True)
            finally:
                lock.close()
        return moved

    # -- the thread ----------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            pause = self._first_pause_s
            next_replay = next_adoption = next_try = 0.0
            while not (self._stopping.is_set() and self._queue.empty()) or self._holding:
                if self._spool_forgets:
                    self._spool_forgets = False
                    if dropped := self.spool.keep(partial(_wanted, self._rules)):
                        log.info("dropped %d spooled event(s) an erasure covers", dropped)
                if time.monotonic() >= next_adoption:
                    self.adopt()
                    next_adoption = time.monotonic() + ADOPT_EVERY_S
                if len(self.spool) and time.monotonic() >= next_replay:
                    if self._replay():
                        pause = self._first_pause_s
                    else:
                        next_replay = time.monotonic() + pause
                        pause = min(pause * 2, self._max_pause_s)
                if not self._holding:  # what a dead thread was writing goes before anything queued after it
                    self._holding = self._take(timeout_s=0.05)
                elif time.monotonic() < next_try:
                    self._stopping.wait(0.05)
                    continue
                if self._holding:
                    if self._deliver(self._holding):
                        self._holding = []
                    elif self._stopping.is_set():
                        log.error("stopping with %d event(s) that neither the log nor the disk took",
                                  len(self._holding))
                        return
                    else:  # neither the log nor the spool took it: it waits here, the queue behind it
                        next_try = time.monotonic() + pause
        except BaseException as exc:  # supervised: the gateway restarts the thread (see restart)
            self._failure = exc
            log.exception("the event publisher died")

    def _take(self, timeout_s: float) -> list[events.Event]:
        try:
            batch = [self._queue.get(timeout=timeout_s)]
        except queue.Empty:
            return []
        if self._linger_s:  # let a batch gather: one write (and one fsync) for many events
            self._stopping.wait(self._linger_s)
        while len(batch) < self._batch_size:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _deliver(self, batch: list[events.Event]) -> bool:
        """Onto the log, or into the spool; False when neither took it (the log down and the disk full)."""
        if self._rules:
            batch = [event for event in batch if not self._rules.covers(event)]
            if not batch:
                return True
        try:
            return self._append_or_spool(batch)
        except (EventTooLarge, ValueError):  # one event cannot be written as it is: set it aside, go on
            return self._append_or_spool([self._writable(event) for event in batch])

    def _append_or_spool(self, batch: list[events.Event]) -> bool:
        if len(self.spool):  # older events wait in the spool: these go behind them
            return self._spool(batch)
        try:
            self._log.append(batch)
        except EventTooLarge:
            raise  # the log is fine; spooling this event would only jam the spool behind it
        except EventLogError as exc:
            log.warning("event log unavailable, spooling %d event(s): %s", len(batch), exc)
            return self._spool(batch)
        return True

    def _spool(self, batch: list[events.Event]) -> bool:
        try:
            self.spool.write(batch)
        except OSError as exc:
            if not self.disk_full:
                log.error("cannot spool (%s): events wait in memory until the log or the disk takes them", exc)
            self.disk_full = True
            return False
        self.disk_full = False
        return True

    @staticmethod
    def _writable(event: events.Event) -> events.Event:
        """The event, or its dead letter when it is not UTF-8 encodable or over the log's limit (text from an
        upstream holding a lone surrogate, a prompt of millions of tokens)."""
        try:
            size = len(event.encode())
        except ValueError as exc:
            reason = f"cannot be encoded: {exc}"
        else:
            if size <= MAX_EVENT_BYTES:
                return event
            reason = f"is {size:,} bytes; the event log takes at most {MAX_EVENT_BYTES:,}"
        log.error("%s %s %s; set aside on %s", type(event).__name__, event.event_id, reason, events.DEAD_LETTERS)
        return unwritable(event, reason)

    def _replay(self) -> bool:
        """Move the spool onto the log, oldest first; False if the log is still unavailable."""
        spooled = self.spool.read()
        for start in range(0, len(spooled), self._batch_size):
            chunk = spooled[start:start + self._batch_size]
            try:
                self._log.append([event for _, event in chunk if not self._rules.covers(event)])
            except EventLogError as exc:
                log.info("event log still unavailable (%s); %d event(s) remain spooled", exc, len(spooled) - start)
                return False
            last_line, _ = chunk[-1]
            self.spool.drop(last_line)
        return True


def _wanted(rules: Rules, event: events.Event) -> bool:
    return not rules.covers(event)
