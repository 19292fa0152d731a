"""Waiting for what happens in the background, in one place instead of a deadline loop in every test."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def eventually(check: Callable[[], T], what: str, *, until: Callable[[T], object] = bool, timeout_s: float = 30.0,
               interval_s: float = 0.05, ignoring: tuple[type[Exception], ...] = ()) -> T:
    """Call ``check`` until ``until`` holds for what it returns (by default: until it is true) and return
    that; fail naming ``what`` (and the last value or ignored error) when ``timeout_s`` passes first. A
    generous timeout only costs time when the test fails: tests never assert on how long things took.

    >>> answers = iter([None, 0, "ready"])
    >>> eventually(lambda: next(answers), "an answer", interval_s=0)
    'ready'
    >>> counts = iter(range(10))
    >>> eventually(lambda: next(counts), "three", until=lambda n: n >= 3, interval_s=0)
    3
    >>> eventually(lambda: 1 // 0, "a quotient", timeout_s=0.01, ignoring=(ZeroDivisionError,))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    AssertionError: timed out after 0.01 s waiting for a quotient (last: ZeroDivisionError(...))
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            found = check()
            if until(found):
                return found
            last: object = found
        except ignoring as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what} (last: {last!r})")
        time.sleep(interval_s)
