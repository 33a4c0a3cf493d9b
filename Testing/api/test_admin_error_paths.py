"""Bad input to the administrative and status endpoints (tenants, api-keys PATCH/rotate/DELETE,
audit, usage JSON and CSV, uptime, providers/status) is a 4xx OpenAI error envelope, never a
500: malformed JSON, bodies that are not objects, wrong types, NaN and Infinity, values far out
of range (ids past 64 bits, dates at the ends of the calendar), unknown ids and fields, and
query strings of the wrong type. Each case is sent by the system secret and by a tenant admin
key, so both authorisation paths meet it."""
from __future__ import annotations

import json

import pytest

from Testing.support import SYSTEM_SECRET

pytestmark = pytest.mark.timeout(120)

ENVELOPE = {"message", "type", "param", "code"}
HUGE_ID = "9" * 30
INT64_PAST = str(2**63)          # one past the largest bigint: a path id that matches the route
SYSTEM = {"X-System-Secret": SYSTEM_SECRET}

# Bodies every JSON endpoint must refuse (raw bytes sent as application/json).
BAD_BODIES = [
    b"{not json", b'{"name": "x",', b"\xff\xfe\x00garbage", b"[1, 2]", b'"text"', b"42", b"null",
    b"[" * 50_000 + b"]" * 50_000,                      # nesting deeper than any parser's recursion
    b'{"name": NaN}', b'{"budget_usd": NaN}', b'{"budget_usd": Infinity}', b'{"budget_usd": -Infinity}',
    b'{"grace_period_s": NaN}', b'{"grace_period_s": Infinity}', b'{"grace_period_s": 1e400}',
    b'{"name": 5}', b'{"name": ""}', b'{"name": "' + b"n" * 5000 + b'"}', b'{"name": null}',
    b'{"budget_usd": "abc"}', b'{"budget_usd": "1e400"}', b'{"budget_usd": 1e308}', b'{"budget_usd": true}',
    b'{"budget_usd": "-0.01"}', b'{"budget_usd": "0x10"}',
    b'{"rpm_limit": 1.5}', b'{"rpm_limit": "10"}', b'{"rpm_limit": 1e30}', b'{"rpm_limit": 99999999999999999999999}',
    b'{"rpm_limit": true}', b'{"daily_token_limit": 9223372036854775808}', b'{"max_concurrent": -1}',
    b'{"key_limits": "x"}', b'{"key_limits": {"rpm_limit": 99999999999999999999}}', b'{"key_limits": []}',
    b'{"status": 1}', b'{"status": "deleted"}', b'{"role": "owner"}', b'{"tenant": 7}',
    b'{"allowed_models": "gpt"}', b'{"allowed_models": [1]}', b'{"allowed_models": [""]}',
    b'{"expires_at": "yesterday"}', b'{"expires_at": 1700000000}', b'{"expires_at": "9999-12-31T23:59:59-14:00"}',
    b'{"expires_at": "0001-01-01T00:00:00+14:00"}', b'{"expires_at": "2026-02-30T00:00:00Z"}',
    b'{"grace_period_s": "10"}', b'{"grace_period_s": -1}', b'{"grace_period_s": 1e30}',
    b'{"grace_period_s": 99999999999999999999999}', b'{"unknown_field": 1}',
    b'{"start": "garbage"}', b'{"api_key_id": -5}', b'{"api_key_id": "' + HUGE_ID.encode() + b'"}',
    b'{"group_by": ["model"]}', b'{"format": "xml"}',
]

# Query strings every GET endpoint with parameters must refuse.
BAD_QUERIES = {
    "/v1/audit": ["limit=0", "limit=-1", "limit=abc", f"limit={HUGE_ID}", "limit=1e3", "before_id=1.5",
                  f"before_id={HUGE_ID}", f"target_id={INT64_PAST}", "target_type=user", "tenant=",
                  "tenant=" + "t" * 300, "tenant=no-such-tenant", "action=" + "a" * 100, "nope=1",
                  "limit=%00", "before_id=%EF%BF%BD"],
    "/v1/usage": ["start=garbage", "end=2026-13-01", "start=9999-12-31T23:59:59-14:00",
                  "end=0001-01-01T00:00:00%2B14:00", "start=2026-02-01&end=2026-01-01",
                  "group_by=user", "format=xml", f"api_key_id={HUGE_ID}", f"api_key_id={INT64_PAST}",
                  "api_key_id=-1", "api_key_id=abc", "tenant=no-such-tenant", "tenant=" + "t" * 300,
                  "model=" + "m" * 300, "nope=1", "start=%00", "format=csv&start=garbage",
                  "format=csv&group_by=user"],
    "/v1/api-keys": ["tenant=no-such-tenant"],
}


@pytest.fixture(scope="module")
def app(module_app):
    return module_app


@pytest.fixture(scope="module")
def client(module_app):
    return module_app.test_client()


@pytest.fixture(scope="module")
def callers(client) -> dict[str, dict]:
    """Headers of the system secret and of a tenant admin key, and a key id and tenant id to aim at."""
    tenant = client.post("/v1/tenants", headers=SYSTEM, json={"name": "fuzz-tenant", "budget_usd": "10"})
    assert tenant.status_code == 201, tenant.get_json()
    admin = client.post("/v1/api-keys", headers=SYSTEM, json={"name": "fuzz-admin", "tenant": "fuzz-tenant",
                                                             "role": "admin"}).get_json()
    member = client.post("/v1/api-keys", headers=SYSTEM, json={"name": "fuzz-member",
                                                              "tenant": "fuzz-tenant"}).get_json()
    return {"system": SYSTEM, "admin": {"Authorization": f"Bearer {admin['key']}"},
            "member_id": member["id"], "tenant_id": tenant.get_json()["id"]}


