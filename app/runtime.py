"""The per-process objects of the gateway, built in one place and started and stopped in one place.

`build_runtime(settings)` makes every object a worker needs (provider manager, key cache and
its event listener, limiter, usage writer with its outbox, settlement, health board, router,
uptime checker, response cache, Redis client). Building starts nothing. `Runtime.start()` starts the
background threads (greenlets under gevent) - the usage writer, the outbox flusher, the
limiter's settlement sender, the key-event listener and the health publisher - once, however
many threads call it; `Runtime.close()` stops them, sending what is still queued, and releases
connections. Who calls them:

- gunicorn (gunicorn.config.py): the app is built in each worker after the fork;
  `post_worker_init` starts its runtime, `worker_exit` closes it.
- `run.py`: starts it before serving, closes it when the server stops.
- the tests (Testing/conftest.py `start_app` / `close_app`).

A runtime that was never started queues its usage rows and settlements; `close()` (or a
component's `flush()`) sends them. The Flask app keeps the runtime on
`app.extensions["gateway"]` (see `runtime()`), so that several apps (tests) never share state
and code running after a response (no request context) can hold a plain reference.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Optional

import redis
from flask import current_app
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from app import overrides
from app.config import Settings, engine_options
from app.extensions import make_redis
from app.providers.provider_manager import ProviderManager
from app.services.api_key_service import KeyCache, LastUsedTracker
from app.services.auth_throttle import AuthThrottle
from app.services.circuit_breaker import BreakerConfig
from app.services.database_check import missing_database
from app.services.key_events import KeyEvents
from app.services.metrics import GatewayMetrics
from app.services.provider_health import HealthBoard, merge_snapshots
from app.services.rate_limit_service import (LimiterUnavailable, LocalLimiter, RateLimitService, RedisLimiter,
                                             deployment_quota)
from app.services.request_lines import RequestLog
from app.services.response_cache import CACHE_CLEARED, HotEntries, ResponseCache, build_cache
from app.services.retry_policy import RetryPolicy
from app.services.router import Router, deployment_name
from app.services.settlement_service import Settlement
from app.services.uptime_service import UptimeChecker
from app.services.usage_batcher import UsageBatcher, dedicated_engine
from app.services.usage_outbox import RedisOutbox, SpoolOutbox
from app.services.usage_service import UsageWriter, period_totals
from app.utils.clock import SYSTEM_CLOCK, Clock, epoch_seconds
from app.utils.db_errors import set_missing_database
from app.utils.token_counter import preload as preload_tokenizers

log = logging.getLogger("gateway")


@dataclass
class Runtime:
    """Everything one gateway process holds, fully built (nothing is set later)."""
    settings: Settings
    providers: ProviderManager
    key_cache: KeyCache
    last_used: LastUsedTracker
    usage_batcher: UsageBatcher
    settlement: Settlement
    limiter: RateLimitService
    engine: Engine
    redis: Optional[redis.Redis]
    key_events: KeyEvents
    health: HealthBoard       # breakers and outcomes per deployment
    router: Router            # candidates, retries, fallback
    uptime: UptimeChecker
    clock: Clock              # every time-dependent decision reads it (tests move it)
    auth_throttle: AuthThrottle   # failed key / system-secret attempts per client address
    response_cache: ResponseCache  # exact answers per tenant: Redis, else in this process
    metrics: GatewayMetrics = field(default_factory=lambda: GatewayMetrics(enabled=False))
    request_log: RequestLog = field(default_factory=lambda: RequestLog(enabled=False))
    overrides: dict[str, bool] = field(default_factory=dict)   # which guarded overrides are in use
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _state: str = field(default="built", init=False, repr=False)  # built -> started -> closed

    @property
    def started(self) -> bool:
        return self._state == "started"

    def start(self) -> "Runtime":
        """Start every background thread of this process, once (later calls do nothing, also
        when made concurrently by the threads of run.py's server). Call it in the process that
        serves requests: after gunicorn's fork, never in its master."""
        with self._lock:
            if self._state != "built":
                return self
            self._state = "started"
            self._check_database()
            self.usage_batcher.start()   # the usage writer and the outbox flusher
            self.limiter.start()         # the settlement sender
            self.key_events.start()      # the key-event listener (with Redis)
            self.health.start()          # the health publisher (with Redis)
            self.metrics.start()         # the metrics ticker (this worker's gauges, history)
        return self

    def observe_error(self, err: Any, http_status: int, *, endpoint: str, request_id: str | None,
                      key: Any = None) -> None:
        """An error answer no completion run observed (app/errors.py): a limit's refusal is
        counted, and the request gets its log line."""
        if err.refusal:
            self.metrics.observe_refusal(endpoint, err.refusal)
        self.request_log.error(request_id=request_id, endpoint=endpoint, http_status=http_status,
                               code=err.code, refusal=err.refusal, key=key)

    def _check_database(self) -> None:
        """One clear error line when DATABASE_URL names a database the server does not have
        (requests then answer 503 database_not_found)."""
        missing = missing_database(self.engine)
        set_missing_database(missing)
        if missing:
            log.error("DATABASE_URL names the database %r, which does not exist on the PostgreSQL server: "
                      "requests that need it answer 503 database_not_found until it is created "
                      "(python db_manager.py create-db)", missing)

    def close(self, timeout: float = 10.0) -> bool:
        """Stop the background threads, send the settlements and store the usage rows still
        queued (in PostgreSQL, else in the outbox), release upstream and database connections.
        True when nothing was left in memory. Later calls do nothing."""
        with self._lock:
            if self._state == "closed":
                return True
            self._state = "closed"
        self.key_events.stop()
        self.health.stop()
        self.metrics.stop()
        settled = self.limiter.close(timeout=min(timeout, 5.0))
        stored = self.usage_batcher.close(timeout=timeout)
        self.providers.close()
        self.engine.dispose()
        if self.redis is not None:
            self.redis.close()
        return settled and stored


def build_runtime(settings: Settings, engine: Engine | None = None, clock: Clock = SYSTEM_CLOCK) -> Runtime:
    """Every per-process object, built and wired, none started. `engine`: the database engine
    to share (the Flask app's, so that its session and the runtime use one pool); by default
    one is made from the settings. `clock`: the time source of every object that reads time."""
    if engine is None:
        engine = create_engine(settings.DATABASE_URL, **engine_options(settings))
    pool_bypass = overrides.REDIS_POOL_BYPASS.usable(settings.OVERRIDE_REDIS_POOL_BYPASS)
    providers = ProviderManager.from_file(settings.MODELS_FILE, defaults={
        "connect_timeout_s": settings.UPSTREAM_CONNECT_TIMEOUT_S,
        "read_timeout_s": settings.UPSTREAM_READ_TIMEOUT_S,
        "pool_maxsize": settings.UPSTREAM_POOL_MAXSIZE,
        "total_timeout_s": settings.UPSTREAM_TOTAL_TIMEOUT_S,
    })
    preload_tokenizers({m.tokenizer for m in providers.catalog.models.values()},
                       local_files=settings.OVERRIDE_TIKTOKEN_LOADER)
    redis_client = make_redis(settings.REDIS_URL, settings.REDIS_MAX_CONNECTIONS, settings.REDIS_CLUSTER)
    last_used = LastUsedTracker(settings.LAST_USED_WRITE_INTERVAL_S, clock.monotonic)
    batcher = _usage_batcher(settings, engine, redis_client)
    limiter = RateLimitService(
        _limiter_backend(settings, redis_client, pool_bypass, clock),
        seed=lambda limits, day, month: seed_from_usage(engine, limits.key_id, limits.tenant_id, day, month),
        fail_mode=settings.RATE_LIMIT_FAIL_MODE)
    key_cache = KeyCache(settings.AUTH_CACHE_TTL_S, clock.monotonic, settings.AUTH_NEGATIVE_CACHE_TTL_S,
                         settings.AUTH_CACHE_STALE_S)
    health = HealthBoard(BreakerConfig(
        failure_threshold=settings.BREAKER_FAILURE_THRESHOLD, failure_ratio=settings.BREAKER_FAILURE_RATIO,
        window=settings.BREAKER_WINDOW, min_requests=settings.BREAKER_MIN_REQUESTS,
        cooldown_s=settings.BREAKER_COOLDOWN_S),
        redis_client=redis_client, publish_interval_s=settings.HEALTH_PUBLISH_INTERVAL_S,
        clock=clock.monotonic)
    metrics = GatewayMetrics(enabled=settings.METRICS_ENABLED, tenant_labels=settings.METRICS_TENANT_LABELS,
                             key_labels=settings.METRICS_KEY_LABELS)
    request_log = RequestLog(enabled=settings.REQUEST_LOG, json_format=settings.LOG_FORMAT == "json")
    observers = tuple(o for o, on in ((metrics.observe_run, metrics.enabled),
                                      (request_log.run, request_log.enabled)) if on)
    key_events = KeyEvents(key_cache, settings.REDIS_URL, settings.KEY_EVENTS_CHANNEL, publisher=redis_client)
    hot = None
    # (not on Redis Cluster: a PUBLISH there counts only the listeners of one node, so a clear
    # could not wait for every worker's acknowledgement)
    if redis_client is not None and settings.RESPONSE_CACHE_HOT_ENTRIES > 0 and not settings.REDIS_CLUSTER:
        hot = HotEntries(settings.RESPONSE_CACHE_HOT_ENTRIES, settings.RESPONSE_CACHE_HOT_TTL_S, clock.monotonic,
                         live=key_events.subscribed.is_set)
        key_events.handlers[CACHE_CLEARED] = hot.on_event
        key_events.on_subscribe.append(hot.drop)
    rt = Runtime(
        settings=settings, providers=providers, key_cache=key_cache, last_used=last_used,
        usage_batcher=batcher, settlement=Settlement(batcher, engine, last_used, limiter, observers),
        limiter=limiter, engine=engine, redis=redis_client,
        key_events=key_events,
        health=health,
        router=Router(providers.catalog, health, RetryPolicy(
            max_attempts=settings.ROUTER_MAX_ATTEMPTS,
            attempts_per_deployment=settings.ROUTER_ATTEMPTS_PER_DEPLOYMENT,
            base_s=settings.ROUTER_RETRY_BASE_S, max_backoff_s=settings.ROUTER_RETRY_MAX_BACKOFF_S,
            deadline_s=settings.ROUTER_DEADLINE_S, max_retry_after_s=settings.ROUTER_MAX_RETRY_AFTER_S),
            unconfigured=providers.unconfigured),
        uptime=UptimeChecker(providers, health, redis_client, settings.UPTIME_CACHE_S, clock=clock.monotonic),
        clock=clock,
        auth_throttle=AuthThrottle(settings.AUTH_FAILURE_LIMIT, settings.AUTH_FAILURE_WINDOW_S,
                                   lambda: epoch_seconds(clock), redis_client),
        response_cache=build_cache(redis_client, settings.RESPONSE_CACHE_TTL_S,
                                   settings.RESPONSE_CACHE_MEMORY_ENTRIES, clock.monotonic,
                                   hot=hot, publish=key_events.publish_acknowledged if hot else None),
        metrics=metrics, request_log=request_log,
        overrides={overrides.REDIS_POOL_BYPASS.name: pool_bypass,
                   overrides.TIKTOKEN_LOADER.name: settings.OVERRIDE_TIKTOKEN_LOADER})
    wire_metric_sources(rt)
    return rt


def wire_metric_sources(rt: Runtime) -> None:
    """What the metrics read off the request path: this worker's usage writer and key cache,
    the outbox, and each deployment's circuit (worst over the workers) and provider queue."""
    m = rt.metrics
    m.sources["usage_batcher"] = lambda: rt.usage_batcher
    m.sources["key_cache"] = lambda: rt.key_cache
    m.sources["outbox"] = rt.usage_batcher.outbox_depth
    m.sources["deployments"] = lambda: deployment_states(rt)


def deployment_states(rt: Runtime) -> list[tuple[str, str, Any]]:
    """(deployment name, worst circuit state over the workers, provider queue stats or None)
    for every deployment of the catalogue, once each."""
    interval = rt.settings.HEALTH_PUBLISH_INTERVAL_S
    snapshots = rt.health.fleet_snapshots(max_age_s=max(30.0, interval * 10))
    result, seen = [], set()
    for entry in list(rt.providers.catalog.models.values()):
        for dep in entry.deployments:
            name = deployment_name(dep)
            if name in seen:
                continue
            seen.add(name)
            quota = deployment_quota(dep)
            queue = rt.limiter.deployment_queue(quota) if quota is not None else None
            result.append((name, merge_snapshots(name, snapshots)["circuit"], queue))
    return result


def _usage_batcher(settings: Settings, engine: Engine, redis_client: Optional[redis.Redis]) -> UsageBatcher:
    """Group commit on the writer's own small pool (PostgreSQL), with the Redis outbox when
    Redis is configured and the local spool always."""
    if settings.embedded_database:
        writer, owns = UsageWriter(engine), False
    else:
        writer, owns = UsageWriter(dedicated_engine(settings.DATABASE_URL, settings.USAGE_WRITE_TIMEOUT_S)), True
    outbox = RedisOutbox(redis_client, settings.USAGE_OUTBOX_NAME) if redis_client is not None else None
    return UsageBatcher(writer, redis_outbox=outbox,
                        spool=SpoolOutbox(settings.USAGE_SPOOL_DIR), poll_s=settings.USAGE_OUTBOX_POLL_S,
                        partitions_ahead=settings.USAGE_PARTITIONS_AHEAD, owns_engine=owns,
                        linger_s=settings.USAGE_BATCH_LINGER_S)


def seed_from_usage(engine: Engine, key_id: int, tenant_id: int, day: int, month: str) -> dict[str, int]:
    """The limiter's day/month counters rebuilt from the usage store. PostgreSQL unreachable:
    the limiter is as unable to decide as without Redis (RATE_LIMIT_FAIL_MODE applies)."""
    try:
        return period_totals(engine, key_id, tenant_id, day, month)
    except SQLAlchemyError as exc:
        log.error("limiter counters cannot be rebuilt: usage store unavailable (%s)", type(exc).__name__)
        raise LimiterUnavailable() from None


def _limiter_backend(settings: Settings, redis_client: Optional[redis.Redis],
                     pool_bypass: bool, clock: Clock) -> RedisLimiter | LocalLimiter:
    lease_ms = int(settings.CONCURRENCY_LEASE_S * 1000)
    if redis_client is None:
        return LocalLimiter(lease_ms, clock=lambda: epoch_seconds(clock),
                            quota_window_s=settings.DEPLOYMENT_QUOTA_WINDOW_S)
    return RedisLimiter(redis_client, lease_ms, settings.REDIS_MAX_CONNECTIONS, pool_bypass=pool_bypass,
                        quota_window_s=settings.DEPLOYMENT_QUOTA_WINDOW_S)


def runtime() -> Runtime:
    """The runtime of the current Flask app."""
    return current_app.extensions["gateway"]
