from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, ForeignKey, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from app.extensions import db
from app.models.types import BigId, UTCDateTime, utcnow


class Conversation(db.Model):
    """The messages of one POST /api/chat exchange so far (user and assistant turns, in
    order), continued by passing its id back. It belongs to the tenant of the key that began
    it: any key of that tenant may continue it, no other tenant can see it."""
    __tablename__ = "conversations"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)   # "conv_" + 32 hex digits
    tenant_id: Mapped[int] = mapped_column(BigId, ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False)
    api_key_id: Mapped[int | None] = mapped_column(BigId, nullable=True)  # the key that began it
    messages: Mapped[list] = mapped_column(JSON, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)

    __table_args__ = (Index("ix_conversations_tenant_id", "tenant_id", "updated_at"),)
