"""`GET/POST /v1/usage`: the caller's own usage over a period, exact money, grouping by model
and UTC day, strict parameters; and idempotent usage writes."""
from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from urllib.parse import quote

import pytest
from sqlalchemy import create_engine, text

from Testing.conftest import app_config, usage_rows
from app.services.usage_service import UsageEvent, UsageWriter, month_bounds

pytestmark = pytest.mark.timeout(60)

UTC = timezone.utc
KEYS = {"object", "start", "end", "requests", "prompt_tokens", "completion_tokens", "total_tokens",
        "cost_usd", "cache_hits", "saved_cost_usd", "data"}


def at(*args) -> datetime:
    return datetime(*args, tzinfo=UTC)


def add_rows(engine, key: dict, *rows: dict) -> None:
    """Insert usage rows for `key` (each row: created_at, optional model/tokens/cost/request_id)."""
    events = []
    for r in rows:
        r = dict(r)
        events.append(UsageEvent(
            request_id=r.pop("request_id", "req_" + uuid.uuid4().hex),
            tenant_id=key["tenant_id"], api_key_id=key["id"], model=r.pop("model", "gpt-4o-mini"),
            provider="openai", upstream_model="gpt-4o-mini",
            prompt_tokens=r.pop("prompt", 10), completion_tokens=r.pop("completion", 5),
            cost_usd=Decimal(r.pop("cost", "0.000001")), created_at=r.pop("created_at"), **r))
    assert UsageWriter(engine).write(events) == len(events)


def auth(key: dict) -> dict:
    return {"Authorization": f"Bearer {key['key']}"}


def get_usage(client, key: dict, **params):
    qs = "&".join(f"{k}={quote(str(v), safe='')}" for k, v in params.items())
    return client.get("/v1/usage" + (f"?{qs}" if qs else ""), headers=auth(key))


def ok(resp) -> dict:
    assert resp.status_code == 200, resp.get_json()
    body = resp.get_json()
    assert set(body) == KEYS
    assert body["object"] == "usage"
    assert isinstance(body["cost_usd"], str)
    return body


JAN = {"start": "2024-01-01T00:00:00Z", "end": "2024-02-01T00:00:00Z"}


@pytest.fixture
def key(mint) -> dict:
    return mint(name="usage-key", tenant="acme")


# --- shape and default period -----------------------------------------------------------------

def test_get_defaults_to_current_utc_month(client, key, clean_db):
    """Without start/end the period is the current UTC calendar month; last month's rows are excluded."""
    start, end = month_bounds()
    add_rows(clean_db, key,
             {"created_at": start, "prompt": 1, "completion": 2, "cost": "0.25"},           # first instant: in
             {"created_at": datetime.now(UTC), "prompt": 10, "completion": 20, "cost": "0.5"},
             {"created_at": start - timedelta(microseconds=1), "prompt": 1000, "cost": "9"},  # last month
             {"created_at": start - timedelta(days=20), "prompt": 1000, "cost": "9"},
             {"created_at": end, "prompt": 1000, "cost": "9"})                               # next month
    body = ok(get_usage(client, key))
    assert body["start"] == start.isoformat().replace("+00:00", "Z")
    assert body["end"] == end.isoformat().replace("+00:00", "Z")
    assert body["start"].endswith("-01T00:00:00Z") and body["end"].endswith("-01T00:00:00Z")
    assert (body["requests"], body["prompt_tokens"], body["completion_tokens"], body["total_tokens"]) == \
        (2, 11, 22, 33)
    assert body["cost_usd"] == "0.75"
    assert body["data"] == []


def test_post_without_body_defaults_to_current_month(client, key, clean_db):
    """POST with no body is the same query as GET with no parameters."""
    add_rows(clean_db, key, {"created_at": datetime.now(UTC)})
    assert ok(client.post("/v1/usage", headers=auth(key))) == ok(get_usage(client, key))


def test_post_json_body_equals_get_query(client, key, clean_db):
    """POST with a JSON body answers exactly like GET with the same query parameters."""
    add_rows(clean_db, key, {"created_at": at(2024, 1, 5), "model": "a"},
             {"created_at": at(2024, 1, 6), "model": "b"})
    params = {**JAN, "group_by": "model", "model": "a"}
    posted = ok(client.post("/v1/usage", json=params, headers=auth(key)))
    assert posted == ok(get_usage(client, key, **params))
    assert posted["requests"] == 1


