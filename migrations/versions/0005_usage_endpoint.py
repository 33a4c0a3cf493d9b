"""usage rows say which endpoint served them, and the provider's token details

Revision ID: 0005_usage_endpoint
Revises: 0004_audit_actor_name
Create Date: 2026-12-01

`usage_records` gains `endpoint` (text, NOT NULL, default 'chat.completions': every row before
this revision came from chat completions or uptime probes billed as such) and the nullable
`cached_tokens`, `cache_write_tokens`, `reasoning_tokens` (NULL: the provider did not say).
On PostgreSQL, adding a column to the partitioned parent adds it to every partition, and a
constant default is stored in the catalogue: no table rewrite.

`usage_daily` gains `endpoint` too, in its primary key, so that totals grouped by endpoint
stay exact when read from the rollup. The existing rollup rows all belong to
'chat.completions' (the default), so no row is split or merged. SQLite (embedded mode)
changes a primary key by copying the table (alembic's batch mode).
"""
from alembic import op
import sqlalchemy as sa

revision = "0005_usage_endpoint"
down_revision = "0004_audit_actor_name"
branch_labels = None
depends_on = None

DEFAULT_ENDPOINT = "chat.completions"
DETAILS = ("cached_tokens", "cache_write_tokens", "reasoning_tokens")
OLD_KEY = ["api_key_id", "day", "model", "tenant_id"]
NEW_KEY = ["api_key_id", "day", "model", "tenant_id", "endpoint"]


def _endpoint_column() -> sa.Column:
    return sa.Column("endpoint", sa.Text(), nullable=False, server_default=DEFAULT_ENDPOINT)


def upgrade() -> None:
    op.add_column("usage_records", _endpoint_column())
    for name in DETAILS:
        op.add_column("usage_records", sa.Column(name, sa.Integer(), nullable=True))
    if op.get_bind().dialect.name == "postgresql":
        op.add_column("usage_daily", _endpoint_column())
        op.drop_constraint("pk_usage_daily", "usage_daily", type_="primary")
        op.create_primary_key("pk_usage_daily", "usage_daily", NEW_KEY)
        return
    with op.batch_alter_table("usage_daily", recreate="always") as batch:
        batch.add_column(_endpoint_column())
        batch.drop_constraint("pk_usage_daily", type_="primary")
        batch.create_primary_key("pk_usage_daily", NEW_KEY)


def downgrade() -> None:
    # Rows of other endpoints fold into their (day, tenant, key, model) row again.
    bind = op.get_bind()
    op.execute("""
        CREATE TABLE usage_daily_0005 AS
        SELECT day, tenant_id, api_key_id, model, sum(requests) AS requests,
               sum(prompt_tokens) AS prompt_tokens, sum(completion_tokens) AS completion_tokens,
               sum(total_tokens) AS total_tokens, sum(cost_usd) AS cost_usd
        FROM usage_daily GROUP BY day, tenant_id, api_key_id, model""")
    op.execute("DELETE FROM usage_daily")
    if bind.dialect.name == "postgresql":
        op.drop_constraint("pk_usage_daily", "usage_daily", type_="primary")
        op.drop_column("usage_daily", "endpoint")
        op.create_primary_key("pk_usage_daily", "usage_daily", OLD_KEY)
    else:
        with op.batch_alter_table("usage_daily", recreate="always") as batch:
            batch.drop_constraint("pk_usage_daily", type_="primary")
            batch.drop_column("endpoint")
            batch.create_primary_key("pk_usage_daily", OLD_KEY)
    op.execute("""
        INSERT INTO usage_daily (day, tenant_id, api_key_id, model, requests, prompt_tokens,
                                 completion_tokens, total_tokens, cost_usd)
        SELECT day, tenant_id, api_key_id, model, requests, prompt_tokens, completion_tokens,
               total_tokens, cost_usd FROM usage_daily_0005""")
    op.execute("DROP TABLE usage_daily_0005")
    if bind.dialect.name == "postgresql":
        for name in (*DETAILS, "endpoint"):
            op.drop_column("usage_records", name)
    else:
        with op.batch_alter_table("usage_records") as batch:
            for name in (*DETAILS, "endpoint"):
                batch.drop_column(name)
