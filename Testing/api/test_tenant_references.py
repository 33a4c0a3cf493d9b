"""A tenant is named by its id or its name wherever the admin API or db_manager takes one:
`/v1/tenants/<id or name>`, `?tenant=` of api-keys, usage and audit, `tenant` when minting,
`--tenant` and `update-tenant` of db_manager. Digits only mean an id, so no tenant name may be
digits only (400 on create and rename, one error line from the CLI)."""
from __future__ import annotations

import pytest

import db_manager
from Testing.support import SYSTEM_SECRET, error, ok

pytestmark = pytest.mark.timeout(60)
SYSTEM = {"X-System-Secret": SYSTEM_SECRET}


@pytest.fixture
def research(client, clean_db) -> dict:
    """The tenant "research" (created after another one, so its id is not 1) with one key."""
    ok(client.post("/v1/tenants", headers=SYSTEM, json={"name": "quickstart"}), 201)
    tenant = ok(client.post("/v1/tenants", headers=SYSTEM, json={"name": "research"}), 201)
    ok(client.post("/v1/api-keys", headers=SYSTEM, json={"name": "r1", "tenant": "research"}), 201)
    return tenant


def test_tenant_by_name_or_id_in_the_url(client, research):
    """GET and PATCH /v1/tenants/research act on the same tenant as /v1/tenants/<its id>."""
    by_id = ok(client.get(f"/v1/tenants/{research['id']}", headers=SYSTEM))
    assert ok(client.get("/v1/tenants/research", headers=SYSTEM)) == by_id
    assert by_id["name"] == "research" and by_id["keys"] == 1
    body = ok(client.patch("/v1/tenants/research", headers=SYSTEM, json={"status": "suspended"}))
    assert (body["id"], body["status"]) == (research["id"], "suspended")
    assert ok(client.get(f"/v1/tenants/{research['id']}", headers=SYSTEM))["status"] == "suspended"


def test_unknown_tenant_references_are_404_never_500(client, research):
    """An unknown name or id, an id past BIGINT: 404 with the envelope, naming what was asked;
    a NUL byte: 400."""
    assert error(client.get("/v1/tenants/nope", headers=SYSTEM), 404) == {
        "message": "No tenant named 'nope'.", "type": "invalid_request_error", "param": "id", "code": "not_found"}
    assert error(client.get("/v1/tenants/999999", headers=SYSTEM), 404)["message"] == "No tenant with id 999999."
    assert error(client.get("/v1/tenants/99999999999999999999999", headers=SYSTEM), 404)["param"] == "id"
    # A NUL byte never reaches the lookup: 400 naming the path parameter.
    assert error(client.get("/v1/tenants/a%00b", headers=SYSTEM), 400)["param"] == "tenant_ref"
    assert error(client.patch("/v1/tenants/nope", headers=SYSTEM, json={"status": "active"}), 404)["param"] == "id"


def test_query_parameters_take_a_name_or_an_id(client, research):
    """?tenant= of api-keys, usage and audit answers the same for the name and the id."""
    for path in ("/v1/api-keys", "/v1/audit", "/v1/usage"):
        by_name = ok(client.get(f"{path}?tenant=research", headers=SYSTEM))
        assert ok(client.get(f"{path}?tenant={research['id']}", headers=SYSTEM)) == by_name, path
    keys = ok(client.get(f"/v1/api-keys?tenant={research['id']}", headers=SYSTEM))["data"]
    assert [k["name"] for k in keys] == ["r1"]
    assert error(client.get("/v1/api-keys?tenant=999999", headers=SYSTEM), 404)["param"] == "tenant"


def test_minting_names_the_tenant_by_id_or_name(client, research):
    """`tenant` of a new key: an id mints into that tenant, an unknown id is 404 (never a new
    tenant named with digits), a new name creates the tenant."""
    key = ok(client.post("/v1/api-keys", headers=SYSTEM, json={"name": "r2", "tenant": str(research["id"])}), 201)
    assert (key["tenant"], key["tenant_id"]) == ("research", research["id"])
    assert error(client.post("/v1/api-keys", headers=SYSTEM, json={"name": "x", "tenant": "999999"}), 404) \
        ["param"] == "tenant"
    assert ok(client.post("/v1/api-keys", headers=SYSTEM, json={"name": "y", "tenant": "brand-new"}), 201) \
        ["tenant"] == "brand-new"


def test_a_tenant_name_cannot_be_only_digits(client, research):
    """Creating or renaming a tenant to "42" is a 400 on `name`: it would be read as an id."""
    err = error(client.post("/v1/tenants", headers=SYSTEM, json={"name": "42"}), 400)
    assert (err["param"], err["code"]) == ("name", "invalid_value")
    assert error(client.patch("/v1/tenants/research", headers=SYSTEM, json={"name": "7"}), 400)["param"] == "name"
    assert ok(client.post("/v1/tenants", headers=SYSTEM, json={"name": "team-42"}), 201)["name"] == "team-42"


def test_a_tenant_admin_reaches_its_own_tenant_by_name_only(client, research):
    """A tenant admin key reads its own tenant by name or id; another tenant's name is 404."""
    other = ok(client.post("/v1/api-keys", headers=SYSTEM, json={"name": "qa", "tenant": "quickstart",
                                                                 "role": "admin"}), 201)
    headers = {"Authorization": f"Bearer {other['key']}"}
    assert ok(client.get("/v1/tenants/quickstart", headers=headers))["name"] == "quickstart"
    assert ok(client.get(f"/v1/tenants/{other['tenant_id']}", headers=headers))["name"] == "quickstart"
    assert error(client.get("/v1/tenants/research", headers=headers), 404)["message"] == \
        "No tenant named 'research'."
    assert error(client.get("/v1/api-keys?tenant=research", headers=headers), 404)["param"] == "tenant"


def test_db_manager_takes_a_tenant_by_name_or_id(capsys, monkeypatch, pg_url, models_file, research):
    """list-keys --tenant and update-tenant take a name or an id; create-tenant refuses a
    digits-only name with one error line and exit status 1."""
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("MODELS_FILE", str(models_file))

    def run(*args: str) -> tuple[int, list[str], str]:
        code = db_manager.main(["--database-url", pg_url, *args])
        out = capsys.readouterr()
        return code, out.out.strip().splitlines(), out.err

    by_name, by_id = run("list-keys", "--tenant", "research"), run("list-keys", "--tenant", str(research["id"]))
    assert by_name == by_id and by_name[0] == 0 and [line.split("\t")[2] for line in by_name[1][1:]] == ["r1"]
    code, out, _ = run("update-tenant", str(research["id"]), "--status", "suspended")
    assert code == 0 and out[0] == f"tenant id={research['id']} name='research' status=suspended"
    code, out, _ = run("update-tenant", "research", "--name", "research-2")
    assert code == 0 and out[0] == f"tenant id={research['id']} name='research-2' status=suspended"
    assert run("update-tenant", "research", "--status", "active")[::2] == (1, "error: No tenant named 'research'.\n")
    code, _, err = run("create-tenant", "--name", "42")
    assert code == 1 and err.startswith("error: A tenant name cannot be only digits ('42')")
