"""The OpenAPI 3.1 description of the gateway, served at GET /openapi.json.

Request bodies and query strings come from the marshmallow schemas the controllers validate
with (app/api/schemas.py), through apispec's marshmallow plugin, so the description cannot
drift from the validation. Each operation names its authentication and every error status it
can answer, all with the one error envelope of app/errors.py. `OPERATIONS` lists every route
of app/api/routes.py; Testing/api/test_openapi.py fails when a route is not described.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from marshmallow import Schema

from app.api import schemas

ERROR_ENVELOPE = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}},
    }},
}
ERROR_TEXT = {400: "Invalid request (the envelope's `param` names the field)", 401: "Missing or wrong credentials",
              403: "The credentials may not do this", 404: "Unknown object, model or URL",
              405: "Method not allowed", 408: "The request body did not arrive in time",
              409: "Conflict with the current state", 413: "Request body too large",
              429: "A rate limit, budget, provider quota, failed-credential limit or connection cap refused "
                   "the request (see Retry-After)",
              502: "The provider failed", 503: "A dependency (database, Redis, provider configuration) is "
              "unavailable", 504: "The provider did not answer in time"}
# Answered by any route (app/api/request_guard.py and the error handlers): bad bytes in the query or
# the body (400), a method the route does not have, a body not received in time (408) or past
# MAX_REQUEST_BYTES (413), too many connections from one address (429), a dependency down (503).
COMMON_ERRORS = (400, 405, 408, 413, 429, 503)
KEY_ERRORS = (400, 401, 403, 404, 429)
ADMIN_ERRORS = (400, 401, 403, 404, 409)
OBJECT = {"type": "object"}
LIST = {"type": "object", "required": ["object", "data"],
        "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": OBJECT}}}
KEY_ID = {"name": "key_id", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 0}}
TENANT_REF = {"name": "tenant_ref", "in": "path", "required": True, "schema": {"type": "string"},
              "description": "The tenant's name or its numeric id"}
MODEL_ID = {"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"},
            "description": "A model alias (it may contain '/')"}
# Who may call: the names of `components.securitySchemes`.
ANTHROPIC_ERROR = {
    "type": "object",
    "required": ["type", "error"],
    "properties": {"type": {"const": "error"}, "error": {
        "type": "object", "required": ["type", "message"],
        "properties": {"type": {"type": "string"}, "message": {"type": "string"}}}},
}
HTML = {"text/html": {"type": "string"}}
ANY_FILE = {"*/*": {"type": "string"}}
REDIRECTS = (301, 302, 308)
RESPONSE_ID = {"name": "response_id", "in": "path", "required": True, "schema": {"type": "string"}}
PAGE = {"name": "page", "in": "path", "required": True, "schema": {"type": "string"}}
FILENAME = {"name": "filename", "in": "path", "required": True, "schema": {"type": "string"}}
# /metrics and /api/metrics: open when METRICS_TOKEN is empty, else the token or the system secret.
METRICS_SECURITY: list[dict[str, list]] = [{}, {"metricsToken": []}, {"systemSecret": []}]
AUTH = {"none": [], "key": [{"bearerKey": []}], "admin": [{"systemSecret": []}, {"bearerKey": []}],
        "operator": [{"systemSecret": []}], "any": [{"systemSecret": []}, {"bearerKey": []}]}


@dataclass(frozen=True)
class Operation:
    path: str                 # OpenAPI form: /v1/api-keys/{key_id}
    method: str
    summary: str
    auth: str                 # a key of AUTH
    status: int = 200
    response: dict[str, Any] = field(default_factory=lambda: {"application/json": OBJECT})
    body: type[Schema] | None = None
    body_schema: dict[str, Any] | None = None   # a plain JSON schema when no marshmallow schema validates it
    body_required: bool = True
    query: type[Schema] | None = None
    params: tuple[dict[str, Any], ...] = ()
    errors: tuple[int, ...] = ()
    error_schema: str = "Error"          # the envelope of this API's errors (components.schemas)
    extra: tuple[int, ...] = ()          # other non-error answers (redirects of the console)
    security: list[dict[str, list]] | None = None   # instead of AUTH[auth]


CHAT_RESPONSE = {"application/json": OBJECT,
                 "text/event-stream": {"type": "string", "description": "Server-sent events of "
                                       "chat.completion.chunk objects, ending with `data: [DONE]`"}}
OPERATIONS: tuple[Operation, ...] = (
    Operation("/health", "get", "Liveness and dependencies of this worker", "none",
              response={"application/json": OBJECT}),
    Operation("/openapi.json", "get", "This description", "none"),
    *(Operation(f"{prefix}/chat/completions", "post", "Create a chat completion (OpenAI wire format)", "key",
                response=CHAT_RESPONSE, body=schemas.ChatCompletionSchema,
                errors=KEY_ERRORS + (502, 504)) for prefix in ("/v1", "")),
    *(Operation(f"{prefix}/models", method, "Models this key may use", "key", response={"application/json": LIST},
                errors=(401, 403)) for prefix in ("/v1", "") for method in ("get", "post")),
    *(Operation(f"{prefix}/models/{{model_id}}", "get", "One model this key may use", "key", params=(MODEL_ID,),
                errors=(401, 403, 404)) for prefix in ("/v1", "")),
    *(Operation(f"{prefix}/embeddings", "post", "Create embeddings (OpenAI wire format)", "key", body_schema=OBJECT,
                errors=KEY_ERRORS + (502, 504)) for prefix in ("/v1", "")),
    *(Operation(path, "post", "Generate images (OpenAI wire format)", "key", body_schema=OBJECT,
                errors=KEY_ERRORS + (502, 504)) for path in ("/v1/images/generations", "/images/generations", "/image")),
    Operation("/api/chat", "post", "Chat in Ollama's wire format (NDJSON stream or one object)", "key",
              response={"application/json": OBJECT, "application/x-ndjson": {"type": "string"}},
              body=schemas.ApiChatSchema, errors=KEY_ERRORS + (502, 504)),
    *(Operation(f"{prefix}/responses", "post", "Create a response (OpenAI Responses wire format)", "key",
                response={"application/json": OBJECT, "text/event-stream": {"type": "string"}}, body_schema=OBJECT,
                errors=KEY_ERRORS + (409, 502, 504)) for prefix in ("/v1", "")),
    *(Operation(f"{prefix}/responses/{{response_id}}", method, summary, "key", params=(RESPONSE_ID,),
                errors=KEY_ERRORS + (409,)) for prefix in ("/v1", "")
      for method, summary in (("get", "A stored response"), ("delete", "Delete a stored response"))),
    *(Operation(f"{prefix}/responses/{{response_id}}/input_items", "get", "The input items of a stored response",
                "key", params=(RESPONSE_ID,), response={"application/json": LIST}, errors=KEY_ERRORS)
      for prefix in ("/v1", "")),
    Operation("/api/health", "get", "Liveness and dependencies of this worker (same as /health)", "none"),
    Operation("/ping", "get", "Liveness only", "none", response={"application/json": OBJECT, "text/plain": {"type": "string"}}),
    Operation("/v1/usage", "get", "Usage totals and groupings (JSON or CSV)", "any", query=schemas.UsageQuerySchema,
              response={"application/json": OBJECT, "text/csv": {"type": "string"}}, errors=KEY_ERRORS),
    Operation("/v1/usage", "post", "Usage totals and groupings, filters in a JSON body", "any",
              body=schemas.UsageQuerySchema, body_required=False,
              response={"application/json": OBJECT, "text/csv": {"type": "string"}}, errors=KEY_ERRORS),
    Operation("/v1/api-keys", "post", "Mint an API key (the plaintext is in this answer only)", "admin",
              status=201, body=schemas.ApiKeyCreateSchema, errors=ADMIN_ERRORS),
    Operation("/v1/api-keys", "get", "List API keys", "admin", response={"application/json": LIST},
              errors=ADMIN_ERRORS),
    Operation("/v1/api-keys/{key_id}", "get", "One API key", "admin", params=(KEY_ID,), errors=ADMIN_ERRORS),
    Operation("/v1/api-keys/{key_id}", "patch", "Change a key's name, limits, budget, models or expiry", "admin",
              params=(KEY_ID,), body=schemas.ApiKeyUpdateSchema, errors=ADMIN_ERRORS),
    Operation("/v1/api-keys/{key_id}", "delete", "Revoke an API key", "admin", params=(KEY_ID,),
              errors=ADMIN_ERRORS),
    Operation("/v1/api-keys/{key_id}/rotate", "post", "Rotate a key (optional grace period for the old one)",
              "admin", params=(KEY_ID,), body=schemas.RotateSchema, body_required=False, errors=ADMIN_ERRORS),
    Operation("/v1/tenants", "post", "Create a tenant", "operator", status=201, body=schemas.TenantCreateSchema,
              errors=ADMIN_ERRORS),
    Operation("/v1/tenants", "get", "List tenants", "operator", response={"application/json": LIST},
              errors=ADMIN_ERRORS),
    Operation("/v1/tenants/{tenant_ref}", "get", "One tenant", "admin", params=(TENANT_REF,), errors=ADMIN_ERRORS),
    Operation("/v1/tenants/{tenant_ref}", "patch", "Change a tenant", "operator", params=(TENANT_REF,),
              body=schemas.TenantUpdateSchema, errors=ADMIN_ERRORS),
    Operation("/v1/audit", "get", "The audit log (newest first)", "admin", query=schemas.AuditQuerySchema,
              response={"application/json": LIST}, errors=ADMIN_ERRORS),
    Operation("/v1/uptime/{model_id}", "get", "Probe a model's deployments (cached briefly)", "key",
              params=(MODEL_ID,), errors=KEY_ERRORS + (502, 504)),
    Operation("/v1/providers/status", "get", "Health of every deployment, as the workers see it", "any",
              errors=(401, 403)),
    Operation("/api/clear-cache", "post", "Empty the response cache (one tenant or every one, optionally one model)",
              "admin", body=schemas.ClearCacheSchema, body_required=False, errors=ADMIN_ERRORS + (503,)),
    Operation("/metrics", "get", "The gateway's metrics, Prometheus text format (every worker's)", "any",
              response={"text/plain": {"type": "string"}}, errors=(401, 404), security=METRICS_SECURITY),
    Operation("/api/metrics", "get", "A JSON summary of the metrics: totals, last minute and hour, per model "
              "and provider", "any", errors=(401, 404), security=METRICS_SECURITY),
    Operation("/v1/admin/reload", "post", "Reload data/models.json in every worker of every replica", "operator",
              errors=ADMIN_ERRORS),
    Operation("/v1/requests", "get", "The latest requests the caller may see, newest first", "any",
              query=schemas.RequestsQuerySchema, response={"application/json": LIST}, errors=KEY_ERRORS),
    Operation("/v1/key", "get", "The calling key: its limits, budget and what is left", "key", errors=(401, 403)),
    Operation("/v1/messages", "post", "Create a message (Anthropic Messages wire format)", "key",
              response={"application/json": OBJECT, "text/event-stream": {"type": "string"}},
              body=schemas.MessagesSchema, errors=KEY_ERRORS + (502, 504), error_schema="AnthropicError",
              security=[{"anthropicKey": []}, {"bearerKey": []}]),
    Operation("/v1/messages/count_tokens", "post", "Count the input tokens of a Messages request", "key",
              body=schemas.CountTokensSchema, errors=KEY_ERRORS + (502, 504), error_schema="AnthropicError",
              security=[{"anthropicKey": []}, {"bearerKey": []}]),
    # The web console (app/api/console_controller.py): a page shell and its assets; the
    # pages call the API above with the user's key.
    *(Operation(path, "get", "The web console (HTML)", "none", response=HTML, extra=REDIRECTS,
                params=(PAGE,) if "{page}" in path else ()) for path in ("/", "/ui", "/ui/", "/ui/{page}",
                                                                          "/playground", "/console", "/dashboard")),
    Operation("/ui/assets/{filename}", "get", "A file of the web console", "none", response=ANY_FILE,
              params=(FILENAME,), errors=(404,)),
)


def _operation(op: Operation) -> dict[str, Any]:
    responses: dict[str, Any] = {str(op.status): {
        "description": op.summary, "content": {mt: {"schema": s} for mt, s in op.response.items()}}}
    authenticated = {401} if op.auth != "none" else set()
    for status in op.extra:
        responses[str(status)] = {"description": "Redirect to the console's page"}
    for status in sorted({*op.errors, *COMMON_ERRORS} | authenticated):
        if op.auth == "none" and status in (401, 403):
            continue
        responses[str(status)] = {"description": ERROR_TEXT[status], "content": {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{op.error_schema}"}}}}
    if op.path in ("/health", "/api/health"):
        responses["503"] = {"description": "A dependency is down (the body says which)",
                            "content": {"application/json": {"schema": OBJECT}}}
    security = op.security if op.security is not None else AUTH[op.auth]
    spec: dict[str, Any] = {"summary": op.summary, "security": security, "responses": responses,
                            "operationId": f"{op.method}{re.sub(r'[^a-z0-9]', '_', op.path.lower())}"}
    params: list[dict[str, Any]] = list(op.params)
    if op.query is not None:
        params.append({"in": "query", "schema": op.query})
    if params:
        spec["parameters"] = params
    if op.body is not None or op.body_schema is not None:
        spec["requestBody"] = {"required": op.body_required,
                               "content": {"application/json": {"schema": op.body or op.body_schema}}}
    return spec


def build_spec() -> dict[str, Any]:
    """The OpenAPI 3.1 document (a dict ready for JSON)."""
    spec = APISpec(title="LLM API gateway", version="1", openapi_version="3.1.0",
                   plugins=[MarshmallowPlugin()],
                   info={"description": "OpenAI-compatible, multi-tenant LLM gateway. Every error answer "
                                        "is the OpenAI error envelope (components.schemas.Error)."})
    spec.components.schema("Error", ERROR_ENVELOPE)
    spec.components.schema("AnthropicError", ANTHROPIC_ERROR)
    spec.components.security_scheme("anthropicKey", {"type": "apiKey", "in": "header", "name": "x-api-key",
                                                      "description": "A gateway API key, Anthropic's header"})
    spec.components.security_scheme("bearerKey", {"type": "http", "scheme": "bearer",
                                                   "description": "A gateway API key (sk-gw-...)"})
    spec.components.security_scheme("metricsToken", {"type": "http", "scheme": "bearer",
                                                      "description": "METRICS_TOKEN (when the operator set one)"})
    spec.components.security_scheme("systemSecret", {"type": "apiKey", "in": "header", "name": "X-System-Secret",
                                                      "description": "The operator's admin secret"})
    by_path: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        by_path.setdefault(op.path, {})[op.method] = _operation(op)
    for path, operations in by_path.items():
        spec.path(path=path, operations=operations)
    # Range bounds of Decimal fields (budgets) arrive as Decimal: JSON numbers here.
    return json.loads(json.dumps(spec.to_dict(), default=_number))


def _number(value: Any) -> Any:
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    raise TypeError(f"{type(value).__name__} in the OpenAPI document")


def openapi_path(rule: str) -> str:
    """A Flask rule in OpenAPI form: /v1/api-keys/<int:key_id> -> /v1/api-keys/{key_id}."""
    return re.sub(r"<(?:[a-z_]+:)?([a-zA-Z_][a-zA-Z0-9_]*)>", r"{\1}", rule)
