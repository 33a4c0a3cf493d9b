"""Billing never loses a completion, end to end under real gunicorn + gevent: PostgreSQL cut
mid-load (a TCP proxy between the gateway and the shared server, which is never stopped),
a worker SIGKILLed after its responses went out (outbox in Redis, or in the spool with Redis
down too), and SIGTERM during active streams."""
from __future__ import annotations

import os
import signal
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
from sqlalchemy import text

from app.services.usage_outbox import outbox_key
from Testing.conftest import app_config
from Testing.support import (REDIS_URL, SYSTEM_SECRET, GatewayProcess, free_port, http_json,
                             open_chat_stream, wait_until)

pytestmark = pytest.mark.timeout(120)
MESSAGES = [{"role": "user", "content": "count to three"}]


@pytest.fixture
def rclient(clean_db):
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    client.close()


def start_gateway(db_url: str, models_file: Path, tmp_path: Path, **overrides) -> GatewayProcess:
    """One gunicorn worker with its own outbox (spool directory and Redis list name), so no
    other gateway of the test run replays it."""
    env = app_config(db_url, models_file, LOG_LEVEL="INFO", USAGE_OUTBOX_POLL_S=0.2, AUTH_CACHE_TTL_S=0.5,
                     USAGE_SPOOL_DIR=str(tmp_path / "spool"), USAGE_WRITE_TIMEOUT_S=2,
                     USAGE_OUTBOX_NAME="usage-" + uuid.uuid4().hex[:8], **overrides)
    gw = GatewayProcess({k: str(v) for k, v in env.items()}, workers=1, log_path=tmp_path / "gw.log").start()
    gw.outbox_key = outbox_key(env["USAGE_OUTBOX_NAME"])
    return gw


def mint(gw: GatewayProcess, **fields) -> dict:
    status, _, body = http_json("POST", gw.base_url + "/v1/api-keys", {"name": "k", "tenant": "dur", **fields},
                                {"X-System-Secret": SYSTEM_SECRET})
    assert status == 201, body
    return body


def chat(gw: GatewayProcess, key: str, stream: bool = False) -> tuple[int, str | None, object]:
    status, headers, body = http_json("POST", gw.base_url + "/v1/chat/completions",
                                      {"model": "demo", "messages": MESSAGES, "stream": stream, "max_tokens": 8},
                                      {"Authorization": f"Bearer {key}"})
    return status, headers.get("X-Request-ID"), body


def request_ids(engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(text("SELECT request_id FROM usage_records")).scalars())


def rollup_requests(engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT coalesce(sum(requests), 0) FROM usage_daily")).scalar())


def test_postgres_outage_mid_load_every_completion_recorded_exactly_once(pg_url, models_file, tmp_path,
                                                                         pg_proxy, rclient, clean_db):
    """With PostgreSQL unreachable: completions keep being served for cached keys (also past the
    cache TTL), limits keep counting in Redis, an unknown key gets a 503 envelope, /health shows
    the outbox; once PostgreSQL is back every completion served appears exactly once."""
    gw = start_gateway(pg_proxy.url, models_file, tmp_path)
    try:
        key = mint(gw, rpm_limit=30)["key"]
        other = mint(gw, name="never-used")["key"]
        served = []
        for _ in range(3):
            status, rid, _ = chat(gw, key)
            assert status == 200
            served.append(rid)
        wait_until(lambda: len(request_ids(clean_db)) == 3, message="warm-up rows")

        pg_proxy.cut()
        # A real wait, and only a lower bound: the gateway is another process, whose clock the
        # test cannot move; it must be past AUTH_CACHE_TTL_S so the key comes from its last known state.
        time.sleep(0.6)
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda i: chat(gw, key, stream=i % 2 == 1), range(20)))
        assert [r[0] for r in results] == [200] * 20, results
        served += [r[1] for r in results]

        status, _, body = chat(gw, other)
        assert status == 503, body
        assert body["error"]["code"] == "database_unavailable" and body["error"]["type"]

        # the rpm limit (30) counted the outage's requests: 23 used, so 7 more pass (and one more
        # per 2 s the test has taken: the minute refills continuously), then 429
        more = [chat(gw, key) for _ in range(12)]
        assert any(s == 429 for s, _, _ in more), [s for s, _, _ in more]
        served += [rid for s, rid, _ in more if s == 200]
        assert len(served) - 23 >= 7

        wait_until(lambda: rclient.llen(gw.outbox_key) == len(served) - 3, timeout=20, message="rows in the outbox")
        status, _, health = http_json("GET", gw.base_url + "/health")
        assert status == 503 and health["database"] == "unavailable"
        assert health["usage_outbox"]["redis"] == len(served) - 3
        assert health["worker"]["usage_database_down"] is True
        assert request_ids(clean_db) == served[:3] or sorted(request_ids(clean_db)) == sorted(served[:3])

        pg_proxy.restore()
        wait_until(lambda: len(request_ids(clean_db)) == len(served), timeout=20, message="the outbox replayed")
        # absence of duplicates, proven once nothing is left to replay (not after a short sleep)
        wait_until(lambda: rclient.llen(gw.outbox_key) == 0, message="empty outbox")
        stored = request_ids(clean_db)
        assert sorted(stored) == sorted(served) and len(set(stored)) == len(stored)
        assert rollup_requests(clean_db) == len(served)
        status, _, health = http_json("GET", gw.base_url + "/health")
        assert status == 200 and health["worker"]["usage_database_down"] is False
    finally:
        gw.stop()
    log = gw.log_text()
    assert "rows go to the outbox" in log and "replaying the outbox" in log
    assert key not in log


