"""usage rows say when their tokens were counted by the gateway instead of reported by the provider

Revision ID: 0007_usage_estimated
Revises: 0006_responses
Create Date: 2026-12-01

`usage_records.usage_estimated` (boolean, NOT NULL, default false): true when the provider's
usage was missing or unusable (a string, a negative or absurd number, missing fields, or a
client hang-up before the provider's usage arrived) and the gateway billed its own tiktoken
count. Every earlier row carried the provider's figures or was never flagged: false. On
PostgreSQL a constant default on the partitioned parent reaches every partition without a
table rewrite.
"""
from alembic import op
import sqlalchemy as sa

revision = "0007_usage_estimated"
down_revision = "0006_responses"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("usage_records", sa.Column("usage_estimated", sa.Boolean(), nullable=False,
                                             server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("usage_records") as batch:
        batch.drop_column("usage_estimated")
