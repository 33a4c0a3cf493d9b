"""Requests while PostgreSQL is unreachable (a TCP proxy cut in front of it), in-process: a
cached key keeps working past its cache TTL, an unknown key gets a 503 envelope, and a key whose
limiter counters would have to be rebuilt from the usage store gets the limiter's 503, never a
500."""
from __future__ import annotations

import uuid

import pytest

from Testing.conftest import app_config, close_app, start_app
from Testing.support import SYSTEM_SECRET
from Testing.tcp_proxy import TcpProxy

pytestmark = pytest.mark.timeout(60)
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
def outage_app(pg_url, models_file, clean_db, tmp_path, clock):
    """The app behind a proxy, on the test's clock (`clock.advance` ends cache lifetimes); its
    outbox is its own (no other gateway of the run replays it)."""
    proxy = TcpProxy.in_front_of(pg_url)
    application = start_app(app_config(proxy.url, models_file, AUTH_CACHE_TTL_S=0.2, USAGE_WRITE_TIMEOUT_S=1,
                                        USAGE_OUTBOX_NAME="usage-outage-" + uuid.uuid4().hex[:8],
                                        USAGE_SPOOL_DIR=str(tmp_path)), clock=clock)
    yield application, proxy
    proxy.cut()
    close_app(application)


def mint(client, **fields) -> str:
    resp = client.post("/v1/api-keys", json={"name": "k", "tenant": "outage", **fields},
                       headers={"X-System-Secret": SYSTEM_SECRET})
    assert resp.status_code == 201, resp.get_json()
    return resp.get_json()["key"]


def test_requests_during_a_database_outage_get_answers_or_clear_503s(outage_app, clock):
    """Database cut: a key seen before still completes (after its cache TTL too); an unknown
    key is 503 database_unavailable; a key with a budget whose month counter Redis does not
    have yet is 503 rate_limiter_unavailable; all in the OpenAI error envelope."""
    app, proxy = outage_app
    client = app.test_client()
    plain = mint(client)
    budgeted = mint(client, budget_usd="5")
    unknown = mint(client, name="unseen")
    for key in (plain, budgeted):  # cached by this worker; the budget counter is not seeded yet
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    proxy.cut()
    clock.advance(0.3)  # past AUTH_CACHE_TTL_S

    ok = client.post("/v1/chat/completions", json={"model": "demo", "messages": MESSAGES},
                     headers={"Authorization": f"Bearer {plain}"})
    assert ok.status_code == 200, ok.get_json()
    for key, code in ((unknown, "database_unavailable"), (budgeted, "rate_limiter_unavailable")):
        resp = client.post("/v1/chat/completions", json={"model": "demo", "messages": MESSAGES},
                           headers={"Authorization": f"Bearer {key}"})
        assert resp.status_code == 503, resp.get_json()
        err = resp.get_json()["error"]
        assert err["code"] == code and err["type"] and err["message"]
