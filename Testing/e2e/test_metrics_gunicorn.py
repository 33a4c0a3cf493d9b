"""Metrics and request logs under a real `gunicorn -k gevent` with 2 workers (prometheus_client's
multiprocess mode, the directory prepared by gunicorn.config.py): after a mix of requests
(answered, streamed, upstream failure, refused by a limit) /metrics counts exactly the requests
made and the usage rows written, whichever worker answers; a worker killed with SIGKILL and
replaced by gunicorn neither loses nor doubles a figure; the metrics token is required; the
request log is JSON, one line per request, and holds no secret."""
from __future__ import annotations

import json
import os
import signal

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine

from Testing.conftest import app_config, usage_rows, wait_for_rows
from Testing.support import SYSTEM_SECRET, UPSTREAM_KEY, GatewayProcess, http_json, wait_until

pytestmark = pytest.mark.timeout(180)

TOKEN = "metrics-scrape-token-0123"
MESSAGES = [{"role": "user", "content": "hello"}]


@pytest.fixture
def metered(pg_url, models_file, clean_db, tmp_path):
    """A 2-worker gateway with JSON logs, a metrics token and its own multiprocess directory,
    which holds a stale file of an earlier run (the master must start from an empty one)."""
    mp_dir = tmp_path / "prometheus"
    mp_dir.mkdir()
    (mp_dir / "counter_999999.db").write_bytes(b"stale figures of a previous run")
    env = {k: str(v) for k, v in app_config(pg_url, models_file, LOG_LEVEL="INFO").items()}
    env.update(LOG_FORMAT="json", METRICS_TOKEN=TOKEN, PROMETHEUS_MULTIPROC_DIR=str(mp_dir))
    proc = GatewayProcess(env, workers=2, log_path=tmp_path / "gunicorn.log").start()
    proc.mp_dir = mp_dir
    yield proc
    proc.stop()


def scrape(gw) -> dict[tuple, float]:
    status, headers, text = http_json("GET", gw.base_url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 200, text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(figures: dict[tuple, float], name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in figures.items() if n == name and set(labels.items()) <= set(ls))


def mint(gw, **fields) -> dict:
    status, _, body = http_json("POST", gw.base_url + "/v1/api-keys", {"name": "m", "tenant": "metrics", **fields},
                                headers={"X-System-Secret": SYSTEM_SECRET})
    assert status == 201, body
    return body


def run_mix(gw, key: str, limited_key: str) -> dict[str, int]:
    """3 answered, 2 streamed, 1 upstream failure (502 after one retry), 1 refused by rpm."""
    client = openai.OpenAI(base_url=gw.base_url + "/v1", api_key=key, max_retries=0)
    for _ in range(3):
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    for _ in range(2):
        assert "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True) if c.choices)
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="fail-500", messages=MESSAGES)
    limited = openai.OpenAI(base_url=gw.base_url + "/v1", api_key=limited_key, max_retries=0)
    limited.chat.completions.create(model="demo", messages=MESSAGES)
    with pytest.raises(openai.RateLimitError):
        limited.chat.completions.create(model="demo", messages=MESSAGES)
    return {"runs": 7, "ok": 6, "streamed": 2, "error": 1, "refused": 1}


def test_counters_equal_requests_and_rows_across_workers_and_a_killed_worker(metered, pg_url):
    """/metrics under 2 workers: requests, tokens and cost equal the usage rows summed over
    both workers, every scrape (whichever worker answers) says the same; after SIGKILL of a
    worker and its replacement the figures are neither lost nor doubled, and new requests add
    exactly themselves."""
    gw = metered
    assert not (gw.mp_dir / "counter_999999.db").exists()
    key, limited = mint(gw)["key"], mint(gw, rpm_limit=1)["key"]
    expected = run_mix(gw, key, limited)
    engine = create_engine(pg_url)
    try:
        rows = wait_for_rows(engine, expected["runs"])
        wait_until(lambda: value(scrape(gw), "gateway_requests_total") == expected["runs"],
                   message="the runs counted")
        answers = [scrape(gw) for _ in range(6)]  # new connections: both workers answer some
        figures = answers[0]
        for other in answers[1:]:
            for name in ("gateway_requests_total", "gateway_tokens_total", "gateway_refusals_total"):
                assert value(other, name) == value(figures, name)
        assert value(figures, "gateway_requests_total", status="ok") == expected["ok"] == len(
            [r for r in rows if r["status"] == "ok"])
        assert value(figures, "gateway_requests_total", status="error", model="fail-500") == 1
        assert value(figures, "gateway_refusals_total", reason="rpm") == expected["refused"]
        assert value(figures, "gateway_tokens_total", token_type="input") == sum(r["prompt_tokens"] for r in rows)
        assert value(figures, "gateway_tokens_total", token_type="output") == sum(
            r["completion_tokens"] for r in rows)
        assert value(figures, "gateway_cost_usd_total") == pytest.approx(float(sum(r["cost_usd"] for r in rows)))
        assert value(figures, "gen_ai_server_time_to_first_token_seconds_count") == expected["streamed"]
        assert value(figures, "gateway_usage_rows_queued") == 0
        assert len({p.name.split("_")[-1] for p in gw.mp_dir.glob("counter_*.db")}) >= 1

        victim = gw.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: len(gw.worker_pids()) == 2 and victim not in gw.worker_pids(), timeout=60,
                   message="gunicorn to replace the killed worker")
        after_kill = scrape(gw)
        for name in ("gateway_requests_total", "gateway_tokens_total", "gateway_cost_usd_total",
                     "gateway_refusals_total", "gen_ai_server_request_duration_seconds_count"):
            assert value(after_kill, name) == pytest.approx(value(figures, name)), name

        client = openai.OpenAI(base_url=gw.base_url + "/v1", api_key=key, max_retries=0)
        for _ in range(4):
            client.chat.completions.create(model="demo", messages=MESSAGES)
        rows = wait_for_rows(engine, expected["runs"] + 4)
        wait_until(lambda: value(scrape(gw), "gateway_requests_total") == expected["runs"] + 4,
                   message="the new runs counted")
        final = scrape(gw)
        assert value(final, "gateway_requests_total") == len(usage_rows(engine)) == expected["runs"] + 4
        assert value(final, "gateway_tokens_total", token_type="output") == sum(r["completion_tokens"] for r in rows)
    finally:
        engine.dispose()

    summary = http_json("GET", gw.base_url + "/api/metrics", headers={"X-System-Secret": SYSTEM_SECRET})
    assert summary[0] == 200 and summary[2]["totals"]["requests"] == expected["runs"] + 4


