"""Scale-out on one machine: two gateway processes, two signals workers, two trainers and the rollout controller
against one Kafka-protocol broker and one Postgres, with conversations from four tenants.

What it shows: a conversation's turns link into one session whichever replica gets each turn; each consumer
group splits its work (the two signals workers both resolve turns, the two trainers hold different scopes);
a deployment change reaches both gateways; a gateway SIGKILLed with requests in flight and a trainer SIGKILLed
mid-run lose nothing and double nothing (the requests the kill cut are failures their clients saw).

A SIGKILLed gateway loses what its publisher had not yet handed to the log: an answer finished in the last
milliseconds before the kill (recording is asynchronous, docs/reliability.md). The kill here falls while
requests are running and none has finished for half a second, so every answer a client received must arrive.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import func, select

from nextturn import events, tables
from nextturn.store import Store, upgrade

from support.eventually import eventually
from support.services import PostgresCluster, Tansu, free_port, wait_for_port

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]

# Their scopes' signals land on all four partitions (keyed by scope): each trainer gets two of them.
TENANTS = ("acme", "umbrella", "cyberdyne", "aperture")
ADMIN = "sk-admin"


def key(tenant: str) -> str:
    return f"sk-{tenant}"


@dataclass
class Fleet:
    """The processes, each a `nextturn` command as an operator runs it; their stderr kept in files."""

    env: dict[str, str]
    logs: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    starts: Counter[str] = field(default_factory=Counter)

    def start(self, name: str, *argv: str, **env: str) -> None:
        self.starts[name] += 1
        log = (self.logs / f"{name}.{self.starts[name]}.log").open("wb")
        self.processes[name] = subprocess.Popen([sys.executable, "-m", "nextturn", *argv],
                                                env={**self.env, **env}, stdout=subprocess.DEVNULL, stderr=log)
        log.close()

    def kill(self, name: str) -> None:
        process = self.processes.pop(name)
        process.kill()
        process.wait()

    def stop(self, *names: str) -> dict[str, str]:
        """SIGINT to all at once (one stopping first would hand its partitions to the others), as Ctrl-C or
        `docker stop`'s SIGTERM: each ends its round and says what it did."""
        stopping = {name: self.processes.pop(name) for name in names}
        for process in stopping.values():
            process.send_signal(signal.SIGINT)
        for process in stopping.values():
            process.wait(120)
        return {name: (self.logs / f"{name}.{self.starts[name]}.log").read_text() for name in names}

    def close(self) -> None:
        for name in list(self.processes):
            self.kill(name)


