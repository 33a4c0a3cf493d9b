"""Provider throttling end to end: deployments with a quota and `queue_timeout_s` make
requests wait (in arrival order, shared through Redis by separate gunicorn + gevent gateway
processes) instead of refusing them, and never let the provider see more than its quota.

The quota window is shortened with DEPLOYMENT_QUOTA_WINDOW_S (rpm = requests per window) so
that a test waits seconds, not minutes. Only lower bounds of time are used: the window
separates batches, and the fake upstream's receipt times prove the quota held."""
from __future__ import annotations

import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from Testing.conftest import app_config
from Testing.fakes.fake_openai import FakeOpenAI
from Testing.support import SYSTEM_SECRET, GatewayProcess, http_json, wait_until, write_models_file

RPM, QUEUE_TIMEOUT_S = 30, 5
# Transit jitter allowed between the quota's admission (Redis time) and the fake's receipt time.
JITTER_S = 0.3


def throttled_models(path: Path, upstream: str) -> Path:
    write_models_file(path, upstream)
    data = json.loads(path.read_text())
    pricing = {"input_per_mtok": "0.15", "output_per_mtok": "0.60"}
    extra = {
        "throttled": {"provider": "openai", "model": "gpt-throttled", "rpm": RPM, "queue_timeout_s": QUEUE_TIMEOUT_S},
        "one-a-day": {"provider": "openai", "model": "gpt-one-a-day", "rpd": 1, "queue_timeout_s": 1},
        "held": {"provider": "openai", "model": "gpt-held", "rpm": 1, "queue_timeout_s": 8},
    }
    for alias, dep in extra.items():
        data["models"][alias] = {"deployments": [dep], "context_window": 128000, "max_output_tokens": 64,
                                 "pricing": pricing, "tokenizer": "cl100k_base"}
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def upstream():
    """A fake upstream of this module only: its request log holds only these tests' calls."""
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture(scope="module")
def models(tmp_path_factory, upstream) -> Path:
    return throttled_models(tmp_path_factory.mktemp("throttle") / "models.json", upstream.base_url)


def gateways(pg_url: str, models: Path, window_s: float, count: int, tmp: Path) -> list[GatewayProcess]:
    env = {k: str(v) for k, v in app_config(pg_url, models, DEPLOYMENT_QUOTA_WINDOW_S=window_s).items()}
    procs = [GatewayProcess(env, workers=1, log_path=tmp / f"gw{i}.log") for i in range(count)]
    try:
        for proc in procs:
            proc.start()
    except BaseException:
        for proc in procs:
            proc.stop()
        raise
    return procs


@pytest.fixture(scope="module")
def pair(pg_url, models, tmp_path_factory):
    """Two gateway processes on one Redis and one PostgreSQL, quota window 2 s."""
    procs = gateways(pg_url, models, 2.0, 2, tmp_path_factory.mktemp("pair"))
    yield procs
    for proc in procs:
        proc.stop()


def mint(base_url: str, **fields) -> str:
    status, _, body = http_json("POST", base_url + "/v1/api-keys", {"name": "q", "tenant": "queue-team", **fields},
                                {"X-System-Secret": SYSTEM_SECRET})
    assert status == 201, body
    return body["key"]


def complete(base_url: str, key: str, model: str, text: str) -> tuple[int, dict, object]:
    return http_json("POST", base_url + "/v1/chat/completions",
                     {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 3},
                     {"Authorization": f"Bearer {key}"}, timeout=60)


def most_in_any_window(times: list[float], window: float) -> int:
    times = sorted(times)
    return max((sum(1 for u in times[i:] if u < t + window) for i, t in enumerate(times)), default=0)


def test_sixty_requests_at_once_wait_for_the_quota_instead_of_failing(pair, upstream, clean_db):
    """60 requests at once across two gateway processes on a deployment with rpm 30 (per 2 s
    window here) and queue_timeout_s 5: none is refused (each one's slot comes within 2 s), and
    the provider never receives more than 30 in any window."""
    key = mint(pair[0].base_url)
    with ThreadPoolExecutor(60) as pool:
        results = list(pool.map(lambda i: complete(pair[i % 2].base_url, key, "throttled", f"q{i}"), range(60)))
    assert [status for status, _, _ in results] == [200] * 60, [body for s, _, body in results if s != 200][:3]
    times = [r["time"] for r in upstream.chat_requests() if r["body"]["model"] == "gpt-throttled"]
    assert len(times) == 60
    assert max(times) - min(times) >= 2.0 - JITTER_S  # the second 30 came a window after the first
    assert most_in_any_window(times, 2.0 - JITTER_S) <= RPM