def test_metrics_token_under_gunicorn(metered):
    """METRICS_TOKEN set: no token or a wrong one is 401, the token or the system secret is 200."""
    url = metered.base_url
    assert http_json("GET", url + "/metrics")[0] == 401
    assert http_json("GET", url + "/metrics", headers={"Authorization": "Bearer wrong"})[0] == 401
    assert http_json("GET", url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200
    assert http_json("GET", url + "/api/metrics", headers={"X-System-Secret": SYSTEM_SECRET})[0] == 200


def request_lines(gw) -> list[dict]:
    lines = []
    for line in gw.log_text().splitlines():
        if line.startswith("{"):
            record = json.loads(line)  # every JSON line parses
            if record.get("logger") == "gateway.requests":
                lines.append(record)
    return lines


def test_json_request_log_without_secrets_and_request_ids(metered):
    """LOG_FORMAT=json: one parseable line per request (runs and refusals) with the fields the
    docs list; the client's X-Request-ID is the line's request_id and is echoed, a generated
    one otherwise; the log holds neither the key, nor the system secret, nor the upstream key."""
    gw = metered
    key, limited = mint(gw)["key"], mint(gw, rpm_limit=1)["key"]
    status, headers, _ = http_json("POST", gw.base_url + "/v1/chat/completions",
                                   {"model": "gpt-4o-mini", "messages": MESSAGES},
                                   headers={"Authorization": f"Bearer {key}", "X-Request-ID": "client-trace-7"})
    assert status == 200 and headers["X-Request-ID"] == "client-trace-7"
    usage_id = headers["X-Gateway-Request-ID"]
    status, headers, _ = http_json("POST", gw.base_url + "/v1/chat/completions",
                                   {"model": "demo", "messages": MESSAGES, "stream": True},
                                   headers={"Authorization": f"Bearer {key}", "X-Request-ID": "bad id with spaces"})
    assert status == 200 and headers["X-Request-ID"].startswith("req_")
    generated = headers["X-Request-ID"]
    for _ in range(2):
        http_json("POST", gw.base_url + "/v1/chat/completions", {"model": "demo", "messages": MESSAGES},
                  headers={"Authorization": f"Bearer {limited}"})

    wait_until(lambda: len(request_lines(gw)) >= 4, message="4 request lines")
    lines = {line["request_id"]: line for line in request_lines(gw)}
    assert len(request_lines(gw)) == 4
    first = lines["client-trace-7"]
    assert first["usage_id"] == usage_id and first["status"] == "ok" and first["model"] == "gpt-4o-mini"
    assert first["deployment"] == "openai/gpt-4o-mini" and first["endpoint"] == "chat.completions"
    assert first["prompt_tokens"] > 0 and first["completion_tokens"] == 20 and first["cost_usd"] != "0"
    for field in ("ts", "level", "key_id", "tenant_id", "tenant", "latency_ms", "ttft_ms", "cache", "streamed"):
        assert field in first, field
    assert lines[generated]["streamed"] is True and lines[generated]["usage_id"] == generated
    refused = [line for line in lines.values() if line["status"] == "refused"]
    assert len(refused) == 1 and refused[0]["refusal"] == "rpm" and refused[0]["http_status"] == 429
    text = gw.log_text()
    for secret in (key, limited, SYSTEM_SECRET, UPSTREAM_KEY, TOKEN):
        assert secret not in text
