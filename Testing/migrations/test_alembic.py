"""alembic migrations: upgrade creates the schema (tables, columns, indexes, unique keys,
exact NUMERIC money), downgrade to base removes it, and the round trip works on PostgreSQL
and on the embedded SQLite."""
from __future__ import annotations

from typing import Iterator

import pytest
from sqlalchemy import Float, Numeric, create_engine, inspect, text

import db_manager
from Testing.support import create_database, database_url, drop_database, head_revision

pytestmark = pytest.mark.timeout(60)

TABLES = {"tenants", "api_keys", "usage_records", "usage_daily", "audit_log", "conversations", "responses"}
HEAD = head_revision()
COLUMNS = {
    "tenants": {"id", "name", "status", "budget_usd", "created_at", "rpm_limit", "tpm_limit",
                "daily_token_limit", "max_concurrent"},
    "api_keys": {"id", "tenant_id", "name", "prefix", "key_hash", "role", "rpm_limit", "tpm_limit",
                 "daily_token_limit", "max_concurrent", "budget_usd", "allowed_models", "expires_at",
                 "revoked_at", "created_at", "last_used_at", "previous_key_hash",
                 "previous_key_expires_at", "rotated_at", "cache"},
    "audit_log": {"id", "created_at", "actor_type", "actor_key_id", "actor_name", "tenant_id", "action", "target_type",
                  "target_id", "details"},
    "usage_records": {"id", "request_id", "tenant_id", "api_key_id", "model", "provider",
                      "upstream_model", "prompt_tokens", "completion_tokens", "total_tokens",
                      "cost_usd", "status", "error_type", "streamed", "cached", "latency_ms",
                      "ttft_ms", "created_at", "endpoint", "cached_tokens", "cache_write_tokens",
                      "reasoning_tokens", "usage_estimated", "saved_cost_usd"},
    "usage_daily": {"day", "tenant_id", "api_key_id", "model", "endpoint", "requests", "prompt_tokens",
                    "completion_tokens", "total_tokens", "cost_usd", "cache_hits", "saved_cost_usd"},
    "responses": {"id", "tenant_id", "api_key_id", "model", "status", "previous_response_id", "history",
                  "input_items", "body", "created_at"},
}
MONEY = [("tenants", "budget_usd"), ("api_keys", "budget_usd"), ("usage_records", "cost_usd"),
         ("usage_records", "saved_cost_usd")]
INDEXES = {"ix_usage_key_time": ("usage_records", ["api_key_id", "created_at"]),
           "ix_usage_tenant_time": ("usage_records", ["tenant_id", "created_at"]),
           "ix_api_keys_previous_key_hash": ("api_keys", ["previous_key_hash"]),
           "ix_audit_tenant_id": ("audit_log", ["tenant_id", "id"]),
           "ix_responses_created_at": ("responses", ["created_at"])}


@pytest.fixture
def fresh_pg_url() -> Iterator[str]:
    name = create_database("gw_mig")
    try:
        yield database_url(name)
    finally:
        drop_database(name)


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path}/x.db"


