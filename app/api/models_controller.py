"""GET /v1/models and GET /v1/models/{id} (also /models, /models/{id}): the aliases the calling
key may use whose provider is configured, and the category aliases (small/big/auto). A model
the key may not use, or not offered, is a 404 as if it did not exist."""
from __future__ import annotations

from typing import Any

from flask import Response

from app.api.auth import authenticate
from app.api.common import json_response
from app.errors import ModelNotFound
from app.runtime import runtime
from app.services.router import CATEGORY_ALIASES


def list_models() -> Response:
    rt = runtime()
    key = authenticate()
    names = [*rt.providers.catalog.models, *(n for n in CATEGORY_ALIASES if n not in rt.providers.catalog.models)]
    cards = (_card(rt, key, name) for name in names)
    return json_response({"object": "list", "data": [c for c in cards if c is not None]})


def retrieve_model(model_id: str) -> Response:
    rt = runtime()
    key = authenticate()
    card = _card(rt, key, model_id)
    if card is None:
        raise ModelNotFound(f"The model '{model_id}' does not exist or you do not have access to it.",
                            param="model")
    return json_response(card)


def _card(rt: Any, key: Any, name: str) -> dict[str, Any] | None:
    """OpenAI's model object for `name`, or None when the key is not offered it (not allowed,
    no configured deployment, an empty category, unknown)."""
    created = rt.providers.catalog.created
    entry = rt.providers.catalog.get(name)
    if entry is not None:
        if not key.may_use(name) or rt.providers.missing_configuration(entry):
            return None  # not offered: no deployment's provider has its variables set
        return {"id": name, "object": "model", "created": created, "owned_by": entry.owned_by or _owner(rt, entry)}
    if rt.router.is_category(name) and rt.router.category_models(name) and key.may_use(name):
        # small/big/auto: routed to the best model of the category
        return {"id": name, "object": "model", "created": created, "owned_by": "gateway-router (category alias)"}
    return None


def _owner(rt: Any, entry: Any) -> str:
    kind = rt.providers.provider_type(entry.deployments[0].provider)
    return "gateway-simulator (offline, not a real model)" if kind == "simulator" else entry.deployments[0].provider
