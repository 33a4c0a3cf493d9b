"""`allowed_models` names only models that exist: model aliases or category aliases of the
catalog. A typo would mint a key that can use no model at all, so it is refused with 400 on
`allowed_models` naming the unknown alias (minting and PATCH), and by db_manager with one error
line and exit status 1. Nothing is written by a refused request."""
from __future__ import annotations

import pytest
from sqlalchemy import text

import db_manager
from Testing.support import SYSTEM_SECRET

pytestmark = pytest.mark.timeout(60)
SYSTEM = {"X-System-Secret": SYSTEM_SECRET}


def test_mint_refuses_an_unknown_alias(client, clean_db):
    """POST /v1/api-keys with a typo: 400, param allowed_models, the typo named; no key, no tenant."""
    resp = client.post("/v1/api-keys", headers=SYSTEM, json={"name": "k", "tenant": "t1",
                                                            "allowed_models": ["demo", "gpt-4o-mnii"]})
    assert resp.status_code == 400
    err = resp.get_json()["error"]
    assert (err["param"], err["code"], err["type"]) == ("allowed_models", "model_not_found", "invalid_request_error")
    assert err["message"].startswith("Unknown model alias 'gpt-4o-mnii' in allowed_models; known aliases: ")
    with clean_db.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM api_keys")).scalar() == 0
        assert conn.execute(text("SELECT count(*) FROM tenants")).scalar() == 0


def test_aliases_and_categories_are_accepted(client, clean_db):
    """Model aliases and the category aliases (small, big, auto) are valid names."""
    resp = client.post("/v1/api-keys", headers=SYSTEM, json={"name": "k", "allowed_models": ["demo", "small", "auto"]})
    assert resp.status_code == 201 and resp.get_json()["allowed_models"] == ["demo", "small", "auto"]


def test_patch_refuses_an_unknown_alias_and_keeps_the_key(client, clean_db):
    """PATCH with a typo: 400 on allowed_models; the key keeps its models; `null` (any model) is fine."""
    key = client.post("/v1/api-keys", headers=SYSTEM, json={"name": "k", "allowed_models": ["demo"]}).get_json()
    resp = client.patch(f"/v1/api-keys/{key['id']}", headers=SYSTEM, json={"allowed_models": ["dmeo"]})
    assert resp.status_code == 400 and resp.get_json()["error"]["param"] == "allowed_models"
    assert "'dmeo'" in resp.get_json()["error"]["message"]
    assert client.get(f"/v1/api-keys/{key['id']}", headers=SYSTEM).get_json()["allowed_models"] == ["demo"]
    resp = client.patch(f"/v1/api-keys/{key['id']}", headers=SYSTEM, json={"allowed_models": None})
    assert resp.status_code == 200 and resp.get_json()["allowed_models"] is None


def test_db_manager_refuses_an_unknown_alias(capsys, monkeypatch, pg_url, models_file, clean_db):
    """create-key and update-key with a typo: exit 1, one line naming it, nothing written."""
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("MODELS_FILE", str(models_file))

    def run(*args: str) -> tuple[int, str]:
        code = db_manager.main(["--database-url", pg_url, *args])
        return code, capsys.readouterr().err

    code, err = run("create-key", "--name", "k", "--tenant", "t", "--allowed-models", "demo,gpt-4o-mnii")
    assert code == 1 and err.startswith("error: Unknown model alias 'gpt-4o-mnii' in allowed_models")
    assert err.count("\n") == 1
    assert run("create-key", "--name", "k", "--tenant", "t", "--allowed-models", "demo,big") == (0, "")
    with clean_db.connect() as conn:
        key_id, models = conn.execute(text("SELECT id, allowed_models FROM api_keys")).one()
    assert models == ["demo", "big"]
    code, err = run("update-key", str(key_id), "--allowed-models", "nope")
    assert code == 1 and err.startswith("error: Unknown model alias 'nope' in allowed_models")
    with clean_db.connect() as conn:
        assert conn.execute(text("SELECT allowed_models FROM api_keys")).scalar() == ["demo", "big"]
