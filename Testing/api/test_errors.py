"""Every error a client can see is the OpenAI envelope {"error": {message, type, param, code}}
with the right status: bad bodies, wrong types (with the offending `param`), unknown URLs,
wrong methods, oversized bodies, unknown or forbidden models, and unexpected exceptions."""
from __future__ import annotations

import json

import pytest

from Testing.conftest import app_config, close_app, start_app

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def app(module_app):
    """Every test here mints its own keys: one app for the module is enough."""
    return module_app


ENVELOPE = {"message", "type", "param", "code"}
MSGS = [{"role": "user", "content": "hi"}]
VALID = {"model": "demo", "messages": MSGS}


def error_of(resp, status: int) -> dict:
    assert resp.status_code == status, (resp.status_code, resp.get_data(as_text=True))
    assert resp.mimetype == "application/json"
    body = json.loads(resp.get_data(as_text=True))
    assert set(body) == {"error"}, body
    assert set(body["error"]) == ENVELOPE, body
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    return err


@pytest.fixture
def auth(mint) -> dict:
    return {"Authorization": f"Bearer {mint()['key']}"}


@pytest.mark.parametrize("data", [b"{not json", b'{"model": "demo",', b"\xff\xfe\x00garbage", b"nul"],
                         ids=["malformed", "truncated", "not-utf8", "bare-word"])
def test_malformed_json_body(client, auth, data):
    """A body that is not JSON -> 400 invalid_json envelope."""
    err = error_of(client.post("/v1/chat/completions", data=data, content_type="application/json",
                               headers=auth), 400)
    assert (err["type"], err["code"]) == ("invalid_request_error", "invalid_json")


@pytest.mark.parametrize("data", [b"[1, 2]", b'["model", "demo"]', b'"text"', b"42", b"null"])
def test_json_body_not_an_object(client, auth, data):
    """A JSON array / scalar body -> 400 saying it must be an object."""
    err = error_of(client.post("/v1/chat/completions", data=data, content_type="application/json",
                               headers=auth), 400)
    assert err["code"] == "invalid_json" and "object" in err["message"]


def test_empty_body(client, auth):
    """An empty body -> 400 invalid_json envelope saying the body is empty."""
    err = error_of(client.post("/v1/chat/completions", data=b"", content_type="application/json",
                               headers=auth), 400)
    assert err["code"] == "invalid_json" and "empty" in err["message"]


CASES = [
    ({"model": 5}, "model"),
    ({"model": ""}, "model"),
    ({"model": None}, "model"),
    ({"messages": "hi"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": None}, "messages"),
    ({"messages": ["hi"]}, "messages[0]"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [*MSGS, {"content": "no role"}]}, "messages[1].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    ({"temperature": 3}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": "0.5"}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"max_tokens": "10"}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"n": 0}, "n"),
    ({"n": True}, "n"),
    ({"stream_options": "x"}, "stream_options"),
    ({"model": "m" * 201}, "model"),
    ({"messages": [{"role": "user", "content": []}]}, "messages[0].content"),
    ({"stream": "yes"}, "stream"),
    ({"stream": 1}, "stream"),
    ({"user": 5}, "user"),
]


@pytest.mark.parametrize("fields, param", CASES,
                         ids=[json.dumps(f, separators=(",", ":"))[:60] for f, _ in CASES])
def test_chat_wrong_types_name_the_param(client, auth, fields, param):
    """A wrongly typed or out-of-range chat field -> 400 whose param names it (e.g. messages[0].role)."""
    body = json.dumps({**VALID, **fields})  # NaN / Infinity are sent as such
    err = error_of(client.post("/v1/chat/completions", data=body, content_type="application/json",
                               headers=auth), 400)
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param, err


@pytest.mark.parametrize("missing", ["model", "messages"])
def test_chat_required_fields(client, auth, missing):
    """A chat body without `model` or `messages` -> 400 naming the missing field."""
    body = {k: v for k, v in VALID.items() if k != missing}
    assert error_of(client.post("/v1/chat/completions", json=body, headers=auth), 400)["param"] == missing


def test_valid_request_passes_validation(client, auth):
    """The baseline body of the cases above is accepted (so each 400 is due to its field)."""
    with client.post("/v1/chat/completions", json={**VALID, "temperature": 0.5, "max_tokens": 5,
                                                   "stream": False, "user": "u"}, headers=auth) as resp:
        assert resp.status_code == 200, resp.get_data(as_text=True)
        assert resp.get_json()["object"] == "chat.completion"


