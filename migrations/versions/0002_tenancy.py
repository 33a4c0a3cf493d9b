"""tenancy: tenant limits for its keys, key rotation with a grace period, audit log

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""
from alembic import op
import sqlalchemy as sa

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)
TENANT_LIMITS = (("rpm_limit", sa.Integer), ("tpm_limit", sa.Integer), ("daily_token_limit", BigId),
                 ("max_concurrent", sa.Integer))


def upgrade() -> None:
    # The limits of a tenant's keys: defaults of new keys, and the most a tenant admin may give.
    with op.batch_alter_table("tenants") as batch:
        for name, type_ in TENANT_LIMITS:
            batch.add_column(sa.Column(name, type_, nullable=True))
    # After a rotation the previous secret keeps working until previous_key_expires_at.
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("previous_key_hash", sa.String(64), nullable=True))
        batch.add_column(sa.Column("previous_key_expires_at", TS, nullable=True))
        batch.add_column(sa.Column("rotated_at", TS, nullable=True))
        batch.create_index("ix_api_keys_previous_key_hash", ["previous_key_hash"])
    op.create_table(
        "audit_log",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("actor_type", sa.String(10), nullable=False),   # system | key | cli
        sa.Column("actor_key_id", BigId, nullable=True),
        sa.Column("tenant_id", BigId, nullable=True),              # the tenant the change belongs to
        sa.Column("action", sa.String(40), nullable=False),        # e.g. key.create, tenant.update
        sa.Column("target_type", sa.String(20), nullable=False),   # tenant | api_key
        sa.Column("target_id", BigId, nullable=False),
        sa.Column("details", sa.JSON, nullable=True),
    )
    op.create_index("ix_audit_tenant_id", "audit_log", ["tenant_id", "id"])
    op.create_index("ix_audit_created_at", "audit_log", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_audit_created_at", table_name="audit_log")
    op.drop_index("ix_audit_tenant_id", table_name="audit_log")
    op.drop_table("audit_log")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_index("ix_api_keys_previous_key_hash")
        batch.drop_column("rotated_at")
        batch.drop_column("previous_key_expires_at")
        batch.drop_column("previous_key_hash")
    with op.batch_alter_table("tenants") as batch:
        for name, _ in reversed(TENANT_LIMITS):
            batch.drop_column(name)
