"""Tenants and the key lifecycle through the admin API (in-process): creating and updating
tenants, suspension, defaults and ceilings of a tenant's keys (a tenant admin never goes above
them), PATCH of a key, rotation with and without a grace period, expiry set by PATCH,
revocation, and the audit rows each change leaves."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import text

from Testing.support import SYSTEM_SECRET, error, ok

pytestmark = pytest.mark.timeout(60)

SYSTEM = {"X-System-Secret": SYSTEM_SECRET}
CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def bearer(key: dict | str) -> dict:
    return {"Authorization": f"Bearer {key['key'] if isinstance(key, dict) else key}"}


@pytest.fixture
def tenant(client):
    return ok(client.post("/v1/tenants", headers=SYSTEM, json={
        "name": "lifeco", "budget_usd": "100", "key_limits": {"rpm_limit": 60, "tpm_limit": 10000}}), 201)


@pytest.fixture
def tadmin(client, tenant):
    return ok(client.post("/v1/api-keys", headers=SYSTEM, json={"name": "lifeco-admin", "tenant": "lifeco",
                                                                "role": "admin"}), 201)


def audit(engine) -> list[dict]:
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(text("SELECT * FROM audit_log ORDER BY id"))]


# --- tenants ------------------------------------------------------------------------------------

def test_create_read_list_update_tenant(client, tenant, clean_db):
    """POST creates a tenant with its budget and key limits; GET reads and lists it; PATCH changes
    only what it names; a duplicate name is 409; each change leaves an audit row."""
    assert tenant["name"] == "lifeco" and tenant["status"] == "active" and tenant["budget_usd"] == "100"
    assert tenant["key_limits"] == {"rpm_limit": 60, "tpm_limit": 10000, "daily_token_limit": None,
                                    "max_concurrent": None}
    assert ok(client.get(f"/v1/tenants/{tenant['id']}", headers=SYSTEM)) == tenant
    assert [t["name"] for t in ok(client.get("/v1/tenants", headers=SYSTEM))["data"]] == ["lifeco"]
    assert error(client.post("/v1/tenants", headers=SYSTEM, json={"name": "lifeco"}), 409)["param"] == "name"
    changed = ok(client.patch(f"/v1/tenants/{tenant['id']}", headers=SYSTEM,
                              json={"budget_usd": "250.5", "key_limits": {"max_concurrent": 3}}))
    assert changed["budget_usd"] == "250.5"
    assert changed["key_limits"] == {**tenant["key_limits"], "max_concurrent": 3}
    rows = audit(clean_db)
    assert [(r["action"], r["actor_type"], r["tenant_id"]) for r in rows] == \
        [("tenant.create", "system", tenant["id"]), ("tenant.update", "system", tenant["id"])]
    assert rows[1]["details"] == {"budget_usd": ["100", "250.5"], "max_concurrent": [None, 3]}
    assert error(client.get("/v1/tenants/999", headers=SYSTEM), 404)["code"] == "not_found"


def test_tenant_created_by_the_first_key_is_audited(client, clean_db):
    """A key minted by the system secret into a tenant that does not exist yet creates it, and
    the audit log shows that creation (actor system) before the key's; a second key into the same
    tenant creates nothing more."""
    first = ok(client.post("/v1/api-keys", headers=SYSTEM, json={"name": "a", "tenant": "newco"}), 201)
    ok(client.post("/v1/api-keys", headers=SYSTEM, json={"name": "b", "tenant": "newco"}), 201)
    rows = audit(clean_db)
    assert [(r["action"], r["actor_type"], r["tenant_id"]) for r in rows] == [
        ("tenant.create", "system", first["tenant_id"]), ("key.create", "system", first["tenant_id"]),
        ("key.create", "system", first["tenant_id"])]
    assert rows[0]["target_id"] == first["tenant_id"] and rows[0]["details"]["name"] == "newco"
    listed = ok(client.get("/v1/audit?action=tenant.create", headers=SYSTEM))["data"]
    assert [e["target"] for e in listed] == [{"type": "tenant", "id": first["tenant_id"]}]


@pytest.mark.parametrize("body,param", [
    ({}, "name"), ({"name": ""}, "name"), ({"name": 5}, "name"), ({"name": "x", "status": "gone"}, "status"),
    ({"name": "x", "budget_usd": "-1"}, "budget_usd"), ({"name": "x", "key_limits": {"rpm_limit": 0}},
                                                        "key_limits.rpm_limit"),
    ({"name": "x", "key_limits": {"bogus": 1}}, "key_limits.bogus"), ({"name": "x", "extra": 1}, "extra"),
])
def test_tenant_validation(client, clean_db, body, param):
    """Bad tenant fields are 400 naming the field; nothing is created."""
    assert error(client.post("/v1/tenants", headers=SYSTEM, json=body), 400)["param"] == param
    assert ok(client.get("/v1/tenants", headers=SYSTEM))["data"] == []


def test_suspension_stops_every_key_of_the_tenant_at_once(client, tenant, tadmin, clean_db):
    """Suspending a tenant makes all its keys 401 at once (cached or not), other tenants' keys
    keep working, and reactivating brings them back."""
    member = ok(client.post("/v1/api-keys", headers=bearer(tadmin), json={"name": "m"}), 201)
    other = ok(client.post("/v1/api-keys", headers=SYSTEM, json={"name": "o", "tenant": "globex"}), 201)
    for k in (tadmin, member, other):
        assert client.get("/v1/models", headers=bearer(k)).status_code == 200  # now cached
    ok(client.patch(f"/v1/tenants/{tenant['id']}", headers=SYSTEM, json={"status": "suspended"}))
    for k in (tadmin, member):
        assert "suspended" in error(client.get("/v1/models", headers=bearer(k)), 401)["message"]
        assert error(client.post("/v1/chat/completions", headers=bearer(k), json=CHAT), 401)
    assert client.get("/v1/models", headers=bearer(other)).status_code == 200
    ok(client.patch(f"/v1/tenants/{tenant['id']}", headers=SYSTEM, json={"status": "active"}))
    assert client.post("/v1/chat/completions", headers=bearer(member), json=CHAT).status_code == 200


# --- defaults and ceilings --------------------------------------------------------------------

def test_new_keys_get_the_tenant_key_limits_as_defaults(client, tenant, tadmin):
    """A key that does not name a limit gets the tenant's; one that names it keeps its own."""
    k = ok(client.post("/v1/api-keys", headers=bearer(tadmin), json={"name": "d"}), 201)
    assert (k["rpm_limit"], k["tpm_limit"], k["max_concurrent"]) == (60, 10000, None)
    k = ok(client.post("/v1/api-keys", headers=bearer(tadmin), json={"name": "d", "rpm_limit": 5}), 201)
    assert (k["rpm_limit"], k["tpm_limit"]) == (5, 10000)


