"""The one clock: every timestamp in the ledger is float seconds since the epoch from here.

Tests pass a `FakeClock` wherever code takes a `clock` argument, so time can be moved
without sleeping or patching.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)


class FakeClock:
    """A clock that moves only when told to (or when code sleeps on it)."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.t = start
        self.slept: list[float] = []

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.t += max(0.0, seconds)

    def advance(self, seconds: float) -> None:
        self.t += seconds


SYSTEM_CLOCK: Clock = SystemClock()


def now() -> float:
    return SYSTEM_CLOCK.now()
