"""`/v1/usage` for admins: the system secret and tenant admins choose the scope (`tenant`,
`api_key_id`), group by key, model, day or tenant, and export CSV (`format=csv` or
`Accept: text/csv`). Every grouping's lines and every CSV's lines add up to the sums of the
usage rows themselves."""
from __future__ import annotations

import csv
import io
import random
import uuid
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from app.services.usage_service import UsageEvent, UsageWriter
from Testing.support import SYSTEM_SECRET

pytestmark = pytest.mark.timeout(60)

SYSTEM = {"X-System-Secret": SYSTEM_SECRET}
PERIOD = {"start": "2024-03-01T00:00:00Z", "end": "2024-04-01T00:00:00Z"}
TOTALS = ("requests", "prompt_tokens", "completion_tokens", "total_tokens")


@pytest.fixture
def fleet(client, clean_db):
    """Two tenants with keys (a tenant admin, members) and 120 random usage rows over March 2024
    (plus rows outside it that no answer may count)."""
    keys = {}
    for tenant in ("north", "south"):
        assert client.post("/v1/tenants", headers=SYSTEM, json={"name": tenant}).status_code == 201
        for name, role in (("admin", "admin"), ("m1", "member"), ("m2", "member")):
            resp = client.post("/v1/api-keys", headers=SYSTEM, json={"name": f"{tenant}-{name}", "tenant": tenant,
                                                                     "role": role})
            keys[f"{tenant}-{name}"] = resp.get_json()
    rng = random.Random(7)
    rows = []
    for i in range(130):
        key = rng.choice(list(keys.values()))
        day = datetime(2024, 3, 1, tzinfo=timezone.utc) + timedelta(minutes=rng.randrange(31 * 24 * 60))
        if i >= 120:  # outside the period
            day = datetime(2024, 4, 1, tzinfo=timezone.utc) + timedelta(hours=i)
        rows.append(UsageEvent(request_id="req_" + uuid.uuid4().hex, tenant_id=key["tenant_id"],
                               api_key_id=key["id"], model=rng.choice(["gpt-4o-mini", "demo", "llama"]),
                               prompt_tokens=rng.randrange(1, 5000), completion_tokens=rng.randrange(0, 900),
                               cost_usd=Decimal(rng.randrange(1, 10**7)) / Decimal(10**10), created_at=day))
    UsageWriter(clean_db).write(rows)
    return keys, [r for r in rows if r.created_at < datetime(2024, 4, 1, tzinfo=timezone.utc)]


def expected(rows: list[UsageEvent], group) -> dict:
    sums: dict = defaultdict(lambda: {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0,
                                      "total_tokens": 0, "cost_usd": Decimal(0)})
    for r in rows:
        s = sums[group(r)]
        s["requests"] += 1
        s["prompt_tokens"] += r.prompt_tokens
        s["completion_tokens"] += r.completion_tokens
        s["total_tokens"] += r.prompt_tokens + r.completion_tokens
        s["cost_usd"] += r.cost_usd
    return dict(sums)


def as_sums(line: dict) -> dict:
    return {**{k: int(line[k]) for k in TOTALS}, "cost_usd": Decimal(line["cost_usd"])}


GROUPS = {"key": ("api_key_id", lambda r: r.api_key_id), "model": ("model", lambda r: r.model),
          "day": ("day", lambda r: r.created_at.date().isoformat()), "tenant": ("tenant_id", lambda r: r.tenant_id)}


@pytest.mark.parametrize("group_by", list(GROUPS))
def test_system_groupings_equal_the_row_sums(client, fleet, group_by):
    """For the system secret (every tenant), each group_by's lines equal the sums of the rows of
    that group, and the lines add up to the totals."""
    _, rows = fleet
    label, group = GROUPS[group_by]
    body = client.get("/v1/usage", query_string={**PERIOD, "group_by": group_by}, headers=SYSTEM).get_json()
    got = {line[label]: as_sums(line) for line in body["data"]}
    assert got == expected(rows, group)
    assert as_sums(body) == expected(rows, lambda r: "all")["all"]


