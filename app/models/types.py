"""Column types shared by the models."""
from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import BigInteger, DateTime, Integer, Numeric

# Integer primary keys: BIGINT on PostgreSQL, INTEGER on SQLite (so it autoincrements there).
BigId = BigInteger().with_variant(Integer(), "sqlite")
# Money: exact decimal, ten places (a token of a $0.0375/Mtok model costs 3.75e-8).
Money = Numeric(20, 10, asdecimal=True)
# Timestamps: timezone-aware on PostgreSQL; SQLite keeps naive UTC (see `as_utc`).
UTCDateTime = DateTime(timezone=True)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite hands datetimes back naive: they are UTC by construction here."""
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)
