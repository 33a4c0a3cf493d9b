from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from app.extensions import db
from app.models.types import BigId, UTCDateTime, utcnow


class StoredResponse(db.Model):
    """A Responses API answer kept for `previous_response_id`, retrieval and `input_items`
    (`store: true`, OpenAI's default). It belongs to the tenant of the key that created it.

    `history` is the conversation before this request's input (the previous response's history,
    input and output), so continuing a conversation reads one row; `input_items` is this
    request's own input (with item ids); `body` is the `response` object as the client got it.
    Rows older than RESPONSES_RETENTION_DAYS are deleted by `db_manager prune-responses`.
    """
    __tablename__ = "responses"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(BigId, nullable=False)
    api_key_id: Mapped[int] = mapped_column(BigId, nullable=False)
    model: Mapped[str] = mapped_column(String(200), nullable=False)
    status: Mapped[str] = mapped_column(String(20), nullable=False)
    previous_response_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    history: Mapped[list] = mapped_column(JSON, nullable=False)
    input_items: Mapped[list] = mapped_column(JSON, nullable=False)
    body: Mapped[dict] = mapped_column(JSON, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)

    __table_args__ = (Index("ix_responses_created_at", "created_at"),)
