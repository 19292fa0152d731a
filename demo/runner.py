"""``nextturn demo``: the whole loop on one machine, learning from simulated people.

1. The base model (:mod:`demo.base_model`): built once and cached.
2. For each method (``--method``, or all four with ``--compare``, same seed, same people): a fresh data
   directory; ``nextturn up``'s :class:`~nextturn.stack.Stack` (gateway, signals worker, trainer, rollout
   controller as processes) with :func:`settings` tuned for a loop this small; the people of
   :mod:`demo.tasks` talking to it (:mod:`demo.users`) until ``interactions`` answers
   were given; live progress; then the stack stops and the version that serves at the end (stable) is
   measured away from the loop (:mod:`demo.evaluation`), and so is the newest version the
   rollout did not reject or roll back (what the trainer had learnt, ahead of the canary).
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
from nextturn import events, tables
from nextturn.deployments import Deployment
from nextturn.errors import StoreUnavailable
from nextturn.settings import Settings
from nextturn.stack import Stack, activity
from nextturn.store import Store

HELD_OUT_PER_PERSON = 48
DIVERSITY_SAMPLES = 96


def settings(data_dir: Path, model_dir: Path, method: str, port: int) -> Settings:
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
    * no standing hints: the people are told apart only by their topics, so one person's standing hint
      teaches everyone's answers.
    """
    people = ",".join(f"{key}:{name}" for name, key in keys().items())
    return Settings(
        data_dir=data_dir, model=str(model_dir), port=port, api_keys=people, admin_key="sk-demo-admin",
        train_method=method,  # type: ignore[arg-type]
        signals_idle_timeout_s=5.0,
        trainer_max_ahead=0, trainer_max_version_lag=8, trainer_standing_hints=0,
        rollout_schedule=[0.5], rollout_min_resolved=10, rollout_confidence=0.75, rollout_reward_margin=0.25,
        rollout_guard_min_turns=4, rollout_canary_timeout_s=120.0, rollout_check_interval_s=1.0,
        rollout_drain_s=5.0, rollout_min_distinct=0.6,
    )


def keys() -> dict[str, str]:
    return {person.name: f"sk-demo-{person.name}" for person in tasks.PEOPLE}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run(out: Path, *, methods: tuple[str, ...], interactions: int, seed: int, console: Console | None = None,
        build_steps: int = base_model.STEPS) -> dict[str, Any]:
    """The demo; returns the figures it also writes to ``out`` (results.json, results.md, learning_curve.png)."""
    console = console or Console()
    model_dir = _base_model(console, seed, build_steps)
    out.mkdir(parents=True, exist_ok=True)
    results = [_run_method(console, out, model_dir, method, interactions, seed) for method in methods]
    console.print("measuring the base model on the held-out requests…")
    sampler = evaluation.Sampler.load(model_dir)
    base = MethodResult(method="base model", interactions=0, curve=[], decisions=[],
                        held_out=evaluation.satisfaction(sampler, tasks.PEOPLE, per_person=HELD_OUT_PER_PERSON,
                                                         seed=seed + 1),
                        diversity=evaluation.diversity(sampler, samples=DIVERSITY_SAMPLES, seed=seed + 2),
                        stable=events.BASE_VERSION, seconds=0.0)
    hard = [p.name for p in tasks.PEOPLE if p.preference.hard]
    easy = [p.name for p in tasks.PEOPLE if not p.preference.hard]
    markdown = report.table(results, base, hard, easy)
    def wants(chosen: list[str]) -> str:
        return ", ".join(f"{p.name} wants {p.preference.describe()}" for p in tasks.PEOPLE if p.name in chosen)

    (out / "results.md").write_text(
        f"Held-out satisfaction of the version serving at the end (and of the newest version the rollout did "
        f"not reject or roll back), after {interactions} interactions "
        f"(seed {seed}). Hard preferences: {wants(hard)}. Easy: {wants(easy)}.\n\n" + markdown)
    plot = report.plot(results, base, hard, out / "learning_curve.png")
    figures = {"seed": seed, "interactions": interactions, "base": asdict(base),
               "methods": {r.method: asdict(r) for r in results}}
    (out / "results.json").write_text(json.dumps(figures, indent=1))
    console.print(markdown)
    console.print(f"table: {out / 'results.md'}\nplot:  {plot}")
    return figures


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


