#!/usr/bin/env python3
"""Schema and key management from the command line.

    python db_manager.py create-db | clean-db [--yes] | reset-db [--yes] | list-tables
    python db_manager.py upgrade [REV] | downgrade [REV] | current
    python db_manager.py create-key --name NAME --tenant TENANT [--rpm-limit N ...]
    python db_manager.py create-tenant --name NAME [--budget-usd D] [--rpm-limit N ...]
    python db_manager.py list-keys [--tenant NAME] [--all] | revoke-key ID
    python db_manager.py create-partitions [--months-ahead N] | flush-usage | prune-usage --older-than 90d
    python db_manager.py prune-responses [--older-than 30d]

The database is `DATABASE_URL` (or `--database-url`). When it cannot be reached, one line
on stderr and exit status 2; never a traceback.
"""
from __future__ import annotations

import argparse
import sys
from datetime import datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Callable

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from app.config import ROOT_DIR, Settings, load_dotenv_once, normalize_database_url
from app.utils.money import MAX_BUDGET_USD

EXIT_UNREACHABLE = 2


class CommandError(Exception):
    """A failure to report as one line on stderr."""


def alembic_config(url: str) -> AlembicConfig:
    cfg = AlembicConfig(str(ROOT_DIR / "alembic.ini"))
    cfg.set_main_option("script_location", str(ROOT_DIR / "migrations"))
    cfg.attributes["url"] = url
    cfg.attributes["skip_logging"] = True
    return cfg


def engine_for(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = make_url(url).database
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    return create_engine(url, pool_pre_ping=False)


def ensure_database(url: str) -> bool:
    """Create the PostgreSQL database of `url` if it is missing. True when it was created."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        engine_for(url).dispose()
        return False
    admin = create_engine(parsed.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            exists = conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"),
                                  {"n": parsed.database}).scalar()
            if exists:
                return False
            quoted = admin.dialect.identifier_preparer.quote(parsed.database)
            conn.execute(text(f"CREATE DATABASE {quoted}"))
            return True
    finally:
        admin.dispose()


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "-1") -> None:
    command.downgrade(alembic_config(url), revision)


def current_revision(url: str) -> str | None:
    engine = engine_for(url)
    try:
        with engine.connect() as conn:
            if not inspect(conn).has_table("alembic_version"):
                return None
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    finally:
        engine.dispose()


def list_tables(url: str) -> list[str]:
    """The schema's tables (the monthly partitions of usage_records are not listed)."""
    from app.services.usage_partitions import existing_partitions, is_partitioned

    engine = engine_for(url)
    try:
        with engine.connect() as conn:
            partitions = set(existing_partitions(conn)) if is_partitioned(conn) else set()
            return sorted(set(inspect(conn).get_table_names()) - partitions)
    finally:
        engine.dispose()


def drop_all_tables(url: str) -> list[str]:
    """Drop every table of the gateway's schema (and alembic's bookkeeping)."""
    from app.extensions import db
    import app.models  # noqa: F401

    engine = engine_for(url)
    try:
        db.metadata.drop_all(engine)
        with engine.begin() as conn:
            conn.execute(text("DROP TABLE IF EXISTS alembic_version"))
        with engine.connect() as conn:
            return sorted(inspect(conn).get_table_names())
    finally:
        engine.dispose()


def confirm(prompt: str, assume_yes: bool) -> bool:
    if assume_yes:
        return True
    if not sys.stdin.isatty():
        raise CommandError(f"{prompt} Refusing without confirmation: pass --yes.")
    return input(f"{prompt} Type 'yes' to continue: ").strip().lower() == "yes"


# --- commands --------------------------------------------------------------------------------

def cmd_create_db(args: argparse.Namespace) -> int:
    created = ensure_database(args.url)
    upgrade(args.url, "head")
    print(("created database and " if created else "") + f"migrated to {current_revision(args.url)}")
    return 0


def cmd_clean_db(args: argparse.Namespace) -> int:
    if not confirm("This drops every table of the gateway, with all keys and usage.", args.yes):
        print("aborted")
        return 1
    left = drop_all_tables(args.url)
    print("dropped all tables" + (f" (other tables left: {', '.join(left)})" if left else ""))
    return 0


def cmd_reset_db(args: argparse.Namespace) -> int:
    if not confirm("This drops every table and recreates an empty schema.", args.yes):
        print("aborted")
        return 1
    drop_all_tables(args.url)
    ensure_database(args.url)
    upgrade(args.url, "head")
    print(f"reset: schema at {current_revision(args.url)}")
    return 0


def cmd_list_tables(args: argparse.Namespace) -> int:
    for name in list_tables(args.url):
        print(name)
    return 0


def cmd_upgrade(args: argparse.Namespace) -> int:
    upgrade(args.url, args.revision)
    print(f"at revision {current_revision(args.url)}")
    return 0


def cmd_downgrade(args: argparse.Namespace) -> int:
    downgrade(args.url, args.revision)
    print(f"at revision {current_revision(args.url) or 'base (empty)'}")
    return 0


def cmd_current(args: argparse.Namespace) -> int:
    print(current_revision(args.url) or "base (no schema)")
    return 0


def _decimal(value: str) -> Decimal:
    try:
        result = Decimal(value)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"not a decimal number: {value!r}") from None
    if not result.is_finite() or result < 0 or result > MAX_BUDGET_USD:
        raise argparse.ArgumentTypeError(f"must be a number from 0 to {MAX_BUDGET_USD}")
    return result


