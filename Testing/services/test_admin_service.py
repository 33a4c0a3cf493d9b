"""The admin use cases are one implementation behind two doors: the HTTP API and db_manager.

The same sequence of changes (create a tenant, mint a key into it, update it, rotate it,
revoke it, suspend the tenant) made through each door writes audit rows of the same shape
(same actions, same detail fields) and publishes the same key events, seen by a real Redis
subscriber on the gateway's channel. The CLI's rows name `cli:<os user>`.
"""
from __future__ import annotations

import getpass
import json
import time

import pytest
import redis
from sqlalchemy import text

import db_manager
from Testing.support import KEY_EVENTS_CHANNEL, REDIS_URL, SYSTEM_SECRET

pytestmark = pytest.mark.timeout(60)
SYSTEM = {"X-System-Secret": SYSTEM_SECRET}


@pytest.fixture
def subscriber():
    """A real Redis subscriber on the channel the gateway (and the CLI) publish key events on."""
    client = redis.Redis.from_url(REDIS_URL)
    pubsub = client.pubsub()
    pubsub.subscribe(KEY_EVENTS_CHANNEL)
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"
    yield pubsub
    pubsub.close()
    client.close()


@pytest.fixture
def cli(monkeypatch, pg_url, models_file, capsys):
    """db_manager.main in-process, on the suite's database, Redis channel and model catalog."""
    monkeypatch.setenv("REDIS_URL", REDIS_URL)
    monkeypatch.setenv("KEY_EVENTS_CHANNEL", KEY_EVENTS_CHANNEL)
    monkeypatch.setenv("MODELS_FILE", str(models_file))

    def run(*args: str) -> tuple[int, list[str], str]:
        code = db_manager.main(["--database-url", pg_url, *args])
        out = capsys.readouterr()
        assert "Traceback" not in out.err
        return code, out.out.strip().splitlines(), out.err
    return run


def events(pubsub, count: int) -> list[dict]:
    """The next `count` messages on the channel (each waited for, never a fixed sleep)."""
    received = []
    deadline = time.monotonic() + 10
    while len(received) < count and time.monotonic() < deadline:
        message = pubsub.get_message(timeout=1)
        if message and message["type"] == "message":
            received.append(json.loads(message["data"]))
    return received


def audit_rows(engine, tenant_id: int) -> list[dict]:
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(text(
            "SELECT actor_type, actor_key_id, actor_name, action, target_type, details FROM audit_log "
            "WHERE tenant_id = :t ORDER BY id"), {"t": tenant_id})]


def shape(rows: list[dict]) -> list[tuple]:
    return [(r["action"], r["target_type"], sorted((r["details"] or {}).keys())) for r in rows]


def test_api_and_cli_write_the_same_audit_rows_and_publish_the_same_events(client, cli, subscriber, clean_db):
    """Each use case through the API, then through db_manager: same audit row shapes, same key
    events; the CLI's rows say `cli` and `cli:<os user>`, the API's `system`."""
    t = client.post("/v1/tenants", headers=SYSTEM, json={"name": "via-api", "budget_usd": "5",
                                                          "key_limits": {"rpm_limit": 9}}).get_json()
    k = client.post("/v1/api-keys", headers=SYSTEM, json={
        "name": "svc", "tenant": "via-api", "rpm_limit": 7, "allowed_models": ["demo"]}).get_json()
    assert client.patch(f"/v1/api-keys/{k['id']}", headers=SYSTEM, json={"name": "svc2"}).status_code == 200
    assert client.post(f"/v1/api-keys/{k['id']}/rotate", headers=SYSTEM,
                       json={"grace_period_s": 60}).status_code == 200
    assert client.delete(f"/v1/api-keys/{k['id']}", headers=SYSTEM).status_code == 200
    assert client.patch("/v1/tenants/via-api", headers=SYSTEM, json={"status": "suspended"}).status_code == 200
    api_events = events(subscriber, 4)

    assert cli("create-tenant", "--name", "via-cli", "--budget-usd", "5", "--rpm-limit", "9")[0] == 0
    code, out, _ = cli("create-key", "--name", "svc", "--tenant", "via-cli", "--rpm-limit", "7",
                       "--allowed-models", "demo")
    assert code == 0
    with clean_db.connect() as conn:
        cli_tenant, cli_key = conn.execute(text(
            "SELECT tenant_id, id FROM api_keys WHERE name = 'svc' AND tenant_id <> :t"), {"t": t["id"]}).one()
    assert cli("update-key", str(cli_key), "--name", "svc2")[0] == 0
    assert cli("rotate-key", str(cli_key), "--grace-period-s", "60")[0] == 0
    assert cli("revoke-key", str(cli_key))[0] == 0
    code, out, _ = cli("update-tenant", "via-cli", "--status", "suspended")
    assert code == 0 and out[-1] == "running gateways were told through Redis (effective within a second)"
    cli_events = events(subscriber, 4)

    assert api_events == [{"key_id": k["id"]}] * 3 + [{"tenant_id": t["id"]}]
    assert cli_events == [{"key_id": cli_key}] * 3 + [{"tenant_id": cli_tenant}]

    api_rows, cli_rows = audit_rows(clean_db, t["id"]), audit_rows(clean_db, cli_tenant)
    assert shape(api_rows) == shape(cli_rows) == [
        ("tenant.create", "tenant", ["budget_usd", "key_limits", "name", "status"]),
        ("key.create", "api_key", ["allowed_models", "budget_usd", "cache", "daily_token_limit", "expires_at",
                                   "max_concurrent", "name", "prefix", "role", "rpm_limit", "tpm_limit"]),
        ("key.update", "api_key", ["name"]),
        ("key.rotate", "api_key", ["grace_period_s", "prefix", "previous_prefix"]),
        ("key.revoke", "api_key", ["name", "prefix"]),
        ("tenant.update", "tenant", ["status"]),
    ]
    assert {(r["actor_type"], r["actor_key_id"], r["actor_name"]) for r in api_rows} == {("system", None, "system")}
    assert {(r["actor_type"], r["actor_key_id"], r["actor_name"]) for r in cli_rows} == {
        ("cli", None, f"cli:{getpass.getuser()}")}
    cli_created = cli_rows[1]["details"]
    assert (cli_created["name"], cli_created["rpm_limit"], cli_created["allowed_models"], cli_created["role"]) \
        == ("svc", 7, ["demo"], "member")
    assert cli_rows[0]["details"]["key_limits"] == {"rpm_limit": 9} and cli_rows[0]["details"]["budget_usd"] == "5"
    assert cli_rows[5]["details"] == api_rows[5]["details"] == {"status": ["active", "suspended"]}


def test_a_refused_use_case_writes_nothing(client, cli, clean_db):
    """A refusal rolls the whole use case back: no key, no tenant, no audit row, through either door."""
    bad = client.post("/v1/api-keys", headers=SYSTEM, json={"name": "x", "tenant": "newco",
                                                           "allowed_models": ["demo", "dmeo"]})
    assert bad.status_code == 400
    code, _, err = cli("create-key", "--name", "x", "--tenant", "newco2", "--allowed-models", "dmeo")
    assert code == 1 and err.startswith("error: Unknown model alias 'dmeo' in allowed_models")
    with clean_db.connect() as conn:
        counts = conn.execute(text("SELECT (SELECT count(*) FROM tenants), (SELECT count(*) FROM api_keys), "
                                   "(SELECT count(*) FROM audit_log)")).one()
    assert tuple(counts) == (0, 0, 0)
