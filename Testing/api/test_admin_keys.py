"""Admin API of keys (`X-System-Secret`): minting (documented fields, exact money, tenants
created once), listing without secrets, revoking, the secret check, strict validation of the
mint body, and key expiry."""
from __future__ import annotations

import hashlib
import json
import secrets
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from sqlalchemy import text

from Testing.conftest import app_config, close_app, minter, start_app
from Testing.support import SYSTEM_SECRET

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def shared_client(module_app):
    """The module's app: for tests that need no empty tables (they compare counts)."""
    return module_app.test_client()


@pytest.fixture
def shared_mint(shared_client, admin_headers):
    return minter(shared_client, admin_headers)


def counts(engine) -> tuple[int, int, int]:
    """(tenants, api keys, revoked api keys)."""
    with engine.connect() as conn:
        return tuple(conn.execute(text(
            "SELECT (SELECT count(*) FROM tenants), (SELECT count(*) FROM api_keys), "
            "(SELECT count(*) FROM api_keys WHERE revoked_at IS NOT NULL)")).one())


DOCUMENTED = {"id", "key", "prefix", "name", "tenant", "rpm_limit", "tpm_limit", "daily_token_limit",
              "max_concurrent", "budget_usd", "allowed_models", "expires_at", "created_at"}
ENVELOPE = {"message", "type", "param", "code"}


def error_of(resp, status: int) -> dict:
    assert resp.status_code == status, (resp.status_code, resp.get_data(as_text=True))
    body = resp.get_json()
    assert set(body) == {"error"} and set(body["error"]) == ENVELOPE, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def bearer(key: dict | str) -> dict:
    return {"Authorization": f"Bearer {key['key'] if isinstance(key, dict) else key}"}


def test_mint_returns_documented_fields(mint, clean_db):
    """Minting answers 201 with every documented field and an sk- key whose sha256 is stored."""
    before = datetime.now(timezone.utc)
    body = mint(name="svc", tenant="acme", rpm_limit=10, tpm_limit=1000, daily_token_limit=50000,
                max_concurrent=2, budget_usd="12.50", allowed_models=["demo"],
                expires_at="2030-01-01T00:00:00Z")
    after = datetime.now(timezone.utc)
    assert DOCUMENTED <= set(body), DOCUMENTED - set(body)
    assert isinstance(body["id"], int)
    assert body["key"].startswith("sk-") and len(body["key"]) >= 46
    assert body["key"].startswith(body["prefix"]) and len(body["prefix"]) < len(body["key"]) - 32
    assert (body["name"], body["tenant"]) == ("svc", "acme")
    assert (body["rpm_limit"], body["tpm_limit"], body["daily_token_limit"], body["max_concurrent"]) \
        == (10, 1000, 50000, 2)
    assert body["allowed_models"] == ["demo"]
    assert body["expires_at"] == "2030-01-01T00:00:00Z"
    created = datetime.fromisoformat(body["created_at"].replace("Z", "+00:00"))
    assert before <= created <= after  # set by the request itself (no bound on how long it took)
    with clean_db.connect() as conn:
        row = conn.execute(text("SELECT key_hash, prefix FROM api_keys WHERE id = :i"),
                           {"i": body["id"]}).one()
    assert row.key_hash == hashlib.sha256(body["key"].encode()).hexdigest()
    assert row.prefix == body["prefix"]


def test_mint_defaults_are_null_limits(shared_client, admin_headers):
    """A key minted with only a name has no limits, budget, model list or expiry; tenant "default"."""
    resp = shared_client.post("/v1/api-keys", json={"name": "plain"}, headers=admin_headers)
    assert resp.status_code == 201
    body = resp.get_json()
    assert body["tenant"] == "default"
    for f in ("rpm_limit", "tpm_limit", "daily_token_limit", "max_concurrent", "budget_usd",
              "allowed_models", "expires_at"):
        assert body[f] is None, f


def test_minted_keys_are_unique(shared_mint):
    """Two mints give two different keys and prefixes."""
    a, b = shared_mint(), shared_mint()
    assert a["key"] != b["key"] and a["prefix"] != b["prefix"] and a["id"] != b["id"]


@pytest.mark.parametrize("given, stored", [
    ("12.50", Decimal("12.5")),
    (3, Decimal("3")),
    ("0.1", Decimal("0.1")),
    (0.1, Decimal("0.1")),
    ("0.0000000001", Decimal("0.0000000001")),
])
def test_budget_usd_round_trips_exactly(shared_mint, pg_engine, given, stored):
    """budget_usd (string or number) is stored as exact NUMERIC and returned as an equal decimal string."""
    body = shared_mint(budget_usd=given)
    assert isinstance(body["budget_usd"], str)
    assert Decimal(body["budget_usd"]) == stored
    with pg_engine.connect() as conn:
        value = conn.execute(text("SELECT budget_usd FROM api_keys WHERE id = :i"),
                             {"i": body["id"]}).scalar_one()
    assert isinstance(value, Decimal) and value == stored


