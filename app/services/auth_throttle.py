"""Failed authentication attempts per client address: guessing keys or the system secret.

An address that failed `limit` times (an unknown key, a wrong `X-System-Secret`) within one
window of `window_s` seconds is refused (429 with Retry-After until the window ends) before
any further lookup; other addresses are unaffected. Fixed windows numbered from the gateway's
clock: at most 2 x limit attempts across a window boundary.

Counters live in Redis when it is configured (shared by every worker and replica: key
`gw:authfail:<address>:<window>`, expiring with its window) and in this process otherwise, or
while Redis does not answer (a Redis outage must not lock every client out, nor in).
"""
from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any, Callable

log = logging.getLogger("gateway.auth")


class AuthThrottle:
    def __init__(self, limit: int, window_s: float, clock: Callable[[], float],
                 redis_client: Any = None) -> None:
        self.limit = limit
        self.window_s = window_s
        self.clock = clock            # seconds since the epoch (the app's clock)
        self.redis = redis_client
        self._local: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()
        self._last_warning = float("-inf")

    @property
    def enabled(self) -> bool:
        return self.limit > 0 and self.window_s > 0

    def retry_after(self, address: str) -> int:
        """0 when `address` may try; else the seconds until its window ends (at least 1)."""
        if not self.enabled:
            return 0
        now = self.clock()
        window = int(now // self.window_s)
        if self._count(address, window) < self.limit:
            return 0
        return max(1, math.ceil((window + 1) * self.window_s - now))

    def failed(self, address: str) -> None:
        """Count one failed attempt of `address`."""
        if not self.enabled:
            return
        window = int(self.clock() // self.window_s)
        if self.redis is not None:
            try:
                pipe = self.redis.pipeline(transaction=False)
                name = self._name(address, window)
                pipe.incr(name)
                pipe.expire(name, math.ceil(self.window_s) + 1)
                pipe.execute()
                return
            except Exception as exc:  # Redis unreachable: count here (this worker only)
                self._warn(f"failed-attempt counter kept in process: Redis unavailable ({type(exc).__name__})")
        with self._lock:
            if len(self._local) > 100_000:
                self._local = {k: v for k, v in self._local.items() if k[1] >= window}
            self._local[(address, window)] = self._local.get((address, window), 0) + 1

    def _count(self, address: str, window: int) -> int:
        local = self._local.get((address, window), 0)
        if self.redis is None:
            return local
        try:
            return int(self.redis.get(self._name(address, window)) or 0) + local
        except Exception as exc:
            self._warn(f"failed-attempt counter read in process only: Redis unavailable ({type(exc).__name__})")
            return local

    def _warn(self, message: str) -> None:
        """At most one warning every 10 s (an outage must not flood the log)."""
        now = time.monotonic()
        if now - self._last_warning >= 10:
            self._last_warning = now
            log.warning(message)

    @staticmethod
    def _name(address: str, window: int) -> str:
        return f"gw:authfail:{address}:{window}"
