"""Helpers every controller uses: JSON responses, the JSON body, the request id."""
from __future__ import annotations

import json
import re
import uuid
from typing import Any

from flask import Response, g, request

from app.api.request_guard import BODY
from app.errors import InvalidRequest
from app.utils import request_context

JSON = "application/json"


def json_response(payload: Any, status: int = 200) -> Response:
    return Response(json.dumps(payload, separators=(",", ":")), status=status, mimetype=JSON)


def read_json_object() -> dict[str, Any]:
    """The request body as a JSON object, or a 400 that says what is wrong with it."""
    raw = request.environ.get(BODY)   # the body RequestGuard read (app/api/request_guard.py)
    if raw is None:
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
    if may_hold_unstorable(raw):
        reject_unstorable_strings(body)
    return body


# In UTF-8 JSON a decoded string can hold a NUL only from the escape \u0000 (a raw NUL byte is
# not valid JSON text) and a lone surrogate only from an escape \uD800-\uDFFF or from the
# bytes ED A0..BF (json.loads decodes bytes with "surrogatepass"). A body in UTF-16/32 (which
# json.loads also accepts) has NUL bytes.
_RISKY_ESCAPE = re.compile(rb"\\u(?:0000|[dD][89a-fA-F])|\xed[\xa0-\xbf]")


def may_hold_unstorable(raw: bytes) -> bool:
    """False when the JSON text `raw` cannot decode to any string `unstorable` refuses, so the
    walk over the parsed body can be skipped (it costs more than this scan of the bytes)."""
    return b"\x00" in raw or _RISKY_ESCAPE.search(raw) is not None


def read_optional_json_object() -> dict[str, Any]:
    """The JSON object of a request whose body may be empty ({} then). Emptiness is judged on
    the bytes received, not on Content-Length (absent on a chunked body)."""
    if not request.get_data(cache=True):
        return {}
    return read_json_object()


def unstorable(text: str) -> str | None:
    """Why `text` cannot be stored or sent on (None: it can): a NUL character (PostgreSQL's
    text refuses it) or a lone UTF-16 surrogate such as JSON "\\ud800" (not Unicode: it has
    no UTF-8 form)."""
    if "\x00" in text:
        return "contains a NUL character (\\u0000)"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return "contains a lone surrogate (an unpaired \\ud800-\\udfff escape)"
    return None


def reject_unstorable_strings(body: Any) -> None:
    """400 naming the first field (`param`, e.g. "messages[0].content") whose key or string
    value is unstorable. Iterative: a body nested as deep as the JSON parser allows must not
    exhaust the stack here."""
    stack: list[tuple[Any, str]] = [(body, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            problem = unstorable(value)
            if problem:
                raise InvalidRequest(f"Invalid value for '{_printable(path) or 'body'}': it {problem}.",
                                     param=_printable(path) or None, code="invalid_value")
        elif isinstance(value, dict):
            for key in value:
                problem = unstorable(key)
                if problem:
                    where = _printable(f"{path}.{key}" if path else key)
                    raise InvalidRequest(f"Invalid field name '{where}': it {problem}.",
                                         param=where, code="invalid_value")
            stack.extend((value[key], f"{path}.{key}" if path else key) for key in reversed(value))
        elif isinstance(value, list):
            stack.extend((value[i], f"{path}[{i}]") for i in range(len(value) - 1, -1, -1))


def reject_unstorable_url_values() -> None:
    """400 for a NUL (or lone surrogate) in any query parameter or path segment, before any
    controller runs: such a value reaching PostgreSQL would be a 500."""
    if not request.environ.get("QUERY_STRING") and not request.view_args:
        return  # nothing to check (most API calls): the query string is not even parsed
    for name, value in request.args.items(multi=True):
        problem = unstorable(name) or unstorable(value)
        if problem:
            raise InvalidRequest(f"Invalid query parameter '{_printable(name)}': it {problem}.",
                                 param=_printable(name), code="invalid_value")
    for name, value in (request.view_args or {}).items():
        if isinstance(value, str):
            problem = unstorable(value)
            if problem:
                raise InvalidRequest(f"Invalid value in the URL for '{name}': it {problem}.",
                                     param=name, code="invalid_value")


def _printable(name: str) -> str:
    """`name` with control characters and surrogates escaped (it is echoed in `param`)."""
    return name if name.isprintable() and unstorable(name) is None else \
        name.encode("unicode_escape", "backslashreplace").decode("ascii")


# A client's X-Request-ID is taken when it is 1-128 of these characters; otherwise one is made.
_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@+=/\-]{1,128}$")


def accepted_request_id(value: str | None) -> str | None:
    """The client's X-Request-ID when it is safe to echo and log (bounded, safe characters)."""
    if value and _CLIENT_REQUEST_ID.match(value):
        return value
    return None


def assign_request_id() -> str:
    """The request's public id (the X-Request-ID and `request-id` response headers, the request
    log's `request_id`): the client's X-Request-ID when it sent a valid one, else a new
    `req_<hex>`. Set before every request (app/__init__.py)."""
    client = accepted_request_id(request.headers.get("X-Request-ID"))
    g.request_id_from_client = client is not None
    rid = client or "req_" + uuid.uuid4().hex
    g.request_id = rid
    request_context.set_public_request_id(rid)
    return rid


def new_request_id() -> str:
    """The id of the usage row of the completion run about to begin (its idempotency key).
    It is the request's public id when the gateway made that id, and a new one when the client
    named the request: a client's id never keys a usage row, so that two requests sending the
    same X-Request-ID cannot collide on one row (the second would be dropped as a replay). The
    gateway's id then goes back in the X-Gateway-Request-ID header."""
    public = g.get("request_id") or assign_request_id()
    if not g.get("request_id_from_client"):
        return public
    rid = "req_" + uuid.uuid4().hex
    g.gateway_request_id = rid
    return rid
