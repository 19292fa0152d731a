"""``nextturn demo``: the whole loop on one machine, learning from simulated people.

1. The base model (:mod:`demo.base_model`): built once and cached.
2. For each scope policy (``--scope-by``: a scope per person, ``tenant``, or the one shared lineage,
   ``deployment``; both with ``--compare``) and each method (``--method``, or all four with ``--compare``,
   same seed, same people): a fresh data directory; ``nextturn up``'s :class:`~nextturn.stack.Stack`
   (gateway, signals worker, trainer, rollout controller as processes) with :func:`settings` tuned for a
   loop this small; the people of :mod:`demo.tasks` talking to it (:mod:`demo.users`) until
   ``interactions`` answers were given; live progress; then the stack stops and, for each person, the
   version that serves them at the end (their scope's stable version, else their chain's) is measured away
   from the loop (:mod:`demo.evaluation`), and so is the newest version of their scope that the rollout did
   not reject or roll back (what the trainer had learnt, ahead of the canary).
3. The results (:mod:`demo.report`): a markdown table, a learning-curve PNG, and the raw figures.
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from demo import base_model, evaluation, report, tasks
from demo.report import Decision, MethodResult
from demo.users import Budget, Judged, Population
from nextturn import events, scopes, tables
from nextturn.deployments import Deployment
from nextturn.errors import StoreUnavailable
from nextturn.settings import Settings
from nextturn.stack import Stack, activity
from nextturn.store import Store

ADMIN_KEY = "sk-demo-admin"  # the dashboard's login while a run is live (a demo on loopback only)
HELD_OUT_PER_PERSON = 48
DIVERSITY_SAMPLES = 96


POLICIES = ("tenant", "deployment")  # a scope per person; one shared lineage
POLICY_NAMES = report.POLICY_NAMES


def settings(data_dir: Path, model_dir: Path, method: str, port: int, scope_by: str = "tenant") -> Settings:
    """The loop's settings for the demo: the defaults, except what a loop of a few hundred answers needs
    (the figures behind each: docs/experiments.md).

    * signals: a conversation's last turn is resolved after 5 s of quiet (default 300 s);
    * rollout: one canary step at half the new sessions, decided on 10 resolved turns per arm at 75%
      confidence with a 0.25 margin (with ten rewards per arm, a canary as good as stable passes only with a
      margin near that), each weight serving 4 canary turns first, a timeout of 120 s, replaced versions
      draining after 5 s; the distinct-n collapse guard accepts 60% of the base model's (set when it read the
      replay's tokens, where a version that learnt numbered lists or JSON repeats "1." or brackets; it reads
      the words of answers to unrelated prompts now, and whether the demo still needs it lower is to be
      measured: issue 27);
    * trainer: unpaced, admitting samples up to 8 versions behind: a canary here decides every 15 to 30 s,
      and a paced trainer would idle through each one;
    * standing hints only with a scope per person: in the shared lineage the people are told apart only by
      their topics, so one person's standing hint teaches everyone's answers;
    * a scope's partial batch (at least 4 samples) trains once its oldest sample waited 10 s: a person
      here sends a message every few seconds, and a batch of 16 would take a fifth of their interactions.
    """
    people = ",".join(f"{key}:{name}" for name, key in keys().items())
    return Settings(
        data_dir=data_dir, model=str(model_dir), port=port, api_keys=people, admin_key=ADMIN_KEY,
        train_method=method,  # type: ignore[arg-type]
        signals_idle_timeout_s=5.0,
        trainer_max_ahead=0, trainer_max_version_lag=8, trainer_standing_hints=3 if scope_by == "tenant" else 0,
        trainer_partial_after_s=10.0,
        rollout_schedule=[0.5], rollout_min_resolved=10, rollout_confidence=0.75, rollout_reward_margin=0.25,
        rollout_guard_min_turns=4, rollout_canary_timeout_s=120.0, rollout_check_interval_s=1.0,
        rollout_drain_s=5.0, rollout_min_distinct=0.6, scope_by=scope_by,  # type: ignore[arg-type]
    )


def keys() -> dict[str, str]:
    return {person.name: f"sk-demo-{person.name}" for person in tasks.PEOPLE}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run(out: Path, *, methods: tuple[str, ...], interactions: int, seed: int, console: Console | None = None,
        build_steps: int = base_model.STEPS, policies: tuple[str, ...] = ("tenant",),
        model_seed: int | None = None) -> dict[str, Any]:
    """The demo; returns the figures it also writes to ``out`` (results.json, results.md, learning_curve.png).
    ``model_seed``: the base model's seed, when it is not ``seed``."""
    console = console or Console()
    model_dir = _base_model(console, seed if model_seed is None else model_seed, build_steps)
    out.mkdir(parents=True, exist_ok=True)
    measures = Measures(model_dir)
    port = free_port()  # every run's gateway on the same port: one dashboard address for the whole demo
    dashboard = f"http://127.0.0.1:{port}/dashboard"
    results = [_run_method(console, out, model_dir, method, interactions, seed, measures,
                           policy if len(policies) > 1 else "", policy, port)
               for policy in policies for method in methods]
    console.print("measuring the base model on the held-out requests…")
    nothing: dict[str, str | None] = {person.name: None for person in tasks.PEOPLE}
    base = MethodResult(method="base model", interactions=0, curve=[], decisions=[],
                        held_out=measures.held_out(nothing, seed), diversity=measures.diversity(nothing, seed),
                        stable=events.BASE_VERSION, seconds=0.0)
    hard = [p.name for p in tasks.PEOPLE if p.preference.hard]
    easy = [p.name for p in tasks.PEOPLE if not p.preference.hard]
    markdown = report.table(results, base, hard, easy) + "\n" + report.scope_table(results)
    def wants(chosen: list[str]) -> str:
        return ", ".join(f"{p.name} wants {p.preference.describe()}" for p in tasks.PEOPLE if p.name in chosen)

    (out / "results.md").write_text(
        f"Held-out satisfaction of the version serving each person at the end (and of the newest version the "
        f"rollout did not reject or roll back), after {interactions} interactions "
        f"(seed {seed}). Hard preferences: {wants(hard)}. Easy: {wants(easy)}.\n\n" + markdown
        + f"\nEach person's scope, live while a run of the demo is going: [the dashboard]({dashboard}) (log in "
          f"with the admin key `{ADMIN_KEY}`; docs/dashboard.md).\n")
    plot = report.plot(results, base, hard, out / "learning_curve.png")
    figures = {"seed": seed, "interactions": interactions, "base": asdict(base),
               "methods": {r.label: asdict(r) for r in results}}
    (out / "results.json").write_text(json.dumps(figures, indent=1))
    console.print(markdown)
    console.print(f"table: {out / 'results.md'}\nplot:  {plot}")
    return figures


