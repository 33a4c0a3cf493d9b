"""gunicorn.config.py: what the production server refuses to do silently."""
from __future__ import annotations

import http.client
import json
import os
import re
import signal

import pytest

from Testing.conftest import app_config, usage_rows
from Testing.support import SYSTEM_SECRET, GatewayProcess, http_json, process_alive, wait_until


def test_embedded_limiter_runs_one_worker_and_says_why(pg_url, models_file, tmp_path, clean_db):
    """Without REDIS_URL each worker would hold its own limiter (every limit times the number of
    workers): gunicorn starts one worker although two were asked for, logs why, and a key's
    rpm limit holds exactly."""
    env = {k: str(v) for k, v in app_config(pg_url, models_file, REDIS_URL="").items()}
    with GatewayProcess(env, workers=2, log_path=tmp_path / "gw.log") as gw:
        assert len(gw.worker_pids()) == 1
        assert "REDIS_URL is not set" in gw.log_text() and "starting 1 worker instead of 2" in gw.log_text()
        status, _, body = http_json("POST", gw.base_url + "/v1/api-keys",
                                    {"name": "rpm", "tenant": "embedded", "rpm_limit": 2},
                                    {"X-System-Secret": SYSTEM_SECRET})
        assert status == 201, body
        statuses = [http_json("POST", gw.base_url + "/v1/chat/completions",
                              {"model": "demo", "messages": [{"role": "user", "content": "hi"}]},
                              {"Authorization": f"Bearer {body['key']}"})[0] for _ in range(6)]
        assert statuses == [200, 200, 429, 429, 429, 429]


@pytest.mark.timeout(120)
def test_a_worker_whose_master_is_killed_finishes_its_stream_and_records_it(pg_url, models_file, tmp_path,
                                                                           clean_db):
    """The gunicorn master is SIGKILLed while its worker sends a 5-second stream. gunicorn's
    own gevent worker would exit within a second, cutting the stream (and answer new requests
    while its runtime closes, recording none of them); the gateway's worker stops accepting,
    sends the stream to its end, stores its usage row, and only then exits."""
    env = {k: str(v) for k, v in app_config(pg_url, models_file, LOG_LEVEL="INFO").items()}
    gw = GatewayProcess(env, workers=1, log_path=tmp_path / "gw.log").start()
    [worker] = gw.worker_pids()
    try:
        status, _, key = http_json("POST", gw.base_url + "/v1/api-keys", {"name": "orphan", "tenant": "orphan"},
                                   {"X-System-Secret": SYSTEM_SECRET})
        assert status == 201, key
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=60)
        body = {"model": "slow-sim", "messages": [{"role": "user", "content": "count"}], "max_tokens": 100,
                "stream": True}   # 100 tokens at 20 tokens/s
        conn.request("POST", "/v1/chat/completions", json.dumps(body),
                     {"Authorization": f"Bearer {key['key']}", "Content-Type": "application/json"})
        resp = conn.getresponse()   # the headers come with the first event: the stream is running
        assert resp.status == 200
        os.kill(gw.proc.pid, signal.SIGKILL)
        payload = resp.read()
        assert payload.endswith(b"data: [DONE]\n\n")
        wait_until(lambda: not process_alive(worker), timeout=60, message="the orphaned worker to exit")
        rows = usage_rows(clean_db, "api_key_id = :k", {"k": key["id"]})
        assert [(r["request_id"], r["status"], r["streamed"]) for r in rows] == [
            (resp.getheader("X-Request-ID"), "ok", True)]
        assert f"master {gw.proc.pid} is gone" in gw.log_text()
    finally:
        if process_alive(worker):
            os.kill(worker, signal.SIGKILL)
        gw.stop()


def test_each_worker_freezes_its_start_up_objects(pg_url, models_file, tmp_path, clean_db):
    """Every worker moves what it built at start-up into the collector's permanent generation
    (no full collection walks it again) and says how many objects that was."""
    env = {k: str(v) for k, v in app_config(pg_url, models_file, LOG_LEVEL="INFO").items()}
    with GatewayProcess(env, workers=2, log_path=tmp_path / "gw.log") as gw:
        pids = gw.worker_pids()
        wait_until(lambda: len(re.findall(r"start-up objects frozen", gw.log_text())) == 2, timeout=30,
                   message="both workers' freeze lines")
        frozen = {int(pid): int(n) for pid, n in
                  re.findall(r"worker (\d+): (\d+) start-up objects frozen", gw.log_text())}
        assert set(frozen) == set(pids) and all(n > 10_000 for n in frozen.values())


@pytest.mark.parametrize("setting, expected", [
    ("auto", "gunicorn_h1c 0.6.10 (C)"),
    ("python", "python (HTTP_PARSER=python)"),
])
def test_each_worker_names_the_http_parser_gunicorn_uses(pg_url, models_file, tmp_path, clean_db,
                                                          setting, expected):
    """gunicorn parses requests with its C parser when gunicorn_h1c (requirements-fast.txt) is
    installed, unless HTTP_PARSER=python; each worker says which one it uses, and serves
    requests with it."""
    if setting == "auto":
        pytest.importorskip("gunicorn_h1c", reason="not built on this machine (no C compiler)")
    env = {k: str(v) for k, v in app_config(pg_url, models_file, LOG_LEVEL="INFO", HTTP_PARSER=setting).items()}
    with GatewayProcess(env, workers=1, log_path=tmp_path / "gw.log") as gw:
        [pid] = gw.worker_pids()
        wait_until(lambda: "HTTP parser:" in gw.log_text(), timeout=30, message="the worker's parser line")
        assert re.findall(r"worker (\d+): HTTP parser: (.*)", gw.log_text()) == [(str(pid), expected)]
        status, _, body = http_json("GET", gw.base_url + "/v1/models", None,
                                    {"Authorization": "Bearer sk-not-a-key"})
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
