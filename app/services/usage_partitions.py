"""Monthly partitions of `usage_records` on PostgreSQL, and retention.

One partition per UTC calendar month, `usage_records_pYYYYMM`, covering
[first instant of the month, first instant of the next) in UTC. They are created ahead
(`db_manager create-partitions`, and by every worker's flusher at start-up) and on demand by
the writer when a row's month has none (an outbox replay of an old month, a clock far ahead),
so an insert never fails for want of a partition. SQLite (embedded mode) has a plain table:
every function here is a no-op there, except pruning, which deletes rows.
"""
from __future__ import annotations

import logging
from datetime import date, datetime, timedelta, timezone
from typing import Iterable

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from app.utils import db_errors

log = logging.getLogger("gateway.usage")
PARENT = "usage_records"


def month_start(value: datetime | date) -> date:
    if isinstance(value, datetime):
        value = value.astimezone(timezone.utc) if value.tzinfo else value
    return date(value.year, value.month, 1)


def next_month(month: date) -> date:
    return (month + timedelta(days=32)).replace(day=1)


def partition_name(month: date) -> str:
    return f"{PARENT}_p{month:%Y%m}"


def is_partitioned(conn: Connection) -> bool:
    if conn.dialect.name != "postgresql":
        return False
    return bool(conn.execute(text("SELECT 1 FROM pg_partitioned_table p JOIN pg_class c ON c.oid = p.partrelid "
                                  "WHERE c.relname = :t AND pg_table_is_visible(c.oid)"), {"t": PARENT}).scalar())


def existing_partitions(conn: Connection) -> dict[str, date]:
    rows = conn.execute(text(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = :t AND pg_table_is_visible(p.oid)"),
        {"t": PARENT})
    found = {}
    for (name,) in rows:
        suffix = name[len(PARENT) + 2:]
        if name.startswith(PARENT + "_p") and len(suffix) == 6 and suffix.isdigit():
            found[name] = date(int(suffix[:4]), int(suffix[4:]), 1)
    return found


def ensure_partitions(engine: Engine, months: Iterable[date]) -> list[str]:
    """Create the partitions of `months` that are missing; returns the names created.

    Checks first so that an existing partition costs one catalogue query, not a lock on the
    parent. Two workers creating the same month at once: the loser sees "already exists" and
    moves on (told by SQLSTATE, see app/utils/db_errors.py)."""
    wanted = sorted({month_start(m) for m in months})
    if not wanted or engine.dialect.name != "postgresql":
        return []
    created: list[str] = []
    with engine.connect() as conn:
        if not is_partitioned(conn):
            return []
        have = set(existing_partitions(conn))
        conn.rollback()
        for month in wanted:
            name = partition_name(month)
            if name in have:
                continue
            start = datetime(month.year, month.month, 1, tzinfo=timezone.utc)
            end = datetime(*next_month(month).timetuple()[:3], tzinfo=timezone.utc)
            try:
                with conn.begin():
                    conn.execute(text(f"CREATE TABLE IF NOT EXISTS {name} PARTITION OF {PARENT} "
                                      f"FOR VALUES FROM ('{start.isoformat()}') TO ('{end.isoformat()}')"))
                created.append(name)
            except DBAPIError as exc:  # created concurrently by another worker
                if not db_errors.is_already_exists(exc):
                    raise
    if created:
        log.info("usage partitions created: %s", ", ".join(created))
    return created


def ensure_ahead(engine: Engine, months_ahead: int, now: datetime | None = None) -> list[str]:
    """This month's partition and the next `months_ahead` ones."""
    month = month_start(now or datetime.now(timezone.utc))
    months = [month]
    for _ in range(months_ahead):
        month = next_month(month)
        months.append(month)
    return ensure_partitions(engine, months)


def prune(engine: Engine, cutoff: datetime, keep_rollup: bool = False) -> dict[str, int]:
    """Delete usage older than `cutoff` (a UTC day boundary): whole monthly partitions before it
    are dropped (instant, no bloat), rows of the month holding the cutoff are deleted; the
    daily rollup before the cutoff day too unless `keep_rollup`. Returns what was removed."""
    cutoff = cutoff.astimezone(timezone.utc)
    cutoff_db = cutoff if engine.dialect.name == "postgresql" else cutoff.replace(tzinfo=None)
    result = {"partitions_dropped": 0, "rows_deleted": 0, "rollup_rows_deleted": 0}
    with engine.begin() as conn:
        if is_partitioned(conn):
            for name, month in sorted(existing_partitions(conn).items(), key=lambda kv: kv[1]):
                if next_month(month) <= cutoff.date():  # the whole month is before the cutoff
                    conn.execute(text(f"DROP TABLE {name}"))
                    result["partitions_dropped"] += 1
        result["rows_deleted"] = conn.execute(
            text(f"DELETE FROM {PARENT} WHERE created_at < :c"), {"c": cutoff_db}).rowcount
        if not keep_rollup:
            result["rollup_rows_deleted"] = conn.execute(
                text("DELETE FROM usage_daily WHERE day < :d"), {"d": cutoff.date()}).rowcount
    return result