def _run_method(console: Console, out: Path, model_dir: Path, method: str, interactions: int,
                seed: int) -> MethodResult:
    data_dir = out / method
    shutil.rmtree(data_dir, ignore_errors=True)
    chosen = settings(data_dir, model_dir, method, free_port())
    stack = Stack(chosen)
    console.print(f"\n[bold]{method}[/bold]: starting {', '.join(c.component.name for c in stack.children)} "
                  f"in {data_dir}")
    started = time.monotonic()
    stack.start()
    store = Store.from_settings(chosen)
    budget = Budget(interactions)
    population = Population(stack.url, keys(), tasks.PEOPLE, seed, budget)
    decisions: list[Decision] = []
    seen_changes: set[str] = set()
    talking = threading.Thread(target=population.run, name="people", daemon=True)
    try:
        talking.start()
        progress = Progress(TextColumn(f"{method:>8}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("interactions"), TimeElapsedColumn())
        bar = progress.add_task(method, total=interactions)
        with Live(Group(progress, _panel(population, None)), console=console, refresh_per_second=4) as live:
            while talking.is_alive():
                talking.join(0.5)
                stack.check()
                _new_decisions(store, budget.used, seen_changes, decisions)
                progress.update(bar, completed=budget.used)
                try:
                    figures = activity(store)
                except StoreUnavailable:
                    figures = None
                live.update(Group(progress, _panel(population, figures)))
        _new_decisions(store, budget.used, seen_changes, decisions)
        stable = Deployment.read(store, events.DEFAULT_SCOPE)
        row = None if stable.stable is None else store.get(tables.Adapter, (events.DEFAULT_SCOPE, stable.stable))
        adapter = None if row is None else Path(row.path)
        newest = _newest_sound(store)
        stages = _stages(store)
    finally:
        stack.stop()
        store.close()
    seconds = time.monotonic() - started
    if population.errors:
        console.print(f"[yellow]{len(population.errors)} people stopped early: {population.errors[:3]}[/yellow]")
    sampler = evaluation.Sampler.load(model_dir, adapter)
    held_out = evaluation.satisfaction(sampler, tasks.PEOPLE, per_person=HELD_OUT_PER_PERSON, seed=seed + 1)
    diversity = evaluation.diversity(sampler, samples=DIVERSITY_SAMPLES, seed=seed + 2)
    newest_held_out = held_out
    if newest is not None and Path(newest.path) != adapter:
        newest_held_out = evaluation.satisfaction(evaluation.Sampler.load(model_dir, Path(newest.path)),
                                                  tasks.PEOPLE, per_person=HELD_OUT_PER_PERSON, seed=seed + 1)
    curve = [(j.interaction, j.satisfied, j.hard) for j in sorted(population.judged, key=lambda j: j.interaction)]
    result = MethodResult(method=method, interactions=budget.used, curve=curve, decisions=decisions,
                          held_out=held_out, diversity=diversity, stable=stable.stable_name, seconds=seconds,
                          stages=stages, newest=f"v{newest.version}" if newest else "",
                          newest_held_out=newest_held_out if newest else {}, stopped_early=list(population.errors))
    console.print(f"{method}: serving {result.stable} at the end; held-out satisfaction "
                  + ", ".join(f"{name} {value:.2f}" for name, value in held_out.items())
                  + (f" (newest, {result.newest}: " + ", ".join(f"{name} {value:.2f}" for name, value
                                                               in newest_held_out.items()) + ")" if newest else "")
                  + f"; {seconds / 60:.1f} min")
    return result


def _newest_sound(store: Store) -> tables.Adapter | None:
    """The newest version the rollout neither rejected nor rolled back, if any was published."""
    sound = [version for version, status in store.adapter_statuses(events.DEFAULT_SCOPE).items()
             if status not in ("rejected", "rolled_back")]
    return store.get(tables.Adapter, (events.DEFAULT_SCOPE, max(sound))) if sound else None


def _new_decisions(store: Store, used: int, seen: set[str], decisions: list[Decision]) -> None:
    try:
        changes = store.deployment_changes(events.DEFAULT_SCOPE, limit=50)
    except StoreUnavailable:
        return
    for change in reversed(changes):
        if change.id in seen:
            continue
        seen.add(change.id)
        if change.subject_version is not None:
            decisions.append(Decision(used, change.action, change.subject_version))


def _stages(store: Store) -> dict[str, int]:
    """How far each stage got: turns recorded, signals, hints, versions published, canaried, promoted…"""
    figures = activity(store)
    actions = [change.action for change in store.deployment_changes(events.DEFAULT_SCOPE, limit=10_000)]
    return {"turns": figures.turns, "signals": figures.resolved, "rewards": figures.rewarded, "hints": figures.hints,
            "published": figures.versions, "canaried": actions.count("canary"), "promoted": actions.count("promote"),
            "rolled_back": actions.count("rollback"), "rejected": actions.count("reject")}


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