@dataclass
class Gateway:
    name: str
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Conversations:
    """A client thread per tenant, each holding conversations of three turns without a session header, its
    turns alternating between the gateways (the other one while one is down), each answer rated; a turn waits
    until the previous one is stored (a person reading the answer), so that the other replica can link it."""

    gateways: list[Gateway]
    answered: dict[str, str] = field(default_factory=dict)  # turn id -> the gateway that answered it
    follows: dict[str, str] = field(default_factory=dict)  # turn id -> the turn it continues
    ratings: int = 0
    cut: Counter[str] = field(default_factory=Counter)  # requests a gateway's kill cut short
    failures: Counter[str] = field(default_factory=Counter)  # anything else that failed
    in_flight: dict[str, dict[int, float]] = field(default_factory=dict)  # gateway -> request -> its start
    last_done: dict[str, float] = field(default_factory=dict)  # gateway -> when its last request finished
    down: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _requests: int = 0

    def __enter__(self) -> Conversations:
        for gateway in self.gateways:
            self.in_flight[gateway.name], self.last_done[gateway.name] = {}, 0.0
        self._threads = [threading.Thread(target=self._talk, args=(tenant, n), daemon=True)
                         for n, tenant in enumerate(TENANTS)]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(120)

    def quiet_with_requests_running(self, gateway: str) -> bool:
        """Requests run on ``gateway``, all begun in the last 30 ms, and none finished in the last 500 ms."""
        now = time.monotonic()
        with self._lock:
            running = self.in_flight[gateway].values()
            return bool(running) and all(now - began < 0.03 for began in running) \
                and now - self.last_done[gateway] > 0.5

    def _call(self, gateway: Gateway, request: Any) -> Any:
        with self._lock:
            self._requests += 1
            number = self._requests
            self.in_flight[gateway.name][number] = time.monotonic()
        try:
            return request()
        finally:
            with self._lock:
                del self.in_flight[gateway.name][number]
                self.last_done[gateway.name] = time.monotonic()

    def _pick(self, turn: int, parity: int) -> Gateway:
        chosen = self.gateways[(turn + parity) % len(self.gateways)]
        if chosen.name in self.down:
            chosen = next(g for g in self.gateways if g.name not in self.down)
        return chosen

    def _talk(self, tenant: str, parity: int) -> None:
        rng = random.Random(parity)
        clients = {g.name: openai.OpenAI(base_url=f"{g.url}/v1", api_key=key(tenant), max_retries=0, timeout=60)
                   for g in self.gateways}
        conversation = 0
        while not self._stop.is_set():
            conversation += 1
            messages: list[dict[str, Any]] = []
            previous: str | None = None
            for turn in range(3):
                if self._stop.is_set():
                    return
                gateway = self._pick(turn, parity + conversation)
                messages.append({"role": "user", "content": f"{tenant} asks {conversation}.{turn}: "
                                                            f"{rng.choice(('why', 'how', 'what now', 'and then'))}?"})
                if previous is not None and not self._stored(gateway, tenant, previous):
                    break
                ask = partial(clients[gateway.name].chat.completions.create, model="tiny", messages=list(messages),
                              max_tokens=rng.randint(24, 64))
                try:
                    answer = self._call(gateway, ask)
                except (openai.APIConnectionError, openai.APITimeoutError):
                    self.cut[gateway.name] += 1  # the gateway died under it; the conversation starts over
                    break
                except openai.APIError as exc:
                    self.failures[f"chat {type(exc).__name__}"] += 1
                    break
                with self._lock:
                    self.answered[answer.id] = gateway.name
                    if previous is not None:
                        self.follows[answer.id] = previous
                self._rate(gateway, tenant, answer.id)
                text = answer.choices[0].message.content
                if not text:
                    break  # an empty answer (the tiny model's end token first) is not a message to send back
                messages.append({"role": "assistant", "content": text})
                previous = answer.id

    def _rate(self, gateway: Gateway, tenant: str, turn_id: str) -> None:
        try:
            rated = self._call(gateway, lambda: httpx.post(
                f"{gateway.url}/v1/feedback", headers={"Authorization": f"Bearer {key(tenant)}"}, timeout=60,
                json={"turn_id": turn_id, "kind": "rating", "value": 1.0, "idempotency_key": uuid.uuid4().hex}))
        except httpx.TransportError:
            self.cut[gateway.name] += 1
            return
        if rated.status_code == 200:
            with self._lock:
                self.ratings += 1
        else:
            self.failures[f"feedback {rated.status_code}"] += 1

    def _stored(self, gateway: Gateway, tenant: str, turn_id: str) -> bool:
        """Wait until the gateway that gets the next turn can read the previous one from the store."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not self._stop.is_set():
            try:
                found = httpx.get(f"{gateway.url}/v1/turns/{turn_id}", timeout=10,
                                  headers={"Authorization": f"Bearer {key(tenant)}"})
                if found.status_code == 200:
                    return True
            except httpx.TransportError:
                return False  # this gateway went down meanwhile: start a new conversation
            time.sleep(0.1)
        return False


def count(store: Store, table: type, column: str = "id", *, distinct: bool = False) -> int:
    found = tables.table_of(table).c[column]
    with store.engine.connect() as conn:
        return int(conn.execute(select(func.count(func.distinct(found) if distinct else found))).scalar_one())


def test_two_of_every_role_share_the_work_and_survive_a_gateway_and_a_trainer_killed(
    tiny_model: Path, tansu: Tansu, postgres: PostgresCluster, tmp_path: Path
) -> None:
    url = postgres.create_database(f"scale_{uuid.uuid4().hex[:8]}")
    upgrade(url)
    data = tmp_path / "data"  # the shared volume: adapters, checkpoints, each gateway's spool file
    logs = tmp_path / "logs"
    logs.mkdir()
    clean = {name: value for name, value in os.environ.items() if not name.startswith("NEXTTURN_")}
    env = {**clean, "NEXTTURN_DATA_DIR": str(data), "NEXTTURN_DATABASE_URL": url, "NEXTTURN_BUS": "kafka",
           "NEXTTURN_KAFKA_BOOTSTRAP_SERVERS": tansu.bootstrap_servers, "NEXTTURN_KAFKA_PARTITIONS": "4",
           "NEXTTURN_KAFKA_REPLICATION_FACTOR": "1", "NEXTTURN_KAFKA_MIN_INSYNC_REPLICAS": "1",
           "NEXTTURN_ENGINE": "embedded", "NEXTTURN_MODEL": str(tiny_model), "NEXTTURN_SCOPE_BY": "tenant",
           "NEXTTURN_API_KEYS": ",".join(f"{key(t)}:{t}" for t in TENANTS), "NEXTTURN_ADMIN_KEY": ADMIN,
           "NEXTTURN_HOST": "127.0.0.1", "NEXTTURN_SIGNALS_IDLE_TIMEOUT_S": "1",
           "NEXTTURN_TRAINER_BATCH_SIZE": "4", "NEXTTURN_TRAINER_STEPS_PER_BATCH": "1",
           "NEXTTURN_TRAINER_MAX_VERSION_LAG": "1000", "NEXTTURN_TRAINER_KEEP_VERSIONS": "1000",
           "NEXTTURN_TRAINER_MAX_AHEAD": "0", "NEXTTURN_TRAINER_HOLDOUT_EVERY": "0",
           "NEXTTURN_TRAINER_PARTIAL_AFTER_S": "2", "NEXTTURN_TRAINER_MIN_BATCH": "2",
           "NEXTTURN_TRAINER_DEVICE": "cpu", "NEXTTURN_ROLLOUT_CHECK_INTERVAL_S": "0.5"}
    fleet = Fleet(env, logs)
    gateways = [Gateway("a", free_port()), Gateway("b", free_port())]
    store = Store(url)
    try:
        for gateway in gateways:
            fleet.start(f"gateway-{gateway.name}", "serve", NEXTTURN_PORT=str(gateway.port))
        for n in (1, 2):
            fleet.start(f"signals-{n}", "signals", "run")
            fleet.start(f"trainer-{n}", "trainer", "run")
        fleet.start("rollout", "rollout", "run")
        for gateway in gateways:
            wait_for_port(gateway.port, timeout_s=120)
            eventually(lambda g=gateway: httpx.get(f"{g.url}/healthz", timeout=10).status_code,  # type: ignore[misc]
                       f"gateway {gateway.name} ready", until=lambda code: code == 200, timeout_s=120,
                       ignoring=(httpx.TransportError,))

        with Conversations(gateways) as talk:
            eventually(lambda: {scope for scope, in published(store)} >= {f"t.{t}" for t in TENANTS},
                       "a version in every tenant's scope", timeout_s=300, interval_s=1)
            fleet.kill("trainer-1")  # mid-run: training, publishing or waiting, wherever it is
            fleet.start("trainer-1", "trainer", "run")
            eventually(lambda: talk.quiet_with_requests_running("a"), "gateway a with requests just begun",
                       timeout_s=120, interval_s=0.002)
            fleet.kill("gateway-a")
            talk.down.add("a")
            answered_before = len(talk.answered)
            eventually(lambda: len(talk.answered) >= answered_before + 12, "gateway b carrying on alone",
                       timeout_s=120, interval_s=0.2)
            fleet.start("gateway-a", "serve", NEXTTURN_PORT=str(gateways[0].port))  # adopts its old spool
            eventually(lambda: httpx.get(f"{gateways[0].url}/healthz", timeout=10).status_code,
                       "gateway a back", until=lambda code: code == 200, timeout_s=120,
                       ignoring=(httpx.TransportError,))
            talk.down.clear()
            back = len(talk.answered)
            eventually(lambda: sum(g == "a" for g in list(talk.answered.values())[back:]) >= 6,
                       "gateway a answering again", timeout_s=120, interval_s=0.2)

        answered = dict(talk.answered)
        eventually(lambda: count(store, tables.Turn) >= len(answered), "every answered turn stored", timeout_s=120)
        eventually(lambda: count(store, tables.Signal, "turn_id", distinct=True) >= len(answered),
                   "a signal for every turn", timeout_s=120, interval_s=0.5)
        eventually(lambda: count(store, tables.Feedback) >= talk.ratings, "every rating stored", timeout_s=60)
        time.sleep(3)  # the trainers' partial-batch timer, for the last signals
        outputs = fleet.stop("signals-1", "signals-2", "trainer-1", "trainer-2")
        turns = tables.table_of(tables.Turn)
        with store.engine.connect() as conn:
            rows = {row.id: row for row in conn.execute(select(turns.c.id, turns.c.session_id,
                                                                 turns.c.parent_turn_id))}
        feedback = count(store, tables.Feedback)

        # A deployment change made through one gateway reaches both.
        version = max(v for scope, v in published(store, with_versions=True) if scope == "t.acme")
        eventually(lambda: httpx.post(
            f"{gateways[0].url}/v1/admin/rollout/promote", params={"scope": "t.acme"}, timeout=30,
            headers={"Authorization": f"Bearer {ADMIN}"},
            json={"actor": "test", "reason": "scale-out check", "version": version}).status_code,
            "the promotion", until=lambda code: code == 200, timeout_s=60, interval_s=0.5)
        for gateway in gateways:
            eventually(lambda g=gateway: served_by(g, "acme"),  # type: ignore[misc]
                       f"gateway {gateway.name} serving the promotion",
                       until=lambda name: name == events.adapter_name("t.acme", version), timeout_s=60)

        # Nothing lost, nothing doubled.
        linked = [turn for turn, parent in talk.follows.items()
                  if rows[turn].parent_turn_id == parent and rows[turn].session_id == rows[parent].session_id]
        across = sum(answered[turn] != answered[parent] for turn, parent in talk.follows.items())
        scopes = {scope: sorted(v for s, v in published(store, with_versions=True) if s == scope)
                  for scope, in published(store)}
        trained_twice = sum(n > 1 for scope in scopes for n in trained(data, scope).values())
        held = {name: held_scopes(outputs[name]) for name in ("trainer-1", "trainer-2")}
        resolved = {name: resolved_count(outputs[name]) for name in ("signals-1", "signals-2")}
        print(f"\nscale-out: {len(answered)} turns answered ({dict(Counter(answered.values()))}), "
              f"{len(talk.follows)} follow-ups ({across} on the other replica, {len(linked)} linked), "
              f"{talk.ratings} ratings, cut by the kill {dict(talk.cut)}, other failures {dict(talk.failures)}; "
              f"stored: turns {len(rows)}, feedback {feedback}; resolved per signals worker {resolved}; "
              f"scopes per trainer {held}; versions per scope {dict((s, len(v)) for s, v in scopes.items())}; "
              f"signals trained twice {trained_twice}")
        assert talk.failures == {} and talk.cut["b"] == 0
        assert set(rows) == set(answered) and feedback == talk.ratings
        assert len(linked) == len(talk.follows) and across > 0
        assert all(n > 0 for n in resolved.values())
        assert all(held.values()) and not set.intersection(*held.values())
        assert set(scopes) == {f"t.{t}" for t in TENANTS} and trained_twice == 0
        for scope, versions in scopes.items():
            assert versions == list(range(1, len(versions) + 1)), scope
        adapters = tables.table_of(tables.Adapter)
        with store.engine.connect() as conn:
            paths = [Path(path) for path, in conn.execute(select(adapters.c.path))]
        assert all((path / "adapter_model.safetensors").is_file() and (path / "meta.json").is_file()
                   for path in paths)
    finally:
        fleet.close()
        store.close()


def published(store: Store, *, with_versions: bool = False) -> set[tuple[Any, ...]]:
    adapters = tables.table_of(tables.Adapter)
    columns = (adapters.c.scope, adapters.c.version) if with_versions else (adapters.c.scope,)
    with store.engine.connect() as conn:
        return {tuple(row) for row in conn.execute(select(*columns))}


def trained(data: Path, scope: str) -> Counter[str]:
    """How many versions of ``scope`` each signal trained."""
    import json

    return Counter(signal for meta in (data / "adapters" / scope).glob("*/meta.json")
                   for signal in json.loads(meta.read_text())["data"]["signals"])


def served_by(gateway: Gateway, tenant: str) -> str:
    answer = httpx.post(f"{gateway.url}/v1/chat/completions", headers={"Authorization": f"Bearer {key(tenant)}"},
                        json={"model": "tiny", "messages": [{"role": "user", "content": uuid.uuid4().hex}],
                              "max_tokens": 2}, timeout=60)
    return answer.headers.get("X-Nextturn-Adapter", "")


def held_scopes(output: str) -> set[str]:
    found = re.search(r"trainer stopped: \d+ scopes held \(([^)]*)\)", output)
    assert found is not None, output[-2000:]
    return {scope for scope in found.group(1).split(", ") if scope}


def resolved_count(output: str) -> int:
    found = re.search(r"signals worker stopped: .*\bresolved (\d+)", output)
    assert found is not None, output[-2000:]
    return int(found.group(1))
