"""GET/POST /v1/usage: totals and groupings of the usage rows the caller may see, as JSON or CSV.

Scope: a member key sees its own rows; a tenant admin key its tenant's (or one of its keys',
with `api_key_id`); the system secret everyone's (or one tenant's with `tenant`, one key's with
`api_key_id`). A tenant or key the caller may not see is answered like one that does not exist.
"""
from __future__ import annotations

import csv
import io
from datetime import datetime
from typing import Any

from flask import Response, current_app, request
from sqlalchemy import select

from app.api.auth import caller
from app.api.common import json_response, read_optional_json_object
from app.api.scope import usage_scope
from app.api.schemas import USAGE_QUERY_SCHEMA
from app.errors import InvalidRequest
from app.extensions import db
from app.models import ApiKey, Tenant
from app.runtime import runtime
from app.services import read_replica, usage_service

# The CSV's figures: the JSON's, in its order (response cache hits and the cost they saved last).
TOTAL_COLUMNS = ("requests", "prompt_tokens", "completion_tokens", "total_tokens", "cost_usd", "cache_hits",
                 "saved_cost_usd")
GROUP_COLUMNS = {"model": ("model",), "day": ("day",), "key": ("api_key_id", "api_key_name"),
                 "tenant": ("tenant_id", "tenant_name"), "endpoint": ("endpoint",)}


def usage() -> Response:
    rt = runtime()
    actor = caller()
    # POST: the filters in the JSON body (chunked or not); a POST without a body reads the query.
    raw = (request.method == "POST" and read_optional_json_object()) or request.args.to_dict()
    params = USAGE_QUERY_SCHEMA.load(raw)
    default_start, default_end = usage_service.month_bounds()
    start: datetime = params.get("start", default_start)
    end: datetime = params.get("end", default_end)
    if end <= start:
        raise InvalidRequest("'end' must be after 'start'.", param="end")
    tenant_id, api_key_id = usage_scope(actor, params.get("tenant"), params.get("api_key_id"))
    group_by = params.get("group_by")
    query = usage_service.UsageQuery(start=start, end=end, api_key_id=api_key_id, tenant_id=tenant_id,
                                     model=params.get("model"), group_by=group_by)
    result = read_replica.of(current_app, rt).query(lambda engine: usage_service.query_usage(engine, query))
    if group_by in ("key", "tenant"):
        _add_names(group_by, result["data"])
    if _wants_csv(params.get("format")):
        return _csv_response(result, group_by)
    return json_response(result)


def _add_names(group_by: str, data: list[dict[str, Any]]) -> None:
    """Names next to ids, so that a bill reads without a second lookup."""
    if group_by == "key":
        ids = [row["api_key_id"] for row in data]
        names = dict(db.session.execute(select(ApiKey.id, ApiKey.name).where(ApiKey.id.in_(ids))).all())
        for row in data:
            row["api_key_name"] = names.get(row["api_key_id"])
    else:
        ids = [row["tenant_id"] for row in data]
        names = dict(db.session.execute(select(Tenant.id, Tenant.name).where(Tenant.id.in_(ids))).all())
        for row in data:
            row["tenant_name"] = names.get(row["tenant_id"])


def _wants_csv(fmt: str | None) -> bool:
    if fmt is not None:
        return fmt == "csv"
    return request.accept_mimetypes.best_match(["application/json", "text/csv"]) == "text/csv"


def _csv_response(result: dict[str, Any], group_by: str | None) -> Response:
    """One line per group (or one line of totals without group_by); money as exact decimals."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    if group_by:
        columns = (*GROUP_COLUMNS[group_by], *TOTAL_COLUMNS)
        writer.writerow(columns)
        for row in result["data"]:
            writer.writerow([_cell(row.get(c)) for c in columns])
    else:
        writer.writerow(("start", "end", *TOTAL_COLUMNS))
        writer.writerow([result["start"], result["end"], *(result[c] for c in TOTAL_COLUMNS)])
    resp = Response(out.getvalue(), mimetype="text/csv")
    name = f"usage_{result['start'][:10]}_{result['end'][:10]}" + (f"_by_{group_by}" if group_by else "")
    resp.headers["Content-Disposition"] = f'attachment; filename="{name}.csv"'
    return resp


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: Any) -> Any:
    """Spreadsheets run cells starting with = + - @ as formulas, and some also those starting
    with a tab or a carriage return (OWASP's CSV injection list): key and tenant names are user
    input, so such a cell gets a leading quote."""
    if isinstance(value, str) and value[:1] in FORMULA_STARTS:
        return "'" + value
    return "" if value is None else value
