"""One exception hierarchy, mapped in one place to the OpenAI error envelope.

Every error a client can see is an `APIError`; `register_error_handlers` turns it (and
Werkzeug's HTTP errors, marshmallow validation errors and unexpected exceptions) into
`{"error": {"message", "type", "param", "code"}}` with the right status.
"""
from __future__ import annotations

import json
import logging
import math
from typing import Any, Callable

from flask import Blueprint, Flask, Response, current_app, g, request
from marshmallow import ValidationError
from werkzeug.exceptions import HTTPException

from app.providers.base import ProviderError
from app.services.rate_limit_service import LimiterUnavailable
from app.services.request_lines import route_endpoint
from app.services.router import ContextTooLong, NoDeploymentAvailable
from app.utils import db_errors

log = logging.getLogger("gateway.errors")


class APIError(Exception):
    status = 500
    type = "api_error"
    code: str | None = None
    # For the metrics and the request log (app/services/metrics.py, request_lines.py): which
    # limit, quota or breaker refused the request (None: not a refusal), the endpoint it was
    # refused on, and whether a completion run already counted and logged it.
    refusal: str | None = None
    endpoint: str | None = None
    observed: bool = False

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 status: int | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}


class InvalidRequest(APIError):
    status = 400
    type = "invalid_request_error"


