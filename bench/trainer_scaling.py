"""Trainer scaling: one ``trainer run`` (no ``--scope``) training 1, 10, 100 scopes at once.

Each scope gets a signal every ``--interval`` seconds (offsets spread evenly) for ``--duration`` seconds,
through the SQLite event log and store, with the trainer's default cadence (batches of 16, 4 optimizer
steps, collapse guards) on the given model size. The trainer runs in this process, in its own thread, as
``nextturn trainer run`` does; ``--resident`` scopes keep their weights in memory, the rest are parked.

Printed per scope count:
- updates made and signals still waiting at the end (backlog: the trainer did not keep up);
- update time p50 (one scope's update, guards and checkpoint included): the baseline the waits are
  measured in;
- scope switch p50/p99: loading a parked scope's adapter and optimizer state from its checkpoint;
- wait behind a complete batch p50/p99/max, in seconds and in update times: from a scope's batch being
  complete to its update (a scope waits for the updates of scopes whose samples waited longer);
- memory: the process's resident set growth per resident scope (weights, Adam moments, gradients).

Run: .venv/bin/python bench/trainer_scaling.py [--scopes 1,10,100] [--interval 3] [--duration 60]
     [--resident 8] [--size tiny]
"""

from __future__ import annotations

import argparse
import random
import resource
import statistics
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch
from trl.trainer.utils import selective_log_softmax

from nextturn import events
from nextturn.bus.sqlite import SqliteEventLog
from nextturn.local_models import init_model
from nextturn.store import Store, upgrade
from trainer.packing import pack, response_logits
from trainer.policy import Policy, SharedBase
from trainer.scopes import ScopeTrainers
from trainer.worker import TrainerConfig, TrainerWorker


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def templates(policy: Policy, count: int, seed: int = 0) -> list[tuple[list[int], list[int], list[float]]]:
    """Prompts and answers of random ordinary tokens, with the base model's logprobs (on-policy)."""
    rng = random.Random(seed)
    vocabulary = len(policy.tokenizer) - 16
    made = []
    for _ in range(count):
        prompt = [16 + rng.randrange(vocabulary) for _ in range(32)]
        answer = [16 + rng.randrange(vocabulary) for _ in range(24)]
        packed = pack([prompt], [answer], policy.tokenizer.pad_token_id, policy.device)
        with torch.no_grad():
            logprobs = selective_log_softmax(response_logits(policy.model, packed), packed.response_ids)[0].tolist()
        made.append((prompt, answer, logprobs))
    return made


def traffic(scopes: int, per_scope: int, shapes: list[tuple[list[int], list[int], list[float]]],
            rng: random.Random) -> dict[str, list[tuple[events.TurnRecorded, events.SignalExtracted]]]:
    """Every scope's turns and signals, in the order they come."""
    made = {}
    for s in range(scopes):
        scope = f"t.tenant{s:03d}"
        pairs = []
        for n in range(per_scope):
            prompt, answer, logprobs = shapes[rng.randrange(len(shapes))]
            started = events.utc_now()
            turn = events.TurnRecorded(
                tenant=f"tenant{s:03d}", scope=scope, session_id=f"{scope}-s{n}", turn_id=f"{scope}-turn{n}",
                model="bench", messages=[events.ChatMessage(role="user", content="q")],
                response=events.ChatMessage(role="assistant", content="a"), prompt_token_ids=prompt,
                response_token_ids=answer, response_logprobs=logprobs, finish_reason="stop", status="ok",
                latency_ms=1.0, started_at=started, finished_at=started + timedelta(milliseconds=1))
            signal = events.SignalExtracted(
                signal_id=f"{turn.turn_id}:bench", tenant=turn.tenant, scope=scope, session_id=turn.session_id,
                turn_id=turn.turn_id, reward=rng.choice((1.0, -1.0)), confidence=1.0, extractor_version="bench")
            pairs.append((turn, signal))
        made[scope] = pairs
    return made


