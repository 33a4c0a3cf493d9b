"""Admin API for keys: mint, list, revoke."""
from __future__ import annotations

from flask import Response

from app.api.auth import require_system_secret
from app.api.common import json_response, read_json_object
from app.api.schemas import API_KEY_CREATE_SCHEMA
from app.errors import NotFound
from app.extensions import db
from app.runtime import runtime
from app.services import api_key_service


def create_api_key() -> Response:
    require_system_secret()
    params = API_KEY_CREATE_SCHEMA.load(read_json_object())
    key, plaintext = api_key_service.mint_key(db.session, **params)
    body = api_key_service.key_to_dict(key)
    body["key"] = plaintext  # the only time the secret is ever shown
    return json_response(body, 201)


def list_api_keys() -> Response:
    require_system_secret()
    keys = api_key_service.list_keys(db.session)
    return json_response({"object": "list", "data": [api_key_service.key_to_dict(k) for k in keys]})


def revoke_api_key(key_id: int) -> Response:
    require_system_secret()
    key = api_key_service.revoke_key(db.session, key_id)
    if key is None:
        raise NotFound(f"No API key with id {key_id}.", param="id")
    runtime().key_cache.invalidate_key_id(key_id)
    return json_response(api_key_service.key_to_dict(key))