class AuthenticationFailed(APIError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"

    def __init__(self, message: str = "Incorrect or missing API key.", **kw: Any) -> None:
        kw.setdefault("headers", {"WWW-Authenticate": "Bearer"})
        super().__init__(message, **kw)


class SystemSecretRequired(APIError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_system_secret"


class PermissionDenied(APIError):
    status = 403
    type = "permission_error"
    code = "permission_denied"


class NotFound(APIError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class Conflict(APIError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class RequestTimeout(APIError):
    """The request body did not arrive in time (slow or stalled client)."""
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class RequestTooLarge(APIError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RateLimited(APIError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class InsufficientQuota(APIError):
    status = 429
    type = "insufficient_quota"
    code = "insufficient_quota"


class UpstreamError(APIError):
    """The provider failed before anything was sent to the client."""
    status = 502
    type = "api_error"
    code = "upstream_error"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class ServiceUnavailable(APIError):
    status = 503
    type = "api_error"
    code = "service_unavailable"


class ClientGone(APIError):
    """The client hung up while its request waited (a provider queue): nobody reads this
    answer; the run is settled as client_disconnected."""
    status = 499
    type = "api_error"
    code = "client_closed_request"

    def __init__(self, message: str = "The client closed the connection while the request waited.",
                 **kw: Any) -> None:
        super().__init__(message, **kw)


def from_provider_error(exc: ProviderError) -> APIError:
    """The client's view of an upstream failure (status by the taxonomy, message redacted)."""
    status = exc.client_status
    if exc.kind == "context_too_long":
        return InvalidRequest(exc.message, code="context_length_exceeded", param="messages")
    if exc.kind == "bad_request":
        return InvalidRequest(f"The provider rejected the request: {exc.message}",
                              code=exc.code or "upstream_bad_request")
    if exc.kind == "not_found":
        return ModelNotFound(f"The provider does not know this model: {exc.message}", param="model")
    if exc.kind == "rate_limited":
        headers = {"Retry-After": str(int(exc.retry_after or 1))}
        return RateLimited(f"The provider is rate limiting this gateway: {exc.message}",
                           code="upstream_rate_limited", headers=headers)
    if exc.kind == "timeout":
        return UpstreamTimeout(f"The provider did not answer in time: {exc.message}")
    if exc.kind == "not_configured":
        return ServiceUnavailable(exc.message, code="provider_not_configured")
    if exc.kind == "auth":
        return UpstreamError("The gateway's credentials for this provider were refused; "
                             "the operator has to fix them.", code="upstream_auth_error")
    return UpstreamError(f"The provider failed: {exc.message}", status=status)


def api_error_for(exc: BaseException, *, model: str | None = None) -> APIError | None:
    """The client's view of a refusal raised below the API layer (None: not a refusal, a bug).

    The one mapping of the request path's exceptions to the envelope: upstream failures,
    the limiter's store down, no deployment to try, a prompt no model can hold, the database
    down. `model`: the requested alias, named in the message."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ProviderError):
        return from_provider_error(exc)
    if isinstance(exc, LimiterUnavailable):
        return _refused(ServiceUnavailable("Rate limits cannot be checked right now (the limiter's store is "
                                           "unreachable); try again shortly.", code="rate_limiter_unavailable"),
                        "limiter_unavailable")
    if isinstance(exc, NoDeploymentAvailable):
        return _no_deployment(exc, model)
    if isinstance(exc, ContextTooLong):
        return InvalidRequest(f"This model's maximum context length is {exc.largest} tokens. However, "
                              f"your request needs {exc.needed} tokens (prompt plus max_tokens), and no "
                              "fallback model can hold it. Reduce the length of the messages or "
                              "max_tokens.", code="context_length_exceeded", param="messages")
    if db_errors.is_unreachable(exc):
        if db_errors.missing_database():
            return ServiceUnavailable("The gateway's database does not exist on the database server "
                                      "(DATABASE_URL names a database that was never created); the "
                                      "operator must create it.", code="database_not_found")
        return ServiceUnavailable("The database is unavailable; try again shortly.",
                                  code="database_unavailable")
    return None


def _refused(err: APIError, reason: str) -> APIError:
    err.refusal = reason
    return err


def _no_deployment(exc: NoDeploymentAvailable, model: str | None) -> APIError:
    if exc.not_configured and not (exc.quota_full or exc.circuits_open):
        return _refused(ServiceUnavailable(f"No deployment of '{model}' can be used: "
                                           f"{'; '.join(exc.not_configured)}.", code="provider_not_configured"),
                        "not_configured")
    if exc.quota_full:
        retry = str(max(1, math.ceil(exc.retry_in_s)))
        if exc.queued_for_s:
            return _refused(RateLimited(f"Every deployment of '{model}' is at its provider quota and no slot "
                                        f"came within the {exc.queued_for_s:g}s queue timeout; retry in {retry}s.",
                                        code="rate_limit_exceeded", headers={"Retry-After": retry}),
                            "provider_queue_timeout")
        return _refused(RateLimited(f"Every deployment of '{model}' is at its provider quota; retry shortly.",
                                    code="rate_limit_exceeded", headers={"Retry-After": retry}), "provider_quota")
    retry = max(1, math.ceil(exc.retry_in_s))
    return _refused(ServiceUnavailable(f"Every deployment of '{model}' is failing (circuit open after repeated "
                                       f"upstream errors); retry in {retry}s.", code="deployments_unavailable",
                                       headers={"Retry-After": str(retry)}), "circuit_open")


_LIMIT_MESSAGES = {
    "rpm": "Rate limit reached for requests per minute (limit {rpm}).",
    "tpm": "Rate limit reached for tokens per minute (limit {tpm}, this request reserves {tokens}).",
    "daily": "Daily token limit reached (limit {daily}, this request reserves {tokens}).",
    "concurrency": "Too many concurrent requests for this key (limit {concurrent}).",
}


def limit_error(reason: str, retry_after_ms: int, headers: dict[str, str], *, tokens: int,
                rpm: int, tpm: int, daily: int, concurrent: int) -> APIError:
    """The client's view of a refused admission (which limit, and when to come back)."""
    values = dict(rpm=rpm, tpm=tpm, daily=daily, concurrent=concurrent, tokens=tokens)
    if reason in ("key_budget", "tenant_budget"):
        whose = "this API key" if reason == "key_budget" else "this key's tenant"
        return _refused(InsufficientQuota(f"The monthly budget of {whose} is exhausted (or too small for this "
                                          "request's reserved cost). Raise the budget or wait for next month."),
                        reason)
    if reason in ("tpm_too_large", "daily_too_large"):
        limit = "tokens-per-minute" if reason == "tpm_too_large" else "daily token"
        return _refused(InvalidRequest(f"This request reserves {tokens} tokens (prompt + max_tokens), more than "
                                       f"the key's {limit} limit of {tpm if reason == 'tpm_too_large' else daily}: "
                                       "it can never be admitted. Lower max_tokens or the prompt.",
                                       code="request_too_large_for_limit", param="max_tokens"), reason)
    retry_s = max(1, -(-retry_after_ms // 1000))
    return _refused(RateLimited(_LIMIT_MESSAGES[reason].format(**values) + f" Retry after {retry_s}s.",
                                headers={**headers, "Retry-After": str(retry_s)}), reason)


_HTTP_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error",
               404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
               429: "rate_limit_error"}
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


# The Anthropic Messages endpoint answers errors in Anthropic's envelope and status codes.
ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                         404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                         500: "api_error", 504: "timeout_error", 529: "overloaded_error"}

# An envelope encodes an APIError as (status, JSON body) in one API dialect.
Envelope = Callable[[APIError], "tuple[int, dict[str, Any]]"]


def openai_envelope(err: APIError) -> tuple[int, dict[str, Any]]:
    """{"error": {"message", "type", "param", "code"}} with the error's own status."""
    return err.status, err.body()


def anthropic_status(status: int) -> int:
    """Our status as one of Anthropic's: 503 (nothing can serve now) is 529 overloaded, other
    4xx are 400 and other 5xx 500, as Anthropic documents."""
    if status in ANTHROPIC_ERROR_TYPES:
        return status
    if status == 503:
        return 529
    return 400 if 400 <= status < 500 else 500


def anthropic_envelope(err: APIError) -> tuple[int, dict[str, Any]]:
    """{"type": "error", "error": {"type", "message"}} with Anthropic's status code."""
    status = anthropic_status(err.status)
    return status, {"type": "error", "error": {"type": ANTHROPIC_ERROR_TYPES[status], "message": err.message}}


# The URL prefix of the Anthropic Messages API (its blueprint's): errors answered before Flask
# routes a request (the WSGI request guard) use its envelope too.
ANTHROPIC_PREFIX = "/v1/messages"


def envelope_for(path: str) -> Envelope:
    """The envelope of the API a URL path belongs to."""
    return anthropic_envelope if path.startswith(ANTHROPIC_PREFIX) else openai_envelope


def error_response(err: APIError, envelope: Envelope = openai_envelope) -> Response:
    status, body = envelope(err)
    resp = Response(json.dumps(body), status=status, mimetype="application/json")
    for k, v in err.headers.items():
        resp.headers[k] = v
    return resp


def first_validation_error(messages: Any, prefix: str = "") -> tuple[str | None, str]:
    """Flatten marshmallow's nested messages to (param path, message) of the first error."""
    if isinstance(messages, dict):
        for key, value in messages.items():
            path = f"{prefix}.{key}" if prefix and not isinstance(key, int) else (
                f"{prefix}[{key}]" if isinstance(key, int) else str(key))
            if key == "_schema":
                path = prefix or None
            return first_validation_error(value, path or "")
    if isinstance(messages, list) and messages:
        if all(isinstance(m, str) for m in messages):
            return (prefix or None), messages[0]
        return first_validation_error(messages[0], prefix)
    return (prefix or None), str(messages)


def http_error(err: HTTPException) -> APIError:
    """Werkzeug's HTTP errors (unknown URL, wrong method, body too large) as APIErrors."""
    status = err.code or 500
    message = {
        404: "Unknown URL. See docs/api.md for the gateway's endpoints.",
        405: "Method not allowed for this URL.",
        413: f"Request body too large (limit: {current_app.config.get('MAX_CONTENT_LENGTH')} bytes).",
    }.get(status, err.description or err.name)
    api = APIError(message, status=status, code=_HTTP_CODES.get(status))
    api.type = _HTTP_TYPES.get(status, "api_error")
    if status == 405 and getattr(err, "valid_methods", None):
        api.headers["Allow"] = ", ".join(err.valid_methods)
    return api


def validation_error(err: ValidationError) -> APIError:
    param, message = first_validation_error(err.messages)
    text = f"Invalid value for '{param}': {message}" if param else message
    return InvalidRequest(text, param=param, code="invalid_value")


def register_error_handlers(target: Flask | Blueprint, envelope: Envelope = openai_envelope) -> None:
    """Map every error raised under `target` (the app, or a blueprint speaking another dialect)
    to an APIError, encoded by `envelope`."""
    @target.errorhandler(APIError)
    def _api_error(err: APIError) -> Response:
        return _answer(err, envelope)

    @target.errorhandler(ValidationError)
    def _validation(err: ValidationError) -> Response:
        return _answer(validation_error(err), envelope)

    @target.errorhandler(HTTPException)
    def _http(err: HTTPException) -> Response:
        return _answer(http_error(err), envelope)

    @target.errorhandler(Exception)
    def _unexpected(err: Exception) -> Response:
        refusal = api_error_for(err)
        if refusal is not None:  # e.g. the database down under a controller
            log.error("request refused: %s (%s)", refusal.code, type(err).__name__)
            return _answer(refusal, envelope)
        log.exception("unhandled error: %s", type(err).__name__)
        return _answer(APIError("The gateway had an internal error. It has been logged.",
                                code="internal_error"), envelope)


def _answer(err: APIError, envelope: Envelope) -> Response:
    """The error's response, after its one observation (the refusal path of the metrics and
    the request log): counted when a limit refused it, logged unless a completion run did."""
    if not err.observed:
        err.observed = True
        rt = current_app.extensions.get("gateway")
        if rt is not None:
            try:
                rule = request.url_rule.rule if request.url_rule is not None else None
                rt.observe_error(err, envelope(err)[0], endpoint=err.endpoint or route_endpoint(rule),
                                 request_id=g.get("request_id"), key=g.get("api_key"))
            except Exception:  # noqa: BLE001 - the answer goes out whatever happens here
                log.exception("error answer not observed")
    return error_response(err, envelope)
