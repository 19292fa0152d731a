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

Each app has its own registry, so that two apps in one process (tests) do not share counters. The
request counter is a plain ASGI middleware: Starlette's BaseHTTPMiddleware costs a task per request.
"""

from __future__ import annotations

from collections.abc import Callable

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
