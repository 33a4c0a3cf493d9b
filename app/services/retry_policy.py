"""When to retry an upstream call on the same deployment, and how long to wait first.

Exponential backoff with **full jitter** (AWS architecture blog, "Exponential Backoff And
Jitter"): the n-th retry waits a uniform random time in [0, min(max_backoff, base * 2**(n-1))],
which spreads the retries of many clients instead of synchronising them. An upstream's
`Retry-After` is a floor: the wait is never shorter than what the upstream asked for. A
Retry-After longer than `max_retry_after_s`, or a wait that would cross the request's total
deadline, is not waited for on this deployment: the request moves on to the next one.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from app.providers.base import ProviderError


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 6              # upstream calls per request, all deployments together
    attempts_per_deployment: int = 2   # calls to one deployment (1 = no retry on the same one)
    base_s: float = 0.25
    max_backoff_s: float = 4.0
    deadline_s: float = 30.0           # no attempt starts, and no wait ends, later than this
    max_retry_after_s: float = 10.0    # a longer Retry-After: go elsewhere instead of waiting

    def backoff(self, retry_number: int, rng: random.Random | None = None) -> float:
        """Full jitter for the `retry_number`-th retry (1 for the first)."""
        ceiling = min(self.max_backoff_s, self.base_s * (2 ** max(0, retry_number - 1)))
        return (rng or random).uniform(0.0, ceiling)

    def delay_before_retry(self, exc: ProviderError, retry_number: int, elapsed_s: float,
                           rng: random.Random | None = None) -> float | None:
        """Seconds to wait before calling the same deployment again, or None: do not retry it
        (not retryable, out of attempts, Retry-After too long, or past the deadline)."""
        if not exc.retryable or retry_number >= self.attempts_per_deployment:
            return None
        retry_after = exc.retry_after
        if retry_after is not None and retry_after > self.max_retry_after_s:
            return None
        delay = self.backoff(retry_number, rng)
        if retry_after is not None:
            delay = max(delay, retry_after)
        if elapsed_s + delay >= self.deadline_s:
            return None
        return delay
