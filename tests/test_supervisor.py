"""The gateway's supervisor: what died is restarted after a back-off that grows while it keeps dying."""

from __future__ import annotations

from gateway.metrics import Metrics
from gateway.supervisor import Supervisor


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Flaky:
    """A part that dies whenever told to; ``restart`` brings it back."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.failure: BaseException | None = None
        self.started = 1

    def restart(self) -> None:
        self.failure = None
        self.started += 1


class Mortal:
    """A part that cannot be restarted (like the engine)."""

    name = "engine"
    failure: BaseException | None = RuntimeError("gone")


def test_a_part_that_keeps_dying_waits_longer_each_time_and_is_counted() -> None:
    clock, metrics, part = Clock(), Metrics(), Flaky("publisher")
    supervisor = Supervisor([part, Mortal()], metrics, backoff_s=(1.0, 4.0), clock=clock)
    waits = []
    for _ in range(5):
        part.failure = RuntimeError("died")
        died_at = clock.now
        while part.failure is not None:
            supervisor.check()
            assert set(supervisor.dead()) == ({"publisher", "engine"} if part.failure else {"engine"})
            clock.now += 0.25
        waits.append(clock.now - 0.25 - died_at)
    assert waits == [1.0, 2.0, 4.0, 4.0, 4.0]  # doubling, up to the maximum
    assert supervisor.restarts == {"publisher": 5} and part.started == 6
    assert b'nextturn_gateway_restarts_total{part="publisher"} 5.0' in metrics.render()
    clock.now += 61  # a minute without dying: the next death waits the first back-off again
    part.failure = RuntimeError("died")
    supervisor.check()
    clock.now += 1.0
    supervisor.check()
    assert part.failure is None and supervisor.restarts["publisher"] == 6
