"""``nextturn up``: the whole loop on one machine, as supervised processes.

The gateway (``nextturn serve``), the signals worker (``signals run``), the trainer (``trainer run``) and
the rollout controller (``rollout run``) each run as their own process, exactly as they would when scaled
out, started from the one Settings object this process built (handed down as ``NEXTTURN_*`` variables:
:func:`nextturn.settings.child_environment`). They meet only through the event log and the store, so the
same command runs on the embedded default (SQLite, the embedded engine) and against Kafka, Postgres and
vLLM when Settings say so.

* **Start**: the store is migrated once, here (children racing to migrate one SQLite file would collide),
  and the engine's model is checked; then every component starts, and ``up`` waits for the gateway's
  /healthz. ``train_method = none`` runs no trainer.
* **Supervision**: each child runs in its own process group, its output appended to
  ``<data dir>/logs/<name>.log``. One that exits is started again after a back-off (1 s, doubling to 30 s);
  its state is durable (offsets, checkpoints, the store), so it resumes where it was. A worker that fails
  ``MAX_RESTARTS`` times within ``RESTART_WINDOW_S`` is marked failing (its log's last lines are logged)
  and tried again every 30 s; the rest go on, and the gateway serves and records meanwhile: what the worker
  has not processed waits on the event log. Only a gateway that keeps failing stops the whole stack, with
  its log's last lines: nothing serves without it.
* **Stop**: Ctrl-C (or SIGTERM) stops the gateway first (no new turns), then the workers, each with
  SIGTERM and up to ``STOP_GRACE_S`` to finish its round before SIGKILL.
* **Status**: :func:`activity` reads the figures a person watching the loop wants from the store:
  requests, resolved turns, rewards, hints, adapter versions, the canary. ``up`` shows them live, and
  :func:`log_library_output` keeps library warnings out of that view.
"""

from __future__ import annotations

import logging
import os
import signal as os_signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import httpx

from nextturn import events
from nextturn.deployments import Deployment, overview
from nextturn.errors import ConfigError, NextturnError
from nextturn.settings import Settings, child_environment
from nextturn.store import Store, upgrade

log = logging.getLogger(__name__)

MAX_RESTARTS = 5
MAX_BACKOFF_S = 30.0
RESTART_WINDOW_S = 60.0
STOP_GRACE_S = 30.0
HEALTH_TIMEOUT_S = 120.0


