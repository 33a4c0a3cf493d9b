"""Embedded mode: `python run.py` with a SQLite DATABASE_URL and no Redis migrates the file at
start-up and serves the whole flow (health, minting, a completion) on its own."""
from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys

import pytest
from Testing.support import ROOT, SYSTEM_SECRET, free_port, head_revision, http_json, wait_until

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def embedded(tmp_path, models_file):
    port = free_port()
    db_file = tmp_path / "gw.db"
    log_path = tmp_path / "run.log"
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env.update({
        "DATABASE_URL": f"sqlite:///{db_file}",
        # empty, not just absent: run.py reads `.env` without overriding the real environment
        "REDIS_URL": "",
        "SYSTEM_SECRET": SYSTEM_SECRET, "PORT": str(port), "HOST": "127.0.0.1",
        "MODELS_FILE": str(models_file), "LOG_LEVEL": "INFO", "PYTHONUNBUFFERED": "1",
    })
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "run.py"], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"run.py exited with {proc.returncode}: {log_path.read_text()[-3000:]}")
        try:
            return http_json("GET", base + "/health", timeout=2)[0] in (200, 503)
        except OSError:
            return False

    try:
        wait_until(up, timeout=30, interval=0.1, message="run.py to answer /health")
        yield base, db_file, log_path
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_run_py_embedded_mode_serves_the_whole_flow(embedded):
    """run.py on SQLite without Redis: embedded health, minting, a demo completion, usage in the file."""
    base, db_file, log_path = embedded
    status, _, health = http_json("GET", base + "/health")
    assert status == 200, health
    assert health["status"] == "ok"
    assert health["database"] == "ok (embedded sqlite)"
    assert "not configured" in health["redis"]

    status, _, key = http_json("POST", base + "/v1/api-keys", {"name": "local", "tenant": "me"},
                               headers={"X-System-Secret": SYSTEM_SECRET})
    assert status == 201, key
    assert key["key"].startswith("sk-") and key["tenant"] == "me"

    status, headers, body = http_json(
        "POST", base + "/v1/chat/completions",
        {"model": "demo", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8},
        headers={"Authorization": f"Bearer {key['key']}"})
    assert status == 200, body
    assert body["object"] == "chat.completion" and body["model"] == "demo"
    assert isinstance(body["choices"][0]["message"]["content"], str)
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert headers.get("X-Request-ID", "").startswith("req_")

    status, _, _ = http_json("GET", base + "/v1/models", headers={"Authorization": "Bearer sk-nope"})
    assert status == 401

    assert db_file.exists()
    with sqlite3.connect(db_file) as conn:
        rows = conn.execute("SELECT key_hash, prefix FROM api_keys").fetchall()
        version = conn.execute("SELECT version_num FROM alembic_version").fetchall()
    assert rows == [(hashlib.sha256(key["key"].encode()).hexdigest(), key["prefix"])]
    assert version == [(head_revision(),)]

    def usage_written() -> bool:
        with sqlite3.connect(db_file) as conn:
            return conn.execute("SELECT count(*) FROM usage_records WHERE model = 'demo' AND status = 'ok'"
                                ).fetchone()[0] == 1
    wait_until(usage_written, timeout=10, message="the usage row of the completion in SQLite")

    output = log_path.read_text(errors="replace")
    assert "embedded" in output.lower(), output[-2000:]
    assert key["key"] not in output


def test_embedded_mode_serves_the_console_my_key_and_requests(embedded):
    """The console and its two read endpoints work on SQLite with the in-process limiter too:
    /ui/ is served, /v1/key shows the limiter's headroom, /v1/requests pages the SQLite rows."""
    base, _, _ = embedded
    status, headers, page = http_json("GET", base + "/ui/")
    assert status == 200 and "Content-Security-Policy" in headers and "/ui/assets/console/app.js" in page
    status, _, key = http_json("POST", base + "/v1/api-keys", {"name": "local", "tenant": "me", "rpm_limit": 3},
                               headers={"X-System-Secret": SYSTEM_SECRET})
    auth = {"Authorization": f"Bearer {key['key']}"}
    for text in ("one", "two"):
        status, _, body = http_json("POST", base + "/v1/chat/completions", {
            "model": "demo", "max_tokens": 4, "messages": [{"role": "user", "content": text}]}, headers=auth)
        assert status == 200, body
    status, _, mine = http_json("GET", base + "/v1/key", headers=auth)
    assert status == 200 and mine["headroom"]["requests_this_minute"]["remaining"] == 1

    def listed() -> list:
        return http_json("GET", base + "/v1/requests?limit=5", headers=auth)[2]["data"]
    wait_until(lambda: len(listed()) == 2, message="two requests listed")
    rows = listed()
    status, _, first = http_json("GET", base + "/v1/requests?limit=1", headers=auth)
    assert first["has_more"] is True and first["data"][0]["request_id"] == rows[0]["request_id"]
    status, _, second = http_json("GET", base + f"/v1/requests?limit=1&cursor={first['next_cursor']}", headers=auth)
    assert status == 200 and second["data"][0]["request_id"] == rows[1]["request_id"]
    assert second["has_more"] is False


def test_embedded_mode_caches_answers_in_the_process(embedded, fake_upstream):
    """Without Redis the response cache lives in the process: the second identical request of
    a key with `cache: true` is answered without the upstream (streamed too), its usage row in
    SQLite says `cached` with the saved cost, and POST /api/clear-cache empties it."""
    base, db_file, _ = embedded
    status, _, key = http_json("POST", base + "/v1/api-keys", {"name": "local", "tenant": "me", "cache": True},
                               headers={"X-System-Secret": SYSTEM_SECRET})
    assert status == 201 and key["cache"] is True, key
    auth = {"Authorization": f"Bearer {key['key']}"}
    messages = [{"role": "user", "content": f"embedded {key['prefix']}"}]
    body = {"model": "gpt-4o-mini", "messages": messages}

    def upstream_calls() -> int:
        return sum(1 for r in fake_upstream.chat_requests() if r["body"] and r["body"].get("messages") == messages)

    states = [http_json("POST", base + "/v1/chat/completions", body, headers=auth)[1]["X-Gateway-Cache"]
              for _ in range(2)]
    assert states == ["miss", "hit"] and upstream_calls() == 1
    status, headers, streamed = http_json("POST", base + "/v1/chat/completions", {**body, "stream": True}, headers=auth)
    assert status == 200 and headers["X-Gateway-Cache"] == "hit" and streamed.rstrip().endswith("data: [DONE]")
    status, _, cleared = http_json("POST", base + "/api/clear-cache", {"tenant": "me"},
                                   headers={"X-System-Secret": SYSTEM_SECRET})
    assert status == 200 and cleared["tenants_cleared"] == 1
    assert http_json("POST", base + "/v1/chat/completions", body, headers=auth)[1]["X-Gateway-Cache"] == "miss"
    assert upstream_calls() == 2

    def rows() -> list:
        with sqlite3.connect(db_file) as conn:
            return conn.execute("SELECT cached, cost_usd, saved_cost_usd FROM usage_records "
                                "WHERE model = 'gpt-4o-mini' ORDER BY created_at").fetchall()
    wait_until(lambda: len(rows()) == 4, timeout=10, message="four usage rows in SQLite")
    (miss, miss_cost, miss_saved), (hit, hit_cost, saved), (hit2, _, _), (again, _, _) = rows()
    assert (miss, hit, hit2, again) == (0, 1, 1, 0)
    assert miss_saved is None and float(hit_cost) == 0 and float(saved) == float(miss_cost) > 0
