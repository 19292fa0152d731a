"""Signals worker throughput: turns per second through the worker with the rule-based evaluators, on one
core, on both event-log backends (the store is SQLite in both).

The workload is realistic sessions: chains of 4 turns, each next request carrying a user reply drawn from
many phrasings (thanks, corrections, re-queries, complaints, moving on), and a rating on every third turn.
Every turn is resolved (by its next request, or by its rating), so every turn yields a signal.

The baseline, measured in the same run on the same events, is a bare consumer in its own group: poll,
decode and commit, nothing else. The ratio says what joining, scoring and the exactly-once writes add.
Per-batch times (500 events a batch) give the median and p99.

Run: .venv/bin/python bench/signals_throughput.py [--turns 20000] [--backends sqlite,kafka]
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from nextturn import events  # noqa: E402
from nextturn.bus import EventLog  # noqa: E402
from nextturn.bus.kafka import KafkaEventLog  # noqa: E402
from nextturn.bus.sqlite import SqliteEventLog  # noqa: E402
from nextturn.store import Store, upgrade  # noqa: E402
from signals.worker import SignalsWorker  # noqa: E402

from support.services import Tansu  # noqa: E402  (the same broker the tests use)

REPLIES = [
    "Thanks, that works!", "Perfect, exactly what I needed.", "No, I meant the other file.",
    "That's wrong, the answer should be in metres.", "This is useless.", "Still not working.",
    "How do I parse a date in Python?", "Now write a test for it.", "ok", "Can you make it shorter?",
    "You forgot the edge case where the list is empty.", "Great, now do the same for the parser.",
]
TURNS_PER_SESSION = 4
BATCH = 500
ALL_CPUS = os.sched_getaffinity(0)


def workload(turns: int, seed: int = 0) -> list[events.Event]:
    rng = random.Random(seed)
    out: list[events.Event] = []
    for s in range(turns // TURNS_PER_SESSION):
        session = f"session-{s}"
        messages = [events.ChatMessage(role="system", content="You are a careful coding assistant."),
                    events.ChatMessage(role="user", content="How do I parse a date in Python?")]
        parent: str | None = None
        for n in range(TURNS_PER_SESSION):
            started = events.utc_now()
            response = events.ChatMessage(role="assistant", content="Use datetime.strptime with a format string.")
            turn = events.TurnRecorded(
                tenant="acme", session_id=session, turn_id=f"chatcmpl-{s}-{n}", parent_turn_id=parent,
                model="small", messages=messages, response=response,
                prompt_token_ids=list(range(1000, 1200)), response_token_ids=list(range(2000, 2050)),
                response_logprobs=[-0.25] * 50, finish_reason="stop", latency_ms=40.0,
                started_at=started, finished_at=started + timedelta(milliseconds=40),
            )
            out.append(turn)
            if n % 3 == 2:
                out.append(events.FeedbackReceived(tenant="acme", session_id=session, turn_id=turn.turn_id,
                                                   kind="rating", value=rng.choice([-1.0, 1.0])))
            messages = [*messages, response, events.ChatMessage(role="user", content=rng.choice(REPLIES))]
            parent = turn.turn_id
    return out


def consume_only(log: EventLog, total: int) -> tuple[float, list[float]]:
    consumer = log.consumer("baseline", [events.TURNS, events.FEEDBACK])
    read, batches = 0, []
    started = time.perf_counter()
    while read < total:
        t0 = time.perf_counter()
        got = consumer.poll(BATCH, 1.0)
        consumer.commit()
        if got:
            batches.append(time.perf_counter() - t0)
        read += len(got)
    elapsed = time.perf_counter() - started
    consumer.close()
    return elapsed, batches


def through_worker(log: EventLog, store: Store, total: int) -> tuple[float, list[float], int]:
    worker = SignalsWorker(log, store, batch_size=BATCH, idle_timeout_s=3600)
    read, batches = 0, []
    started = time.perf_counter()
    while read < total:
        t0 = time.perf_counter()
        got = worker.run_once(1.0)
        if got:
            batches.append(time.perf_counter() - t0)
        read += got
    elapsed = time.perf_counter() - started
    signals = worker.counts["resolved"] + worker.counts["revisions"]
    worker.close()
    return elapsed, batches, signals


def run(backend: str, turns: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        broker = None
        if backend == "kafka":
            broker = Tansu()
            broker.start()
            assert broker._process is not None
            os.sched_setaffinity(broker._process.pid, ALL_CPUS)  # the broker is not the worker's core
            log: EventLog = KafkaEventLog(broker.bootstrap_servers, session_timeout_ms=2000)
        else:
            log = SqliteEventLog(Path(tmp) / "events.db", session_timeout_s=2.0)
        url = f"sqlite:///{tmp}/nextturn.db"
        upgrade(url)
        store = Store(url)
        batch = workload(turns)
        for start in range(0, len(batch), 2000):
            log.append(batch[start:start + 2000])
        n_turns = sum(isinstance(e, events.TurnRecorded) for e in batch)
        n_events = len(batch)
        del batch  # 25,000 live objects would make every garbage collection in the measured part slower
        gc.collect()
        gc.freeze()  # as `nextturn signals run` does once it has started
        base_s, base_batches = consume_only(log, n_events)
        work_s, work_batches, signals = through_worker(log, store, n_events)
        log.close()
        store.close()
        if broker is not None:
            broker.stop()
    ms = [b * 1000 for b in work_batches]
    print(f"{backend:6} worker: {n_turns / work_s:8,.0f} turns/s ({n_events:,} events, {signals:,} signals, "
          f"{work_s:.2f} s); batch of {BATCH} p50 {statistics.median(ms):.1f} ms p99 "
          f"{sorted(ms)[int(0.99 * (len(ms) - 1))]:.1f} ms")
    print(f"{backend:6} bare consumer (baseline): {n_turns / base_s:8,.0f} turns/s; worker/baseline time "
          f"{work_s / base_s:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--turns", type=int, default=20_000)
    parser.add_argument("--backends", default="sqlite,kafka")
    args = parser.parse_args()
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core (a Kafka broker runs beside it)
    print(f"signals throughput, {args.turns:,} turns, one core, rule-based evaluators (no judge)")
    for backend in args.backends.split(","):
        run(backend, args.turns)


if __name__ == "__main__":
    main()
