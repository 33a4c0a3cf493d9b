"""Every setting of the gateway, read from the environment (and `.env`) in one place.

The names here are part of the product's interface; `.env.example` documents each one.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

ROOT_DIR = Path(__file__).resolve().parent.parent
DEFAULT_SQLITE_PATH = ROOT_DIR / "instance" / "gateway.db"


def normalize_database_url(url: str) -> str:
    """Accept `postgres://`, `postgresql://` and `postgresql+psycopg://`; always drive psycopg 3."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from exc


def _env_float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be a number, got {raw!r}") from exc


@dataclass
class Settings:
    """Typed settings. Build with `Settings.from_env()`; tests pass overrides to `create_app`."""

    DATABASE_URL: str = f"sqlite:///{DEFAULT_SQLITE_PATH}"
    REDIS_URL: str = ""
    # REDIS_URL names a Redis Cluster node (also implied by a `redis+cluster://` URL).
    REDIS_CLUSTER: bool = False
    # A PostgreSQL streaming replica for read-only queries (usage reports and exports); empty:
    # they go to DATABASE_URL. Writes never go there.
    DATABASE_READ_URL: str = ""
    SYSTEM_SECRET: str = ""
    MODELS_FILE: str = str(ROOT_DIR / "data" / "models.json")
    CORS_ORIGINS: str = "*"
    MAX_REQUEST_BYTES: int = 4 * 1024 * 1024
    LOG_LEVEL: str = "INFO"
    # Per-worker cache of key lookups. Key and tenant changes invalidate it on every worker
    # through Redis pub/sub on this channel (within milliseconds); the TTL is the backstop.
    AUTH_CACHE_TTL_S: float = 5.0
    # A known key's entry past its TTL is still served this much longer while one request of the
    # worker looks it up again (the others do not query); past it, requests wait for a lookup.
    # Never for an entry a key or tenant change invalidated. 0: every request past the TTL waits.
    AUTH_CACHE_STALE_S: float = 5.0
    KEY_EVENTS_CHANNEL: str = "gateway:key-events"
    # `last_used_at` is written at most this often per key (never on every request).
    LAST_USED_WRITE_INTERVAL_S: float = 60.0
    DB_POOL_SIZE: int = 20
    DB_MAX_OVERFLOW: int = 20
    REDIS_MAX_CONNECTIONS: int = 64
    # Default per-provider timeouts when models.json does not give them.
    UPSTREAM_CONNECT_TIMEOUT_S: float = 10.0
    UPSTREAM_READ_TIMEOUT_S: float = 600.0
    UPSTREAM_POOL_MAXSIZE: int = 64
    # Whole upstream call (stream included) when a provider sets no total_timeout_s.
    UPSTREAM_TOTAL_TIMEOUT_S: float = 900.0
    # Routing and retries (app/services/router.py, retry_policy.py): upstream calls per request
    # (all deployments together), calls per deployment (1 = never retry the same one), full-jitter
    # backoff base and cap, the total deadline after which no new attempt starts, and the longest
    # upstream Retry-After that is waited for (longer: the next deployment is tried instead).
    ROUTER_MAX_ATTEMPTS: int = 6
    ROUTER_ATTEMPTS_PER_DEPLOYMENT: int = 2
    ROUTER_RETRY_BASE_S: float = 0.25
    ROUTER_RETRY_MAX_BACKOFF_S: float = 4.0
    ROUTER_DEADLINE_S: float = 30.0
    ROUTER_MAX_RETRY_AFTER_S: float = 10.0
    # Circuit breaker per deployment and worker (app/services/circuit_breaker.py).
    BREAKER_FAILURE_THRESHOLD: int = 5
    BREAKER_FAILURE_RATIO: float = 0.5
    BREAKER_WINDOW: int = 20
    BREAKER_MIN_REQUESTS: int = 10
    BREAKER_COOLDOWN_S: float = 30.0
    # GET /v1/uptime/<model> answers from a cache this long (probes cost upstream calls).
    UPTIME_CACHE_S: float = 5.0
    # Workers publish their view of each deployment to Redis this often, for
    # GET /v1/providers/status (0: no sharing, each worker reports its own view).
    HEALTH_PUBLISH_INTERVAL_S: float = 2.0
    # A comment line is sent to streaming clients when the upstream is silent this long.
    STREAM_KEEPALIVE_S: float = 15.0
    # Back-pressure: at most this many bytes of one upstream stream are read ahead of what the
    # client has taken (a client that stops reading stops the upstream read at this point).
    STREAM_BUFFER_BYTES: int = 1024 * 1024
    # A streaming client that takes nothing for this long is given up (its connection is
    # closed, the run settles as client_disconnected). 0: no deadline.
    STREAM_CLIENT_IDLE_S: float = 60.0
    # After a client hang-up, the upstream is still read (text discarded) this long for the
    # provider's usage; without it by then the gateway counts the tokens (row marked estimated).
    STREAM_USAGE_GRACE_S: float = 5.0
    # Redis down: "closed" answers 503, "open" admits without limits (logged and counted).
    RATE_LIMIT_FAIL_MODE: str = "closed"
    # Window of the deployments' provider quotas (`rpm`/`tpm` in data/models.json count
    # requests/tokens per this many seconds). 60 in production; tests shorten it.
    DEPLOYMENT_QUOTA_WINDOW_S: float = 60.0
    # POST /api/chat without "model": this alias (empty: the category alias `auto`).
    API_CHAT_DEFAULT_MODEL: str = ""
    # A concurrency slot is a lease that expires after this long even if never released
    # (a killed worker cannot leak slots). Longer than your longest stream.
    CONCURRENCY_LEASE_S: float = 600.0
    # Usage rows PostgreSQL cannot take go to the outbox: the Redis list when Redis answers, else
    # append-only files in this directory (local disk; fsync'ed). Every worker replays both.
    USAGE_SPOOL_DIR: str = str(ROOT_DIR / "instance" / "usage-spool")
    # The Redis outbox is the list gw:{<name>}:outbox; deployments sharing one Redis need
    # different names (each replays into its own database).
    USAGE_OUTBOX_NAME: str = "usage"
    # How often each worker's flusher probes PostgreSQL and replays the outbox (seconds).
    USAGE_OUTBOX_POLL_S: float = 1.0
    # Bound on the usage writer's connect and statement time: past it, rows go to the outbox.
    USAGE_WRITE_TIMEOUT_S: float = 5.0
    # Before each batch the usage writer waits this long for more rows to join it (one statement
    # for many rows instead of one or a few each; 0: write at once).
    USAGE_BATCH_LINGER_S: float = 0.01
    # Monthly partitions of usage_records created ahead (this month + N) at worker start.
    USAGE_PARTITIONS_AHEAD: int = 2
    # Default of `db_manager prune-usage` when --older-than is not given (days; 0 = keep all).
    USAGE_RETENTION_DAYS: int = 0
    # Stored Responses API answers (`store: true`) older than this many days are deleted by
    # `db_manager maintain` and `db_manager prune-responses` (0 = keep all).
    RESPONSES_RETENTION_DAYS: int = 30
    # Hostile and careless clients (docs/security.md). Reading a request body: it must be
    # complete within REQUEST_BODY_TIMEOUT_S plus one second per REQUEST_BODY_MIN_RATE bytes
    # received (else 408 and the connection is closed), like Apache's mod_reqtimeout.
    REQUEST_BODY_TIMEOUT_S: float = 20.0
    REQUEST_BODY_MIN_RATE: int = 500
    # Requests in progress per client address and worker process (past it: 429 and close; 0: no cap).
    MAX_CONNECTIONS_PER_CLIENT: int = 500
    # Reverse proxies whose X-Forwarded-For names the client (comma-separated addresses or
    # networks, e.g. "127.0.0.1,10.0.0.0/8"). Empty: the peer's address is the client's.
    TRUSTED_PROXIES: str = ""
    # Failed key or system-secret attempts per client address and window before 429 (0: no limit).
    AUTH_FAILURE_LIMIT: int = 20
    AUTH_FAILURE_WINDOW_S: float = 60.0
    # An unknown key is remembered as unknown this long per worker (no database lookup meanwhile).
    AUTH_NEGATIVE_CACHE_TTL_S: float = 30.0
    # A key over its requests/min or concurrency limit is refused before its prompt is counted
    # when the body is at least this large (one extra limiter round trip; 0: always).
    ADMISSION_PRECHECK_BYTES: int = 4096
    # The exact response cache (docs/cache.md). Whether a request uses it when neither the request
    # (X-Gateway-Cache), its key nor its model (`cache` in data/models.json) says; how long an
    # answer stays; the temperature above which answers are cached only when the request asks
    # (absent temperature counts as 1.0); the largest answer stored (bytes of JSON); in embedded
    # mode (no Redis) the number of answers kept in each process (least recently used dropped).
    RESPONSE_CACHE_DEFAULT: bool = False
    RESPONSE_CACHE_TTL_S: float = 3600.0
    RESPONSE_CACHE_MAX_TEMPERATURE: float = 1.0
    RESPONSE_CACHE_MAX_ENTRY_BYTES: int = 256 * 1024
    RESPONSE_CACHE_MEMORY_ENTRIES: int = 1000
    RESPONSE_CACHE_HOT_ENTRIES: int = 1000     # per worker, with Redis: copies of recently used entries
    RESPONSE_CACHE_HOT_TTL_S: float = 5.0      # the longest a copy is served without asking Redis
    # Content-Security-Policy of HTML responses (a response that sets its own keeps it).
    CONTENT_SECURITY_POLICY: str = ("default-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
                                    "form-action 'self'; object-src 'none'")
    REFERRER_POLICY: str = "no-referrer"
    # Observability (docs/metrics.md). GET /metrics (Prometheus) and GET /api/metrics (JSON):
    # 0 turns the figures off (nothing observed, both answer 404).
    METRICS_ENABLED: bool = True
    # Empty: anyone may read /metrics and /api/metrics. Set: `Authorization: Bearer <token>`
    # (or the system secret in X-System-Secret) is required.
    METRICS_TOKEN: str = ""
    # Token and cost counters labelled by tenant id / by key id too (one series per tenant or key).
    METRICS_TENANT_LABELS: bool = False
    METRICS_KEY_LABELS: bool = False
    # Log lines as text (a terminal) or one JSON object per line (log collectors).
    LOG_FORMAT: str = "text"
    # One log line per model request (completion, refusal) and per error answer, logger gateway.requests.
    REQUEST_LOG: bool = True
    # Overrides of third-party internals (app/overrides.py, docs/overrides.md). Each is used only
    # when the installed library is the version it was written for; 0 switches it off.
    OVERRIDE_TIKTOKEN_LOADER: bool = True      # tiktoken encodings from data/tokenizers/
    OVERRIDE_REDIS_POOL_BYPASS: bool = True    # the limiter's own Redis connection free list
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env
        s = cls()
        for f in fields(cls):
            if f.name == "extra" or f.name not in env:
                continue
            default = getattr(s, f.name)
            if isinstance(default, bool):
                setattr(s, f.name, env[f.name].strip().lower() in ("1", "true", "yes", "on"))
            elif isinstance(default, int):
                setattr(s, f.name, _env_int(env, f.name, default))
            elif isinstance(default, float):
                setattr(s, f.name, _env_float(env, f.name, default))
            elif env[f.name].strip():
                setattr(s, f.name, env[f.name].strip())
        s.DATABASE_URL = normalize_database_url(s.DATABASE_URL)
        s.DATABASE_READ_URL = normalize_database_url(s.DATABASE_READ_URL)
        if s.ROUTER_MAX_ATTEMPTS < 1 or s.ROUTER_ATTEMPTS_PER_DEPLOYMENT < 1:
            raise ValueError("ROUTER_MAX_ATTEMPTS and ROUTER_ATTEMPTS_PER_DEPLOYMENT must be at least 1")
        if s.REQUEST_BODY_TIMEOUT_S <= 0 or s.REQUEST_BODY_MIN_RATE < 0:
            raise ValueError("REQUEST_BODY_TIMEOUT_S must be positive and REQUEST_BODY_MIN_RATE not negative")
        if (s.RESPONSE_CACHE_TTL_S <= 0 or s.RESPONSE_CACHE_MAX_ENTRY_BYTES < 0 or s.RESPONSE_CACHE_MEMORY_ENTRIES < 0
                or s.RESPONSE_CACHE_HOT_ENTRIES < 0 or s.RESPONSE_CACHE_HOT_TTL_S < 0):
            raise ValueError("RESPONSE_CACHE_TTL_S must be positive, RESPONSE_CACHE_MAX_ENTRY_BYTES, "
                             "RESPONSE_CACHE_MEMORY_ENTRIES and RESPONSE_CACHE_HOT_* not negative")
        if s.LOG_FORMAT not in ("text", "json"):
            raise ValueError(f"LOG_FORMAT must be 'text' or 'json', got {s.LOG_FORMAT!r}")
        if s.RATE_LIMIT_FAIL_MODE not in ("closed", "open"):
            raise ValueError(f"RATE_LIMIT_FAIL_MODE must be 'closed' or 'open', got {s.RATE_LIMIT_FAIL_MODE!r}")
        return s

    @property
    def embedded_database(self) -> bool:
        return self.DATABASE_URL.startswith("sqlite")

    @property
    def embedded_limiter(self) -> bool:
        return not self.REDIS_URL

    def to_flask(self) -> dict[str, Any]:
        """The Flask config mapping (upper-case keys) plus what Flask-SQLAlchemy expects."""
        cfg = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        cfg.update(self.extra)
        cfg["SQLALCHEMY_DATABASE_URI"] = self.DATABASE_URL
        cfg["SQLALCHEMY_ENGINE_OPTIONS"] = engine_options(self)
        cfg["MAX_CONTENT_LENGTH"] = self.MAX_REQUEST_BYTES
        cfg["JSON_SORT_KEYS"] = False
        return cfg


def engine_options(settings: Settings) -> dict[str, Any]:
    if settings.embedded_database:
        # One file, many threads of the dev server: wait for the lock instead of failing.
        return {"connect_args": {"check_same_thread": False, "timeout": 30}}
    return {
        "pool_size": settings.DB_POOL_SIZE,
        "max_overflow": settings.DB_MAX_OVERFLOW,
        "pool_timeout": 10,
        "pool_recycle": 1800,
        # A pooled connection is checked (one round trip) before use: after a PostgreSQL restart
        # or failover a dead connection is replaced instead of failing the request.
        "pool_pre_ping": True,
        "connect_args": {"connect_timeout": 5},
    }


def load_dotenv_once() -> None:
    """Read `.env` at the repository root (never overriding the real environment)."""
    try:
        from dotenv import load_dotenv
    except ImportError:  # pragma: no cover - python-dotenv is in requirements.txt
        return
    load_dotenv(ROOT_DIR / ".env", override=False)
