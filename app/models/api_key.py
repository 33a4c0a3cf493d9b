from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from sqlalchemy import JSON, Boolean, ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.extensions import db
from app.models.types import BigId, Money, UTCDateTime, utcnow


class ApiKey(db.Model):
    """A consumer key. Only its SHA-256 and a short display prefix are stored."""
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    tenant_id: Mapped[int] = mapped_column(BigId, ForeignKey("tenants.id", ondelete="CASCADE"),
                                           nullable=False, index=True)
    name: Mapped[str] = mapped_column(String(200), nullable=False)
    prefix: Mapped[str] = mapped_column(String(16), nullable=False)
    key_hash: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    role: Mapped[str] = mapped_column(String(10), nullable=False, default="member")
    rpm_limit: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tpm_limit: Mapped[int | None] = mapped_column(Integer, nullable=True)
    daily_token_limit: Mapped[int | None] = mapped_column(BigId, nullable=True)
    max_concurrent: Mapped[int | None] = mapped_column(Integer, nullable=True)
    budget_usd: Mapped[Decimal | None] = mapped_column(Money, nullable=True)  # per calendar month
    allowed_models: Mapped[list | None] = mapped_column(JSON, nullable=True)
    # The response cache for this key's requests: True / False, or None (the model or the default decides).
    cache: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # After a rotation the previous secret keeps working until `previous_key_expires_at`.
    previous_key_hash: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    previous_key_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    rotated_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    tenant = relationship("Tenant", lazy="joined")