@pytest.mark.parametrize("fields,param", [
    ({"rpm_limit": 61}, "rpm_limit"), ({"rpm_limit": None}, "rpm_limit"), ({"tpm_limit": 10001}, "tpm_limit"),
    ({"budget_usd": "100.01"}, "budget_usd"),
])
def test_tenant_admin_cannot_exceed_the_tenant(client, tenant, tadmin, clean_db, fields, param):
    """A tenant admin can neither mint nor PATCH a key above the tenant's key limits (no limit
    counts as above) or above the tenant's budget: 403 naming the field, nothing changes. At
    the limit is fine; the system secret may go above."""
    before = ok(client.get("/v1/api-keys", headers=SYSTEM))["data"]
    err = error(client.post("/v1/api-keys", headers=bearer(tadmin), json={"name": "x", **fields}), 403)
    assert (err["param"], err["code"]) == (param, "exceeds_tenant_limits")
    assert ok(client.get("/v1/api-keys", headers=SYSTEM))["data"] == before
    member = ok(client.post("/v1/api-keys", headers=bearer(tadmin), json={
        "name": "m", "rpm_limit": 60, "tpm_limit": 10000, "budget_usd": "100"}), 201)
    err = error(client.patch(f"/v1/api-keys/{member['id']}", headers=bearer(tadmin), json=fields), 403)
    assert err["param"] == param
    assert ok(client.get(f"/v1/api-keys/{member['id']}", headers=SYSTEM))["rpm_limit"] == 60
    assert ok(client.get(f"/v1/api-keys/{member['id']}", headers=SYSTEM))["budget_usd"] == "100"
    assert ok(client.patch(f"/v1/api-keys/{member['id']}", headers=SYSTEM, json=fields))


def test_tenant_budget_bounds_a_key_without_budget(client, clean_db):
    """A tenant's budget is enforced on its keys through the limiter even when the key has no
    budget of its own: a tenant with budget 0 gets 429 insufficient_quota."""
    ok(client.post("/v1/tenants", headers=SYSTEM, json={"name": "broke", "budget_usd": "0"}), 201)
    k = ok(client.post("/v1/api-keys", headers=SYSTEM, json={"name": "k", "tenant": "broke"}), 201)
    assert k["budget_usd"] is None
    assert error(client.post("/v1/chat/completions", headers=bearer(k), json=CHAT), 429)["code"] == \
        "insufficient_quota"


# --- PATCH, rotate, revoke, expiry ------------------------------------------------------------