@pytest.mark.parametrize("method, path", [("get", "/v1/nope"), ("post", "/v1/completions"),
                                          ("get", "/nope"), ("delete", "/v1/api-keys/abc")])
def test_unknown_url_404(client, method, path):
    """An unknown URL -> 404 envelope, code not_found."""
    err = error_of(getattr(client, method)(path), 404)
    assert (err["type"], err["code"]) == ("invalid_request_error", "not_found")


@pytest.mark.parametrize("method, path, allowed", [
    ("get", "/v1/chat/completions", "POST"), ("put", "/v1/chat/completions", "POST"),
    ("delete", "/v1/models", "GET"), ("post", "/health", "GET"), ("put", "/v1/api-keys", "POST")])
def test_wrong_method_405(client, auth, method, path, allowed):
    """A known URL with a wrong method -> 405 envelope (method_not_allowed) and an Allow header."""
    err = error_of(getattr(client, method)(path, headers=auth), 405)
    assert (err["type"], err["code"]) == ("invalid_request_error", "method_not_allowed")
    assert allowed in client.open(path, method=method.upper(), headers=auth).headers.get("Allow", "")


def test_body_too_large_413(client, auth, app):
    """A body over MAX_REQUEST_BYTES -> 413 envelope (request_too_large) naming the limit."""
    limit = app.config["MAX_REQUEST_BYTES"]
    assert limit == 256 * 1024
    big = json.dumps({**VALID, "messages": [{"role": "user", "content": "x" * (limit + 10)}]})
    err = error_of(client.post("/v1/chat/completions", data=big, content_type="application/json",
                               headers=auth), 413)
    assert err["code"] == "request_too_large" and str(limit) in err["message"]


def test_body_just_under_limit_accepted(client, auth, app):
    """A body just under MAX_REQUEST_BYTES is not refused as too large."""
    limit = app.config["MAX_REQUEST_BYTES"]
    pad = limit - len(json.dumps({**VALID, "messages": [{"role": "user", "content": ""}]})) - 100
    # ~43k tokens: under the model's 128k context window (a bigger prompt is a 400 context error)
    body = json.dumps({**VALID, "messages": [{"role": "user", "content": "hello " * (pad // 6)}]})
    assert len(body) < limit
    with client.post("/v1/chat/completions", data=body, content_type="application/json", headers=auth) as resp:
        assert resp.status_code == 200, resp.get_data(as_text=True)[:300]


def test_admin_body_too_large_413(client, admin_headers, app):
    """The 413 applies to the admin API as well."""
    body = json.dumps({"name": "x" * (app.config["MAX_REQUEST_BYTES"] + 1)})
    resp = client.post("/v1/api-keys", data=body, content_type="application/json", headers=admin_headers)
    assert error_of(resp, 413)["code"] == "request_too_large"


def test_unknown_model_404(client, auth):
    """A model alias the gateway does not serve -> 404 model_not_found, param model."""
    err = error_of(client.post("/v1/chat/completions", json={**VALID, "model": "gpt-99"}, headers=auth), 404)
    assert (err["code"], err["param"]) == ("model_not_found", "model")
    assert "gpt-99" in err["message"]


def test_model_outside_allowed_models_403(client, mint):
    """A served model outside the key's allowed_models -> 403 permission_error, param model."""
    key = mint(allowed_models=["demo"])
    resp = client.post("/v1/chat/completions", json={**VALID, "model": "gpt-4o-mini"},
                       headers={"Authorization": f"Bearer {key['key']}"})
    err = error_of(resp, 403)
    assert (err["type"], err["code"], err["param"]) == ("permission_error", "model_not_allowed", "model")


def test_unexpected_exception_500_without_internals(pg_url, models_file):
    """An unexpected exception -> 500 internal_error envelope that reveals nothing of it."""
    application = start_app(app_config(pg_url, models_file))

    def boom():
        raise RuntimeError("secret internals")

    application.add_url_rule("/boom", view_func=boom)
    try:
        resp = application.test_client().get("/boom")
        err = error_of(resp, 500)
        assert (err["type"], err["code"]) == ("api_error", "internal_error")
        raw = resp.get_data(as_text=True)
        assert "secret internals" not in raw and "Traceback" not in raw and "RuntimeError" not in raw
    finally:
        close_app(application)
