"""GET/POST /v1/usage: totals and groupings of the usage rows the caller may see."""
from __future__ import annotations

from datetime import datetime

from flask import Response, request

from app.api.auth import authenticate
from app.api.common import json_response, read_json_object
from app.api.schemas import USAGE_QUERY_SCHEMA
from app.errors import InvalidRequest
from app.runtime import runtime
from app.services import usage_service


def usage() -> Response:
    rt = runtime()
    key = authenticate()
    raw = request.args.to_dict() if request.method == "GET" or not request.content_length \
        else read_json_object()
    params = USAGE_QUERY_SCHEMA.load(raw)
    default_start, default_end = usage_service.month_bounds()
    start: datetime = params.get("start", default_start)
    end: datetime = params.get("end", default_end)
    if end <= start:
        raise InvalidRequest("'end' must be after 'start'.", param="end")
    query = usage_service.UsageQuery(start=start, end=end, api_key_id=key.id,
                                     model=params.get("model"), group_by=params.get("group_by"))
    return json_response(usage_service.query_usage(rt.engine, query))
