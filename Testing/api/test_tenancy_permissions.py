"""Who may do what on the admin API: every admin endpoint x (system secret, tenant admin of A,
member of A, tenant admin of B, no credentials). Exactly the allowed cells succeed, the others
answer 401 / 403 / 404 without changing anything; and nothing of tenant B (ids, names, keys,
usage, audit rows) is ever visible to tenant A's keys."""
from __future__ import annotations

import json
import secrets
import uuid
from decimal import Decimal

import pytest
from sqlalchemy import text

from app.services.usage_service import UsageEvent, UsageWriter
from Testing.support import SYSTEM_SECRET

pytestmark = pytest.mark.timeout(120)

SYSTEM = {"X-System-Secret": SYSTEM_SECRET}
CALLERS = ("system", "admin_a", "member_a", "admin_b", "none")


@pytest.fixture(scope="module")
def world(module_app, pg_engine):
    """Tenants A and B (distinctive names), each with an admin key, a member key and a spare key;
    usage rows for every key; audit rows from all of that."""
    c = module_app.test_client()
    tag = secrets.token_hex(3)
    w: dict = {"client": c, "engine": pg_engine}
    for t in ("a", "b"):
        name = f"tenant-{'alpha' if t == 'a' else 'bravo'}-{tag}"
        resp = c.post("/v1/tenants", json={"name": name, "budget_usd": "50"}, headers=SYSTEM)
        assert resp.status_code == 201, resp.get_json()
        w[f"tenant_{t}"] = resp.get_json()
        for role, label in (("admin", "admin"), ("member", "member"), ("member", "spare")):
            resp = c.post("/v1/api-keys", headers=SYSTEM,
                          json={"name": f"{label}-of-{name}", "tenant": name, "role": role})
            assert resp.status_code == 201, resp.get_json()
            w[f"{label}_{t}"] = resp.get_json()
    events = [UsageEvent(request_id="req_" + uuid.uuid4().hex, tenant_id=w[f"{k}_{t}"]["tenant_id"],
                         api_key_id=w[f"{k}_{t}"]["id"], model=f"model-of-{t}-{tag}", prompt_tokens=3,
                         completion_tokens=2, cost_usd=Decimal("0.001"))
              for t in ("a", "b") for k in ("admin", "member", "spare")]
    UsageWriter(pg_engine).write(events)
    return w


def headers_of(world: dict, who: str) -> dict:
    if who == "system":
        return dict(SYSTEM)
    if who == "none":
        return {}
    return {"Authorization": f"Bearer {world[who]['key']}"}


def fresh_key_of_a(world: dict) -> dict:
    """A key of tenant A minted for one cell (so destructive cells never share a target)."""
    resp = world["client"].post("/v1/api-keys", headers=SYSTEM, json={
        "name": "target-" + secrets.token_hex(3), "tenant": world["tenant_a"]["name"]})
    assert resp.status_code == 201
    return resp.get_json()