def test_empty_period_is_zero(client, key, clean_db):
    """A period with no rows gives zero totals, cost "0" and no groups."""
    body = ok(get_usage(client, key, group_by="day", **JAN))
    assert (body["requests"], body["prompt_tokens"], body["completion_tokens"], body["total_tokens"],
            body["cost_usd"], body["data"]) == (0, 0, 0, 0, "0", [])


# --- filters ----------------------------------------------------------------------------------

def test_start_inclusive_end_exclusive(client, key, clean_db):
    """start is inclusive, end is exclusive (to the microsecond)."""
    add_rows(clean_db, key,
             {"created_at": at(2024, 1, 1) - timedelta(microseconds=1), "prompt": 1000},
             {"created_at": at(2024, 1, 1), "prompt": 1, "completion": 0},
             {"created_at": at(2024, 1, 31, 23, 59, 59, 999999), "prompt": 2, "completion": 0},
             {"created_at": at(2024, 2, 1), "prompt": 1000})
    body = ok(get_usage(client, key, **JAN))
    assert body["start"] == "2024-01-01T00:00:00Z" and body["end"] == "2024-02-01T00:00:00Z"
    assert (body["requests"], body["prompt_tokens"]) == (2, 3)


def test_naive_datetimes_are_utc_and_offsets_converted(client, key, clean_db):
    """A datetime without offset is UTC; one with an offset is converted to UTC."""
    add_rows(clean_db, key, {"created_at": at(2024, 3, 1, 12), "prompt": 7})
    naive = ok(get_usage(client, key, start="2024-03-01T00:00:00", end="2024-03-02T00:00:00"))
    assert naive["start"] == "2024-03-01T00:00:00Z" and naive["requests"] == 1
    # 13:00+02:00 is 11:00Z and 14:00+02:00 is 12:00Z: the row (12:00Z) is at end, excluded
    shifted = ok(client.post("/v1/usage", json={"start": "2024-03-01T13:00:00+02:00",
                                                "end": "2024-03-01T14:00:00+02:00"}, headers=auth(key)))
    assert shifted["start"] == "2024-03-01T11:00:00Z" and shifted["end"] == "2024-03-01T12:00:00Z"
    assert shifted["requests"] == 0
    inside = ok(get_usage(client, key, start="2024-03-01T13:30:00+02:00", end="2024-03-01T14:30:00+02:00"))
    assert inside["requests"] == 1


def test_model_filter(client, key, clean_db):
    """`model` restricts the totals to that model alias."""
    add_rows(clean_db, key, {"created_at": at(2024, 1, 2), "model": "gpt-4o-mini", "prompt": 3},
             {"created_at": at(2024, 1, 3), "model": "gpt-4o-mini", "prompt": 4},
             {"created_at": at(2024, 1, 3), "model": "demo", "prompt": 100})
    body = ok(get_usage(client, key, model="gpt-4o-mini", **JAN))
    assert (body["requests"], body["prompt_tokens"]) == (2, 7)
    assert ok(get_usage(client, key, model="nope", **JAN))["requests"] == 0


# --- grouping ---------------------------------------------------------------------------------

def assert_groups_sum_to_totals(body: dict) -> None:
    for field in ("requests", "prompt_tokens", "completion_tokens", "total_tokens", "cache_hits"):
        assert sum(g[field] for g in body["data"]) == body[field], field
    for field in ("cost_usd", "saved_cost_usd"):
        assert sum(Decimal(g[field]) for g in body["data"]) == Decimal(body[field]), field


def test_group_by_model(client, key, clean_db):
    """group_by=model gives one group per model with its own sums, which add up to the totals."""
    add_rows(clean_db, key,
             {"created_at": at(2024, 1, 2), "model": "b", "prompt": 1, "completion": 2, "cost": "0.1"},
             {"created_at": at(2024, 1, 3), "model": "a", "prompt": 10, "completion": 20, "cost": "0.2"},
             {"created_at": at(2024, 1, 4), "model": "b", "prompt": 100, "completion": 200, "cost": "0.3"})
    body = ok(get_usage(client, key, group_by="model", **JAN))
    assert body["data"] == [
        {"model": "a", "requests": 1, "prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30,
         "cost_usd": "0.2", "cache_hits": 0, "saved_cost_usd": "0"},
        {"model": "b", "requests": 2, "prompt_tokens": 101, "completion_tokens": 202, "total_tokens": 303,
         "cost_usd": "0.4", "cache_hits": 0, "saved_cost_usd": "0"},
    ]
    assert body["cost_usd"] == "0.6"
    assert_groups_sum_to_totals(body)