def _bounded(maximum: int) -> Callable[[str], int]:
    """An argparse type: an integer from 1 to `maximum` (the range of its column)."""
    def parse(value: str) -> int:
        try:
            result = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
        if not 1 <= result <= maximum:
            raise argparse.ArgumentTypeError(f"must be from 1 to {maximum}")
        return result
    return parse


_positive = _bounded(2**31 - 1)


def _timestamp(value: str) -> datetime:
    try:
        result = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {value!r}") from None
    return result if result.tzinfo else result.replace(tzinfo=timezone.utc)


def cmd_create_key(args: argparse.Namespace) -> int:
    from app.services.api_key_service import mint_key

    from app.services import audit_service
    from app.services.actor import CLI
    from app.services.tenant_service import get_or_create_tenant

    engine = engine_for(args.url)
    try:
        with Session(engine) as session:
            tenant = get_or_create_tenant(session, CLI, args.tenant)  # audited when it is new
            key, plaintext = mint_key(
                session, name=args.name, tenant=tenant, role=args.role,
                rpm_limit=args.rpm_limit, tpm_limit=args.tpm_limit,
                daily_token_limit=args.daily_token_limit, max_concurrent=args.max_concurrent,
                budget_usd=args.budget_usd,
                allowed_models=args.allowed_models.split(",") if args.allowed_models else None,
                expires_at=args.expires_at, commit=False)
            audit_service.record(session, CLI, "key.create", target_type="api_key", target_id=key.id,
                                 tenant_id=key.tenant_id, details={"name": key.name, "prefix": key.prefix,
                                                                   "role": key.role})
            session.commit()
            print(f"created key id={key.id} name={key.name!r} tenant={args.tenant!r} "
                  f"prefix={key.prefix} (the key is shown once; store it now):")
            print(plaintext)
    finally:
        engine.dispose()
    return 0


# --- tenants and keys (tenancy) -------------------------------------------------------------

def cmd_create_tenant(args: argparse.Namespace) -> int:
    from app.services.actor import CLI
    from app.services.tenant_service import create_tenant

    limits = {f: getattr(args, f) for f in ("rpm_limit", "tpm_limit", "daily_token_limit", "max_concurrent")
              if getattr(args, f) is not None}
    engine = engine_for(args.url)
    try:
        with Session(engine) as session:
            tenant = create_tenant(session, CLI, name=args.name, status=args.status,
                                   budget_usd=args.budget_usd, key_limits=limits)
            if tenant is None:
                raise CommandError(f"a tenant named {args.name!r} already exists")
            print(f"created tenant id={tenant.id} name={tenant.name!r} status={tenant.status}")
    finally:
        engine.dispose()
    return 0


