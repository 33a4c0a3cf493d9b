"""The latest requests, one usage row each, newest first, with cursor paging (`GET /v1/requests`).

A cursor names the last row of the previous page by (created_at, request_id), the usage
table's own key, so a page is one index range scan ("this key's / tenant's rows before that
moment") however deep the reader pages, and rows written meanwhile never shift a page.
"""
from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import select, true, tuple_
from sqlalchemy.engine import Engine

from app.models import ApiKey, Tenant, UsageRecord
from app.models.types import as_utc
from app.utils.money import format_money


class BadCursor(ValueError):
    """The cursor was not made by this endpoint."""


def encode_cursor(created_at: datetime, request_id: str) -> str:
    raw = f"{as_utc(created_at).isoformat(timespec='microseconds')}|{request_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        moment, request_id = raw.split("|", 1)
        created = datetime.fromisoformat(moment)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise BadCursor(cursor) from None
    if created.tzinfo is None or not request_id:
        raise BadCursor(cursor)
    return created.astimezone(timezone.utc), request_id


@dataclass
class RequestQuery:
    limit: int = 20
    cursor: str | None = None
    api_key_id: int | None = None
    tenant_id: int | None = None
    model: str | None = None
    endpoint: str | None = None
    status: str | None = None
    request_id: str | None = None
    start: datetime | None = None
    end: datetime | None = None


def _matching(q: RequestQuery, sqlite: bool, tenant_id: Any = None) -> Any:
    """The usage rows of the query, newest first, one page and one more (to tell `has_more`).
    `tenant_id` (a value or a correlated column) overrides the query's tenant."""
    r = UsageRecord
    columns = [r.request_id, r.created_at, r.api_key_id, r.tenant_id, r.model, r.endpoint, r.provider, r.status,
               r.error_type, r.streamed, r.prompt_tokens, r.completion_tokens, r.total_tokens, r.cost_usd,
               r.latency_ms, r.ttft_ms, r.cached, r.saved_cost_usd]
    stmt = select(*columns).order_by(r.created_at.desc(), r.request_id.desc()).limit(q.limit + 1)
    for column, value in ((r.api_key_id, q.api_key_id), (r.tenant_id, q.tenant_id if tenant_id is None else tenant_id),
                          (r.model, q.model), (r.endpoint, q.endpoint), (r.status, q.status),
                          (r.request_id, q.request_id)):
        if value is not None:
            stmt = stmt.where(column == value)
    if q.start is not None:
        stmt = stmt.where(r.created_at >= _db_time(q.start, sqlite))
    if q.end is not None:
        stmt = stmt.where(r.created_at < _db_time(q.end, sqlite))
    if q.cursor is not None:
        created, request_id = decode_cursor(q.cursor)
        stmt = stmt.where(tuple_(r.created_at, r.request_id) < tuple_(_db_time(created, sqlite), request_id))
    return stmt


def list_requests(engine: Engine, q: RequestQuery) -> dict[str, Any]:
    """One page: {"object": "list", "data": [...], "has_more", "next_cursor"}.

    A key's or a tenant's rows are one range scan of its (id, created_at) index. Everyone's rows
    (the system secret without a filter) have no such index: on PostgreSQL they are read as the
    newest page of each tenant (one index range scan per tenant, LATERAL) merged, instead of
    sorting the whole table (1 s for a million rows)."""
    sqlite = engine.dialect.name == "sqlite"
    if q.api_key_id is None and q.tenant_id is None and not sqlite:
        per_tenant = _matching(q, sqlite, tenant_id=Tenant.id).lateral("per_tenant")
        rows = select(per_tenant).select_from(Tenant).join(per_tenant, true())
    else:
        rows = _matching(q, sqlite).subquery("matching")
        rows = select(rows)
    page_rows = rows.subquery("page")
    stmt = (select(page_rows, ApiKey.name.label("api_key_name"), Tenant.name.label("tenant_name"))
            .outerjoin(ApiKey, ApiKey.id == page_rows.c.api_key_id)
            .outerjoin(Tenant, Tenant.id == page_rows.c.tenant_id)
            .order_by(page_rows.c.created_at.desc(), page_rows.c.request_id.desc()).limit(q.limit + 1))
    with engine.connect() as conn:
        found = conn.execute(stmt).all()
    page = found[:q.limit]
    data = [_row(row) for row in page]
    has_more = len(found) > q.limit
    return {"object": "list", "data": data, "has_more": has_more,
            "next_cursor": encode_cursor(page[-1].created_at, page[-1].request_id) if has_more else None}


def _db_time(value: datetime, sqlite: bool) -> datetime:
    value = value.astimezone(timezone.utc)
    return value.replace(tzinfo=None) if sqlite else value


def _row(row: Any) -> dict[str, Any]:
    created = as_utc(row.created_at)
    return {
        "object": "request", "request_id": row.request_id,
        "created_at": created.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "model": row.model, "endpoint": row.endpoint, "provider": row.provider,
        "status": row.status, "error_type": row.error_type, "streamed": row.streamed,
        "prompt_tokens": row.prompt_tokens, "completion_tokens": row.completion_tokens,
        "total_tokens": row.total_tokens, "cost_usd": format_money(row.cost_usd),
        "latency_ms": row.latency_ms, "ttft_ms": row.ttft_ms, "cache_hit": bool(row.cached),
        "saved_cost_usd": format_money(row.saved_cost_usd) if row.saved_cost_usd is not None else None,
        "api_key_id": row.api_key_id, "api_key_name": row.api_key_name,
        "tenant_id": row.tenant_id, "tenant_name": row.tenant_name,
    }
