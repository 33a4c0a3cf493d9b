"""Bearer authentication of the consumer endpoints: every way to be refused answers 401 with
`WWW-Authenticate: Bearer`; the key never leaks into a response or a log; `last_used_at` is
written rarely; and `/v1/models` lists what the key may use."""
from __future__ import annotations

import logging
import time

import pytest
from sqlalchemy import text

from Testing.support import SYSTEM_SECRET

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def app(module_app):
    """Every test here mints its own keys: one app for the module is enough."""
    return module_app


ENVELOPE = {"message", "type", "param", "code"}
CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5}
UNKNOWN_KEY = "sk-" + "A" * 43


def call(client, endpoint: str, headers: dict):
    if endpoint == "models":
        return client.get("/v1/models", headers=headers)
    return client.post("/v1/chat/completions", json=CHAT, headers=headers)


def assert_401(resp) -> dict:
    assert resp.status_code == 401, (resp.status_code, resp.get_data(as_text=True))
    assert resp.headers.get("WWW-Authenticate") == "Bearer"
    body = resp.get_json()
    assert set(body) == {"error"} and set(body["error"]) == ENVELOPE
    assert body["error"]["code"] == "invalid_api_key"
    assert body["error"]["type"] == "invalid_request_error"
    return body["error"]


def last_used(engine, key_id: int):
    with engine.connect() as conn:
        return conn.execute(text("SELECT last_used_at FROM api_keys WHERE id = :i"), {"i": key_id}).scalar_one()


def usage_count(engine, key_id: int) -> int:
    with engine.connect() as conn:
        return conn.execute(text("SELECT count(*) FROM usage_records WHERE api_key_id = :i"),
                            {"i": key_id}).scalar_one()


def complete(client, key: dict) -> dict:
    """A successful completion, closed so that its settlement (close callback) has run."""
    headers = {"Authorization": f"Bearer {key['key']}"}
    with client.post("/v1/chat/completions", json=CHAT, headers=headers) as resp:
        assert resp.status_code == 200, resp.get_data(as_text=True)
        body = resp.get_json()
    assert body["object"] == "chat.completion"
    return body


@pytest.mark.parametrize("endpoint", ["models", "chat"])
@pytest.mark.parametrize("authorization", [
    None, "", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "Token {key}", "{key}", f"Bearer {UNKNOWN_KEY}",
    "Bearer sk-short"], ids=["none", "empty", "bearer-no-token", "bearer-blank", "basic", "token-scheme",
                             "bare-key", "unknown-key", "garbage-key"])
def test_refused_authorization_is_401(client, mint, endpoint, authorization):
    """Missing, non-Bearer, empty or unknown credentials -> 401, WWW-Authenticate: Bearer, invalid_api_key."""
    key = mint()
    headers = {} if authorization is None else {"Authorization": authorization.format(key=key["key"])}
    assert_401(call(client, endpoint, headers))


@pytest.mark.parametrize("endpoint", ["models", "chat"])
def test_revoked_key_is_401(client, mint, admin_headers, endpoint, pg_engine):
    """A revoked key gets 401 (with the revocation as the reason) and is not billed."""
    key = mint()
    headers = {"Authorization": f"Bearer {key['key']}"}
    assert call(client, endpoint, headers).status_code == 200
    assert client.delete(f"/v1/api-keys/{key['id']}", headers=admin_headers).status_code == 200
    client.application.extensions["gateway"].usage_batcher.flush(5.0)
    before = usage_count(pg_engine, key["id"])
    err = assert_401(call(client, endpoint, headers))
    assert "revoked" in err["message"]
    client.application.extensions["gateway"].usage_batcher.flush(5.0)
    assert usage_count(pg_engine, key["id"]) == before


def test_lowercase_bearer_scheme_accepted(client, mint):
    """The auth scheme is case-insensitive (RFC 7235): `bearer <key>` works."""
    key = mint()
    assert client.get("/v1/models", headers={"Authorization": f"bearer {key['key']}"}).status_code == 200


def test_a_request_hashes_its_key_once(client, mint, monkeypatch):
    """Authentication hashes the Bearer token once per request (the lookup takes the hash),
    whether the key's cache entry is missing (first request) or fresh (second)."""
    import app.api.auth as auth
    import app.services.api_key_service as keys
    key = mint()
    hashed: list[str] = []

    def counting(plaintext: str) -> str:
        hashed.append(plaintext)
        return keys.hashlib.sha256(plaintext.encode("utf-8")).hexdigest()

    monkeypatch.setattr(auth, "hash_key", counting)
    monkeypatch.setattr(keys, "hash_key", counting)
    for _ in range(2):
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {key['key']}"}).status_code == 200
    assert len(hashed) == 2