def run_seeds(out: Path, *, seeds: int, seed: int, **demo: Any) -> list[dict[str, Any]]:
    """:func:`run` for each of ``seeds`` seeds from ``seed`` (the base model stays seed ``seed``'s, so only the
    people's choices and the loop's sampling vary); with several, each in ``out/seed-<n>`` and the mean and
    spread in ``out/summary.md``."""
    if seeds == 1:
        return [run(out, seed=seed, **demo)]
    every = [run(out / f"seed-{n}", seed=n, model_seed=seed, **demo) for n in range(seed, seed + seeds)]
    hard = [p.name for p in tasks.PEOPLE if p.preference.hard]
    easy = [p.name for p in tasks.PEOPLE if not p.preference.hard]
    summary = report.summary(every, hard, easy)
    (out / "summary.md").write_text(f"Held-out satisfaction over {seeds} seeds ({seed}–{seed + seeds - 1}): "
                                    f"mean (min–max).\n\n{summary}")
    (demo.get("console") or Console()).print(summary)
    return every


def _base_model(console: Console, seed: int, steps: int) -> Path:
    key = base_model.cache_key(seed, steps)
    cached = base_model.cache_root() / f"demo-base-{key}"
    if (cached / "config.json").is_file():
        console.print(f"base model: {cached} (cached)")
        return cached
    console.print(f"building the base model (once; cached in {cached.parent})")
    with Progress(TextColumn("teaching the base model"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("sft", total=steps, loss=float("nan"))
        path = base_model.cached_model(seed, steps=steps,
                                       progress=lambda step, total, loss: progress.update(task, completed=step,
                                                                                          loss=loss))
    return path


def _run_method(console: Console, out: Path, model_dir: Path, method: str, interactions: int, seed: int,
                measures: Measures, tag: str = "", policy: str = "tenant", port: int | None = None) -> MethodResult:
    name = f"{method}, {POLICY_NAMES[policy]}" if tag else method
    data_dir = out / (f"{method}-{policy}" if tag else method)
    shutil.rmtree(data_dir, ignore_errors=True)
    chosen = settings(data_dir, model_dir, method, port or free_port(), scope_by=policy)
    stack = Stack(chosen)
    console.print(f"\n[bold]{name}[/bold]: starting {', '.join(c.component.name for c in stack.children)} "
                  f"in {data_dir}")
    started = time.monotonic()
    stack.start()
    console.print(f"dashboard: {stack.url}/dashboard (admin key {ADMIN_KEY})")
    store = Store.from_settings(chosen)
    budget = Budget(interactions)
    population = Population(stack.url, keys(), tasks.PEOPLE, seed, budget)
    decisions: list[Decision] = []
    seen_changes: set[str] = set()
    talking = threading.Thread(target=population.run, name="people", daemon=True)
    own = {person.name: scopes.scope_of(policy, person.name) for person in tasks.PEOPLE}  # type: ignore[arg-type]
    try:
        talking.start()
        progress = Progress(TextColumn(f"{name:>8}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("interactions"), TimeElapsedColumn())
        bar = progress.add_task(name, total=interactions)
        with Live(Group(progress, _panel(population, None)), console=console, refresh_per_second=4) as live:
            while talking.is_alive():
                talking.join(0.5)
                stack.check()
                _new_decisions(store, set(own.values()), budget.used, seen_changes, decisions)
                progress.update(bar, completed=budget.used)
                try:
                    figures = activity(store, None)
                except StoreUnavailable:
                    figures = None
                live.update(Group(progress, _panel(population, figures)))
        _new_decisions(store, set(own.values()), budget.used, seen_changes, decisions)
        serving = {person: _serving(store, scope) for person, scope in own.items()}
        newest = {person: _newest_sound(store, scope) for person, scope in own.items()}
        per_scope = {scope: _stages(store, [scope]) for scope in sorted(set(own.values()))}
        stages = _stages(store, sorted(set(own.values())))
    finally:
        stack.stop()
        store.close()
    seconds = time.monotonic() - started
    if population.errors:
        console.print(f"[yellow]{len(population.errors)} people stopped early: {population.errors[:3]}[/yellow]")
    paths = {person: path for person, (_, path) in serving.items()}
    held_out = measures.held_out(paths, seed)
    diversity = measures.diversity(paths, seed)
    newest_paths = {person: (row.path if row is not None else paths[person]) for person, row in newest.items()}
    newest_held_out = measures.held_out(newest_paths, seed)
    curve = [(j.interaction, j.satisfied, j.hard) for j in sorted(population.judged, key=lambda j: j.interaction)]
    shown = {version for version, _ in serving.values()}
    result = MethodResult(method=method, policy=tag, interactions=budget.used, curve=curve, decisions=decisions,
                          held_out=held_out, diversity=diversity,
                          stable=", ".join(sorted(shown)), seconds=seconds, stages=stages,
                          newest=", ".join(sorted({events.adapter_name(row.scope, row.version)
                                                   for row in newest.values() if row is not None})),
                          newest_held_out=newest_held_out, stopped_early=list(population.errors),
                          per_scope=per_scope, serving={person: version for person, (version, _) in serving.items()})
    console.print(f"{name}: serving {result.stable} at the end; held-out satisfaction "
                  + ", ".join(f"{person} {value:.2f}" for person, value in held_out.items())
                  + (" (newest: " + ", ".join(f"{person} {value:.2f}" for person, value
                                              in newest_held_out.items()) + ")" if result.newest else "")
                  + f"; {seconds / 60:.1f} min")
    return result


def _serving(store: Store, scope: str) -> tuple[str, str | None]:
    """The version that serves ``scope`` (its own stable one, else its chain's) and its directory; the base
    model's name and None where none does."""
    for link in scopes.chain(scope):
        state = Deployment.read(store, link)
        if state.stable is not None:
            row = store.get(tables.Adapter, (link, state.stable))
            return state.stable_name, row.path if row is not None else None
    return events.BASE_VERSION, None


class Measures:
    """Held-out satisfaction and diversity of what serves each person, measured once per adapter and seed
    in a demo (the base model serves every person of a run without training, and the base row)."""

    def __init__(self, model_dir: Path) -> None:
        self._model_dir = model_dir
        self._samplers: dict[str | None, evaluation.Sampler] = {}
        self._satisfied: dict[tuple[str | None, str, int], float] = {}
        self._diverse: dict[tuple[str | None, int], float] = {}

    def _sampler(self, path: str | None) -> evaluation.Sampler:
        if path not in self._samplers:
            self._samplers.clear()  # one model in memory at a time
            self._samplers[path] = evaluation.Sampler.load(self._model_dir, Path(path) if path else None)
        return self._samplers[path]

    def held_out(self, paths: dict[str, str | None], seed: int) -> dict[str, float]:
        """Each person's held-out satisfaction on what serves them (the same requests whatever serves)."""
        for person in sorted(tasks.PEOPLE, key=lambda person: str(paths[person.name])):
            key = (paths[person.name], person.name, seed)
            if key not in self._satisfied:
                self._satisfied[key] = evaluation.satisfaction(
                    self._sampler(paths[person.name]), (person,), per_person=HELD_OUT_PER_PERSON,
                    seed=seed + 1)[person.name]
        return {person.name: self._satisfied[(paths[person.name], person.name, seed)] for person in tasks.PEOPLE}

    def diversity(self, paths: dict[str, str | None], seed: int) -> float:
        """Diversity on unrelated prompts, the mean over the people of what serves each of them."""
        for path in sorted(set(paths.values()), key=str):
            if (path, seed) not in self._diverse:
                self._diverse[(path, seed)] = evaluation.diversity(self._sampler(path), samples=DIVERSITY_SAMPLES,
                                                                   seed=seed + 2)
        return sum(self._diverse[(path, seed)] for path in paths.values()) / len(paths)


def _newest_sound(store: Store, scope: str) -> tables.Adapter | None:
    """The newest version of ``scope`` the rollout neither rejected nor rolled back, if any was published."""
    sound = [version for version, status in store.adapter_statuses(scope).items()
             if status not in ("rejected", "rolled_back")]
    return store.get(tables.Adapter, (scope, max(sound))) if sound else None


def _new_decisions(store: Store, watched: set[str], used: int, seen: set[str], decisions: list[Decision]) -> None:
    try:
        changes = [change for scope in sorted(watched) for change in store.deployment_changes(scope, limit=50)]
    except StoreUnavailable:
        return
    for change in sorted(changes, key=lambda change: change.changed_at):
        if change.id in seen:
            continue
        seen.add(change.id)
        if change.subject_version is not None:
            decisions.append(Decision(used, change.action, change.subject_version, change.scope))


def _stages(store: Store, chosen: list[str]) -> dict[str, int]:
    """How far each stage got in the ``chosen`` scopes: turns recorded, signals, hints, versions published,
    canaried, promoted…"""
    totals: dict[str, int] = {}
    for scope in chosen:
        figures = activity(store, scope)
        actions = [change.action for change in store.deployment_changes(scope, limit=10_000)]
        found = {"turns": figures.turns, "signals": figures.resolved, "rewards": figures.rewarded,
                 "hints": figures.hints, "published": figures.versions, "canaried": actions.count("canary"),
                 "promoted": actions.count("promote"), "rolled_back": actions.count("rollback"),
                 "rejected": actions.count("reject")}
        for key, value in found.items():
            totals[key] = totals.get(key, 0) + value
    return totals


def _panel(population: Population, figures: Any) -> Table:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    judged: list[Judged] = list(population.judged)
    recent = judged[-report.WINDOW:]
    hard = [j for j in judged if j.hard][-report.WINDOW:]
    easy = [j for j in judged if not j.hard][-report.WINDOW:]

    def share(items: list[Judged]) -> str:
        return f"{sum(j.satisfied for j in items) / len(items):.2f}" if items else "n/a"

    table.add_row("satisfaction", f"{share(recent)} (last {len(recent)} fresh answers); hard {share(hard)}, "
                                  f"easy {share(easy)}")
    if figures is not None:
        canary = f", canary {figures.canary} at {figures.weight:.0%}" if figures.canary else ""
        table.add_row("loop", f"{figures.turns} turns, {figures.resolved} signals ({figures.hints} hints), "
                              f"{figures.versions} versions; serving {figures.stable}{canary}")
        if figures.last_change:
            table.add_row("last decision", figures.last_change[:140])
    return table
