"""Bad input never gets a 500 (Flask test client, real PostgreSQL and Redis): a NUL character in
any query parameter, path segment, field name or value, a lone surrogate ("\\ud800", which has
no UTF-8 form) in a name or a message, and `tool_calls` of the wrong shape are all answered
400 with the OpenAI envelope and the `param` at fault. Swept over every route of the gateway."""
from __future__ import annotations

import json
import re

import pytest

from Testing.support import SYSTEM_SECRET

# Every route of the gateway, as (method, rule): test_the_sweep_covers_every_route keeps it in step.
ROUTES = {
    ("GET", "/health"), ("GET", "/openapi.json"),
    ("POST", "/v1/chat/completions"), ("POST", "/chat/completions"),
    ("GET", "/v1/models"), ("POST", "/v1/models"),
    ("GET", "/v1/usage"), ("POST", "/v1/usage"),
    ("POST", "/v1/api-keys"), ("GET", "/v1/api-keys"),
    ("GET", "/v1/api-keys/<int:key_id>"), ("PATCH", "/v1/api-keys/<int:key_id>"),
    ("DELETE", "/v1/api-keys/<int:key_id>"), ("POST", "/v1/api-keys/<int:key_id>/rotate"),
    ("POST", "/v1/tenants"), ("GET", "/v1/tenants"),
    ("GET", "/v1/tenants/<tenant_ref>"), ("PATCH", "/v1/tenants/<tenant_ref>"),
    ("GET", "/v1/audit"),
    ("GET", "/v1/uptime/<path:model_id>"),
    ("GET", "/v1/providers/status"),
    ("POST", "/v1/embeddings"), ("POST", "/embeddings"),
    ("POST", "/v1/images/generations"), ("POST", "/images/generations"), ("POST", "/image"),
    ("GET", "/models"), ("POST", "/models"),
    ("GET", "/v1/models/<path:model_id>"), ("GET", "/models/<path:model_id>"),
    ("GET", "/ping"),
    ("POST", "/v1/messages"), ("POST", "/v1/messages/count_tokens"),
    ("POST", "/v1/admin/reload"),
    ("POST", "/v1/responses"), ("POST", "/responses"),
    ("GET", "/v1/responses/<response_id>"), ("GET", "/responses/<response_id>"),
    ("DELETE", "/v1/responses/<response_id>"), ("DELETE", "/responses/<response_id>"),
    ("GET", "/v1/responses/<response_id>/input_items"), ("GET", "/responses/<response_id>/input_items"),
    ("POST", "/api/chat"), ("GET", "/api/health"), ("POST", "/api/clear-cache"),
    ("GET", "/v1/key"), ("GET", "/v1/requests"),
    ("GET", "/metrics"), ("GET", "/api/metrics"),
    # the web console: its HTML shell and its static files
    ("GET", "/"), ("GET", "/ui"), ("GET", "/ui/"), ("GET", "/ui/<path:page>"), ("GET", "/ui/assets/<path:filename>"),
    ("GET", "/playground"), ("GET", "/console"), ("GET", "/dashboard"),
}
# The query parameter each route reads (a NUL in it used to reach PostgreSQL), else any name.
QUERY_PARAM = {"/v1/usage": "model", "/v1/api-keys": "tenant", "/v1/audit": "action", "/v1/requests": "model"}
# Routes that take a JSON body, and the body that carries the bad string (param expected).
NAME_BODY = ({"name": "bad\u0000name"}, "name")
CHAT_BODY = ({"model": "demo", "messages": [{"role": "user", "content": "hi", "name": "a\u0000b"}]},
             "messages[0].name")
