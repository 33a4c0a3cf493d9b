"""`db_manager.py` on the command line: every command against a real PostgreSQL database
that does not exist yet, the key minting (only a hash stored), the confirmation of the
destructive commands, and the one-line error (exit 2) when the database is unreachable.

Each command runs as a real subprocess (`python db_manager.py ...`). A subprocess costs about
a second of imports, so the scenarios (each on its own database) run concurrently in a
module fixture; every test then checks what its scenario observed."""
from __future__ import annotations

import hashlib
import os
import secrets
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, Callable

import pytest
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.orm import Session

import db_manager
from app.services.actor import cli_actor
from app.services.admin_service import Admin
from app.services.key_events import KeyEventPublisher
from Testing.support import ROOT, database_exists, database_url, drop_database, free_port, head_revision

pytestmark = pytest.mark.timeout(120)

SCHEMA = ["alembic_version", "api_keys", "audit_log", "conversations", "responses", "tenants", "usage_daily",
          "usage_records"]
HEAD = head_revision()
KEY_ARGS = ["create-key", "--name", "N", "--tenant", "T", "--rpm-limit", "5", "--budget-usd", "1.25",
            "--allowed-models", "demo,gpt-4o-mini", "--expires-at", "2030-01-01T00:00:00Z"]


def run(url: str | None, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    if url is not None:
        env["DATABASE_URL"] = url
    return subprocess.run([sys.executable, "db_manager.py", *args], cwd=ROOT, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)


def ok(proc: subprocess.CompletedProcess) -> list[str]:
    assert proc.returncode == 0, (proc.args, proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    return proc.stdout.strip().splitlines()


def tables(url: str) -> list[str]:
    """The tables, without the monthly partitions of usage_records."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return sorted(t for t in inspect(conn).get_table_names() if not t.startswith("usage_records_p"))
    finally:
        engine.dispose()


def query(url: str, sql: str) -> list[Any]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(text(sql))]
    finally:
        engine.dispose()


def migrate(url: str) -> None:
    """Setup only (in-process): create and migrate a database, with one key in it."""
    db_manager.ensure_database(url)
    db_manager.upgrade(url)
    engine = create_engine(url)
    try:
        with Session(engine) as session:
            Admin(session, cli_actor(), KeyEventPublisher(None, "")).mint_key({"name": "seed", "tenant": "seed"})
    finally:
        engine.dispose()


# --- scenarios: each gets the URL of its own database and returns what it observed ----------

def sc_create_db(url: str, name: str) -> dict:
    seen = {"existed_before": database_exists(name), "create": run(url, "create-db")}
    seen["exists"] = database_exists(name)
    seen["tables"] = tables(url) if seen["exists"] else None
    seen["current"] = run(url, "current")
    return seen


def sc_list_down_up(url: str, name: str) -> dict:
    seen = {"list": run(url, "list-tables"), "downgrade": run(url, "downgrade", "base")}
    seen["tables_after_downgrade"] = tables(url)
    seen["current_after_downgrade"] = run(url, "current")
    seen["upgrade"] = run(url, "upgrade")
    seen["tables_after_upgrade"] = tables(url)
    seen["revision_after_upgrade"] = db_manager.current_revision(url)
    return seen


def sc_create_key(url: str, name: str) -> dict:
    seen = {"create_key": run(url, *KEY_ARGS)}
    seen["keys"] = query(url, "SELECT k.*, t.name AS tenant_name FROM api_keys k "
                              "JOIN tenants t ON t.id = k.tenant_id WHERE k.name = 'N'")
    seen["dumps"] = {t: " ".join(str(r) for r in query(url, f"SELECT row_to_json(x)::text AS j FROM {t} x"))
                     for t in ("tenants", "api_keys", "usage_records", "alembic_version")}
    return seen


def sc_clean_refused(url: str, name: str) -> dict:
    return {"clean": run(url, "clean-db"), "tables": tables(url),
            "keys": query(url, "SELECT count(*) AS n FROM api_keys")[0]["n"]}


def sc_clean_yes(url: str, name: str) -> dict:
    return {"clean": run(url, "clean-db", "--yes"), "tables": tables(url)}


def sc_reset_yes(url: str, name: str) -> dict:
    seen = {"reset": run(url, "reset-db", "--yes"), "tables": tables(url)}
    seen["counts"] = query(url, "SELECT (SELECT count(*) FROM tenants) AS tenants, "
                                "(SELECT count(*) FROM api_keys) AS api_keys, "
                                "(SELECT count(*) FROM usage_records) AS usage_records")[0]
    seen["versions"] = query(url, "SELECT version_num FROM alembic_version")
    return seen


def sc_bad_argument(url: str, name: str) -> dict:
    seen = {"proc": run(url, "create-key", "--name", "n", "--tenant", "t", "--rpm-limit", "0")}
    seen["exists"] = database_exists(name)
    return seen


def sc_unreachable(command: list[str]) -> Callable[[str, str], dict]:
    def scenario(url: str, name: str) -> dict:
        bad = f"postgresql://postgres@127.0.0.1:{free_port()}/x"
        return {"proc": run(None, "--database-url", bad, *command)}
    return scenario


SCENARIOS: dict[str, tuple[Callable[[str, str], dict], bool]] = {
    # name: (scenario, needs a migrated database first)
    "create_db": (sc_create_db, False),
    "list_down_up": (sc_list_down_up, True),
    "create_key": (sc_create_key, True),
    "clean_refused": (sc_clean_refused, True),
    "clean_yes": (sc_clean_yes, True),
    "reset_yes": (sc_reset_yes, True),
    "bad_argument": (sc_bad_argument, False),
    "unreachable create-db": (sc_unreachable(["create-db"]), False),
    "unreachable upgrade": (sc_unreachable(["upgrade"]), False),
    "unreachable create-key": (sc_unreachable(["create-key", "--name", "n", "--tenant", "t"]), False),
}


@pytest.fixture(scope="module")
def observed():
    """Run every scenario concurrently, each on a database of its own (dropped afterwards).
    Value: scenario name -> what it observed, or the exception it raised."""
    names = {s: f"gw_dbm_{secrets.token_hex(4)}" for s in SCENARIOS}
    results: dict[str, Any] = {}
    try:
        for s, (_, needs_schema) in SCENARIOS.items():
            if needs_schema:
                migrate(database_url(names[s]))
        with ThreadPoolExecutor(max_workers=4) as pool:
            futures = {s: pool.submit(fn, database_url(names[s]), names[s]) for s, (fn, _) in SCENARIOS.items()}
            for s, fut in futures.items():
                try:
                    results[s] = fut.result(timeout=100)
                except Exception as exc:  # reported by the test of that scenario
                    results[s] = exc
        yield results
    finally:
        for name in names.values():
            drop_database(name)


def seen(observed: dict, scenario: str) -> dict:
    value = observed[scenario]
    if isinstance(value, Exception):
        raise value
    return value


def test_create_db_creates_missing_database_then_current_is_head(observed):
    """`create-db` creates a missing database and migrates it; `current` then prints the head revision."""
    s = seen(observed, "create_db")
    assert s["existed_before"] is False
    assert ok(s["create"])[-1] == f"created database and migrated to {HEAD}"
    assert s["exists"] is True
    assert s["tables"] == SCHEMA
    assert ok(s["current"]) == [HEAD]


def test_list_tables_downgrade_upgrade_current(observed):
    """list-tables shows the schema; downgrade base empties it (current says so); upgrade restores head."""
    s = seen(observed, "list_down_up")
    assert ok(s["list"]) == SCHEMA
    assert ok(s["downgrade"]) == ["at revision base (empty)"]
    assert s["tables_after_downgrade"] == ["alembic_version"]
    assert ok(s["current_after_downgrade"]) == ["base (no schema)"]
    assert ok(s["upgrade"]) == [f"at revision {HEAD}"]
    assert s["tables_after_upgrade"] == SCHEMA
    assert s["revision_after_upgrade"] == HEAD


def test_create_key_prints_key_once_and_stores_only_its_hash(observed):
    """create-key prints the sk- key last; the DB stores its sha256, prefix and limits, never the plaintext."""
    s = seen(observed, "create_key")
    key = ok(s["create_key"])[-1]
    assert key.startswith("sk-") and len(key) >= 46, key
    assert len(s["keys"]) == 1
    row = s["keys"][0]
    assert row["key_hash"] == hashlib.sha256(key.encode()).hexdigest()
    assert key.startswith(row["prefix"]) and 3 < len(row["prefix"]) < len(key) - 32
    assert (row["name"], row["tenant_name"]) == ("N", "T")
    assert row["rpm_limit"] == 5 and row["tpm_limit"] is None and row["max_concurrent"] is None
    assert row["budget_usd"] == Decimal("1.25")
    assert row["allowed_models"] == ["demo", "gpt-4o-mini"]
    assert row["expires_at"] == datetime(2030, 1, 1, tzinfo=timezone.utc)
    assert row["revoked_at"] is None
    secret_part = key[len(row["prefix"]):]
    for table, dump in s["dumps"].items():
        assert key not in dump and secret_part not in dump, table
    assert row["key_hash"] in s["dumps"]["api_keys"]  # the dump does contain the row


def test_clean_db_without_yes_and_no_tty_refuses(observed):
    """`clean-db` without --yes and without a terminal exits non-zero and drops nothing."""
    s = seen(observed, "clean_refused")
    assert s["clean"].returncode != 0
    assert "--yes" in s["clean"].stderr and "Traceback" not in s["clean"].stderr
    assert s["tables"] == SCHEMA
    assert s["keys"] == 1


def test_clean_db_yes_drops_all_tables(observed):
    """`clean-db --yes` drops every table of the gateway, alembic_version included."""
    s = seen(observed, "clean_yes")
    assert ok(s["clean"]) == ["dropped all tables"]
    assert s["tables"] == []


def test_reset_db_yes_leaves_empty_schema_at_head(observed):
    """`reset-db --yes` drops all data and leaves an empty schema at head."""
    s = seen(observed, "reset_yes")
    assert ok(s["reset"])[-1] == f"reset: schema at {HEAD}"
    assert s["tables"] == SCHEMA
    assert s["counts"] == {"tenants": 0, "api_keys": 0, "usage_records": 0}
    assert s["versions"] == [{"version_num": HEAD}]


@pytest.mark.parametrize("scenario", [s for s in SCENARIOS if s.startswith("unreachable")])
def test_unreachable_database_one_line_exit_2(observed, scenario):
    """A command against a closed port exits 2 with exactly one stderr line and no traceback."""
    proc = seen(observed, scenario)["proc"]
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: cannot reach the database"), lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout


def test_bad_argument_is_an_argparse_error(observed):
    """create-key --rpm-limit 0 is an argparse error (exit 2) before any database work."""
    s = seen(observed, "bad_argument")
    proc = s["proc"]
    assert proc.returncode == 2
    assert "usage:" in proc.stderr and "--rpm-limit" in proc.stderr and "must be from 1 to" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert s["exists"] is False
