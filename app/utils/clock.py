"""The time source of the gateway, injectable so that tests move time instead of sleeping.

Two readings, because they answer different questions: `now()` is the wall clock (an aware
UTC datetime: key expiry, rotation grace periods, limiter windows that are calendar days and
months), `monotonic()` is elapsed time (circuit breaker cooldowns, cache lifetimes), which
never jumps when the system clock is set.
"""
from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, an aware UTC datetime."""

    def monotonic(self) -> float:
        """Seconds on a clock that only moves forward (for durations, not dates)."""


class SystemClock:
    """The real clocks."""

    def now(self) -> datetime:
        return datetime.now(timezone.utc)

    def monotonic(self) -> float:
        return time.monotonic()


def epoch_seconds(clock: Clock) -> float:
    """Wall-clock seconds since 1970 on `clock` (what the local limiter counts in)."""
    return clock.now().timestamp()


SYSTEM_CLOCK = SystemClock()
