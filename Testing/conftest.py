"""Fixtures: a fresh PostgreSQL database per run, the fake OpenAI upstream, the app, and a
real gunicorn + gevent gateway process. Everything is started on free ports and cleaned up."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import redis
from sqlalchemy import create_engine, text

import db_manager
from Testing.fakes.fake_openai import FakeOpenAI
from Testing.tcp_proxy import TcpProxy
from Testing.support import (KEY_EVENTS_CHANNEL, REDIS_URL, SYSTEM_SECRET, UPSTREAM_KEY, FakeClock, GatewayProcess,
                             create_database, database_url, drop_database, wait_until,
                             write_models_file)

os.environ["TEST_UPSTREAM_KEY"] = UPSTREAM_KEY
TABLES = ("usage_records", "usage_daily", "api_keys", "tenants", "audit_log", "responses")
# Usage spool files of the test apps (only written while PostgreSQL and Redis are both down).
SPOOL_DIR = tempfile.mkdtemp(prefix="gw-usage-spool-")
OUTBOX_NAME = "usage-test-" + os.urandom(4).hex()  # the Redis outbox list of this run's gateways


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh database for this test run, migrated to head; dropped at the end."""
    name = create_database()
    url = database_url(name)
    db_manager.upgrade(url)
    yield url
    drop_database(name)


@pytest.fixture(scope="session")
def pg_engine(pg_url: str):
    engine = create_engine(pg_url)
    yield engine
    engine.dispose()


def truncate(engine) -> None:
    """Empty the tables, keeping their id sequences: a key or tenant id is never given twice
    in a run, so a usage row or a settlement of an earlier test that the shared gateway stores
    after the truncation never counts against a later test's key (whose day and month counters
    are seeded from the usage rollup by key id)."""
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {', '.join(TABLES)} CASCADE"))


@pytest.fixture
def clean_db(pg_engine) -> Any:
    """Empty tables (ids go on from where they were), and an empty limiter database in Redis."""
    truncate(pg_engine)
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    client.close()
    return pg_engine


@pytest.fixture
def pg_proxy(pg_url: str) -> Iterator[TcpProxy]:
    """A TCP proxy before the test database: `.url` goes through it, `cut()` is an outage."""
    proxy = TcpProxy.in_front_of(pg_url)
    yield proxy
    proxy.cut()


@pytest.fixture(scope="session")
def fake_upstream() -> Iterator[FakeOpenAI]:
    fake = FakeOpenAI()
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture(scope="session")
def models_file(tmp_path_factory, fake_upstream) -> Path:
    return write_models_file(tmp_path_factory.mktemp("models") / "models.json", fake_upstream.base_url)


@pytest.fixture(scope="session")
def redis_url() -> str:
    return REDIS_URL


# Routing settings of the shared apps: short retry waits; a Retry-After of the fake's `fail-429`
# (1 s) is not waited for; no retry after the 3 s read timeout of `hang`; breakers that never open
# from the scripted failures other tests provoke (breakers are tested with their own settings in
# Testing/services/test_circuit_breaker.py and Testing/api/test_routing.py).
ROUTING_TEST_SETTINGS = {"ROUTER_RETRY_BASE_S": 0.01, "ROUTER_RETRY_MAX_BACKOFF_S": 0.05,
                         "ROUTER_MAX_RETRY_AFTER_S": 0.5, "ROUTER_DEADLINE_S": 2.5,
                         "BREAKER_FAILURE_THRESHOLD": 100000, "BREAKER_MIN_REQUESTS": 100000}


def app_config(pg_url: str, models_file: Path, **overrides: Any) -> dict[str, Any]:
    return {"DATABASE_URL": pg_url, "MODELS_FILE": str(models_file), "SYSTEM_SECRET": SYSTEM_SECRET,
            "REDIS_URL": REDIS_URL, "LOG_LEVEL": "WARNING", "MAX_REQUEST_BYTES": 256 * 1024,
            "KEY_EVENTS_CHANNEL": KEY_EVENTS_CHANNEL, "USAGE_SPOOL_DIR": SPOOL_DIR, "USAGE_OUTBOX_POLL_S": 0.2,
            "USAGE_OUTBOX_NAME": OUTBOX_NAME,
            # Rows written at once: a test's rows land before the next test's `clean_db`, as they
            # did before the writer lingered (a lingering writer once stored a row of the previous
            # test after the truncation, which then counted against the next key with the same id;
            # ids are no longer reused, see `truncate`). The linger itself:
            # Testing/services/test_usage_outbox.py.
            "USAGE_BATCH_LINGER_S": 0, **ROUTING_TEST_SETTINGS, **overrides}