# Each endpoint: (name, build(world) -> (method, path, json body), callers allowed).
ENDPOINTS = {
    "create tenant": (lambda w: ("post", "/v1/tenants", {"name": "new-" + secrets.token_hex(4)}), {"system"}),
    "list tenants": (lambda w: ("get", "/v1/tenants", None), {"system"}),
    "read tenant A": (lambda w: ("get", f"/v1/tenants/{w['tenant_a']['id']}", None), {"system", "admin_a"}),
    "update tenant A": (lambda w: ("patch", f"/v1/tenants/{w['tenant_a']['id']}", {"budget_usd": "50"}),
                        {"system"}),
    "mint key in A": (lambda w: ("post", "/v1/api-keys", {"name": "m", "tenant": w["tenant_a"]["name"]}),
                      {"system", "admin_a"}),
    "list keys of A": (lambda w: ("get", f"/v1/api-keys?tenant={w['tenant_a']['name']}", None),
                       {"system", "admin_a"}),
    "read key of A": (lambda w: ("get", f"/v1/api-keys/{w['spare_a']['id']}", None), {"system", "admin_a"}),
    "update key of A": (lambda w: ("patch", f"/v1/api-keys/{fresh_key_of_a(w)['id']}", {"rpm_limit": 5}),
                        {"system", "admin_a"}),
    "rotate key of A": (lambda w: ("post", f"/v1/api-keys/{fresh_key_of_a(w)['id']}/rotate", None),
                        {"system", "admin_a"}),
    "revoke key of A": (lambda w: ("delete", f"/v1/api-keys/{fresh_key_of_a(w)['id']}", None),
                        {"system", "admin_a"}),
    "usage of tenant A": (lambda w: ("get", f"/v1/usage?tenant={w['tenant_a']['name']}", None),
                          {"system", "admin_a"}),
    "usage of another key of A": (lambda w: ("get", f"/v1/usage?api_key_id={w['spare_a']['id']}", None),
                                  {"system", "admin_a"}),
    "audit of A": (lambda w: ("get", f"/v1/audit?tenant={w['tenant_a']['name']}", None), {"system", "admin_a"}),
}
# The status of a refused cell: no credentials 401; a member 403; tenant B's admin 403 on what
# only the system may do or on minting into A, 404 on A's resources (as if they did not exist).
REFUSED = {"none": 401, "member_a": 403, "admin_a": 403}
ADMIN_B_REFUSED = {"create tenant": 403, "list tenants": 403, "update tenant A": 403, "mint key in A": 403}


def snapshot(engine) -> tuple:
    with engine.connect() as conn:
        return tuple(conn.execute(text(
            "SELECT (SELECT count(*) FROM tenants), (SELECT count(*) FROM api_keys), "
            "(SELECT count(*) FROM api_keys WHERE revoked_at IS NOT NULL), (SELECT count(*) FROM audit_log), "
            "(SELECT coalesce(max(rotated_at)::text, '') FROM api_keys), "
            "(SELECT coalesce(sum(coalesce(rpm_limit, 0)), 0) FROM api_keys)")).one())


@pytest.mark.parametrize("who", CALLERS)
@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
def test_permission_matrix(world, endpoint, who):
    """Exactly the allowed (endpoint, caller) cells succeed; a refused cell answers the OpenAI
    error envelope with the expected status and changes nothing in the database."""
    build, allowed = ENDPOINTS[endpoint]
    method, path, body = build(world)
    before = snapshot(world["engine"])
    resp = getattr(world["client"], method)(path, headers=headers_of(world, who), json=body)
    if who in allowed:
        assert resp.status_code in (200, 201), (endpoint, who, resp.get_json())
        return
    expected = ADMIN_B_REFUSED.get(endpoint, 404) if who == "admin_b" else REFUSED[who]
    assert resp.status_code == expected, (endpoint, who, resp.status_code, resp.get_json())
    assert set(resp.get_json()["error"]) == {"message", "type", "param", "code"}
    assert snapshot(world["engine"]) == before, "a refused request changed something"


def _b_markers(world: dict) -> list[str]:
    """Strings that only tenant B's data contains."""
    b = world["tenant_b"]
    keys = [world[f"{k}_b"] for k in ("admin", "member", "spare")]
    return [b["name"], "bravo", *[k["name"] for k in keys], *[k["prefix"] for k in keys]]


