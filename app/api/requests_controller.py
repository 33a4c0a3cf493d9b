"""GET /v1/requests: the latest requests the caller may see (one usage row each), newest first,
a page at a time (`limit`, then `cursor` = the previous page's `next_cursor`). Scoped like
`/v1/usage`: a member key its own requests, a tenant admin key its tenant's, the system secret
everyone's (`tenant` and `api_key_id` narrow it). Read from the read replica when one is
configured, like the usage reports."""
from __future__ import annotations

from flask import Response, current_app, request

from app.api.auth import caller
from app.api.common import json_response
from app.api.schemas import REQUESTS_QUERY_SCHEMA
from app.api.scope import usage_scope
from app.errors import InvalidRequest
from app.runtime import runtime
from app.services import read_replica, request_log_service
from app.services.request_log_service import BadCursor, RequestQuery


def list_requests() -> Response:
    actor = caller()
    params = REQUESTS_QUERY_SCHEMA.load(request.args.to_dict())
    tenant_id, api_key_id = usage_scope(actor, params.pop("tenant", None), params.pop("api_key_id", None))
    if "start" in params and "end" in params and params["end"] <= params["start"]:
        raise InvalidRequest("'end' must be after 'start'.", param="end")
    query = RequestQuery(tenant_id=tenant_id, api_key_id=api_key_id, **params)
    try:
        page = read_replica.of(current_app, runtime()).query(
            lambda engine: request_log_service.list_requests(engine, query))
    except BadCursor:
        raise InvalidRequest("This cursor was not made by /v1/requests: pass the 'next_cursor' of the "
                             "previous page.", param="cursor", code="invalid_cursor") from None
    return json_response(page)
