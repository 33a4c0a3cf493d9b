"""Broken and hostile upstreams, and clients that stop reading, against the real gunicorn +
gevent gateway, PostgreSQL and Redis (issue 16 items 9-12)."""
from __future__ import annotations

import json
import secrets
import socket
from datetime import datetime, timezone

import pytest

from Testing.conftest import app_config, key_rows
from Testing.fakes import fake_hostile
from Testing.fakes.fake_hostile import HostileOpenAI
from Testing.support import SYSTEM_SECRET, GatewayProcess, http_json, open_chat_stream, wait_until

GROQ_KEY = "gsk_" + secrets.token_hex(20)  # a shape no credential pattern knows
MESSAGES = [{"role": "user", "content": "say hello"}]
MODELS = ["echo-key", "usage-string", "usage-negative", "usage-huge", "usage-missing", "late-usage",
          "no-usage-hang", "long-stream"]
IDLE_S = 3


@pytest.fixture(scope="module")
def hostile():
    with HostileOpenAI() as fake:
        yield fake


@pytest.fixture(scope="module")
def gw(pg_url, hostile, tmp_path_factory):
    """2 gevent workers; the hostile upstream is a Groq-like provider whose key is GROQ_KEY."""
    folder = tmp_path_factory.mktemp("hostile")
    models = {
        "providers": {"groq": {"type": "openai", "base_url": hostile.url + "/v1", "api_key_env": "GROQ_API_KEY",
                               "timeout_s": 30}},
        "models": {name: {"deployments": [{"provider": "groq", "model": f"hostile-{name}"}],
                          "context_window": 8192, "max_output_tokens": 1024, "tokenizer": "cl100k_base",
                          "pricing": {"input_per_mtok": "1.00", "output_per_mtok": "2.00"}} for name in MODELS},
    }
    (folder / "models.json").write_text(json.dumps(models))
    env = {k: str(v) for k, v in app_config(pg_url, folder / "models.json", LOG_LEVEL="INFO",
                                            STREAM_USAGE_GRACE_S=2, STREAM_CLIENT_IDLE_S=IDLE_S).items()}
    env["GROQ_API_KEY"] = GROQ_KEY
    proc = GatewayProcess(env, workers=2, log_path=folder / "gunicorn.log").start()
    yield proc
    proc.stop()
    assert GROQ_KEY not in proc.log_text(), "the provider key leaked into the gateway log"


def mint(gw, **fields) -> dict:
    fields.setdefault("name", "hostile")
    fields.setdefault("tenant", "hostile-tenant")
    since = datetime.now(timezone.utc)
    status, _, body = http_json("POST", gw.base_url + "/v1/api-keys", fields, {"X-System-Secret": SYSTEM_SECRET})
    assert status == 201, body
    return {**body, "since": since}


def chat(gw, key: str, model: str, **extra):
    return http_json("POST", gw.base_url + "/v1/chat/completions", {"model": model, "messages": MESSAGES, **extra},
                     {"Authorization": f"Bearer {key}"})


def stream_text(gw, key: str, model: str) -> tuple[int, str]:
    sock = open_chat_stream(gw.port, key, {"model": model, "messages": MESSAGES, "stream": True}, close=True)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    return int(data.split(b" ", 2)[1]), data.decode(errors="replace")


# --- 9. secrets echoed by an upstream --------------------------------------------------------------

def test_configured_key_echoed_by_upstream_is_redacted_in_answers(gw, clean_db):
    """An upstream that repeats the gateway's `gsk_...` key in its error: the client sees the
    error without the key (non-streaming and streaming), and so does the log (fixture teardown)."""
    key = mint(gw)["key"]
    status, _, body = chat(gw, key, "echo-key")
    assert status == 400
    text = json.dumps(body)
    assert GROQ_KEY not in text and "[redacted]" in text
    status, raw = stream_text(gw, key, "echo-key")
    assert status == 400 and GROQ_KEY not in raw and "[redacted]" in raw


# --- 10. malformed usage ---------------------------------------------------------------------------

# tiktoken (cl100k_base) counts of the prompt (MESSAGES) and of fake_hostile.ANSWER
PROMPT_COUNT, ANSWER_COUNT = 9, 5


def once_admitted(send):
    """send()'s result once it is not refused with 429 (the key's slot still held)."""
    results = []

    def attempt() -> bool:
        result = send()
        if result[0] == 429:
            return False
        results.append(result)
        return True
    wait_until(attempt, timeout=30, message="the key's concurrency slot to be released")
    return results[0]


