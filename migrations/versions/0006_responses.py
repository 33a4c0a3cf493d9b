"""responses: stored Responses API answers (store: true) for previous_response_id and retrieval

Revision ID: 0006_responses
Revises: 0005_usage_endpoint
Create Date: 2026-12-01

One row per stored response, owned by a tenant. Plain table on PostgreSQL and SQLite; pruned
by age (`db_manager prune-responses`, index on created_at).
"""
from alembic import op
import sqlalchemy as sa

revision = "0006_responses"
down_revision = "0005_usage_endpoint"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "responses",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("tenant_id", BigId, nullable=False),
        sa.Column("api_key_id", BigId, nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("previous_response_id", sa.String(64), nullable=True),
        sa.Column("history", sa.JSON, nullable=False),       # conversation items before this input
        sa.Column("input_items", sa.JSON, nullable=False),   # this request's input items
        sa.Column("body", sa.JSON, nullable=False),          # the response object
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_responses_created_at", "responses", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_responses_created_at", table_name="responses")
    op.drop_table("responses")
