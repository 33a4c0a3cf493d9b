"""Brute force: failed key and system-secret attempts are limited per client address (429
with Retry-After for that address only, until its window ends), in Redis across workers or in
process without Redis; unknown keys are remembered as unknown for a configurable time. Time is
moved with the injectable clock (real PostgreSQL, real Redis)."""
from __future__ import annotations

from typing import Iterator

import pytest
from sqlalchemy import event

from Testing.conftest import app_config, close_app, start_app
from Testing.support import SYSTEM_SECRET, FakeClock

ATTACKER = {"REMOTE_ADDR": "203.0.113.5"}
BYSTANDER = {"REMOTE_ADDR": "198.51.100.1"}
WRONG = {"Authorization": "Bearer sk-not-a-key-of-this-gateway"}


def _app(pg_url, models_file, clock, **overrides):
    settings = {"AUTH_FAILURE_LIMIT": 3, "AUTH_FAILURE_WINDOW_S": 60, **overrides}
    return start_app(app_config(pg_url, models_file, **settings), clock=clock)


@pytest.fixture(params=["in-process", "redis"])
def throttled(request, pg_url, models_file, clean_db) -> Iterator:
    """An app whose addresses may fail 3 times a minute; without Redis, and with it."""
    clock = FakeClock()
    extra = {"REDIS_URL": ""} if request.param == "in-process" else {}
    app = _app(pg_url, models_file, clock, **extra)
    yield app.test_client(), clock
    close_app(app)


def _mint(client, name: str = "k") -> str:
    resp = client.post("/v1/api-keys", json={"name": name, "tenant": "throttle"},
                       headers={"X-System-Secret": SYSTEM_SECRET}, environ_base={"REMOTE_ADDR": "10.9.9.9"})
    assert resp.status_code == 201, resp.get_json()
    return resp.get_json()["key"]


def test_failed_keys_block_that_address_only_until_the_window_ends(throttled):
    """Three unknown keys from one address: the fourth attempt gets 429 with Retry-After (even
    with a valid key this worker has not seen), other addresses are served; the window
    ending lifts the block."""
    client, clock = throttled
    valid = _mint(client)
    codes = [client.get("/v1/models", headers=WRONG, environ_base=ATTACKER).status_code for _ in range(3)]
    assert codes == [401, 401, 401]
    refused = client.get("/v1/models", headers={"Authorization": f"Bearer {valid}"}, environ_base=ATTACKER)
    assert refused.status_code == 429
    assert refused.get_json()["error"]["code"] == "too_many_failed_attempts"
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert client.get("/v1/models", headers=WRONG, environ_base=BYSTANDER).status_code == 401
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {valid}"},
                      environ_base=BYSTANDER).status_code == 200
    clock.advance(61)
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {valid}"},
                      environ_base=ATTACKER).status_code == 200


def test_wrong_system_secrets_count_too(throttled):
    """Guessing X-System-Secret is limited the same way; even the right secret is then refused
    from that address (a 200 would tell the guesser it found it)."""
    client, clock = throttled
    wrong = {"X-System-Secret": "guess"}
    assert [client.get("/v1/tenants", headers=wrong, environ_base=ATTACKER).status_code
            for _ in range(3)] == [401, 401, 401]
    right = {"X-System-Secret": SYSTEM_SECRET}
    assert client.get("/v1/tenants", headers=right, environ_base=ATTACKER).status_code == 429
    assert client.get("/v1/tenants", headers=right, environ_base=BYSTANDER).status_code == 200


def test_failures_are_shared_by_every_worker_through_redis(pg_url, models_file, clean_db):
    """With Redis, failures counted by one worker (app) block the address on another."""
    clock = FakeClock()
    first, second = _app(pg_url, models_file, clock), _app(pg_url, models_file, clock)
    try:
        for _ in range(3):
            assert first.test_client().get("/v1/models", headers=WRONG, environ_base=ATTACKER).status_code == 401
        assert second.test_client().get("/v1/models", headers=WRONG, environ_base=ATTACKER).status_code == 429
    finally:
        close_app(first)
        close_app(second)


def test_an_unknown_key_is_remembered_for_the_negative_cache_ttl(pg_url, models_file, clean_db):
    """The same unknown key twice within AUTH_NEGATIVE_CACHE_TTL_S costs one database lookup;
    after it, the next attempt looks it up again."""
    clock = FakeClock()
    app = _app(pg_url, models_file, clock, AUTH_FAILURE_LIMIT=0, AUTH_NEGATIVE_CACHE_TTL_S=30)
    lookups = []

    def count(conn, cursor, statement, *args):
        if "FROM api_keys" in statement and "key_hash" in statement:
            lookups.append(statement)
    rt = app.extensions["gateway"]
    event.listen(rt.engine, "before_cursor_execute", count)
    # The key-event listener expires the cache once when it subscribes: let that happen first.
    assert rt.key_events.subscribed.wait(10)
    try:
        client = app.test_client()
        assert client.get("/v1/models", headers=WRONG).status_code == 401
        clock.advance(29)
        assert client.get("/v1/models", headers=WRONG).status_code == 401
        assert len(lookups) == 1
        clock.advance(2)
        assert client.get("/v1/models", headers=WRONG).status_code == 401
        assert len(lookups) == 2
    finally:
        close_app(app)