@pytest.mark.parametrize("kind", ["usage-string", "usage-negative", "usage-huge", "usage-missing"])
@pytest.mark.parametrize("stream", [False, True])
def test_malformed_usage_is_counted_billed_marked_and_releases_the_slot(gw, clean_db, kind, stream):
    """Usage that is a string, negative, absurd or incomplete: the tokens are counted and billed,
    the row says usage_estimated, and the concurrency slot is released (the next request of a
    max_concurrent=1 key is admitted; the release runs just after the answer's last byte, so a
    request sent the moment that byte arrives may still find the slot taken: 429, no provider
    call, no row, and it is sent again)."""
    key = mint(gw, max_concurrent=1)
    for _ in range(2):
        if stream:
            status, raw = once_admitted(lambda: stream_text(gw, key["key"], kind))
            assert status == 200 and "[DONE]" in raw
        else:
            status, _, body = once_admitted(lambda: chat(gw, key["key"], kind))
            assert status == 200, body
    rows = key_rows(clean_db, key, 2)
    assert [(r["prompt_tokens"], r["completion_tokens"], r["usage_estimated"], r["status"]) for r in rows] == \
        [(PROMPT_COUNT, ANSWER_COUNT, True, "ok")] * 2
    assert all(r["cost_usd"] > 0 for r in rows)


# --- 12. billing on client hang-up -----------------------------------------------------------------

def _hang_up_after_first_event(gw, key: str, model: str) -> None:
    sock = open_chat_stream(gw.port, key, {"model": model, "messages": MESSAGES, "stream": True})
    data = b""
    while b"data:" not in data:
        data += sock.recv(4096)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()  # RST: the gateway's next write fails at once


def test_hang_up_bills_the_providers_usage_that_arrives_after(gw, clean_db):
    """The client leaves after the first event; the provider's usage chunk comes a second
    later: the gateway keeps reading for it and bills the provider's figures (not estimated)."""
    key = mint(gw)
    _hang_up_after_first_event(gw, key["key"], "late-usage")
    rows = key_rows(clean_db, key, 1)
    assert [(r["prompt_tokens"], r["completion_tokens"], r["usage_estimated"], r["status"]) for r in rows] == \
        [(fake_hostile.LATE_PROMPT, fake_hostile.LATE_COMPLETION, False, "client_disconnected")]


def test_hang_up_without_usage_counts_after_the_grace_period(gw, clean_db):
    """The provider never sends usage: the gateway reads on after the hang-up (two more words
    arrive then), and after the grace period (2 s here) bills its own count of the prompt and
    of the three words, and marks the row estimated."""
    key = mint(gw)
    _hang_up_after_first_event(gw, key["key"], "no-usage-hang")
    rows = key_rows(clean_db, key, 1, timeout=20)
    assert [(r["prompt_tokens"], r["completion_tokens"], r["usage_estimated"], r["status"]) for r in rows] == \
        [(PROMPT_COUNT, 3, True, "client_disconnected")]


# --- 11. clients that stop reading ---------------------------------------------------------------

RSS_BOUND_MB = 400  # per worker; unbounded read-ahead of 20 x 40 MiB streams goes far past it


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        line = next(l for l in status if l.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


@pytest.fixture(scope="module")
def gw_no_grace(pg_url, hostile, gw, tmp_path_factory):
    """The same gateway without the usage grace read after a hang-up, so that every byte the
    upstream sent was read before the clients were given up."""
    env = {**gw.env, "STREAM_USAGE_GRACE_S": "0"}
    for name in ("HOST", "PORT"):
        env.pop(name)
    proc = GatewayProcess(env, workers=2, log_path=tmp_path_factory.mktemp("no-grace") / "gunicorn.log").start()
    yield proc
    proc.stop()


def test_clients_that_stop_reading_hold_bounded_memory_and_are_given_up(gw_no_grace, hostile, clean_db):
    """20 clients open a fast 40 MiB stream each and read nothing: the gateway stops reading the
    upstream (each worker's RSS stays under a fixed bound), gives the clients up after the
    idle deadline and settles each run once as client_disconnected."""
    gw = gw_no_grace
    key = mint(gw)
    sent_before = hostile.sent_bytes
    socks = []
    for _ in range(20):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", gw.port))
        data = json.dumps({"model": "long-stream", "messages": MESSAGES, "stream": True}).encode()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + key["key"].encode() + b"\r\nContent-Length: "
                     + str(len(data)).encode() + b"\r\n\r\n" + data)
        socks.append(sock)
    try:
        rows = key_rows(clean_db, key, 20, timeout=120)
        # Every stream was given up while its client still held the connection open.
        assert {r["status"] for r in rows} == {"client_disconnected"} and len(rows) == 20
        peak = {pid: _rss_mb(pid) for pid in gw.worker_pids()}
        assert all(mb < RSS_BOUND_MB for mb in peak.values()), peak
        # Read before giving up: about the 1 MiB buffer and the socket buffers per stream, not the
        # 40 MiB of each answer.
        sent = hostile.sent_bytes - sent_before
        assert sent < 200 * 1024 * 1024, sent
        assert "Traceback" not in gw.log_text()  # given up like a client that left, quietly
    finally:
        for sock in socks:
            sock.close()
