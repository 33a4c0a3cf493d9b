"""GET /v1/key: the calling key's own view (like OpenRouter's `/key` or LiteLLM's key info):
its settings and, under `headroom`, how much of each limit is left right now. Any key may
read itself; looking reserves nothing."""
from __future__ import annotations

from flask import Response, request
from sqlalchemy.exc import SQLAlchemyError

from app.api.auth import authenticate
from app.api.common import json_response
from app.errors import InvalidRequest, ServiceUnavailable
from app.extensions import db
from app.models import ApiKey
from app.runtime import runtime
from app.services import api_key_service, key_status_service, usage_service
from app.utils.money import format_money


def my_key() -> Response:
    if "X-System-Secret" in request.headers and "Authorization" not in request.headers:
        raise InvalidRequest("GET /v1/key describes the calling API key, and the system secret is not "
                             "a key: list keys with GET /v1/api-keys.", code="key_required")
    key = authenticate()
    rt = runtime()
    try:
        now = rt.clock.now()
        body = api_key_service.key_to_dict(db.session.get(ApiKey, key.id), now)
        body["headroom"] = key_status_service.headroom(
            key, rt.limiter, lambda key_id, tenant_id, day, month: usage_service.period_totals(
                rt.engine, key_id, tenant_id, day, month), now)
    except SQLAlchemyError:
        raise ServiceUnavailable("The usage store is unavailable; try again shortly.",
                                 code="database_unavailable") from None
    body["tenant_status"] = key.tenant_status
    body["tenant_budget_usd"] = format_money(key.tenant_budget_usd) if key.tenant_budget_usd is not None else None
    return json_response(body)
