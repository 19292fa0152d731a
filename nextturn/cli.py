"""The ``nextturn`` command. Settings are built once here and passed down.

Errors that nextturn raises on purpose print one line (``nextturn: error: …``) and exit 1.
"""

from __future__ import annotations

import json
import sys
import threading
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from nextturn import events
from nextturn.bus import Record, open_event_log
from nextturn.bus.log import check_topics
from nextturn.errors import ConfigError, EventError, NextturnError
from nextturn.settings import Settings

if TYPE_CHECKING:
    from nextturn.bus import EventLog
    from nextturn.erasure import Places, Report
    from nextturn.store import Store

app = typer.Typer(
    name="nextturn",
    help="Online learning middleware for LLM chat and agent traffic.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="The store's schema.", no_args_is_help=True)
events_app = typer.Typer(help="The event log.", no_args_is_help=True)
model_app = typer.Typer(help="Local models (built here, never downloaded).", no_args_is_help=True)
keys_app = typer.Typer(help="API keys kept in the store.", no_args_is_help=True)
signals_app = typer.Typer(help="The signals worker: rewards and hints from what happened next.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(events_app, name="events")
app.add_typer(model_app, name="model")
app.add_typer(keys_app, name="keys")
app.add_typer(signals_app, name="signals")
trainer_app = typer.Typer(help="The trainer: LoRA adapters from signals, published as versions.", no_args_is_help=True)
app.add_typer(trainer_app, name="trainer")
rollout_app = typer.Typer(help="Rollouts: each published version behind a canary that promotes or rolls back.",
                          no_args_is_help=True)
app.add_typer(rollout_app, name="rollout")
scopes_app = typer.Typer(help="Scopes: the adapter lineages (shared, per tenant, per user).", no_args_is_help=True)
app.add_typer(scopes_app, name="scopes")
users_app = typer.Typer(help="End users of a tenant (the request's `user` field or X-Nextturn-User).",
                        no_args_is_help=True)
app.add_typer(users_app, name="users")
tenants_app = typer.Typer(help="Tenants: whose keys, turns and scopes they are.", no_args_is_help=True)
app.add_typer(tenants_app, name="tenants")
vllm_app = typer.Typer(help="A vLLM server for NEXTTURN_ENGINE=vllm.", no_args_is_help=True)
app.add_typer(vllm_app, name="vllm")


JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _settings(ctx: typer.Context) -> Settings:
    settings = ctx.find_root().obj
    assert isinstance(settings, Settings)
    return settings


@app.callback()
def root(
    ctx: typer.Context,
    config: Annotated[
        Path | None, typer.Option("--config", envvar="NEXTTURN_CONFIG", help="A TOML file of settings.")
    ] = None,
) -> None:
    ctx.obj = Settings.load(config)


@db_app.command("upgrade")
def db_upgrade(
    ctx: typer.Context, revision: Annotated[str, typer.Argument(help="Target revision.")] = "head"
) -> None:
    """Apply the store's migrations (creates the database file for SQLite)."""
    from nextturn.store import Store, upgrade

    settings = _settings(ctx)
    store = Store.from_settings(settings)  # creates the data dir for SQLite
    store.close()
    upgrade(settings.store_url, revision)
    typer.echo(f"store is at {revision}")


@events_app.command("tail")
def events_tail(
    ctx: typer.Context,
    topic: Annotated[str, typer.Argument(help=f"One of: {', '.join(events.TOPICS)}.")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new events.")] = False,
    new_only: Annotated[bool, typer.Option("--new", help="Skip what is there; print only new events.")] = False,
) -> None:
    """Print a topic's events as JSON lines, oldest first."""
    check_topics([topic])
    log = open_event_log(_settings(ctx))
    reader = log.consumer(None, [topic], start="end" if new_only else "beginning", on_bad_record=_report)
    try:
        while True:
            batch = reader.poll(max_records=1000, timeout_s=0.5)
            for delivery in batch:
                typer.echo(delivery.event.model_dump_json())
            if not batch and not follow:
                break
    except KeyboardInterrupt:
        pass
    finally:
        reader.close()
        log.close()


def _report(record: Record, error: EventError) -> None:
    """Reading is not consuming: a tail reports bad records instead of dead-lettering them."""
    typer.echo(f"# {record.topic}[{record.partition}]@{record.offset} is not an event: {error}", err=True)


@app.command()
def serve(ctx: typer.Context) -> None:
    """Run the gateway (an OpenAI-compatible server) on NEXTTURN_HOST:NEXTTURN_PORT."""
    import uvicorn

    from gateway.app import create_app

    settings = _settings(ctx)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info",
                access_log=settings.access_log)


@vllm_app.command("serve", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def vllm_serve(
    ctx: typer.Context,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for vLLM to become healthy.", min=1)] = 600.0,
) -> None:
    """Start vLLM on NEXTTURN_MODEL at NEXTTURN_VLLM_URL with what the gateway needs (runtime LoRA loading);
    arguments after -- go to vLLM. Runs until Ctrl-C."""
    from gateway.engines.vllm_server import VllmServer

    settings = _settings(ctx)
    server = VllmServer.from_settings(settings, extra=ctx.args, echo=sys.stderr)
    typer.echo(f"starting vLLM: {' '.join(server.command())}", err=True)
    try:
        server.start(timeout_s=timeout)
    except KeyboardInterrupt:
        server.stop()
        raise typer.Exit(130) from None
    typer.echo(f"vLLM serves {settings.model_path.name} at {server.url}; NEXTTURN_ENGINE=vllm "
               f"NEXTTURN_MODEL={settings.model_path} NEXTTURN_VLLM_URL={server.url} for the gateway", err=True)
    raise typer.Exit(server.wait())


@model_app.command("init")
def model_init(
    directory: Annotated[Path, typer.Argument(help="A new or empty directory.")],
    size: Annotated[str, typer.Option(help="tiny (tests), small (demo, benchmarks), 100m (trainer bench).")] = "tiny",
    seed: Annotated[int, typer.Option(help="Same seed, same files.")] = 0,
) -> None:
    """Build a small Llama-architecture model and its tokenizer, in Hugging Face format."""
    from nextturn.local_models import init_model

    init_model(directory, size=size, seed=seed)
    typer.echo(f"model ({size}, seed {seed}) written to {directory}")


@keys_app.command("create")
def keys_create(
    ctx: typer.Context,
    tenant: Annotated[str, typer.Option(help="The tenant the key belongs to (created if new).")],
    admin: Annotated[bool, typer.Option(help="An admin key: it may also use the admin routes.")] = False,
) -> None:
    """Create an API key and print it (only its digest is stored: this is the one time it is shown)."""
    from nextturn.keys import create_key
    from nextturn.store import Store, upgrade

    settings = _settings(ctx)
    store = Store.from_settings(settings)
    try:
        if settings.store_url.startswith("sqlite"):
            upgrade(settings.store_url)  # the embedded default migrates itself, as the gateway does
        store.check_schema()
        typer.echo(create_key(store, tenant, admin=admin))
    finally:
        store.close()


@keys_app.command("list")
def keys_list(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Every key in the store by its id (a prefix of its digest; the key itself is never stored)."""
    from dataclasses import asdict

    from nextturn.keys import list_keys

    store = _open_store(_settings(ctx))
    try:
        found = list_keys(store)
    finally:
        store.close()
    if as_json:
        typer.echo(json.dumps([asdict(key) for key in found]))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("id", "tenant", "admin", "created", "revoked", title="API keys")
    for key in found:
        table.add_row(key.id, key.tenant, "yes" if key.is_admin else "", key.created_at, key.revoked_at or "")
    Console().print(table)


@keys_app.command("revoke")
def keys_revoke(
    ctx: typer.Context,
    key: Annotated[str, typer.Argument(help="The key, or its id from `nextturn keys list`.")],
) -> None:
    """Revoke a key: gateways refuse it within a minute (they remember keys that long)."""
    from nextturn.keys import revoke_key

    store = _open_store(_settings(ctx))
    try:
        revoked = revoke_key(store, key)
    finally:
        store.close()
    typer.echo(f"revoked key {revoked.id} of tenant {revoked.tenant} (at {revoked.revoked_at})")


@users_app.command("forget")
def users_forget(
    ctx: typer.Context,
    tenant: Annotated[str, typer.Argument(help="The tenant the user belongs to.")],
    user: Annotated[str, typer.Argument(help="The user as requests named them (`user` field or X-Nextturn-User).")],
    as_json: JsonOption = False,
) -> None:
    """Forget an end user: every session in which they had a turn (turns, feedback, signals, log records) and
    their own scope's adapters; name the versions that were trained on their data."""
    from nextturn.erasure import forget_user

    _forget(ctx, as_json, lambda store, log, places: forget_user(store, log, places, tenant, user,
                                                                 actor=_operator()))


@tenants_app.command("forget")
def tenants_forget(
    ctx: typer.Context,
    tenant: Annotated[str, typer.Argument(help="The tenant to forget.")],
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Forget a tenant: everything it sent, its scopes and its keys; its name takes no keys again. Name the
    versions of other scopes that were trained on its data."""
    from nextturn.erasure import forget_tenant

    if not yes:
        typer.confirm(f"Forget the tenant {tenant!r}: its keys, turns, signals and adapters, for good?", abort=True)
    _forget(ctx, as_json, lambda store, log, places: forget_tenant(store, log, places, tenant, actor=_operator()))


def _operator() -> str:
    import getpass

    return f"operator {getpass.getuser()}"


def _forget(ctx: typer.Context, as_json: bool, run: Callable[[Store, EventLog, Places], Report]) -> None:
    from nextturn.erasure import Places

    settings = _settings(ctx)
    store = _open_store(settings)
    event_log = open_event_log(settings)
    try:
        report = run(store, event_log, Places.from_settings(settings))
    finally:
        event_log.close()
        store.close()
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2))
        return
    removed = ", ".join(f"{what.replace('_', ' ')} {count}" for what, count in report.removed.items() if count)
    typer.echo(f"forgot {report.kind} {report.subject or report.tenant} of tenant {report.tenant}: "
               f"{report.sessions} session(s); removed {removed or 'nothing'}")
    if report.removed_scopes:
        typer.echo(f"scopes removed (they no longer serve): {', '.join(report.removed_scopes)}")
    if report.trained_versions:
        trained = [f"{found['version']} ({found['status']}, {found['signals']} signal(s))"
                   for found in report.trained_versions]
        typer.echo(f"versions trained on this data (retrain without it to be rid of it): {', '.join(trained)}")
    else:
        typer.echo("no published version of another scope was trained on this data")


def _stop_on_interrupt(settings: Settings | None = None) -> threading.Event:
    """An event that Ctrl-C (SIGINT) or SIGTERM sets: a worker's loop ends at its next round. Given Settings
    with a heartbeat file, each round also touches that file (nextturn.liveness)."""
    import signal as os_signal

    from nextturn.liveness import Heartbeat

    stop = Heartbeat(settings.heartbeat_file if settings is not None else None)
    for number in (os_signal.SIGINT, os_signal.SIGTERM):
        os_signal.signal(number, lambda *_: stop.set())
    return stop


def _open_store(settings: Settings) -> Store:
    from nextturn.store import Store, upgrade

    store = Store.from_settings(settings)
    if settings.store_url.startswith("sqlite"):
        upgrade(settings.store_url)  # the embedded default migrates itself, as the gateway does
    store.check_schema()
    return store


@app.command()
def record(ctx: typer.Context) -> None:
    """Copy events from the event log into the store until Ctrl-C (with NEXTTURN_GATEWAY_RECORDER=false,
    recorders run apart from the gateways; any number share the work)."""
    from nextturn.recorder import record as run_recorder

    settings = _settings(ctx)
    _open_store(settings).close()  # migrated (SQLite) and checked before the first batch
    stop = _stop_on_interrupt(settings)
    typer.echo(f"recorder running (event log: {settings.bus}); Ctrl-C stops it", err=True)
    run_recorder(settings, stop)
    typer.echo("recorder stopped", err=True)


@app.command()
def alive(ctx: typer.Context, within: Annotated[float, typer.Option(
        min=1, help="The longest a round of the worker's loop may take, in seconds.")] = 120.0) -> None:
    """Exit 0 if the worker whose heartbeat file is NEXTTURN_HEARTBEAT_FILE turned its loop within the last
    --within seconds, 1 otherwise (a health check for the recorder, signals, trainer and rollout)."""
    from nextturn.liveness import age_s

    path = _settings(ctx).heartbeat_file
    if path is None:
        raise ConfigError("set NEXTTURN_HEARTBEAT_FILE (for the worker and for this check) to a local file path")
    age = age_s(path)
    if age is None or age > within:
        typer.echo(f"not alive: {path} " + ("does not exist yet" if age is None else f"is {age:.0f} s old"), err=True)
        raise typer.Exit(1)
    typer.echo(f"alive: the loop turned {age:.0f} s ago")


@signals_app.command("run")
def signals_run(ctx: typer.Context) -> None:
    """Consume turns and feedback; write and publish signals until Ctrl-C."""
    import gc

    from signals.worker import from_settings

    settings = _settings(ctx)
    store = _open_store(settings)
    event_log = open_event_log(settings)
    worker = from_settings(settings, event_log, store)
    stop = _stop_on_interrupt(settings)
    typer.echo(f"signals worker running (event log: {settings.bus}); Ctrl-C stops it", err=True)
    # Everything alive now lives until exit: keep it out of the collector's way. Collections that scanned
    # it cost the worker about a fifth of its throughput (bench/signals_throughput.py).
    gc.collect()
    gc.freeze()
    try:
        worker.run(stop)
    finally:
        worker.close()
        event_log.close()
        store.close()
        typer.echo("signals worker stopped: " + ", ".join(f"{k} {v}" for k, v in sorted(worker.counts.items())),
                   err=True)


@signals_app.command("relabel")
def signals_relabel(
    ctx: typer.Context,
    since: Annotated[datetime, typer.Option(help="Re-score turns that started at or after this time (UTC).",
                                            formats=["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S"])],
) -> None:
    """Score stored turns again with this extractor version (idempotent: a second run writes nothing)."""
    from signals.relabel import relabel

    settings = _settings(ctx)
    store = _open_store(settings)
    event_log = open_event_log(settings)
    try:
        done = relabel(store, event_log, since.replace(tzinfo=since.tzinfo or UTC),
                       idle_timeout_s=settings.signals_idle_timeout_s)
    finally:
        event_log.close()
        store.close()
    typer.echo(f"relabelled {done.turns} turn(s): {done.written} new signal revision(s), "
               f"{done.open} still open (the signals worker closes them when their session goes quiet)")


@signals_app.command("status")
def signals_status(
    ctx: typer.Context,
    as_json: JsonOption = False,
) -> None:
    """Resolved turns, rewards by source, hints, abstentions, judge share and agreement, lag."""

    from nextturn.progress import signals
    from signals.cases import EXTRACTOR_VERSION

    store = _open_store(_settings(ctx))
    try:
        figures = signals(store, extractor_version=EXTRACTOR_VERSION)
    finally:
        store.close()
    _show(figures, as_json, title=f"signals ({figures['extractor_version']})", leave_out="extractor_version")


def _scope_name(name: str | None) -> str | None:
    from nextturn.scopes import MAX_NAME, valid

    if name is not None and not valid(name):
        raise typer.BadParameter(f"a scope is at most {MAX_NAME} of a-z, 0-9, '.', '_' and '-', starting with a "
                                 "letter or digit (e.g. default, t.acme)")
    return name


ScopeOption = Annotated[str, typer.Option(
    "--scope", callback=_scope_name,
    help="The adapter lineage: default (shared), t.<tenant>, or t.<tenant>.u.<digest> (docs/rollouts.md).")]


@trainer_app.command("run")
def trainer_run(ctx: typer.Context, scope: Annotated[str | None, typer.Option(
        "--scope", callback=_scope_name,
        help="Train this scope only, in a consumer group of its own. Default: every scope whose partition of "
             "the signals this trainer holds in the group of all trainers.")] = None) -> None:
    """Train adapters from their signals; publish each update as a version, until Ctrl-C."""
    from trainer.policy import SharedBase
    from trainer.scopes import ScopeTrainers
    from trainer.worker import TrainerConfig, TrainerWorker

    settings = _settings(ctx)
    TrainerConfig.from_settings(settings)  # refuses what cannot train before anything is loaded
    store = _open_store(settings)
    event_log = open_event_log(settings)
    runner: ScopeTrainers | TrainerWorker
    if scope is None:
        shared = SharedBase(settings.model_path, device=settings.trainer_device)  # one base model for all
        every = ScopeTrainers(
            event_log, lambda scope: TrainerWorker.from_settings(settings, event_log, store, scope, shared),
            store=store, max_resident=settings.trainer_max_resident_scopes)
        runner = every
        started = (f"trainer of every scope it holds (scopes by {settings.scope_by}, "
                   f"{settings.trainer_max_resident_scopes} in memory)")

        def done() -> str:
            totals: Counter[str] = Counter(every.counts)
            for worker in every.workers.values():
                totals.update(worker.ledger.counts)
            counts = ", ".join(f"{k} {v}" for k, v in sorted(totals.items()))
            return f"{len(every.workers)} scopes held ({', '.join(sorted(every.workers))}); {counts}"
    else:
        one = TrainerWorker.from_settings(settings, event_log, store, scope)
        runner = one
        started = f"trainer of scope {scope!r} running on {one.policy.device} (head version {one.ledger.head})"

        def done() -> str:
            return ", ".join(f"{k} {v}" for k, v in sorted(one.ledger.counts.items()))
    stop = _stop_on_interrupt(settings)
    typer.echo(f"{started}, method {settings.train_method}; Ctrl-C stops it", err=True)
    try:
        runner.run(stop)
    finally:
        runner.close()
        event_log.close()
        store.close()
        typer.echo(f"trainer stopped: {done()}", err=True)


@trainer_app.command("status")
def trainer_status(
    ctx: typer.Context,
    scope: ScopeOption = events.DEFAULT_SCOPE,
    as_json: JsonOption = False,
) -> None:
    """The scope's head version, waiting signals, counts, and each version's collapse guards."""

    from trainer.adapters import AdapterShelf
    from trainer.checkpoint import Checkpoints

    settings = _settings(ctx)
    state = Checkpoints(settings.trainer_path / scope).state() or {}
    shelf = AdapterShelf(settings.adapters_path, scope)
    versions = {}
    for version in shelf.versions():
        meta = shelf.meta(version)
        guards = {k: v for k, v in meta.get("guards", {}).items() if k != "base"}
        versions[events.adapter_name(scope, version)] = {"step": meta.get("step"), "guards": guards,
                                                          "base": meta.get("guards", {}).get("base")}
    figures = {"scope": scope, "head": state.get("head", 0), "step": state.get("step", 0),
               "waiting": len(state.get("waiting", {})), "counts": state.get("counts", {}), "versions": versions}
    _show(figures, as_json, title=f"trainer of scope {scope!r}", leave_out="scope")


AllScopesOption = Annotated[str | None, typer.Option(
    "--scope", callback=_scope_name, help="Only this scope (default: every scope).")]


@rollout_app.command("run")
def rollout_run(ctx: typer.Context, scope: AllScopesOption = None) -> None:
    """Canary each published version of every scope (or of one); step it up, promote it or roll it back by
    the gates, until Ctrl-C."""
    from rollout.controller import RolloutController
    from rollout.gates import GatePolicy

    settings = _settings(ctx)
    store = _open_store(settings)
    event_log = open_event_log(settings)
    controller = RolloutController(event_log, store, scope=scope, policy=GatePolicy.from_settings(settings))
    stop = _stop_on_interrupt(settings)
    which = "every scope" if scope is None else f"scope {scope!r}"
    typer.echo(f"rollout controller of {which} running (schedule {settings.rollout_schedule}); Ctrl-C stops it",
               err=True)
    try:
        controller.run(stop, settings.rollout_check_interval_s)
    finally:
        controller.close()
        event_log.close()
        store.close()


@rollout_app.command("status")
def rollout_status(
    ctx: typer.Context,
    scope: ScopeOption = events.DEFAULT_SCOPE,
    as_json: JsonOption = False,
) -> None:
    """What serves now, each arm's evidence, what the gates would decide, and the latest changes."""
    from nextturn.deployments import Deployment, status, watched
    from rollout.controller import judge
    from rollout.gates import GatePolicy, watch

    settings = _settings(ctx)
    policy = GatePolicy.from_settings(settings)
    store = _open_store(settings)
    try:
        figures = status(store, scope, max_tenant_share=policy.max_tenant_share)
        state = Deployment.read(store, scope)
        now = events.utc_now()
        verdict = judge(store, state, policy, now)
        if verdict is not None:
            figures["next"] = f"{verdict.action}: {verdict.reason}"
        arms = watched(store, state, policy.max_tenant_share)
        if arms is not None and state.watch_since is not None:
            said = watch(*arms, policy, (now - state.watch_since).total_seconds())
            figures["watch"] = f"{said.action}: {said.reason}"
    finally:
        store.close()
    _show(figures, as_json, title=f"rollout of scope {scope!r}", leave_out="scope")


Actor = Annotated[str | None, typer.Option("--actor", help="Who acts (default: your user name and host).")]
Reason = Annotated[str, typer.Option("--reason", help="Why: recorded with the change.")]


def _operate(ctx: typer.Context, action: str, scope: str, actor: str | None, reason: str,
             version: int | None = None) -> None:
    import getpass
    import socket

    from nextturn.deployments import operate

    settings = _settings(ctx)
    store = _open_store(settings)
    event_log = open_event_log(settings)
    try:
        change = operate(store, scope, action, actor or f"{getpass.getuser()}@{socket.gethostname()}", reason,
                         lambda change: event_log.append([change]), version)
    finally:
        event_log.close()
        store.close()
    state = f"stable {change.stable_version or 'base'}" + (
        f", canary {change.canary_version} at {change.canary_weight:g}" if change.canary_version else "")
    typer.echo(f"{change.action} {change.subject_version or ''} by {change.actor}: {state}"
               + (" (paused)" if change.paused else ""))


@rollout_app.command("promote")
def rollout_promote(
    ctx: typer.Context, reason: Reason, scope: ScopeOption = events.DEFAULT_SCOPE, actor: Actor = None,
    version: Annotated[int | None, typer.Argument(help="The version to make stable (default: the canary).")] = None,
) -> None:
    """Make the canary (or VERSION) the stable version now."""
    _operate(ctx, "promote", scope, actor, reason, version)


@rollout_app.command("rollback")
def rollout_rollback(
    ctx: typer.Context, reason: Reason, scope: ScopeOption = events.DEFAULT_SCOPE, actor: Actor = None,
    to: Annotated[int | None, typer.Option("--to", help="Without a canary: the version to go back to "
                                                        "(default: the stable one before).")] = None,
) -> None:
    """Drop the canary now; without one, put the previous stable version back."""
    _operate(ctx, "rollback", scope, actor, reason, to)


@rollout_app.command("pause")
def rollout_pause(ctx: typer.Context, reason: Reason, scope: ScopeOption = events.DEFAULT_SCOPE,
                  actor: Actor = None) -> None:
    """Hold the canary at its weight: no step, promotion or timeout (fast guardrails still roll back)."""
    _operate(ctx, "pause", scope, actor, reason)


@rollout_app.command("resume")
def rollout_resume(ctx: typer.Context, reason: Reason, scope: ScopeOption = events.DEFAULT_SCOPE,
                   actor: Actor = None) -> None:
    """Let the controller decide again."""
    _operate(ctx, "resume", scope, actor, reason)


@scopes_app.command("list")
def scopes_list(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Every scope: stable and canary, versions, turns resolved in the last day and their mean reward, and
    what serves it while it has no stable version."""
    from nextturn.deployments import overview

    settings = _settings(ctx)
    store = _open_store(settings)
    try:
        found = overview(store)
    finally:
        store.close()
    if as_json:
        typer.echo(json.dumps(found, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("scope", "stable", "canary", "versions", "resolved (1 day)", "mean reward", "falls back to",
                  title="scopes")
    for scope in found:
        canary = f"{scope['canary']} at {scope['canary_weight']:.0%}" if scope["canary"] else "-"
        reward = "-" if scope["mean_reward"] is None else f"{scope['mean_reward']:+.2f}"
        table.add_row(scope["scope"], scope["stable"] or "-", canary, str(scope["versions"]), str(scope["resolved"]),
                      reward, scope["falls_back_to"])
    Console().print(table)


def _show(figures: dict[str, object], as_json: bool, *, title: str, leave_out: str) -> None:
    """A status command's figures: JSON, or a table of name and value (``leave_out`` is in the title)."""
    if as_json:
        typer.echo(json.dumps(figures, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("figure", "value", title=title)
    for name, value in figures.items():
        if name != leave_out:
            table.add_row(name.replace("_", " "), json.dumps(value))
    Console().print(table)


@app.command()
def up(ctx: typer.Context) -> None:
    """Run the whole loop: gateway, signals worker, trainer and rollout controller, until Ctrl-C."""
    from rich.console import Console
    from rich.live import Live

    from nextturn.errors import StoreUnavailable
    from nextturn.stack import Activity, Stack, activity, describe, log_library_output, status_table
    from nextturn.store import Store

    settings = _settings(ctx)
    console = Console(stderr=True)
    stack = Stack(settings)
    log_library_output(stack.logs / "up.log")
    console.print(f"starting {', '.join(c.component.name for c in stack.children)} "
                  f"(engine {settings.engine}, event log {settings.bus}); logs in {stack.logs}")
    stack.start()
    stop = _stop_on_interrupt()
    store = Store.from_settings(settings)
    console.print(f"[green]up[/green]: {stack.url}/v1 (OpenAI-compatible), the dashboard at {stack.url}/dashboard; "
                  "Ctrl-C stops everything")

    def figures() -> tuple[Activity | None, str | None]:
        try:
            return activity(store, None, every_scope=settings.scope_by != "deployment"), None
        except StoreUnavailable as exc:
            return None, str(exc)

    ticks = 0

    def log_line() -> None:  # not a terminal: one line every ten seconds
        nonlocal ticks
        ticks += 1
        if ticks % 10 == 0:
            found, error = figures()
            console.print(describe(found) if found is not None else f"store: {error}")

    try:
        if console.is_terminal:
            with Live(status_table(stack, *figures()), console=console, refresh_per_second=2) as live:
                stack.run(stop, on_tick=lambda: live.update(status_table(stack, *figures())))
        else:
            stack.run(stop, on_tick=log_line)
    finally:
        statuses = stack.stop()
        store.close()
        console.print("stopped: " + ", ".join(
            name + ("" if code in (0, -15, None) else f" (exit status {code})") for name, code in statuses.items()))


@app.command()
def demo(
    ctx: typer.Context,
    method: Annotated[str | None, typer.Option(help="Run one method only: none | rl | opd | combined.")] = None,
    compare: Annotated[bool, typer.Option(help="Run all four methods under both scope policies, with the same "
                                               "seed and people (what runs without --method or --quick).")] = False,
    quick: Annotated[bool, typer.Option(help="The combined method only, a scope per person: a few minutes.")] = False,
    scope_by: Annotated[str | None, typer.Option(
        "--scope-by", help="tenant: each person learns into a scope of their own; deployment: everyone into the "
                           "one shared lineage. Default: tenant (both with --compare).")] = None,
    interactions: Annotated[int, typer.Option(help="Model answers per run, shared by five people.", min=16)] = 320,
    seed: Annotated[int, typer.Option(help="The base model's and the people's seed.")] = 0,
    seeds: Annotated[int, typer.Option(help="Run the people with this many seeds (seed, seed+1, …) and report the "
                                            "mean and spread.", min=1)] = 1,
    out: Annotated[Path | None, typer.Option(help="Where results go (default <data dir>/demo).")] = None,
) -> None:
    """The whole loop on this machine, learning from simulated people; writes a table and a learning curve."""
    from demo import METHODS  # the package alone: cheap, and it needs none of the demo extra

    if method is not None and method not in METHODS:
        raise typer.BadParameter(f"choose one of {', '.join(METHODS)}", param_hint="--method")
    if scope_by is not None and scope_by not in ("tenant", "deployment"):
        raise typer.BadParameter("choose tenant or deployment", param_hint="--scope-by")
    if sum((compare, quick, method is not None)) > 1:
        raise typer.BadParameter("choose one of --compare, --quick and --method", param_hint="--quick")
    try:
        from demo.runner import run_seeds
    except ModuleNotFoundError as exc:
        if exc.name not in ("openai", "matplotlib", "torch", "transformers", "peft", "trl"):
            raise
        raise ConfigError(f"the demo needs {exc.name}: pip install 'nextturn[ml,demo]'") from exc
    import signal as os_signal

    from nextturn.stack import log_library_output

    settings = _settings(ctx)
    chosen = ("combined",) if quick else (method,) if method is not None else METHODS
    every_policy = not quick and method is None and scope_by is None
    policies = ("tenant", "deployment") if every_policy else (scope_by or "tenant",)
    # SIGTERM as Ctrl-C: the running stack is stopped on the way out, not left behind as orphans.
    os_signal.signal(os_signal.SIGTERM, os_signal.default_int_handler)
    out = out or settings.data_dir / "demo"
    log_library_output(out / "demo.log")  # the live progress stays readable; warnings are in the log
    run_seeds(out, methods=chosen, seed=seed, seeds=seeds, interactions=interactions, policies=policies)


def main() -> None:
    try:
        app()  # standalone: usage errors print and exit 2; our own errors propagate to here
    except NextturnError as exc:
        typer.echo(f"nextturn: error: {exc}", err=True)
        sys.exit(1)