def test_cache_hits_and_saved_cost_from_the_rollup_and_the_edges(client, key, clean_db):
    """Response cache hits (`cached` rows, 0 cost, `saved_cost_usd`) are counted and their
    saved cost summed, from the rollup for whole days and from raw rows for the partial last
    day; a replayed row adds nothing (the writer is idempotent on the request id)."""
    hit = {"cached": True, "prompt": 0, "completion": 0, "cost": "0", "saved_cost_usd": Decimal("0.25")}
    add_rows(clean_db, key,
             {"created_at": at(2024, 1, 2), "prompt": 10, "completion": 20, "cost": "0.25"},
             {"created_at": at(2024, 1, 2, 1), "request_id": "req_hit_1", **hit},
             {"created_at": at(2024, 1, 3, 12), **hit, "saved_cost_usd": Decimal("0.5")})
    replay = UsageEvent(request_id="req_hit_1", tenant_id=key["tenant_id"], api_key_id=key["id"], model="gpt-4o-mini",
                        cached=True, saved_cost_usd=Decimal("0.25"), created_at=at(2024, 1, 2, 1))
    assert UsageWriter(clean_db).write([replay]) == 0
    body = ok(get_usage(client, key, group_by="day", start="2024-01-01T00:00:00Z", end="2024-01-03T18:00:00Z"))
    assert (body["requests"], body["cache_hits"], body["saved_cost_usd"], body["cost_usd"]) == (3, 2, "0.75", "0.25")
    assert [(d["day"], d["cache_hits"], d["saved_cost_usd"]) for d in body["data"]] == \
        [("2024-01-02", 1, "0.25"), ("2024-01-03", 1, "0.5")]
    assert_groups_sum_to_totals(body)
    csv_text = get_usage(client, key, group_by="day", format="csv", start="2024-01-01T00:00:00Z",
                         end="2024-01-03T18:00:00Z").get_data(as_text=True)
    assert csv_text.splitlines() == [
        "day,requests,prompt_tokens,completion_tokens,total_tokens,cost_usd,cache_hits,saved_cost_usd",
        "2024-01-02,2,10,20,30,0.25,1,0.25", "2024-01-03,1,0,0,0,0,1,0.5"]


def test_group_by_endpoint_exact_from_the_rollup_and_the_edges(client, key, clean_db):
    """group_by=endpoint: whole days come from the rollup (keyed by endpoint since migration
    0005_usage_endpoint) and the partial last day from raw rows; both keep the endpoints apart."""
    add_rows(clean_db, key,
             {"created_at": at(2024, 1, 2), "prompt": 1, "completion": 2, "cost": "0.1"},
             {"created_at": at(2024, 1, 2, 5), "endpoint": "uptime", "prompt": 10, "completion": 1, "cost": "0.2"},
             {"created_at": at(2024, 1, 3, 12), "endpoint": "uptime", "prompt": 100, "completion": 1, "cost": "0.3"})
    body = ok(get_usage(client, key, group_by="endpoint", start="2024-01-01T00:00:00Z", end="2024-01-03T18:00:00Z"))
    assert body["data"] == [
        {"endpoint": "chat.completions", "requests": 1, "prompt_tokens": 1, "completion_tokens": 2,
         "total_tokens": 3, "cost_usd": "0.1", "cache_hits": 0, "saved_cost_usd": "0"},
        {"endpoint": "uptime", "requests": 2, "prompt_tokens": 110, "completion_tokens": 2, "total_tokens": 112,
         "cost_usd": "0.5", "cache_hits": 0, "saved_cost_usd": "0"},
    ]
    csv_text = get_usage(client, key, group_by="endpoint", format="csv", **JAN).get_data(as_text=True)
    assert csv_text.splitlines()[1:] == ["chat.completions,1,1,2,3,0.1,0,0", "uptime,2,110,2,112,0.5,0,0"]


