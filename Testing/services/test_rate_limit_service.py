"""The limiter's rules, run on every backend: the Lua script against the real Redis and against
a real 3-master Redis Cluster, and the in-process mirror of the embedded mode. Same tests, same
expectations."""
from __future__ import annotations

import itertools
import time
from decimal import Decimal

import pytest
import redis

from app.services.rate_limit_service import (DeploymentQuota, KeyLimits, LimiterUnavailable,
                                             LocalLimiter, RateLimitService, RedisLimiter, SeedNeeded,
                                             format_reset, to_nano)
from app.extensions import make_redis
from app.utils.clock import epoch_seconds
from Testing.support import REDIS_URL, FakeClock

_ids = itertools.count(int(time.time()) % 100000 * 1000)


# The in-process limiter runs on a FakeClock the tests move; the Lua script reads Redis's own
# TIME, which no test can move: there, `pass_time` really waits (at least as long as asked).
_CLOCKS: dict[int, FakeClock] = {}


@pytest.fixture(params=["redis", "redis-pipeline", "cluster", "local"])
def backend(request):
    """"redis": the limiter's own connection free list (the pool-bypass override, on by
    default); "redis-pipeline": redis-py's pipeline and pool (that override switched off);
    "cluster": a real 3-master Redis Cluster (commands routed by slot)."""
    if request.param == "cluster":
        client = make_redis(request.getfixturevalue("redis_cluster").url, 8)
        yield RedisLimiter(client, lease_ms=1000)
        client.close()
    elif request.param.startswith("redis"):
        client = redis.Redis.from_url(REDIS_URL)
        yield RedisLimiter(client, lease_ms=1000, pool_bypass=request.param == "redis")
        client.close()
    else:
        clock = FakeClock()
        local = LocalLimiter(lease_ms=1000, clock=lambda: epoch_seconds(clock))
        _CLOCKS[id(local)] = clock
        yield local
        del _CLOCKS[id(local)]


def pass_time(backend, seconds: float) -> None:
    """Let `seconds` pass for the limiter: move its clock, or wait for Redis's."""
    clock = _CLOCKS.get(id(backend))
    if clock is not None:
        clock.advance(seconds)
    else:
        time.sleep(seconds)  # Redis TIME: only a real wait moves it (a lower bound, never an upper one)


def limits(**kw) -> KeyLimits:
    n = next(_ids)
    return KeyLimits(key_id=n, tenant_id=n, **kw)


def admit(backend, lim: KeyLimits, tokens: int = 0, cost: int = 0, rid: str | None = None, seeds=None):
    seeds = seeds if seeds is not None else {"day": 0, "key_spend": 0, "tenant_spend": 0}
    return backend.admit(lim, rid or f"r{next(_ids)}", tokens, cost, seeds)


def test_rpm_burst_up_to_the_limit_then_refuses(backend):
    """Requests/min: a burst of exactly `rpm` is admitted, the next is refused with a retry time."""
    lim = limits(rpm=50)
    results = [admit(backend, lim) for _ in range(60)]
    assert sum(a.admitted for a in results) == 50
    refused = results[50]
    assert refused.reason == "rpm" and 0 < refused.retry_after_ms <= 1200
    assert results[0].headers["x-ratelimit-limit-requests"] == "50"
    assert results[0].headers["x-ratelimit-remaining-requests"] == "49"


def test_tpm_refills_smoothly(backend):
    """Tokens/min refill continuously: after 0.5 s at 6000 TPM at least 50 tokens are back, not
    the whole minute's."""
    lim = limits(tpm=6000)
    assert admit(backend, lim, tokens=6000).admitted
    refused = admit(backend, lim, tokens=1)
    assert not refused.admitted and refused.reason == "tpm" and 0 < refused.retry_after_ms <= 20
    pass_time(backend, 0.5)
    assert admit(backend, lim, tokens=50).admitted
    assert admit(backend, lim, tokens=3000).reason == "tpm"


