"""GET /v1/models: the aliases the calling key may use whose provider is configured, and the
category aliases (small/big/auto)."""
from __future__ import annotations

from typing import Any

from flask import Response

from app.api.auth import authenticate
from app.api.common import json_response
from app.runtime import runtime
from app.services.router import CATEGORY_ALIASES


def list_models() -> Response:
    rt = runtime()
    key = authenticate()
    data = []
    for alias, entry in rt.providers.catalog.models.items():
        if not key.may_use(alias) or rt.providers.missing_configuration(entry):
            continue  # not offered: no deployment's provider has its variables set
        data.append({"id": alias, "object": "model", "created": rt.providers.catalog.created,
                     "owned_by": entry.owned_by or _owner(rt, entry)})
    for name in CATEGORY_ALIASES:  # small/big/auto: routed to the best model of the category
        if rt.router.is_category(name) and rt.router.category_models(name) and key.may_use(name):
            data.append({"id": name, "object": "model", "created": rt.providers.catalog.created,
                         "owned_by": "gateway-router (category alias)"})
    return json_response({"object": "list", "data": data})


def _owner(rt: Any, entry: Any) -> str:
    kind = rt.providers.provider_type(entry.deployments[0].provider)
    return "gateway-simulator (offline, not a real model)" if kind == "simulator" else entry.deployments[0].provider
