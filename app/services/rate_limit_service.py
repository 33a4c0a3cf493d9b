"""Admission control: reserve every limit of a key before the upstream call, settle after it.

Two backends with the same semantics:
- `RedisLimiter`: the Lua script `lua/limiter.lua`, one round trip to admit and one to
  settle, exact across any number of workers and replicas (time from Redis).
- `LocalLimiter`: the same rules in-process, for the embedded mode (one process only).

Limits of a key: requests/min and tokens/min (GCRA: bursts up to the limit, smooth refill),
tokens per UTC day, concurrent requests (leases that expire, so a crashed worker cannot leak
slots), and money per calendar month (the key's budget and its tenant's), in integer
nano-dollars so that no float touches money.
"""
from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from decimal import ROUND_CEILING, Decimal
from pathlib import Path
from typing import Any, Callable, Protocol

import redis
from redis.cluster import RedisCluster

from app.overrides import RedisFreeList

log = logging.getLogger("gateway.limits")

NANO = Decimal(1_000_000_000)
PERIOD_US = 60_000_000
SCRIPT_PATH = Path(__file__).parent / "lua" / "limiter.lua"


def to_nano(usd: Decimal | None) -> int:
    """USD -> integer nano-dollars, rounded up (reservations and spend are never under-counted)."""
    if usd is None:
        return -1
    return int((Decimal(usd) * NANO).to_integral_value(rounding=ROUND_CEILING))


@dataclass(frozen=True)
class KeyLimits:
    """The limits of one request's key, as the limiter sees them (0 / -1: no limit)."""
    key_id: int
    tenant_id: int
    rpm: int = 0
    tpm: int = 0
    daily_tokens: int = 0
    max_concurrent: int = 0
    key_budget_nano: int = -1
    tenant_budget_nano: int = -1

    @property
    def needs_tokens(self) -> bool:
        return bool(self.tpm or self.daily_tokens or self.key_budget_nano >= 0 or self.tenant_budget_nano >= 0)

    @property
    def any(self) -> bool:
        return bool(self.rpm or self.max_concurrent or self.needs_tokens)


def hit_admission_limits(limits: KeyLimits) -> KeyLimits:
    """What a response cache hit is admitted on: requests/min only. It is answered at once (no
    concurrency slot, nothing to release) and uses no tokens and no money."""
    return KeyLimits(key_id=limits.key_id, tenant_id=limits.tenant_id, rpm=limits.rpm)


def key_limits(key: Any) -> KeyLimits:
    """The limiter's view of a KeyInfo."""
    return KeyLimits(key_id=key.id, tenant_id=key.tenant_id, rpm=key.rpm_limit or 0,
                     tpm=key.tpm_limit or 0, daily_tokens=key.daily_token_limit or 0,
                     max_concurrent=key.max_concurrent or 0, key_budget_nano=to_nano(key.budget_usd),
                     tenant_budget_nano=to_nano(key.tenant_budget_usd))


@dataclass
class Admission:
    admitted: bool
    reason: str = ""                  # rpm | tpm | tpm_too_large | daily | daily_too_large | concurrency | key_budget | tenant_budget
    retry_after_ms: int = 0
    day: int = 0
    month: str = ""
    tokens: int = 0                   # reserved
    cost_nano: int = 0                # reserved
    request_id: str = ""
    limits: KeyLimits | None = None
    headers: dict[str, str] = field(default_factory=dict)
    degraded: bool = False            # admitted without checking (Redis down, fail mode open)


@dataclass(frozen=True)
class DeploymentQuota:
    name: str                         # "provider/model"
    rpm: int = 0
    tpm: int = 0
    rpd: int = 0


@dataclass(frozen=True)
class QuotaTry:
    """One attempt at a deployment's quota: admitted, or why not, when this request's slot
    frees (seconds, 0: unknown), its place in the queue (0 = next) and the queue's length."""
    admitted: bool
    reason: str = ""
    wait_s: float = 0.0
    position: int = 0
    queue_length: int = 0


@dataclass(frozen=True)
class QuotaWait:
    """How a wait in a deployment's queue ended."""
    admitted: bool
    retry_after_s: float = 0.0        # timed out: when the slot of its place would have freed
    client_gone: bool = False


@dataclass(frozen=True)
class QueueStats:
    length: int = 0
    oldest_wait_s: float = 0.0


@dataclass(frozen=True)
class Headroom:
    """What a key's limiter counters say right now, read without reserving anything (GET /v1/key).

    `*_left` is how many requests (tokens) could be admitted at this instant (-1: no such
    limit), `*_reset_ms` how long until that limit is full again. The day and month counters
    are None when the limiter holds none (a new period, or a Redis that lost them): the caller
    reads the usage store instead. Counters include reservations of requests still running."""
    day: int
    month: str
    rpm_left: int
    rpm_reset_ms: int
    tpm_left: int
    tpm_reset_ms: int
    in_flight: int
    day_tokens: int | None
    key_spend_nano: int | None
    tenant_spend_nano: int | None


