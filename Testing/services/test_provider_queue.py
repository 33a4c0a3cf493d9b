"""Provider throttling in the limiter: a deployment's quota is a sliding window of requests,
and requests refused at it wait in a fair queue (arrival order). Run on both backends: the Lua
script against the real Redis (its own TIME: `pass_time` really waits, a lower bound only) and
the in-process mirror on a FakeClock."""
from __future__ import annotations

import itertools
import time

import pytest
import redis

from app.services.rate_limit_service import DeploymentQuota, LocalLimiter, RateLimitService, RedisLimiter
from app.extensions import make_redis
from app.utils.clock import epoch_seconds
from Testing.support import REDIS_URL, FakeClock

WINDOW_S = 0.5
_ids = itertools.count(int(time.time() * 1000) % 10_000_000)


@pytest.fixture(params=["redis", "cluster", "local"])
def backend(request):
    """The Lua script on one Redis and on a real 3-master Redis Cluster (every key of a
    deployment's quota and queue shares its hash tag), and the in-process mirror."""
    if request.param == "cluster":
        client = make_redis(request.getfixturevalue("redis_cluster").url, 8)
        limiter = RedisLimiter(client, lease_ms=1000, quota_window_s=WINDOW_S)
        limiter.pass_time = time.sleep
        yield limiter
        client.close()
    elif request.param == "redis":
        client = redis.Redis.from_url(REDIS_URL)
        limiter = RedisLimiter(client, lease_ms=1000, quota_window_s=WINDOW_S)
        limiter.pass_time = time.sleep
        yield limiter
        client.close()
    else:
        clock = FakeClock()
        limiter = LocalLimiter(lease_ms=1000, clock=lambda: epoch_seconds(clock), quota_window_s=WINDOW_S)
        limiter.pass_time = clock.advance
        yield limiter


def quota(**kw) -> DeploymentQuota:
    return DeploymentQuota(name=f"p/q{next(_ids)}", **kw)


def test_rpm_is_a_sliding_window_never_exceeded(backend):
    """No window holds more than rpm admissions; capacity returns as old ones leave the window."""
    q = quota(rpm=3)
    assert [backend.deployment_admit(q, 0) for _ in range(4)] == [True, True, True, False]
    backend.pass_time(WINDOW_S + 0.1)
    assert [backend.deployment_admit(q, 0) for _ in range(4)] == [True, True, True, False]


def test_waiters_are_served_in_arrival_order(backend):
    """Refused with a ticket, a request joins the queue; a later one (queued or new) cannot
    take a slot before it, whoever asks first once capacity returns."""
    q = quota(rpm=1)
    assert backend.deployment_try(q, 0, "").admitted
    b = backend.deployment_try(q, 0, "b")
    c = backend.deployment_try(q, 0, "c")
    assert (b.admitted, b.reason, b.position, b.queue_length) == (False, "rpm", 0, 1)
    assert (c.admitted, c.position, c.queue_length) == (False, 1, 2)
    assert 0 < b.wait_s <= WINDOW_S
    backend.pass_time(WINDOW_S + 0.1)
    assert not backend.deployment_try(q, 0, "c").admitted     # one slot free, b is ahead
    assert not backend.deployment_try(q, 0, "").admitted      # a newcomer ranks behind both
    assert backend.deployment_try(q, 0, "b").admitted
    assert backend.deployment_queue(q).length == 1
    backend.pass_time(WINDOW_S + 0.1)
    assert not backend.deployment_try(q, 0, "").admitted
    assert backend.deployment_try(q, 0, "c").admitted
    assert backend.deployment_queue(q).length == 0


def test_several_free_slots_go_to_the_first_waiters(backend):
    """With k slots free, the first k waiters may take them, in any order among themselves."""
    q = quota(rpm=2)
    assert backend.deployment_admit(q, 0) and backend.deployment_admit(q, 0)
    for ticket in ("a", "b", "c"):
        assert not backend.deployment_try(q, 0, ticket).admitted
    backend.pass_time(WINDOW_S + 0.1)
    assert not backend.deployment_try(q, 0, "c").admitted
    assert backend.deployment_try(q, 0, "b").admitted
    assert backend.deployment_try(q, 0, "a").admitted