def log_library_output(path: Path) -> None:
    """Send this process's warnings and log records to ``path`` instead of the terminal.

    A live view redraws the terminal, and a library's FutureWarning printed into it breaks the display.
    Python reports a warning once per place that raises it (its default filters), so the log holds each
    once. The components ``up`` starts write their own output to their own logs already.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.captureWarnings(True)  # warnings become records of the py.warnings logger, which reach the root's
    logging.getLogger().addHandler(handler)


@dataclass(frozen=True)
class Component:
    name: str
    command: tuple[str, ...]  # the nextturn subcommand
    computes: bool = False  # runs a model with torch: gets a share of the cores (see threads())


def components(settings: Settings) -> list[Component]:
    """What ``up`` runs, in start order (stopped in the same order: the gateway first)."""
    parts = [Component("gateway", ("serve",), computes=settings.engine == "embedded"),
             Component("signals", ("signals", "run"))]
    if settings.train_method != "none":
        parts.append(Component("trainer", ("trainer", "run"), computes=True))
    parts.append(Component("rollout", ("rollout", "run")))
    return parts


def threads(parts: list[Component], cores: int) -> int:
    """Torch threads for each computing component: the cores shared out, at least one each.

    Two torch processes that each use every core thrash: on 2 cores, the gateway's answers took 4 to 60 s
    instead of 0.1 s while the trainer trained (OpenMP workers spinning for the same cores). Halved, each
    keeps its speed. A user's own ``OMP_NUM_THREADS`` wins.

    >>> threads(components(Settings()), 2), threads(components(Settings(train_method="none")), 16)
    (1, 16)
    """
    computing = sum(part.computes for part in parts)
    return max(1, cores // max(1, computing))


@dataclass
class _Child:
    component: Component
    process: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = None
    started_at: float = 0.0
    restart_at: float | None = None  # monotonic: when to start it again after it exited
    failures: deque[float] = field(default_factory=deque)  # monotonic times of unexpected exits
    restarts: int = 0
    last_exit: int | None = None
    failing: bool = False  # failed MAX_RESTARTS times within RESTART_WINDOW_S, and not run long since

    @property
    def state(self) -> str:
        if self.process is not None and self.process.poll() is None:
            return "failing" if self.failing else "running"
        if self.restart_at is not None:
            return "failing" if self.failing else "restarting"
        return "stopped"


class StackFailed(NextturnError):
    """A component kept failing; the stack was stopped."""


class Stack:
    """The components of ``up`` as child processes: start, supervise (:meth:`check`), stop."""

    def __init__(self, settings: Settings, *, environment: dict[str, str] | None = None,
                 backoff_s: float = 1.0, parts: list[Component] | None = None) -> None:
        self.settings = settings
        self.backoff_s = backoff_s  # the first restart's delay; it doubles, up to MAX_BACKOFF_S
        self.logs = settings.data_dir / "logs"
        self._environment = child_environment(settings, dict(os.environ if environment is None else environment))
        self._parts = components(settings) if parts is None else parts  # the first one serves /healthz
        self.children = [_Child(component) for component in self._parts]
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.settings.host in ("0.0.0.0", "::", "") else self.settings.host
        return f"http://{host}:{self.settings.port}"

    # -- start --------------------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Migrate the store and check the model, before any child starts."""
        settings = self.settings
        if settings.engine in ("embedded", "vllm") and not (settings.model_path / "config.json").is_file():
            raise ConfigError(f"no model in {settings.model_path}; build one with `nextturn model init "
                              f"{settings.model_path} --size small`, or set NEXTTURN_MODEL to a local model directory")
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        store = Store.from_settings(settings)
        store.close()
        upgrade(settings.store_url)

    def start(self, health_timeout_s: float = HEALTH_TIMEOUT_S) -> None:
        """Prepare, start every component, and wait until the gateway answers /healthz."""
        self.prepare()
        self.logs.mkdir(parents=True, exist_ok=True)
        with self._lock:
            for child in self.children:
                self._spawn(child)
        try:
            self._wait_healthy(health_timeout_s)
        except BaseException:
            self.stop()
            raise

    def _spawn(self, child: _Child) -> None:
        if child.log is None:
            child.log = (self.logs / f"{child.component.name}.log").open("ab")
        child.log.write(f"--- {datetime.now(UTC).isoformat()} nextturn {' '.join(child.component.command)}\n"
                        .encode())
        child.log.flush()
        environment = self._environment
        if child.component.computes and "OMP_NUM_THREADS" not in environment:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            environment = {**environment, "OMP_NUM_THREADS": str(threads(self._parts, cores))}
        child.process = subprocess.Popen(
            [sys.executable, "-m", "nextturn", *child.component.command], env=environment,
            stdin=subprocess.DEVNULL, stdout=child.log, stderr=subprocess.STDOUT,
            start_new_session=True)  # its own process group: a terminal's Ctrl-C reaches only this supervisor
        child.started_at = time.monotonic()
        child.restart_at = None

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check()
            gateway = self.children[0]
            if gateway.process is not None and gateway.process.poll() is None:
                try:
                    if httpx.get(f"{self.url}/healthz", timeout=2.0).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
            time.sleep(0.2)
        raise StackFailed(f"the gateway did not become healthy within {timeout_s:g} s; "
                          f"see {self.logs / 'gateway.log'}:\n{self.tail('gateway')}")

    # -- supervise ----------------------------------------------------------------------------------------

    def check(self) -> None:
        """Restart children that exited (after their back-off); raise StackFailed when the gateway keeps
        failing (a worker that keeps failing is marked so and retried: the others go on)."""
        now = time.monotonic()
        with self._lock:
            for index, child in enumerate(self.children):
                process = child.process
                if child.failing and process is not None and now - child.started_at > RESTART_WINDOW_S:
                    child.failing = False  # it has run a while since: back to the usual back-off
                    child.failures.clear()
                if process is not None and process.poll() is not None and child.restart_at is None:
                    child.last_exit = process.returncode
                    child.process = None
                    child.failures.append(now)
                    while child.failures and now - child.failures[0] > RESTART_WINDOW_S:
                        child.failures.popleft()
                    name = child.component.name
                    if len(child.failures) >= MAX_RESTARTS and not child.failing:
                        why = (f"{name} exited {len(child.failures)} times within {RESTART_WINDOW_S:g} s (last "
                               f"exit status {child.last_exit}); see {self.logs / (name + '.log')}:\n"
                               f"{self.tail(name)}")
                        if index == 0:
                            raise StackFailed(why)
                        log.error("%s\n%s is retried every %g s; the rest of the stack goes on", why, name,
                                  MAX_BACKOFF_S)
                        child.failing = True
                    delay = MAX_BACKOFF_S if child.failing else self.backoff_s * 2.0 ** (len(child.failures) - 1)
                    child.restart_at = now + min(MAX_BACKOFF_S, delay)
                if child.restart_at is not None and now >= child.restart_at:
                    child.restarts += 1
                    self._spawn(child)

    def run(self, stop: threading.Event, every_s: float = 1.0, on_tick: Any = None) -> None:
        """Supervise until ``stop`` is set; ``on_tick()`` runs after each check (the live status)."""
        while not stop.wait(every_s):
            self.check()
            if on_tick is not None:
                on_tick()

    # -- stop ---------------------------------------------------------------------------------------------

    def stop(self, grace_s: float = STOP_GRACE_S) -> dict[str, int | None]:
        """Stop every child, gateway first; return each one's exit status (uvicorn re-raises the SIGTERM it
        handled, so a gateway that shut down cleanly reports -15)."""
        statuses: dict[str, int | None] = {}
        with self._lock:
            for child in self.children:
                child.restart_at = None
                process = child.process
                if process is not None and process.poll() is None:
                    process.terminate()  # the child stops its own helpers (the gateway's recorder) in order
                    try:
                        process.wait(grace_s)
                    except subprocess.TimeoutExpired:
                        _signal_group(process, os_signal.SIGKILL)
                        process.wait()
                statuses[child.component.name] = process.returncode if process is not None else child.last_exit
                child.process = None
                if child.log is not None:
                    child.log.close()
                    child.log = None
        return statuses

    def tail(self, name: str, lines: int = 20) -> str:
        path = self.logs / f"{name}.log"
        if not path.is_file():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> Stack:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def _signal_group(process: subprocess.Popen[bytes], number: int) -> None:
    try:
        os.killpg(process.pid, number)
    except ProcessLookupError:
        pass