def deployment_quota(deployment: Any) -> DeploymentQuota | None:
    """The provider quota of a models.json deployment (its rpm/tpm/rpd), if it has one."""
    if not (deployment.rpm or deployment.tpm or deployment.rpd):
        return None
    return DeploymentQuota(name=f"{deployment.provider}/{deployment.model}", rpm=deployment.rpm or 0,
                           tpm=deployment.tpm or 0, rpd=deployment.rpd or 0)


# Redis answers, but cannot serve the script now (loading its data, a replica, no master):
# redis-py parses these replies into their own exception classes.
_STORE_NOT_SERVING = (redis.exceptions.BusyLoadingError, redis.exceptions.ReadOnlyError,
                      redis.exceptions.MasterDownError)


class LimiterUnavailable(Exception):
    """The limiter's store cannot be reached."""


class SeedNeeded(Exception):
    def __init__(self, what: list[str], day: int, month: str) -> None:
        super().__init__(",".join(what))
        self.what, self.day, self.month = what, day, month


class Limiter(Protocol):
    def admit(self, limits: KeyLimits, request_id: str, tokens: int, cost_nano: int,
              seeds: dict[str, int] | None) -> Admission: ...
    def peek(self, limits: KeyLimits) -> Admission | None: ...
    def settle(self, adm: Admission, actual_tokens: int, actual_cost_nano: int) -> None: ...
    def deployment_admit(self, quota: DeploymentQuota, tokens: int) -> bool: ...
    def deployment_try(self, quota: DeploymentQuota, tokens: int, ticket: str) -> QuotaTry: ...
    def deployment_leave(self, quota: DeploymentQuota, ticket: str) -> None: ...
    def deployment_queue(self, quota: DeploymentQuota) -> QueueStats: ...
    def deployment_settle(self, quota: DeploymentQuota, refund_tokens: int) -> None: ...
    def headroom(self, limits: KeyLimits) -> Headroom: ...


def format_reset(ms: int) -> str:
    """OpenAI's reset format: "1s", "6m0s", "20ms"."""
    if ms < 1000:
        return f"{max(ms, 0)}ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.3g}s"
    return f"{int(seconds // 60)}m{int(seconds % 60)}s"


def _headers(limits: KeyLimits, rpm_left: int, rpm_reset_ms: int, tpm_left: int, tpm_reset_ms: int) -> dict[str, str]:
    headers: dict[str, str] = {}
    if limits.rpm:
        headers.update({"x-ratelimit-limit-requests": str(limits.rpm),
                        "x-ratelimit-remaining-requests": str(max(rpm_left, 0)),
                        "x-ratelimit-reset-requests": format_reset(rpm_reset_ms)})
    if limits.tpm:
        headers.update({"x-ratelimit-limit-tokens": str(limits.tpm),
                        "x-ratelimit-remaining-tokens": str(max(tpm_left, 0)),
                        "x-ratelimit-reset-tokens": format_reset(tpm_reset_ms)})
    return headers


# A queued request that stops polling (its worker died) leaves the queue after this long;
# waiters poll at least every QUEUE_POLL_MAX_S, well within it.
QUEUE_LIVENESS_US = 5_000_000
QUEUE_POLL_MAX_S = 0.25


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# --- Redis ----------------------------------------------------------------------------------