DAY_ROWS = [
    {"created_at": at(2024, 3, 10, 0, 0, 0), "prompt": 1, "completion": 1, "cost": "0.01"},
    {"created_at": at(2024, 3, 10, 23, 59, 59), "prompt": 2, "completion": 2, "cost": "0.02"},
    {"created_at": at(2024, 3, 11, 0, 0, 0), "prompt": 4, "completion": 4, "cost": "0.04"},
    {"created_at": datetime(2024, 3, 11, 1, 30, tzinfo=timezone(timedelta(hours=5))),  # 10th 20:30Z
     "prompt": 8, "completion": 8, "cost": "0.08"},
]


def check_day_groups(body: dict) -> None:
    assert [g["day"] for g in body["data"]] == ["2024-03-10", "2024-03-11"]
    d10, d11 = body["data"]
    assert (d10["requests"], d10["prompt_tokens"], d10["total_tokens"], d10["cost_usd"]) == (3, 11, 22, "0.11")
    assert (d11["requests"], d11["prompt_tokens"], d11["total_tokens"], d11["cost_usd"]) == (1, 4, 8, "0.04")
    assert_groups_sum_to_totals(body)


def test_group_by_day_uses_utc_days(client, key, clean_db):
    """group_by=day splits at UTC midnight: 23:59:59Z and 00:00:00Z next day are different days."""
    add_rows(clean_db, key, *DAY_ROWS)
    check_day_groups(ok(get_usage(client, key, group_by="day", start="2024-03-01T00:00:00Z",
                                  end="2024-04-01T00:00:00Z")))


def test_group_by_day_is_utc_whatever_the_database_session_timezone(pg_url, models_file, key, clean_db):
    """Day groups are UTC days even when the database session runs in UTC+14."""
    from app import create_app
    from app.extensions import db
    tz_url = pg_url + "?options=" + quote("-c TimeZone=Pacific/Kiritimati", safe="")
    other = create_app(app_config(tz_url, models_file))
    try:
        engine = other.extensions["gateway"].engine
        with engine.connect() as conn:
            assert conn.execute(text("SHOW TimeZone")).scalar() == "Pacific/Kiritimati"
        add_rows(engine, key, *DAY_ROWS)
        body = ok(get_usage(other.test_client(), key, group_by="day", start="2024-03-01T00:00:00Z",
                            end="2024-04-01T00:00:00Z"))
        check_day_groups(body)
        # the same period boundaries as a UTC session
        narrow = ok(get_usage(other.test_client(), key, start="2024-03-11T00:00:00Z",
                              end="2024-03-12T00:00:00Z"))
        assert narrow["requests"] == 1
    finally:
        other.extensions["gateway"].providers.close()
        with other.app_context():
            db.engine.dispose()


def test_group_by_with_model_filter(client, key, clean_db):
    """group_by=day combined with model only groups that model's rows."""
    add_rows(clean_db, key, {"created_at": at(2024, 1, 2), "model": "a"},
             {"created_at": at(2024, 1, 2), "model": "b"}, {"created_at": at(2024, 1, 3), "model": "a"})
    body = ok(get_usage(client, key, group_by="day", model="a", **JAN))
    assert [(g["day"], g["requests"]) for g in body["data"]] == [("2024-01-02", 1), ("2024-01-03", 1)]


# --- money ------------------------------------------------------------------------------------

@pytest.mark.parametrize("costs,expected", [
    (["0.0000001"] * 3, "0.0000003"),
    (["0.1", "0.2"], "0.3"),
    (["0.0000000375"], "0.0000000375"),
    (["12.5", "0.0000000001"], "12.5000000001"),
    (["100", "200"], "300"),
    (["0", "0"], "0"),
])
def test_money_is_an_exact_decimal_string(client, key, clean_db, costs, expected):
    """cost_usd is an exact decimal string (no float rounding, no exponent), in totals and groups."""
    add_rows(clean_db, key, *({"created_at": at(2024, 1, 2), "cost": c} for c in costs))
    body = ok(get_usage(client, key, group_by="model", **JAN))
    assert body["cost_usd"] == expected
    assert body["data"][0]["cost_usd"] == expected


# --- isolation --------------------------------------------------------------------------------

