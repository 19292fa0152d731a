"""Helpers for rollout tests: published versions, traffic with ratings, waiting for the deployment."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai

from nextturn import deployments, events
from nextturn.bus import EventLog, open_event_log
from nextturn.deployments import Deployment
from nextturn.settings import Settings
from nextturn.store import Store
from rollout.controller import RolloutController
from signals.worker import from_settings as signals_worker

from support.eventually import eventually

ADMIN = {"Authorization": "Bearer sk-admin"}
ANSWER = "Blue"  # what the simulated users reward


@contextmanager
def signals_running(settings: Settings) -> Iterator[tuple[EventLog, Store]]:
    """The signals worker on a thread, turning ratings into rewards, with the event log and store it uses."""
    event_log, store = open_event_log(settings), Store.from_settings(settings)
    worker = signals_worker(settings, event_log, store)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield event_log, store
    finally:
        stop.set()
        thread.join()
        worker.close()
        event_log.close()
        store.close()


def publish(event_log: EventLog, version: int, path: Path, meta: dict[str, Any] | None = None,
            scope: str = events.DEFAULT_SCOPE) -> None:
    """What the trainer appends once a version is on disk."""
    event_log.append([events.AdapterPublished(scope=scope, version=version, base_model="tiny", path=str(path),
                                              meta=meta or {})])



def promote(store: Store, scope: str, path: Path, base_model: str = "tiny") -> None:
    """Version 1 of ``scope`` published and made stable, as the trainer and an operator would."""
    store.apply([events.AdapterPublished(scope=scope, version=1, base_model=base_model, path=str(path))])
    deployments.operate(store, scope, "promote", "ops", "a version of its own", lambda _: None, version=1)


def actions(store: Store, version: int) -> list[str]:
    """The changes about ``version``, oldest first."""
    return [change.action for change in reversed(store.deployment_changes(events.DEFAULT_SCOPE, limit=1000))
            if change.subject_version == version]


@dataclass
class Served:
    session: str
    adapter: str
    content: str
    at: float  # monotonic, when the answer arrived


@dataclass
class Traffic:
    """Clients asking questions, each on a new session with an ``X-Session-Id``, and rating each answer +1
    when it says ANSWER, else -1 (the signals worker turns the ratings into rewards). Every failure is kept."""

    url: str
    workers: int = 3
    served: list[Served] = field(default_factory=list)
    failures: list[BaseException] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Traffic:
        self._threads = [threading.Thread(target=self._ask, args=(n,)) for n in range(self.workers)]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def since(self, at: float) -> list[Served]:
        return [item for item in list(self.served) if item.at > at]

    def _ask(self, worker: int) -> None:
        client, n = client_of(self.url), 0
        with httpx.Client(base_url=self.url, headers={"Authorization": "Bearer sk-acme"}, timeout=60) as http:
            while not self._stop.is_set():
                n += 1
                session = f"sess-{worker}-{n}-{time.monotonic_ns()}"
                try:
                    served, turn_id = ask(client, [{"role": "user", "content": f"question {n}: what now?"}],
                                          stream=n % 3 == 0, session=session)
                    self.served.append(served)
                    http.post("/v1/feedback", json={"turn_id": turn_id, "kind": "rating",
                                                    "value": 1.0 if ANSWER in served.content else -1.0}
                              ).raise_for_status()
                except BaseException as exc:  # noqa: BLE001  # every failure is kept and asserted on
                    self.failures.append(exc)


class Conversation:
    """A conversation without a session header, sent whole each turn: the gateway links each turn to the
    one before it, so it is one session."""

    def __init__(self, url: str, name: str) -> None:
        self._client = client_of(url)
        self._name = name
        self.messages: list[dict[str, str]] = []
        self.adapters: list[str] = []

    def say(self) -> str:
        """One more turn; the version that served it."""
        self.messages.append({"role": "user", "content": f"{self._name}, turn {len(self.adapters)}: and now?"})
        served, _ = ask(self._client, self.messages, stream=False)
        self.messages.append({"role": "assistant", "content": served.content})
        self.adapters.append(served.adapter)
        return served.adapter


def client_of(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="sk-acme", max_retries=0, timeout=60)


def ask(client: openai.OpenAI, messages: list[dict[str, str]], *, stream: bool,
        session: str | None = None) -> tuple[Served, str]:
    """One turn, greedy (the taught versions answer as taught); (what was served, the turn id)."""
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=messages, max_tokens=6, temperature=0, stream=stream,  # type: ignore[arg-type]
        extra_headers={"X-Session-Id": session} if session else {})
    if stream:
        pieces, turn_id = [], ""
        for chunk in raw.parse():  # type: ignore[union-attr]
            turn_id = chunk.id
            pieces.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
        content = "".join(pieces)
    else:
        completion = raw.parse()
        turn_id, content = completion.id, completion.choices[0].message.content or ""  # type: ignore[union-attr]
    return Served(session or "", raw.headers["X-Nextturn-Adapter"], content, time.monotonic()), turn_id


class ControllerThread:
    """A rollout controller in a thread, as `nextturn rollout run` runs it; stop() and start a new one to
    restart it."""

    def __init__(self, event_log: EventLog, store: Store, **options: Any) -> None:
        self.controller = RolloutController(event_log, store, **options)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.controller.run, args=(self._stop, 0.1), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.controller.close()


def deployment(store: Store) -> Deployment:
    return Deployment.read(store, events.DEFAULT_SCOPE)


def swap_under_load(gateway_url: str, client: openai.OpenAI, data_dir: Path, model: str,
                    versions: dict[int, Path]) -> tuple[Counter[str], list[BaseException]]:
    """Four clients ask all along (whole and streamed in turn) while versions 1 and 2 are published and an
    operator promotes 1, promotes 2 and rolls back to 1. Returns what each version served and every failure."""
    served: Counter[str] = Counter()
    failures: list[BaseException] = []
    stop = threading.Event()

    def load(worker: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                raw = client.chat.completions.with_raw_response.create(
                    model=model, messages=[{"role": "user", "content": f"worker {worker} asks {n}"}],
                    max_tokens=6, stream=n % 2 == 0)
                if n % 2 == 0:
                    for _ in raw.parse():
                        pass
                else:
                    raw.parse()
                served[raw.headers["X-Nextturn-Adapter"]] += 1
            except BaseException as exc:  # noqa: BLE001  # every failure is kept and asserted on
                failures.append(exc)

    def until_served(version: str, count: int = 5) -> None:
        target = served[version] + count
        eventually(lambda: served[version] >= target or failures, f"{count} answers from {version}", timeout_s=60,
                   interval_s=0.01)

    def act(action: str, version: int | None = None) -> None:
        response = httpx.post(f"{gateway_url}/v1/admin/rollout/{action}", headers=ADMIN, timeout=60,
                              json={"actor": "test", "reason": "swap under load", "version": version})
        assert response.status_code == 200, response.text

    workers = [threading.Thread(target=load, args=(worker,)) for worker in range(4)]
    for worker in workers:
        worker.start()
    store = Store.from_settings(Settings(data_dir=data_dir))
    store.apply([events.AdapterPublished(version=n, base_model=model, path=str(path)) for n, path in versions.items()])
    store.close()
    try:
        until_served("base")
        act("promote", 1)  # loaded, then served; nothing is unloaded: base drains
        until_served("default-v1")
        act("promote", 2)
        until_served("default-v2")
        act("rollback")  # back to v1; v2 is unloaded once its last request finished
        until_served("default-v1")
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    return served, failures
