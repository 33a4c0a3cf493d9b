"""AuthThrottle on its own: fixed windows of the given clock, and Redis unreachable (a closed
port, not a mock) falling back to counting in process instead of failing or letting all in."""
from __future__ import annotations

import redis

from app.services.auth_throttle import AuthThrottle


def test_windows_follow_the_clock_and_retry_after_counts_to_the_window_end():
    """Limit 2 per 60 s window: blocked after two failures, Retry-After = seconds left in the window."""
    now = [6000.0 + 15]  # 15 s into window 100
    throttle = AuthThrottle(2, 60, lambda: now[0])
    throttle.failed("a")
    assert throttle.retry_after("a") == 0
    throttle.failed("a")
    assert throttle.retry_after("a") == 45
    assert throttle.retry_after("b") == 0
    now[0] = 6060.0  # the next window
    assert throttle.retry_after("a") == 0


def test_redis_unreachable_counts_in_process():
    """Failures still block the address while Redis does not answer."""
    unreachable = redis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    throttle = AuthThrottle(2, 60, lambda: 6000.0, unreachable)
    throttle.failed("a")
    throttle.failed("a")
    assert throttle.retry_after("a") == 60
    assert throttle.retry_after("b") == 0


def test_a_zero_limit_never_blocks():
    """AUTH_FAILURE_LIMIT=0 switches the limit off."""
    throttle = AuthThrottle(0, 60, lambda: 6000.0)
    for _ in range(100):
        throttle.failed("a")
    assert throttle.retry_after("a") == 0