# -- what the loop is doing --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Activity:
    """The loop's figures, read from the store."""

    turns: int
    failed_turns: int
    resolved: int  # turns with a signal
    rewarded: int  # of those, with a reward
    hints: int
    recent_reward: float | None  # mean reward of the latest RECENT rewarded signals
    versions: int  # adapter versions published
    stable: str
    canary: str | None
    weight: float
    paused: bool
    last_change: str | None  # the latest rollout decision, in words
    scopes: tuple[str, ...] = ()  # the other scopes, a line each (with scopes per tenant or user)
    scope: str = events.DEFAULT_SCOPE  # the scope the figures above are of


RECENT = 100
SCOPES_SHOWN = 5


def activity(store: Store, scope: str | None = events.DEFAULT_SCOPE, *, every_scope: bool = False) -> Activity:
    """The figures ``up`` and the demo show (a handful of counting queries) for ``scope`` (None: the scope
    with the most resolved turns lately); ``every_scope``: a line for each other scope too (the busiest
    first, up to SCOPES_SHOWN)."""
    rows = overview(store) if every_scope or scope is None else []
    if scope is None:
        busiest = sorted(rows, key=lambda row: (-row["resolved"], -row["versions"],
                                                row["scope"] != events.DEFAULT_SCOPE, row["scope"]))
        scope = busiest[0]["scope"] if busiest else events.DEFAULT_SCOPE
    counts = store.loop_counts(scope, RECENT)
    recent = counts.pop("recent_rewards")
    state = Deployment.read(store, scope)
    changes = store.deployment_changes(scope, limit=1)
    last = None
    if changes:
        change = changes[0]
        last = f"{change.action} v{change.subject_version}: {change.reason}" if change.subject_version else \
            f"{change.action}: {change.reason}"
    return Activity(**counts, recent_reward=sum(recent) / len(recent) if recent else None,
                    stable=state.stable_name, canary=state.canary_name, weight=state.weight, paused=state.paused,
                    last_change=last, scopes=_scope_lines(rows, scope) if every_scope else (), scope=scope)