def run(model: Path, scopes: int, interval: float, duration: float, resident: int, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        url = f"sqlite:///{root / 'nextturn.db'}"
        upgrade(url)
        store = Store(url)
        log = SqliteEventLog(root / "events.db")
        shared = SharedBase(model, device="cpu")
        shapes = templates(Policy.load(model, rank=8, device="cpu"), 32, seed)
        per_scope = int(duration / interval) + 1
        made = traffic(scopes, per_scope, shapes, rng)
        store.apply([turn for pairs in made.values() for turn, _ in pairs])
        store.apply([signal for pairs in made.values() for _, signal in pairs])
        config = TrainerConfig(device="cpu", max_ahead=0)
        trainers = ScopeTrainers(log, lambda scope: TrainerWorker(
            log, store, model_dir=model, adapters_root=root / "adapters", trainer_root=root / "trainer",
            scope=scope, config=config, shared=shared, consume=False), store=store, max_resident=resident)
        updates: list[float] = []
        original = TrainerWorker.train

        def timed(worker: TrainerWorker) -> bool:
            began = time.perf_counter()
            made_one = original(worker)
            if made_one:
                updates.append(time.perf_counter() - began)
            return made_one

        TrainerWorker.train = timed  # type: ignore[method-assign]
        stop = threading.Event()
        thread = threading.Thread(target=trainers.run, args=(stop,))
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        thread.start()
        # Scope s sends its n-th signal at n * interval + s * interval / scopes.
        schedule = sorted((n * interval + s * interval / scopes, scope, n)
                          for s, scope in enumerate(made) for n in range(per_scope))
        began = time.monotonic()
        for at, scope, n in schedule:
            if at > duration:
                break
            time.sleep(max(0.0, began + at - time.monotonic()))
            log.append([made[scope][n][1]])
        stop.set()
        thread.join()
        TrainerWorker.train = original  # type: ignore[method-assign]
        rss_growth_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
        waiting = sum(len(worker.ledger.waiting) for worker in trainers.workers.values())
        trainers.close()
        log.close()
        store.close()
    update_p50 = statistics.median(updates) if updates else float("nan")
    waits = list(trainers.waits)
    switches = list(trainers.switches)
    return {
        "scopes": scopes, "updates": len(updates), "waiting_at_end": waiting, "update_p50_s": update_p50,
        "switch_p50_ms": 1000 * percentile(switches, 0.5), "switch_p99_ms": 1000 * percentile(switches, 0.99),
        "switches": len(switches), "wait_p50_s": percentile(waits, 0.5), "wait_p99_s": percentile(waits, 0.99),
        "wait_max_s": max(waits, default=float("nan")), "wait_max_updates": max(waits, default=0.0) / update_p50,
        "rss_mib_per_resident": rss_growth_kib / 1024 / max(1, min(scopes, resident)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scopes", default="1,10,100")
    parser.add_argument("--interval", type=float, default=3.0, help="seconds between one scope's signals")
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--resident", type=int, default=8)
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        model = init_model(Path(tmp) / "model", size=args.size, seed=0)
        print(f"model {args.size}; a signal every {args.interval:g} s per scope for {args.duration:g} s; "
              f"{args.resident} scopes resident; batches of 16, 4 steps")
        print(f"{'scopes':>6} {'signals/s':>9} {'updates':>7} {'backlog':>7} {'update p50':>10} "
              f"{'switch p50/p99 ms':>17} {'wait p50/p99/max s':>19} {'max wait':>9} {'MiB/scope':>9}")
        for scopes in (int(n) for n in args.scopes.split(",")):
            r = run(model, scopes, args.interval, args.duration, args.resident, args.seed)
            print(f"{scopes:>6} {scopes / args.interval:>9.1f} {r['updates']:>7.0f} {r['waiting_at_end']:>7.0f} "
                  f"{r['update_p50_s']:>9.2f}s {r['switch_p50_ms']:>8.1f}/{r['switch_p99_ms']:<8.1f} "
                  f"{r['wait_p50_s']:>6.2f}/{r['wait_p99_s']:.2f}/{r['wait_max_s']:<6.2f} "
                  f"{r['wait_max_updates']:>6.1f} up {r['rss_mib_per_resident']:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
