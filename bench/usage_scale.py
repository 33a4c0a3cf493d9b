#!/usr/bin/env python3
"""Usage store at scale: load synthetic usage rows with COPY, then time `/v1/usage`.

    .venv/bin/python bench/usage_scale.py                  # 10M rows, 1,000 keys, 12 months
    .venv/bin/python bench/usage_scale.py --rows 1000000   # quicker
    .venv/bin/python bench/usage_scale.py --keep           # keep the database afterwards

Creates its own database (`gw_usage_scale_<random>`) on the test PostgreSQL server
(`TEST_PG_URL`, default postgres@127.0.0.1:5432) and migrates it to head; 1,000 keys in 50
tenants; rows spread uniformly over the 12 UTC months before the current one, loaded with
COPY into the partitioned table; the daily rollup built from them (as the writer keeps it);
ANALYZE. Then, through the Flask app (its test client: the whole request path without the
network), the median and p95 of 30 calls of `/v1/usage` for one key's month (whole days: the
rollup only; and shifted by 12 h: two raw edge days), and `/v1/usage?tenant=...` for one
tenant's year (as the operator, with the system secret), also read from raw rows only for
comparison. Finally the writer: rows/s with the rollup kept in the same statement vs. a
plain insert. Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import io
import random
import statistics
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

import db_manager  # noqa: E402
from Testing.support import create_database, database_url, drop_database  # noqa: E402

UTC = timezone.utc
MODELS = [("gpt-4o-mini", "openai", Decimal("0.15"), Decimal("0.60")),
          ("gpt-4o", "openai", Decimal("2.5"), Decimal("10")),
          ("llama-3.3-70b", "groq", Decimal("0.59"), Decimal("0.79")),
          ("deepseek-chat", "deepseek", Decimal("0.27"), Decimal("1.10"))]


def month_start(d: datetime) -> datetime:
    return d.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def add_months(d: datetime, n: int) -> datetime:
    y, m = divmod(d.month - 1 + n, 12)
    return d.replace(year=d.year + y, month=m + 1)


def make_keys(url: str, n_keys: int, n_tenants: int) -> tuple[list[tuple[int, int]], str]:
    from app.services.actor import cli_actor
    from app.services.api_key_service import new_key
    from app.services.tenant_service import get_or_create_tenant
    engine = create_engine(url)
    keys, first_plain = [], ""
    with Session(engine) as session:
        for i in range(n_keys):
            tenant = get_or_create_tenant(session, cli_actor(), f"tenant-{i % n_tenants}")
            key, plain = new_key(session, name=f"k{i}", tenant=tenant)
            keys.append((key.id, key.tenant_id))
            first_plain = first_plain or plain
        session.commit()  # set-up data in one transaction (no audit rows: not an admin action)
    engine.dispose()
    return keys, first_plain


def copy_rows(pg_dsn: str, rows: int, keys: list[tuple[int, int]], start: datetime, end: datetime) -> float:
    span = (end - start).total_seconds()
    t0 = time.perf_counter()
    rnd = random.Random(42)
    chunk = 200_000
    with psycopg.connect(pg_dsn) as conn, conn.cursor() as cur:
        with cur.copy("COPY usage_records (request_id, tenant_id, api_key_id, model, provider, upstream_model, "
                      "prompt_tokens, completion_tokens, total_tokens, cost_usd, status, error_type, streamed, "
                      "cached, latency_ms, ttft_ms, created_at) FROM STDIN") as copy:
            done = 0
            while done < rows:
                n = min(chunk, rows - done)
                buf = io.StringIO()
                for _ in range(n):
                    key_id, tenant_id = keys[rnd.randrange(len(keys))]
                    model, provider, pin, pout = MODELS[rnd.randrange(4)]
                    p, c = rnd.randrange(20, 2000), rnd.randrange(1, 800)
                    cost = (pin * p + pout * c) / 1_000_000
                    at = start + timedelta(seconds=rnd.random() * span)
                    streamed = "t" if rnd.random() < 0.5 else "f"
                    buf.write(f"req_{uuid.UUID(int=rnd.getrandbits(128)).hex}\t{tenant_id}\t{key_id}\t{model}\t"
                              f"{provider}\t{model}\t{p}\t{c}\t{p + c}\t{cost}\tok\t\\N\t{streamed}\tf\t"
                              f"{rnd.randrange(200, 9000)}\t{rnd.randrange(50, 900)}\t{at.isoformat()}\n")
                copy.write(buf.getvalue())
                done += n
                print(f"  copied {done:,} rows ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        conn.commit()
    return time.perf_counter() - t0


def timed(fn, runs: int = 30) -> tuple[float, float]:
    fn()  # warm
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.95) - 1]


def write_throughput(url: str, keys: list[tuple[int, int]], batches: int = 200, size: int = 100) -> tuple[float, float]:
    """rows/s of the writer (insert + rollup in one statement) vs. the same insert alone."""
    from app.services.usage_service import _COLUMNS, UsageEvent, UsageWriter
    engine = create_engine(url)
    writer = UsageWriter(engine)
    now = datetime.now(UTC)

    def events(n: int) -> list[UsageEvent]:
        return [UsageEvent(request_id="req_" + uuid.uuid4().hex, tenant_id=t, api_key_id=k, model="gpt-4o-mini",
                           provider="openai", upstream_model="gpt-4o-mini", prompt_tokens=100, completion_tokens=20,
                           cost_usd=Decimal("0.000027"), latency_ms=300, ttft_ms=90, created_at=now)
                for k, t in (keys[random.randrange(len(keys))] for _ in range(n))]
    plain_sql = (f"INSERT INTO usage_records ({', '.join(c for c, _ in _COLUMNS)}) SELECT * FROM unnest("
                 f"{', '.join(f'%({c})s::{t}[]' for c, t in _COLUMNS)}) ON CONFLICT DO NOTHING")

    def plain(batch: list[UsageEvent]) -> None:
        rows = [e.row() for e in batch]
        with engine.begin() as conn:
            conn.exec_driver_sql(plain_sql, {c: [r[c] for r in rows] for c, _ in _COLUMNS})
    results = []
    for write in (writer.write, plain):
        data = [events(size) for _ in range(batches)]
        t0 = time.perf_counter()
        for batch in data:
            write(batch)
        results.append(batches * size / (time.perf_counter() - t0))
    engine.dispose()
    return results[0], results[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--keys", type=int, default=1000)
    ap.add_argument("--tenants", type=int, default=50)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    name = create_database("gw_usage_scale")
    url = database_url(name)
    pg_dsn = url.replace("postgresql+psycopg://", "postgresql://")
    print(f"database {name}", file=sys.stderr)
    try:
        db_manager.upgrade(url)
        end = month_start(datetime.now(UTC))
        start = add_months(end, -12)
        from app.services.usage_partitions import ensure_partitions
        engine = create_engine(url)
        ensure_partitions(engine, [add_months(start, i).date() for i in range(12)])
        keys, plain_key = make_keys(url, args.keys, args.tenants)
        copy_s = copy_rows(pg_dsn, args.rows, keys, start, end)
        t0 = time.perf_counter()
        with engine.begin() as conn:
            conn.execute(text("""
                INSERT INTO usage_daily (day, tenant_id, api_key_id, model, requests, prompt_tokens,
                                         completion_tokens, total_tokens, cost_usd)
                SELECT (created_at AT TIME ZONE 'UTC')::date, tenant_id, api_key_id, model, count(*),
                       sum(prompt_tokens), sum(completion_tokens), sum(total_tokens), sum(cost_usd)
                FROM usage_records GROUP BY 1, 2, 3, 4"""))
        rollup_s = time.perf_counter() - t0
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE usage_records")
            conn.execute("VACUUM ANALYZE usage_daily")
            heap, total = conn.execute(
                "SELECT sum(pg_table_size(inhrelid)), sum(pg_total_relation_size(inhrelid)) FROM pg_inherits "
                "WHERE inhparent = 'usage_records'::regclass").fetchone()
            rollup_bytes, rollup_rows = conn.execute(
                "SELECT pg_total_relation_size('usage_daily'), (SELECT count(*) FROM usage_daily)").fetchone()

        from app import create_app
        secret = uuid.uuid4().hex
        app = create_app({"DATABASE_URL": url, "REDIS_URL": "", "LOG_LEVEL": "WARNING", "SYSTEM_SECRET": secret})
        client = app.test_client()
        headers = {"Authorization": f"Bearer {plain_key}"}
        key_id, tenant_id = keys[0]
        month = add_months(end, -2)
        month_end = add_months(month, 1)
        iso = lambda d: d.isoformat().replace("+00:00", "Z")  # noqa: E731

        def key_month() -> None:
            resp = client.get(f"/v1/usage?start={iso(month)}&end={iso(month_end)}&group_by=day", headers=headers)
            assert resp.status_code == 200, resp.get_json()

        def key_month_edges() -> None:
            lo, hi = month + timedelta(hours=12), month_end + timedelta(hours=12)
            resp = client.get(f"/v1/usage?start={iso(lo)}&end={iso(hi)}&group_by=model", headers=headers)
            assert resp.status_code == 200, resp.get_json()
        rt_engine = app.extensions["gateway"].engine

        def tenant_year() -> None:
            resp = client.get(f"/v1/usage?tenant=tenant-0&start={iso(start)}&end={iso(end)}&group_by=model",
                              headers={"X-System-Secret": secret})
            assert resp.status_code == 200, resp.get_json()

        def tenant_year_raw() -> None:
            with rt_engine.connect() as conn:
                conn.execute(text("SELECT model, count(*), sum(total_tokens), sum(cost_usd) FROM usage_records "
                                  "WHERE tenant_id = :t AND created_at >= :s AND created_at < :e GROUP BY model"),
                             {"t": tenant_id, "s": start, "e": end}).all()
        figures = {
            "key month, whole days (HTTP, group_by=day)": timed(key_month),
            "key month shifted 12 h: 2 raw edge days (HTTP, group_by=model)": timed(key_month_edges),
            "tenant year (HTTP, tenant=..., group_by=model)": timed(tenant_year),
            "tenant year from raw rows only (no rollup)": timed(tenant_year_raw, runs=3),
        }
        body = client.get(f"/v1/usage?start={iso(month)}&end={iso(month_end)}", headers=headers).get_json()
        app.extensions["gateway"].usage_batcher.close(5)
        app.extensions["gateway"].engine.dispose()
        with_rollup, plain_rate = write_throughput(url, keys)
        engine.dispose()

        rows = args.rows
        print(f"\nrows {rows:,} | keys {args.keys} | tenants {args.tenants} | months 12 "
              f"({iso(start)} .. {iso(end)}); key {key_id}'s month: {body['requests']:,} requests\n")
        print("| figure | value |\n|---|---|")
        print(f"| COPY load | {copy_s:.0f} s ({rows / copy_s:,.0f} rows/s) |")
        print(f"| rollup built from scratch | {rollup_s:.0f} s, {rollup_rows:,} rows, "
              f"{rollup_bytes / 2**20:.0f} MiB |")
        print(f"| usage_records heap | {heap / 2**30:.2f} GiB = {heap / rows:.0f} bytes/row |")
        print(f"| usage_records with indexes | {total / 2**30:.2f} GiB = {total / rows:.0f} bytes/row |")
        for label, (p50, p95) in figures.items():
            print(f"| {label} | p50 {p50:.1f} ms, p95 {p95:.1f} ms |")
        print(f"| writer, batches of 100: insert + rollup | {with_rollup:,.0f} rows/s |")
        print(f"| writer, batches of 100: insert only | {plain_rate:,.0f} rows/s |")
    finally:
        if not args.keep:
            drop_database(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
