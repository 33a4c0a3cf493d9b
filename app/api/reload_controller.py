"""POST /v1/admin/reload: reload data/models.json in every worker of every replica."""
from __future__ import annotations

from flask import Response, current_app

from app.api.auth import operator_caller
from app.api.common import json_response
from app.errors import InvalidRequest
from app.providers.catalog import CatalogError
from app.services.catalog_reload import bad_entry, reloader_of


def reload_models() -> Response:
    operator_caller()
    try:
        result = reloader_of(current_app).reload_everywhere()
    except CatalogError as exc:
        raise InvalidRequest(f"The models file was not reloaded (the previous catalogue keeps "
                             f"serving): {exc}", param=bad_entry(exc), code="invalid_models_file") from None
    return json_response(result.to_json())