@pytest.mark.parametrize("given", ["12.50", 3, 100, "2500.00"])
def test_budget_usd_is_shown_in_plain_notation(shared_mint, given):
    """budget_usd is returned in plain notation ("100"), never exponent notation ("1E+2")."""
    body = shared_mint(budget_usd=given)
    assert "E" not in body["budget_usd"].upper(), body["budget_usd"]
    assert Decimal(body["budget_usd"]) == Decimal(str(given))


def test_tenant_created_on_first_use_and_reused(mint, clean_db):
    """The first key of a tenant creates its row; later keys of that tenant reuse it."""
    a = mint(tenant="acme")
    b = mint(tenant="acme")
    c = mint(tenant="globex")
    with clean_db.connect() as conn:
        tenants = conn.execute(text("SELECT id, name FROM tenants ORDER BY id")).all()
        key_tenants = dict(conn.execute(text("SELECT id, tenant_id FROM api_keys")).all())
    assert [t.name for t in tenants] == ["acme", "globex"]
    assert key_tenants[a["id"]] == key_tenants[b["id"]] == tenants[0].id
    assert key_tenants[c["id"]] == tenants[1].id


def test_list_keys_never_shows_secrets(client, mint, admin_headers, clean_db):
    """GET /v1/api-keys lists every key without its plaintext or its hash."""
    a, b = mint(name="a"), mint(name="b", tenant="other")
    resp = client.get("/v1/api-keys", headers=admin_headers)
    assert resp.status_code == 200
    body = resp.get_json()
    assert body["object"] == "list"
    assert [(k["id"], k["name"], k["prefix"]) for k in body["data"]] == \
        [(a["id"], "a", a["prefix"]), (b["id"], "b", b["prefix"])]
    raw = resp.get_data(as_text=True)
    with clean_db.connect() as conn:
        hashes = conn.execute(text("SELECT key_hash FROM api_keys")).scalars().all()
    for secret in [a["key"], b["key"], *hashes]:
        assert secret not in raw
    assert "key_hash" not in raw
    assert all("key" not in k for k in body["data"])


def test_revoke_key_then_401(client, mint, admin_headers, clean_db):
    """DELETE /v1/api-keys/<id> sets revoked_at, and the key (even if cached) then gets 401."""
    key = mint()
    assert client.get("/v1/models", headers=bearer(key)).status_code == 200  # now in the auth cache
    resp = client.delete(f"/v1/api-keys/{key['id']}", headers=admin_headers)
    assert resp.status_code == 200
    assert resp.get_json()["id"] == key["id"] and resp.get_json()["revoked_at"] is not None
    assert key["key"] not in resp.get_data(as_text=True)
    with clean_db.connect() as conn:
        assert conn.execute(text("SELECT revoked_at FROM api_keys WHERE id = :i"),
                            {"i": key["id"]}).scalar_one() is not None
    err = error_of(client.get("/v1/models", headers=bearer(key)), 401)
    assert err["code"] == "invalid_api_key" and "revoked" in err["message"]


def test_revoke_unknown_key_404(shared_client, admin_headers):
    """DELETE of an id that does not exist answers the 404 envelope."""
    err = error_of(shared_client.delete("/v1/api-keys/999999", headers=admin_headers), 404)
    assert err["code"] == "not_found" and err["type"] == "invalid_request_error"


@pytest.mark.parametrize("headers", [{}, {"X-System-Secret": ""}, {"X-System-Secret": "wrong"},
                                     {"X-System-Secret": SYSTEM_SECRET + "x"},
                                     {"Authorization": f"Bearer {SYSTEM_SECRET}"}])
@pytest.mark.parametrize("method, path, body", [
    ("post", "/v1/api-keys", {"name": "x"}), ("get", "/v1/api-keys", None),
    ("delete", "/v1/api-keys/{id}", None)])
def test_admin_api_requires_system_secret(shared_client, shared_mint, pg_engine, headers, method, path,
                                         body):
    """Missing or wrong X-System-Secret -> 401 envelope; nothing is minted or revoked. The system
    secret sent as a Bearer token is taken for an (unknown) API key: 401 invalid_api_key."""
    key = shared_mint()
    path = path.replace("{id}", str(key["id"]))
    before = counts(pg_engine)
    resp = getattr(shared_client, method)(path, headers=headers, json=body)
    err = error_of(resp, 401)
    assert err["code"] == ("invalid_api_key" if "Authorization" in headers else "invalid_system_secret")
    assert key["key"] not in resp.get_data(as_text=True)
    assert counts(pg_engine) == before


