"""GET /openapi.json: the OpenAPI 3.1 description (app/api/openapi.py), built once per process."""
from __future__ import annotations

import json
from functools import lru_cache

from flask import Response

from app.api.common import JSON
from app.api.openapi import build_spec


@lru_cache(maxsize=1)
def _document() -> str:
    return json.dumps(build_spec(), separators=(",", ":"))


def openapi_document() -> Response:
    return Response(_document(), mimetype=JSON)
