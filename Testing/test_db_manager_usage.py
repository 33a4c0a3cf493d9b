"""`db_manager.py` usage commands as real subprocesses: create-partitions creates this month's
and the next ones, flush-usage drains the outbox (Redis list and spool files) once and writes
nothing on a second run, prune-usage drops whole old months and deletes older rows (and their
rollup unless --keep-rollup), and by default keeps USAGE_RETENTION_DAYS days."""
from __future__ import annotations

import os
import subprocess
import sys
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Iterator

import pytest
import redis
from sqlalchemy import create_engine, text

import db_manager
from app.services.usage_outbox import SpoolOutbox, outbox_key
from app.services.usage_partitions import existing_partitions, month_start, next_month
from app.services.usage_service import UsageEvent, UsageWriter
from Testing.support import REDIS_URL, ROOT, create_database, database_url, drop_database, free_port

pytestmark = pytest.mark.timeout(120)
UTC = timezone.utc


@pytest.fixture
def url() -> Iterator[str]:
    name = create_database("gw_dbm_usage")
    try:
        u = database_url(name)
        db_manager.upgrade(u)
        yield u
    finally:
        drop_database(name)


OUTBOX_NAME = "usage-dbm-" + uuid.uuid4().hex[:8]  # this module's own outbox
OUTBOX_KEY = outbox_key(OUTBOX_NAME)


def run(url: str, *args: str, redis_url: str = REDIS_URL) -> subprocess.CompletedProcess:
    env = {**os.environ, "DATABASE_URL": url, "REDIS_URL": redis_url, "USAGE_OUTBOX_NAME": OUTBOX_NAME}
    return subprocess.run([sys.executable, "db_manager.py", *args], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=60)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, (proc.args, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    return proc.stdout


def event(at: datetime) -> UsageEvent:
    return UsageEvent(request_id="req_" + uuid.uuid4().hex, tenant_id=1, api_key_id=1, model="m",
                      prompt_tokens=1, completion_tokens=1, cost_usd=Decimal("0.01"), created_at=at)


def count(engine, sql: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(sql)).scalar())


def test_create_partitions_makes_this_month_and_the_next_ones(url):
    """create-partitions --months-ahead 5 leaves partitions for this month and the 5 after it."""
    out = ok(run(url, "create-partitions", "--months-ahead", "5"))
    assert "partition" in out
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            months = set(existing_partitions(conn).values())
        m = month_start(datetime.now(UTC))
        for _ in range(6):
            assert m in months, (m, months)
            m = next_month(m)
    finally:
        engine.dispose()


def test_flush_usage_drains_redis_and_spool_once(url, tmp_path):
    """flush-usage writes what the Redis outbox and the spool files hold; run again it finds
    nothing and writes nothing."""
    client = redis.Redis.from_url(REDIS_URL)
    client.delete(OUTBOX_KEY)
    now = datetime.now(UTC)
    in_redis = [event(now) for _ in range(6)]
    client.rpush(OUTBOX_KEY, *[e.to_json() for e in in_redis])
    spool = SpoolOutbox(tmp_path)
    spool.append([e.to_json() for e in [event(now) for _ in range(4)] + in_redis[:2]])  # 2 also in Redis
    spool.close()
    first = ok(run(url, "flush-usage", "--spool-dir", str(tmp_path)))
    assert "replayed 12 usage records (10 new rows)" in first, first
    second = ok(run(url, "flush-usage", "--spool-dir", str(tmp_path)))
    assert "replayed 0 usage records (0 new rows)" in second, second
    assert client.llen(OUTBOX_KEY) == 0 and list(tmp_path.glob("*.spool")) == []
    client.close()
    engine = create_engine(url)
    try:
        assert count(engine, "SELECT count(*) FROM usage_records") == 10
        assert count(engine, "SELECT sum(requests) FROM usage_daily") == 10
    finally:
        engine.dispose()


def test_flush_usage_with_database_unreachable_exits_2(tmp_path):
    """flush-usage against a closed port: one line on stderr, exit 2, the outbox untouched."""
    dead = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/x"
    proc = run(dead, "flush-usage", "--spool-dir", str(tmp_path), redis_url="")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: cannot reach the database") and "Traceback" not in proc.stderr


