"""Whose usage rows a caller may read, shared by `/v1/usage` and `/v1/requests`.

A member key reads its own rows; a tenant admin key its tenant's (or one of its keys', with
`api_key_id`); the system secret everyone's (or one tenant's with `tenant`, one key's with
`api_key_id`). A tenant or key the caller may not see is answered like one that does not exist.
"""
from __future__ import annotations

from app.errors import NotFound, PermissionDenied
from app.extensions import db
from app.models import ApiKey
from app.services import tenant_service
from app.services.actor import Actor


def usage_scope(actor: Actor, tenant_name: str | None, api_key_id: int | None) -> tuple[int | None, int | None]:
    """(tenant_id, api_key_id) filters the caller is allowed, from the parameters it sent."""
    if actor.kind == "key" and not actor.is_tenant_admin:
        if tenant_name is not None:
            raise PermissionDenied("A member key reads its own usage only: 'tenant' needs a tenant admin "
                                   "key.", param="tenant")
        if api_key_id is not None and api_key_id != actor.key_id:
            raise PermissionDenied("A member key reads its own usage only.", param="api_key_id")
        return None, actor.key_id
    tenant_id = actor.tenant_id  # None for the system secret: every tenant
    if tenant_name is not None:
        tenant_id = tenant_service.visible_tenant(db.session, actor, tenant_name).id
    if api_key_id is not None:
        key = db.session.get(ApiKey, api_key_id)
        if key is None or not actor.sees_tenant(key.tenant_id):
            raise NotFound(f"No API key with id {api_key_id}.", param="api_key_id")
    return tenant_id, api_key_id
