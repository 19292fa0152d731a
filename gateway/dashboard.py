"""The operator's page, ``/dashboard``: is each scope getting better, what is the canary doing, where do the
rewards come from, is anything collapsing; and the operator's actions.

- ``/dashboard``: every scope (stable, canary and its weight, paused, versions, turns resolved in the last
  day and their mean reward, what serves it while it has none) and the whole loop's signals of the last hour
  (the mix of sources, the judge's agreement with external evidence, open cases, lag, dead letters), as the
  deployment watcher last read them for /metrics;
- ``/dashboard/scopes/<scope>``: each version's reward over time with the deployment's changes marked, the
  canary's and stable's evidence, the collapse guards of each version beside the base model's, the scope's
  signal mix and judge agreement, open cases, how far its trainer is behind, the latest changes with who
  and why; and the actions pause, resume, promote and rollback, each with a reason and a confirmation step.

It reads the store through the functions the CLI uses (:mod:`nextturn.deployments`, :mod:`nextturn.progress`)
and acts through the same :func:`nextturn.deployments.operate`, recording the operator's name and reason.
Rendered on the server (Jinja templates, SVG charts from :mod:`gateway.charts`); no script; the one style
sheet is served from here.

Login: ``POST /dashboard/login`` with an admin key and the operator's name opens a session
(:func:`nextturn.keys.open_session`: in the store, so every replica knows it). The cookie is HttpOnly,
``SameSite=Strict``, limited to ``/dashboard`` and ``Secure`` over https; the key is never in a URL. Every
form carries a token derived from the session's (HMAC), and a POST whose ``Origin`` names another host is
refused, so a page elsewhere cannot act with an operator's cookie. A session ends at logout, after
:data:`nextturn.keys.SESSION_S`, or when its key is revoked.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from jinja2 import Environment, PackageLoader, select_autoescape

from gateway.auth import Keyring
from gateway.charts import SOURCES, Mark, colour, mix_bar, reward_chart
from gateway.errors import GatewayError, PermissionDenied
from nextturn import deployments, events, progress, scopes, tables
from nextturn.errors import DeploymentError, NextturnError
from nextturn.keys import close_session, find_session, open_session
from nextturn.store import Store

COOKIE = "nextturn_session"
FORM = b"application/x-www-form-urlencoded"
MAX_NAME = 64
MAX_REASON = 500
# The scope page's time spans, in hours; "all": since the scope's first signal, at most 30 days back.
WINDOWS = {"all": 720, "1h": 1, "6h": 6, "24h": 24, "7d": 168}
BUCKETS = 30  # points per version on the reward chart: enough turns in each to mean something
HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}
EXPLAIN = {
    "pause": "The controller stops moving this scope's canary: it keeps its weight until resumed. Fast "
             "guardrails still roll a failing canary back.",
    "resume": "The controller decides this scope's canary by its gates again.",
    "promote": "The version becomes stable: every new session of the scope is served by it.",
    "rollback": "The canary is rolled back (or, without a canary, the stable version is replaced by the "
                "version before it); the version rolled back is never deployed again by the controller.",
}


@dataclass(frozen=True)
class Operator:
    actor: str
    token: str

    @property
    def form_token(self) -> str:
        """What each form carries: derived from the session's token, which only its browser knows."""
        return hmac.new(self.token.encode(), b"nextturn dashboard form", hashlib.sha256).hexdigest()[:40]