def table_names(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return set(inspect(conn).get_table_names())
    finally:
        engine.dispose()


def unique_column_sets(insp, table: str) -> list[list[str]]:
    """Columns made unique by a constraint or a unique index."""
    sets = [uc["column_names"] for uc in insp.get_unique_constraints(table)]
    sets += [ix["column_names"] for ix in insp.get_indexes(table) if ix.get("unique")]
    return sets


def assert_schema_at_head(url: str) -> None:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            insp = inspect(conn)
            partitions = {t for t in insp.get_table_names() if t.startswith("usage_records_p")}
            assert set(insp.get_table_names()) - partitions == TABLES | {"alembic_version"}
            for table, expected in COLUMNS.items():
                assert {c["name"] for c in insp.get_columns(table)} == expected, table
            for name, (table, cols) in INDEXES.items():
                found = {ix["name"]: ix["column_names"] for ix in insp.get_indexes(table)}
                assert found.get(name) == cols, (name, found)
            # PostgreSQL: partitioned by month, so the idempotency key holds the partition key
            usage_key = ["request_id", "created_at"] if engine.dialect.name == "postgresql" else ["request_id"]
            assert usage_key in unique_column_sets(insp, "usage_records") or \
                insp.get_pk_constraint("usage_records")["constrained_columns"] == usage_key
            assert sorted(insp.get_pk_constraint("usage_daily")["constrained_columns"]) == \
                ["api_key_id", "day", "endpoint", "model", "tenant_id"]
            assert ["key_hash"] in unique_column_sets(insp, "api_keys")
            assert ["name"] in unique_column_sets(insp, "tenants")
            for table, column in MONEY:
                col = {c["name"]: c for c in insp.get_columns(table)}[column]
                assert isinstance(col["type"], Numeric) and not isinstance(col["type"], Float), \
                    (table, column, col["type"])
                assert (col["type"].precision, col["type"].scale) == (20, 10), (table, column)
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [HEAD]
    finally:
        engine.dispose()


def round_trip(url: str) -> None:
    db_manager.upgrade(url)
    assert_schema_at_head(url)
    assert db_manager.current_revision(url) == HEAD

    db_manager.downgrade(url, "base")
    assert table_names(url) - {"alembic_version"} == set()
    assert db_manager.current_revision(url) is None

    db_manager.upgrade(url)
    assert_schema_at_head(url)
    assert db_manager.current_revision(url) == HEAD


def test_postgres_upgrade_downgrade_round_trip(fresh_pg_url):
    """PostgreSQL: upgrade builds the full schema, downgrade to base removes it, upgrade rebuilds it."""
    assert table_names(fresh_pg_url) == set()
    round_trip(fresh_pg_url)


def test_postgres_money_columns_are_numeric(fresh_pg_url):
    """Money is stored as exact NUMERIC(20,10) on PostgreSQL, never a float type."""
    db_manager.upgrade(fresh_pg_url)
    engine = create_engine(fresh_pg_url)
    try:
        with engine.connect() as conn:
            for table, column in MONEY:
                row = conn.execute(text(
                    "SELECT data_type, numeric_precision, numeric_scale FROM information_schema.columns "
                    "WHERE table_name = :t AND column_name = :c"), {"t": table, "c": column}).one()
                assert tuple(row) == ("numeric", 20, 10), (table, column)
            conn.execute(text("INSERT INTO tenants (name, status, budget_usd, created_at) "
                              "VALUES ('t', 'active', 0.1 + 0.2, now())"))
            value = conn.execute(text("SELECT budget_usd FROM tenants")).scalar_one()
            assert str(value) == "0.3000000000"
    finally:
        engine.dispose()


def test_postgres_unique_key_hash_and_request_id_enforced(fresh_pg_url):
    """The unique api_keys.key_hash and usage_records (request_id, created_at) really reject duplicates."""
    from sqlalchemy.exc import IntegrityError
    db_manager.upgrade(fresh_pg_url)
    engine = create_engine(fresh_pg_url)
    try:
        with engine.begin() as conn:
            tid = conn.execute(text("INSERT INTO tenants (name, created_at) VALUES ('t', now()) "
                                    "RETURNING id")).scalar_one()
            conn.execute(text("INSERT INTO api_keys (tenant_id, name, prefix, key_hash, created_at) "
                              "VALUES (:t, 'k', 'sk-x', 'h1', now())"), {"t": tid})
            conn.execute(text("INSERT INTO usage_records (request_id, tenant_id, api_key_id, model, "
                              "status, created_at) VALUES ('r1', 1, 1, 'm', 'ok', date_trunc('month', now()))"))
        with pytest.raises(IntegrityError):
            with engine.begin() as conn:
                conn.execute(text("INSERT INTO api_keys (tenant_id, name, prefix, key_hash, created_at) "
                                  "VALUES (:t, 'k2', 'sk-y', 'h1', now())"), {"t": tid})
        with pytest.raises(IntegrityError):
            with engine.begin() as conn:
                conn.execute(text("INSERT INTO usage_records (request_id, tenant_id, api_key_id, model, "
                                  "status, created_at) VALUES ('r1', 1, 1, 'm', 'ok', date_trunc('month', now()))"))
    finally:
        engine.dispose()


def test_sqlite_upgrade_downgrade_round_trip(sqlite_url):
    """SQLite goes through the same upgrade / downgrade / upgrade round trip with the same schema."""
    round_trip(sqlite_url)