@pytest.mark.parametrize("keep_rollup", [False, True])
def test_prune_usage_older_than(url, keep_rollup):
    """prune-usage --older-than DATE drops the months wholly before it, deletes older rows of
    the month holding it, and the rollup before it unless --keep-rollup; later rows stay."""
    engine = create_engine(url)
    try:
        times = [datetime(2025, 1, 10, tzinfo=UTC), datetime(2025, 2, 27, tzinfo=UTC),
                 datetime(2025, 3, 4, 23, 59, tzinfo=UTC), datetime(2025, 3, 5, tzinfo=UTC),
                 datetime(2025, 4, 1, tzinfo=UTC)]
        UsageWriter(engine).write([event(t) for t in times])
        args = ["prune-usage", "--older-than", "2025-03-05"] + (["--keep-rollup"] if keep_rollup else [])
        out = ok(run(url, *args))
        assert "2 monthly partition(s) dropped, 1 row(s) deleted" in out, out
        with engine.connect() as conn:
            names = set(existing_partitions(conn))
            days = [d.isoformat() for d in conn.execute(text("SELECT day FROM usage_daily ORDER BY day")).scalars()]
        assert "usage_records_p202501" not in names and "usage_records_p202503" in names
        assert count(engine, "SELECT count(*) FROM usage_records") == 2
        kept = ["2025-01-10", "2025-02-27", "2025-03-04"] if keep_rollup else []
        assert days == kept + ["2025-03-05", "2025-04-01"]
        UsageWriter(engine).write([event(times[0] + timedelta(hours=1))])  # the month is re-created on demand
        assert count(engine, "SELECT count(*) FROM usage_records") == 3
    finally:
        engine.dispose()


def test_prune_usage_defaults_to_usage_retention_days(url, monkeypatch, capsys):
    """Without --older-than, prune-usage keeps the last USAGE_RETENTION_DAYS days: older rows go,
    newer ones stay. With the setting at 0 (keep everything) it does not guess a cutoff: one error
    line naming the setting, exit 1, nothing deleted."""
    engine = create_engine(url)
    try:
        now = datetime.now(UTC)
        recent = event(now - timedelta(days=1))
        UsageWriter(engine).write([event(now - timedelta(days=400)), recent])
        monkeypatch.setenv("USAGE_RETENTION_DAYS", "0")
        assert db_manager.main(["--database-url", url, "prune-usage"]) == 1
        assert "USAGE_RETENTION_DAYS" in capsys.readouterr().err
        assert count(engine, "SELECT count(*) FROM usage_records") == 2
        monkeypatch.setenv("USAGE_RETENTION_DAYS", "30")
        assert db_manager.main(["--database-url", url, "prune-usage"]) == 0
        assert "pruned" in capsys.readouterr().out
        with engine.connect() as conn:
            assert list(conn.execute(text("SELECT request_id FROM usage_records")).scalars()) == [recent.request_id]
    finally:
        engine.dispose()


def test_maintain_runs_once_across_concurrent_schedulers(url):
    """Three schedulers start `maintain` at once (as cron on three hosts would): one creates the
    partitions and prunes past USAGE_RETENTION_DAYS, the other two skip (Redis lock per period);
    once the lock is gone a later run works again."""
    from concurrent.futures import ThreadPoolExecutor

    from app.services.maintenance import LOCK_KEY

    client = redis.Redis.from_url(REDIS_URL)
    client.delete(LOCK_KEY)
    engine = create_engine(url)
    try:
        UsageWriter(engine).write([event(datetime.now(UTC) - timedelta(days=60)), event(datetime.now(UTC))])
        env_run = lambda: subprocess.run(  # noqa: E731
            [sys.executable, "db_manager.py", "maintain", "--period", "60s"], cwd=ROOT, stdin=subprocess.DEVNULL,
            env={**os.environ, "DATABASE_URL": url, "REDIS_URL": REDIS_URL, "USAGE_RETENTION_DAYS": "30",
                 "USAGE_PARTITIONS_AHEAD": "2"}, capture_output=True, text=True, timeout=60)
        with ThreadPoolExecutor(3) as pool:
            outputs = [ok(p) for p in pool.map(lambda _: env_run(), range(3))]
        assert sum("maintenance done" in o for o in outputs) == 1, outputs
        assert sum("maintenance skipped" in o for o in outputs) == 2, outputs
        assert count(engine, "SELECT count(*) FROM usage_records") == 1
        with engine.connect() as conn:
            months = set(existing_partitions(conn).values())
        this_month = month_start(datetime.now(UTC))
        assert {this_month, next_month(this_month), next_month(next_month(this_month))} <= months
        assert 0 < client.pttl(LOCK_KEY) <= 60_000
        client.delete(LOCK_KEY)
        assert "maintenance done" in ok(env_run())
    finally:
        client.delete(LOCK_KEY)
        client.close()
        engine.dispose()


def test_check_models_names_the_bad_entry(tmp_path):
    """`check-models` validates a models file as the gateway would (the SIGHUP reload runs it)."""
    good = ok(subprocess.run([sys.executable, "db_manager.py", "check-models", "data/models.json"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60))
    assert good.strip().endswith(f"valid, {len(db_manager_models())} models")
    bad = tmp_path / "models.json"
    bad.write_text('{"providers": {"p": {"type": "simulator"}}, "models": {"m": {"deployments": '
                   '[{"provider": "p", "model": "x"}], "pricing": {"input_per_mtok": "free"}}}}')
    proc = subprocess.run([sys.executable, "db_manager.py", "check-models", str(bad)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "models.m.pricing.input_per_mtok" in proc.stderr and "Traceback" not in proc.stderr


def db_manager_models() -> dict:
    import json
    return json.loads((ROOT / "data" / "models.json").read_text())["models"]