@pytest.mark.parametrize("outbox", ["redis", "spool"])
def test_worker_sigkilled_after_its_responses_loses_none_of_them(pg_url, models_file, tmp_path, pg_proxy,
                                                                 rclient, clean_db, outbox):
    """During an outage a worker answers, its rows reach the outbox (Redis, or the fsync'ed
    spool when Redis is down too), then it is SIGKILLed: the worker gunicorn starts in its place
    replays them when PostgreSQL is back, so every finished request is billed once."""
    overrides = {} if outbox == "redis" else {"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    gw = start_gateway(pg_proxy.url, models_file, tmp_path, **overrides)
    try:
        key = mint(gw)["key"]  # no limits: admission needs no Redis
        assert chat(gw, key)[0] == 200
        wait_until(lambda: len(request_ids(clean_db)) == 1, message="warm-up row")
        pg_proxy.cut()
        served = []
        for i in range(10):
            status, rid, body = chat(gw, key, stream=i % 2 == 0)
            assert status == 200, body
            served.append(rid)

        def outbox_depth() -> int:
            if outbox == "redis":
                return rclient.llen(gw.outbox_key)
            return sum(p.read_bytes().count(b"\n") for p in (tmp_path / "spool").glob("*.spool"))
        wait_until(lambda: outbox_depth() == 10, timeout=20, message="rows in the outbox")
        [worker] = gw.worker_pids()
        os.kill(worker, signal.SIGKILL)
        wait_until(lambda: gw.worker_pids() not in ([], [worker]), timeout=20, message="a new worker")
        pg_proxy.restore()
        wait_until(lambda: len(request_ids(clean_db)) == 11, timeout=30, message="the outbox replayed")
        # absence of duplicates, proven once nothing is left to replay (not after a short sleep)
        wait_until(lambda: outbox_depth() == 0, timeout=30, message="empty outbox")
        stored = request_ids(clean_db)
        assert set(served) <= set(stored) and len(stored) == len(set(stored)) == 11
        assert rollup_requests(clean_db) == 11
    finally:
        gw.stop()


def read_until_closed(sock: socket.socket, timeout: float = 30) -> bytes:
    sock.settimeout(timeout)
    chunks = []
    while True:
        data = sock.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def test_sigterm_during_streams_finishes_them_and_writes_their_rows(pg_url, models_file, tmp_path, clean_db):
    """SIGTERM to gunicorn while streams are active: each stream still runs to `[DONE]`, and
    their usage rows are in PostgreSQL after the server exits."""
    gw = start_gateway(pg_url, models_file, tmp_path, GRACEFUL_TIMEOUT=20)
    try:
        key = mint(gw)["key"]
        socks = [open_chat_stream(gw.port, key, {"model": "slow-sim", "messages": MESSAGES, "stream": True,
                                                 "max_tokens": 30}, close=True) for _ in range(3)]
        firsts = []
        for s in socks:
            s.settimeout(10)
            firsts.append(s.recv(65536))
            assert firsts[-1].startswith(b"HTTP/1.1 200")
        gw.proc.send_signal(signal.SIGTERM)
        bodies = [first + read_until_closed(s) for first, s in zip(firsts, socks)]
        for body in bodies:
            assert body.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n"), body[-300:]  # the last chunk too
        assert gw.proc.wait(timeout=30) == 0
        rids = [next(line.split(b":", 1)[1].strip().decode() for line in body.split(b"\r\n")
                     if line.lower().startswith(b"x-request-id:")) for body in bodies]
        with clean_db.connect() as conn:
            rows = conn.execute(text("SELECT request_id, status, completion_tokens FROM usage_records")).all()
        assert sorted(r[0] for r in rows) == sorted(rids)
        assert all(r[1] == "ok" and r[2] > 0 for r in rows), rows
    finally:
        gw.stop()