def test_a_key_never_sees_other_keys_rows(client, mint, clean_db):
    """Each key sees only its own rows: not another key of its tenant, not another tenant's key."""
    k1 = mint(name="k1", tenant="acme")
    k2 = mint(name="k2", tenant="acme")
    k3 = mint(name="k3", tenant="globex")
    assert k1["tenant_id"] == k2["tenant_id"] != k3["tenant_id"]
    add_rows(clean_db, k1, {"created_at": at(2024, 1, 2), "prompt": 1, "cost": "0.001"})
    add_rows(clean_db, k2, *({"created_at": at(2024, 1, 2), "prompt": 10, "cost": "0.01"} for _ in range(2)))
    add_rows(clean_db, k3, *({"created_at": at(2024, 1, 2), "prompt": 100, "cost": "0.1"} for _ in range(3)))
    for k, requests, prompt, cost in ((k1, 1, 1, "0.001"), (k2, 2, 20, "0.02"), (k3, 3, 300, "0.3")):
        for group_by in ("model", "day"):
            body = ok(get_usage(client, k, group_by=group_by, **JAN))
            assert (body["requests"], body["prompt_tokens"], body["cost_usd"]) == (requests, prompt, cost)
            assert sum(g["requests"] for g in body["data"]) == requests
        posted = ok(client.post("/v1/usage", json=JAN, headers=auth(k)))
        assert posted["requests"] == requests


def test_query_parameters_cannot_widen_the_scope(client, mint, clean_db):
    """A member key cannot read other rows through parameters: another key's api_key_id or any
    tenant is 403, an unknown parameter such as tenant_id is 400."""
    k1, k2 = mint(name="k1"), mint(name="k2")
    add_rows(clean_db, k2, {"created_at": at(2024, 1, 2)})
    for field, value, status in (("api_key_id", k2["id"], 403), ("tenant", "acme", 403),
                                 ("tenant_id", k2["tenant_id"], 400)):
        resp = get_usage(client, k1, **{field: value}, **JAN)
        assert resp.status_code == status, resp.get_json()
        assert resp.get_json()["error"]["param"] == field
    assert ok(get_usage(client, k1, api_key_id=k1["id"], **JAN))["requests"] == 0


# --- invalid requests -------------------------------------------------------------------------

@pytest.mark.parametrize("params,param", [
    ({"group_by": "week"}, "group_by"),
    ({"group_by": ""}, "group_by"),
    ({"start": "yesterday"}, "start"),
    ({"start": "2024-13-01T00:00:00Z"}, "start"),
    ({"end": "not-a-date"}, "end"),
    ({"model": ""}, "model"),
    ({"bogus": "1"}, "bogus"),
])
def test_invalid_parameters_are_400_with_param(client, key, params, param):
    """Invalid group_by, start, end, model or an unknown parameter is a 400 naming the parameter."""
    for resp in (get_usage(client, key, **params), client.post("/v1/usage", json=params, headers=auth(key))):
        assert resp.status_code == 400, resp.get_json()
        err = resp.get_json()["error"]
        assert err["param"] == param
        assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize("start,end", [("2024-02-01T00:00:00Z", "2024-01-01T00:00:00Z"),
                                       ("2024-01-01T00:00:00Z", "2024-01-01T00:00:00Z"),
                                       ("2024-01-01T02:00:00+02:00", "2024-01-01T00:00:00Z")])
def test_end_not_after_start_is_400(client, key, start, end):
    """end <= start (also equal instants written with different offsets) is a 400 with param 'end'."""
    resp = client.post("/v1/usage", json={"start": start, "end": end}, headers=auth(key))
    assert resp.status_code == 400
    assert resp.get_json()["error"]["param"] == "end"


def test_only_end_before_default_start_is_400(client, key):
    """An explicit end before the default start (this month) is rejected too."""
    resp = get_usage(client, key, end="2000-01-01T00:00:00Z")
    assert resp.status_code == 400 and resp.get_json()["error"]["param"] == "end"


@pytest.mark.parametrize("body", [b"[]", b"not json", b'"x"'])
def test_post_body_must_be_a_json_object(client, key, body):
    """A POST body that is not a JSON object is a 400."""
    resp = client.post("/v1/usage", data=body, headers={**auth(key), "Content-Type": "application/json"})
    assert resp.status_code == 400
    assert resp.get_json()["error"]["type"] == "invalid_request_error"


def test_wrong_json_types_are_400(client, key):
    """Non-string values (numbers, booleans) are rejected rather than coerced."""
    for body, param in (({"model": 5}, "model"), ({"group_by": True}, "group_by"), ({"start": 1700000000}, "start")):
        resp = client.post("/v1/usage", json=body, headers=auth(key))
        assert resp.status_code == 400, (body, resp.get_json())
        assert resp.get_json()["error"]["param"] == param


