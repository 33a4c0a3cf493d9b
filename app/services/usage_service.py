"""Usage records: writing one row per completion, and reading totals for `/v1/usage`."""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from sqlalchemy import Date, cast, func, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine

from app.models import UsageRecord
from app.models.types import utcnow
from app.utils.money import format_money

log = logging.getLogger("gateway.usage")
TABLE = UsageRecord.__table__


@dataclass
class UsageEvent:
    """Everything known about one request once it is over, ready to become a row."""
    request_id: str
    tenant_id: int
    api_key_id: int
    model: str
    provider: str | None = None
    upstream_model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: Decimal = Decimal(0)
    status: str = "ok"
    error_type: str | None = None
    streamed: bool = False
    cached: bool = False
    latency_ms: int | None = None
    ttft_ms: int | None = None
    created_at: datetime = field(default_factory=utcnow)

    def row(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id, "tenant_id": self.tenant_id, "api_key_id": self.api_key_id,
            "model": self.model, "provider": self.provider, "upstream_model": self.upstream_model,
            "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens, "cost_usd": self.cost_usd,
            "status": self.status, "error_type": self.error_type, "streamed": self.streamed,
            "cached": self.cached, "latency_ms": self.latency_ms, "ttft_ms": self.ttft_ms,
            "created_at": self.created_at,
        }


def _insert_ignoring_duplicates(engine: Engine):
    """INSERT ... ON CONFLICT (request_id) DO NOTHING: a replayed record is never billed twice."""
    if engine.dialect.name == "postgresql":
        return postgresql.insert(TABLE).on_conflict_do_nothing(index_elements=["request_id"])
    if engine.dialect.name == "sqlite":
        return sqlite.insert(TABLE).on_conflict_do_nothing(index_elements=["request_id"])
    return insert(TABLE)


class UsageWriter:
    """Inserts usage rows, skipping request ids already stored (idempotent replays)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._postgres = engine.dialect.name == "postgresql"
        columns = [c.name for c in TABLE.columns if c.name != "id"]
        # PostgreSQL: one fixed statement through psycopg's executemany (pipelined, parsed once).
        # SQLAlchemy's multi-VALUES rewriting produced a new statement text per batch size,
        # which psycopg re-parsed every time: 15% of a worker's CPU in profiles.
        self._pg_sql = (f"INSERT INTO {TABLE.name} ({', '.join(columns)}) VALUES "
                        f"({', '.join(f'%({c})s' for c in columns)}) ON CONFLICT (request_id) DO NOTHING")
        self._stmt = _insert_ignoring_duplicates(engine)

    def write(self, events: list[UsageEvent]) -> int:
        """Insert the rows; returns how many were new. Raises on database errors."""
        if not events:
            return 0
        rows = [e.row() for e in events]
        with self.engine.begin() as conn:
            if self._postgres:
                result = conn.exec_driver_sql(self._pg_sql, rows)
            else:
                result = conn.execute(self._stmt, rows)
            return max(result.rowcount, 0)


class UsageBatcher:
    """Writes usage rows in the background, in batches, so that no request waits for a commit.

    `submit` only appends to a queue; one writer thread (a greenlet under gevent) drains it,
    inserting everything queued so far in one statement ("group commit": no timer, batches grow
    by themselves under load). A failed write keeps the rows queued and retries with backoff;
    the insert ignores request ids already stored, so a retry never bills twice. Rows wait in
    this worker's memory only while PostgreSQL is unreachable or while one insert runs.
    """

    MAX_BATCH = 500
    MAX_QUEUED = 200_000

    def __init__(self, writer: UsageWriter) -> None:
        self.writer = writer
        self._queue: deque[UsageEvent] = deque()
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.failures = 0

    @property
    def depth(self) -> int:
        return len(self._queue)

    def submit(self, event: UsageEvent) -> None:
        if len(self._queue) >= self.MAX_QUEUED:
            log.error("usage queue full (%d rows): writing %s synchronously", self.MAX_QUEUED, event.request_id)
            self.writer.write([event])
            return
        self._queue.append(event)
        self._idle.clear()
        self._wake.set()
        if self._thread is None or not self._thread.is_alive():
            self._start()

    def _start(self) -> None:
        # Started lazily, in the process (and under the gevent hub) that serves requests.
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="usage-writer", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        backoff = 0.2
        while True:
            self._wake.wait()
            self._wake.clear()
            while self._queue:
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), self.MAX_BATCH))]
                try:
                    self.writer.write(batch)
                    backoff = 0.2
                except Exception as exc:
                    self.failures += 1
                    self._queue.extendleft(reversed(batch))
                    log.error("usage write failed (%s); %d rows kept queued, retrying in %.1fs",
                              type(exc).__name__, len(self._queue), backoff)
                    time.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
            if not self._queue:
                self._idle.set()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued is written (shutdown, tests). True when empty."""
        if self._queue and (self._thread is None or not self._thread.is_alive()):
            self._start()
        self._wake.set()
        return self._idle.wait(timeout) and not self._queue