def test_tpm_refill_is_exact_on_a_moved_clock():
    """In-process limiter: 0.5 s at 6000 TPM gives back exactly 50 tokens (the clock is moved)."""
    clock = FakeClock()
    local = LocalLimiter(lease_ms=1000, clock=lambda: epoch_seconds(clock))
    lim = limits(tpm=6000)
    assert admit(local, lim, tokens=6000).admitted
    clock.advance(0.5)
    assert admit(local, lim, tokens=51).reason == "tpm"
    assert admit(local, lim, tokens=50).admitted
    assert admit(local, lim, tokens=1).reason == "tpm"


def test_request_larger_than_tpm_is_refused_outright(backend):
    """A request that can never fit the TPM says so instead of waiting."""
    assert admit(backend, limits(tpm=100), tokens=101).reason == "tpm_too_large"
    assert admit(backend, limits(daily_tokens=100), tokens=101).reason == "daily_too_large"


def test_all_or_nothing(backend):
    """A refusal by one limit consumes nothing of the others."""
    lim = limits(rpm=2, tpm=1000, key_budget_nano=100)
    assert not admit(backend, lim, tokens=10, cost=500).admitted  # budget says no
    assert not admit(backend, lim, tokens=10, cost=500).admitted
    # rpm and tpm were untouched by the two refusals: both requests of the minute are still there
    assert admit(backend, lim, tokens=10, cost=50).admitted
    second = admit(backend, lim, tokens=10, cost=50)
    assert second.admitted
    assert admit(backend, lim, tokens=10, cost=0).reason == "rpm"


def test_settlement_refunds_unused_tokens(backend):
    """Settling with fewer tokens than reserved gives the difference back at once."""
    lim = limits(tpm=1000, daily_tokens=1500)
    first = admit(backend, lim, tokens=900)
    assert first.admitted and not admit(backend, lim, tokens=500).admitted
    backend.settle(first, actual_tokens=100, actual_cost_nano=0)
    assert admit(backend, lim, tokens=500).admitted


def test_daily_tokens(backend):
    """Tokens per UTC day: the reservation counts, settlement corrects it to the actual."""
    lim = limits(daily_tokens=100)
    first = admit(backend, lim, tokens=60)
    refused = admit(backend, lim, tokens=50)
    assert refused.reason == "daily" and refused.retry_after_ms > 0
    backend.settle(first, actual_tokens=10, actual_cost_nano=0)
    assert admit(backend, lim, tokens=50).admitted


def test_concurrency_leases_release_and_expire(backend):
    """Concurrent requests are leases: released by settlement, and expiring by themselves."""
    lim = limits(max_concurrent=2)
    a, b = admit(backend, lim), admit(backend, lim)
    assert a.admitted and b.admitted
    assert admit(backend, lim).reason == "concurrency"
    backend.settle(a, 0, 0)
    c = admit(backend, lim)
    assert c.admitted
    assert not admit(backend, lim).admitted
    pass_time(backend, 1.05)  # lease_ms=1000: b and c were never settled (a crashed worker)
    assert admit(backend, lim).admitted and admit(backend, lim).admitted


def test_money_budget_of_key_and_tenant(backend):
    """The key's and the tenant's monthly budgets hold; settlement charges the actual cost."""
    lim = limits(key_budget_nano=1000, tenant_budget_nano=1500)
    first = admit(backend, lim, cost=600)
    assert first.admitted
    assert admit(backend, lim, cost=600).reason == "key_budget"
    backend.settle(first, actual_tokens=0, actual_cost_nano=100)
    assert admit(backend, lim, cost=600).admitted  # 100 + 600 <= 1000
    other_key = KeyLimits(key_id=lim.key_id + 10**9, tenant_id=lim.tenant_id, tenant_budget_nano=1500)
    assert admit(backend, other_key, cost=900).reason == "tenant_budget"  # 700 + 900 > 1500
    assert admit(backend, other_key, cost=800).admitted