# --- authentication ---------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["get", "post"])
def test_unauthenticated_is_401(client, key, method, admin_headers):
    """No key or a wrong key is a 401 with WWW-Authenticate; a wrong system secret is a 401 too
    (the right one reads everyone's usage, see Testing/api/test_tenancy_usage.py)."""
    for headers in ({}, {"Authorization": "Bearer sk-not-a-real-key"}, {"Authorization": key["key"]}):
        resp = getattr(client, method)("/v1/usage", headers=headers)
        assert resp.status_code == 401, (headers, resp.get_json())
        assert resp.headers.get("WWW-Authenticate") == "Bearer"
        assert resp.get_json()["error"]["code"] == "invalid_api_key"
    resp = getattr(client, method)("/v1/usage", headers={"X-System-Secret": "wrong", **auth(key)})
    assert resp.status_code == 401 and resp.get_json()["error"]["code"] == "invalid_system_secret"


def test_revoked_key_is_401(client, key, admin_headers):
    """A revoked key can no longer read its usage."""
    assert get_usage(client, key).status_code == 200
    assert client.delete(f"/v1/api-keys/{key['id']}", headers=admin_headers).status_code == 200
    assert get_usage(client, key).status_code == 401


# --- writer -----------------------------------------------------------------------------------

def events_same_request(key: dict) -> tuple[UsageEvent, UsageEvent]:
    first = UsageEvent(request_id="req_same", tenant_id=key["tenant_id"], api_key_id=key["id"],
                       model="gpt-4o-mini", prompt_tokens=10, completion_tokens=5,
                       cost_usd=Decimal("0.0000045"), created_at=at(2024, 1, 2))
    # A replay carries the event's own created_at (fixed when the request started, kept in the
    # outbox): (request_id, created_at) is the idempotency key of the partitioned table.
    replay = UsageEvent(request_id="req_same", tenant_id=key["tenant_id"], api_key_id=key["id"],
                        model="gpt-4o-mini", prompt_tokens=999, completion_tokens=999,
                        cost_usd=Decimal("9"), created_at=at(2024, 1, 2))
    return first, replay


def test_usage_writer_is_idempotent_on_request_id(key, clean_db):
    """Writing the same event (request_id, created_at) twice stores one row, and the first write's
    figures stay."""
    writer = UsageWriter(clean_db)
    first, replay = events_same_request(key)
    writer.write([first])
    writer.write([replay])
    writer.write([first, replay])
    rows = usage_rows(clean_db, "request_id = :r", {"r": "req_same"})
    assert len(rows) == 1
    row = rows[0]
    assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == (10, 5, 15)
    assert row["cost_usd"] == Decimal("0.0000045")
    assert row["created_at"] == at(2024, 1, 2)


def test_usage_writer_duplicates_within_one_batch_stored_once(key, clean_db):
    """A batch holding the same request_id twice stores it once; the other rows are stored."""
    ev = lambda rid: UsageEvent(request_id=rid, tenant_id=key["tenant_id"], api_key_id=key["id"],  # noqa: E731
                                model="m", created_at=at(2024, 1, 2))
    UsageWriter(clean_db).write([ev("r1"), ev("r1"), ev("r2")])
    assert [r["request_id"] for r in usage_rows(clean_db)] == ["r1", "r2"]


