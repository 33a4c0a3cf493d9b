"""Helpers every controller uses: JSON responses, the JSON body, the request id."""
from __future__ import annotations

import json
import uuid
from typing import Any

from flask import Response, g, request

from app.errors import InvalidRequest

JSON = "application/json"


def json_response(payload: Any, status: int = 200) -> Response:
    return Response(json.dumps(payload, separators=(",", ":")), status=status, mimetype=JSON)


def read_json_object() -> dict[str, Any]:
    """The request body as a JSON object, or a 400 that says what is wrong with it."""
    raw = request.get_data(cache=False)
    if not raw:
        raise InvalidRequest("The request body is empty; send a JSON object.", code="invalid_json")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:  # arrays or objects nested thousands deep: the parser's stack runs out
        raise InvalidRequest("The request body is nested too deeply.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    return body


def new_request_id() -> str:
    rid = "req_" + uuid.uuid4().hex
    g.request_id = rid
    return rid
