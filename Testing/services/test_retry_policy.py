"""Backoff with full jitter, bounded by attempts and the total deadline, Retry-After as a floor."""
from __future__ import annotations

import random

import pytest

from app.providers.base import ProviderBadRequest, ProviderRateLimited, ProviderUnavailable
from app.services.retry_policy import RetryPolicy


def test_full_jitter_stays_within_the_exponential_ceiling():
    """The n-th retry waits uniformly in [0, min(cap, base * 2**(n-1))]; the draws cover the
    range (not a constant) and never exceed it."""
    policy = RetryPolicy(base_s=0.1, max_backoff_s=0.5)
    rng = random.Random(7)
    for n, ceiling in ((1, 0.1), (2, 0.2), (3, 0.4), (4, 0.5), (9, 0.5)):
        draws = [policy.backoff(n, rng) for _ in range(2000)]
        assert 0 <= min(draws) and max(draws) <= ceiling
        assert min(draws) < ceiling * 0.05 and max(draws) > ceiling * 0.95
        assert abs(sum(draws) / len(draws) - ceiling / 2) < ceiling * 0.05


def test_no_retry_when_not_retryable_or_out_of_attempts():
    """Bad requests are never retried; a deployment gets at most attempts_per_deployment calls."""
    policy = RetryPolicy(attempts_per_deployment=3, deadline_s=100)
    assert policy.delay_before_retry(ProviderBadRequest("bad"), 1, 0.0) is None
    err = ProviderUnavailable("down")
    assert policy.delay_before_retry(err, 1, 0.0) is not None
    assert policy.delay_before_retry(err, 2, 0.0) is not None
    assert policy.delay_before_retry(err, 3, 0.0) is None


def test_retry_after_is_a_floor_and_a_long_one_moves_on():
    """The wait is never shorter than the upstream's Retry-After; one longer than
    max_retry_after_s is not waited for (None: try the next deployment)."""
    policy = RetryPolicy(base_s=0.01, max_backoff_s=0.02, max_retry_after_s=2, deadline_s=100)
    for _ in range(50):
        assert policy.delay_before_retry(ProviderRateLimited("slow down", retry_after=1.5), 1, 0) >= 1.5
    assert policy.delay_before_retry(ProviderRateLimited("slow down", retry_after=2.5), 1, 0) is None


@pytest.mark.parametrize("elapsed,expected_none", [(0.0, False), (9.5, True), (10.0, True)])
def test_deadline_bounds_the_wait(elapsed, expected_none):
    """A wait that would end past the total deadline is not taken."""
    policy = RetryPolicy(base_s=1, max_backoff_s=1, deadline_s=10)
    exc = ProviderRateLimited("x", retry_after=0.6)
    assert (policy.delay_before_retry(exc, 1, elapsed) is None) is expected_none