class Refused(Exception):
    """A dashboard request refused, with the status and the sentence its page shows."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def dashboard_routes(keyring: Keyring) -> APIRouter:
    """The dashboard's routes. Its forms are urlencoded, not JSON: ``gateway.limits.GuardRequests`` lets them
    through to paths under ``/dashboard/`` only, where :func:`_form` checks their token and origin."""
    router = APIRouter(prefix="/dashboard", route_class=APIRoute, include_in_schema=False)
    pages = Environment(loader=PackageLoader("gateway", "templates"), autoescape=select_autoescape(["html"]),
                        trim_blocks=True, lstrip_blocks=True)
    pages.globals.update(colour=colour, mix_bar=mix_bar, sources=SOURCES)
    style = resources.files("gateway").joinpath("static/dashboard.css").read_bytes()

    def page(template: str, code: int = 200, **values: Any) -> HTMLResponse:
        return HTMLResponse(pages.get_template(template).render(**values), status_code=code, headers=HEADERS)

    async def operator(request: Request) -> Operator | None:
        token = request.cookies.get(COOKIE)
        if not token or len(token) > 128:
            return None
        store: Store = request.app.state.store
        row = await asyncio.to_thread(find_session, store, token)
        if row is None or not await keyring.session_holds(row.key_hash):
            return None
        return Operator(row.actor, token)

    def to_login(request: Request) -> RedirectResponse:
        return RedirectResponse(f"/dashboard/login?next={quote(request.url.path)}", status_code=303)

    @router.get("/static/dashboard.css")
    async def stylesheet() -> Response:
        return Response(style, media_type="text/css", headers={"Cache-Control": "max-age=3600"})

    @router.get("/login", response_class=HTMLResponse)
    async def login_form(request: Request, next: str = "/dashboard") -> HTMLResponse:
        return page("login.html", next=_local(next), error=None, name="")

    @router.post("/login", response_model=None)
    async def login(request: Request) -> Response:
        target, name = "/dashboard", ""
        try:
            fields = await _form(request, None)
            target, name = _local(fields.get("next", "/dashboard")), fields.get("name", "").strip()
            if not name or len(name) > MAX_NAME or not name.isprintable():
                raise Refused(400, f"say who you are: a name of 1 to {MAX_NAME} characters, recorded with each action")
            try:
                key_hash = await keyring.admin_login(fields.get("key", ""))
            except PermissionDenied as exc:
                raise Refused(exc.status, "this key is not an admin key: the dashboard needs one") from exc
            except GatewayError as exc:
                raise Refused(exc.status, str(exc)) from exc
            token = await asyncio.to_thread(open_session, request.app.state.store, key_hash, name)
        except Refused as exc:
            return page("login.html", exc.status, next=target, error=str(exc), name=name[:MAX_NAME])
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict", path="/dashboard",
                            secure=request.url.scheme == "https")
        return response

    @router.post("/logout", response_model=None)
    async def logout(request: Request) -> Response:
        who = await operator(request)
        if who is not None:
            try:
                await _form(request, who)
            except Refused as exc:
                return page("error.html", exc.status, who=who, message=str(exc))
            await asyncio.to_thread(close_session, request.app.state.store, who.token)
        response = RedirectResponse("/dashboard/login", status_code=303)
        response.delete_cookie(COOKIE, path="/dashboard")
        return response

    @router.get("", response_model=None)
    async def index(request: Request, q: str = "") -> Response:
        who = await operator(request)
        if who is None:
            return to_login(request)
        store: Store = request.app.state.store
        every = await asyncio.to_thread(deployments.overview, store)
        # The loop's figures as the deployment watcher last read them for /metrics (every LOOP_EVERY_S): one
        # read of the last hour's signals serves both, however often the page is opened.
        cached: tuple[datetime, dict[str, Any]] | None = request.app.state.watcher.loop
        if cached is None:
            now = events.utc_now()
            cached = (now, await asyncio.to_thread(progress.signals, store, since=now - timedelta(hours=1)))
        shown = [row for row in every if q.strip().lower() in row["scope"]] if q.strip() else every
        return page("index.html", who=who, scopes=shown, total=len(every), loop=cached[1], as_of=cached[0], q=q)

    @router.get("/scopes/{scope}", response_model=None)
    async def scope_page(request: Request, scope: str, window: str = "all", done: str = "") -> Response:
        who = await operator(request)
        if who is None:
            return to_login(request)
        try:
            view = await _scope_view(request, scope, window)
        except Refused as exc:
            return page("error.html", exc.status, who=who, message=str(exc))
        return page("scope.html", who=who, done=done if done in deployments.ACTIONS else "", error=None, **view)

    @router.post("/scopes/{scope}/act", response_model=None)
    async def act(request: Request, scope: str) -> Response:
        who = await operator(request)
        if who is None:
            return to_login(request)
        try:
            fields = await _form(request, who)
            action, reason, version = _action(fields)
            if fields.get("confirm") != "yes":
                view = await _scope_view(request, scope, "all")
                return page("confirm.html", who=who, action=action, reason=reason, version=version,
                            explain=EXPLAIN[action], **view)
            store: Store = request.app.state.store
            if not scopes.valid(scope):
                raise Refused(404, f"there is no scope {scope!r}")
            try:
                await asyncio.to_thread(deployments.operate, store, scope, action, f"{who.actor} (dashboard)",
                                        reason, request.app.state.turns.publisher.publish, version)
            except DeploymentError as exc:
                raise Refused(409, str(exc)) from exc
            await request.app.state.watcher.refresh()  # this replica routes by it before answering
        except Refused as exc:
            try:
                view = await _scope_view(request, scope, "all")
            except Refused:
                return page("error.html", exc.status, who=who, message=str(exc))
            return page("scope.html", exc.status, who=who, done="", error=str(exc), **view)
        return RedirectResponse(f"/dashboard/scopes/{scope}?done={action}", status_code=303)

    return router


async def _form(request: Request, who: Operator | None) -> dict[str, str]:
    """The POSTed form's fields (the last value of each), after the checks that a page elsewhere cannot pass:
    the browser's Origin, when it sends one, names this host, and a logged-in operator's form carries the
    session's form token."""
    origin = request.headers.get("origin")
    if origin is not None and origin != "null" and urlsplit(origin).netloc != request.headers.get("host"):
        raise Refused(403, "this form was sent from another site")
    try:
        parsed = parse_qs((await request.body()).decode(), keep_blank_values=True, max_num_fields=20,
                          strict_parsing=False)
    except (UnicodeDecodeError, ValueError) as exc:
        raise Refused(400, f"the form could not be read: {exc}") from exc
    fields = {name: values[-1] for name, values in parsed.items()}
    if who is not None and not hmac.compare_digest(fields.get("form_token", ""), who.form_token):
        raise Refused(403, "this form is out of date (or was not made by this page): open the page again")
    return fields


