from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from app.extensions import db
from app.models.types import BigId, UTCDateTime, utcnow


class AuditEntry(db.Model):
    """Who (the system secret, a key, or the CLI) created, changed, rotated or revoked what, when.

    `tenant_id` is the tenant the change belongs to, so a tenant admin reads its own rows only.
    `details` holds the changed fields (old and new values), never a secret or a hash.
    """
    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    actor_type: Mapped[str] = mapped_column(String(10), nullable=False)
    actor_key_id: Mapped[int | None] = mapped_column(BigId, nullable=True)
    # `system`, `key:<id>` or `cli:<operating system user>` (null on rows older than 0004)
    actor_name: Mapped[str | None] = mapped_column(String(100), nullable=True)
    tenant_id: Mapped[int | None] = mapped_column(BigId, nullable=True)
    action: Mapped[str] = mapped_column(String(40), nullable=False)
    target_type: Mapped[str] = mapped_column(String(20), nullable=False)
    target_id: Mapped[int] = mapped_column(BigId, nullable=False)
    details: Mapped[dict | None] = mapped_column(JSON, nullable=True)

    __table_args__ = (
        Index("ix_audit_tenant_id", "tenant_id", "id"),
        Index("ix_audit_created_at", "created_at"),
    )