def test_key_never_in_response_or_log_of_failing_calls(client, mint, admin_headers, caplog):
    """A key's plaintext appears in no response and no DEBUG log record of failing calls."""
    caplog.set_level(logging.DEBUG)
    for name in ("gateway", "sqlalchemy", "urllib3", "werkzeug"):
        caplog.set_level(logging.DEBUG, logger=name)
    key = mint(allowed_models=["demo", "fail-500"])
    plaintext = key["key"]
    near_miss = plaintext[:-1] + ("A" if plaintext[-1] != "A" else "B")
    caplog.clear()
    auth = {"Authorization": f"Bearer {plaintext}"}
    responses = [
        client.get("/v1/models", headers={"Authorization": f"Bearer {near_miss}"}),
        client.post("/v1/chat/completions", json={**CHAT, "model": "gpt-4o-mini"}, headers=auth),
        client.post("/v1/chat/completions", json={**CHAT, "messages": "bad"}, headers=auth),
        client.post("/v1/chat/completions", data=b"{oops", content_type="application/json", headers=auth),
        client.post("/v1/chat/completions", json={**CHAT, "model": "nope"}, headers=auth),
        client.post("/v1/chat/completions", json={**CHAT, "model": "fail-500"}, headers=auth),
    ]
    assert [r.status_code for r in responses] == [401, 403, 400, 400, 404, 502]
    assert client.delete(f"/v1/api-keys/{key['id']}", headers=admin_headers).status_code == 200
    responses.append(client.post("/v1/chat/completions", json=CHAT, headers=auth))
    assert responses[-1].status_code == 401
    for resp in responses:
        raw = resp.get_data(as_text=True)
        assert plaintext not in raw and near_miss not in raw
        assert plaintext[len(key["prefix"]):] not in raw
    assert any(r.name.startswith("sqlalchemy") for r in caplog.records), \
        "no SQL was captured: the check below would prove nothing"
    logged = caplog.text + "\n".join(str(r.args) for r in caplog.records)
    assert plaintext not in logged and near_miss not in logged
    assert plaintext[len(key["prefix"]):] not in logged


def test_last_used_at_written_then_throttled(client, mint, pg_engine):
    """last_used_at is set by a successful call and not rewritten by another within the interval."""
    key = mint()
    assert last_used(pg_engine, key["id"]) is None
    complete(client, key)
    first = last_used(pg_engine, key["id"])
    assert first is not None
    time.sleep(0.05)  # not a wait for anything: the wall clock ticks, so a rewrite would show
    complete(client, key)
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {key['key']}"}).status_code == 200
    assert last_used(pg_engine, key["id"]) == first


def test_last_used_at_rewritten_after_interval(clocked_app, clock, pg_engine):
    """After LAST_USED_WRITE_INTERVAL_S the next successful call writes a newer last_used_at
    (the app's clock is moved past the interval; nothing sleeps)."""
    interval = clocked_app.extensions["gateway"].settings.LAST_USED_WRITE_INTERVAL_S
    c = clocked_app.test_client()
    resp = c.post("/v1/api-keys", json={"name": "k"}, headers={"X-System-Secret": SYSTEM_SECRET})
    key = resp.get_json()
    complete(c, key)
    first = last_used(pg_engine, key["id"])
    assert first is not None
    clock.advance(interval - 0.1)
    complete(c, key)
    assert last_used(pg_engine, key["id"]) == first
    clock.advance(0.2)
    complete(c, key)
    assert last_used(pg_engine, key["id"]) > first


def test_failed_auth_does_not_touch_last_used(client, mint, pg_engine):
    """A refused call (model not allowed) does not count as use of the key."""
    key = mint(allowed_models=["demo"])
    resp = client.post("/v1/chat/completions", json={**CHAT, "model": "gpt-4o-mini"},
                       headers={"Authorization": f"Bearer {key['key']}"})
    assert resp.status_code == 403
    resp.close()
    assert last_used(pg_engine, key["id"]) is None


def test_models_list_openai_format(client, mint):
    """GET /v1/models answers the OpenAI list format; `demo` is owned by the simulator."""
    key = mint()
    resp = client.get("/v1/models", headers={"Authorization": f"Bearer {key['key']}"})
    assert resp.status_code == 200
    assert resp.mimetype == "application/json"
    body = resp.get_json()
    assert set(body) == {"object", "data"} and body["object"] == "list"
    ids = [m["id"] for m in body["data"]]
    assert "demo" in ids and "gpt-4o-mini" in ids and len(ids) == len(set(ids))
    for m in body["data"]:
        assert set(m) == {"id", "object", "created", "owned_by"}
        assert m["object"] == "model" and isinstance(m["created"], int) and isinstance(m["owned_by"], str)
    demo = next(m for m in body["data"] if m["id"] == "demo")
    assert "simulator" in demo["owned_by"]
    gpt = next(m for m in body["data"] if m["id"] == "gpt-4o-mini")
    assert "simulator" not in gpt["owned_by"]


def test_models_list_filtered_by_allowed_models(client, mint):
    """A key restricted to ["demo"] sees only demo in /v1/models."""
    key = mint(allowed_models=["demo"])
    resp = client.get("/v1/models", headers={"Authorization": f"Bearer {key['key']}"})
    assert resp.status_code == 200
    assert [m["id"] for m in resp.get_json()["data"]] == ["demo"]
