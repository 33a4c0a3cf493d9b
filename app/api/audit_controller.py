"""GET /v1/audit: who changed what, newest first. The system secret reads every row (or one
tenant's with `tenant`); a tenant admin key reads its own tenant's rows only."""
from __future__ import annotations

from flask import Response, request

from app.api.auth import admin_caller
from app.api.common import json_response
from app.api.schemas import AUDIT_QUERY_SCHEMA
from app.extensions import db
from app.services import audit_service, tenant_service


def list_audit() -> Response:
    actor = admin_caller()
    params = AUDIT_QUERY_SCHEMA.load(request.args.to_dict())
    tenant_id = actor.tenant_id
    name = params.pop("tenant", None)
    if name is not None:
        tenant_id = tenant_service.visible_tenant(db.session, actor, name).id
    limit = params.pop("limit")
    entries = audit_service.list_entries(db.session, tenant_id=tenant_id, limit=limit + 1, **params)
    return json_response({"object": "list", "data": [audit_service.entry_to_dict(e) for e in entries[:limit]],
                          "has_more": len(entries) > limit})
