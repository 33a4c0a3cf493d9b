"""usage store at scale: usage_records partitioned by month (PostgreSQL), usage_daily rollup

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23

PostgreSQL: `usage_records` becomes a table partitioned by RANGE (created_at), one partition per
UTC calendar month (`usage_records_pYYYYMM`). A unique constraint of a partitioned table must
contain the partition key, so the idempotency key becomes PRIMARY KEY (request_id, created_at):
`created_at` is fixed when the usage event is created and travels with it through the outbox,
so a replayed event always hits the same key. The existing rows are copied into the new table
(and summed into the rollup); downgrade copies them back into a plain table.

SQLite (embedded mode): the plain table stays as it is (unique request_id); only the rollup is
added. The self-contained SQL here does not import application code on purpose: migrations
must keep working when the application changes.
"""
from datetime import datetime, timedelta, timezone

from alembic import op
import sqlalchemy as sa

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
RollupMoney = sa.Numeric(30, 10)

COLUMNS = ("request_id, tenant_id, api_key_id, model, provider, upstream_model, prompt_tokens, "
           "completion_tokens, total_tokens, cost_usd, status, error_type, streamed, cached, "
           "latency_ms, ttft_ms, created_at")

COLUMN_DDL = """
    request_id varchar(64) NOT NULL,
    tenant_id bigint NOT NULL,
    api_key_id bigint NOT NULL,
    model varchar(200) NOT NULL,
    provider varchar(100),
    upstream_model varchar(200),
    prompt_tokens integer NOT NULL DEFAULT 0,
    completion_tokens integer NOT NULL DEFAULT 0,
    total_tokens integer NOT NULL DEFAULT 0,
    cost_usd numeric(20, 10) NOT NULL DEFAULT 0,
    status varchar(20) NOT NULL,
    error_type varchar(50),
    streamed boolean NOT NULL DEFAULT false,
    cached boolean NOT NULL DEFAULT false,
    latency_ms integer,
    ttft_ms integer,
    created_at timestamp with time zone NOT NULL"""

ROLLUP_FROM_RAW = """
    INSERT INTO usage_daily (day, tenant_id, api_key_id, model, requests, prompt_tokens,
                             completion_tokens, total_tokens, cost_usd)
    SELECT {day}, tenant_id, api_key_id, model, count(*), sum(prompt_tokens), sum(completion_tokens),
           sum(total_tokens), sum(cost_usd)
    FROM usage_records GROUP BY 1, 2, 3, 4"""


def _months(first: datetime, last: datetime):
    month = first.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    while month <= last:
        nxt = (month + timedelta(days=32)).replace(day=1)
        yield month, nxt
        month = nxt


def _create_partition(start: datetime, end: datetime) -> None:
    op.execute(f"CREATE TABLE IF NOT EXISTS usage_records_p{start:%Y%m} PARTITION OF usage_records "
               f"FOR VALUES FROM ('{start.isoformat()}') TO ('{end.isoformat()}')")


def upgrade() -> None:
    op.create_table(
        "usage_daily",
        sa.Column("day", sa.Date, nullable=False),
        sa.Column("tenant_id", BigId, nullable=False),
        sa.Column("api_key_id", BigId, nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("requests", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("prompt_tokens", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("completion_tokens", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("total_tokens", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("cost_usd", RollupMoney, nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("api_key_id", "day", "model", "tenant_id", name="pk_usage_daily"),
    )
    op.create_index("ix_usage_daily_tenant_day", "usage_daily", ["tenant_id", "day"])
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        op.execute(ROLLUP_FROM_RAW.format(day="date(created_at)"))
        return

    op.execute("ALTER TABLE usage_records RENAME TO usage_records_0001")
    op.execute("ALTER TABLE usage_records_0001 RENAME CONSTRAINT usage_records_pkey TO usage_records_0001_pkey")
    op.execute("ALTER TABLE usage_records_0001 RENAME CONSTRAINT usage_records_request_id_key "
               "TO usage_records_0001_request_id_key")
    op.execute("ALTER INDEX ix_usage_key_time RENAME TO ix_usage_0001_key_time")
    op.execute("ALTER INDEX ix_usage_tenant_time RENAME TO ix_usage_0001_tenant_time")
    # Keep the id sequence (ids go on where they were) but detach it from the old table.
    op.execute("ALTER SEQUENCE usage_records_id_seq OWNED BY NONE")
    op.execute(f"""
        CREATE TABLE usage_records (
            id bigint NOT NULL DEFAULT nextval('usage_records_id_seq'),{COLUMN_DDL},
            CONSTRAINT usage_records_pkey PRIMARY KEY (request_id, created_at)
        ) PARTITION BY RANGE (created_at)""")
    op.execute("ALTER SEQUENCE usage_records_id_seq OWNED BY usage_records.id")
    op.execute("CREATE INDEX ix_usage_key_time ON usage_records (api_key_id, created_at)")
    op.execute("CREATE INDEX ix_usage_tenant_time ON usage_records (tenant_id, created_at)")

    now = datetime.now(timezone.utc)
    lo, hi = bind.execute(sa.text("SELECT min(created_at), max(created_at) FROM usage_records_0001")).one()
    first = min(lo, now) if lo is not None else now
    last = max(hi, now) if hi is not None else now
    existing = {r[0] for r in bind.execute(sa.text(
        "SELECT DISTINCT date_trunc('month', created_at AT TIME ZONE 'UTC') FROM usage_records_0001"))}
    this_month = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    for start, end in _months(first, last + timedelta(days=62)):
        # every month holding rows, and this month and the next two (the writer adds more on demand)
        if start.replace(tzinfo=None) in existing or start >= this_month:
            _create_partition(start, end)
    op.execute(f"INSERT INTO usage_records (id, {COLUMNS}) SELECT id, {COLUMNS} FROM usage_records_0001 "
               "ON CONFLICT DO NOTHING")
    op.execute("DROP TABLE usage_records_0001")
    op.execute(ROLLUP_FROM_RAW.format(day="(created_at AT TIME ZONE 'UTC')::date"))


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        op.execute("ALTER TABLE usage_records RENAME TO usage_records_partitioned")
        op.execute("ALTER TABLE usage_records_partitioned RENAME CONSTRAINT usage_records_pkey "
                   "TO usage_records_partitioned_pkey")
        op.execute("ALTER INDEX ix_usage_key_time RENAME TO ix_usage_part_key_time")
        op.execute("ALTER INDEX ix_usage_tenant_time RENAME TO ix_usage_part_tenant_time")
        op.execute("ALTER SEQUENCE usage_records_id_seq OWNED BY NONE")
        op.execute(f"""
            CREATE TABLE usage_records (
                id bigint NOT NULL DEFAULT nextval('usage_records_id_seq'),{COLUMN_DDL},
                CONSTRAINT usage_records_pkey PRIMARY KEY (id),
                CONSTRAINT usage_records_request_id_key UNIQUE (request_id)
            )""")
        op.execute("ALTER SEQUENCE usage_records_id_seq OWNED BY usage_records.id")
        op.execute(f"INSERT INTO usage_records (id, {COLUMNS}) SELECT id, {COLUMNS} "
                   "FROM usage_records_partitioned ORDER BY id ON CONFLICT DO NOTHING")
        op.execute("DROP TABLE usage_records_partitioned")
        op.execute("CREATE INDEX ix_usage_key_time ON usage_records (api_key_id, created_at)")
        op.execute("CREATE INDEX ix_usage_tenant_time ON usage_records (tenant_id, created_at)")
    op.drop_index("ix_usage_daily_tenant_day", table_name="usage_daily")
    op.drop_table("usage_daily")