def test_leaving_frees_the_place_and_stats_show_the_queue(backend):
    """A waiter that leaves (timeout, client gone) is out at once; the queue's length and its
    oldest waiter's wait are readable."""
    q = quota(rpd=1)
    assert backend.deployment_admit(q, 0)
    assert not backend.deployment_try(q, 0, "x").admitted
    assert not backend.deployment_try(q, 0, "y").admitted
    backend.pass_time(0.2)
    stats = backend.deployment_queue(q)
    assert stats.length == 2 and stats.oldest_wait_s >= 0.2
    backend.deployment_leave(q, "x")
    assert backend.deployment_queue(q).length == 1
    assert backend.deployment_try(q, 0, "y").position == 0


def test_a_waiter_that_stops_polling_leaves_the_queue(backend):
    """A waiter whose worker died (no poll within the liveness of 5 s) is dropped, so it
    cannot block the queue."""
    q = quota(rpd=1)
    assert backend.deployment_admit(q, 0)
    assert not backend.deployment_try(q, 0, "dead").admitted
    backend.pass_time(5.2)
    assert backend.deployment_queue(q).length == 0


def full_deployment(window_s: float) -> tuple[FakeClock, LocalLimiter, RateLimitService, DeploymentQuota]:
    """A deployment with rpm 1 whose one slot was just taken, on an in-process limiter."""
    clock = FakeClock()
    limiter = LocalLimiter(1000, clock=lambda: epoch_seconds(clock), quota_window_s=window_s)
    q = quota(rpm=1)
    assert limiter.deployment_admit(q, 0)
    return clock, limiter, RateLimitService(limiter, seed=lambda *a: {}), q


def test_wait_is_admitted_when_its_slot_comes():
    """RateLimitService.deployment_wait polls until the slot frees, sleeping (never spinning)."""
    clock, limiter, service, q = full_deployment(2)
    sleeps: list[float] = []

    def sleep(s: float) -> None:
        sleeps.append(s)
        clock.advance(s)
    outcome = service.deployment_wait(q, 0, "w", 5, lambda: False, clock=clock.monotonic, sleep=sleep)
    assert outcome.admitted
    assert 8 <= len(sleeps) <= 9 and max(sleeps) == 0.25  # 2 s in polls of at most 0.25 s
    assert limiter.deployment_queue(q).length == 0


def test_wait_times_out_with_a_retry_time_and_leaves():
    """No slot within the timeout: not admitted, the time until its slot, out of the queue."""
    clock, limiter, service, q = full_deployment(60)
    outcome = service.deployment_wait(q, 0, "w", 5, lambda: False, clock=clock.monotonic, sleep=clock.advance)
    assert not outcome.admitted and not outcome.client_gone
    assert 54 <= outcome.retry_after_s <= 55.01
    assert limiter.deployment_queue(q).length == 0


def test_wait_ends_when_the_client_hangs_up():
    """A client gone while waiting: the wait ends at the next poll and the place is freed."""
    clock, limiter, service, q = full_deployment(60)
    polls = iter([False, False, True])
    outcome = service.deployment_wait(q, 0, "w", 30, lambda: next(polls), clock=clock.monotonic,
                                      sleep=clock.advance)
    assert outcome.client_gone and not outcome.admitted
    assert limiter.deployment_queue(q).length == 0


def test_a_tpm_only_quota_serves_its_head_first_and_waiters_back_off():
    """A tpm-only quota has no slot count: only the head of the queue may take tokens; one
    behind it, with tokens free but no slot estimate, polls with a growing pause (never a
    tight loop)."""
    clock = FakeClock()
    limiter = LocalLimiter(1000, clock=lambda: epoch_seconds(clock), quota_window_s=60)
    q = quota(tpm=100)
    assert limiter.deployment_admit(q, 100)
    assert limiter.deployment_try(q, 100, "head").reason == "tpm"   # needs the whole minute back
    assert limiter.deployment_try(q, 10, "behind").reason == "tpm"  # needs 6 s back
    clock.advance(4)
    assert limiter.deployment_try(q, 100, "head").reason == "tpm"   # polls: keeps its place
    clock.advance(2)
    behind = limiter.deployment_try(q, 10, "behind")
    assert (behind.admitted, behind.reason, behind.wait_s, behind.position) == (False, "queued", 0, 1)
    sleeps: list[float] = []

    def sleep(s: float) -> None:
        sleeps.append(s)
        clock.advance(s)
    service = RateLimitService(limiter, seed=lambda *a: {})
    outcome = service.deployment_wait(q, 10, "behind", 1.0, lambda: False, clock=clock.monotonic, sleep=sleep)
    assert not outcome.admitted
    assert sleeps[:5] == [0.02, 0.04, 0.08, 0.16, 0.25]
