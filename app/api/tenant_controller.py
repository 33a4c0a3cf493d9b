"""Admin API for tenants: the system secret creates, lists, reads and updates (or suspends)
them; a tenant admin key reads its own tenant. Suspending a tenant stops all its keys at once
(on every worker, through the key-change channel)."""
from __future__ import annotations

from flask import Response

from app.api.auth import admin_caller, operator_caller
from app.api.common import json_response, read_json_object
from app.api.schemas import TENANT_CREATE_SCHEMA, TENANT_UPDATE_SCHEMA
from app.errors import Conflict, InvalidRequest, NotFound
from app.extensions import db
from app.runtime import runtime
from app.services import tenant_service


def create_tenant() -> Response:
    actor = operator_caller()
    params = TENANT_CREATE_SCHEMA.load(read_json_object())
    tenant = tenant_service.create_tenant(db.session, actor, **params)
    if tenant is None:
        raise Conflict(f"A tenant named '{params['name']}' already exists.", param="name",
                       code="tenant_exists")
    return json_response(tenant_service.tenant_to_dict(tenant, 0), 201)


def list_tenants() -> Response:
    operator_caller()
    counts = tenant_service.key_counts(db.session)
    return json_response({"object": "list", "data": [
        tenant_service.tenant_to_dict(t, counts.get(t.id, 0)) for t in tenant_service.list_tenants(db.session)]})


def get_tenant(tenant_id: int) -> Response:
    actor = admin_caller()
    tenant = tenant_service.get_tenant(db.session, tenant_id)
    if tenant is None or not actor.sees_tenant(tenant.id):
        raise NotFound(f"No tenant with id {tenant_id}.", param="id")
    return json_response(tenant_service.tenant_to_dict(tenant, tenant_service.key_counts(db.session)
                                                       .get(tenant.id, 0)))


def update_tenant(tenant_id: int) -> Response:
    actor = operator_caller()
    changes = TENANT_UPDATE_SCHEMA.load(read_json_object())
    if not changes:
        raise InvalidRequest("Nothing to change: send at least one field.", code="invalid_value")
    tenant = tenant_service.get_tenant(db.session, tenant_id)
    if tenant is None:
        raise NotFound(f"No tenant with id {tenant_id}.", param="id")
    changed = tenant_service.update_tenant(db.session, actor, tenant, changes)
    if changed is None:
        raise Conflict(f"A tenant named '{changes['name']}' already exists.", param="name",
                       code="tenant_exists")
    if changed:
        # Status, budget and name live in every cached key snapshot of the tenant.
        runtime().key_events.changed(tenant_id=tenant.id)
    return json_response(tenant_service.tenant_to_dict(tenant, tenant_service.key_counts(db.session)
                                                       .get(tenant.id, 0)))
