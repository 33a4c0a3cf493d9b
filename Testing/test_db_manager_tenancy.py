"""`db_manager.py` tenancy commands: create-tenant, create-key into it, list-keys (never a
secret or hash), revoke-key (audited as the CLI and announced on KEY_EVENTS_CHANNEL so running
gateways apply it within a second). These call `db_manager.main` in-process on the suite's
database (a subprocess per command costs a second; Testing/test_db_manager.py covers the
command-line entry point itself)."""
from __future__ import annotations

import json
import secrets
from decimal import Decimal

import pytest
import redis
from sqlalchemy import text

import db_manager
from Testing.support import REDIS_URL

pytestmark = pytest.mark.timeout(60)


def run(capsys, pg_url: str, *args: str) -> tuple[int, list[str], str]:
    code = db_manager.main(["--database-url", pg_url, *args])
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return code, out.out.strip().splitlines(), out.err


def rows(engine, sql: str) -> list[dict]:
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(text(sql))]


def test_create_tenant_and_key(capsys, pg_url, clean_db):
    """create-tenant stores the tenant with its budget and key limits (a duplicate name is one
    error line, exit 1); create-key mints into it; both leave audit rows naming the CLI."""
    code, out, _ = run(capsys, pg_url, "create-tenant", "--name", "ops", "--budget-usd", "12.5",
                       "--rpm-limit", "30", "--status", "suspended")
    assert code == 0 and out[-1].startswith("created tenant id=")
    tenant = rows(clean_db, "SELECT * FROM tenants WHERE name = 'ops'")[0]
    assert (tenant["budget_usd"], tenant["rpm_limit"], tenant["status"]) == (Decimal("12.5"), 30, "suspended")
    code, _, err = run(capsys, pg_url, "create-tenant", "--name", "ops")
    assert code == 1 and err.strip() == "error: A tenant named 'ops' already exists."
    code, out, _ = run(capsys, pg_url, "create-key", "--name", "svc", "--tenant", "ops")
    assert code == 0 and out[-1].startswith("sk-")
    key = rows(clean_db, "SELECT * FROM api_keys")[0]
    assert key["tenant_id"] == tenant["id"]
    assert rows(clean_db, "SELECT actor_type, action, target_id FROM audit_log ORDER BY id") == [
        {"actor_type": "cli", "action": "tenant.create", "target_id": tenant["id"]},
        {"actor_type": "cli", "action": "key.create", "target_id": key["id"]}]


