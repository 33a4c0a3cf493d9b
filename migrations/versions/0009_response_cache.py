"""the response cache: cache hits and the cost they saved in the usage rows and the daily rollup;
a key's cache setting

Revision ID: 0009_response_cache
Revises: 0008_conversations
Create Date: 2026-12-01

- `usage_records.cached` (present since 0001, false on every row so far) now says the answer
  came from the gateway's response cache; `usage_records.saved_cost_usd` (numeric, NULL except
  on cache hits) is what that answer cost when it was made (a hit itself costs 0).
- `usage_daily.cache_hits` and `usage_daily.saved_cost_usd` (NOT NULL, default 0) sum them per
  day, tenant, key, model and endpoint, maintained by the usage writer's one statement like
  the other sums. Every earlier row was a miss: 0 is exact for them.
- `api_keys.cache` (boolean, NULL): the response cache for the key's requests (NULL: the
  model's `cache` or RESPONSE_CACHE_DEFAULT decides).

On PostgreSQL a constant default on the partitioned parent reaches every partition without a
table rewrite.
"""
from alembic import op
import sqlalchemy as sa

revision = "0009_response_cache"
down_revision = "0008_conversations"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("usage_records", sa.Column("saved_cost_usd", sa.Numeric(20, 10, asdecimal=True), nullable=True))
    op.add_column("usage_daily", sa.Column("cache_hits", sa.BigInteger(), nullable=False, server_default="0"))
    op.add_column("usage_daily", sa.Column("saved_cost_usd", sa.Numeric(30, 10, asdecimal=True), nullable=False,
                                           server_default="0"))
    op.add_column("api_keys", sa.Column("cache", sa.Boolean(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("cache")
    with op.batch_alter_table("usage_daily") as batch:
        batch.drop_column("saved_cost_usd")
        batch.drop_column("cache_hits")
    with op.batch_alter_table("usage_records") as batch:
        batch.drop_column("saved_cost_usd")
