"""A circuit breaker per deployment (provider + upstream model): closed -> open -> half-open.

* **closed**: requests pass. It opens after `failure_threshold` consecutive failures, or when
  the failure ratio of the last `window` outcomes reaches `failure_ratio` (judged only once at
  least `min_requests` outcomes are in the window).
* **open**: the deployment is skipped for `cooldown_s` (or longer when the upstream's
  Retry-After asked for more).
* **half-open**: after the cooldown exactly one request (the probe) is let through; its
  success closes the circuit, its failure opens it for another cooldown. A probe that never
  reports back (a bug, a killed greenlet) is replaced by a new one after another cooldown.

Why the state is **per worker, in memory** and not shared through Redis: the breaker is
consulted on every request, and the team's budget is < 1 ms of gateway CPU per request with
no Redis round trip on the happy path. In memory, `allow()` is an attribute read. What per
worker costs: each worker (of each replica) has to see the failures itself before its
circuit opens, so a dead upstream receives at most `failure_threshold` failing attempts per
worker per cooldown instead of per fleet — a few cheap, fast failures (a refused connection,
a 5xx) that retries and fallback absorb anyway. A shared circuit would either add a round
trip per request or be just as stale as a local one (a cache of it), and a Redis outage would
turn into a routing outage. The workers' *observations* (state, success ratio, latency, last
error) are nevertheless shared for reporting: `provider_health.HealthBoard` publishes them to
Redis off the request path, for `GET /v1/providers/status`.

Not thread-safe by design: gevent greenlets of one worker never preempt inside these methods.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


@dataclass(frozen=True)
class BreakerConfig:
    failure_threshold: int = 5      # consecutive failures that open the circuit
    failure_ratio: float = 0.5      # ... or this share of failures among the last `window`
    window: int = 20
    min_requests: int = 10          # the ratio is judged only with this many outcomes
    cooldown_s: float = 30.0
    max_cooldown_s: float = 300.0   # cap of a Retry-After-driven cooldown


class CircuitBreaker:
    __slots__ = ("config", "clock", "state", "consecutive", "outcomes", "failures_in_window",
                 "opened_at", "open_for", "probe_started", "opened_count")

    def __init__(self, config: BreakerConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.state = CLOSED
        self.consecutive = 0
        self.outcomes: deque[bool] = deque(maxlen=config.window)  # True = failure
        self.failures_in_window = 0
        self.opened_at = 0.0
        self.open_for = 0.0
        self.probe_started: float | None = None
        self.opened_count = 0

    def allow(self) -> bool:
        """May a request go to this deployment now? In half-open, True for the probe only."""
        if self.state == CLOSED:
            return True
        now = self.clock()
        if self.state == OPEN:
            if now - self.opened_at < self.open_for:
                return False
            self.state = HALF_OPEN
            self.probe_started = now
            return True
        # half-open: one probe at a time; a probe lost for a whole cooldown is replaced
        if self.probe_started is not None and now - self.probe_started < self.config.cooldown_s:
            return False
        self.probe_started = now
        return True

    def available(self) -> bool:
        """Like `allow()` but without claiming the probe (for ranking candidates)."""
        if self.state == CLOSED:
            return True
        now = self.clock()
        if self.state == OPEN:
            return now - self.opened_at >= self.open_for
        return self.probe_started is None or now - self.probe_started >= self.config.cooldown_s

    def retry_in(self) -> float:
        """Seconds until an open circuit lets a probe through (0 when it would now)."""
        if self.state != OPEN:
            return 0.0
        return max(0.0, self.open_for - (self.clock() - self.opened_at))

    def record_success(self) -> None:
        self.consecutive = 0
        self._push(False)
        if self.state != CLOSED:
            self.state = CLOSED
            self.probe_started = None
            self.outcomes.clear()
            self.failures_in_window = 0

    def record_failure(self, retry_after: float | None = None) -> None:
        self.consecutive += 1
        self._push(True)
        cfg = self.config
        if self.state == HALF_OPEN:
            self._open(retry_after)
        elif self.state == CLOSED and (
                self.consecutive >= cfg.failure_threshold
                or (len(self.outcomes) >= cfg.min_requests
                    and self.failures_in_window >= cfg.failure_ratio * len(self.outcomes))):
            self._open(retry_after)

    def _push(self, failed: bool) -> None:
        outcomes = self.outcomes
        if len(outcomes) == outcomes.maxlen and outcomes[0]:
            self.failures_in_window -= 1
        outcomes.append(failed)
        if failed:
            self.failures_in_window += 1

    def _open(self, retry_after: float | None) -> None:
        self.state = OPEN
        self.opened_at = self.clock()
        self.open_for = min(max(self.config.cooldown_s, retry_after or 0.0), self.config.max_cooldown_s)
        self.probe_started = None
        self.opened_count += 1
