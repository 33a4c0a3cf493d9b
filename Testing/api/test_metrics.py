"""GET /metrics, GET /api/metrics and the request id, in one process (Flask test client, real
PostgreSQL, Redis and fake upstream; the registry is the app's own, as under run.py): what is
counted for each way a request ends, who may read the figures, and how X-Request-ID is taken
from the client without ever keying a usage row."""
from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from Testing.conftest import app_config, close_app, usage_rows, wait_for_rows
from Testing.conftest import start_app
from Testing.support import SYSTEM_SECRET

MESSAGES = [{"role": "user", "content": "hello"}]


def samples(client, headers: dict | None = None) -> dict[tuple, float]:
    """The /metrics answer as {(sample name, sorted labels): value}."""
    resp = client.get("/metrics", headers=headers or {})
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.headers["Content-Type"].startswith("text/plain; version=")
    out = {}
    for family in text_string_to_metric_families(resp.get_data(as_text=True)):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(figures: dict[tuple, float], name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    return sum(v for (n, ls), v in figures.items() if n == name and set(labels.items()) <= set(ls))


def _chat(client, key: str, model: str = "gpt-4o-mini", stream: bool = False, **headers: str):
    """A chat completion, read and closed (the run settles when its response is closed)."""
    resp = client.post("/v1/chat/completions", json={"model": model, "messages": MESSAGES, "stream": stream},
                       headers={"Authorization": f"Bearer {key}", **headers})
    resp.get_data()
    resp.close()
    return resp


def test_metrics_count_each_way_a_request_ends(client, mint, pg_engine):
    """One answered request, one streamed, one upstream failure and one refused by the key's
    requests-per-minute limit: /metrics counts exactly those, with tokens and cost equal to
    the usage rows', the refusal under its limit kind, and the upstream failure's retry."""
    key = mint(rpm_limit=4)["key"]
    assert _chat(client, key).status_code == 200
    assert _chat(client, key, stream=True).status_code == 200
    assert _chat(client, key, model="fail-500").status_code == 502
    refused = _chat(client, key)  # the 4th request within the minute: admitted
    assert refused.status_code == 200
    assert _chat(client, key).status_code == 429
    rows = wait_for_rows(pg_engine, 4)

    figures = samples(client)
    assert value(figures, "gateway_requests_total") == 4
    assert value(figures, "gateway_requests_total", model="gpt-4o-mini", status="ok", provider="openai") == 3
    assert value(figures, "gateway_requests_total", model="fail-500", status="error") == 1
    assert value(figures, "gateway_refusals_total", reason="rpm", endpoint="chat.completions") == 1
    assert value(figures, "gateway_upstream_retries_total", model="fail-500") == 1
    assert value(figures, "gateway_tokens_total", token_type="input") == sum(r["prompt_tokens"] for r in rows)
    assert value(figures, "gateway_tokens_total", token_type="output") == sum(r["completion_tokens"] for r in rows)
    assert value(figures, "gateway_cost_usd_total") == pytest.approx(float(sum(r["cost_usd"] for r in rows)))
    assert value(figures, "gen_ai_server_request_duration_seconds_count") == 4
    assert value(figures, "gen_ai_server_time_to_first_token_seconds_count", gen_ai_request_model="gpt-4o-mini") == 1
    assert value(figures, "gen_ai_client_token_usage_count", gen_ai_token_type="input") == 3
    assert value(figures, "gateway_circuit_state", deployment="openai/fake-fail-500") == 0
    assert value(figures, "gateway_key_cache_lookups_total") == 5


def test_metrics_labels_hold_no_key_or_tenant_by_default(client, mint):
    """Without METRICS_TENANT_LABELS / METRICS_KEY_LABELS, no series names a tenant or a key,
    and the key's secret is nowhere in the answer."""
    key = mint(tenant="labels-tenant")["key"]
    assert _chat(client, key).status_code == 200
    text = client.get("/metrics").get_data(as_text=True)
    assert key not in text and "tenant_id" not in text and "api_key_id" not in text
    assert "labels-tenant" not in text


def test_tenant_and_key_labels_when_asked(pg_url, models_file, clean_db):
    """METRICS_TENANT_LABELS=1 and METRICS_KEY_LABELS=1: tokens and cost carry the tenant's
    and the key's numeric ids."""
    app = start_app(app_config(pg_url, models_file, METRICS_TENANT_LABELS=True, METRICS_KEY_LABELS=True))
    try:
        client = app.test_client()
        created = client.post("/v1/api-keys", json={"name": "k", "tenant": "ids"},
                              headers={"X-System-Secret": SYSTEM_SECRET}).get_json()
        assert _chat(client, created["key"]).status_code == 200
        figures = samples(client)
        assert value(figures, "gateway_requests_total") == 1
        assert value(figures, "gateway_cost_usd_total", api_key_id=str(created["id"])) > 0
        assert value(figures, "gateway_tokens_total", tenant_id=str(created["tenant_id"]), token_type="output") == 20
    finally:
        close_app(app)


def test_metrics_token(pg_url, models_file, clean_db):
    """METRICS_TOKEN set: /metrics and /api/metrics answer 401 without it or with a wrong one,
    200 with `Authorization: Bearer <token>` or with the system secret."""
    app = start_app(app_config(pg_url, models_file, METRICS_TOKEN="scrape-token-123"))
    try:
        client = app.test_client()
        for path in ("/metrics", "/api/metrics"):
            assert client.get(path).status_code == 401
            wrong = client.get(path, headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401
            assert wrong.get_json()["error"]["code"] == "invalid_metrics_token"
            assert client.get(path, headers={"Authorization": "Bearer scrape-token-123"}).status_code == 200
            assert client.get(path, headers={"X-System-Secret": SYSTEM_SECRET}).status_code == 200
            assert client.get(path, headers={"X-System-Secret": "wrong"}).status_code == 401
    finally:
        close_app(app)


def test_metrics_off(pg_url, models_file, clean_db):
    """METRICS_ENABLED=0: both endpoints answer 404 in the error envelope."""
    app = start_app(app_config(pg_url, models_file, METRICS_ENABLED=False))
    try:
        client = app.test_client()
        for path in ("/metrics", "/api/metrics"):
            resp = client.get(path)
            assert resp.status_code == 404 and resp.get_json()["error"]["code"] == "not_found"
    finally:
        close_app(app)


def test_api_metrics_summary(client, mint, pg_engine):
    """GET /api/metrics sums the same figures: totals, the last minute and hour, per model
    and per provider, refusals by kind, the usage writer."""
    key = mint(rpm_limit=2)["key"]
    assert _chat(client, key).status_code == 200
    assert _chat(client, key, model="demo").status_code == 200
    assert _chat(client, key).status_code == 429
    rows = wait_for_rows(pg_engine, 2)
    body = client.get("/api/metrics").get_json()
    assert body["object"] == "metrics.summary"
    assert body["totals"]["requests"] == 2 and body["totals"]["ok"] == 2
    assert body["totals"]["refusals"] == {"rpm": 1}
    assert body["totals"]["output_tokens"] == sum(r["completion_tokens"] for r in rows)
    assert body["last_minute"]["requests"] == 2 and body["last_hour"]["requests"] == 2
    assert [m["name"] for m in body["models"]] == ["demo", "gpt-4o-mini"]
    assert [p["name"] for p in body["providers"]] == ["openai", "simulator"]
    assert body["models"][1]["requests"] == 1 and body["models"][1]["last_minute"]["requests"] == 1
    assert body["usage_writer"]["rows_queued"] == 0


def test_request_id_generated_and_keys_the_usage_row(client, mint, pg_engine):
    """Without X-Request-ID the gateway makes one: it is the X-Request-ID (and `request-id`)
    header and the usage row's request_id."""
    key = mint()["key"]
    resp = _chat(client, key)
    rid = resp.headers["X-Request-ID"]
    assert rid.startswith("req_") and resp.headers["request-id"] == rid
    assert "X-Gateway-Request-ID" not in resp.headers
    rows = wait_for_rows(pg_engine, 1)
    assert rows[0]["request_id"] == rid


def test_client_request_id_echoed_never_a_row_key(client, mint, pg_engine):
    """A valid client X-Request-ID is echoed; the usage row keeps a gateway id (sent back in
    X-Gateway-Request-ID), so two requests sending the same id make two rows, not one."""
    key = mint()["key"]
    first = _chat(client, key, **{"X-Request-ID": "trace-42.a:b"})
    second = _chat(client, key, **{"X-Request-ID": "trace-42.a:b"})
    assert first.headers["X-Request-ID"] == second.headers["X-Request-ID"] == "trace-42.a:b"
    ids = {first.headers["X-Gateway-Request-ID"], second.headers["X-Gateway-Request-ID"]}
    rows = wait_for_rows(pg_engine, 2)
    assert {r["request_id"] for r in rows} == ids and len(ids) == 2


@pytest.mark.parametrize("bad", ["x" * 129, "has space", "quote\"d", "semi;colon", "\u00e9t\u00e9"])
def test_unsafe_client_request_id_replaced(client, mint, bad):
    """An X-Request-ID that is too long or holds unsafe characters is not echoed: the gateway
    makes its own."""
    key = mint()["key"]
    resp = client.post("/v1/chat/completions", json={"model": "demo", "messages": MESSAGES},
                       headers=[("Authorization", f"Bearer {key}"), ("X-Request-ID", bad.encode().decode("latin-1"))])
    resp.close()
    assert resp.status_code == 200
    assert resp.headers["X-Request-ID"].startswith("req_") and resp.headers["X-Request-ID"] != bad


def test_error_answers_carry_a_request_id(client):
    """Every answer carries X-Request-ID, errors before any run included."""
    resp = client.post("/v1/chat/completions", json={"model": "demo", "messages": MESSAGES},
                       headers={"X-Request-ID": "abc-1"})
    assert resp.status_code == 401 and resp.headers["X-Request-ID"] == "abc-1"
    assert client.get("/v1/nowhere").headers["X-Request-ID"].startswith("req_")


def test_rows_match_requests(client, mint, pg_engine):
    """The usage rows written are the runs /metrics counts, one each (no run counted twice)."""
    key = mint()["key"]
    for model in ("demo", "gpt-4o-mini", "fail-400"):
        _chat(client, key, model=model)
    rows = wait_for_rows(pg_engine, 3)
    figures = samples(client)
    assert value(figures, "gateway_requests_total") == len(rows) == len(usage_rows(pg_engine))


def test_grafana_dashboard_queries_only_served_metrics(client, mint):
    """docs/grafana-dashboard.json is valid JSON, and every metric its queries name is in the
    /metrics answer (a renamed metric cannot leave the dashboard blank unnoticed)."""
    import json
    import re

    from app.config import ROOT_DIR

    dashboard = json.loads((ROOT_DIR / "docs" / "grafana-dashboard.json").read_text())
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"\b(?:gateway|gen_ai)_[a-z_]+\b",
                                      re.sub(r"\bby \([^)]*\)", "", target["expr"]))}  # not the labels
    key = mint()["key"]
    _chat(client, key, stream=True)
    text = client.get("/metrics").get_data(as_text=True)
    served = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        served |= {name, f"{name}_total"} if kind == "counter" else {name}
        if kind == "histogram":
            served |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    assert len(queried) >= 15
    assert queried - served == set()
