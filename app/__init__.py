"""The gateway's Flask application factory."""
from __future__ import annotations

import atexit
import logging
import weakref
from typing import Any, Mapping

from flask import Flask, Response, g
from sqlalchemy.exc import SQLAlchemyError

from app.config import Settings, load_dotenv_once
from app.utils.clock import SYSTEM_CLOCK, Clock, epoch_seconds
from app.errors import register_error_handlers
from app.extensions import cors, db, make_redis
from app.providers.provider_manager import ProviderManager
from app.runtime import Runtime
from app.services.api_key_service import KeyCache, LastUsedTracker
from app.services.key_events import KeyEvents
from app.services.circuit_breaker import BreakerConfig
from app.services.provider_health import HealthBoard
from app.services.retry_policy import RetryPolicy
from app.services.router import Router
from app.services.uptime_service import UptimeChecker
from app.services.settlement_service import Settlement
from app.services.rate_limit_service import LimiterUnavailable, LocalLimiter, RateLimitService, RedisLimiter
from app.services.usage_batcher import UsageBatcher, dedicated_engine
from app.services.usage_outbox import RedisOutbox, SpoolOutbox
from app.services.usage_service import UsageWriter, period_totals
from app.utils.token_counter import preload as preload_tokenizers

log = logging.getLogger("gateway")
# Usage rows and settlements still queued when the process exits are sent first (weak: apps
# can be dropped).
_BATCHERS: "weakref.WeakSet[Any]" = weakref.WeakSet()
atexit.register(lambda: [b.flush(5.0) for b in list(_BATCHERS)])


def create_app(config: Settings | Mapping[str, Any] | None = None, clock: Clock = SYSTEM_CLOCK) -> Flask:
    """Build the app. `config`: a Settings, or a mapping of overrides on top of the environment.
    `clock`: the time source of every time-dependent decision (tests pass a FakeClock)."""
    load_dotenv_once()
    if isinstance(config, Settings):
        settings = config
    else:
        settings = Settings.from_env()
        for name, value in (config or {}).items():
            setattr(settings, name, value)
        settings.DATABASE_URL = Settings.from_env({"DATABASE_URL": settings.DATABASE_URL}).DATABASE_URL
    _configure_logging(settings.LOG_LEVEL)

    app = Flask(__name__)
    app.config.from_mapping(settings.to_flask())
    if settings.embedded_database:
        from app.config import DEFAULT_SQLITE_PATH
        DEFAULT_SQLITE_PATH.parent.mkdir(parents=True, exist_ok=True)
    db.init_app(app)
    cors.init_app(app, origins=[o.strip() for o in settings.CORS_ORIGINS.split(",") if o.strip()],
                  expose_headers=["X-Request-ID", "Retry-After", "x-ratelimit-limit-requests",
                                  "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
                                  "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens",
                                  "x-ratelimit-reset-tokens"])

    providers = ProviderManager.from_file(settings.MODELS_FILE, defaults={
        "connect_timeout_s": settings.UPSTREAM_CONNECT_TIMEOUT_S,
        "read_timeout_s": settings.UPSTREAM_READ_TIMEOUT_S,
        "pool_maxsize": settings.UPSTREAM_POOL_MAXSIZE,
        "total_timeout_s": settings.UPSTREAM_TOTAL_TIMEOUT_S,
    })
    preload_tokenizers({m.tokenizer for m in providers.catalog.models.values()})
    with app.app_context():
        engine = db.engine
    last_used = LastUsedTracker(settings.LAST_USED_WRITE_INTERVAL_S, clock.monotonic)
    redis_client = make_redis(settings.REDIS_URL, settings.REDIS_MAX_CONNECTIONS)
    batcher = _usage_batcher(settings, engine, redis_client)
    limiter = RateLimitService(_limiter_backend(settings, redis_client, clock),
                               seed=lambda limits, day, month: seed_from_usage(
                                   engine, limits.key_id, limits.tenant_id, day, month),
                               fail_mode=settings.RATE_LIMIT_FAIL_MODE)
    key_cache = KeyCache(settings.AUTH_CACHE_TTL_S, clock.monotonic)
    key_events = KeyEvents(key_cache, settings.REDIS_URL, settings.KEY_EVENTS_CHANNEL, publisher=redis_client)
    # The listener starts with the first cache miss of the process that serves requests
    # (a gunicorn worker, after the fork); a cache hit never calls this.
    key_cache.on_miss = key_events.ensure_listening
    app.extensions["gateway"] = Runtime(
        settings=settings, providers=providers, key_cache=key_cache,
        last_used=last_used, usage_batcher=batcher,
        settlement=Settlement(batcher, engine, last_used, limiter), limiter=limiter, engine=engine,
        redis=redis_client, app=app, key_events=key_events, clock=clock)
    _build_routing(app.extensions["gateway"])

    from app.api.routes import api
    app.register_blueprint(api)
    register_error_handlers(app)
    app.after_request(_request_id_header)
    _BATCHERS.add(batcher)
    _BATCHERS.add(limiter)
    _announce_mode(settings, len(providers.catalog.models))
    return app


