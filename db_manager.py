#!/usr/bin/env python3
"""Schema and key management from the command line.

    python db_manager.py create-db | clean-db [--yes] | reset-db [--yes] | list-tables
    python db_manager.py upgrade [REV] | downgrade [REV] | current
    python db_manager.py create-key --name NAME --tenant TENANT [--rpm-limit N ...]
    python db_manager.py update-key ID [--name N] [--rpm-limit N ...] | rotate-key ID [--grace-period-s S]
    python db_manager.py create-tenant --name NAME [--budget-usd D] [--rpm-limit N ...]
    python db_manager.py update-tenant TENANT [--name N] [--status suspended] [--budget-usd D ...]
    python db_manager.py list-keys [--tenant TENANT] [--all] | revoke-key ID

A TENANT is a name or an id (digits only mean an id). Key and tenant commands are the admin
API's use cases: same checks, same audit rows (actor `cli:<os user>`), same key events.
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
from typing import TYPE_CHECKING, Callable

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from app.config import ROOT_DIR, Settings, load_dotenv_once, normalize_database_url
from app.utils.money import MAX_BUDGET_USD

if TYPE_CHECKING:  # imported where used: `--help` and schema commands stay light
    from app.services.key_events import KeyEventPublisher

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


def _grace(value: str) -> float:
    try:
        result = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None
    if not 0 <= result <= 30 * 86400:
        raise argparse.ArgumentTypeError("must be from 0 to 2592000 (30 days)")
    return result


def _timestamp(value: str) -> datetime:
    try:
        result = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {value!r}") from None
    return result if result.tzinfo else result.replace(tzinfo=timezone.utc)


# --- tenants and keys: the same use cases as the admin API (app/services/admin_service.py) ----

LIMIT_OPTIONS = ("rpm_limit", "tpm_limit", "daily_token_limit", "max_concurrent")


def admin_session(url: str, run: Callable[..., int]) -> int:
    """Run `run(admin, publisher)` with the admin use cases performed by `cli:<os user>`:
    the same checks, audit rows and key events as the HTTP API. A refusal (unknown key, name
    taken, unknown model in allowed_models...) is one error line and exit status 1."""
    from app.errors import APIError
    from app.providers.catalog import CatalogError, load_catalog
    from app.services.actor import cli_actor
    from app.services.admin_service import Admin, known_models
    from app.services.key_events import KeyEventPublisher

    settings = Settings.from_env()
    try:
        models = known_models(load_catalog(settings.MODELS_FILE))
    except (CatalogError, OSError) as exc:
        raise CommandError(f"cannot read the model catalog {settings.MODELS_FILE}: {exc}") from None
    client = None
    if settings.REDIS_URL:
        from app.extensions import make_redis
        client = make_redis(settings.REDIS_URL, 2, settings.REDIS_CLUSTER)
    publisher = KeyEventPublisher(client, settings.KEY_EVENTS_CHANNEL)
    engine = engine_for(url)
    try:
        with Session(engine) as session:
            return run(Admin(session, cli_actor(), publisher, known_models=models), publisher)
    except APIError as exc:
        raise CommandError(exc.message) from None
    finally:
        engine.dispose()
        if client is not None:
            client.close()


def _announcement(publisher: KeyEventPublisher) -> str:
    """What the running gateways were told about the change."""
    ttl = f"AUTH_CACHE_TTL_S ({Settings.from_env().AUTH_CACHE_TTL_S:g}s"
    if publisher.client is None:
        return f"gateways pick it up within {ttl}; REDIS_URL not set)"
    if publisher.delivered:
        return "running gateways were told through Redis (effective within a second)"
    return f"Redis unreachable: gateways pick it up within {ttl})"


def _key_fields(args: argparse.Namespace) -> dict:
    """The key fields given on the command line (options left out are not sent)."""
    fields = {f: getattr(args, f) for f in (*LIMIT_OPTIONS, "budget_usd", "expires_at", "name")
              if getattr(args, f, None) is not None}
    if args.allowed_models is not None:
        fields["allowed_models"] = [m.strip() for m in args.allowed_models.split(",") if m.strip()]
    if args.cache is not None:
        fields["cache"] = CACHE_CHOICES[args.cache]
    return fields


def cmd_create_key(args: argparse.Namespace) -> int:
    def run(admin, publisher) -> int:
        key, plaintext = admin.mint_key({**_key_fields(args), "tenant": args.tenant, "role": args.role})
        print(f"created key id={key.id} name={key.name!r} tenant={key.tenant.name!r} "
              f"prefix={key.prefix} (the key is shown once; store it now):")
        print(plaintext)
        return 0
    return admin_session(args.url, run)


def cmd_update_key(args: argparse.Namespace) -> int:
    def run(admin, publisher) -> int:
        key = admin.update_key(args.id, _key_fields(args))
        print(f"updated key id={key.id} name={key.name!r}")
        print(_announcement(publisher))
        return 0
    return admin_session(args.url, run)


def cmd_rotate_key(args: argparse.Namespace) -> int:
    def run(admin, publisher) -> int:
        key, plaintext = admin.rotate_key(args.id, args.grace_period_s)
        print(f"rotated key id={key.id} prefix={key.prefix}; the old secret works for "
              f"{args.grace_period_s:g}s more (the new key is shown once; store it now):")
        print(plaintext)
        print(_announcement(publisher))
        return 0
    return admin_session(args.url, run)


def cmd_revoke_key(args: argparse.Namespace) -> int:
    """Revoke, audit, and tell the running gateways (through Redis, when REDIS_URL is set)."""
    def run(admin, publisher) -> int:
        key, revoked = admin.revoke_key(args.id)
        if revoked:
            print(f"revoked key id={key.id} name={key.name!r} prefix={key.prefix}")
        else:
            print(f"key id={key.id} was already revoked")
        print(_announcement(publisher))
        return 0
    return admin_session(args.url, run)


def cmd_create_tenant(args: argparse.Namespace) -> int:
    limits = {f: getattr(args, f) for f in LIMIT_OPTIONS if getattr(args, f) is not None}

    def run(admin, publisher) -> int:
        tenant = admin.create_tenant(name=args.name, status=args.status, budget_usd=args.budget_usd,
                                     key_limits=limits)
        print(f"created tenant id={tenant.id} name={tenant.name!r} status={tenant.status}")
        return 0
    return admin_session(args.url, run)


def cmd_update_tenant(args: argparse.Namespace) -> int:
    changes: dict = {k: getattr(args, k) for k in ("name", "status", "budget_usd") if getattr(args, k) is not None}
    limits = {f: getattr(args, f) for f in LIMIT_OPTIONS if getattr(args, f) is not None}
    if limits:
        changes["key_limits"] = limits

    def run(admin, publisher) -> int:
        tenant = admin.update_tenant(args.tenant, changes)
        print(f"tenant id={tenant.id} name={tenant.name!r} status={tenant.status}")
        print(_announcement(publisher))
        return 0
    return admin_session(args.url, run)


def cmd_list_keys(args: argparse.Namespace) -> int:
    """One line per key: never its secret or hash, only the display prefix."""
    from app.services.api_key_service import list_keys

    def run(admin, publisher) -> int:
        tenant_id = admin.visible_tenant(args.tenant, param="tenant").id if args.tenant else None
        print("id\ttenant\tname\tprefix\trole\tstatus\texpires_at")
        for key in list_keys(admin.session, tenant_id=tenant_id):
            status = "revoked" if key.revoked_at is not None else "active"
            if status == "revoked" and not args.all:
                continue
            expires = key.expires_at.isoformat() if key.expires_at else "-"
            print(f"{key.id}\t{key.tenant.name}\t{key.name}\t{key.prefix}\t{key.role}\t{status}\t{expires}")
        return 0
    return admin_session(args.url, run)


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
    client = make_redis(redis_url, 4, settings.REDIS_CLUSTER) if redis_url else None
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


def _period(value: str) -> float:
    """`90s`, `30m`, `6h`, `1d` or plain seconds."""
    raw = value.strip().lower()
    unit = {"s": 1, "m": 60, "h": 3600, "d": 86400}.get(raw[-1:], None)
    number = raw[:-1] if unit else raw
    try:
        seconds = float(number) * (unit or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a period (90s, 30m, 6h, 1d): {value!r}") from None
    if seconds < 1:
        raise argparse.ArgumentTypeError("the period must be at least 1s")
    return seconds


def cmd_maintain(args: argparse.Namespace) -> int:
    """Partitions ahead and retention, once per period across every scheduler (a Redis lock);
    with --every, forever (the compose `maintenance` service)."""
    import time

    from redis import RedisError

    from app.extensions import make_redis
    from app.services.maintenance import run_once

    settings = Settings.from_env()
    client = make_redis(settings.REDIS_URL, 2, settings.REDIS_CLUSTER)
    period = args.every or args.period
    while True:
        engine = engine_for(args.url)
        try:
            run = run_once(engine, client, period, settings.USAGE_PARTITIONS_AHEAD,
                           settings.USAGE_RETENTION_DAYS, settings.RESPONSES_RETENTION_DAYS)
            print(run.summary(), flush=True)
        except (OperationalError, OSError, RedisError) as exc:
            if not args.every and not isinstance(exc, RedisError):
                raise
            print(f"maintenance failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
                  + (", retried next period" if args.every else ""), file=sys.stderr, flush=True)
            if not args.every:
                return EXIT_UNREACHABLE
        finally:
            engine.dispose()
        if not args.every:
            return 0
        time.sleep(args.every)


def cmd_check_models(args: argparse.Namespace) -> int:
    """Validate a models file as the gateway would; the error names the bad entry."""
    from app.providers.catalog import CatalogError
    from app.providers.provider_manager import ProviderManager

    path = args.file or Settings.from_env().MODELS_FILE
    try:
        manager = ProviderManager.from_file(path)
    except CatalogError as exc:
        raise CommandError(str(exc)) from None
    print(f"{path}: valid, {len(manager.catalog.models)} models")
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
    key.add_argument("--tenant", required=True, help="tenant name (created when new) or id")
    key.add_argument("--role", choices=("member", "admin"), default="member")
    add_key_options(key)
    update = add("update-key", cmd_update_key, "change a key's name, limits, budget, models or expiry")
    update.add_argument("id", type=_bounded(2**63 - 1))
    update.add_argument("--name")
    add_key_options(update)
    rotate = add("rotate-key", cmd_rotate_key, "give a key a new secret (printed once)")
    rotate.add_argument("id", type=_bounded(2**63 - 1))
    rotate.add_argument("--grace-period-s", type=_grace, default=0.0,
                        help="seconds the old secret keeps working (default 0)")
    revoke = add("revoke-key", cmd_revoke_key, "revoke a key (running gateways are told through Redis)")
    revoke.add_argument("id", type=_bounded(2**63 - 1))
    keys = add("list-keys", cmd_list_keys, "list keys (id, tenant, name, prefix, role, status); never a secret")
    keys.add_argument("--tenant", help="only this tenant's keys (name or id)")
    keys.add_argument("--all", action="store_true", help="include revoked keys")
    tenant = add("create-tenant", cmd_create_tenant, "create a tenant (its budget and the limits of its keys)")
    tenant.add_argument("--name", required=True)
    tenant.add_argument("--status", choices=("active", "suspended"), default="active")
    add_tenant_options(tenant)
    change = add("update-tenant", cmd_update_tenant, "rename, suspend, reactivate a tenant or change its limits")
    change.add_argument("tenant", help="tenant name or id")
    change.add_argument("--name", help="new name")
    change.add_argument("--status", choices=("active", "suspended"))
    add_tenant_options(change)
    add_usage_commands(add)
    check = add("check-models", cmd_check_models, "validate a models file (default MODELS_FILE)")
    check.add_argument("file", nargs="?")
    return parser


# --cache: the key's response cache setting (the API's "cache": true, false or null)
CACHE_CHOICES = {"on": True, "off": False, "default": None}


def add_key_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rpm-limit", type=_positive)
    p.add_argument("--tpm-limit", type=_positive)
    p.add_argument("--daily-token-limit", type=_bounded(2**63 - 1))
    p.add_argument("--max-concurrent", type=_positive)
    p.add_argument("--budget-usd", type=_decimal)
    p.add_argument("--allowed-models", help="comma-separated model aliases or categories (data/models.json)")
    p.add_argument("--expires-at", type=_timestamp, help="ISO 8601, e.g. 2027-01-01T00:00:00Z")
    p.add_argument("--cache", choices=tuple(CACHE_CHOICES),
                   help="the response cache for this key's requests: on, off, or default (the model's "
                        "setting, else RESPONSE_CACHE_DEFAULT decides)")


def add_tenant_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--budget-usd", type=_decimal, help="monthly budget shared by all its keys")
    p.add_argument("--rpm-limit", type=_positive)
    p.add_argument("--tpm-limit", type=_positive)
    p.add_argument("--daily-token-limit", type=_bounded(2**63 - 1))
    p.add_argument("--max-concurrent", type=_positive)


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
    maintain = add("maintain", cmd_maintain, "partitions ahead + retention, once per period across replicas")
    maintain.add_argument("--period", type=_period, default=3600.0,
                          help="the Redis lock's period: one run per period across every scheduler (default 1h)")
    maintain.add_argument("--every", type=_period, help="run forever, once every this long (6h)")


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
