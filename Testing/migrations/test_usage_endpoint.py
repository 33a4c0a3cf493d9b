"""Migration 0005_usage_endpoint on data, on PostgreSQL and on the embedded SQLite: rows written before it say
they came from chat completions and have no token details; the rollup's key gains the
endpoint (two endpoints of one day, key and model are two rollup rows); downgrade folds them
back into one row with the sums of both."""
from __future__ import annotations

from typing import Iterator

import pytest
from sqlalchemy import create_engine, text

import db_manager
from Testing.support import create_database, database_url, drop_database

pytestmark = pytest.mark.timeout(60)

INSERT_RECORD = ("INSERT INTO usage_records (request_id, tenant_id, api_key_id, model, status, prompt_tokens, "
                 "total_tokens, cost_usd, created_at) VALUES ('old', 1, 2, 'm', 'ok', 7, 7, 0.5, "
                 "CURRENT_TIMESTAMP)")
INSERT_DAILY = ("INSERT INTO usage_daily (day, tenant_id, api_key_id, model, requests, prompt_tokens, "
                "completion_tokens, total_tokens, cost_usd) VALUES ('2026-11-20', 1, 2, 'm', 1, 7, 0, 7, 0.5)")


@pytest.fixture(params=["postgresql", "sqlite"])
def url(request, tmp_path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/gw.db"
        return
    name = create_database("gw_mig5")
    try:
        yield database_url(name)
    finally:
        drop_database(name)


def test_old_rows_are_chat_completions_and_downgrade_folds_endpoints(url):
    db_manager.upgrade(url, "0004_audit_actor_name")
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text(INSERT_RECORD))
            conn.execute(text(INSERT_DAILY))
        db_manager.upgrade(url, "0005_usage_endpoint")
        with engine.begin() as conn:
            row = conn.execute(text("SELECT endpoint, cached_tokens, cache_write_tokens, reasoning_tokens "
                                    "FROM usage_records WHERE request_id = 'old'")).one()
            assert tuple(row) == ("chat.completions", None, None, None)
            assert conn.execute(text("SELECT endpoint FROM usage_daily")).scalars().all() == ["chat.completions"]
            conn.execute(text("INSERT INTO usage_daily (day, tenant_id, api_key_id, model, endpoint, requests, "
                              "prompt_tokens, completion_tokens, total_tokens, cost_usd) VALUES "
                              "('2026-11-20', 1, 2, 'm', 'responses', 2, 10, 4, 14, 0.25)"))
        db_manager.downgrade(url, "0004_audit_actor_name")
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT day, requests, prompt_tokens, completion_tokens, total_tokens, "
                                     "cost_usd FROM usage_daily")).all()
            assert [(str(r[0]), r[1], r[2], r[3], r[4], float(r[5])) for r in rows] == [
                ("2026-11-20", 3, 17, 4, 21, 0.75)]
            assert conn.execute(text("SELECT count(*) FROM usage_records")).scalar() == 1
        db_manager.upgrade(url)
    finally:
        engine.dispose()