class RedisLimiter:
    def __init__(self, client: redis.Redis, lease_ms: int, max_connections: int = 64,
                 pool_bypass: bool = True, quota_window_s: float = 60.0) -> None:
        """`pool_bypass`: commands go through app/overrides.py `RedisFreeList` (our own free
        list of connections, straight on the wire) instead of redis-py's pipeline and pool.
        `quota_window_s`: the window of deployment quotas' rpm/tpm (60; shorter in tests)."""
        self.client = client
        self.lease_ms = lease_ms
        self.window_us = int(quota_window_s * 1_000_000)
        # A Redis Cluster client has one pool per node: its commands go through its slot routing.
        cluster = isinstance(client, RedisCluster)
        self._free_list = (RedisFreeList(client.connection_pool, max_connections, LimiterUnavailable)
                           if pool_bypass and not cluster else None)
        self._execute: Callable[[list[tuple[Any, ...]]], list[Any]] = (
            self._on_cluster if cluster else
            self._free_list.execute if self._free_list is not None else self._pipelined)
        self.script_text = SCRIPT_PATH.read_text()
        self.sha = hashlib.sha1(self.script_text.encode()).hexdigest()

    @staticmethod
    def key_names(limits: KeyLimits) -> list[str]:
        # One hash tag per tenant: the key's counters and the tenant's budget in one slot.
        t = f"gw:{{t:{limits.tenant_id}}}"
        k = f"{t}:k:{limits.key_id}"
        return [f"{k}:rpm", f"{k}:tpm", f"{k}:tpd", f"{k}:lease", f"{k}:spend", f"{t}:spend"]

    @staticmethod
    def deployment_keys(quota: DeploymentQuota) -> list[str]:
        d = f"gw:{{d:{quota.name}}}"
        return [f"{d}:rpmlog", f"{d}:tpm", f"{d}:rpd", f"{d}:queue", f"{d}:alive"]

    def _call(self, keys: list[str], args: list[Any]) -> Any:
        result = self._call_many([(keys, args)])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def _call_many(self, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        """EVALSHA each call, pipelined (one write, one read), loading the script when Redis
        does not have it (a restart or SCRIPT FLUSH). Error replies come back in place of
        their results; an unreachable or not-ready Redis raises LimiterUnavailable."""
        results = self._execute([("EVALSHA", self.sha, len(keys), *keys, *args) for keys, args in calls])
        missing = [i for i, r in enumerate(results) if isinstance(r, redis.exceptions.NoScriptError)]
        if missing:
            loaded, *retried = self._execute([("SCRIPT", "LOAD", self.script_text)] + [
                ("EVALSHA", self.sha, len(calls[i][0]), *calls[i][0], *calls[i][1]) for i in missing])
            if isinstance(loaded, Exception):
                raise LimiterUnavailable(str(loaded))
            for i, result in zip(missing, retried):
                results[i] = result
        for result in results:
            if isinstance(result, _STORE_NOT_SERVING):
                raise LimiterUnavailable(type(result).__name__)
        return results

    def close(self) -> None:
        """Release this limiter's own Redis connections (the client's pool is its owner's)."""
        if self._free_list is not None:
            self._free_list.close()

    def _on_cluster(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """On a Redis Cluster: each command through the client's slot routing (it follows
        MOVED/ASK and refreshes its slot map). All keys of one script call share a hash tag, so
        each runs whole on the master owning that slot; SCRIPT LOAD goes to every master.
        EVALSHA cannot be pipelined across a cluster: one round trip per call."""
        results: list[Any] = []
        for command in commands:
            try:
                results.append(self.client.execute_command(*command))
            except (redis.exceptions.ClusterError, redis.exceptions.RedisClusterException,
                    redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                raise LimiterUnavailable(f"{type(exc).__name__}: {exc}") from None
            except redis.ResponseError as exc:
                results.append(exc)
        return results

    def _pipelined(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """redis-py's own way: a non-transactional pipeline on the client's pool."""
        pipe = self.client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        try:
            return pipe.execute(raise_on_error=False)
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            raise LimiterUnavailable(str(exc)) from None

    def admit(self, limits: KeyLimits, request_id: str, tokens: int, cost_nano: int,
              seeds: dict[str, int] | None) -> Admission:
        seeds = seeds or {}
        res = self._call(self.key_names(limits), [
            "admit", request_id, limits.rpm, limits.tpm, tokens, limits.daily_tokens,
            limits.max_concurrent, self.lease_ms, limits.key_budget_nano, limits.tenant_budget_nano,
            cost_nano, seeds.get("key_spend", ""), seeds.get("tenant_spend", ""), seeds.get("day", "")])
        status, reason = int(res[0]), res[1].decode() if isinstance(res[1], bytes) else res[1]
        day, month = int(res[3]), res[4].decode() if isinstance(res[4], bytes) else res[4]
        if status == -1:
            raise SeedNeeded(reason.split(","), day, month)
        adm = Admission(admitted=status == 1, reason=reason, retry_after_ms=int(res[2]), day=day,
                        month=month, tokens=tokens, cost_nano=cost_nano, request_id=request_id,
                        limits=limits)
        if adm.admitted:
            adm.headers = _headers(limits, int(res[5]), int(res[6]), int(res[7]), int(res[8]))
        elif reason == "rpm":
            adm.headers = _headers(replace(limits, tpm=0), int(res[5]), int(res[6]), 0, 0)
        elif reason == "tpm":
            adm.headers = _headers(replace(limits, rpm=0), 0, 0, int(res[5]), int(res[6]))
        return adm

    def peek(self, limits: KeyLimits) -> Admission | None:
        """The refusal a request would get on requests/min or concurrency alone (None: none);
        reserves nothing."""
        res = self._call(self.key_names(limits), ["peek", limits.rpm, limits.max_concurrent])
        if int(res[0]) == 1:
            return None
        reason = res[1].decode() if isinstance(res[1], bytes) else res[1]
        headers = _headers(replace(limits, tpm=0), int(res[3]), int(res[4]), 0, 0) if reason == "rpm" else {}
        return Admission(False, reason, int(res[2]), limits=limits, headers=headers)

    def settle(self, adm: Admission, actual_tokens: int, actual_cost_nano: int) -> None:
        self.settle_many([(adm, actual_tokens, actual_cost_nano)])

    def settle_many(self, items: list[tuple[Admission, int, int]]) -> None:
        """Settle several admissions in one round trip."""
        calls = []
        for adm, actual_tokens, actual_cost_nano in items:
            limits = adm.limits
            assert limits is not None
            calls.append((self.key_names(limits), [
                "settle", adm.request_id, limits.tpm, adm.tokens - actual_tokens, adm.day, adm.month,
                actual_cost_nano - adm.cost_nano, int(limits.daily_tokens > 0),
                int(limits.key_budget_nano >= 0), int(limits.tenant_budget_nano >= 0)]))
        for result in self._call_many(calls):
            if isinstance(result, Exception):
                log.error("settlement script failed: %s", result)

    def cache_admit(self, limits: KeyLimits, cache_keys: list[str], model: str, digest: str, read: bool,
                    request_id: str) -> tuple[str, str, bytes | None, Admission | None]:
        """The response cache's lookup fused with a hit's admission (one round trip, the
        script's `cache` op): `cache_keys` are the tenant's cache generations and entry prefix
        (app/services/response_cache.py; the tenant's hash tag, as the key's counters). Returns
        (tenant generation, model generation, the entry or None, the hit's admission: counted
        on requests/min only, or refused on it; None when there is no hit)."""
        res = self._call(self.key_names(limits) + cache_keys,
                         ["cache", limits.rpm, model, digest, "1" if read else "0"])
        status, tg, mg, raw = int(res[0]), _text(res[3]), _text(res[4]), res[5] or None
        if status == 2 or raw is None:
            return tg, mg, None, None
        hit_limits = hit_admission_limits(limits)
        adm = Admission(admitted=status == 1, reason=_text(res[1]), retry_after_ms=int(res[2]),
                        request_id=request_id, limits=hit_limits)
        if hit_limits.rpm:
            adm.headers = _headers(hit_limits, int(res[6]), int(res[7]), 0, 0)
        return tg, mg, raw, adm

    def deployment_admit(self, quota: DeploymentQuota, tokens: int) -> bool:
        return self.deployment_try(quota, tokens, "").admitted

    def deployment_try(self, quota: DeploymentQuota, tokens: int, ticket: str) -> QuotaTry:
        """Take a slot of the quota; refused with a `ticket`, the request joins (or keeps its
        place in) the deployment's queue until `deployment_leave` or QUEUE_LIVENESS_US."""
        res = self._call(self.deployment_keys(quota), ["deploy_admit", quota.rpm, quota.tpm, quota.rpd, tokens,
                                                       self.window_us, ticket, QUEUE_LIVENESS_US])
        if int(res[0]) == 1:
            return QuotaTry(True)
        return QuotaTry(False, _text(res[1]), int(_text(res[2])) / 1e6, int(res[3]), int(res[4]))

    def deployment_leave(self, quota: DeploymentQuota, ticket: str) -> None:
        self._call(self.deployment_keys(quota), ["deploy_leave", 0, 0, 0, 0, 0, ticket])

    def deployment_queue(self, quota: DeploymentQuota) -> QueueStats:
        res = self._call(self.deployment_keys(quota), ["deploy_queue"])
        return QueueStats(int(res[0]), int(_text(res[1])) / 1e6)

    def deployment_settle(self, quota: DeploymentQuota, refund_tokens: int) -> None:
        if quota.tpm and refund_tokens:
            self._call(self.deployment_keys(quota), ["deploy_settle", quota.tpm, refund_tokens, self.window_us])

    def headroom(self, limits: KeyLimits) -> Headroom:
        res = self._call(self.key_names(limits), ["headroom", limits.rpm, limits.tpm])

        def counter(value: Any) -> int | None:
            return int(value) if value not in (b"", "", None) else None
        month = res[1].decode() if isinstance(res[1], bytes) else res[1]
        return Headroom(day=int(res[0]), month=month, rpm_left=int(res[2]), rpm_reset_ms=int(res[3]),
                        tpm_left=int(res[4]), tpm_reset_ms=int(res[5]), in_flight=int(res[6]),
                        day_tokens=counter(res[7]), key_spend_nano=counter(res[8]),
                        tenant_spend_nano=counter(res[9]))


# --- in-process (embedded mode) ---------------------------------------------------------------

def day_and_month(now_us: int) -> tuple[int, str]:
    """(days since 1970-01-01, "YYYYMM") of a UTC time in microseconds, as the Lua script names them."""
    days = now_us // 86_400_000_000
    d = datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(days=days)
    return days, f"{d.year:04d}{d.month:02d}"


class LocalLimiter:
    """The Lua script's rules in Python, for one process (embedded mode, no Redis)."""

    def __init__(self, lease_ms: int, clock: Callable[[], float] = time.time, quota_window_s: float = 60.0) -> None:
        self.lease_ms = lease_ms
        self.clock = clock
        self.window_us = int(quota_window_s * 1_000_000)
        self._lock = threading.Lock()
        self._tat: dict[str, float] = {}
        self._counters: dict[str, int] = {}
        self._leases: dict[str, dict[str, int]] = {}
        self._logs: dict[str, deque[int]] = {}                # deployment -> admission times (us)
        self._queues: dict[str, dict[str, tuple[int, int]]] = {}  # deployment -> ticket -> (since, expiry)

    def _now_us(self) -> int:
        return int(self.clock() * 1_000_000)

    def _gcra(self, key: str, limit: int, cost: int, now: int,
              period: int = PERIOD_US) -> tuple[bool, float, int, int, int]:
        interval = period / limit
        tat = max(self._tat.get(key, 0), now)
        new_tat = math.ceil(tat + cost * interval)
        used = new_tat - now
        if used > period:
            return False, tat, int(used - period), max(0, int((period - (tat - now)) // interval)), int(tat - now)
        return True, new_tat, 0, int((period - used) // interval), int(used)

    def admit(self, limits: KeyLimits, request_id: str, tokens: int, cost_nano: int,
              seeds: dict[str, int] | None) -> Admission:
        with self._lock:
            return self._admit(limits, request_id, tokens, cost_nano, seeds or {})

    def _admit(self, limits: KeyLimits, rid: str, tokens: int, cost: int, seeds: dict[str, int]) -> Admission:
        now = self._now_us()
        now_ms = now // 1000
        days, month = day_and_month(now)
        k = f"k:{limits.key_id}"
        day_key, kspend, tspend = f"{k}:tpd:{days}", f"{k}:spend:{month}", f"t:{limits.tenant_id}:spend:{month}"
        until_midnight = (days + 1) * 86_400_000 - now_ms
        base = dict(day=days, month=month, tokens=tokens, cost_nano=cost, request_id=rid, limits=limits)

        missing = []
        for wanted, key, seed in ((limits.daily_tokens > 0, day_key, "day"),
                                  (limits.key_budget_nano >= 0, kspend, "key_spend"),
                                  (limits.tenant_budget_nano >= 0, tspend, "tenant_spend")):
            if wanted and key not in self._counters:
                if seed in seeds:
                    self._counters[key] = int(seeds[seed])
                else:
                    missing.append(seed)
        if missing:
            raise SeedNeeded(missing, days, month)

        rpm_tat = tpm_tat = 0.0
        rpm_left = tpm_left = rpm_reset = tpm_reset = 0
        if limits.rpm:
            ok, rpm_tat, retry, rpm_left, rpm_reset = self._gcra(f"{k}:rpm", limits.rpm, 1, now)
            if not ok:
                return Admission(False, "rpm", -(-retry // 1000), **base,
                                 headers=_headers(replace(limits, tpm=0), rpm_left, rpm_reset // 1000, 0, 0))
        if limits.tpm:
            if tokens > limits.tpm:
                return Admission(False, "tpm_too_large", **base)
            ok, tpm_tat, retry, tpm_left, tpm_reset = self._gcra(f"{k}:tpm", limits.tpm, tokens, now)
            if not ok:
                return Admission(False, "tpm", -(-retry // 1000), **base,
                                 headers=_headers(replace(limits, rpm=0), 0, 0, tpm_left, tpm_reset // 1000))
        if limits.daily_tokens:
            if tokens > limits.daily_tokens:
                return Admission(False, "daily_too_large", **base)
            if self._counters[day_key] + tokens > limits.daily_tokens:
                return Admission(False, "daily", until_midnight, **base)
        leases = self._leases.setdefault(k, {})
        if limits.max_concurrent:
            for lease_id, expiry in list(leases.items()):
                if expiry <= now_ms:
                    del leases[lease_id]
            if len(leases) >= limits.max_concurrent:
                return Admission(False, "concurrency", 1000, **base)
        if limits.key_budget_nano >= 0 and self._counters[kspend] + cost > limits.key_budget_nano:
            return Admission(False, "key_budget", **base)
        if limits.tenant_budget_nano >= 0 and self._counters[tspend] + cost > limits.tenant_budget_nano:
            return Admission(False, "tenant_budget", **base)

        if limits.rpm:
            self._tat[f"{k}:rpm"] = rpm_tat
        if limits.tpm:
            self._tat[f"{k}:tpm"] = tpm_tat
        if limits.daily_tokens:
            self._counters[day_key] += tokens
        if limits.max_concurrent:
            leases[rid] = now_ms + self.lease_ms
        if limits.key_budget_nano >= 0:
            self._counters[kspend] += cost
        if limits.tenant_budget_nano >= 0:
            self._counters[tspend] += cost
        return Admission(True, "", 0, **base,
                         headers=_headers(limits, rpm_left, rpm_reset // 1000, tpm_left, tpm_reset // 1000))

    def peek(self, limits: KeyLimits) -> Admission | None:
        """As RedisLimiter.peek."""
        with self._lock:
            now = self._now_us()
            k = f"k:{limits.key_id}"
            if limits.rpm:
                ok, _, retry, left, reset = self._gcra(f"{k}:rpm", limits.rpm, 1, now)
                if not ok:
                    return Admission(False, "rpm", -(-retry // 1000), limits=limits,
                                     headers=_headers(replace(limits, tpm=0), left, reset // 1000, 0, 0))
            leases = self._leases.get(k, {})
            if limits.max_concurrent and sum(1 for e in leases.values() if e > now // 1000) >= limits.max_concurrent:
                return Admission(False, "concurrency", 1000, limits=limits)
            return None

    def settle(self, adm: Admission, actual_tokens: int, actual_cost_nano: int) -> None:
        limits = adm.limits
        assert limits is not None
        k = f"k:{limits.key_id}"
        refund = adm.tokens - actual_tokens
        with self._lock:
            if limits.tpm and refund and f"{k}:tpm" in self._tat:
                self._tat[f"{k}:tpm"] -= refund * PERIOD_US / limits.tpm
            for wanted, key, delta in ((limits.daily_tokens > 0, f"{k}:tpd:{adm.day}", -refund),
                                       (limits.key_budget_nano >= 0, f"{k}:spend:{adm.month}",
                                        actual_cost_nano - adm.cost_nano),
                                       (limits.tenant_budget_nano >= 0, f"t:{limits.tenant_id}:spend:{adm.month}",
                                        actual_cost_nano - adm.cost_nano)):
                if wanted and key in self._counters:
                    self._counters[key] = max(0, self._counters[key] + delta)
            self._leases.get(k, {}).pop(adm.request_id, None)

    def deployment_admit(self, quota: DeploymentQuota, tokens: int) -> bool:
        return self.deployment_try(quota, tokens, "").admitted

    def deployment_try(self, quota: DeploymentQuota, tokens: int, ticket: str) -> QuotaTry:
        """The Lua script's `deploy_admit` (same rules, see there)."""
        with self._lock:
            now, window = self._now_us(), self.window_us
            d = f"d:{quota.name}"
            queue = self._live_queue(quota.name, now)
            order = sorted(queue, key=lambda t: (queue[t][0], t))
            rank = order.index(ticket) if ticket in queue else len(order)
            day_key = f"{d}:rpd:{now // 86_400_000_000}"
            reason, wait, t_tat = "", 0, 0.0
            log_ = self._logs.setdefault(quota.name, deque())
            if quota.rpm:
                while log_ and log_[0] <= now - window:
                    log_.popleft()
                free = quota.rpm - len(log_)
                if rank >= free:
                    i = rank - free
                    reason, wait = "rpm", (log_[i] + window - now) if i < len(log_) else window
            if not reason and quota.rpd:
                if rank >= quota.rpd - self._counters.get(day_key, 0):
                    reason, wait = "rpd", (now // 86_400_000_000 + 1) * 86_400_000_000 - now
            if not reason and quota.tpm:
                ok, t_tat, retry, *_ = self._gcra(f"{d}:tpm", quota.tpm, min(tokens, quota.tpm), now, window)
                if not ok:
                    reason, wait = "tpm", retry
                elif not (quota.rpm or quota.rpd) and rank > 0:
                    reason = "queued"
            if reason:
                if ticket:
                    since = queue[ticket][0] if ticket in queue else now
                    queue[ticket] = (since, now + QUEUE_LIVENESS_US)
                return QuotaTry(False, reason, wait / 1e6, rank, len(queue))
            if quota.rpm:
                log_.append(now)
            if quota.tpm:
                self._tat[f"{d}:tpm"] = t_tat
            if quota.rpd:
                self._counters[day_key] = self._counters.get(day_key, 0) + 1
            queue.pop(ticket, None)
            return QuotaTry(True)

    def _live_queue(self, name: str, now: int) -> dict[str, tuple[int, int]]:
        queue = self._queues.setdefault(name, {})
        for ticket in [t for t, (_, expiry) in queue.items() if expiry <= now]:
            del queue[ticket]
        return queue

    def deployment_leave(self, quota: DeploymentQuota, ticket: str) -> None:
        with self._lock:
            self._queues.get(quota.name, {}).pop(ticket, None)

    def deployment_queue(self, quota: DeploymentQuota) -> QueueStats:
        with self._lock:
            now = self._now_us()
            queue = self._live_queue(quota.name, now)
            oldest = min((since for since, _ in queue.values()), default=now)
            return QueueStats(len(queue), (now - oldest) / 1e6)

    def headroom(self, limits: KeyLimits) -> Headroom:
        with self._lock:
            now = self._now_us()
            days, month = day_and_month(now)
            k = f"k:{limits.key_id}"

            def room(name: str, limit: int) -> tuple[int, int]:
                if not limit:
                    return -1, 0
                _, _, _, left, reset_us = self._gcra(f"{k}:{name}", limit, 0, now)  # cost 0: a pure read
                return left, -(-reset_us // 1000)
            rpm_left, rpm_reset = room("rpm", limits.rpm)
            tpm_left, tpm_reset = room("tpm", limits.tpm)
            in_flight = sum(1 for expiry in self._leases.get(k, {}).values() if expiry > now // 1000)
            return Headroom(day=days, month=month, rpm_left=rpm_left, rpm_reset_ms=rpm_reset,
                            tpm_left=tpm_left, tpm_reset_ms=tpm_reset, in_flight=in_flight,
                            day_tokens=self._counters.get(f"{k}:tpd:{days}"),
                            key_spend_nano=self._counters.get(f"{k}:spend:{month}"),
                            tenant_spend_nano=self._counters.get(f"t:{limits.tenant_id}:spend:{month}"))

    def deployment_settle(self, quota: DeploymentQuota, refund_tokens: int) -> None:
        if quota.tpm and refund_tokens:
            with self._lock:
                key = f"d:{quota.name}:tpm"
                if key in self._tat:
                    self._tat[key] -= min(refund_tokens, quota.tpm) * self.window_us / quota.tpm


# --- the service the request path calls -------------------------------------------------------

SeedFn = Callable[[KeyLimits, int, str], dict[str, int]]


class RateLimitService:
    """Admits and settles requests on a backend; handles seeding and the Redis fail mode."""

    def __init__(self, backend: Limiter, seed: SeedFn, fail_mode: str = "closed") -> None:
        self.backend = backend
        self.seed = seed
        self.fail_open = fail_mode == "open"
        self.fail_open_admissions = 0
        self._last_warning = 0.0
        # Settlements to a backend that can batch them are sent by one background thread (a
        # greenlet under gevent), pipelined: the response never waits for them, and under load
        # many settlements share one round trip. They are applied within milliseconds.
        self._batched = hasattr(backend, "settle_many")
        self._pending: deque[tuple[Admission, int, int]] = deque()
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    def admit(self, limits: KeyLimits, request_id: str, tokens: int, cost_nano: int) -> Admission:
        """Raises LimiterUnavailable in fail-closed mode when the store is down."""
        try:
            try:
                return self.backend.admit(limits, request_id, tokens, cost_nano, None)
            except SeedNeeded as need:
                # A day or month counter is missing (new period, or Redis lost it): rebuild it
                # from the usage records, then try again with the seeds.
                seeds = self.seed(limits, need.day, need.month)
                return self.backend.admit(limits, request_id, tokens, cost_nano, seeds)
        except LimiterUnavailable:
            if not self.fail_open:
                raise
            self.fail_open_admissions += 1
            self._warn("limiter store unavailable: admitting without limits (RATE_LIMIT_FAIL_MODE=open)")
            return Admission(True, request_id=request_id, limits=limits, degraded=True)

    @property
    def cache_admit(self) -> Callable[..., tuple[str, str, bytes | None, Admission | None]] | None:
        """The backend's response cache lookup fused with a hit's admission (RedisLimiter's
        `cache_admit`), or None: the caller looks up, then admits. Its LimiterUnavailable is the
        caller's (a cache it cannot reach: the request goes on without the cache)."""
        return getattr(self.backend, "cache_admit", None)

    def peek(self, limits: KeyLimits) -> Admission | None:
        """A refusal on requests/min or concurrency alone, known without reserving anything
        (None: no such refusal, or the store is down: the admission proper then decides)."""
        try:
            return self.backend.peek(limits)
        except LimiterUnavailable:
            return None

    def settle(self, adm: Admission, actual_tokens: int, actual_cost_nano: int) -> None:
        """Replace the reservation with the actual usage (refunds, lease release)."""
        if adm.degraded or adm.limits is None:
            return
        limits = adm.limits
        if not (limits.max_concurrent or limits.needs_tokens or adm.tokens or adm.cost_nano or actual_tokens
                or actual_cost_nano):
            return  # requests/min only (a cache hit): nothing was held, nothing to give back
        if not self._batched:
            self._settle_now([(adm, actual_tokens, actual_cost_nano)])
            return
        self._pending.append((adm, actual_tokens, actual_cost_nano))
        self._idle.clear()
        self._wake.set()

    def start(self) -> None:
        """Start the settlement sender (once; later calls do nothing). Called by the app's
        Runtime.start(); not started, settlements wait for `flush()`."""
        with self._lock:
            if self._batched and not self._closed and self._thread is None:
                self._thread = threading.Thread(target=self._run, name="limiter-settlement", daemon=True)
                self._thread.start()

    def close(self, timeout: float = 5.0) -> bool:
        """Send what is queued, then end the sender. True when nothing was left."""
        with self._lock:
            self._closed = True
        done = self.flush(timeout)
        self._wake.set()
        backend_close = getattr(self.backend, "close", None)
        if backend_close is not None:
            backend_close()
        return done

    def _settle_now(self, items: list[tuple[Admission, int, int]]) -> None:
        try:
            if self._batched:
                self.backend.settle_many(items)  # type: ignore[attr-defined]
            else:
                for item in items:
                    self.backend.settle(*item)
        except LimiterUnavailable:
            self._warn(f"limiter store unavailable: {len(items)} reservation(s) not settled "
                       "(leases expire by themselves; unused tokens and money stay reserved)")
        except Exception:
            log.exception("settlement failed")

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch = [self._pending.popleft() for _ in range(min(len(self._pending), 256))]
                self._settle_now(batch)
            if not self._pending:
                self._idle.set()
                if self._closed:
                    return

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued settlement was sent (shutdown, tests)."""
        if self._thread is None or not self._thread.is_alive():  # not started, or closed
            if self._pending:
                self._settle_now([self._pending.popleft() for _ in range(len(self._pending))])
            self._idle.set()
            return True
        self._wake.set()
        return self._idle.wait(timeout) and not self._pending

    def deployment_admit(self, quota: DeploymentQuota, tokens: int) -> bool:
        """Whether the deployment's provider quota has room (fail mode as for keys)."""
        try:
            return self.backend.deployment_admit(quota, tokens)
        except LimiterUnavailable:
            if not self.fail_open:
                raise
            return True

    def deployment_wait(self, quota: DeploymentQuota, tokens: int, ticket: str, timeout_s: float,
                        client_gone: Callable[[], bool], clock: Callable[[], float] = time.monotonic,
                        sleep: Callable[[float], None] = time.sleep) -> QuotaWait:
        """Wait in the deployment's queue (arrival order, shared by every worker and replica
        through the backend) until a slot is ours, `timeout_s` passes or the client hangs up.

        Each poll asks the backend once and sleeps until this request's slot should free (the
        backend computes it), at most QUEUE_POLL_MAX_S: under gevent a sleeping request is a
        parked greenlet, no thread and no CPU. Leaving (any way but admission) removes the
        ticket from the queue at once, so the next waiter moves up."""
        deadline = clock() + timeout_s
        admitted, backoff = False, 0.02
        try:
            while True:
                try:
                    attempt = self.backend.deployment_try(quota, tokens, ticket)
                except LimiterUnavailable:
                    if not self.fail_open:
                        raise
                    admitted = True
                    return QuotaWait(True)
                if attempt.admitted:
                    admitted = True
                    return QuotaWait(True)
                left = deadline - clock()
                if left <= 0:
                    return QuotaWait(False, retry_after_s=attempt.wait_s)
                if client_gone():
                    return QuotaWait(False, client_gone=True)
                # the backend's estimate of this place's slot; without one (a tpm-only quota
                # behind other waiters) a backoff from 20 ms up to the poll cap
                pause = attempt.wait_s if attempt.wait_s > 0 else backoff
                backoff = min(backoff * 2, QUEUE_POLL_MAX_S)
                sleep(min(max(pause, 0.005), QUEUE_POLL_MAX_S, left))
        finally:
            if not admitted:
                try:
                    self.backend.deployment_leave(quota, ticket)
                except LimiterUnavailable:
                    pass  # its liveness expires within QUEUE_LIVENESS_US

    def deployment_queue(self, quota: DeploymentQuota) -> QueueStats | None:
        """The deployment's queue (None when the store cannot be reached)."""
        try:
            return self.backend.deployment_queue(quota)
        except LimiterUnavailable:
            return None

    def deployment_settle(self, quota: DeploymentQuota, refund_tokens: int) -> None:
        try:
            self.backend.deployment_settle(quota, refund_tokens)
        except LimiterUnavailable:
            self._warn("limiter store unavailable: a deployment reservation was not settled")

    def headroom(self, limits: KeyLimits) -> Headroom | None:
        """The key's counters as they stand, reserving nothing; None when the store is down."""
        try:
            return self.backend.headroom(limits)
        except LimiterUnavailable:
            return None

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_warning > 5:
            self._last_warning = now
            log.warning(message)