# --- reading -------------------------------------------------------------------------------

def month_bounds(now: datetime | None = None) -> tuple[datetime, datetime]:
    now = now or utcnow()
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = (start + timedelta(days=32)).replace(day=1)
    return start, end


@dataclass
class UsageQuery:
    start: datetime
    end: datetime
    api_key_id: int | None = None
    tenant_id: int | None = None
    model: str | None = None
    group_by: str | None = None  # "model" | "day" | "key" | "tenant"


# group_by -> (the label of the group in each data row, the column it groups on)
GROUPS = {"model": ("model", lambda engine: UsageRecord.model),
          "day": ("day", lambda engine: _day_expr(engine)),
          "key": ("api_key_id", lambda engine: UsageRecord.api_key_id),
          "tenant": ("tenant_id", lambda engine: UsageRecord.tenant_id)}


def _day_expr(engine: Engine):
    col = UsageRecord.created_at
    if engine.dialect.name == "postgresql":
        return cast(func.timezone("UTC", col), Date)
    return func.date(col)


def _totals(row: Any) -> dict[str, Any]:
    cost = Decimal(row.cost_usd or 0)
    return {
        "requests": int(row.requests or 0),
        "prompt_tokens": int(row.prompt_tokens or 0),
        "completion_tokens": int(row.completion_tokens or 0),
        "total_tokens": int(row.total_tokens or 0),
        "cost_usd": format_money(cost),
    }


def query_usage(engine: Engine, q: UsageQuery) -> dict[str, Any]:
    aggregates = [
        func.count().label("requests"),
        func.coalesce(func.sum(UsageRecord.prompt_tokens), 0).label("prompt_tokens"),
        func.coalesce(func.sum(UsageRecord.completion_tokens), 0).label("completion_tokens"),
        func.coalesce(func.sum(UsageRecord.total_tokens), 0).label("total_tokens"),
        func.coalesce(func.sum(UsageRecord.cost_usd), 0).label("cost_usd"),
    ]
    start, end = _db_time(engine, q.start), _db_time(engine, q.end)
    conditions = [UsageRecord.created_at >= start, UsageRecord.created_at < end]
    if q.api_key_id is not None:
        conditions.append(UsageRecord.api_key_id == q.api_key_id)
    if q.tenant_id is not None:
        conditions.append(UsageRecord.tenant_id == q.tenant_id)
    if q.model:
        conditions.append(UsageRecord.model == q.model)
    with engine.connect() as conn:
        total = conn.execute(select(*aggregates).where(*conditions)).one()
        data: list[dict[str, Any]] = []
        if q.group_by:
            label, column = GROUPS[q.group_by]
            key = column(engine)
            rows = conn.execute(select(key.label("group"), *aggregates).where(*conditions)
                                .group_by(key).order_by(key))
            for row in rows:
                group = row.group
                if isinstance(group, (date, datetime)):
                    group = group.isoformat()[:10]
                data.append({label: group if isinstance(group, int) else str(group), **_totals(row)})
    return {"object": "usage", "start": _iso(q.start), "end": _iso(q.end), **_totals(total), "data": data}


def _db_time(engine: Engine, value: datetime) -> datetime:
    """SQLite compares datetimes as text: give it naive UTC like the stored values."""
    value = value.astimezone(timezone.utc)
    return value.replace(tzinfo=None) if engine.dialect.name == "sqlite" else value


def _iso(value: datetime) -> str:
    return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def period_totals(engine: Engine, key_id: int, tenant_id: int, day: int, month: str) -> dict[str, int]:
    """What the limiter's day and month counters should hold, rebuilt from the usage rows:
    the key's tokens on UTC day `day` (days since 1970-01-01), and the key's and the tenant's
    spend in `month` ("YYYYMM"), in nano-dollars rounded up."""
    from app.services.rate_limit_service import to_nano

    day_start = datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(days=day)
    month_start = datetime(int(month[:4]), int(month[4:]), 1, tzinfo=timezone.utc)
    month_end = (month_start + timedelta(days=32)).replace(day=1)
    col = UsageRecord
    with engine.connect() as conn:
        day_tokens = conn.execute(select(func.coalesce(func.sum(col.total_tokens), 0)).where(
            col.api_key_id == key_id, col.created_at >= _db_time(engine, day_start),
            col.created_at < _db_time(engine, day_start + timedelta(days=1)))).scalar()
        key_spend = conn.execute(select(func.coalesce(func.sum(col.cost_usd), 0)).where(
            col.api_key_id == key_id, col.created_at >= _db_time(engine, month_start),
            col.created_at < _db_time(engine, month_end))).scalar()
        tenant_spend = conn.execute(select(func.coalesce(func.sum(col.cost_usd), 0)).where(
            col.tenant_id == tenant_id, col.created_at >= _db_time(engine, month_start),
            col.created_at < _db_time(engine, month_end))).scalar()
    return {"day": int(day_tokens or 0), "key_spend": to_nano(Decimal(key_spend or 0)),
            "tenant_spend": to_nano(Decimal(tenant_spend or 0))}
