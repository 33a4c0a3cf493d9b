"""The one error hierarchy encoded per dialect: OpenAI's envelope everywhere, Anthropic's
envelope and status codes for the Messages endpoint."""
from __future__ import annotations

import pytest

from app.errors import (APIError, AuthenticationFailed, InsufficientQuota, InvalidRequest, ModelNotFound,
                        PermissionDenied, RateLimited, ServiceUnavailable, UpstreamError, UpstreamTimeout,
                        anthropic_envelope, envelope_for, openai_envelope)


@pytest.mark.parametrize("err, status, kind", [
    (InvalidRequest("bad"), 400, "invalid_request_error"),
    (AuthenticationFailed("who?"), 401, "authentication_error"),
    (PermissionDenied("no"), 403, "permission_error"),
    (ModelNotFound("which?"), 404, "not_found_error"),
    (APIError("too big", status=413), 413, "request_too_large"),
    (RateLimited("slow down"), 429, "rate_limit_error"),
    (InsufficientQuota("budget"), 429, "rate_limit_error"),
    (APIError("ours"), 500, "api_error"),
    (UpstreamError("upstream"), 500, "api_error"),
    (UpstreamTimeout("late"), 504, "timeout_error"),
    (ServiceUnavailable("none left"), 529, "overloaded_error"),
    (APIError("wrong method", status=405), 400, "invalid_request_error"),
])
def test_anthropic_envelope_and_status(err, status, kind):
    assert anthropic_envelope(err) == (status, {"type": "error", "error": {"type": kind, "message": err.message}})


def test_openai_envelope_is_unchanged():
    err = ModelNotFound("which?", param="model")
    assert openai_envelope(err) == (404, {"error": {"message": "which?", "type": "invalid_request_error",
                                                    "param": "model", "code": "model_not_found"}})


def test_envelope_by_path():
    """Errors answered before routing (the request guard) take the envelope of the path's API."""
    assert envelope_for("/v1/messages") is anthropic_envelope
    assert envelope_for("/v1/messages/count_tokens") is anthropic_envelope
    assert envelope_for("/v1/chat/completions") is openai_envelope
