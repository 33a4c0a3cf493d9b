"""Admin API for keys: mint, list, read, update, rotate, revoke.

The system secret manages every key; a tenant admin key manages the keys of its own tenant,
within the tenant's limits and budget. A key of another tenant is answered exactly like a key
that does not exist (404), so nothing of another tenant shows. The use cases themselves (checks,
audit row, commit, key event) are `app.services.admin_service.Admin`, shared with db_manager.
"""
from __future__ import annotations

from flask import Response, request

from app.api.auth import admin_caller, caller
from app.api.common import json_response, read_json_object, read_optional_json_object
from app.api.schemas import API_KEY_CREATE_SCHEMA, API_KEY_UPDATE_SCHEMA, ROTATE_SCHEMA
from app.errors import PermissionDenied
from app.extensions import db
from app.models import ApiKey
from app.runtime import runtime
from app.services import api_key_service
from app.services.actor import Actor
from app.services.admin_service import Admin, known_models


def admin_for(actor: Actor) -> Admin:
    """The admin use cases, performed by `actor` in this request's session."""
    rt = runtime()
    return Admin(db.session, actor, rt.key_events, known_models=known_models(rt.providers.catalog),
                 clock=rt.clock)


def create_api_key() -> Response:
    admin = admin_for(admin_caller())
    key, plaintext = admin.mint_key(API_KEY_CREATE_SCHEMA.load(read_json_object()))
    body = _describe(key)
    body["key"] = plaintext  # the only time the secret is ever shown
    return json_response(body, 201)


def list_api_keys() -> Response:
    admin = admin_for(admin_caller())
    tenant_id = admin.actor.tenant_id
    ref = request.args.get("tenant")
    if ref is not None:
        tenant_id = admin.visible_tenant(ref, param="tenant").id
    keys = api_key_service.list_keys(db.session, tenant_id=tenant_id)
    return json_response({"object": "list", "data": [_describe(k) for k in keys]})


def get_api_key(key_id: int) -> Response:
    """Admins read the keys they manage; any key may read itself (a member: only itself)."""
    actor = caller()
    if actor.kind == "key" and not actor.is_tenant_admin:
        if key_id != actor.key_id:
            raise PermissionDenied("A member key may read only itself; other keys need the system secret "
                                   "or a tenant admin key.", code="admin_required")
        return json_response(_describe(db.session.get(ApiKey, key_id)))
    return json_response(_describe(admin_for(actor).visible_key(key_id)))


def update_api_key(key_id: int) -> Response:
    admin = admin_for(admin_caller())
    key = admin.update_key(key_id, API_KEY_UPDATE_SCHEMA.load(read_json_object()))
    return json_response(_describe(key))


def rotate_api_key(key_id: int) -> Response:
    admin = admin_for(admin_caller())
    params = ROTATE_SCHEMA.load(read_optional_json_object())
    key, plaintext = admin.rotate_key(key_id, float(params["grace_period_s"]))
    body = _describe(key)
    body["key"] = plaintext  # shown once, like at minting
    return json_response(body)


def revoke_api_key(key_id: int) -> Response:
    key, _ = admin_for(admin_caller()).revoke_key(key_id)
    return json_response(_describe(key))


def _describe(key) -> dict:
    return api_key_service.key_to_dict(key, runtime().clock.now())