def test_missing_counters_ask_for_seeds(backend):
    """Without a day/month counter the limiter asks to be seeded instead of assuming zero."""
    lim = limits(key_budget_nano=1000, daily_tokens=50)
    with pytest.raises(SeedNeeded) as need:
        backend.admit(lim, "r", 10, 10, None)
    assert set(need.value.what) == {"day", "key_spend"}
    assert len(need.value.month) == 6
    # seeded with what the usage rows say was already spent this month
    assert admit(backend, lim, tokens=10, cost=10, seeds={"day": 0, "key_spend": 995}).reason == "key_budget"


def test_service_seeds_from_callback(backend):
    """The service rebuilds missing counters from its seed function (the usage rows)."""
    calls = []

    def seed(lim, day, month):
        calls.append((day, month))
        return {"day": 0, "key_spend": 900, "tenant_spend": 0}

    service = RateLimitService(backend, seed)
    lim = limits(key_budget_nano=1000)
    assert service.admit(lim, "a", 0, 50).admitted
    assert service.admit(lim, "b", 0, 60).reason == "key_budget"
    assert len(calls) == 1


def test_deployment_quota(backend):
    """A deployment's provider quota (rpm, rpd) is counted globally and refuses when full."""
    quota = DeploymentQuota(name=f"p/m{next(_ids)}", rpm=3, rpd=4)
    assert [backend.deployment_admit(quota, 10) for _ in range(4)] == [True, True, True, False]
    quota = DeploymentQuota(name=f"p/m{next(_ids)}", rpd=2)
    assert [backend.deployment_admit(quota, 10) for _ in range(3)] == [True, True, False]


@pytest.mark.parametrize("pool_bypass", [True, False], ids=["free-list", "pipeline"])
def test_fail_modes_when_redis_is_down(pool_bypass):
    """Redis unreachable: fail closed raises, fail open admits and counts it."""
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    lim = limits(rpm=1)
    closed = RateLimitService(RedisLimiter(dead, 1000, pool_bypass=pool_bypass), seed=lambda *a: {},
                              fail_mode="closed")
    with pytest.raises(LimiterUnavailable):
        closed.admit(lim, "x", 0, 0)
    opened = RateLimitService(RedisLimiter(dead, 1000, pool_bypass=pool_bypass), seed=lambda *a: {},
                              fail_mode="open")
    adm = opened.admit(lim, "x", 0, 0)
    assert adm.admitted and adm.degraded and opened.fail_open_admissions == 1
    opened.settle(adm, 0, 0)  # a degraded admission settles to nothing, without raising


def test_money_conversion_and_reset_format():
    """Nano-dollars round up (never under-count); reset times use OpenAI's format."""
    assert to_nano(Decimal("0.0000000375")) == 38 and to_nano(Decimal("1.5")) == 1_500_000_000
    assert to_nano(None) == -1
    assert format_reset(20) == "20ms" and format_reset(1500) == "1.5s" and format_reset(360000) == "6m0s"


def test_redis_keys_share_one_hash_tag():
    """Every key a call touches has the tenant's hash tag (so it runs on Redis Cluster)."""
    names = RedisLimiter.key_names(KeyLimits(key_id=5, tenant_id=9))
    assert all(n.startswith("gw:{t:9}:") for n in names)


def test_keys_of_one_call_live_on_one_cluster_master(redis_cluster):
    """On the real cluster every key of an admission hashes to one slot, and tenants spread
    over the masters (so the cluster shares the load)."""
    client = redis.Redis(host="127.0.0.1", port=redis_cluster.ports[0])
    slots = {client.cluster("KEYSLOT", name) for name in RedisLimiter.key_names(KeyLimits(key_id=5, tenant_id=9))}
    assert len(slots) == 1
    owners = {redis_cluster.slot_owner(RedisLimiter.key_names(KeyLimits(key_id=t, tenant_id=t))[0]) for t in range(30)}
    assert owners == set(redis_cluster.ports)
    client.close()