def cmd_list_keys(args: argparse.Namespace) -> int:
    """One line per key: never its secret or hash, only the display prefix."""
    from app.services.api_key_service import list_keys
    from app.services.tenant_service import get_tenant_by_name

    engine = engine_for(args.url)
    try:
        with Session(engine) as session:
            tenant_id = None
            if args.tenant:
                tenant = get_tenant_by_name(session, args.tenant)
                if tenant is None:
                    raise CommandError(f"no tenant named {args.tenant!r}")
                tenant_id = tenant.id
            print("id\ttenant\tname\tprefix\trole\tstatus\texpires_at")
            for key in list_keys(session, tenant_id=tenant_id):
                status = "revoked" if key.revoked_at is not None else "active"
                if status == "revoked" and not args.all:
                    continue
                expires = key.expires_at.isoformat() if key.expires_at else "-"
                print(f"{key.id}\t{key.tenant.name}\t{key.name}\t{key.prefix}\t{key.role}\t{status}\t{expires}")
    finally:
        engine.dispose()
    return 0


def cmd_revoke_key(args: argparse.Namespace) -> int:
    """Revoke, audit, and tell the running gateways (through Redis, when REDIS_URL is set)."""
    from app.services import audit_service
    from app.services.actor import CLI
    from app.services.api_key_service import revoke_key

    engine = engine_for(args.url)
    try:
        with Session(engine) as session:
            key = revoke_key(session, args.id, commit=False)
            if key is None:
                raise CommandError(f"no API key with id {args.id}")
            if session.is_modified(key):
                audit_service.record(session, CLI, "key.revoke", target_type="api_key", target_id=key.id,
                                     tenant_id=key.tenant_id, details={"name": key.name, "prefix": key.prefix})
                session.commit()
                print(f"revoked key id={key.id} name={key.name!r} prefix={key.prefix}")
            else:
                print(f"key id={key.id} was already revoked")
    finally:
        engine.dispose()
    print(_announce_revocation(args.id))
    return 0


def _announce_revocation(key_id: int) -> str:
    settings = Settings.from_env()
    if not settings.REDIS_URL:
        return f"gateways pick it up within AUTH_CACHE_TTL_S ({settings.AUTH_CACHE_TTL_S:g}s; REDIS_URL not set)"
    import redis
    from app.services.key_events import encode_event, publish_event

    client = redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=2, socket_timeout=2)
    try:
        if publish_event(client, settings.KEY_EVENTS_CHANNEL, encode_event(key_id=key_id)):
            return "running gateways were told through Redis (effective within a second)"
        return (f"Redis unreachable: gateways pick it up within AUTH_CACHE_TTL_S "
                f"({settings.AUTH_CACHE_TTL_S:g}s)")
    finally:
        client.close()


# --- usage store: partitions, outbox, retention -------------------------------------------

def cmd_create_partitions(args: argparse.Namespace) -> int:
    from app.services.usage_partitions import ensure_ahead, existing_partitions, is_partitioned

    engine = engine_for(args.url)
    try:
        created = ensure_ahead(engine, args.months_ahead)
        with engine.connect() as conn:
            if not is_partitioned(conn):
                print("usage_records is a plain table here (SQLite): nothing to partition")
                return 0
            months = sorted(existing_partitions(conn).values())
        print(f"created {len(created)} partition(s)" + (f": {', '.join(created)}" if created else ""))
        if months:
            print(f"usage_records has {len(months)} monthly partitions, {months[0]:%Y-%m} to {months[-1]:%Y-%m}")
    finally:
        engine.dispose()
    return 0