def _scope_lines(rows: list[dict[str, Any]], shown: str) -> tuple[str, ...]:
    rows = sorted((row for row in rows if row["scope"] != shown), key=lambda row: (-row["resolved"], row["scope"]))
    lines = []
    for row in rows[:SCOPES_SHOWN]:
        serves = row["stable"] or f"{row['falls_back_to']} (its own: none yet)"
        canary = f", canary {row['canary']} at {row['canary_weight']:.0%}" if row["canary"] else ""
        lines.append(f"{row['scope']}: {row['versions']} versions, {row['resolved']} resolved lately; "
                     f"serves {serves}{canary}")
    if len(rows) > SCOPES_SHOWN:
        lines.append(f"… and {len(rows) - SCOPES_SHOWN} more (nextturn scopes list)")
    return tuple(lines)


def status_table(stack: Stack, figures: Activity | None, error: str | None = None) -> Any:
    """The compact live status of ``up``: components, then the loop's figures."""
    from rich.table import Table

    table = Table(title=f"nextturn up — {stack.url}", show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    parts = []
    for child in stack.children:
        colour = {"running": "green", "restarting": "yellow"}.get(child.state, "red")  # failing, stopped: red
        extra = f" ({child.restarts} restarts)" if child.restarts else ""
        parts.append(f"[{colour}]{child.component.name}[/{colour}]{extra}")
    table.add_row("components", "  ".join(parts))
    if figures is None:
        table.add_row("store", error or "reading…")
        return table
    table.add_row("requests", f"{figures.turns} turns ({figures.failed_turns} failed)")
    reward = "n/a" if figures.recent_reward is None else f"{figures.recent_reward:+.2f}"
    table.add_row("signals", f"{figures.resolved} resolved, {figures.rewarded} rewards (recent mean {reward}), "
                             f"{figures.hints} hints")
    canary = f", canary {figures.canary} at {figures.weight:.0%}" if figures.canary else ""
    table.add_row(f"adapters ({figures.scope})", f"{figures.versions} published; stable {figures.stable}{canary}"
                              + (" (paused)" if figures.paused else ""))
    if figures.last_change:
        table.add_row("last decision", figures.last_change[:160])
    if figures.scopes:
        table.add_row("scopes", "\n".join(figures.scopes))
    table.add_row("logs", str(stack.logs))
    return table


def describe(figures: Activity) -> str:
    """One line of the figures, for a log that is not a terminal."""
    reward = "n/a" if figures.recent_reward is None else f"{figures.recent_reward:+.2f}"
    canary = f" canary={figures.canary}@{figures.weight:g}" if figures.canary else ""
    return (f"turns={figures.turns} failed={figures.failed_turns} resolved={figures.resolved} "
            f"reward={reward} hints={figures.hints} versions={figures.versions} stable={figures.stable}{canary}")

