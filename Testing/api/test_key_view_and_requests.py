"""`GET /v1/key` (a key's own limits and headroom, read without reserving anything),
`GET /v1/requests` (the latest requests, cursor paging, scoped like /v1/usage), and a member
key reading itself through `GET /v1/api-keys/<own id>`."""
from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
import redis

from Testing.support import REDIS_URL
from app.extensions import db
from app.services.api_key_service import hash_key, lookup_key
from app.services.rate_limit_service import key_limits
from app.services.usage_service import UsageEvent, UsageWriter

pytestmark = pytest.mark.timeout(60)
UTC = timezone.utc


def auth(key: dict) -> dict:
    return {"Authorization": f"Bearer {key['key']}"}


def gateway(client):
    return client.application.extensions["gateway"]


def chat(client, key: dict, text: str = "hello there", max_tokens: int = 10) -> None:
    resp = client.post("/v1/chat/completions", headers=auth(key), json={
        "model": "gpt-4o-mini", "max_tokens": max_tokens, "messages": [{"role": "user", "content": text}]})
    assert resp.status_code == 200, resp.get_json()
    resp.close()
    gateway(client).limiter.flush(5)
    gateway(client).usage_batcher.flush(5)


def my_key(client, key: dict) -> dict:
    resp = client.get("/v1/key", headers=auth(key))
    assert resp.status_code == 200, resp.get_json()
    return resp.get_json()


# rpm 2: one request takes 30 s to come back, so a figure read right after it is not refilled yet.
LIMITED = dict(rpm_limit=2, tpm_limit=6000, daily_token_limit=50000, max_concurrent=3, budget_usd="1.00")


# --- GET /v1/key ----------------------------------------------------------------------------

def test_fresh_key_sees_its_limits_and_full_headroom(client, mint):
    """A new key: its settings, and every limit untouched (nothing used yet)."""
    key = mint(name="mine", tenant="acme", allowed_models=["gpt-4o-mini"], **LIMITED)
    body = my_key(client, key)
    assert (body["id"], body["name"], body["tenant"], body["role"]) == (key["id"], "mine", "acme", "member")
    assert body["allowed_models"] == ["gpt-4o-mini"] and body["expires_at"] is None
    assert "key" not in body and "key_hash" not in body
    room = body["headroom"]
    assert room["limiter_available"] is True
    assert room["requests_this_minute"] == {"limit": 2, "remaining": 2, "reset_ms": 0}
    assert room["tokens_this_minute"] == {"limit": 6000, "remaining": 6000, "reset_ms": 0}
    assert {k: room["tokens_today"][k] for k in ("limit", "used", "remaining")} == \
        {"limit": 50000, "used": 0, "remaining": 50000}
    assert room["concurrent_requests"] == {"limit": 3, "in_use": 0, "remaining": 3}
    assert {k: room["budget_this_month"][k] for k in ("limit_usd", "used_usd", "remaining_usd")} == \
        {"limit_usd": "1", "used_usd": "0", "remaining_usd": "1"}
    assert room["tenant_budget_this_month"]["limit_usd"] is None