def test_script_reloads_on_every_master_after_a_flush(redis_cluster):
    """A cluster that lost its scripts (restart, SCRIPT FLUSH) gets the script again."""
    limiter = RedisLimiter(make_redis(redis_cluster.url, 4), lease_ms=1000)
    assert admit(limiter, limits(rpm=5)).admitted
    for port in redis_cluster.ports:
        redis_cluster.node(port).script_flush()
    assert all(admit(limiter, limits(rpm=5)).admitted for _ in range(6))


@pytest.mark.parametrize("where", ["redis", "cluster"])
def test_service_settles_in_the_background_pipelined(where, request):
    """Settlements are queued and sent pipelined by a background thread: after flush() every
    reservation is released (leases free, tokens refunded), none is applied twice."""
    client = make_redis(request.getfixturevalue("redis_cluster").url, 8) if where == "cluster" \
        else redis.Redis.from_url(REDIS_URL)
    service = RateLimitService(RedisLimiter(client, lease_ms=60_000), seed=lambda *a: {})
    lim = limits(tpm=2000, max_concurrent=20)
    admissions = [service.admit(lim, f"r{i}", 50, 0) for i in range(20)]
    assert all(a.admitted for a in admissions)
    assert service.admit(lim, "extra", 50, 0).reason == "concurrency"
    for adm in admissions:
        service.settle(adm, 10, 0)  # each used 10 of its 50 tokens
    assert service.flush(5)
    # 20 slots free again, and 20 * 40 tokens were refunded: 2000 - 200 = 1800 left
    assert service.admit(lim, "after", 1790, 0).admitted
    assert service.admit(lim, "over", 60, 0).reason == "tpm"  # 10 left, plus a little refill
    client.close()


def test_headroom_reads_counters_without_reserving(backend):
    """`headroom` (GET /v1/key) shows what is left of each limit and reserves nothing: two peeks
    agree, and a request is still admitted exactly as before."""
    # rpm 5 and tpm 6: a request (a token) takes 12 s (10 s) to come back, far longer than the test
    lim = limits(rpm=5, tpm=6, daily_tokens=500, max_concurrent=2, key_budget_nano=1000, tenant_budget_nano=-1)
    fresh = backend.headroom(lim)
    assert (fresh.rpm_left, fresh.tpm_left, fresh.in_flight) == (5, 6, 0)
    assert (fresh.day_tokens, fresh.key_spend_nano, fresh.tenant_spend_nano) == (None, None, None)
    adm = admit(backend, lim, tokens=4, cost=300)
    first, second = backend.headroom(lim), backend.headroom(lim)
    assert (first.rpm_left, first.tpm_left, first.in_flight, first.day_tokens, first.key_spend_nano) == \
        (second.rpm_left, second.tpm_left, second.in_flight, second.day_tokens, second.key_spend_nano) == \
        (4, 2, 1, 4, 300)
    assert 0 < first.rpm_reset_ms <= 12000 and 30000 < first.tpm_reset_ms <= 40000
    backend.settle(adm, 1, 120)
    after = backend.headroom(lim)
    assert (after.tpm_left, after.in_flight, after.day_tokens, after.key_spend_nano) == (5, 0, 1, 120)
    assert (after.day, after.month) == (adm.day, adm.month)


def test_headroom_without_limits_reports_none(backend):
    """A key without rate limits has no headroom figures (-1) and nothing in flight."""
    peek = backend.headroom(limits())
    assert (peek.rpm_left, peek.tpm_left, peek.in_flight, peek.day_tokens) == (-1, -1, 0, None)


@pytest.mark.parametrize("pool_bypass", [True, False], ids=["free-list", "pipeline"])
def test_script_is_loaded_again_after_script_flush(pool_bypass):
    """Redis lost its scripts (restart, SCRIPT FLUSH): the next call loads the script again
    and is answered, whichever way commands reach Redis."""
    client = redis.Redis.from_url(REDIS_URL)
    backend = RedisLimiter(client, lease_ms=1000, pool_bypass=pool_bypass)
    lim = limits(rpm=5)
    assert admit(backend, lim).admitted
    client.script_flush()
    assert admit(backend, lim).admitted
    assert client.script_exists(backend.sha) == [True]
    client.close()
