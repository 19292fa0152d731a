"""What routing by scope costs per request as the number of scopes grows (gateway.routing.Router).

The router holds one lane per scope's deployment; a request's scope is derived from its tenant and user
(``scopes.scope_of``: a digest for a user) and walks its chain (its own, its tenant's, the shared one). This
times both, per new session: with ``NEXTTURN_SCOPE_BY=deployment`` and the one shared deployment (today's
behaviour: the baseline), and with ``user`` scopes and 100, 1,000 and 10,000 tenant and user scopes
deployed; it prints the median and p99 per request and the difference from the baseline.
Budget (issue: scoped adapters): at most 50 µs added at the median with 10,000 scopes.

Run: .venv/bin/python bench/routing.py [--calls 200000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gateway.routing import Router  # noqa: E402
from nextturn import events, scopes  # noqa: E402
from nextturn.deployments import Deployment  # noqa: E402


class Engine:
    """What the router asks of an engine: the served model's id."""

    def adapter_for(self, model: str) -> str | None:
        return events.BASE_VERSION if model == "served" else None

    def models(self) -> list[str]:
        return ["served"]


def router_with(count: int) -> tuple[Router, list[tuple[str, str]]]:
    """A router with ``count`` scopes deployed (half tenants with a stable version, half one user of each
    with a canary), and the (tenant, user) pairs to ask as: users with a version and users falling back."""
    router = Router(Engine())  # type: ignore[arg-type]
    router.apply(Deployment(events.DEFAULT_SCOPE, stable=1), lambda _: True, ())
    asking = []
    for n in range(max(1, (count - 1) // 2)):
        tenant = f"tenant{n}"
        if count > 1:
            router.apply(Deployment(scopes.tenant_scope(tenant), stable=2), lambda _: True, ())
            router.apply(Deployment(scopes.user_scope(tenant, "ana"), stable=1, canary=2, weight=0.5,
                                    schedule=(0.5,)), lambda _: True, ())
        asking += [(tenant, "ana"), (tenant, "ben")]
    return router, asking


def timed(router: Router, asking: list[tuple[str, str]], policy: scopes.ScopeBy, calls: int) -> list[float]:
    """Seconds per request (deriving its scope, then routing), measured in batches of 100 (a single one is
    below the clock's resolution)."""
    per_call = []
    for start in range(0, calls, 100):
        began = time.perf_counter()
        for k in range(start, start + 100):
            tenant, user = asking[k % len(asking)]
            router.route("served", tenant, f"s{k}", None, scopes.scope_of(policy, tenant, user))
        per_call.append((time.perf_counter() - began) / 100)
    return per_call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200_000)
    args = parser.parse_args()
    print(f"routing by scope: {args.calls:,} new sessions per row")
    print(f"{'scope by':>10}  {'scopes':>8}  {'p50 µs':>8}  {'p99 µs':>8}  {'added p50 µs':>13}")
    baseline = None
    for policy, count in (("deployment", 1), ("user", 100), ("user", 1_000), ("user", 10_000)):
        router, asking = router_with(count)
        samples = sorted(timed(router, asking, policy, args.calls))  # type: ignore[arg-type]
        p50, p99 = statistics.median(samples) * 1e6, samples[int(0.99 * (len(samples) - 1))] * 1e6
        baseline = p50 if baseline is None else baseline
        print(f"{policy:>10}  {count:>8,}  {p50:8.2f}  {p99:8.2f}  {p50 - baseline:13.2f}")


if __name__ == "__main__":
    main()