def test_tenant_a_never_sees_tenant_b(world):
    """Everything tenant A's admin and member can read (key lists, keys, tenant, usage in every
    grouping and as CSV, audit) holds only tenant A's ids and names."""
    c, w = world["client"], world
    a_key_ids = {k["id"] for k in c.get("/v1/api-keys", headers=SYSTEM).get_json()["data"]
                 if k["tenant_id"] == w["tenant_a"]["id"]}
    b_key_ids = {w[f"{k}_b"]["id"] for k in ("admin", "member", "spare")}
    reads = ["/v1/api-keys", f"/v1/tenants/{w['tenant_a']['id']}", "/v1/audit", "/v1/audit?limit=1000",
             "/v1/usage", "/v1/usage?group_by=key", "/v1/usage?group_by=tenant", "/v1/usage?group_by=model",
             "/v1/usage?group_by=day", "/v1/usage?group_by=key&format=csv", "/v1/usage?group_by=tenant&format=csv"]
    for who in ("admin_a", "member_a"):
        for path in reads:
            resp = c.get(path, headers=headers_of(w, who))
            if who == "member_a" and not path.startswith("/v1/usage"):
                assert resp.status_code == 403, (who, path)
                continue
            assert resp.status_code == 200, (who, path, resp.get_data(as_text=True))
            raw = resp.get_data(as_text=True)
            for marker in _b_markers(w):
                assert marker not in raw, (who, path, marker)
            if path.startswith("/v1/usage") and "csv" not in path:
                body = resp.get_json()
                expected = 3 if who == "admin_a" else 1
                assert body["requests"] == expected, (who, path, body)
                for row in body["data"]:
                    assert row.get("api_key_id", next(iter(a_key_ids))) in a_key_ids
                    assert row.get("tenant_id", w["tenant_a"]["id"]) == w["tenant_a"]["id"]
    listed = c.get("/v1/api-keys", headers=headers_of(w, "admin_a")).get_json()["data"]
    assert {k["id"] for k in listed} == a_key_ids and not {k["id"] for k in listed} & b_key_ids
    audit = c.get("/v1/audit?limit=1000", headers=headers_of(w, "admin_a")).get_json()["data"]
    assert audit and {e["tenant_id"] for e in audit} == {w["tenant_a"]["id"]}
    assert not {e["target"]["id"] for e in audit if e["target"]["type"] == "api_key"} & b_key_ids
    # B's resources answer exactly like resources that do not exist.
    for path in (f"/v1/api-keys/{w['spare_b']['id']}", f"/v1/tenants/{w['tenant_b']['id']}",
                 f"/v1/usage?api_key_id={w['spare_b']['id']}", f"/v1/usage?tenant={w['tenant_b']['name']}",
                 f"/v1/audit?tenant={w['tenant_b']['name']}"):
        resp = c.get(path, headers=headers_of(w, "admin_a"))
        swaps = ((str(w["spare_b"]["id"]), "99999999"), (str(w["tenant_b"]["id"]), "99999999"),
                 (w["tenant_b"]["name"], "no-such-tenant"))
        missing_path = path
        for real, fake in swaps:
            missing_path = missing_path.replace(real, fake)
        missing = c.get(missing_path, headers=headers_of(w, "admin_a"))
        assert resp.status_code == missing.status_code == 404, path
        message = resp.get_json()["error"]["message"]
        for real, fake in swaps:
            message = message.replace(real, fake)
        assert message == missing.get_json()["error"]["message"], path


def test_system_secret_sees_every_tenant(world):
    """The system secret lists both tenants' keys and reads their usage and audit rows."""
    c, w = world["client"], world
    keys = c.get("/v1/api-keys", headers=SYSTEM).get_json()["data"]
    assert {w["tenant_a"]["id"], w["tenant_b"]["id"]} <= {k["tenant_id"] for k in keys}
    by_tenant = c.get("/v1/usage?group_by=tenant", headers=SYSTEM).get_json()["data"]
    names = {row["tenant_name"] for row in by_tenant}
    assert {w["tenant_a"]["name"], w["tenant_b"]["name"]} <= names
    audit = c.get(f"/v1/audit?tenant={w['tenant_b']['name']}", headers=SYSTEM).get_json()["data"]
    assert audit and {e["tenant_id"] for e in audit} == {w["tenant_b"]["id"]}


def test_tenant_admin_cannot_mint_into_another_tenant_or_raise_its_own_role(world):
    """A tenant admin naming another tenant (existing or not) is refused alike; without a tenant
    its key lands in its own tenant."""
    c, w = world["client"], world
    for other in (w["tenant_b"]["name"], "does-not-exist-" + secrets.token_hex(3)):
        resp = c.post("/v1/api-keys", json={"name": "x", "tenant": other}, headers=headers_of(w, "admin_a"))
        assert resp.status_code == 403 and resp.get_json()["error"]["param"] == "tenant"
    resp = c.post("/v1/api-keys", json={"name": "own"}, headers=headers_of(w, "admin_a"))
    assert resp.status_code == 201 and resp.get_json()["tenant_id"] == w["tenant_a"]["id"]
    assert json.dumps(resp.get_json()).count(w["tenant_b"]["name"]) == 0
