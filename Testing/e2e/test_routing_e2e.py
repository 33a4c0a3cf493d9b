"""Fallback, breakers and the status/uptime endpoints through a real gunicorn + gevent gateway
(2 workers) driven by the official openai client: the first deployment refuses connections, the
client only ever sees answers, and every worker's view of the dead deployment reaches
GET /v1/providers/status through Redis."""
from __future__ import annotations

import json
from datetime import datetime, timezone

import openai
import pytest

from Testing.conftest import app_config, key_rows
from Testing.support import SYSTEM_SECRET, GatewayProcess, free_port, http_json, wait_until

MESSAGES = [{"role": "user", "content": "hello fallback"}]


@pytest.fixture(scope="module")
def routing_gateway(pg_url, fake_upstream, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("routing-e2e")
    upstream = {"type": "openai", "base_url": fake_upstream.base_url, "timeout_s": 3, "connect_timeout_s": 1}
    models = {"providers": {
        "dead": {"type": "openai", "base_url": f"http://127.0.0.1:{free_port()}/v1", "connect_timeout_s": 0.5},
        "live": upstream},
        "models": {"resilient": {
            "deployments": [{"provider": "dead", "model": "gpt-4o-mini", "priority": 1},
                            {"provider": "live", "model": "gpt-4o-mini", "priority": 2}],
            "context_window": 128000, "max_output_tokens": 1000,
            "pricing": {"input_per_mtok": "0.15", "output_per_mtok": "0.60"}}}}
    path = tmp / "models.json"
    path.write_text(json.dumps(models))
    env = {k: str(v) for k, v in app_config(
        pg_url, path, BREAKER_FAILURE_THRESHOLD=2, BREAKER_COOLDOWN_S=60, HEALTH_PUBLISH_INTERVAL_S=0.2,
        UPTIME_CACHE_S=5).items()}
    proc = GatewayProcess(env, workers=2, log_path=tmp / "gunicorn.log").start()
    yield proc
    proc.stop()


def test_fallback_status_and_uptime_through_gunicorn(routing_gateway, clean_db):
    """The openai client gets answers (plain and streamed) although the first deployment is down;
    the usage rows name the live deployment; /v1/providers/status reports the dead one down with
    an open circuit; /v1/uptime probes both and says which is down."""
    since = datetime.now(timezone.utc)
    status, _, key = http_json("POST", routing_gateway.base_url + "/v1/api-keys",
                               {"name": "e2e-routing", "tenant": "routing"}, {"X-System-Secret": SYSTEM_SECRET})
    assert status == 201
    key["since"] = since
    client = openai.OpenAI(api_key=key["key"], base_url=routing_gateway.base_url + "/v1", max_retries=0, timeout=30)
    n = 6
    for i in range(n):
        if i % 2:
            text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                model="resilient", messages=MESSAGES, stream=True) if c.choices)
        else:
            text = client.chat.completions.create(model="resilient", messages=MESSAGES).choices[0].message.content
        assert text.startswith("Echo:")
    rows = key_rows(clean_db, key, n)
    assert {(r["provider"], r["status"]) for r in rows} == {("live", "ok")}

    def every_worker_published() -> tuple[dict, dict] | None:
        code, _, report = http_json("GET", routing_gateway.base_url + "/v1/providers/status",
                                    headers={"X-System-Secret": SYSTEM_SECRET})
        assert code == 200
        by_name = {d["deployment"]: d for d in report["data"]}
        live = by_name.get("live/gpt-4o-mini")
        return (report, by_name) if live is not None and live["requests"] == n else None
    report, by_name = wait_until(every_worker_published, message="every worker's view in the status report")
    dead, live = by_name["dead/gpt-4o-mini"], by_name["live/gpt-4o-mini"]
    assert dead["status"] == "down" and dead["circuit"] == "open" and dead["last_error"] == "unavailable"
    assert live["status"] == "up" and live["requests"] == n and live["p50_latency_ms"] is not None
    assert report["workers_reporting"] >= 1

    code, _, uptime = http_json("GET", routing_gateway.base_url + "/v1/uptime/resilient",
                                headers={"Authorization": f"Bearer {key['key']}"})
    assert code == 200 and uptime["status"] == "up"
    assert {(d["provider"], d["status"]) for d in uptime["deployments"]} == {("dead", "down"), ("live", "up")}
