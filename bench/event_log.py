"""Event-log throughput and latency, both backends, in one run.

For each backend: the latency of one durable append (p50, p99), batched append throughput, and group
consume throughput (poll, decode, commit). The baseline for each is the bare driver doing the same durable
write in the same run (sqlite3 INSERT+COMMIT in its own WAL file; kafka-python send+flush), so the ratio is
what nextturn's layer (pydantic encoding, partitioning, the API) adds.

Run: .venv/bin/python bench/event_log.py [--events 20000]
"""

from __future__ import annotations

import argparse
import gc
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from kafka import KafkaProducer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from nextturn import events  # noqa: E402
from nextturn.bus import EventLog  # noqa: E402
from nextturn.bus.kafka import KafkaEventLog  # noqa: E402
from nextturn.bus.sqlite import SqliteEventLog  # noqa: E402

from support.services import Tansu  # noqa: E402  (the same broker the tests use)


def realistic_turn(n: int) -> events.TurnRecorded:
    """About 2 KB encoded: a 200-token prompt, a 50-token response with logprobs."""
    started = events.utc_now()
    return events.TurnRecorded(
        tenant="acme", session_id=f"session-{n % 64}", turn_id=f"chatcmpl-{n}", model="tiny",
        messages=[events.ChatMessage(role="user", content="Summarize the failing test output in two lines.")],
        response=events.ChatMessage(role="assistant", content="The assertion on line 12 fails: off by one."),
        prompt_token_ids=list(range(1000, 1200)), response_token_ids=list(range(2000, 2050)),
        response_logprobs=[-0.25] * 50, finish_reason="stop", latency_ms=40.0,
        started_at=started, finished_at=started + timedelta(milliseconds=40),
    )


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def latencies_ms(operation: Callable[[Any], object], inputs: list[Any]) -> list[float]:
    samples = []
    for item in inputs:
        started = time.perf_counter()
        operation(item)
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def measure(log: EventLog, baseline_single: Callable[[int], None], total: int, singles: int) -> dict[str, float]:
    ours = latencies_ms(log.append, [[realistic_turn(n)] for n in range(singles)])
    bare = latencies_ms(baseline_single, list(range(singles)))

    turns = [realistic_turn(n) for n in range(total)]
    started = time.perf_counter()
    for start in range(0, total, 500):
        log.append(turns[start:start + 500])
    append_rate = total / (time.perf_counter() - started)
    # A consumer runs in its own process: the producer side's events must not weigh on its garbage
    # collector (kept alive, they halve the consume rate).
    del turns
    gc.collect()

    consumer = log.consumer("bench", [events.TURNS])
    expected, consumed = singles + total, 0
    started = time.perf_counter()
    while consumed < expected:
        consumed += len(consumer.poll(max_records=1000, timeout_s=1.0))
        consumer.commit()
    consume_rate = consumed / (time.perf_counter() - started)
    consumer.close()
    log.close()
    return {
        "append_p50_ms": statistics.median(ours), "append_p99_ms": percentile(ours, 0.99),
        "bare_p50_ms": statistics.median(bare), "bare_p99_ms": percentile(bare, 0.99),
        "append_per_s": append_rate, "consume_per_s": consume_rate,
    }


def bench_sqlite(workdir: Path, total: int, singles: int) -> dict[str, float]:
    bare = sqlite3.connect(workdir / "bare.db", isolation_level=None)
    bare.execute("PRAGMA journal_mode=WAL")
    bare.execute("PRAGMA synchronous=FULL")
    bare.execute("CREATE TABLE records (seq INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT, value BLOB)")
    payload = realistic_turn(0).encode()

    def bare_append(n: int) -> None:
        bare.execute("BEGIN IMMEDIATE")
        bare.execute("INSERT INTO records (key, value) VALUES (?, ?)", (str(n), payload))
        bare.execute("COMMIT")

    return measure(SqliteEventLog(workdir / "events.db"), bare_append, total, singles)


def bench_kafka(total: int, singles: int) -> dict[str, float]:
    broker = Tansu()
    broker.start()
    try:
        log = KafkaEventLog(broker.bootstrap_servers, session_timeout_ms=2000)
        log.append([realistic_turn(0)])  # creates the topics before the timing starts
        bare = KafkaProducer(bootstrap_servers=broker.bootstrap_servers, enable_idempotence=True, acks="all",
                             linger_ms=1)
        payload = realistic_turn(0).encode()

        def bare_append(n: int) -> None:
            bare.send(events.TURNS, key=str(n).encode(), value=payload)
            bare.flush()

        figures = measure(log, bare_append, total, singles)
        bare.close()
        return figures
    finally:
        broker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000, help="events for the throughput figures")
    parser.add_argument("--singles", type=int, default=2_000, help="single appends for the latency figures")
    args = parser.parse_args()
    size = len(realistic_turn(0).encode())
    print(f"event log benchmark: {args.events} events of {size} bytes; {args.singles} single appends")
    with tempfile.TemporaryDirectory() as workdir:
        results = {"sqlite": bench_sqlite(Path(workdir), args.events, args.singles)}
    results["kafka (Tansu)"] = bench_kafka(args.events, args.singles)
    header = f"{'backend':<14}{'append p50':>12}{'p99':>9}{'bare p50':>10}{'p99':>9}{'ratio p50':>11}" \
             f"{'append/s':>11}{'consume/s':>11}"
    print(header)
    for name, r in results.items():
        print(f"{name:<14}{r['append_p50_ms']:>10.3f}ms{r['append_p99_ms']:>7.3f}ms{r['bare_p50_ms']:>8.3f}ms"
              f"{r['bare_p99_ms']:>7.3f}ms{r['append_p50_ms'] / r['bare_p50_ms']:>10.2f}x"
              f"{r['append_per_s']:>11,.0f}{r['consume_per_s']:>11,.0f}")


if __name__ == "__main__":
    main()
