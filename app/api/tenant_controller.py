"""Admin API for tenants: the system secret creates, lists, reads and updates (or suspends)
them; a tenant admin key reads its own tenant. Suspending a tenant stops all its keys at once
(on every worker, through the key-change channel).

A tenant is named in the URL by its id or its name (`/v1/tenants/3`, `/v1/tenants/research`):
digits only mean an id, and no tenant name is digits only.
"""
from __future__ import annotations

from flask import Response

from app.api.auth import admin_caller, operator_caller
from app.api.common import json_response, read_json_object
from app.api.key_controller import admin_for
from app.api.schemas import TENANT_CREATE_SCHEMA, TENANT_UPDATE_SCHEMA
from app.extensions import db
from app.models import Tenant
from app.services import tenant_service


def create_tenant() -> Response:
    tenant = admin_for(operator_caller()).create_tenant(**TENANT_CREATE_SCHEMA.load(read_json_object()))
    return json_response(tenant_service.tenant_to_dict(tenant, 0), 201)


def list_tenants() -> Response:
    operator_caller()
    counts = tenant_service.key_counts(db.session)
    return json_response({"object": "list", "data": [
        tenant_service.tenant_to_dict(t, counts.get(t.id, 0)) for t in tenant_service.list_tenants(db.session)]})


def get_tenant(tenant_ref: str) -> Response:
    return _describe(admin_for(admin_caller()).visible_tenant(tenant_ref))


def update_tenant(tenant_ref: str) -> Response:
    admin = admin_for(operator_caller())
    return _describe(admin.update_tenant(tenant_ref, TENANT_UPDATE_SCHEMA.load(read_json_object())))


def _describe(tenant: Tenant) -> Response:
    return json_response(tenant_service.tenant_to_dict(tenant, tenant_service.key_counts(db.session)
                                                       .get(tenant.id, 0)))
