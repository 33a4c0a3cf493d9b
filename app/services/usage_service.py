"""Usage records: one row per completion (idempotent writes that keep the daily rollup exact),
and reading totals for `/v1/usage` from the rollup plus raw rows for partial edge days.

The background group commit and the outbox live in `usage_batcher.py`; the outbox stores in
`usage_outbox.py`; monthly partitions and retention in `usage_partitions.py`.
"""
from __future__ import annotations

import json
import logging
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from sqlalchemy import Date, case, cast, func, literal, select, union_all
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError

from app.models import UsageDaily, UsageRecord
from app.models.types import utcnow
from app.services import usage_partitions
from app.utils import db_errors
from app.utils.money import format_money

log = logging.getLogger("gateway.usage")
TABLE = UsageRecord.__table__
ROLLUP = UsageDaily.__table__


@dataclass
class UsageEvent:
    """Everything known about one request once it is over, ready to become a row.

    `created_at` is set when the request starts and never changes: with `request_id` it is
    the row's idempotency key, so it travels with the event through the outbox (as ISO 8601
    with microseconds, which PostgreSQL stores exactly)."""
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
    endpoint: str = "chat.completions"       # which API served it (chat.completions, responses, ...)
    cached_tokens: int | None = None         # prompt tokens read from the provider's cache
    cache_write_tokens: int | None = None    # prompt tokens written to it (Anthropic)
    reasoning_tokens: int | None = None      # completion tokens spent reasoning
    usage_estimated: bool = False            # tokens counted by the gateway (no usable provider usage)
    saved_cost_usd: Decimal | None = None    # a response cache hit (`cached`): what the answer cost when made

    def row(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id, "tenant_id": self.tenant_id, "api_key_id": self.api_key_id,
            "model": self.model, "provider": self.provider, "upstream_model": self.upstream_model,
            "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens, "cost_usd": self.cost_usd,
            "status": self.status, "error_type": self.error_type, "streamed": self.streamed,
            "cached": self.cached, "latency_ms": self.latency_ms, "ttft_ms": self.ttft_ms,
            "created_at": self.created_at, "endpoint": self.endpoint, "cached_tokens": self.cached_tokens,
            "cache_write_tokens": self.cache_write_tokens, "reasoning_tokens": self.reasoning_tokens,
            "usage_estimated": self.usage_estimated, "saved_cost_usd": self.saved_cost_usd,
        }

    def to_json(self) -> bytes:
        """One outbox line (no newline inside). Version 2 added `endpoint` and the token
        details, version 3 `usage_estimated`, version 4 `saved_cost_usd`; `from_json` reads older lines with their defaults."""
        return json.dumps({
            "v": 4, "request_id": self.request_id, "tenant_id": self.tenant_id,
            "api_key_id": self.api_key_id, "model": self.model, "provider": self.provider,
            "upstream_model": self.upstream_model, "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens, "cost_usd": str(self.cost_usd),
            "status": self.status, "error_type": self.error_type, "streamed": self.streamed,
            "cached": self.cached, "latency_ms": self.latency_ms, "ttft_ms": self.ttft_ms,
            "created_at": utc_iso(self.created_at),
            "endpoint": self.endpoint, "cached_tokens": self.cached_tokens,
            "cache_write_tokens": self.cache_write_tokens, "reasoning_tokens": self.reasoning_tokens,
            "usage_estimated": self.usage_estimated,
            "saved_cost_usd": str(self.saved_cost_usd) if self.saved_cost_usd is not None else None,
        }, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> "UsageEvent":
        data = json.loads(raw)
        data.pop("v", None)
        data["cost_usd"] = Decimal(data["cost_usd"])
        data["created_at"] = datetime.fromisoformat(data["created_at"])
        if data.get("saved_cost_usd") is not None:
            data["saved_cost_usd"] = Decimal(data["saved_cost_usd"])
        return cls(**data)


def utc_iso(at: datetime) -> str:
    """`at` as ISO 8601 in UTC with microseconds (exact for PostgreSQL); naive means UTC."""
    at = at.astimezone(timezone.utc) if at.tzinfo else at.replace(tzinfo=timezone.utc)
    return at.isoformat(timespec="microseconds")


# --- writing -------------------------------------------------------------------------------

_COLUMNS = [("request_id", "varchar"), ("tenant_id", "bigint"), ("api_key_id", "bigint"),
            ("model", "varchar"), ("provider", "varchar"), ("upstream_model", "varchar"),
            ("prompt_tokens", "integer"), ("completion_tokens", "integer"), ("total_tokens", "integer"),
            ("cost_usd", "numeric"), ("status", "varchar"), ("error_type", "varchar"),
            ("streamed", "boolean"), ("cached", "boolean"), ("latency_ms", "integer"),
            ("ttft_ms", "integer"), ("created_at", "timestamptz"), ("endpoint", "text"),
            ("cached_tokens", "integer"), ("cache_write_tokens", "integer"), ("reasoning_tokens", "integer"),
            ("usage_estimated", "boolean"), ("saved_cost_usd", "numeric")]
_SUMS = ("requests", "prompt_tokens", "completion_tokens", "total_tokens", "cost_usd", "cache_hits", "saved_cost_usd")

# One statement, one round trip, fixed text (psycopg prepares it once): insert the batch, skip
# rows already stored, and add to the daily rollup exactly the rows that were inserted
# (RETURNING), so that a replay or a duplicate adds nothing. Rollup rows are upserted in key
# order, so concurrent batches lock them in the same order (no deadlock). The batch travels as
# ONE parameter, a JSON array of row objects (`_json_rows`, Python's C encoder), that PostgreSQL
# expands; the 23 typed arrays it replaced, dumped element by element in Python by psycopg, took
# about twice the CPU (docs/durability.md). Money goes as decimal strings and instants as UTC
# ISO text with microseconds, so both arrive exactly.
_PG_WRITE = f"""
WITH ins AS (
  INSERT INTO usage_records ({", ".join(c for c, _ in _COLUMNS)})
  SELECT * FROM json_to_recordset(%(rows)s::json) AS r({", ".join(f"{c} {t}" for c, t in _COLUMNS)})
  ON CONFLICT (request_id, created_at) DO NOTHING
  RETURNING created_at, tenant_id, api_key_id, model, endpoint, prompt_tokens, completion_tokens,
            total_tokens, cost_usd, cached, saved_cost_usd
), up AS (
INSERT INTO usage_daily AS d (day, tenant_id, api_key_id, model, endpoint, requests, prompt_tokens,
                              completion_tokens, total_tokens, cost_usd, cache_hits, saved_cost_usd)
SELECT (created_at AT TIME ZONE 'UTC')::date, tenant_id, api_key_id, model, endpoint, count(*),
       sum(prompt_tokens), sum(completion_tokens), sum(total_tokens), sum(cost_usd),
       count(*) FILTER (WHERE cached), coalesce(sum(saved_cost_usd), 0)
FROM ins GROUP BY 1, 2, 3, 4, 5 ORDER BY 3, 1, 4, 2, 5
ON CONFLICT (api_key_id, day, model, tenant_id, endpoint) DO UPDATE SET
  requests = d.requests + EXCLUDED.requests,
  prompt_tokens = d.prompt_tokens + EXCLUDED.prompt_tokens,
  completion_tokens = d.completion_tokens + EXCLUDED.completion_tokens,
  total_tokens = d.total_tokens + EXCLUDED.total_tokens,
  cost_usd = d.cost_usd + EXCLUDED.cost_usd,
  cache_hits = d.cache_hits + EXCLUDED.cache_hits,
  saved_cost_usd = d.saved_cost_usd + EXCLUDED.saved_cost_usd
)
SELECT count(*) AS new_rows FROM ins
"""


def _json_rows(batch: list[UsageEvent]) -> str:
    """The batch as the JSON text `_PG_WRITE` expands: one object per row, keyed by column;
    None is null, money a decimal string (no float on the way), `created_at` UTC ISO text."""
    rows = []
    for e in batch:
        row = e.row()
        row["cost_usd"] = str(e.cost_usd)
        row["created_at"] = utc_iso(e.created_at)
        if e.saved_cost_usd is not None:
            row["saved_cost_usd"] = str(e.saved_cost_usd)
        rows.append(row)
    return json.dumps(rows, separators=(",", ":"))


class UsageWriter:
    """Inserts usage rows and their rollup in one statement (so one transaction), skipping rows
    already stored (idempotent replays). Creates a missing monthly partition on demand."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._postgres = engine.dialect.name == "postgresql"
        self._months_ready: set[date] = set()
        self._held: Any = None                # PostgreSQL: the pool connection this writer keeps
        self._held_lock = threading.Lock()    # the writer, the outbox replay and close() share it

    def write(self, events: list[UsageEvent]) -> int:
        """Insert the rows; returns how many were new. Raises on database errors."""
        if not events:
            return 0
        unique: dict[str, UsageEvent] = {}
        for e in events:
            unique.setdefault(e.request_id, e)  # a batch holding one request twice: the first wins
        batch = list(unique.values())
        if not self._postgres:
            return self._write_sqlite(batch)
        months = {usage_partitions.month_start(e.created_at) for e in batch}
        if not months <= self._months_ready:
            usage_partitions.ensure_partitions(self.engine, months - self._months_ready)
            self._months_ready |= months
        try:
            return self._write_pg(batch)
        except IntegrityError as exc:
            if not db_errors.is_no_partition(exc):
                raise
            # a partition dropped by retention while we believed it there: create it, retry once
            self._months_ready.clear()
            usage_partitions.ensure_partitions(self.engine, months)
            self._months_ready |= months
            return self._write_pg(batch)

    def _write_pg(self, batch: list[UsageEvent]) -> int:
        """One round trip: `_PG_WRITE` is a single statement, atomic on its own, so it runs in
        autocommit (no BEGIN and COMMIT around it), on the connection the writer keeps, which is
        not pinged before use; found dead (a database restart, a terminated backend), it is
        dropped and the batch tried once more on a new one. Replaying a batch that
        did reach the database stores nothing twice (ON CONFLICT DO NOTHING)."""
        rows = _json_rows(batch)
        try:
            return self._execute_pg(rows)
        except DBAPIError as exc:
            if not exc.connection_invalidated:
                raise
            return self._execute_pg(rows)

    def _execute_pg(self, rows: str) -> int:
        """On a connection the writer keeps checked out of its pool, in autocommit, through
        psycopg directly: no pool checkout and return, no isolation-level switch and no
        SQLAlchemy statement machinery per batch (together more than half of the writer's CPU
        per batch of one row, docs/durability.md). psycopg prepares the fixed statement after a few uses. A database error
        comes out wrapped as SQLAlchemy wraps it (the callers and `db_errors` read those);
        one that broke the connection drops it and says so (`connection_invalidated`)."""
        with self._held_lock:
            if self._held is None:
                held = self.engine.raw_connection()   # the pool's connect events ran (statement_timeout)
                try:
                    held.driver_connection.autocommit = True
                except BaseException:
                    held.invalidate()
                    raise
                self._held = held
            conn = self._held.driver_connection
            try:
                return int(conn.execute(_PG_WRITE, {"rows": rows}).fetchone()[0])
            except self.engine.dialect.loaded_dbapi.Error as exc:
                broken = bool(conn.broken or conn.closed)
                if broken:
                    # A database restart or a terminated backend: the pool's idle connections
                    # are likely dead too (it does not ping them), so they go with this one, as
                    # SQLAlchemy does on a disconnect.
                    self._drop_held()
                    self.engine.dispose()
                raise DBAPIError.instance(_PG_WRITE, None, exc, self.engine.dialect.loaded_dbapi.Error,
                                          hide_parameters=True, connection_invalidated=broken,
                                          dialect=self.engine.dialect) from exc
            except BaseException:
                self._drop_held()   # cut short mid-statement (the greenlet killed): its state is unknown
                raise

    def _drop_held(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            held.invalidate()   # closed, never returned to the pool in autocommit

    def close(self) -> None:
        """Release the connection the writer keeps (the batcher's close())."""
        with self._held_lock:
            self._drop_held()

    def _write_sqlite(self, batch: list[UsageEvent]) -> int:
        insert_row = sqlite.insert(TABLE).on_conflict_do_nothing(index_elements=["request_id"])
        groups: dict[tuple, list] = {}
        with self.engine.begin() as conn:
            for e in batch:
                if conn.execute(insert_row, e.row()).rowcount != 1:
                    continue
                day = e.created_at.astimezone(timezone.utc).date() if e.created_at.tzinfo else e.created_at.date()
                sums = groups.setdefault((day, e.tenant_id, e.api_key_id, e.model, e.endpoint),
                                         [0, 0, 0, 0, Decimal(0), 0, Decimal(0)])
                for i, v in enumerate((1, e.prompt_tokens, e.completion_tokens,
                                       e.prompt_tokens + e.completion_tokens, e.cost_usd,
                                       int(e.cached), e.saved_cost_usd or Decimal(0))):
                    sums[i] += v
            for (day, tenant, key, model, endpoint), sums in sorted(groups.items()):
                values = dict(zip(_SUMS, sums))
                stmt = sqlite.insert(ROLLUP).values(day=day, tenant_id=tenant, api_key_id=key, model=model,
                                                    endpoint=endpoint, **values)
                conn.execute(stmt.on_conflict_do_update(
                    index_elements=["api_key_id", "day", "model", "tenant_id", "endpoint"],
                    set_={c: ROLLUP.c[c] + stmt.excluded[c] for c in _SUMS}))
        return sum(g[0] for g in groups.values())


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
    group_by: str | None = None  # a name of GROUP_BY: "model" | "day" | "key" | "tenant"


def _day_expr(engine: Engine):
    col = UsageRecord.created_at
    if engine.dialect.name == "postgresql":
        return cast(func.timezone("UTC", col), Date)
    return func.date(col)


def _day_value(value: Any) -> str:
    return value.isoformat()[:10] if isinstance(value, (date, datetime)) else str(value)


# group_by name -> (raw-row expression, rollup column, JSON value, the group's field in each data
# row). A new grouping is one line.
GROUP_BY: dict[str, tuple[Any, Any, Any, str]] = {
    "model": (lambda engine: UsageRecord.model, UsageDaily.model, str, "model"),
    "day": (_day_expr, UsageDaily.day, _day_value, "day"),
    "key": (lambda engine: UsageRecord.api_key_id, UsageDaily.api_key_id, int, "api_key_id"),
    "tenant": (lambda engine: UsageRecord.tenant_id, UsageDaily.tenant_id, int, "tenant_id"),
    "endpoint": (lambda engine: UsageRecord.endpoint, UsageDaily.endpoint, str, "endpoint"),
}


def _midnight(d: date) -> datetime:
    return datetime(d.year, d.month, d.day, tzinfo=timezone.utc)


def split_period(start: datetime, end: datetime) -> tuple[tuple[date, date] | None, list[tuple[datetime, datetime]]]:
    """[start, end) as whole UTC days [first_day, last_day) for the rollup, and the partial
    edges before and after them for the raw rows. No whole day inside: one raw range."""
    start, end = start.astimezone(timezone.utc), end.astimezone(timezone.utc)
    first = start.date() if start == _midnight(start.date()) else start.date() + timedelta(days=1)
    last = end.date()
    if first >= last:
        return None, [(start, end)]
    edges = []
    if start < _midnight(first):
        edges.append((start, _midnight(first)))
    if _midnight(last) < end:
        edges.append((_midnight(last), end))
    return (first, last), edges


def _aggregates(table: Any, rows: Any) -> list[Any]:
    return [rows.label("requests"),
            func.coalesce(func.sum(table.prompt_tokens), 0).label("prompt_tokens"),
            func.coalesce(func.sum(table.completion_tokens), 0).label("completion_tokens"),
            func.coalesce(func.sum(table.total_tokens), 0).label("total_tokens"),
            func.coalesce(func.sum(table.cost_usd), 0).label("cost_usd"),
            (func.coalesce(func.sum(table.cache_hits), 0) if table is UsageDaily else
             func.coalesce(func.sum(case((table.cached, 1), else_=0)), 0)).label("cache_hits"),
            func.coalesce(func.sum(table.saved_cost_usd), 0).label("saved_cost_usd")]


def _filters(table: Any, q: UsageQuery) -> list[Any]:
    conditions = []
    if q.api_key_id is not None:
        conditions.append(table.api_key_id == q.api_key_id)
    if q.tenant_id is not None:
        conditions.append(table.tenant_id == q.tenant_id)
    if q.model:
        conditions.append(table.model == q.model)
    return conditions


def _grouped_sums(conn: Connection, q: UsageQuery) -> dict[Any, list]:
    """{group value (None without group_by): [requests, prompt, completion, total, cost]},
    read in one round trip: the rollup for whole days UNION ALL the raw rows of the edges."""
    engine = conn.engine
    whole, edges = split_period(q.start, q.end)
    raw_group, rollup_group = (GROUP_BY[q.group_by][0](engine), GROUP_BY[q.group_by][1]) \
        if q.group_by else (literal(None), literal(None))
    parts = []
    if whole is not None:
        stmt = select(rollup_group.label("g"), *_aggregates(UsageDaily, func.coalesce(
            func.sum(UsageDaily.requests), 0))).where(
            UsageDaily.day >= whole[0], UsageDaily.day < whole[1], *_filters(UsageDaily, q))
        parts.append(stmt.group_by(rollup_group) if q.group_by else stmt)
    for lo, hi in edges:
        stmt = select(raw_group.label("g"), *_aggregates(UsageRecord, func.count())).where(
            UsageRecord.created_at >= _db_time(engine, lo), UsageRecord.created_at < _db_time(engine, hi),
            *_filters(UsageRecord, q))
        parts.append(stmt.group_by(raw_group) if q.group_by else stmt)
    sums: dict[Any, list] = defaultdict(lambda: [0, 0, 0, 0, Decimal(0), 0, Decimal(0)])
    for row in conn.execute(union_all(*parts) if len(parts) > 1 else parts[0]):
        if not row.requests:
            continue
        acc = sums[row.g]
        acc[0] += int(row.requests)
        acc[1] += int(row.prompt_tokens)
        acc[2] += int(row.completion_tokens)
        acc[3] += int(row.total_tokens)
        acc[4] += Decimal(row.cost_usd or 0)
        acc[5] += int(row.cache_hits or 0)
        acc[6] += Decimal(row.saved_cost_usd or 0)
    return sums


def _totals(sums: list) -> dict[str, Any]:
    return {"requests": sums[0], "prompt_tokens": sums[1], "completion_tokens": sums[2],
            "total_tokens": sums[3], "cost_usd": format_money(sums[4]),
            "cache_hits": sums[5], "saved_cost_usd": format_money(sums[6])}


def query_usage(engine: Engine, q: UsageQuery) -> dict[str, Any]:
    with engine.connect() as conn:
        groups = _grouped_sums(conn, q)
    total = [0, 0, 0, 0, Decimal(0), 0, Decimal(0)]
    for sums in groups.values():
        total = [a + b for a, b in zip(total, sums)]
    data: list[dict[str, Any]] = []
    if q.group_by:
        as_json, field = GROUP_BY[q.group_by][2:]
        for group in sorted(groups, key=lambda g: (g is None, g)):
            data.append({field: as_json(group), **_totals(groups[group])})
    return {"object": "usage", "start": _iso(q.start), "end": _iso(q.end), **_totals(total), "data": data}


def _db_time(engine: Engine, value: datetime) -> datetime:
    """SQLite compares datetimes as text: give it naive UTC like the stored values."""
    value = value.astimezone(timezone.utc)
    return value.replace(tzinfo=None) if engine.dialect.name == "sqlite" else value


def _iso(value: datetime) -> str:
    return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def period_totals(engine: Engine, key_id: int, tenant_id: int, day: int, month: str) -> dict[str, int]:
    """What the limiter's day and month counters should hold, rebuilt from the usage store:
    the key's tokens on UTC day `day` (days since 1970-01-01), and the key's and the tenant's
    spend in `month` ("YYYYMM"), in nano-dollars rounded up. Whole days and months: read from
    the daily rollup only."""
    from app.services.rate_limit_service import to_nano

    day_start = datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(days=day)
    month_start = datetime(int(month[:4]), int(month[4:]), 1, tzinfo=timezone.utc)
    month_end = (month_start + timedelta(days=32)).replace(day=1)
    with engine.connect() as conn:
        day_sums = _grouped_sums(conn, UsageQuery(day_start, day_start + timedelta(days=1), api_key_id=key_id))
        key_sums = _grouped_sums(conn, UsageQuery(month_start, month_end, api_key_id=key_id))
        tenant_sums = _grouped_sums(conn, UsageQuery(month_start, month_end, tenant_id=tenant_id))

    def only(sums: dict[Any, list], i: int) -> Any:
        return sums[None][i] if None in sums else 0
    return {"day": int(only(day_sums, 3)), "key_spend": to_nano(Decimal(only(key_sums, 4))),
            "tenant_spend": to_nano(Decimal(only(tenant_sums, 4)))}
