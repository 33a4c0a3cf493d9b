"""Read-only queries on a PostgreSQL streaming replica (`DATABASE_READ_URL`), against a real
primary and a real standby made with `pg_basebackup -R` (Testing/pg_replica.py): usage reports
and CSV exports are read on the replica (pausing its WAL replay freezes what they show), every
write (usage rows, keys) goes to the primary, the replica's lag is in /health, and a replica that
stops answering leaves the reports to the primary."""
from __future__ import annotations

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

import db_manager
from app.services import read_replica
from Testing.conftest import app_config, close_app, start_app
from Testing.pg_replica import PostgresPair
from Testing.support import SYSTEM_SECRET, wait_until

pytestmark = pytest.mark.timeout(240)
SYSTEM = {"X-System-Secret": SYSTEM_SECRET}
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def pair():
    def prepare(admin_url: str) -> None:
        with psycopg.connect(admin_url.replace("+psycopg", ""), autocommit=True) as conn:
            conn.execute("CREATE DATABASE gw")
        db_manager.upgrade(admin_url.rsplit("/", 1)[0] + "/gw")

    pg = PostgresPair().start(prepare)
    yield pg
    pg.stop()


@pytest.fixture(scope="module")
def app(pair, models_file):
    application = start_app(app_config(pair.url("primary", "gw"), models_file,
                                       DATABASE_READ_URL=pair.url("replica", "gw")))
    yield application
    close_app(application)
    read_replica.of(application, application.extensions["gateway"]).close()


@pytest.fixture(scope="module")
def client(app):
    return app.test_client()


def sql(url: str, statement: str):
    with psycopg.connect(url.replace("+psycopg", ""), autocommit=True) as conn:
        return conn.execute(statement).fetchone()


def rows(pair, role: str) -> int:
    return sql(pair.url(role, "gw"), "SELECT count(*) FROM usage_records")[0]


def mint(client, tenant: str) -> str:
    resp = client.post("/v1/api-keys", json={"name": "r", "tenant": tenant}, headers=SYSTEM)
    assert resp.status_code == 201, resp.get_json()
    return resp.get_json()["key"]


def complete(client, key: str, n: int) -> None:
    for _ in range(n):
        resp = client.post("/v1/chat/completions", json={"model": "demo", "messages": MESSAGES, "max_tokens": 4},
                           headers={"Authorization": f"Bearer {key}"})
        assert resp.status_code == 200, resp.get_json()
        resp.close()   # the settlement (usage row) runs when the response is closed


def reported(client, key: str, csv: bool = False) -> int:
    if csv:
        resp = client.get("/v1/usage?format=csv", headers={"Authorization": f"Bearer {key}"})
        assert resp.status_code == 200
        header, values = resp.get_data(as_text=True).strip().splitlines()[:2]
        return int(dict(zip(header.split(","), values.split(",")))["requests"])
    resp = client.get("/v1/usage", headers={"Authorization": f"Bearer {key}"})
    assert resp.status_code == 200, resp.get_json()
    return resp.get_json()["requests"]


def test_usage_reports_are_read_on_the_replica(pair, client):
    """Rows are written on the primary; with the replica's replay paused the report (JSON and
    CSV) still shows what the replica had, and catches up once replay resumes."""
    key = mint(client, "replica-reads")
    complete(client, key, 3)
    wait_until(lambda: rows(pair, "replica") == 3, timeout=20, message="3 rows replicated")
    assert reported(client, key) == 3
    sql(pair.url("replica"), "SELECT pg_wal_replay_pause()")
    try:
        complete(client, key, 2)
        wait_until(lambda: rows(pair, "primary") == 5, timeout=20, message="5 rows on the primary")
        assert rows(pair, "replica") == 3
        assert reported(client, key) == 3          # the replica's view
        assert reported(client, key, csv=True) == 3
        health = client.get("/health").get_json()
        assert health["read_replica"]["status"] == "ok" and health["read_replica"]["lag_bytes"] > 0
    finally:
        sql(pair.url("replica"), "SELECT pg_wal_replay_resume()")
    wait_until(lambda: reported(client, key) == 5, timeout=20, message="the report caught up")
    wait_until(lambda: client.get("/health").get_json()["read_replica"]["lag_bytes"] == 0, timeout=20,
               message="no lag")
    assert client.get("/health").get_json()["read_replica"]["lag_s"] == 0


def test_writes_never_go_to_the_replica(pair, client, app):
    """With replay paused, a key minted now works at once (keys are read and written on the
    primary), its completions are rows on the primary only; the replica's engine refuses writes."""
    sql(pair.url("replica"), "SELECT pg_wal_replay_pause()")
    try:
        before = rows(pair, "replica")
        key = mint(client, "replica-writes")
        complete(client, key, 2)
        wait_until(lambda: rows(pair, "primary") == before + 2, timeout=20, message="rows on the primary")
        assert rows(pair, "replica") == before
    finally:
        sql(pair.url("replica"), "SELECT pg_wal_replay_resume()")
    engine = read_replica.of(app, app.extensions["gateway"]).engine
    with pytest.raises(SQLAlchemyError, match="read-only"):
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM usage_records"))


def test_replica_down_reports_come_from_the_primary(pair, client):
    """Runs last: the replica stopped, /v1/usage still answers (from the primary, up to date) and
    /health says the replica is unavailable without failing the gateway's health."""
    key = mint(client, "replica-down")
    complete(client, key, 1)
    wait_until(lambda: rows(pair, "replica") == rows(pair, "primary"), timeout=20, message="replica in sync")
    pair.stop_replica()
    complete(client, key, 1)
    wait_until(lambda: reported(client, key) == 2, timeout=20, message="the primary's figures")
    resp = client.get("/health")
    assert resp.status_code == 200 and resp.get_json()["read_replica"]["status"] == "unavailable"