def start_app(config: dict[str, Any], **kwargs: Any):
    """An app built by the factory (`kwargs`: its other arguments, e.g. `clock`) with its
    runtime started (its background threads running), as a gunicorn worker has it. Close it
    with `close_app`."""
    from app import create_app
    application = create_app(config, **kwargs)
    application.extensions["gateway"].start()
    return application


@pytest.fixture
def app(pg_url, models_file, clean_db):
    application = start_app(app_config(pg_url, models_file))
    yield application
    close_app(application)


def close_app(application) -> None:
    """Close the app's runtime: stop its threads, write queued settlements and usage rows,
    release its upstream, Redis and database connections."""
    application.extensions["gateway"].close(timeout=5)


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def admin_headers() -> dict[str, str]:
    return {"X-System-Secret": SYSTEM_SECRET}


@pytest.fixture(scope="module")
def module_app(pg_url, models_file):
    """One app for a whole module, for tests that need no empty tables (each mints its own
    keys): building an app per test case is slow."""
    application = start_app(app_config(pg_url, models_file))
    yield application
    close_app(application)


def minter(client, admin_headers: dict[str, str]) -> Callable[..., dict]:
    """A function minting a key through the admin API; it returns the 201 body (with `key`)."""
    def _mint(**fields: Any) -> dict:
        fields.setdefault("name", "test-key")
        fields.setdefault("tenant", "acme")
        resp = client.post("/v1/api-keys", json=fields, headers=admin_headers)
        assert resp.status_code == 201, resp.get_json()
        return resp.get_json()
    return _mint


@pytest.fixture
def mint(client, admin_headers) -> Callable[..., dict]:
    """Mint a key through the admin API of the `app` fixture."""
    return minter(client, admin_headers)


def gateway_process(pg_url: str, models_file: Path, log_dir: Path) -> Iterator[GatewayProcess]:
    """The body of a gateway fixture: gunicorn -k gevent with 2 workers on `models_file`, stopped
    at the end, its log checked for the upstream key."""
    env = {k: str(v) for k, v in app_config(pg_url, models_file, LOG_LEVEL="INFO").items()}
    proc = GatewayProcess(env, workers=2, log_path=log_dir / "gunicorn.log").start()
    yield proc
    proc.stop()
    assert UPSTREAM_KEY not in proc.log_text(), "the upstream key leaked into the gateway log"


@pytest.fixture(scope="session")
def gateway(pg_url, models_file, tmp_path_factory) -> Iterator[GatewayProcess]:
    """The gateway under `gunicorn -k gevent` with 2 workers, shared by the e2e tests."""
    yield from gateway_process(pg_url, models_file, tmp_path_factory.mktemp("gateway"))


def usage_rows(engine, where: str = "TRUE", params: dict | None = None) -> list[dict]:
    with engine.connect() as conn:
        rows = conn.execute(text(f"SELECT * FROM usage_records WHERE {where} ORDER BY id"), params or {})
        return [dict(r._mapping) for r in rows]


# The usage rows of a key minted in the running test: `since` is a time taken before it was minted.
# Gateways write rows after their answers, so a row of an earlier test can land after the
# truncation; key ids are never reused (clean_db keeps the sequences), and `since` (the row's
# request began before the key existed) tells apart rows of keys made outside the API too.
KEY_ROWS = "api_key_id = :k AND created_at >= :since"


def key_rows(engine, key: dict, count: int, timeout: float = 10) -> list[dict]:
    """Wait for `count` usage rows of `key` (a dict with `id` and `since`) and return all of them."""
    return wait_for_rows(engine, count, KEY_ROWS, {"k": key["id"], "since": key["since"]}, timeout=timeout)


def wait_for_rows(engine, count: int, where: str = "TRUE", params: dict | None = None,
                  timeout: float = 10) -> list[dict]:
    """Usage rows are written after the response: poll until `count` of them are there."""
    wait_until(lambda: len(usage_rows(engine, where, params)) >= count, timeout=timeout,
               message=f"{count} usage rows where {where}")
    return usage_rows(engine, where, params)


@pytest.fixture
def clock() -> FakeClock:
    """A clock the test moves by hand (see `clocked_app`)."""
    return FakeClock()


@pytest.fixture
def clocked_app(pg_url, models_file, clean_db, clock):
    """The `app` fixture on the `clock` fixture: key expiry, grace periods, cache lifetimes and
    breaker cooldowns move when the test calls `clock.advance(...)`, never by sleeping."""
    application = start_app(app_config(pg_url, models_file), clock=clock)
    yield application
    close_app(application)


@pytest.fixture(scope="session")
def redis_cluster():
    """A real 3-master Redis Cluster on free loopback ports, for the whole run (started only
    when a test asks for it; Testing/redis_cluster.py)."""
    from Testing.redis_cluster import LocalRedisCluster

    cluster = LocalRedisCluster().start()
    yield cluster
    cluster.stop()
