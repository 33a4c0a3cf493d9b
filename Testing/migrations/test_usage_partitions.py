"""Migration 0003 on data: usage_records of 0001 become a monthly-partitioned table with every
row kept (ids too) and the daily rollup built from them; downgrade gives the plain table back
with the same rows; both on PostgreSQL."""
from __future__ import annotations

from typing import Iterator

import pytest
from sqlalchemy import create_engine, text

import db_manager
from Testing.support import create_database, database_url, drop_database

pytestmark = pytest.mark.timeout(60)

ROWS = [("r1", "2025-01-31T23:59:59.999999Z", 10, "0.1"), ("r2", "2025-02-01T00:00:00Z", 20, "0.2"),
        ("r3", "2025-02-14T12:00:00+05:00", 30, "0.0000000003"), ("r4", "2026-06-30T23:00:00Z", 40, "4")]


@pytest.fixture
def url() -> Iterator[str]:
    name = create_database("gw_mig3")
    try:
        yield database_url(name)
    finally:
        drop_database(name)


def dump(engine) -> list[tuple]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(
            "SELECT id, request_id, created_at, total_tokens, cost_usd FROM usage_records ORDER BY id"))]


def test_upgrade_partitions_existing_rows_and_downgrade_restores_them(url):
    """0001 -> 0003 keeps every row in its month's partition and sums them into usage_daily;
    0003 -> 0001 brings the same rows back into a plain table with a unique request_id; new
    ids continue after the old ones."""
    db_manager.upgrade(url, "0001")
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            for rid, at, tokens, cost in ROWS:
                conn.execute(text("INSERT INTO usage_records (request_id, tenant_id, api_key_id, model, status, "
                                  "total_tokens, prompt_tokens, cost_usd, created_at) VALUES (:r, 1, 2, 'm', 'ok', "
                                  ":t, :t, :c, :at)"), {"r": rid, "t": tokens, "c": cost, "at": at})
        before = dump(engine)
        db_manager.upgrade(url, "0003")
        assert dump(engine) == before
        with engine.connect() as conn:
            parts = dict(conn.execute(text(
                "SELECT tableoid::regclass::text, count(*) FROM usage_records GROUP BY 1")).all())
            assert parts == {"usage_records_p202501": 1, "usage_records_p202502": 2, "usage_records_p202606": 1}
            daily = conn.execute(text("SELECT day::text, requests, total_tokens, cost_usd::text FROM usage_daily "
                                      "ORDER BY day")).all()
            assert [tuple(r) for r in daily] == [
                ("2025-01-31", 1, 10, "0.1000000000"), ("2025-02-01", 1, 20, "0.2000000000"),
                ("2025-02-14", 1, 30, "0.0000000003"), ("2026-06-30", 1, 40, "4.0000000000")]
            next_id = conn.execute(text("SELECT nextval('usage_records_id_seq')")).scalar()
            assert next_id > max(r[0] for r in before)
        db_manager.downgrade(url, "0001")
        assert dump(engine) == before
        with engine.connect() as conn:
            assert conn.execute(text("SELECT to_regclass('usage_daily')")).scalar() is None
            assert conn.execute(text("SELECT count(*) FROM pg_inherits")).scalar() == 0
        db_manager.upgrade(url)
        assert dump(engine) == before
    finally:
        engine.dispose()