def assert_envelope(resp, what: str) -> dict:
    """A 4xx answer whose body is exactly the OpenAI error envelope (no trace, no HTML)."""
    text = resp.get_data(as_text=True)
    assert 400 <= resp.status_code < 500, (what, resp.status_code, text[:500])
    assert resp.mimetype == "application/json", (what, resp.mimetype, text[:200])
    body = json.loads(text)
    assert set(body) == {"error"} and set(body["error"]) == ENVELOPE, (what, body)
    assert body["error"]["message"] and "Traceback" not in text, (what, body)
    return body["error"]


def body_targets(callers: dict) -> list[tuple[str, str]]:
    key_id, tenant_id = callers["member_id"], callers["tenant_id"]
    return [("POST", "/v1/tenants"), ("PATCH", f"/v1/tenants/{tenant_id}"), ("POST", "/v1/api-keys"),
            ("PATCH", f"/v1/api-keys/{key_id}"), ("POST", f"/v1/api-keys/{key_id}/rotate"),
            ("POST", "/v1/usage")]


@pytest.mark.parametrize("who", ["system", "admin"])
def test_bad_json_bodies_are_4xx_envelopes(client, callers, who):
    """Every malformed, mistyped, non-finite or out-of-range body sent to the JSON endpoints is
    a 4xx envelope; the key aimed at keeps its secret (nothing was rotated or changed)."""
    headers = callers[who]
    before = client.get(f"/v1/api-keys/{callers['member_id']}", headers=SYSTEM).get_json()
    for method, path in body_targets(callers):
        for body in BAD_BODIES:
            resp = client.open(path, method=method, data=body, content_type="application/json", headers=headers)
            assert_envelope(resp, f"{who} {method} {path} {body[:60]!r}")
    after = client.get(f"/v1/api-keys/{callers['member_id']}", headers=SYSTEM).get_json()
    assert after == before


@pytest.mark.parametrize("who", ["system", "admin"])
def test_bad_query_strings_are_4xx_envelopes(client, callers, who):
    """Wrong types, unknown parameters, out-of-range ids and dates in query strings of audit,
    usage (JSON and CSV) and the key list are 4xx envelopes."""
    for path, queries in BAD_QUERIES.items():
        for query in queries:
            for accept in ("application/json", "text/csv"):
                resp = client.get(f"{path}?{query}", headers={**callers[who], "Accept": accept})
                assert_envelope(resp, f"{who} GET {path}?{query[:60]} ({accept})")


@pytest.mark.parametrize("who", ["system", "admin"])
@pytest.mark.parametrize("method,template", [
    ("GET", "/v1/tenants/{}"), ("PATCH", "/v1/tenants/{}"), ("GET", "/v1/api-keys/{}"),
    ("PATCH", "/v1/api-keys/{}"), ("DELETE", "/v1/api-keys/{}"), ("POST", "/v1/api-keys/{}/rotate"),
])
def test_unknown_and_out_of_range_ids_are_404_envelopes(client, callers, who, method, template):
    """Ids that do not exist, zero, past the 64-bit range or not numbers are 404 envelopes (never
    a database error turned into a 500)."""
    for key_id in ("0", "424242", "9223372036854775807", INT64_PAST, HUGE_ID, "-1", "abc", "1.5"):
        body = {"name": "x"} if method == "PATCH" else None
        resp = client.open(template.format(key_id), method=method, json=body, headers=callers[who])
        err = assert_envelope(resp, f"{who} {method} {template.format(key_id)}")
        if who == "system" or "/api-keys/" in template:
            assert resp.status_code == 404, (method, template, key_id, resp.status_code, err)


@pytest.mark.parametrize("model", ["no-such-model", "a/b/c", "m" * 5000, "..%2F..%2Fetc", "demo%0A",
                                   "é"])
def test_uptime_of_unknown_or_odd_model_names_is_404(client, callers, model):
    """GET /v1/uptime/<model> with a model that does not exist (slashes, control characters,
    very long names included) is a 404 envelope, for a key and without one a 401. (A NUL in
    it is a 400 before any of this: Testing/api/test_bad_input_sweep.py.)"""
    resp = client.get(f"/v1/uptime/{model}", headers=callers["admin"])
    assert_envelope(resp, model[:40])
    assert resp.status_code == 404
    anonymous = client.get(f"/v1/uptime/{model}")
    assert_envelope(anonymous, model[:40])
    assert anonymous.status_code == (404 if "%0A" in model else 401)  # a newline matches no route


@pytest.mark.parametrize("headers", [{}, {"X-System-Secret": "wrong"}, {"X-System-Secret": ""},
                                     {"Authorization": "Bearer sk-nope"}, {"Authorization": "Basic abc"},
                                     {"X-System-Secret": "x" * 10_000}])
def test_providers_status_refuses_bad_credentials_with_envelopes(client, headers):
    """GET /v1/providers/status without valid credentials is a 401 envelope, never a 500."""
    resp = client.get("/v1/providers/status?verbose=1", headers=headers)
    assert_envelope(resp, str(headers)[:60])
    assert resp.status_code == 401
