from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from sqlalchemy import Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from app.extensions import db
from app.models.types import BigId, Money, UTCDateTime, utcnow


class Tenant(db.Model):
    """A team the operator serves; its keys and usage belong to it."""
    __tablename__ = "tenants"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200), unique=True, nullable=False)
    status: Mapped[str] = mapped_column(String(20), nullable=False, default="active")
    budget_usd: Mapped[Decimal | None] = mapped_column(Money, nullable=True)  # per calendar month
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    # The limits of its keys: defaults of new keys, and the most a tenant admin may give one.
    rpm_limit: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tpm_limit: Mapped[int | None] = mapped_column(Integer, nullable=True)
    daily_token_limit: Mapped[int | None] = mapped_column(BigId, nullable=True)
    max_concurrent: Mapped[int | None] = mapped_column(Integer, nullable=True)