def cmd_flush_usage(args: argparse.Namespace) -> int:
    """Replay the usage outbox (the Redis list and the spool files of this machine) by hand."""
    from app.extensions import make_redis
    from app.services.usage_batcher import UsageBatcher
    from app.services.usage_outbox import RedisOutbox, SpoolOutbox
    from app.services.usage_service import UsageWriter

    settings = Settings.from_env()
    redis_url = settings.REDIS_URL if args.redis_url is None else args.redis_url
    engine = engine_for(args.url)
    client = make_redis(redis_url, 4) if redis_url else None
    spool = SpoolOutbox(args.spool_dir or settings.USAGE_SPOOL_DIR)
    outbox = RedisOutbox(client, settings.USAGE_OUTBOX_NAME) if client else None
    batcher = UsageBatcher(UsageWriter(engine), redis_outbox=outbox, spool=spool)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))  # unreachable: one line, exit 2 (see main)
        before = batcher.outbox_depth()
        result = batcher.replay_outbox()
        after = batcher.outbox_depth()
        print(f"replayed {result['records']} usage records ({result['new_rows']} new rows); "
              f"outbox before: {_depth(before)}; after: {_depth(after)}")
        if batcher.dead_letters:
            print(f"{batcher.dead_letters} record(s) rejected by the database were set aside in "
                  f"{spool.dir}/dead-letter.jsonl", file=sys.stderr)
        return 0 if not batcher.database_down else EXIT_UNREACHABLE
    finally:
        spool.close()
        if client is not None:
            client.close()
        engine.dispose()


def _depth(depth: dict) -> str:
    parts = []
    if "redis" in depth:
        parts.append(f"redis={depth['redis'] if depth['redis'] is not None else 'unavailable'}")
    parts.append(f"spool_files={depth.get('spool_files', 0)}")
    return " ".join(parts)


def _older_than(value: str) -> datetime:
    """`90d` / `90` (days before today, UTC) or an ISO date: the cutoff, a UTC midnight."""
    raw = value.strip().lower()
    days = raw[:-1] if raw.endswith("d") else raw
    if days.isdigit():
        today = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
        return today - timedelta(days=int(days))
    try:
        day = datetime.fromisoformat(value).date()
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of days (90d) or a date (2026-01-01): {value!r}") from None
    return datetime(day.year, day.month, day.day, tzinfo=timezone.utc)


def cmd_prune_usage(args: argparse.Namespace) -> int:
    from app.services.usage_partitions import prune

    cutoff = args.older_than
    if cutoff is None:
        days = Settings.from_env().USAGE_RETENTION_DAYS
        if days <= 0:
            raise CommandError("give --older-than (e.g. 90d) or set USAGE_RETENTION_DAYS")
        cutoff = _older_than(str(days))
    engine = engine_for(args.url)
    try:
        result = prune(engine, cutoff, keep_rollup=args.keep_rollup)
    finally:
        engine.dispose()
    print(f"usage before {cutoff:%Y-%m-%d} pruned: {result['partitions_dropped']} monthly partition(s) dropped, "
          f"{result['rows_deleted']} row(s) deleted, {result['rollup_rows_deleted']} daily rollup row(s) deleted")
    return 0


