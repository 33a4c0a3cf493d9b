"""PostgreSQL restarted, down, or misnamed under the real gunicorn gateway (issue 16 item 13).

A private cluster (Testing/pg_private.py) is restarted; the shared test server never is."""
from __future__ import annotations

import pytest

import db_manager
from Testing.conftest import app_config
from Testing.pg_private import PrivatePostgres
from Testing.support import SYSTEM_SECRET, GatewayProcess, http_json, wait_until

ADMIN = {"X-System-Secret": SYSTEM_SECRET}
CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def private_pg():
    pg = PrivatePostgres().create()
    pg.execute('CREATE DATABASE "gateway"')
    db_manager.upgrade(pg.url("gateway"))
    yield pg
    pg.destroy()


@pytest.fixture
def gw(private_pg, models_file, tmp_path, clean_db):
    """2 workers on the private database; key lookups are cached for 0.2 s only, so requests
    reach PostgreSQL."""
    env = {k: str(v) for k, v in app_config(private_pg.url("gateway"), models_file, AUTH_CACHE_TTL_S=0.2).items()}
    with GatewayProcess(env, workers=2, log_path=tmp_path / "gw.log") as proc:
        yield proc


def _calls(gw, key: str) -> dict[str, tuple]:
    """One request of each kind that needs the database (admin, usage, audit, tenants, a key)."""
    bearer = {"Authorization": f"Bearer {key}"}
    return {
        "keys": ("GET", gw.base_url + "/v1/api-keys", None, ADMIN),
        "tenants": ("GET", gw.base_url + "/v1/tenants", None, ADMIN),
        "audit": ("GET", gw.base_url + "/v1/audit", None, ADMIN),
        "usage": ("GET", gw.base_url + "/v1/usage", None, bearer),
        "chat": ("POST", gw.base_url + "/v1/chat/completions", CHAT, bearer),
        "mint": ("POST", gw.base_url + "/v1/api-keys", {"name": "n", "tenant": "restart"}, ADMIN),
    }


def _statuses(gw, key: str, rounds: int) -> dict[str, set[int]]:
    seen: dict[str, set[int]] = {}
    for _ in range(rounds):
        for name, (method, url, body, headers) in _calls(gw, key).items():
            seen.setdefault(name, set()).add(http_json(method, url, body, headers)[0])
    return seen


def _mint(gw) -> str:
    status, _, body = http_json("POST", gw.base_url + "/v1/api-keys", {"name": "k", "tenant": "restart"}, ADMIN)
    assert status in (200, 201), body
    return body["key"]


def test_restart_costs_no_failed_request(gw, private_pg):
    """Every worker's pool holds connections when PostgreSQL restarts: once it answers again,
    not one request fails (no 500, no 503 database_unavailable)."""
    key = _mint(gw)
    assert _statuses(gw, key, 10) == {"keys": {200}, "tenants": {200}, "audit": {200}, "usage": {200},
                                      "chat": {200}, "mint": {201}}
    private_pg.stop()
    private_pg.start()
    assert _statuses(gw, key, 10) == {"keys": {200}, "tenants": {200}, "audit": {200}, "usage": {200},
                                      "chat": {200}, "mint": {201}}


def test_database_down_answers_503_envelopes_then_recovers(gw, private_pg):
    """While PostgreSQL is down every endpoint answers 503 with the error envelope (never a
    500) for a key the gateway has not seen (a known key is served from the cache, by
    design); when it is back, everything answers again."""
    key, unseen = _mint(gw), _mint(gw)  # `unseen` is in no worker's key cache
    assert _statuses(gw, key, 4)["chat"] == {200}
    private_pg.stop()
    try:
        for name, (method, url, body, headers) in _calls(gw, unseen).items():
            for _ in range(4):
                status, _, answer = http_json(method, url, body, headers)
                assert status == 503, (name, status, answer)
                assert answer["error"]["code"] == "database_unavailable", (name, answer)
    finally:
        private_pg.start()
    assert _statuses(gw, key, 5) == {"keys": {200}, "tenants": {200}, "audit": {200}, "usage": {200},
                                     "chat": {200}, "mint": {201}}


def test_database_that_does_not_exist(private_pg, models_file, tmp_path, clean_db):
    """DATABASE_URL names a database the server does not have: one error line at start-up, and
    503s that say so."""
    env = {k: str(v) for k, v in app_config(private_pg.url("no_such_db"), models_file).items()}
    with GatewayProcess(env, workers=1, log_path=tmp_path / "gw.log") as gw:
        for method, url, body, headers in [("GET", gw.base_url + "/v1/tenants", None, ADMIN),
                                           ("POST", gw.base_url + "/v1/chat/completions", CHAT,
                                            {"Authorization": "Bearer sk-gw-unknown"})]:
            status, _, answer = http_json(method, url, body, headers)
            assert status == 503 and answer["error"]["code"] == "database_not_found", answer
            assert "does not exist" in answer["error"]["message"]
        lines = [l for l in gw.log_text().splitlines() if "no_such_db" in l and "does not exist" in l]
        assert len(lines) == 1, lines
        assert "Traceback" not in gw.log_text()
