"""Admin API for keys: mint, list, read, update, rotate, revoke.

The system secret manages every key; a tenant admin key manages the keys of its own tenant,
within the tenant's limits and budget. A key of another tenant is answered exactly like a key
that does not exist (404), so nothing of another tenant shows.
"""
from __future__ import annotations

from flask import Response, request

from app.api.auth import admin_caller, caller
from app.api.common import json_response, read_json_object
from app.api.schemas import API_KEY_CREATE_SCHEMA, API_KEY_UPDATE_SCHEMA, ROTATE_SCHEMA
from app.errors import Conflict, InvalidRequest, NotFound, PermissionDenied
from app.extensions import db
from app.models import ApiKey, Tenant
from app.runtime import runtime
from app.services import api_key_service, audit_service, tenant_service
from app.services.actor import Actor


# The fields of a new key its audit row records (never the secret or its hash).
_AUDITED = ("name", "prefix", "role", *api_key_service.LIMIT_FIELDS, "budget_usd", "allowed_models",
            "expires_at")


def create_api_key() -> Response:
    actor = admin_caller()
    params = API_KEY_CREATE_SCHEMA.load(read_json_object())
    session = db.session
    tenant_name = params.pop("tenant", None)
    if actor.is_operator:
        tenant = tenant_service.get_or_create_tenant(session, actor, tenant_name or "default")
    else:
        tenant = session.get(Tenant, actor.tenant_id)
        if tenant_name is not None and tenant_name != tenant.name:
            raise PermissionDenied("A tenant admin key mints keys of its own tenant only.", param="tenant",
                                   code="other_tenant")
    values = {**tenant_service.key_defaults(tenant, params), **params}
    if not actor.is_operator:
        _check_ceilings(tenant, values)
    key, plaintext = api_key_service.mint_key(session, tenant=tenant, commit=False, **values)
    body = api_key_service.key_to_dict(key)
    audit_service.record(session, actor, "key.create", target_type="api_key", target_id=key.id,
                         tenant_id=tenant.id, details={k: v for k, v in body.items() if k in _AUDITED})
    session.commit()
    body["key"] = plaintext  # the only time the secret is ever shown
    return json_response(body, 201)


def list_api_keys() -> Response:
    actor = admin_caller()
    tenant_id = actor.tenant_id
    name = request.args.get("tenant")
    if name is not None:
        tenant = tenant_service.get_tenant_by_name(db.session, name)
        if tenant is None or not actor.sees_tenant(tenant.id):
            raise NotFound(f"No tenant named '{name}'.", param="tenant")
        tenant_id = tenant.id
    keys = api_key_service.list_keys(db.session, tenant_id=tenant_id)
    return json_response({"object": "list", "data": [api_key_service.key_to_dict(k) for k in keys]})


def get_api_key(key_id: int) -> Response:
    """Admins read the keys they manage; any key may read itself (a member: only itself)."""
    actor = caller()
    if actor.kind == "key" and not actor.is_tenant_admin and key_id != actor.key_id:
        raise PermissionDenied("A member key may read only itself; other keys need the system secret "
                               "or a tenant admin key.", code="admin_required")
    return json_response(api_key_service.key_to_dict(_visible_key(actor, key_id)))


def update_api_key(key_id: int) -> Response:
    actor = admin_caller()
    changes = API_KEY_UPDATE_SCHEMA.load(read_json_object())
    if not changes:
        raise InvalidRequest("Nothing to change: send at least one field.", code="invalid_value")
    key = _visible_key(actor, key_id)
    if key.revoked_at is not None:
        raise Conflict(f"The API key {key_id} is revoked and cannot be changed.", code="key_revoked")
    if not actor.is_operator:
        _check_ceilings(key.tenant, changes)
    changed = api_key_service.update_key(key, changes)
    if changed:
        audit_service.record(db.session, actor, "key.update", target_type="api_key", target_id=key.id,
                             tenant_id=key.tenant_id, details=changed)
    db.session.commit()
    if changed:
        runtime().key_events.changed(key_id=key.id)
    return json_response(api_key_service.key_to_dict(key))


def rotate_api_key(key_id: int) -> Response:
    actor = admin_caller()
    params = ROTATE_SCHEMA.load(read_json_object() if request.content_length else {})
    key = _visible_key(actor, key_id)
    if key.revoked_at is not None:
        raise Conflict(f"The API key {key_id} is revoked and cannot be rotated.", code="key_revoked")
    old_prefix, grace = key.prefix, float(params["grace_period_s"])
    plaintext = api_key_service.rotate_key(key, grace)
    audit_service.record(db.session, actor, "key.rotate", target_type="api_key", target_id=key.id,
                         tenant_id=key.tenant_id, details={"previous_prefix": old_prefix, "prefix": key.prefix,
                                                           "grace_period_s": int(grace) if grace.is_integer()
                                                           else grace})
    db.session.commit()
    runtime().key_events.changed(key_id=key.id)
    body = api_key_service.key_to_dict(key)
    body["key"] = plaintext  # shown once, like at minting
    return json_response(body)


def revoke_api_key(key_id: int) -> Response:
    actor = admin_caller()
    key = _visible_key(actor, key_id)
    if key.revoked_at is None:
        api_key_service.revoke_key(db.session, key_id, commit=False)
        audit_service.record(db.session, actor, "key.revoke", target_type="api_key", target_id=key.id,
                             tenant_id=key.tenant_id, details={"name": key.name, "prefix": key.prefix})
        db.session.commit()
    runtime().key_events.changed(key_id=key.id)
    return json_response(api_key_service.key_to_dict(key))


def _visible_key(actor: Actor, key_id: int) -> ApiKey:
    key = db.session.get(ApiKey, key_id) if 0 < key_id <= tenant_service.MAX_ID else None
    if key is None or not (actor.sees_tenant(key.tenant_id) or key.id == actor.key_id):
        raise NotFound(f"No API key with id {key_id}.", param="id")
    return key


def _check_ceilings(tenant: Tenant, values: dict) -> None:
    problems = tenant_service.ceiling_violations(tenant, values)
    if problems:
        field, reason = problems[0]
        raise PermissionDenied(f"A tenant admin cannot set '{field}' here: {reason}.", param=field,
                               code="exceeds_tenant_limits")
