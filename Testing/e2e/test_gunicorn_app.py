"""The gateway under a real `gunicorn -k gevent` (2 workers): health, minting and calling over
HTTP, request ids; and proof that PostgreSQL calls through psycopg 3 (and through the app's
SQLAlchemy engine) are cooperative once gevent has patched the process."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from Testing.support import PG_ADMIN_URL, REDIS_URL, ROOT, SYSTEM_SECRET, http_json

pytestmark = pytest.mark.timeout(120)

ENVELOPE = {"message", "type", "param", "code"}
CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}


def mint_http(gateway, **fields) -> dict:
    fields.setdefault("name", "e2e-gunicorn")
    fields.setdefault("tenant", "e2e")
    status, _, body = http_json("POST", gateway.base_url + "/v1/api-keys", fields,
                                headers={"X-System-Secret": SYSTEM_SECRET})
    assert status == 201, body
    return body


def test_health_under_gunicorn(gateway):
    """/health answers 200 with database "ok" (PostgreSQL) and redis "ok" under gunicorn."""
    status, headers, body = http_json("GET", gateway.base_url + "/health")
    assert status == 200, body
    assert (body["status"], body["database"], body["redis"]) == ("ok", "ok", "ok")
    assert headers.get("Content-Type", "").startswith("application/json")
    assert len(gateway.worker_pids()) == 2


def test_mint_and_list_models_over_http(gateway):
    """A key minted over HTTP works on /v1/models on any worker; an unknown key gets 401."""
    key = mint_http(gateway, allowed_models=["demo", "gpt-4o-mini"])
    for _ in range(4):  # several connections: both workers get to look the key up
        status, _, body = http_json("GET", gateway.base_url + "/v1/models",
                                    headers={"Authorization": f"Bearer {key['key']}"})
        assert status == 200, body
        assert body["object"] == "list"
        assert sorted(m["id"] for m in body["data"]) == ["demo", "gpt-4o-mini"]
    status, headers, body = http_json("GET", gateway.base_url + "/v1/models",
                                      headers={"Authorization": "Bearer sk-unknown"})
    assert status == 401 and headers.get("WWW-Authenticate") == "Bearer"
    assert set(body["error"]) == ENVELOPE and body["error"]["code"] == "invalid_api_key"


def test_completion_has_request_id(gateway):
    """A completion under gunicorn carries a unique X-Request-ID (req_...)."""
    key = mint_http(gateway)
    ids = []
    for _ in range(2):
        status, headers, body = http_json("POST", gateway.base_url + "/v1/chat/completions", CHAT,
                                          headers={"Authorization": f"Bearer {key['key']}"})
        assert status == 200, body
        assert body["object"] == "chat.completion"
        rid = headers.get("X-Request-ID")
        assert rid and rid.startswith("req_"), headers
        ids.append(rid)
    assert ids[0] != ids[1]


def test_errors_under_gunicorn_are_envelopes(gateway):
    """Under gunicorn, 404 / 405 / 413 / 400 are the JSON envelope too."""
    key = mint_http(gateway)
    auth = {"Authorization": f"Bearer {key['key']}"}
    base = gateway.base_url
    for (method, path, body), (status, code) in [
            (("GET", "/v1/nope", None), (404, "not_found")),
            (("GET", "/v1/chat/completions", None), (405, "method_not_allowed")),
            (("POST", "/v1/chat/completions", b"{bad"), (400, "invalid_json")),
            (("POST", "/v1/chat/completions",
              json.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * 300_000}]}).encode()),
             (413, "request_too_large"))]:
        got, _, resp = http_json(method, base + path, body, headers=auth)
        assert got == status, (path, resp)
        assert set(resp) == {"error"} and set(resp["error"]) == ENVELOPE, resp
        assert resp["error"]["code"] == code


def run_gevent_script(script: str, env: dict | None = None) -> dict:
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# Cooperation proven by an event, not by timing: each of 10 greenlets opens a connection and
# runs a statement that takes a number from a shared sequence (sequences ignore transactions)
# and returns only once all 10 have taken theirs, i.e. once all 10 statements were in PostgreSQL
# at the same time. A blocking driver would run the first greenlet's statement alone: it would
# wait for the others until statement_timeout ends it.
BARRIER_SQL = ("DO $$ BEGIN PERFORM nextval('{seq}'); WHILE (SELECT last_value FROM {seq}) < 10 LOOP "
               "PERFORM pg_sleep(0.01); END LOOP; END $$")

DRIVER_SCRIPT = r"""
from gevent import monkey
monkey.patch_all()
import json, sys, uuid
import gevent
import psycopg

URL = sys.argv[1] if len(sys.argv) > 1 else %r
SEQ = "coop_" + uuid.uuid4().hex[:8]

def one():
    with psycopg.connect(URL, options="-c statement_timeout=30000") as conn:
        conn.execute(%r.format(seq=SEQ))

with psycopg.connect(URL, autocommit=True) as admin:
    admin.execute("CREATE SEQUENCE " + SEQ)
    try:
        gevent.joinall([gevent.spawn(one) for _ in range(10)], raise_error=True)
    finally:
        admin.execute("DROP SEQUENCE " + SEQ)
print(json.dumps({"together": 10}))
"""


def test_psycopg_is_cooperative_under_gevent():
    """After monkey.patch_all(), 10 greenlets' psycopg statements are in PostgreSQL at the same time."""
    result = run_gevent_script(DRIVER_SCRIPT % (PG_ADMIN_URL, BARRIER_SQL))
    assert result == {"together": 10}


APP_SCRIPT = r"""
from gevent import monkey
monkey.patch_all()
import json, uuid
import gevent
from sqlalchemy import text
from app import create_app
from app.extensions import db

app = create_app()
with app.app_context():
    engine = db.engine
assert engine is app.extensions["gateway"].engine
SEQ = "coop_" + uuid.uuid4().hex[:8]

def one():
    with engine.connect() as conn:
        conn.execute(text("SET statement_timeout = 30000"))
        conn.execute(text(%r.format(seq=SEQ)))

with engine.connect() as admin:
    admin.execute(text("CREATE SEQUENCE " + SEQ))
    admin.commit()
    try:
        gevent.joinall([gevent.spawn(one) for _ in range(10)], raise_error=True)
    finally:
        admin.execute(text("DROP SEQUENCE " + SEQ))
        admin.commit()
app.extensions["gateway"].providers.close()
print(json.dumps({"together": 10, "dialect": engine.dialect.name, "driver": engine.dialect.driver}))
"""


def test_app_engine_is_cooperative_under_gevent(pg_url, models_file):
    """Patched first like the gevent worker, 10 greenlets' statements on the app's db.engine are
    in PostgreSQL at the same time."""
    result = run_gevent_script(APP_SCRIPT % BARRIER_SQL, env={
        "DATABASE_URL": pg_url, "REDIS_URL": REDIS_URL, "MODELS_FILE": str(models_file),
        "SYSTEM_SECRET": SYSTEM_SECRET, "LOG_LEVEL": "WARNING"})
    assert result == {"together": 10, "dialect": "postgresql", "driver": "psycopg"}