def test_no_slot_within_the_timeout_is_a_429_with_retry_after(pair, clean_db):
    """A deployment at its daily quota: the next request waits its 1 s, then gets the usual
    429 rate_limit_exceeded with Retry-After (the time until the quota frees)."""
    key = mint(pair[0].base_url)
    assert complete(pair[0].base_url, key, "one-a-day", "first")[0] == 200
    status, headers, body = complete(pair[1].base_url, key, "one-a-day", "second")
    assert status == 429
    assert body["error"]["code"] == "rate_limit_exceeded" and "queue timeout" in body["error"]["message"]
    assert int(headers["Retry-After"]) >= 1


def queue_length(base_url: str, deployment: str) -> int:
    status, _, body = http_json("GET", base_url + "/v1/providers/status", headers={"X-System-Secret": SYSTEM_SECRET})
    assert status == 200, body
    [entry] = [d for d in body["data"] if d["deployment"] == deployment]
    return entry["queue"]["length"]


def queue_metrics(base_url: str, deployment: str) -> tuple[float, float]:
    """(queue length, oldest wait in seconds) of a deployment as GET /metrics shows them."""
    status, _, body = http_json("GET", base_url + "/metrics")
    assert status == 200, body
    label = f'{{deployment="{deployment}"}} '
    figures = {}
    for line in body.splitlines() if isinstance(body, str) else body.decode().splitlines():
        for name in ("gateway_provider_queue_length", "gateway_provider_queue_oldest_wait_seconds"):
            if line.startswith(name + label):
                figures[name] = float(line.rsplit(" ", 1)[1])
    return figures["gateway_provider_queue_length"], figures["gateway_provider_queue_oldest_wait_seconds"]


def open_request(base_url: str, key: str, model: str, text: str) -> socket.socket:
    """A chat request sent over a raw socket, so that the test can hang up while it waits."""
    host, port = base_url.rsplit("/", 1)[1].split(":")
    data = json.dumps({"model": model, "messages": [{"role": "user", "content": text}]}).encode()
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + key.encode() + b"\r\nContent-Length: "
                 + str(len(data)).encode() + b"\r\n\r\n" + data)
    return sock


@pytest.fixture
def slow_window_gateway(pg_url, models, tmp_path):
    """One gateway process with a 4 s quota window (so the queue can be watched)."""
    [proc] = gateways(pg_url, models, 4.0, 1, tmp_path)
    yield proc
    proc.stop()


def test_clients_that_hang_up_leave_the_queue_and_the_next_gets_the_slot(slow_window_gateway, upstream, clean_db):
    """Two queued clients hang up: the queue shrinks at once, they never reach the provider,
    and the slot goes to the client queued after them (which, behind them, would have waited
    past its 8 s timeout). Waiting requests hold the key's concurrency slot; they are shown in
    /v1/providers/status and in /metrics (queue length and oldest wait per deployment)."""
    base = slow_window_gateway.base_url
    key = mint(base)
    assert complete(base, key, "held", "takes the slot")[0] == 200
    gone = []
    for n, text in enumerate(["hangs up 1", "hangs up 2"], start=1):
        gone.append(open_request(base, key, "held", text))
        wait_until(lambda: queue_length(base, "openai/gpt-held") == n, message=f"{n} waiting")
    result: list = []
    waiter = threading.Thread(target=lambda: result.append(complete(base, key, "held", "stays")))
    waiter.start()
    wait_until(lambda: queue_length(base, "openai/gpt-held") == 3, message="3 waiting")
    length, oldest_wait = queue_metrics(base, "openai/gpt-held")
    assert length == 3.0 and oldest_wait > 0, (length, oldest_wait)
    for sock in gone:
        sock.close()
    wait_until(lambda: queue_length(base, "openai/gpt-held") == 1, message="the two gone left the queue")
    waiter.join(timeout=60)
    assert result and result[0][0] == 200, result
    texts = [r["body"]["messages"][-1]["content"] for r in upstream.chat_requests() if r["body"]["model"] == "gpt-held"]
    assert texts == ["takes the slot", "stays"]
    assert queue_length(base, "openai/gpt-held") == 0
    assert queue_metrics(base, "openai/gpt-held") == (0.0, 0.0)


def test_a_waiting_request_holds_its_keys_concurrency_slot(slow_window_gateway, clean_db):
    """Waiting requests were admitted: with max_concurrent 1, a second request of the key is
    refused (concurrency) while the first waits in the queue."""
    base = slow_window_gateway.base_url
    key = mint(base, max_concurrent=1)
    assert complete(base, key, "held", "first")[0] == 200
    sock = open_request(base, key, "held", "waits")
    try:
        wait_until(lambda: queue_length(base, "openai/gpt-held") == 1, message="1 waiting")
        status, _, body = complete(base, key, "gpt-4o-mini", "meanwhile")
        assert status == 429, body
        assert "concurrent requests" in body["error"]["message"]
    finally:
        sock.close()