EMBED_BODY = ({"model": "demo-embed", "input": ["fine", "a\u0000b"]}, "input[1]")
IMAGE_BODY = ({"model": "demo-image", "prompt": "a\u0000b"}, "prompt")
RESPONSES_BODY = ({"model": "demo", "input": "hi", "instructions": "a\u0000b"}, "instructions")
BODIES = {
    "/v1/chat/completions": CHAT_BODY, "/chat/completions": CHAT_BODY,
    "/v1/embeddings": EMBED_BODY, "/embeddings": EMBED_BODY,
    "/v1/images/generations": IMAGE_BODY, "/images/generations": IMAGE_BODY, "/image": IMAGE_BODY,
    "/v1/responses": RESPONSES_BODY, "/responses": RESPONSES_BODY,
    "/v1/usage": ({"model": "x\u0000"}, "model"),
    "/v1/api-keys": NAME_BODY, "/v1/api-keys/<int:key_id>": NAME_BODY,
    "/v1/api-keys/<int:key_id>/rotate": ({"grace_period_s": 1, "note\u0000": 1}, "note\\x00"),
    "/api/chat": ({"message": "hi\u0000", "model": "demo"}, "message"),
    "/api/clear-cache": ({"tenant": "sweep-tenant", "model": "x\u0000"}, "model"),
    "/v1/tenants": NAME_BODY, "/v1/tenants/<tenant_ref>": ({"status": "active", "name": "t\u0000"}, "name"),
    "/v1/messages": ({"model": "demo", "max_tokens": 8, "system": "a\u0000b",
                      "messages": [{"role": "user", "content": "hi"}]}, "system"),
    "/v1/messages/count_tokens": ({"model": "demo", "messages": [{"role": "user", "content": "a\u0000b"}]},
                                  "messages[0].content"),
}
# The Anthropic Messages routes answer in Anthropic's envelope (no param field: it is named in the message).
ANTHROPIC_ROUTES = {"/v1/messages", "/v1/messages/count_tokens"}


@pytest.fixture
def ctx(client, mint):
    """A member key and the ids the routes need."""
    key = mint(name="sweep", tenant="sweep-tenant")
    return {"key": key, "headers": {"X-System-Secret": SYSTEM_SECRET}, "key_headers": {
        "Authorization": f"Bearer {key['key']}"}}


def _path(rule: str, key_id: int, tenant_ref: str = "sweep-tenant", model: str = "demo") -> str:
    return re.sub(r"<path:\w+>", model, rule.replace("<int:key_id>", str(key_id)).replace("<tenant_ref>", tenant_ref)
                  .replace("<response_id>", "resp_unknown"))


def _headers(ctx, rule: str) -> dict[str, str]:
    key_routes = ("/v1/chat/completions", "/chat/completions", "/v1/models", "/v1/uptime/<path:model_id>",
                  "/v1/embeddings", "/embeddings", "/v1/images/generations", "/images/generations", "/image",
                  "/models", "/v1/models/<path:model_id>", "/models/<path:model_id>",
                  "/api/chat", *ANTHROPIC_ROUTES)
    return ctx["key_headers"] if rule in key_routes or "/responses" in rule else ctx["headers"]


def _assert_400(resp, param) -> None:
    assert resp.status_code == 400, (resp.status_code, resp.get_data(as_text=True)[:300])
    if resp.get_json().get("type") == "error":  # Anthropic's envelope
        error = resp.get_json()["error"]
        assert error["type"] == "invalid_request_error" and f"'{param}'" in error["message"]
        return
    error = resp.get_json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "invalid_value"
    assert error["param"] == param


def test_the_sweep_covers_every_route(app):
    """A new route must be added to ROUTES (and so to the sweep)."""
    rules = {(m, r.rule) for r in app.url_map.iter_rules() if r.endpoint != "static"
             for m in r.methods - {"HEAD", "OPTIONS"}}
    assert rules == ROUTES


@pytest.mark.parametrize("method,rule", sorted(ROUTES))
def test_a_nul_in_a_query_parameter_is_400(client, ctx, method, rule):
    """?<param>=a%00b on every route: 400 naming the parameter."""
    name = QUERY_PARAM.get(rule, "q")
    path = _path(rule, ctx["key"]["id"]) + f"?{name}=a%00b"
    resp = client.open(path, method=method, headers=_headers(ctx, rule),
                       json={} if method in ("POST", "PATCH") else None)
    _assert_400(resp, name)


