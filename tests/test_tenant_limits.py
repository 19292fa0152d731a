"""Each tenant's share of a replica, decided without a server: an injected clock."""

from __future__ import annotations

import pytest

from gateway.errors import RateLimited
from gateway.limits import TenantLimits


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_requests_per_minute_refill_continuously_and_per_tenant() -> None:
    clock = Clock()
    limits = TenantLimits(requests_per_minute=2, clock=clock)
    limits.admit("acme")
    limits.admit("acme")
    with pytest.raises(RateLimited) as refused:
        limits.admit("acme")
    assert refused.value.retry_after_s == 30 and refused.value.status == 429
    limits.admit("globex")  # another tenant's bucket is full
    clock.now = 29.0
    with pytest.raises(RateLimited):
        limits.admit("acme")
    clock.now = 30.0
    limits.admit("acme")


def test_tokens_are_charged_when_a_turn_ends_and_a_debt_is_waited_out() -> None:
    clock = Clock()
    limits = TenantLimits(tokens_per_minute=100, clock=clock)
    limits.admit("acme")
    limits.done("acme", tokens=150)  # one large answer may overdraw: 50 in debt
    with pytest.raises(RateLimited) as refused:
        limits.admit("acme")
    assert refused.value.retry_after_s == 30  # 50 tokens at 100 a minute
    clock.now = 30.0
    limits.admit("acme")


def test_concurrent_requests_are_released_when_they_end() -> None:
    limits = TenantLimits(concurrent=1)
    limits.admit("acme")
    with pytest.raises(RateLimited):
        limits.admit("acme")
    limits.done("acme", tokens=0)
    limits.admit("acme")


def test_no_limit_admits_everything() -> None:
    limits = TenantLimits()
    for _ in range(10_000):
        limits.admit("acme")