def test_usage_writer_stores_tricky_values_exactly(pg_url, clean_db):
    """The batch travels as one JSON text that PostgreSQL expands: money keeps every digit (no
    float on the way; only the column's scale of 10 rounds), instants keep their microseconds (a
    naive one means UTC whatever the session's time zone), None stays NULL, bigints past 2**53,
    booleans and awkward strings arrive as sent; a request twice in a batch or again in a later
    batch is stored once and adds nothing to the daily rollup."""
    odd_tz = create_engine(pg_url, connect_args={"options": "-c TimeZone=Pacific/Chatham"})
    big = 9007199254740993  # 2**53 + 1: a double would make it ...992
    model = 'm\u00e8 "q" \\ \U0001F600'
    first = UsageEvent(request_id="req_a", tenant_id=big, api_key_id=big, model=model, provider=None,
                       prompt_tokens=2_000_000_000, completion_tokens=147_483_647,
                       cost_usd=Decimal("1234567890.0123456789"), streamed=True, cached=True,
                       usage_estimated=True, saved_cost_usd=Decimal("0.000000123456789012"),
                       created_at=datetime(2026, 1, 31, 23, 59, 59, 999999,
                                           tzinfo=timezone(timedelta(hours=-9, minutes=-30))))
    naive = UsageEvent(request_id="req_b", tenant_id=7, api_key_id=8, model="m", provider="openai",
                       upstream_model="up", prompt_tokens=3, completion_tokens=4, cost_usd=Decimal("0.0000000001"),
                       status="error", error_type="upstream_timeout", latency_ms=0, ttft_ms=12,
                       created_at=datetime(2026, 1, 31, 23, 59, 59, 999999), cached_tokens=0,
                       cache_write_tokens=5, reasoning_tokens=6)
    twice = UsageEvent(request_id="req_a", tenant_id=1, api_key_id=1, model="x", cost_usd=Decimal("9"),
                       created_at=first.created_at)
    later = UsageEvent(request_id="req_c", tenant_id=7, api_key_id=8, model="m", prompt_tokens=1,
                       cost_usd=Decimal("0.1"), created_at=datetime(2026, 1, 31, 0, 0, tzinfo=UTC))
    replay = UsageEvent(request_id="req_b", tenant_id=7, api_key_id=8, model="m", prompt_tokens=100,
                        cost_usd=Decimal("5"), created_at=naive.created_at)
    try:
        writer = UsageWriter(odd_tz)
        assert writer.write([first, naive, twice]) == 2
        assert writer.write([replay, later, twice]) == 1
    finally:
        odd_tz.dispose()
    cols = ("request_id", "tenant_id", "api_key_id", "model", "provider", "upstream_model", "prompt_tokens",
            "completion_tokens", "total_tokens", "cost_usd", "status", "error_type", "streamed", "cached",
            "latency_ms", "ttft_ms", "created_at", "endpoint", "cached_tokens", "cache_write_tokens",
            "reasoning_tokens", "usage_estimated", "saved_cost_usd")
    assert [tuple(r[c] for c in cols) for r in usage_rows(clean_db)] == [
        ("req_a", 9007199254740993, 9007199254740993, 'm\u00e8 "q" \\ \U0001F600', None, None, 2000000000,
         147483647, 2147483647, Decimal("1234567890.0123456789"), "ok", None, True, True, None, None,
         datetime(2026, 2, 1, 9, 29, 59, 999999, tzinfo=UTC), "chat.completions", None, None, None, True,
         Decimal("0.0000001235")),
        ("req_b", 7, 8, "m", "openai", "up", 3, 4, 7, Decimal("0.0000000001"), "error", "upstream_timeout",
         False, False, 0, 12, datetime(2026, 1, 31, 23, 59, 59, 999999, tzinfo=UTC), "chat.completions",
         0, 5, 6, False, None),
        ("req_c", 7, 8, "m", None, None, 1, 0, 1, Decimal("0.1000000000"), "ok", None, False, False, None, None,
         datetime(2026, 1, 31, tzinfo=UTC), "chat.completions", None, None, None, False, None)]
    with clean_db.connect() as conn:
        daily = conn.execute(text("SELECT day::text, tenant_id, api_key_id, model, requests, prompt_tokens, "
                                  "completion_tokens, total_tokens, cost_usd, cache_hits, saved_cost_usd "
                                  "FROM usage_daily ORDER BY day")).all()
    assert [tuple(r) for r in daily] == [
        ("2026-01-31", 7, 8, "m", 2, 4, 4, 8, Decimal("0.1000000001"), 0, Decimal("0")),
        ("2026-02-01", 9007199254740993, 9007199254740993, 'm\u00e8 "q" \\ \U0001F600', 1, 2000000000, 147483647,
         2147483647, Decimal("1234567890.0123456789"), 1, Decimal("0.0000001235"))]


def test_usage_writer_returns_number_of_new_rows(key, clean_db):
    """write() returns how many rows were new, as documented: 1, then 0 for a replay."""
    writer = UsageWriter(clean_db)
    first, replay = events_same_request(key)
    assert writer.write([]) == 0
    assert writer.write([first]) == 1
    assert writer.write([replay]) == 0