def _action(fields: dict[str, str]) -> tuple[str, str, int | None]:
    action, reason = fields.get("action", ""), fields.get("reason", "").strip()
    if action not in deployments.ACTIONS:
        raise Refused(400, f"unknown action {action!r}; one of {', '.join(deployments.ACTIONS)}")
    if not reason or len(reason) > MAX_REASON:
        raise Refused(400, f"say why, in 1 to {MAX_REASON} characters: the reason is recorded with the change")
    version_text = fields.get("version", "").strip()
    if version_text and not re.fullmatch(r"[0-9]{1,9}", version_text):
        raise Refused(400, f"a version is a number; {version_text[:20]!r} is not")
    return action, reason, int(version_text) if version_text else None


def _local(target: str) -> str:
    """Where a login may send the browser on: a page of the dashboard, never another site."""
    return target if re.fullmatch(r"/dashboard(/scopes/[a-z0-9._-]{1,64})?", target) else "/dashboard"


async def _scope_view(request: Request, scope: str, window: str) -> dict[str, Any]:
    if not scopes.valid(scope):
        raise Refused(404, f"there is no scope {scope[:80]!r}")
    window = window if window in WINDOWS else "all"
    store: Store = request.app.state.store
    try:
        view = await asyncio.to_thread(_scope_figures, store, scope, window, events.utc_now())
    except NextturnError as exc:
        raise Refused(503, f"the store cannot be read now: {exc}") from exc
    if view is None:
        raise Refused(404, f"there is no scope {scope!r}: it has no deployment, no version and no signal")
    return {**view, "window": window, "windows": list(WINDOWS)}


def _scope_figures(store: Store, scope: str, window: str, now: datetime) -> dict[str, Any] | None:
    """Everything the scope's page shows, read in one thread; None for a scope the store knows nothing of."""
    since = now - timedelta(hours=WINDOWS[window])
    if window == "all":  # from a little before the first signal, over two minutes at least
        first = progress.first_signal(store, scope)
        start = min(first - (now - first) / 50, now - timedelta(minutes=2)) if first else now - timedelta(hours=1)
        since = max(since, start)
    versions = progress.guards(store, scope)
    status = deployments.status(store, scope, history=20)
    signals = progress.signals(store, scope=scope, since=since)
    if store.get(tables.Deployment, scope) is None and not versions and not signals["resolved_turns"]:
        return None
    history = progress.reward_history(store, scope, since=since, buckets=BUCKETS, now=now)
    changes = store.deployment_changes(scope, 200)
    marks = [Mark(_aware(change.changed_at), "rollback" if change.action == "reject" else change.action,
                  f"{change.action} {change.subject_version or ''} by {change.actor}: {change.reason}")
             for change in changes]
    parents = [deployments.Deployment.read(store, parent) for parent in scopes.chain(scope)[1:]]
    fallback = next((parent.stable_name for parent in parents if parent.stable is not None), events.BASE_VERSION)
    return {"scope": scope, "status": status, "signals": signals, "versions": versions, "falls_back_to": fallback,
            "chart": reward_chart(history, marks, since, now), "lines": list(history),
            "trainer": progress.trainer_lag(store, scope, now=now), "guard_names": [g[0] for g in progress.GUARDS]}


def _aware(when: datetime) -> datetime:
    return when if when.tzinfo else when.replace(tzinfo=UTC)  # SQLite returns naive UTC
