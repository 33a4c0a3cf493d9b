"""The response cache at the HTTP edge: what a request asks of it (its headers), and
`POST /api/clear-cache`.

Request headers (docs/cache.md): `X-Gateway-Cache: on` (use the cache, also for answers that
vary by design: high temperature, tools) or `off` (do not); `Cache-Control: no-cache` (do not
read the cache, do store the answer) and `no-store` (neither). The response says
`X-Gateway-Cache: hit` or `miss` when the cache was consulted.
"""
from __future__ import annotations

from flask import Response, request
from sqlalchemy import select

from app.api.auth import admin_caller
from app.api.common import json_response, read_optional_json_object
from app.api.schemas import CLEAR_CACHE_SCHEMA
from app.errors import InvalidRequest, NotFound, ServiceUnavailable
from app.extensions import db
from app.models import Tenant
from app.runtime import runtime
from app.services import tenant_service
from app.services.admin_service import known_models
from app.services.completion import CACHE_HEADER
from app.services.response_cache import CACHE_ERRORS, CacheAsk


def cache_ask() -> CacheAsk:
    """What this request asks of the response cache. An `X-Gateway-Cache` value other than
    on/off is a 400 (a typo would silently change what the client pays)."""
    mode = request.headers.get(CACHE_HEADER, "").strip().lower() or None
    if mode not in (None, "on", "off"):
        raise InvalidRequest(f"The {CACHE_HEADER} header must be 'on' or 'off'.", param=CACHE_HEADER,
                             code="invalid_value")
    directives = {d.strip().split("=", 1)[0].lower() for d in request.headers.get("Cache-Control", "").split(",")}
    return CacheAsk(mode=mode, no_cache="no-cache" in directives, no_store="no-store" in directives)


def clear_cache() -> Response:
    """Empty the response cache: of one tenant (a tenant admin: its own; the system secret: the
    one named by `tenant`, or every tenant), optionally of one model alias only."""
    rt = runtime()
    actor = admin_caller()
    params = CLEAR_CACHE_SCHEMA.load(read_optional_json_object())
    model = params.get("model")
    if model is not None and model not in known_models(rt.providers.catalog):
        raise NotFound(f"The model '{model}' does not exist on this gateway. GET /v1/models lists the models.",
                       param="model", code="model_not_found")
    ref = params.get("tenant")
    if ref is not None:
        tenant = tenant_service.visible_tenant(db.session, actor, ref)
        tenant_ids, name = [tenant.id], tenant.name
    elif actor.tenant_id is not None:
        tenant_ids, name = [actor.tenant_id], db.session.get(Tenant, actor.tenant_id).name
    else:
        tenant_ids, name = list(db.session.scalars(select(Tenant.id).order_by(Tenant.id))), None
    try:
        rt.response_cache.clear_tenants(tenant_ids, model, every_tenant=name is None)
    except CACHE_ERRORS:
        raise ServiceUnavailable("The response cache (Redis) is unavailable; nothing was cleared.",
                                 code="cache_unavailable") from None
    return json_response({"object": "cache.cleared", "tenant": name, "model": model,
                          "tenants_cleared": len(tenant_ids)})