def test_patch_key_changes_fields_and_takes_effect(client, tenant, tadmin, clean_db):
    """PATCH sets name, limits, budget, allowed models and expiry (null clears); the running app
    uses the new values at once; unknown fields and an empty body are 400."""
    k = ok(client.post("/v1/api-keys", headers=bearer(tadmin), json={"name": "p"}), 201)
    assert [m["id"] for m in ok(client.get("/v1/models", headers=bearer(k)))["data"]].count("demo") == 1
    body = ok(client.patch(f"/v1/api-keys/{k['id']}", headers=bearer(tadmin), json={
        "name": "renamed", "rpm_limit": 10, "budget_usd": "1.5", "allowed_models": ["gpt-4o-mini"],
        "expires_at": "2031-01-01T00:00:00Z"}))
    assert (body["name"], body["rpm_limit"], body["budget_usd"], body["allowed_models"], body["expires_at"]) \
        == ("renamed", 10, "1.5", ["gpt-4o-mini"], "2031-01-01T00:00:00Z")
    assert [m["id"] for m in ok(client.get("/v1/models", headers=bearer(k)))["data"]] == ["gpt-4o-mini"]
    assert error(client.post("/v1/chat/completions", headers=bearer(k), json=CHAT), 403)["code"] == \
        "model_not_allowed"
    body = ok(client.patch(f"/v1/api-keys/{k['id']}", headers=SYSTEM, json={"allowed_models": None,
                                                                             "expires_at": None}))
    assert body["allowed_models"] is None and body["expires_at"] is None
    assert error(client.patch(f"/v1/api-keys/{k['id']}", headers=SYSTEM, json={}), 400)
    assert error(client.patch(f"/v1/api-keys/{k['id']}", headers=SYSTEM, json={"role": "admin"}), 400)["param"] \
        == "role"
    assert error(client.patch(f"/v1/api-keys/{k['id']}", headers=SYSTEM, json={"rpm_limit": "5"}), 400)
    updates = [r for r in audit(clean_db) if r["action"] == "key.update"]
    assert [(r["actor_type"], r["actor_key_id"]) for r in updates] == [("key", tadmin["id"]), ("system", None)]
    assert updates[0]["details"]["name"] == ["p", "renamed"]
    assert updates[0]["details"]["budget_usd"] == [None, "1.5"]


def test_expiry_set_by_patch_is_enforced_at_once(client, tadmin, clean_db):
    """A key whose expires_at is PATCHed into the past is refused on its next request."""
    k = ok(client.post("/v1/api-keys", headers=bearer(tadmin), json={"name": "e"}), 201)
    assert client.get("/v1/models", headers=bearer(k)).status_code == 200
    past = (datetime.now(timezone.utc) - timedelta(seconds=1)).isoformat()
    ok(client.patch(f"/v1/api-keys/{k['id']}", headers=bearer(tadmin), json={"expires_at": past}))
    assert "expired" in error(client.get("/v1/models", headers=bearer(k)), 401)["message"]


def test_rotate_without_grace_stops_the_old_secret_now(client, tadmin, clean_db):
    """Rotation returns a new secret (same id, limits and usage); with the default grace of zero
    the old secret is refused at once, even though it was cached."""
    k = ok(client.post("/v1/api-keys", headers=bearer(tadmin), json={"name": "r", "rpm_limit": 7}), 201)
    assert client.get("/v1/models", headers=bearer(k)).status_code == 200
    rotated = ok(client.post(f"/v1/api-keys/{k['id']}/rotate", headers=bearer(tadmin)))
    assert rotated["id"] == k["id"] and rotated["rpm_limit"] == 7
    assert rotated["key"] != k["key"] and rotated["key"].startswith(rotated["prefix"])
    assert rotated["previous_key_expires_at"] is None and rotated["rotated_at"]
    assert error(client.get("/v1/models", headers=bearer(k)), 401)
    assert client.post("/v1/chat/completions", headers=bearer(rotated), json=CHAT).status_code == 200
    row = [r for r in audit(clean_db) if r["action"] == "key.rotate"][0]
    assert row["details"] == {"previous_prefix": k["prefix"], "prefix": rotated["prefix"], "grace_period_s": 0}
    assert k["key"] not in str(audit(clean_db)) and rotated["key"] not in str(audit(clean_db))


