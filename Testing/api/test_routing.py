"""Routing and resilience through the app (real PostgreSQL, Redis and the fake OpenAI upstream):
fallback on a refused connection, alias fallbacks, context-window fallback, no fallback after
the first streamed byte, retries honouring Retry-After, breakers, categories, uptime, status."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest
import redis

from Testing.conftest import KEY_ROWS, app_config, close_app, minter, start_app, usage_rows, wait_for_rows
from Testing.support import REDIS_URL, FakeClock, free_port, wait_until

MESSAGES = [{"role": "user", "content": "hello routing"}]
PRICING = {"input_per_mtok": "1", "output_per_mtok": "2"}


def routing_models(path: Path, upstream: str) -> Path:
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there: connection refused

    def m(*deps, **extra):
        return {"deployments": [{"provider": p, "model": mo, **kw} for p, mo, kw in deps],
                "context_window": extra.pop("context_window", 128000), "max_output_tokens": 1000,
                "pricing": PRICING, **extra}

    models = {
        "fb-dead-first": m(("dead", "gpt-4o-mini", {"priority": 1}), ("up", "gpt-4o-mini", {"priority": 2})),
        "alias-primary": m(("up", "fake-fail-500-alias", {}), fallbacks=["alias-secondary"]),
        "alias-secondary": m(("up2", "secondary-model", {})),
        "ctx-small": m(("up", "ctx-small-model", {}), context_window=60, fallbacks=["ctx-big"]),
        "ctx-big": m(("up", "ctx-big-model", {}), context_window=100000),
        "ctx-only-small": m(("up", "ctx-small-model", {}), context_window=60),
        "midstream": m(("up", "fake-die-mid-stream", {"priority": 1}), ("up2", "after-die", {"priority": 2})),
        "ratelimited": m(("up", "fake-fail-429-ra-0.3", {})),
        "ratelimited-long": m(("up", "fake-fail-429-ra-30", {"priority": 1}),
                              ("up2", "after-429", {"priority": 2})),
        "flaky": m(("up", "fake-flaky-1-once", {})),
        "bad": m(("up", "fake-fail-400", {"priority": 1}), ("up2", "after-400", {"priority": 2})),
        "breaker": m(("up", "fake-fail-500-brk", {"priority": 1}), ("up2", "after-brk", {"priority": 2})),
        "breaker-only": m(("up", "fake-fail-500-only", {})),
        "uptime-mixed": m(("up", "uptime-ok", {"priority": 1}), ("dead", "uptime-dead", {"priority": 2})),
        "cat-a": m(("up", "cat-a-model", {"rpm": 1}), category="small"),
        "cat-b": m(("up", "cat-b-model", {}), category="small"),
        "cat-big": m(("up", "cat-big-model", {}), category="big", context_window=200),
        "hung": m(("slowup", "fake-hang-total", {"priority": 1}), ("up2", "fallback-after-stall", {"priority": 2})),
    }
    upstream_cfg = {"type": "openai", "base_url": upstream, "timeout_s": 2, "connect_timeout_s": 1}
    data = {"providers": {"up": upstream_cfg, "up2": dict(upstream_cfg),
                          "slowup": {**upstream_cfg, "read_timeout_s": 0.3},
                          "dead": {"type": "openai", "base_url": dead, "connect_timeout_s": 0.5}},
            "models": models}
    path.write_text(json.dumps(data))
    return path


BREAKER_CLOCK = FakeClock()


@pytest.fixture(scope="module")
def rapp(pg_url, tmp_path_factory, fake_upstream):
    models = routing_models(tmp_path_factory.mktemp("routing") / "models.json", fake_upstream.base_url)
    # The breakers' cooldowns run on a clock the tests move (`BREAKER_CLOCK.advance`): a busy
    # machine can neither end a cooldown early nor make a test wait for one.
    application = start_app(app_config(
        pg_url, models, ROUTER_RETRY_BASE_S=0.01, ROUTER_RETRY_MAX_BACKOFF_S=0.02, ROUTER_DEADLINE_S=5.0,
        ROUTER_MAX_RETRY_AFTER_S=1.0, BREAKER_FAILURE_THRESHOLD=2, BREAKER_MIN_REQUESTS=1000,
        BREAKER_COOLDOWN_S=30, UPTIME_CACHE_S=2.0, HEALTH_PUBLISH_INTERVAL_S=0), clock=BREAKER_CLOCK)
    yield application
    close_app(application)


@pytest.fixture
def rclient(rapp):
    return rapp.test_client()


@pytest.fixture
def key(rclient, admin_headers, clean_db) -> dict:
    return minter(rclient, admin_headers)(name="routing")


def chat(rclient, key, model, **body):
    """POST a completion; the answer is read whole and closed (closing settles it: usage row)."""
    body.setdefault("messages", MESSAGES)
    resp = rclient.post("/v1/chat/completions", json={"model": model, **body},
                        headers={"Authorization": f"Bearer {key['key']}"})
    resp.get_data()
    resp.close()
    return resp


def rows_of(engine, key: dict, count: int, *models: str) -> list[dict]:
    """The key's usage rows for these models (rows of an earlier test's key with the same id may
    still be arriving: the writer runs after the response)."""
    return wait_for_rows(engine, count, "api_key_id = :k AND model = ANY(:m)", {"k": key["id"], "m": list(models)})


def upstream_models(fake) -> list[str]:
    return [r["body"]["model"] for r in fake.chat_requests()]


def test_refused_deployment_falls_back_to_the_next_priority(rclient, key, clean_db, fake_upstream):
    """A deployment whose connection is refused is skipped for the next priority, for plain and
    streamed requests alike; the client sees only the answer, the row names who served it."""
    resp = chat(rclient, key, "fb-dead-first")
    assert resp.status_code == 200, resp.get_json()
    assert resp.get_json()["choices"][0]["message"]["content"].startswith("Echo:")
    resp = chat(rclient, key, "fb-dead-first", stream=True)
    assert resp.status_code == 200
    data = resp.get_data()
    assert data.endswith(b"data: [DONE]\n\n") and b'"error"' not in data
    rows = rows_of(clean_db, key, 2, "fb-dead-first")
    assert [(r["provider"], r["status"]) for r in rows] == [("up", "ok"), ("up", "ok")]


def test_alias_fallbacks_serve_when_every_deployment_fails(rclient, key, clean_db, fake_upstream):
    """When all deployments of an alias fail, its `fallbacks` aliases are tried; the row is billed
    as the fallback model (its prices) that answered."""
    fake_upstream.reset()
    resp = chat(rclient, key, "alias-primary")
    assert resp.status_code == 200, resp.get_json()
    assert upstream_models(fake_upstream) == ["fake-fail-500-alias", "fake-fail-500-alias", "secondary-model"]
    [row] = rows_of(clean_db, key, 1, "alias-primary", "alias-secondary")
    assert (row["model"], row["provider"], row["upstream_model"]) == ("alias-secondary", "up2", "secondary-model")


def test_context_window_fallback_and_400_when_nothing_fits(rclient, key, clean_db, fake_upstream):
    """A prompt too long for a model's context window goes to a fallback that can hold it, and
    is a 400 context_length_exceeded (without any upstream call) when none can."""
    fake_upstream.reset()
    long_prompt = [{"role": "user", "content": "word " * 80}]
    resp = chat(rclient, key, "ctx-small", messages=long_prompt)
    assert resp.status_code == 200
    assert upstream_models(fake_upstream) == ["ctx-big-model"]
    short = chat(rclient, key, "ctx-small", max_tokens=5)
    assert short.status_code == 200 and upstream_models(fake_upstream)[-1] == "ctx-small-model"
    fake_upstream.reset()
    resp = chat(rclient, key, "ctx-only-small", messages=long_prompt)
    assert resp.status_code == 400
    err = resp.get_json()["error"]
    assert err["code"] == "context_length_exceeded" and err["param"] == "messages" and "60" in err["message"]
    resp = chat(rclient, key, "ctx-only-small", max_tokens=100)  # the output does not fit either
    assert resp.status_code == 400 and resp.get_json()["error"]["code"] == "context_length_exceeded"
    assert fake_upstream.chat_requests() == []


def test_no_fallback_after_the_first_byte(rclient, key, clean_db, fake_upstream):
    """Once streamed bytes reached the client, an upstream death ends the stream with an error
    event and [DONE] (no second deployment is called); the row bills what was sent."""
    fake_upstream.reset()
    resp = chat(rclient, key, "midstream", stream=True)
    assert resp.status_code == 200
    events = [e for e in resp.get_data().split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    error = json.loads(events[-2][len(b"data: "):])
    assert error["error"]["type"] == "api_error"
    content = [json.loads(e[6:]) for e in events[:-2]]
    assert len(content) >= 2 and all("choices" in c for c in content)
    assert upstream_models(fake_upstream) == ["fake-die-mid-stream"]
    [row] = rows_of(clean_db, key, 1, "midstream")
    assert row["status"] == "error" and row["error_type"] == "unavailable" and row["completion_tokens"] > 0


def test_failure_before_the_first_byte_of_a_stream_falls_back(rclient, key, clean_db, fake_upstream):
    """A stream whose upstream fails before its first event is served by the next deployment
    (here: a read timeout of a hung upstream, then the fallback answers)."""
    fake_upstream.reset()
    resp = chat(rclient, key, "hung", stream=True)
    assert resp.status_code == 200
    assert resp.get_data().endswith(b"data: [DONE]\n\n")
    assert upstream_models(fake_upstream)[-1] == "fallback-after-stall"


def test_retry_after_is_honoured_then_the_429_reaches_the_client(rclient, key, clean_db, fake_upstream):
    """A 429 with Retry-After is retried on the same deployment no sooner than asked; when it
    persists the client gets 429 with Retry-After."""
    fake_upstream.reset()
    resp = chat(rclient, key, "ratelimited")
    assert resp.status_code == 429 and "Retry-After" in resp.headers
    calls = fake_upstream.chat_requests()
    assert [c["body"]["model"] for c in calls] == ["fake-fail-429-ra-0.3"] * 2
    assert calls[1]["time"] - calls[0]["time"] >= 0.29


def test_long_retry_after_moves_on_instead_of_waiting(rclient, key, clean_db, fake_upstream):
    """A Retry-After longer than ROUTER_MAX_RETRY_AFTER_S is not waited for: the next
    deployment answers at once."""
    fake_upstream.reset()
    resp = chat(rclient, key, "ratelimited-long")
    assert resp.status_code == 200
    calls = fake_upstream.chat_requests()
    assert [c["body"]["model"] for c in calls] == ["fake-fail-429-ra-30", "after-429"]
    # Not a timing of this machine: the 30 s the upstream asked for were not waited.
    assert calls[1]["time"] - calls[0]["time"] < 30


def test_transient_failure_is_retried_on_the_same_deployment(rclient, key, clean_db, fake_upstream):
    """One 500 then success: the retry on the same deployment answers; one row, status ok."""
    fake_upstream.reset()
    resp = chat(rclient, key, "flaky")
    assert resp.status_code == 200
    assert upstream_models(fake_upstream) == ["fake-flaky-1-once"] * 2
    [row] = rows_of(clean_db, key, 1, "flaky")
    assert row["status"] == "ok"


def test_bad_request_is_neither_retried_nor_sent_elsewhere(rclient, key, clean_db, fake_upstream):
    """An upstream 400 (the request itself is wrong) reaches the client after one call."""
    fake_upstream.reset()
    resp = chat(rclient, key, "bad")
    assert resp.status_code == 400
    assert upstream_models(fake_upstream) == ["fake-fail-400"]


def test_breaker_opens_skips_half_opens_and_closes(rclient, rapp, key, clean_db, fake_upstream):
    """Two consecutive failures open the circuit: the next request skips the deployment without
    calling it; after the cooldown one probe is let through."""
    fake_upstream.reset()
    assert chat(rclient, key, "breaker").status_code == 200  # 2 failures, then the fallback
    assert upstream_models(fake_upstream) == ["fake-fail-500-brk"] * 2 + ["after-brk"]
    breaker = rapp.extensions["gateway"].health.get("up/fake-fail-500-brk").breaker
    assert breaker.state == "open"
    fake_upstream.reset()
    assert chat(rclient, key, "breaker").status_code == 200
    assert upstream_models(fake_upstream) == ["after-brk"]
    BREAKER_CLOCK.advance(29.9)
    fake_upstream.reset()
    assert chat(rclient, key, "breaker").status_code == 200
    assert upstream_models(fake_upstream) == ["after-brk"]  # still cooling down
    BREAKER_CLOCK.advance(0.1)
    fake_upstream.reset()
    assert chat(rclient, key, "breaker").status_code == 200
    assert upstream_models(fake_upstream) == ["fake-fail-500-brk", "after-brk"]  # the probe, failed
    assert breaker.state == "open"


def test_every_circuit_open_is_a_fast_503_with_retry_after(rclient, key, clean_db, fake_upstream):
    """When every deployment's circuit is open the request fails at once with 503 and
    Retry-After, without an upstream call and without a usage row."""
    assert chat(rclient, key, "breaker-only").status_code == 502
    fake_upstream.reset()
    resp = chat(rclient, key, "breaker-only")
    assert resp.status_code == 503 and resp.get_json()["error"]["code"] == "deployments_unavailable"
    assert int(resp.headers["Retry-After"]) >= 1
    assert fake_upstream.chat_requests() == []
    # Absence proven by an event: a later request's row is written after anything the 503 queued.
    assert chat(rclient, key, "alias-secondary").status_code == 200
    rows_of(clean_db, key, 1, "alias-secondary")
    assert len(usage_rows(clean_db, "api_key_id = :k AND model = 'breaker-only'", {"k": key["id"]})) == 1


def test_category_routing_least_recently_used_and_skips_saturated(rclient, key, clean_db, fake_upstream):
    """`small` picks among small models the least recently used; a model at its rpm quota is
    skipped for the next; `big` goes to the big model only while the prompt fits its window;
    the row names the model that served."""
    fake_upstream.reset()
    for _ in range(3):
        assert chat(rclient, key, "small").status_code == 200
    # cat-a, then cat-b (least recently used), then cat-a again but its rpm=1 is used up: cat-b
    assert upstream_models(fake_upstream) == ["cat-a-model", "cat-b-model", "cat-b-model"]
    rows = rows_of(clean_db, key, 3, "cat-a", "cat-b")
    assert [r["model"] for r in rows] == ["cat-a", "cat-b", "cat-b"]
    assert chat(rclient, key, "big").status_code == 200
    resp = chat(rclient, key, "big", messages=[{"role": "user", "content": "word " * 300}])
    assert resp.status_code == 400 and resp.get_json()["error"]["code"] == "context_length_exceeded"


def test_category_grant_and_refusal(rclient, admin_headers, clean_db, fake_upstream):
    """Listing a category in a key's allowed_models grants its models; a key that lists only
    some model of the category may not use the category alias."""
    limited = minter(rclient, admin_headers)(name="limited", allowed_models=["small"])
    fake_upstream.reset()
    for _ in range(2):
        assert chat(rclient, limited, "small").status_code == 200
    assert set(upstream_models(fake_upstream)) <= {"cat-a-model", "cat-b-model"}
    other = minter(rclient, admin_headers)(name="other", allowed_models=["cat-a"])
    resp = chat(rclient, other, "small")
    assert resp.status_code == 403 and resp.get_json()["error"]["code"] == "model_not_allowed"


def test_models_list_shows_category_aliases(rclient, key, admin_headers):
    """/v1/models lists small/big/auto (categories with models) next to the aliases, and not
    to a key whose allowed_models leave them out."""
    ids = [m["id"] for m in rclient.get("/v1/models", headers={"Authorization": f"Bearer {key['key']}"})
           .get_json()["data"]]
    assert {"small", "big", "auto", "cat-a"} <= set(ids)
    limited = minter(rclient, admin_headers)(name="lim", allowed_models=["cat-a"])
    ids = [m["id"] for m in rclient.get("/v1/models", headers={"Authorization": f"Bearer {limited['key']}"})
           .get_json()["data"]]
    assert ids == ["cat-a"]


def test_uptime_probes_each_deployment_records_usage_and_caches(rclient, key, clean_db, fake_upstream):
    """GET /v1/uptime/<model> probes every deployment with a one-token stream, reports the
    failing one as down with its error, bills each probe, and answers from its cache next."""
    fake_upstream.reset()
    auth = {"Authorization": f"Bearer {key['key']}"}
    resp = rclient.get("/v1/uptime/uptime-mixed", headers=auth)
    assert resp.status_code == 200
    report = resp.get_json()
    assert report["status"] == "up" and report["cached"] is False
    by_model = {d["model"]: d for d in report["deployments"]}
    assert by_model["uptime-ok"]["status"] == "up" and by_model["uptime-ok"]["time_to_first_token_ms"] is not None
    assert by_model["uptime-dead"]["status"] == "down" and by_model["uptime-dead"]["error"] == "unavailable"
    [probe] = fake_upstream.chat_requests()
    assert probe["body"]["max_tokens"] == 1 and probe["body"]["stream"] is True
    rows = rows_of(clean_db, key, 2, "uptime-mixed")
    assert sorted((r["upstream_model"], r["status"]) for r in rows) == [("uptime-dead", "error"),
                                                                      ("uptime-ok", "ok")]
    ok_row = next(r for r in rows if r["status"] == "ok")
    assert ok_row["completion_tokens"] == 1 and ok_row["streamed"] is True
    again = rclient.get("/v1/uptime/uptime-mixed", headers=auth).get_json()
    assert again["cached"] is True and len(fake_upstream.chat_requests()) == 1
    assert rclient.get("/v1/uptime/uptime-mixed").status_code == 401
    assert rclient.get("/v1/uptime/no-such", headers=auth).status_code == 404


def test_uptime_probes_count_against_the_keys_limits(rclient, admin_headers, clean_db, fake_upstream):
    """Each probe of GET /v1/uptime is a completion of the calling key: the two probes of a
    two-deployment alias use up an rpm limit of 2 (the next completion is refused) while the
    round holds a single concurrency slot (max_concurrent=1 does not refuse its second probe)."""
    fake_upstream.reset()
    k = minter(rclient, admin_headers)(name="uptime-rpm", rpm_limit=2, max_concurrent=1)
    auth = {"Authorization": f"Bearer {k['key']}"}
    resp = rclient.get("/v1/uptime/uptime-mixed", headers=auth)
    assert resp.status_code == 200, resp.get_json()
    assert resp.get_json()["cached"] is False and len(fake_upstream.chat_requests()) == 1
    refused = chat(rclient, k, "fb-dead-first")
    assert refused.status_code == 429 and refused.get_json()["error"]["type"] == "rate_limit_error"
    assert len(rows_of(clean_db, k, 2, "uptime-mixed")) == 2
    assert usage_rows(clean_db, "api_key_id = :k AND model = 'fb-dead-first'", {"k": k["id"]}) == []


@pytest.mark.parametrize("limits,status,error_type", [
    ({"rpm_limit": 1}, 429, "rate_limit_error"),
    ({"budget_usd": "0.000001"}, 429, "insufficient_quota"),
])
def test_uptime_round_refused_by_the_keys_limits_probes_nothing(rclient, admin_headers, clean_db, fake_upstream,
                                                                 limits, status, error_type):
    """A key whose rpm limit cannot take every probe of the round, or whose budget cannot pay for
    one, gets the refused completion's answer: no probe reaches the upstream, nothing is billed or
    cached, and the reservations made are released (the key's concurrency slot is free again)."""
    fake_upstream.reset()
    since = datetime.now(timezone.utc)
    k = minter(rclient, admin_headers)(name="uptime-refused", max_concurrent=1, **limits)
    auth = {"Authorization": f"Bearer {k['key']}"}
    resp = rclient.get("/v1/uptime/uptime-mixed", headers=auth)
    assert resp.status_code == status, resp.get_json()
    assert resp.get_json()["error"]["type"] == error_type
    assert fake_upstream.chat_requests() == []
    other = minter(rclient, admin_headers)(name="uptime-other")
    fresh = rclient.get("/v1/uptime/uptime-mixed", headers={"Authorization": f"Bearer {other['key']}"})
    assert fresh.status_code == 200 and fresh.get_json()["cached"] is False  # the refusal cached nothing
    rows_of(clean_db, other, 2, "uptime-mixed")  # settled after the refusal: the refusal's rows would be in
    assert usage_rows(clean_db, KEY_ROWS, {"k": k["id"], "since": since}) == []
    leases = redis.Redis.from_url(REDIS_URL)
    try:
        lease_key = f"gw:{{t:{k['tenant_id']}}}:k:{k['id']}:lease"
        wait_until(lambda: leases.zcard(lease_key) == 0, timeout=5, message="the probe's lease released")
    finally:
        leases.close()


def test_providers_status_reports_the_failing_deployment_down(rclient, key, admin_headers, clean_db):
    """GET /v1/providers/status (system secret or a key) lists every deployment with circuit,
    success ratio, p50 latency and last error; the refused one is down; no URL or secret."""
    auth = {"Authorization": f"Bearer {key['key']}"}
    for _ in range(2):
        assert chat(rclient, key, "fb-dead-first").status_code == 200
    resp = rclient.get("/v1/providers/status", headers=admin_headers)
    assert resp.status_code == 200
    body = resp.get_json()
    by_name = {d["deployment"]: d for d in body["data"]}
    dead = by_name["dead/gpt-4o-mini"]
    assert dead["status"] == "down" and dead["circuit"] == "open" and dead["last_error"] == "unavailable"
    assert dead["recent_success_ratio"] == 0 and dead["last_error_at"].endswith("Z")
    assert dead["aliases"] == ["fb-dead-first"]
    up = by_name["up/gpt-4o-mini"]
    assert up["status"] == "up" and up["recent_success_ratio"] == 1 and up["p50_latency_ms"] is not None
    text = resp.get_data(as_text=True)
    assert "127.0.0.1" not in text and "base_url" not in text
    assert rclient.get("/v1/providers/status", headers=auth).status_code == 200
    assert rclient.get("/v1/providers/status").status_code == 401
    assert rclient.get("/v1/providers/status", headers={"X-System-Secret": "wrong"}).status_code == 401