def _build_routing(rt: Runtime) -> None:
    """Health board (breakers), router (candidates, retries, fallback) and uptime checker."""
    s = rt.settings
    rt.health = HealthBoard(BreakerConfig(
        failure_threshold=s.BREAKER_FAILURE_THRESHOLD, failure_ratio=s.BREAKER_FAILURE_RATIO,
        window=s.BREAKER_WINDOW, min_requests=s.BREAKER_MIN_REQUESTS, cooldown_s=s.BREAKER_COOLDOWN_S),
        redis_client=rt.redis, publish_interval_s=s.HEALTH_PUBLISH_INTERVAL_S, clock=rt.clock.monotonic)
    rt.router = Router(rt.providers.catalog, rt.health, RetryPolicy(
        max_attempts=s.ROUTER_MAX_ATTEMPTS, attempts_per_deployment=s.ROUTER_ATTEMPTS_PER_DEPLOYMENT,
        base_s=s.ROUTER_RETRY_BASE_S, max_backoff_s=s.ROUTER_RETRY_MAX_BACKOFF_S,
        deadline_s=s.ROUTER_DEADLINE_S, max_retry_after_s=s.ROUTER_MAX_RETRY_AFTER_S),
        unconfigured=rt.providers.unconfigured)
    rt.uptime = UptimeChecker(rt.providers, rt.health, rt.redis, s.UPTIME_CACHE_S, clock=rt.clock.monotonic)


def _usage_batcher(settings: Settings, engine: Any, redis_client: Any) -> UsageBatcher:
    """Group commit on the writer's own small pool (PostgreSQL), with the Redis outbox when
    Redis is configured and the local spool always."""
    if settings.embedded_database:
        writer, owns = UsageWriter(engine), False
    else:
        writer, owns = UsageWriter(dedicated_engine(settings.DATABASE_URL, settings.USAGE_WRITE_TIMEOUT_S)), True
    outbox = RedisOutbox(redis_client, settings.USAGE_OUTBOX_NAME) if redis_client is not None else None
    return UsageBatcher(writer, redis_outbox=outbox,
                        spool=SpoolOutbox(settings.USAGE_SPOOL_DIR), poll_s=settings.USAGE_OUTBOX_POLL_S,
                        partitions_ahead=settings.USAGE_PARTITIONS_AHEAD, owns_engine=owns)


def seed_from_usage(engine: Any, key_id: int, tenant_id: int, day: int, month: str) -> dict[str, int]:
    """The limiter's day/month counters rebuilt from the usage store. PostgreSQL unreachable:
    the limiter is as unable to decide as without Redis (RATE_LIMIT_FAIL_MODE applies)."""
    try:
        return period_totals(engine, key_id, tenant_id, day, month)
    except SQLAlchemyError as exc:
        log.error("limiter counters cannot be rebuilt: usage store unavailable (%s)", type(exc).__name__)
        raise LimiterUnavailable() from None


def _limiter_backend(settings: Settings, redis_client: Any, clock: Clock) -> Any:
    lease_ms = int(settings.CONCURRENCY_LEASE_S * 1000)
    if redis_client is None:
        return LocalLimiter(lease_ms, clock=lambda: epoch_seconds(clock))
    return RedisLimiter(redis_client, lease_ms, settings.REDIS_MAX_CONNECTIONS)


def _request_id_header(resp: Response) -> Response:
    rid = g.get("request_id")
    if rid:
        resp.headers["X-Request-ID"] = rid
    return resp


def _configure_logging(level: str) -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("gateway").setLevel(level.upper())


def _announce_mode(settings: Settings, n_models: int) -> None:
    db_mode = "embedded SQLite (instance/)" if settings.embedded_database else "PostgreSQL"
    limiter = ("embedded in-process limiter (REDIS_URL not set: limits hold for this process only)"
               if settings.embedded_limiter else "Redis")
    log.info("gateway ready: database=%s, limits=%s, %d models", db_mode, limiter, n_models)
    if not settings.SYSTEM_SECRET:
        log.warning("SYSTEM_SECRET is not set: the admin API answers 503")
