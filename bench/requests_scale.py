#!/usr/bin/env python3
"""The request log at scale: time a page of `GET /v1/requests` on a large usage table.

    .venv/bin/python bench/requests_scale.py                  # 1M rows, 1,000 keys, 50 tenants
    .venv/bin/python bench/requests_scale.py --rows 5000000

Creates its own database (`gw_requests_scale_<random>`) on the test PostgreSQL server
(`TEST_PG_URL`), migrates it, creates the tenants and one month's partition, loads the rows with
one INSERT ... SELECT generate_series (spread uniformly over the month), ANALYZE, then times
`request_log_service.list_requests` (the query of the endpoint, without HTTP): the first page
(20 rows) of one key, of one tenant, of everyone (the system secret: newest page of each tenant
merged), the same everyone's page read the naive way (one query sorting the table: what the
per-tenant merge saves), and page 51 of one key (50 cursors deep). Median and max of 15 calls,
as a Markdown table. The database is dropped at the end.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import create_engine, text  # noqa: E402

import db_manager  # noqa: E402
from Testing.support import create_database, database_url, drop_database  # noqa: E402
from app.services import request_log_service, usage_partitions  # noqa: E402
from app.services.request_log_service import RequestQuery  # noqa: E402

MONTH = date(2026, 11, 1)


def load(engine, rows: int, keys: int, tenants: int) -> float:
    started = time.perf_counter()
    usage_partitions.ensure_partitions(engine, {MONTH})
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO tenants (name, status, created_at) "
                          "SELECT 'tenant-' || g, 'active', now() FROM generate_series(1, :n) g"), {"n": tenants})
        conn.execute(text("""
            INSERT INTO usage_records (request_id, tenant_id, api_key_id, model, prompt_tokens,
                completion_tokens, total_tokens, cost_usd, status, streamed, cached, latency_ms, ttft_ms, created_at)
            SELECT 'req_' || g, g % :tenants + 1, g % :keys + 1, 'gpt-4o-mini', 10, 5, 15, 0.0000045, 'ok',
                   true, false, 300, 40, timestamptz '2026-11-01' + g * (interval '30 days' / :rows)
            FROM generate_series(1, :rows) g"""), {"rows": rows, "keys": keys, "tenants": tenants})
        conn.execute(text("ANALYZE"))
    return time.perf_counter() - started


def timed(call, n: int = 15) -> tuple[float, float]:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), max(times)


def naive_everyone(engine) -> None:
    """Everyone's first page as one sorted query (what the endpoint avoids)."""
    with engine.connect() as conn:
        conn.execute(request_log_service._matching(RequestQuery(), sqlite=False)).all()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--tenants", type=int, default=50)
    args = parser.parse_args()
    name = create_database("gw_requests_scale")
    url = database_url(name)
    try:
        db_manager.upgrade(url)
        engine = create_engine(url)
        seconds = load(engine, args.rows, args.keys, args.tenants)
        deep = RequestQuery(api_key_id=7)
        for _ in range(50):
            deep.cursor = request_log_service.list_requests(engine, deep)["next_cursor"]
        cases = [("one key, first page", lambda: request_log_service.list_requests(engine, RequestQuery(api_key_id=7))),
                 ("one tenant, first page", lambda: request_log_service.list_requests(engine, RequestQuery(tenant_id=3))),
                 ("everyone, first page (per-tenant merge)", lambda: request_log_service.list_requests(engine, RequestQuery())),
                 ("everyone, first page, one sorted query", lambda: naive_everyone(engine)),
                 ("one key, page 51", lambda: request_log_service.list_requests(engine, deep))]
        print(f"{args.rows:,} rows, {args.keys:,} keys, {args.tenants} tenants, one month; loaded in {seconds:.1f} s\n")
        print("| page of /v1/requests (20 rows) | median | max |\n|---|---|---|")
        for label, call in cases:
            median, worst = timed(call)
            print(f"| {label} | {median:.1f} ms | {worst:.1f} ms |")
        engine.dispose()
    finally:
        drop_database(name)


if __name__ == "__main__":
    main()