def test_headroom_after_a_completion_and_peeking_reserves_nothing(client, mint):
    """One completion (9 prompt + 10 completion tokens at 0.15/0.60 per Mtok = $0.00000735) shows
    in every figure; reading /v1/key twice gives the same numbers (nothing reserved)."""
    key = mint(name="used", tenant="acme", **LIMITED)
    chat(client, key)
    first, second = my_key(client, key)["headroom"], my_key(client, key)["headroom"]
    for room in (first, second):
        assert room["requests_this_minute"]["remaining"] == 1
        assert room["tokens_today"]["used"] == 19 and room["tokens_today"]["remaining"] == 49981
        assert room["budget_this_month"]["used_usd"] == "0.00000735"
        assert room["budget_this_month"]["remaining_usd"] == "0.99999265"
        assert room["concurrent_requests"]["in_use"] == 0
        tpm = room["tokens_this_minute"]  # refills 100 tokens/s: what is missing is what the reset waits for
        assert tpm["remaining"] + -(-tpm["reset_ms"] // 10) == 6000


def test_concurrency_in_use_counts_running_requests(client, mint):
    """A request holding a concurrency slot shows as in use (a real reservation in Redis)."""
    key = mint(name="busy", tenant="acme", max_concurrent=2)
    with client.application.app_context():
        info = lookup_key(lambda: db.session, gateway(client).key_cache, hash_key(key["key"]))
    adm = gateway(client).limiter.admit(key_limits(info), "req_" + uuid.uuid4().hex, 0, 0)
    assert my_key(client, key)["headroom"]["concurrent_requests"] == {"limit": 2, "in_use": 1, "remaining": 1}
    gateway(client).limiter.settle(adm, 0, 0)
    gateway(client).limiter.flush(5)
    assert my_key(client, key)["headroom"]["concurrent_requests"]["in_use"] == 0


def test_day_and_month_figures_come_from_usage_rows_when_redis_lost_them(client, mint):
    """Redis emptied (a restart without persistence): today's tokens and the month's spend are
    read from the usage rows instead, so they still show what was used."""
    key = mint(name="lost", tenant="acme", **LIMITED)
    chat(client, key)
    client_ = redis.Redis.from_url(REDIS_URL)
    client_.flushdb()
    client_.close()
    room = my_key(client, key)["headroom"]
    assert room["tokens_today"]["used"] == 19
    assert room["budget_this_month"]["used_usd"] == "0.00000735"
    assert room["requests_this_minute"]["remaining"] == 2  # the minute's counter went with Redis


def test_key_view_needs_a_key(client, admin_headers):
    """The system secret is not a key (400 saying what to use); no credentials is a 401."""
    resp = client.get("/v1/key", headers=admin_headers)
    assert resp.status_code == 400 and resp.get_json()["error"]["code"] == "key_required"
    resp = client.get("/v1/key")
    assert resp.status_code == 401 and resp.get_json()["error"]["code"] == "invalid_api_key"


def test_member_reads_itself_but_not_another_key(client, mint):
    """GET /v1/api-keys/<own id> works for a member key; another key of its tenant is 403."""
    member, other = mint(name="me", tenant="acme"), mint(name="other", tenant="acme")
    resp = client.get(f"/v1/api-keys/{member['id']}", headers=auth(member))
    assert resp.status_code == 200 and resp.get_json()["name"] == "me"
    resp = client.get(f"/v1/api-keys/{other['id']}", headers=auth(member))
    assert resp.status_code == 403 and resp.get_json()["error"]["code"] == "admin_required"


# --- GET /v1/requests -----------------------------------------------------------------------

T0 = datetime(2026, 10, 5, 12, 0, tzinfo=UTC)


def seed(engine, key: dict, n: int, start: datetime = T0, **fields) -> list[str]:
    """n usage rows for `key`, one a minute from `start`; returns their request ids, oldest first."""
    ids = [f"req_{key['id']}_{i:03d}_{uuid.uuid4().hex[:6]}" for i in range(n)]
    events = [UsageEvent(request_id=rid, tenant_id=key["tenant_id"], api_key_id=key["id"],
                         model=fields.get("model", "gpt-4o-mini"), provider="openai",
                         prompt_tokens=10 + i, completion_tokens=5, cost_usd=Decimal("0.0001"),
                         status=fields.get("status", "ok"), latency_ms=100 + i, ttft_ms=20 + i,
                         endpoint=fields.get("endpoint", "chat.completions"),
                         streamed=True, created_at=start + timedelta(minutes=i))
              for i, rid in enumerate(ids)]
    assert UsageWriter(engine).write(events) == n
    return ids


def page(client, headers: dict, **params):
    qs = "&".join(f"{k}={v}" for k, v in params.items())
    return client.get("/v1/requests" + (f"?{qs}" if qs else ""), headers=headers)


def test_requests_page_newest_first_with_a_cursor(client, mint, clean_db):
    """Five rows, pages of two: 2 + 2 + 1, newest first, no row twice, the last page says no more."""
    key = mint(name="pager", tenant="acme")
    ids = seed(clean_db, key, 5)
    seen, cursor, pages = [], None, 0
    while True:
        resp = page(client, auth(key), limit=2, **({"cursor": cursor} if cursor else {}))
        assert resp.status_code == 200, resp.get_json()
        body = resp.get_json()
        pages += 1
        seen += [row["request_id"] for row in body["data"]]
        if not body["has_more"]:
            assert body["next_cursor"] is None
            break
        cursor = body["next_cursor"]
    assert pages == 3
    assert seen == list(reversed(ids))
    first = page(client, auth(key), limit=1).get_json()["data"][0]
    assert first == {
        "object": "request", "request_id": ids[4], "created_at": "2026-10-05T12:04:00.000Z",
        "model": "gpt-4o-mini", "endpoint": "chat.completions", "provider": "openai", "status": "ok",
        "error_type": None, "streamed": True, "prompt_tokens": 14, "completion_tokens": 5,
        "total_tokens": 19, "cost_usd": "0.0001", "latency_ms": 104, "ttft_ms": 24, "cache_hit": False,
        "saved_cost_usd": None,
        "api_key_id": key["id"], "api_key_name": "pager", "tenant_id": key["tenant_id"], "tenant_name": "acme"}


def test_requests_filters(client, mint, clean_db):
    """`status`, `model`, `endpoint`, `request_id` and the start/end period narrow the list."""
    key = mint(name="filters", tenant="acme")
    ok_ids = seed(clean_db, key, 3)
    gone = seed(clean_db, key, 2, start=T0 + timedelta(hours=1), status="client_disconnected", model="demo",
                endpoint="responses")
    body = page(client, auth(key), status="client_disconnected").get_json()
    assert [r["request_id"] for r in body["data"]] == list(reversed(gone))
    assert [r["request_id"] for r in page(client, auth(key), model="gpt-4o-mini").get_json()["data"]] == \
        list(reversed(ok_ids))
    assert [r["request_id"] for r in page(client, auth(key), request_id=ok_ids[1]).get_json()["data"]] == [ok_ids[1]]
    assert [r["request_id"] for r in page(client, auth(key), endpoint="responses").get_json()["data"]] == \
        list(reversed(gone))
    body = page(client, auth(key), start="2026-10-05T12:01:00Z", end="2026-10-05T12:02:00Z").get_json()
    assert [r["request_id"] for r in body["data"]] == [ok_ids[1]]


def test_requests_scoping(client, mint, clean_db, admin_headers):
    """A member sees its own rows only (asking for another key's is 403); a tenant admin sees its
    tenant's rows and not another tenant's; the system secret sees all, or one tenant's."""
    member, neighbour = mint(name="m", tenant="acme"), mint(name="n", tenant="acme")
    admin = mint(name="boss", tenant="acme", role="admin")
    stranger = mint(name="s", tenant="globex")
    mine, theirs = seed(clean_db, member, 2), seed(clean_db, neighbour, 2, start=T0 + timedelta(hours=1))
    far = seed(clean_db, stranger, 1, start=T0 + timedelta(hours=2))

    def ids(headers, **params):  # within the seeded period: rows other tests' gateways write are not
        resp = page(client, headers, start="2026-10-05T00:00:00Z", end="2026-10-06T00:00:00Z", **params)
        assert resp.status_code == 200, resp.get_json()
        return set(r["request_id"] for r in resp.get_json()["data"])

    assert ids(auth(member)) == set(mine)
    resp = page(client, auth(member), api_key_id=neighbour["id"])
    assert resp.status_code == 403 and resp.get_json()["error"]["param"] == "api_key_id"
    assert page(client, auth(member), tenant="acme").status_code == 403
    assert ids(auth(admin)) == set(mine) | set(theirs)
    assert ids(auth(admin), api_key_id=neighbour["id"]) == set(theirs)
    assert page(client, auth(admin), api_key_id=stranger["id"]).status_code == 404
    assert page(client, auth(admin), tenant="globex").status_code == 404
    assert ids(admin_headers) == set(mine) | set(theirs) | set(far)
    assert ids(admin_headers, tenant="globex") == set(far)
    # everyone's rows are merged from each tenant's newest rows: still one order, and a cursor
    # pages across tenants without skipping or repeating a row
    period = {"start": "2026-10-05T00:00:00Z", "end": "2026-10-06T00:00:00Z"}
    seen, cursor = [], None
    while True:
        body = page(client, admin_headers, limit=2, **period, **({"cursor": cursor} if cursor else {})).get_json()
        seen += [r["request_id"] for r in body["data"]]
        if not (cursor := body["next_cursor"]):
            break
    assert seen == [*far, *reversed(theirs), *reversed(mine)]
    assert page(client, {}).status_code == 401


def test_requests_bad_parameters_are_400(client, mint):
    """A cursor this endpoint did not make, a limit out of range, an unknown parameter: 400."""
    key = mint(name="bad", tenant="acme")
    for params, param in (({"cursor": "not-a-cursor"}, "cursor"), ({"limit": 0}, "limit"),
                          ({"limit": 101}, "limit"), ({"colour": "red"}, "colour"),
                          ({"start": "2026-10-02T00:00:00Z", "end": "2026-10-01T00:00:00Z"}, "end")):
        resp = page(client, auth(key), **params)
        assert resp.status_code == 400, (params, resp.get_json())
        assert resp.get_json()["error"]["param"] == param
