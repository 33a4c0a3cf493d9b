from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal

from sqlalchemy import (BigInteger, Boolean, Date, Index, Integer, Numeric, PrimaryKeyConstraint, String, Text,
                        false as sa_false)
from sqlalchemy.orm import Mapped, mapped_column

from app.extensions import db
from app.models.types import BigId, Money, UTCDateTime, utcnow

DEFAULT_ENDPOINT = "chat.completions"


class UsageRecord(db.Model):
    """One row per request that reached (or was meant to reach) a provider.

    Lean on purpose: no request bodies, no copies of prices. Writes are idempotent on
    (request_id, created_at) (a replayed record is a no-op, never a second bill): on PostgreSQL
    the table is partitioned by month on `created_at`, and a partitioned table's unique key must
    hold the partition key. `created_at` is fixed when the event is created and carried through
    the outbox, so a replay always presents the same key. `id` is a plain sequence number.
    """
    __tablename__ = "usage_records"

    id: Mapped[int] = mapped_column(BigId, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(BigId, nullable=False)
    api_key_id: Mapped[int] = mapped_column(BigId, nullable=False)
    model: Mapped[str] = mapped_column(String(200), nullable=False)
    provider: Mapped[str | None] = mapped_column(String(100), nullable=True)
    upstream_model: Mapped[str | None] = mapped_column(String(200), nullable=True)
    prompt_tokens: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    total_tokens: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    cost_usd: Mapped[Decimal] = mapped_column(Money, nullable=False, default=0)
    status: Mapped[str] = mapped_column(String(20), nullable=False)  # ok | error | client_disconnected
    error_type: Mapped[str | None] = mapped_column(String(50), nullable=True)
    streamed: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    cached: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)  # a response cache hit
    latency_ms: Mapped[int | None] = mapped_column(Integer, nullable=True)
    ttft_ms: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, primary_key=True, default=utcnow)
    # which API served it: chat.completions | responses | messages | embeddings | images | uptime
    endpoint: Mapped[str] = mapped_column(Text, nullable=False, default=DEFAULT_ENDPOINT,
                                          server_default=DEFAULT_ENDPOINT)
    # the provider's usage details (NULL: it did not say)
    cached_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    cache_write_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    reasoning_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # true: the provider's usage was missing or unusable; the gateway counted the tokens
    usage_estimated: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False,
                                                  server_default=sa_false())
    # on a response cache hit: what the answer cost when it was made (the hit itself costs 0)
    saved_cost_usd: Mapped[Decimal | None] = mapped_column(Money, nullable=True)

    __table_args__ = (
        Index("ix_usage_key_time", "api_key_id", "created_at"),
        Index("ix_usage_tenant_time", "tenant_id", "created_at"),
    )


class UsageDaily(db.Model):
    """The daily rollup: one row per (UTC day, tenant, key, model alias, endpoint), maintained in the same
    transaction as the raw rows it sums (only rows actually inserted are added, so a replay adds
    nothing). `/v1/usage` reads whole days here and raw rows only for partial edge days."""
    __tablename__ = "usage_daily"

    day: Mapped[date] = mapped_column(Date, nullable=False)
    tenant_id: Mapped[int] = mapped_column(BigId, nullable=False)
    api_key_id: Mapped[int] = mapped_column(BigId, nullable=False)
    model: Mapped[str] = mapped_column(String(200), nullable=False)
    endpoint: Mapped[str] = mapped_column(Text, nullable=False, default=DEFAULT_ENDPOINT,
                                          server_default=DEFAULT_ENDPOINT)
    requests: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    total_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    cost_usd: Mapped[Decimal] = mapped_column(Numeric(30, 10, asdecimal=True), nullable=False, default=0)
    cache_hits: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0, server_default="0")
    saved_cost_usd: Mapped[Decimal] = mapped_column(Numeric(30, 10, asdecimal=True), nullable=False, default=0,
                                                    server_default="0")

    __table_args__ = (
        PrimaryKeyConstraint("api_key_id", "day", "model", "tenant_id", "endpoint", name="pk_usage_daily"),
        Index("ix_usage_daily_tenant_day", "tenant_id", "day"),
    )