@pytest.mark.parametrize("group_by", [None, *GROUPS])
@pytest.mark.parametrize("how", ["format", "accept"])
def test_csv_totals_equal_the_row_sums(client, fleet, group_by, how):
    """The CSV export (format=csv or Accept: text/csv) has one line per group with exact money;
    its columns add up to the sums of the usage rows; key and tenant lines carry names."""
    keys, rows = fleet
    params = {**PERIOD, **({"group_by": group_by} if group_by else {})}
    headers = dict(SYSTEM)
    if how == "format":
        params["format"] = "csv"
    else:
        headers["Accept"] = "text/csv"
    resp = client.get("/v1/usage", query_string=params, headers=headers)
    assert resp.status_code == 200 and resp.mimetype == "text/csv"
    assert resp.headers["Content-Disposition"].startswith("attachment; filename=\"usage_2024-03-01_2024-04-01")
    lines = list(csv.DictReader(io.StringIO(resp.get_data(as_text=True))))
    total = {k: sum(int(line[k]) for line in lines) for k in TOTALS}
    total["cost_usd"] = sum((Decimal(line["cost_usd"]) for line in lines), Decimal(0))
    assert total == expected(rows, lambda r: "all")["all"]
    if group_by:
        label, group = GROUPS[group_by]
        assert {(int(x[label]) if label.endswith("_id") else x[label]): as_sums(x) for x in lines} == \
            expected(rows, group)
    if group_by == "key":
        names = {k["id"]: k["name"] for k in keys.values()}
        assert all(line["api_key_name"] == names[int(line["api_key_id"])] for line in lines)
    if group_by == "tenant":
        assert sorted(line["tenant_name"] for line in lines) == ["north", "south"]


def test_tenant_admin_scope_and_filters(client, fleet):
    """A tenant admin reads its tenant's usage by default, one of its keys with api_key_id, and
    groups by key within its tenant; a member reads only its own key."""
    keys, rows = fleet
    admin, m1 = keys["north-admin"], keys["north-m1"]
    north = [r for r in rows if r.tenant_id == admin["tenant_id"]]
    auth = {"Authorization": f"Bearer {admin['key']}"}
    body = client.get("/v1/usage", query_string=PERIOD, headers=auth).get_json()
    assert as_sums(body) == expected(north, lambda r: "all")["all"]
    by_key = client.get("/v1/usage", query_string={**PERIOD, "group_by": "key"}, headers=auth).get_json()
    assert {line["api_key_id"]: as_sums(line) for line in by_key["data"]} == expected(north, lambda r: r.api_key_id)
    one = client.get("/v1/usage", query_string={**PERIOD, "api_key_id": m1["id"], "group_by": "model"},
                     headers=auth).get_json()
    mine = [r for r in rows if r.api_key_id == m1["id"]]
    assert {line["model"]: as_sums(line) for line in one["data"]} == expected(mine, lambda r: r.model)
    member = client.get("/v1/usage", query_string=PERIOD, headers={"Authorization": f"Bearer {m1['key']}"})
    assert as_sums(member.get_json()) == expected(mine, lambda r: "all")["all"]
    system = client.get("/v1/usage", query_string={**PERIOD, "tenant": "north"}, headers=SYSTEM).get_json()
    assert as_sums(system) == as_sums(body)


@pytest.mark.parametrize("params,param", [({"group_by": "week"}, "group_by"), ({"format": "xml"}, "format"),
                                          ({"api_key_id": "abc"}, "api_key_id"), ({"api_key_id": "0"}, "api_key_id"),
                                          ({"tenant": ""}, "tenant")])
def test_admin_usage_parameters_are_validated(client, fleet, params, param):
    """Bad group_by, format, api_key_id or tenant values are 400 naming the parameter."""
    resp = client.get("/v1/usage", query_string=params, headers=SYSTEM)
    assert resp.status_code == 400 and resp.get_json()["error"]["param"] == param


def test_unknown_tenant_or_key_is_404_for_the_system(client, fleet):
    """The system secret naming a tenant or key that does not exist gets 404, not empty totals."""
    for params, param in (({"tenant": "nowhere"}, "tenant"), ({"api_key_id": 424242}, "api_key_id")):
        resp = client.get("/v1/usage", query_string=params, headers=SYSTEM)
        assert resp.status_code == 404 and resp.get_json()["error"]["param"] == param


@pytest.mark.parametrize("name", ["=HYPERLINK(\"x\")", "+1+cmd", "-1+cmd", "@SUM(A1)", "\t=cmd", "\r=cmd"])
def test_csv_cells_cannot_become_spreadsheet_formulas(client, clean_db, name):
    """A key named like a formula (starting with = + - @, or a tab or carriage return, which
    some spreadsheets skip before reading a formula) is exported with a leading quote."""
    key = client.post("/v1/api-keys", headers=SYSTEM, json={"name": name, "tenant": "t"}).get_json()
    UsageWriter(clean_db).write([UsageEvent(request_id="req_" + uuid.uuid4().hex, tenant_id=key["tenant_id"],
                                            api_key_id=key["id"], model="demo",
                                            created_at=datetime(2024, 3, 2, tzinfo=timezone.utc))])
    resp = client.get("/v1/usage", query_string={**PERIOD, "group_by": "key", "format": "csv"}, headers=SYSTEM)
    line = list(csv.DictReader(io.StringIO(resp.get_data(as_text=True))))[0]
    assert line["api_key_name"] == "'" + name