def test_rotate_with_grace_keeps_the_old_secret_until_it_ends(clocked_app, clock, clean_db):
    """With grace_period_s the old secret keeps working (with the new one) until the grace ends,
    then gets 401 saying the key was rotated; rotating again ends an earlier grace at once. The
    test moves the app's clock (the old secret is cached meanwhile: the cache must not extend it)."""
    c = clocked_app.test_client()
    k = ok(c.post("/v1/api-keys", headers=SYSTEM, json={"name": "g"}), 201)
    assert c.get("/v1/models", headers=bearer(k)).status_code == 200
    rotated = ok(c.post(f"/v1/api-keys/{k['id']}/rotate", headers=SYSTEM, json={"grace_period_s": 90}))
    assert rotated["previous_key_expires_at"] == (clock.now() + timedelta(seconds=90)).isoformat() \
        .replace("+00:00", "Z")
    for _ in range(3):
        assert c.get("/v1/models", headers=bearer(k)).status_code == 200
        assert c.get("/v1/models", headers=bearer(rotated)).status_code == 200
    clock.advance(89.9)
    assert c.get("/v1/models", headers=bearer(k)).status_code == 200
    clock.advance(0.2)
    assert "rotated" in error(c.get("/v1/models", headers=bearer(k)), 401)["message"]
    assert c.get("/v1/models", headers=bearer(rotated)).status_code == 200
    again = ok(c.post(f"/v1/api-keys/{k['id']}/rotate", headers=SYSTEM, json={"grace_period_s": 60}))
    third = ok(c.post(f"/v1/api-keys/{k['id']}/rotate", headers=SYSTEM, json={"grace_period_s": 60}))
    assert error(c.get("/v1/models", headers=bearer(rotated)), 401)  # two rotations ago: gone
    assert c.get("/v1/models", headers=bearer(again)).status_code == 200  # in its grace
    assert c.get("/v1/models", headers=bearer(third)).status_code == 200
    assert error(c.post(f"/v1/api-keys/{k['id']}/rotate", headers=SYSTEM, json={"grace_period_s": -1}),
                 400)["param"] == "grace_period_s"
    ok(c.delete(f"/v1/api-keys/{k['id']}", headers=SYSTEM))
    for secret in (again, third):  # revoking ends the grace too
        assert "revoked" in error(c.get("/v1/models", headers=bearer(secret)), 401)["message"]
    assert error(c.post(f"/v1/api-keys/{k['id']}/rotate", headers=SYSTEM), 409)["code"] == "key_revoked"
    assert error(c.patch(f"/v1/api-keys/{k['id']}", headers=SYSTEM, json={"name": "z"}), 409)


def test_tenant_admin_revokes_a_key_of_its_tenant(client, tadmin, clean_db):
    """A tenant admin revokes its tenant's key: 401 at once; revoking twice is idempotent and
    leaves one audit row naming the admin key as the actor."""
    k = ok(client.post("/v1/api-keys", headers=bearer(tadmin), json={"name": "v"}), 201)
    assert client.get("/v1/models", headers=bearer(k)).status_code == 200
    for _ in range(2):
        assert ok(client.delete(f"/v1/api-keys/{k['id']}", headers=bearer(tadmin)))["revoked_at"]
    assert "revoked" in error(client.get("/v1/models", headers=bearer(k)), 401)["message"]
    rows = [r for r in audit(clean_db) if r["action"] == "key.revoke"]
    assert [(r["actor_type"], r["actor_key_id"], r["target_id"]) for r in rows] == [("key", tadmin["id"], k["id"])]


def test_audit_endpoint_lists_newest_first_with_paging(client, tadmin, clean_db):
    """GET /v1/audit answers the rows newest first, filters by action, and pages with before_id."""
    k = ok(client.post("/v1/api-keys", headers=bearer(tadmin), json={"name": "a"}), 201)
    ok(client.patch(f"/v1/api-keys/{k['id']}", headers=bearer(tadmin), json={"name": "b"}))
    ok(client.delete(f"/v1/api-keys/{k['id']}", headers=bearer(tadmin)))
    body = ok(client.get("/v1/audit", headers=bearer(tadmin)))
    actions = [e["action"] for e in body["data"]]
    assert actions == ["key.revoke", "key.update", "key.create", "key.create", "tenant.create"]
    assert body["data"][0]["actor"] == {"type": "key", "api_key_id": tadmin["id"], "name": f"key:{tadmin['id']}"}
    assert body["data"][0]["target"] == {"type": "api_key", "id": k["id"]}
    page = ok(client.get("/v1/audit?limit=2", headers=SYSTEM))
    assert page["has_more"] is True and len(page["data"]) == 2
    rest = ok(client.get(f"/v1/audit?limit=10&before_id={page['data'][-1]['id']}", headers=SYSTEM))
    assert [e["id"] for e in page["data"] + rest["data"]] == sorted(
        (e["id"] for e in page["data"] + rest["data"]), reverse=True)
    assert len(rest["data"]) == 3 and rest["has_more"] is False
    assert [e["action"] for e in ok(client.get("/v1/audit?action=key.update", headers=SYSTEM))["data"]] == \
        ["key.update"]
    for bad in ("limit=0", "limit=1001", "limit=x", "target_type=user", "bogus=1"):
        assert error(client.get(f"/v1/audit?{bad}", headers=SYSTEM), 400)["param"] == bad.split("=")[0]