def cmd_prune_responses(args: argparse.Namespace) -> int:
    from app.services.response_store import ResponseStore

    cutoff = args.older_than
    if cutoff is None:
        days = Settings.from_env().RESPONSES_RETENTION_DAYS
        if days <= 0:
            print("RESPONSES_RETENTION_DAYS is 0: stored responses are kept (give --older-than to prune)")
            return 0
        cutoff = _older_than(str(days))
    engine = engine_for(args.url)
    try:
        deleted = ResponseStore(engine).prune(cutoff)
    finally:
        engine.dispose()
    print(f"stored responses before {cutoff:%Y-%m-%d} pruned: {deleted} deleted")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="db_manager.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", help="overrides DATABASE_URL")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, fn: Callable[[argparse.Namespace], int], help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.set_defaults(fn=fn)
        return p

    add("create-db", cmd_create_db, "create the database if missing, then migrate to head")
    add("clean-db", cmd_clean_db, "drop all tables").add_argument("--yes", action="store_true")
    add("reset-db", cmd_reset_db, "drop all tables and migrate to head").add_argument("--yes", action="store_true")
    add("list-tables", cmd_list_tables, "list the tables of the database")
    add("upgrade", cmd_upgrade, "migrate up").add_argument("revision", nargs="?", default="head")
    add("downgrade", cmd_downgrade, "migrate down").add_argument("revision", nargs="?", default="-1")
    add("current", cmd_current, "print the current schema revision")
    key = add("create-key", cmd_create_key, "mint an API key and print it once")
    key.add_argument("--name", required=True)
    key.add_argument("--tenant", required=True)
    key.add_argument("--role", choices=("member", "admin"), default="member")
    key.add_argument("--rpm-limit", type=_positive)
    key.add_argument("--tpm-limit", type=_positive)
    key.add_argument("--daily-token-limit", type=_bounded(2**63 - 1))
    key.add_argument("--max-concurrent", type=_positive)
    key.add_argument("--budget-usd", type=_decimal)
    key.add_argument("--allowed-models", help="comma-separated model aliases")
    key.add_argument("--expires-at", type=_timestamp, help="ISO 8601, e.g. 2027-01-01T00:00:00Z")
    tenant = add("create-tenant", cmd_create_tenant, "create a tenant (its budget and the limits of its keys)")
    tenant.add_argument("--name", required=True)
    tenant.add_argument("--status", choices=("active", "suspended"), default="active")
    tenant.add_argument("--budget-usd", type=_decimal, help="monthly budget shared by all its keys")
    tenant.add_argument("--rpm-limit", type=_positive)
    tenant.add_argument("--tpm-limit", type=_positive)
    tenant.add_argument("--daily-token-limit", type=_bounded(2**63 - 1))
    tenant.add_argument("--max-concurrent", type=_positive)
    keys = add("list-keys", cmd_list_keys, "list keys (id, tenant, name, prefix, role, status); never a secret")
    keys.add_argument("--tenant", help="only this tenant's keys")
    keys.add_argument("--all", action="store_true", help="include revoked keys")
    revoke = add("revoke-key", cmd_revoke_key, "revoke a key (running gateways are told through Redis)")
    revoke.add_argument("id", type=_bounded(2**63 - 1))
    add_usage_commands(add)
    return parser


def add_usage_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    parts = add("create-partitions", cmd_create_partitions,
                "create this month's usage partition and the next ones (PostgreSQL)")
    parts.add_argument("--months-ahead", type=_bounded(120), default=3)
    flush = add("flush-usage", cmd_flush_usage, "replay the usage outbox (Redis list, local spool) now")
    flush.add_argument("--redis-url", help="overrides REDIS_URL ('' for none)")
    flush.add_argument("--spool-dir", help="overrides USAGE_SPOOL_DIR")
    prune_ = add("prune-usage", cmd_prune_usage, "delete usage rows older than a cutoff")
    prune_.add_argument("--older-than", type=_older_than,
                        help="days (90d) or a date (2026-01-01); default USAGE_RETENTION_DAYS")
    prune_.add_argument("--keep-rollup", action="store_true", help="keep the daily totals before the cutoff")
    responses = add("prune-responses", cmd_prune_responses, "delete stored Responses API answers older than a cutoff")
    responses.add_argument("--older-than", type=_older_than,
                           help="days (30d) or a date (2026-01-01); default RESPONSES_RETENTION_DAYS")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    load_dotenv_once()
    args.url = normalize_database_url(args.database_url) if args.database_url else Settings.from_env().DATABASE_URL
    try:
        return args.fn(args)
    except CommandError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OperationalError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else "connection failed"
        print(f"error: cannot reach the database at {_safe(args.url)}: {reason}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except SQLAlchemyError as exc:
        print(f"error: database error: {type(exc).__name__}: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1


def _safe(url: str) -> str:
    """The URL without its password."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<DATABASE_URL>"


if __name__ == "__main__":
    sys.exit(main())
