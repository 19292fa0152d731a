"""The gateway's Prometheus metrics, served at ``GET /metrics``.

    nextturn_http_requests_total{route, method, status}   every request, by route template
    nextturn_turns_total{adapter, status}                  turns recorded (status ok | failed)
    nextturn_turn_seconds{adapter, stream}                 histogram: request received to turn recorded
    nextturn_tokens_total{adapter, kind}                   kind prompt | completion
    nextturn_turns_in_flight                               turns being generated now
    nextturn_turn_flaws_total{adapter, flaw}               turns with a visible flaw (nextturn.flaws)
    nextturn_version_weight{adapter, role}                 share of new sessions routed to a version
                                                           (role stable | canary | draining)
    nextturn_version_resolved_turns{adapter}               turns with a reward since the deployment changed
    nextturn_version_reward{adapter}                       their mean reward (read from the store)
    nextturn_adapter_load_failures_total{adapter}          deployed versions the engine could not load
    nextturn_publish_queue_depth, nextturn_spool_depth     events waiting for the event log
    nextturn_events_dropped                                events lost: log down, queue full, disk full
    nextturn_gateway_restarts_total{part}                  background parts restarted after they died
                                                           (part publisher | recorder: gateway.supervisor)

The loop's figures, read from the store every LOOP_EVERY_S by the deployment watcher (nextturn.progress; the
workers have no endpoint of their own, and every replica exports the same values: take max() across them):

    nextturn_loop_reward{adapter}                          mean reward of the deployed versions' turns resolved
                                                           in the last hour (stable and canary of every scope)
    nextturn_loop_resolved_turns{source}                   turns resolved in the last hour, by the source that
                                                           decided their reward (explicit, tool, judge,
                                                           judge-only, rules, abstained)
    nextturn_loop_judge_agreement                          the judge's agreement with ratings and tool outcomes
                                                           on the last hour's turns that have both
    nextturn_loop_signal_lag_seconds{quantile}             a turn's end to its first signal (0.5, 0.99), last hour
    nextturn_loop_open_cases                               turns the signals workers wait on
    nextturn_loop_unpublished_signals                      signals written but not yet on the event log
    nextturn_loop_dead_letters                             records no consumer could read
    nextturn_loop_trainer_waiting_signals                  trainable signals newer than their scope's newest version
    nextturn_loop_trainer_lag_seconds                      the age of the oldest of them

Each app has its own registry, so that two apps in one process (tests) do not share counters. The
request counter is a plain ASGI middleware: Starlette's BaseHTTPMiddleware costs a task per request.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Seconds: a turn is a whole generation, from milliseconds (an upstream cache hit) to minutes.
TURN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("nextturn_http_requests", "HTTP requests", ["route", "method", "status"],
                                registry=self.registry)
        self.turns = Counter("nextturn_turns", "Turns recorded", ["adapter", "status"], registry=self.registry)
        self.turn_seconds = Histogram("nextturn_turn_seconds", "Request received to turn recorded",
                                      ["adapter", "stream"], buckets=TURN_BUCKETS, registry=self.registry)
        self.tokens = Counter("nextturn_tokens", "Tokens", ["adapter", "kind"], registry=self.registry)
        self.in_flight = Gauge("nextturn_turns_in_flight", "Turns being generated", registry=self.registry)
        self.flaws = Counter("nextturn_turn_flaws", "Turns with a visible flaw", ["adapter", "flaw"],
                             registry=self.registry)
        self.weight = Gauge("nextturn_version_weight", "Share of new sessions routed to a version",
                            ["adapter", "role"], registry=self.registry)
        self.resolved = Gauge("nextturn_version_resolved_turns", "Turns with a reward since the deployment changed",
                              ["adapter"], registry=self.registry)
        self.reward = Gauge("nextturn_version_reward", "Mean reward of the resolved turns since the deployment "
                            "changed", ["adapter"], registry=self.registry)
        self.load_failures = Counter("nextturn_adapter_load_failures", "Deployed versions the engine could not load",
                                     ["adapter"], registry=self.registry)
        self.restarts = Counter("nextturn_gateway_restarts", "Background parts restarted after they died",
                                ["part"], registry=self.registry)
        self._queue = Gauge("nextturn_publish_queue_depth", "Events queued for the event log",
                            registry=self.registry)
        self._spool = Gauge("nextturn_spool_depth", "Events spooled to disk while the event log is unavailable",
                            registry=self.registry)
        self._dropped = Gauge("nextturn_events_dropped", "Events lost since the gateway started: the log down, "
                              "the queue full and the spool's disk full", registry=self.registry)

        self.loop_reward = Gauge("nextturn_loop_reward", "Mean reward of a deployed version's turns resolved in "
                                 "the last hour", ["adapter"], registry=self.registry)
        self.loop_resolved = Gauge("nextturn_loop_resolved_turns", "Turns resolved in the last hour, by the source "
                                   "that decided the reward", ["source"], registry=self.registry)
        self.loop_agreement = Gauge("nextturn_loop_judge_agreement", "The judge's agreement with ratings and tool "
                                    "outcomes, last hour", registry=self.registry)
        self.loop_lag = Gauge("nextturn_loop_signal_lag_seconds", "A turn's end to its first signal, last hour",
                              ["quantile"], registry=self.registry)
        self.loop_open = Gauge("nextturn_loop_open_cases", "Turns the signals workers wait on", registry=self.registry)
        self.loop_unpublished = Gauge("nextturn_loop_unpublished_signals", "Signals not yet on the event log",
                                      registry=self.registry)
        self.loop_dead = Gauge("nextturn_loop_dead_letters", "Records no consumer could read", registry=self.registry)
        self.trainer_waiting = Gauge("nextturn_loop_trainer_waiting_signals", "Trainable signals newer than their "
                                     "scope's newest version", registry=self.registry)
        self.trainer_lag = Gauge("nextturn_loop_trainer_lag_seconds", "Age of the oldest trainable signal newer "
                                 "than its scope's newest version", registry=self.registry)

    def loop(self, signals: dict[str, Any], backlog: dict[str, Any], deployed: set[str]) -> None:
        """Set the loop's figures from :func:`nextturn.progress.signals` and :func:`~nextturn.progress.trainer_backlog`;
        rewards only for the ``deployed`` versions (the series stay as many as the versions serving)."""
        self.loop_reward.clear()
        for version, figures in signals["per_adapter"].items():
            if version in deployed and figures["mean_reward"] is not None:
                self.loop_reward.labels(version).set(figures["mean_reward"])
        self.loop_resolved.clear()
        for source, count in signals["rewards_by_source"].items():
            self.loop_resolved.labels(source).set(count)
        self.loop_agreement.set(signals["judge_agreement"] if signals["judge_agreement"] is not None else float("nan"))
        for quantile, key in (("0.5", "median"), ("0.99", "p99")):
            found = signals["lag_s"][key]
            self.loop_lag.labels(quantile).set(found if found is not None else float("nan"))
        self.loop_open.set(signals["open_cases"])
        self.loop_unpublished.set(signals["unpublished"])
        self.loop_dead.set(signals["dead_letters"])
        self.trainer_waiting.set(backlog["waiting"])
        self.trainer_lag.set(backlog["lag_s"])

    def watch(self, queued: Callable[[], float], spooled: Callable[[], float],
              dropped: Callable[[], float] = lambda: 0.0) -> None:
        """Read the depths when scraped."""
        self._queue.set_function(queued)
        self._spool.set_function(spooled)
        self._dropped.set_function(dropped)

    def turn(self, adapter: str, ok: bool, stream: bool, seconds: float, prompt: int, completion: int) -> None:
        self.turns.labels(adapter, "ok" if ok else "failed").inc()
        self.turn_seconds.labels(adapter, "true" if stream else "false").observe(seconds)
        if prompt:
            self.tokens.labels(adapter, "prompt").inc(prompt)
        if completion:
            self.tokens.labels(adapter, "completion").inc(completion)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class CountRequests:
    """ASGI middleware: count each HTTP request by the route that handled it and the status sent."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self._app = app
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        status = 500

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._app(scope, receive, send_counted)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            self._metrics.requests.labels(path, scope["method"], str(status)).inc()