def test_admin_api_disabled_without_system_secret(pg_url, models_file, pg_engine):
    """With SYSTEM_SECRET empty the admin API answers 503 naming SYSTEM_SECRET, whatever is sent."""
    application = start_app(app_config(pg_url, models_file, SYSTEM_SECRET=""))
    before = counts(pg_engine)
    try:
        c = application.test_client()
        for headers in ({}, {"X-System-Secret": ""}, {"X-System-Secret": SYSTEM_SECRET}):
            err = error_of(c.post("/v1/api-keys", json={"name": "x"}, headers=headers), 503)
            assert "SYSTEM_SECRET" in err["message"]
            assert "SYSTEM_SECRET" in error_of(c.get("/v1/api-keys", headers=headers), 503)["message"]
    finally:
        close_app(application)
    assert counts(pg_engine) == before


STRICT_CASES = [
    ({"rpm_limit": "10"}, "rpm_limit"),
    ({"rpm_limit": 1.5}, "rpm_limit"),
    ({"rpm_limit": 0}, "rpm_limit"),
    ({"rpm_limit": True}, "rpm_limit"),
    ({"tpm_limit": -1}, "tpm_limit"),
    ({"max_concurrent": "2"}, "max_concurrent"),
    ({"budget_usd": True}, "budget_usd"),
    ({"budget_usd": "abc"}, "budget_usd"),
    ({"budget_usd": "-1"}, "budget_usd"),
    ({"budget_usd": "NaN"}, "budget_usd"),
    ({"budget_usd": "1e400"}, "budget_usd"),
    ({"budget_usd": "100000000000"}, "budget_usd"),
    ({"rpm_limit": 2 ** 31}, "rpm_limit"),
    ({"name": None}, "name"),
    ({"name": 5}, "name"),
    ({"name": ""}, "name"),
    ({"tenant": 7}, "tenant"),
    ({"allowed_models": "demo"}, "allowed_models"),
    ({"bogus_field": 1}, "bogus_field"),
    ({"expires_at": "not a date"}, "expires_at"),
]


@pytest.mark.parametrize("fields, param", STRICT_CASES,
                         ids=[json.dumps(f, separators=(",", ":")) for f, _ in STRICT_CASES])
def test_mint_strict_validation(shared_client, admin_headers, pg_engine, fields, param):
    """Each wrong type, out-of-range value or unknown mint field -> 400 naming it; nothing is created."""
    body = {"name": "k", "tenant": "strict-" + secrets.token_hex(4), **fields}
    before = counts(pg_engine)
    err = error_of(shared_client.post("/v1/api-keys", json=body, headers=admin_headers), 400)
    assert err["param"] == param, err
    assert err["type"] == "invalid_request_error"
    assert counts(pg_engine) == before


def test_mint_requires_name(shared_client, admin_headers):
    """A mint body without `name` -> 400 with param "name"."""
    err = error_of(shared_client.post("/v1/api-keys", json={"tenant": "acme"}, headers=admin_headers), 400)
    assert err["param"] == "name"


@pytest.mark.parametrize("data", [b"", b"{not json", b"[1, 2]"])
def test_mint_body_must_be_a_json_object(shared_client, admin_headers, data):
    """An empty, malformed or non-object mint body -> 400 invalid_json."""
    resp = shared_client.post("/v1/api-keys", data=data, content_type="application/json", headers=admin_headers)
    assert error_of(resp, 400)["code"] == "invalid_json"


def test_key_expiry(clocked_app, clock):
    """A key works until its expires_at, then gets 401 saying it expired (even from the cache:
    the app's clock is moved past the expiry, nothing sleeps)."""
    c = clocked_app.test_client()
    expires = clock.now() + timedelta(seconds=60)
    resp = c.post("/v1/api-keys", json={"name": "short", "expires_at": expires.isoformat()},
                  headers={"X-System-Secret": SYSTEM_SECRET})
    assert resp.status_code == 201, resp.get_json()
    key = resp.get_json()
    assert datetime.fromisoformat(key["expires_at"].replace("Z", "+00:00")) == expires
    assert c.get("/v1/models", headers=bearer(key)).status_code == 200
    clock.advance(59.9)
    assert c.get("/v1/models", headers=bearer(key)).status_code == 200
    clock.advance(0.1)
    err = error_of(c.get("/v1/models", headers=bearer(key)), 401)
    assert err["code"] == "invalid_api_key" and "expired" in err["message"]
    chat = c.post("/v1/chat/completions", headers=bearer(key),
                  json={"model": "demo", "messages": [{"role": "user", "content": "hi"}]})
    assert "expired" in error_of(chat, 401)["message"]


def test_key_expired_at_mint_is_refused_at_use(shared_mint, shared_client):
    """A key minted with an expiry in the past never authenticates."""
    key = shared_mint(expires_at="2001-01-01T00:00:00Z")
    err = error_of(shared_client.get("/v1/models", headers=bearer(key)), 401)
    assert "expired" in err["message"]
