"""The per-deployment circuit breaker: opens, skips, half-opens after the cooldown with one
probe, closes on success (a fake clock: no sleeping)."""
from __future__ import annotations

from app.services.circuit_breaker import CLOSED, HALF_OPEN, OPEN, BreakerConfig, CircuitBreaker
from Testing.support import FakeClock


def breaker(**cfg) -> tuple[CircuitBreaker, FakeClock]:
    clock = FakeClock()
    config = BreakerConfig(**{"failure_threshold": 3, "cooldown_s": 10, **cfg})
    return CircuitBreaker(config, clock.monotonic), clock


def test_opens_after_consecutive_failures_and_skips():
    """N consecutive failures open the circuit; an open circuit refuses requests."""
    b, _ = breaker()
    for _ in range(2):
        b.record_failure()
        assert b.state == CLOSED and b.allow()
    b.record_failure()
    assert b.state == OPEN
    assert not b.allow() and not b.available()
    assert 9.9 < b.retry_in() <= 10


def test_success_resets_the_consecutive_count():
    """Failures separated by a success do not open the circuit by the consecutive rule."""
    b, _ = breaker(min_requests=1000)
    for _ in range(5):
        b.record_failure()
        b.record_failure()
        b.record_success()
    assert b.state == CLOSED


def test_opens_on_failure_ratio_over_the_window():
    """A failure ratio at or over the threshold in the window opens the circuit even without
    consecutive failures, once the window holds enough outcomes."""
    b, _ = breaker(failure_threshold=100, failure_ratio=0.5, window=10, min_requests=10)
    for _ in range(4):
        b.record_failure()
        b.record_success()
    assert b.state == CLOSED  # 8 outcomes: too few to judge
    b.record_failure()
    assert b.state == CLOSED  # 9 outcomes
    b.record_failure()
    assert b.state == OPEN    # 10 outcomes, 6 failures


def test_half_open_lets_exactly_one_probe_through_then_closes_on_success():
    """After the cooldown one probe passes (others are still refused); its success closes."""
    b, clock = breaker()
    for _ in range(3):
        b.record_failure()
    clock.advance(10.01)
    assert b.available()
    assert b.allow()            # the probe
    assert b.state == HALF_OPEN
    assert not b.allow()        # a second request while the probe runs
    b.record_success()
    assert b.state == CLOSED and b.allow() and b.allow()


def test_failed_probe_reopens_for_another_cooldown():
    """A failing probe opens the circuit again for a full cooldown."""
    b, clock = breaker()
    for _ in range(3):
        b.record_failure()
    clock.advance(11)
    assert b.allow()
    b.record_failure()
    assert b.state == OPEN and not b.allow()
    clock.advance(9)
    assert not b.allow()
    clock.advance(1.5)
    assert b.allow() and b.state == HALF_OPEN


def test_lost_probe_is_replaced_after_a_cooldown():
    """A probe that never reports back does not keep the circuit half-open forever."""
    b, clock = breaker()
    for _ in range(3):
        b.record_failure()
    clock.advance(11)
    assert b.allow()
    clock.advance(5)
    assert not b.allow()
    clock.advance(6)
    assert b.allow()


def test_retry_after_lengthens_the_cooldown_within_the_cap():
    """An upstream Retry-After longer than the cooldown keeps the circuit open that long
    (capped by max_cooldown_s)."""
    b, clock = breaker(max_cooldown_s=60)
    for _ in range(3):
        b.record_failure(retry_after=45)
    clock.advance(30)
    assert not b.allow()
    clock.advance(16)
    assert b.allow()
    b2, clock2 = breaker(max_cooldown_s=60)
    for _ in range(3):
        b2.record_failure(retry_after=3600)
    clock2.advance(61)
    assert b2.allow()
