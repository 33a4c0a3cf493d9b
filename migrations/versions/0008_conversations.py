"""conversations of POST /api/chat

Revision ID: 0008_conversations
Revises: 0007_usage_estimated
Create Date: 2026-12-01

One row per conversation: its id (`conv_` + 32 hex digits, given to the client), the tenant it
belongs to (deleted with it), the key that began it, and its messages as a JSON list.
"""
from alembic import op
import sqlalchemy as sa

revision = "0008_conversations"
down_revision = "0007_usage_estimated"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "conversations",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("tenant_id", BigId, sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
        sa.Column("api_key_id", BigId, nullable=True),
        sa.Column("messages", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_conversations_tenant_id", "conversations", ["tenant_id", "updated_at"])


def downgrade() -> None:
    op.drop_index("ix_conversations_tenant_id", table_name="conversations")
    op.drop_table("conversations")