def test_list_keys_and_revoke_key(capsys, monkeypatch, pg_url, clean_db):
    """list-keys shows id, tenant, name, prefix, role, status and expiry, never a secret or hash;
    revoke-key revokes, audits as the CLI and publishes the key id on KEY_EVENTS_CHANNEL; the key
    is then listed only with --all; --tenant filters; unknown ids and tenants are errors. A key
    minted into a tenant that does not exist yet creates it with a `tenant.create` audit row."""
    channel = "gw-test-dbm-" + secrets.token_hex(4)
    monkeypatch.setenv("REDIS_URL", REDIS_URL)
    monkeypatch.setenv("KEY_EVENTS_CHANNEL", channel)
    _, a_out, _ = run(capsys, pg_url, "create-key", "--name", "a", "--tenant", "one", "--role", "admin")
    run(capsys, pg_url, "create-key", "--name", "b", "--tenant", "two", "--expires-at", "2030-01-01T00:00:00Z")
    a, b = rows(clean_db, "SELECT * FROM api_keys ORDER BY id")
    code, out, _ = run(capsys, pg_url, "list-keys")
    assert code == 0 and out == ["id\ttenant\tname\tprefix\trole\tstatus\texpires_at",
                                 f"{a['id']}\tone\ta\t{a['prefix']}\tadmin\tactive\t-",
                                 f"{b['id']}\ttwo\tb\t{b['prefix']}\tmember\tactive\t2030-01-01T00:00:00+00:00"]
    assert a_out[-1] not in "\n".join(out) and a["key_hash"] not in "\n".join(out)
    client = redis.Redis.from_url(REDIS_URL)
    pubsub = client.pubsub()
    try:
        pubsub.subscribe(channel)
        assert pubsub.get_message(timeout=2)["type"] == "subscribe"
        code, out, _ = run(capsys, pg_url, "revoke-key", str(a["id"]))
        assert code == 0 and out[0].startswith(f"revoked key id={a['id']}") and "told through Redis" in out[-1]
        message = pubsub.get_message(timeout=5)
        assert message and json.loads(message["data"]) == {"key_id": a["id"]}
    finally:
        pubsub.close()
        client.close()
    assert rows(clean_db, f"SELECT revoked_at FROM api_keys WHERE id = {a['id']}")[0]["revoked_at"] is not None
    code, out, _ = run(capsys, pg_url, "revoke-key", str(a["id"]))
    assert code == 0 and "already revoked" in out[0]
    assert [line.split("\t")[2] for line in run(capsys, pg_url, "list-keys")[1][1:]] == ["b"]
    code, out, _ = run(capsys, pg_url, "list-keys", "--all", "--tenant", "one")
    assert out[1:] == [f"{a['id']}\tone\ta\t{a['prefix']}\tadmin\trevoked\t-"]
    assert run(capsys, pg_url, "revoke-key", "999999")[::2] == (1, "error: No API key with id 999999.\n")
    assert run(capsys, pg_url, "list-keys", "--tenant", "nope")[::2] == (1, "error: No tenant named 'nope'.\n")
    assert rows(clean_db, "SELECT actor_type, action FROM audit_log WHERE action = 'key.revoke'") == [
        {"actor_type": "cli", "action": "key.revoke"}]
    # create-key into tenants that did not exist created them: audited as the CLI, once each
    assert rows(clean_db, "SELECT a.actor_type, t.name FROM audit_log a JOIN tenants t ON t.id = a.target_id "
                          "WHERE a.action = 'tenant.create' ORDER BY a.id") == [
        {"actor_type": "cli", "name": "one"}, {"actor_type": "cli", "name": "two"}]
    monkeypatch.delenv("REDIS_URL")
    run(capsys, pg_url, "create-key", "--name", "c", "--tenant", "one")
    c = rows(clean_db, "SELECT id FROM api_keys WHERE name = 'c'")[0]
    assert "REDIS_URL not set" in run(capsys, pg_url, "revoke-key", str(c["id"]))[1][-1]


def test_create_and_update_key_set_its_response_cache(capsys, pg_url, clean_db):
    """--cache on|off|default sets the key's response cache as the API's `cache` true, false or
    null does, audited as the CLI with the old and new value; update-key without --cache leaves
    it as it is."""
    code, out, _ = run(capsys, pg_url, "create-key", "--name", "cached", "--tenant", "ops", "--cache", "on")
    assert code == 0 and out[-1].startswith("sk-")
    [key] = rows(clean_db, "SELECT id, cache FROM api_keys")
    assert key["cache"] is True
    assert run(capsys, pg_url, "update-key", str(key["id"]), "--cache", "off")[0] == 0
    assert rows(clean_db, "SELECT cache FROM api_keys") == [{"cache": False}]
    assert run(capsys, pg_url, "update-key", str(key["id"]), "--name", "renamed")[0] == 0
    assert rows(clean_db, "SELECT name, cache FROM api_keys") == [{"name": "renamed", "cache": False}]
    assert run(capsys, pg_url, "update-key", str(key["id"]), "--cache", "default")[0] == 0
    assert rows(clean_db, "SELECT cache FROM api_keys") == [{"cache": None}]
    audits = rows(clean_db, "SELECT actor_type, action, details FROM audit_log WHERE action = 'key.update' ORDER BY id")
    assert [(a["actor_type"], (a["details"] or {}).get("cache", "-")) for a in audits] == [
        ("cli", [True, False]), ("cli", "-"), ("cli", [False, None])]
