"""audit_log.actor_name: who made the change, in words (`system`, `key:12`, `cli:alice`)

Revision ID: 0004_audit_actor_name
Revises: 0003
Create Date: 2026-12-01

The command line writes the same audit rows as the HTTP API; this column says which operating
system user ran it (the API's rows name the system secret or the key, as `actor_key_id` does).
"""
from alembic import op
import sqlalchemy as sa

revision = "0004_audit_actor_name"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("audit_log") as batch:
        batch.add_column(sa.Column("actor_name", sa.String(100), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("audit_log") as batch:
        batch.drop_column("actor_name")