@pytest.mark.parametrize("method,rule", sorted(r for r in ROUTES if "<tenant_ref>" in r[1] or "<path:" in r[1]))
def test_a_nul_in_a_path_segment_is_400(client, ctx, method, rule):
    """/v1/tenants/a%00b, /v1/uptime/a%00b: 400 naming the path parameter."""
    path = _path(rule, ctx["key"]["id"], tenant_ref="a%00b", model="a%00b")
    resp = client.open(path, method=method, headers=_headers(ctx, rule), json={} if method == "PATCH" else None)
    _assert_400(resp, "tenant_ref" if "<tenant_ref>" in rule else re.search(r"<path:(\w+)>", rule).group(1))


@pytest.mark.parametrize("method,rule", sorted(r for r in ROUTES if r[0] in ("POST", "PATCH") and r[1] in BODIES))
@pytest.mark.parametrize("bad", ["nul", "surrogate"])
def test_a_nul_or_lone_surrogate_in_a_json_body_is_400(client, ctx, method, rule, bad):
    """A NUL or a lone surrogate in a body's field name or value: 400 naming the field."""
    body, param = BODIES[rule]
    raw = json.dumps(body)
    if bad == "surrogate":
        raw = raw.replace("\\u0000", "\\ud800")
        param = param.replace("\\x00", "\\ud800")  # a bad field name is echoed escaped
    resp = client.open(_path(rule, ctx["key"]["id"]), method=method, data=raw.encode(),
                       content_type="application/json", headers=_headers(ctx, rule))
    _assert_400(resp, param)


def test_a_lone_surrogate_in_a_message_is_400(client, ctx):
    """{"content": "\\ud800"} in a chat message: 400 messages[0].content (it cannot be
    tokenised, nor sent on as UTF-8)."""
    raw = b'{"model": "demo", "messages": [{"role": "user", "content": "x\\ud800y"}]}'
    resp = client.post("/v1/chat/completions", data=raw, content_type="application/json",
                       headers=ctx["key_headers"])
    _assert_400(resp, "messages[0].content")


@pytest.mark.parametrize("tool_calls,param", [
    ("call", "messages[0].tool_calls"),
    (["call"], "messages[0].tool_calls[0]"),
    ([{"id": "c1", "type": "function", "function": "get_weather"}], "messages[0].tool_calls[0].function"),
    ([{"id": "c1", "type": "function", "function": {"name": 7, "arguments": "{}"}}],
     "messages[0].tool_calls[0].function.name"),
    ([{"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}],
     "messages[0].tool_calls[0].function.arguments"),
    ([{"id": ["c1"], "type": "function", "function": {"name": "f", "arguments": "{}"}}],
     "messages[0].tool_calls[0].id"),
])
def test_tool_calls_of_the_wrong_shape_are_400(client, ctx, tool_calls, param):
    """An assistant message's tool_calls must be [{"id", "type", "function": {"name", "arguments"}}]
    with strings: anything else is 400 naming the entry, never a 500 while counting tokens."""
    body = {"model": "demo", "messages": [{"role": "assistant", "content": None, "tool_calls": tool_calls},
                                          {"role": "user", "content": "go on"}]}
    resp = client.post("/v1/chat/completions", json=body, headers=ctx["key_headers"])
    assert resp.status_code == 400, resp.get_json()
    assert resp.get_json()["error"]["param"] == param


@pytest.mark.parametrize("field,value,param", [
    ("tools", "get_weather", "tools"),
    ("tools", ["get_weather"], "tools[0]"),
    ("response_format", "json", "response_format"),
    ("messages", [{"role": "user", "content": [{"type": "image_url", "image_url": 5}]}], "messages[0].content"),
])
def test_counted_fields_of_the_wrong_shape_are_400(client, ctx, field, value, param):
    """Fields admission counts (tools, response_format, image parts) must have their shape."""
    body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], field: value}
    resp = client.post("/v1/chat/completions", json=body, headers=ctx["key_headers"])
    assert resp.status_code == 400, resp.get_json()
    assert resp.get_json()["error"]["param"] == param
