"""The completion run settles exactly once on every exit path: success (whole or streamed), a
provider error, an upstream timeout, the client gone before or after the first byte, the
upstream dying mid-stream, an exception of ours (in a provider adapter, in the encoder, in the
controller), a refusal after admission. "Settled" is checked where it lands: the number of
usage rows, the key's concurrency lease (Redis), and its day-token counter holding the actual
tokens instead of the reservation. Real PostgreSQL and Redis, the fake OpenAI upstream."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import pytest
import redis
from flask import Response

from app.api.auth import authenticate
from app.errors import APIError, RateLimited, ServiceUnavailable
from app.providers.base import ProviderError, StreamPiece
from app.services.completion import CompletionRun
from Testing.conftest import app_config, close_app, minter, usage_rows
from Testing.support import REDIS_URL

MESSAGES = [{"role": "user", "content": "hello there"}]  # the fake bills 2 words + 7 = 9 prompt tokens
# max_tokens 50 is reserved, the fake answers 20 pieces: a second settlement would refund the
# difference again and the day-token counter would no longer equal the row's tokens.
PRICING = {"input_per_mtok": "1", "output_per_mtok": "2"}
UNSET_KEY = "COMPLETION_TEST_NEVER_SET_KEY"


def models_file(path: Path, upstream: str) -> Path:
    def m(*deps: tuple[str, str, dict]) -> dict:
        return {"deployments": [{"provider": p, "model": mo, **kw} for p, mo, kw in deps],
                "context_window": 128000, "max_output_tokens": 100, "pricing": PRICING}

    up = {"type": "openai", "base_url": upstream, "timeout_s": 2, "connect_timeout_s": 1}
    data = {"providers": {"up": up, "slowup": {**up, "read_timeout_s": 0.3},
                          "unset": {**up, "api_key_env": UNSET_KEY}},
            "models": {"ok": m(("up", "gpt-4o-mini", {})),
                       "bad": m(("up", "fake-fail-400", {})),
                       "hang": m(("slowup", "fake-hang", {})),
                       "die": m(("up", "fake-die-mid-stream", {})),
                       "quota": m(("up", "quota-model", {"rpm": 1})),
                       "half-configured": m(("unset", "never-called", {"priority": 1}),
                                            ("up", "served", {"priority": 2})),
                       "unconfigured": m(("unset", "never-called", {}))}}
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def capp(pg_url, tmp_path_factory, fake_upstream):
    from app import create_app
    path = models_file(tmp_path_factory.mktemp("completion") / "models.json", fake_upstream.base_url)
    # One attempt per request: each exit path is taken once, without retries in between.
    application = create_app(app_config(pg_url, path, ROUTER_MAX_ATTEMPTS=1, STREAM_KEEPALIVE_S=0,
                                        BREAKER_FAILURE_THRESHOLD=1, BREAKER_MIN_REQUESTS=1))
    yield application
    close_app(application)


@pytest.fixture
def rt(capp, clean_db):
    return capp.extensions["gateway"]


@pytest.fixture
def key(capp, rt, admin_headers) -> Any:
    """A key with a concurrency limit of 1 and a day-token limit: every run holds a lease and a
    token reservation until it settles."""
    minted = minter(capp.test_client(), admin_headers)(name="run", max_concurrent=1,
                                                       daily_token_limit=1_000_000)
    with capp.test_request_context(headers={"Authorization": f"Bearer {minted['key']}"}):
        return authenticate()


def body(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": MESSAGES, "max_tokens": 50, **extra}


def settled(rt: Any, key: Any) -> tuple[list[dict], int, int]:
    """(the key's usage rows, its leases held, its day-token counter) once the background
    writers have sent what the settlement queued."""
    assert rt.limiter.flush(10) and rt.usage_batcher.flush(10)
    rows = usage_rows(rt.engine, "api_key_id = :k", {"k": key.id})
    client = redis.Redis.from_url(REDIS_URL)
    try:
        prefix = f"gw:{{t:{key.tenant_id}}}:k:{key.id}"
        leases = client.zcard(f"{prefix}:lease")
        day_tokens = sum(int(client.get(k)) for k in client.scan_iter(f"{prefix}:tpd:*"))
    finally:
        client.close()
    return rows, leases, day_tokens


def only_row(rt: Any, key: Any) -> dict:
    rows, leases, day_tokens = settled(rt, key)
    assert len(rows) == 1, rows
    assert leases == 0
    assert day_tokens == rows[0]["total_tokens"]  # the reservation was replaced by the actual use
    return rows[0]


def read_all(resp: Response) -> bytes:
    data = b"".join(resp.response)
    resp.close()
    return data


def sse(pieces: Iterator[StreamPiece | None]) -> Iterator[bytes]:
    for piece in pieces:
        if piece is not None:
            yield b"data: " + piece.data() + b"\n\n"


# -- the paths that answer ---------------------------------------------------------------------

def test_whole_answer_settles_once_when_the_response_closes(rt, key):
    run = CompletionRun.begin(rt, key, body("ok"))
    with run:
        resp = run.respond(Response(run.complete().json_bytes()))
    assert settled(rt, key)[:2] == ([], 1)  # held until the response is closed
    assert json.loads(read_all(resp))["usage"]["completion_tokens"] == 20
    resp.close()  # a second close (servers may) settles nothing more
    run.close()
    row = only_row(rt, key)
    assert (row["status"], row["prompt_tokens"], row["completion_tokens"], row["endpoint"]) == \
        ("ok", 9, 20, "chat.completions")
    assert settled(rt, key)[2] == 29


def test_stream_read_to_its_end_settles_once(rt, key):
    run = CompletionRun.begin(rt, key, body("ok", stream=True), "responses")
    with run:
        resp = run.respond(Response(sse(run.stream())))
    data = read_all(resp)
    assert data.count(b"data: ") == 23  # role, 20 content chunks, finish, usage (the fake always sends it)
    row = only_row(rt, key)
    assert (row["status"], row["streamed"], row["endpoint"], row["total_tokens"]) == ("ok", True, "responses", 29)


# -- the paths that fail before the first byte ---------------------------------------------------

def test_provider_error_settles_once_and_raises_the_envelope(rt, key):
    run = CompletionRun.begin(rt, key, body("bad"))
    with pytest.raises(APIError) as info, run:
        run.complete()
    assert info.value.status == 400 and isinstance(info.value.__cause__, ProviderError)
    run.close()
    row = only_row(rt, key)
    assert (row["status"], row["error_type"], row["total_tokens"]) == ("error", "bad_request", 0)


def test_upstream_timeout_settles_once(rt, key):
    run = CompletionRun.begin(rt, key, body("hang", stream=True))
    with pytest.raises(APIError) as info, run:
        run.stream()
    assert info.value.status == 504
    row = only_row(rt, key)
    assert (row["status"], row["error_type"], row["total_tokens"]) == ("error", "timeout", 0)


def test_refusal_after_admission_releases_without_a_row(rt, key):
    """A deployment at its provider quota (rpm 1): the second run is refused (429) without an
    upstream call; it leaves no row and releases its lease and reservation."""
    first = CompletionRun.begin(rt, key, body("quota"))
    read_all(first.respond(Response(first.complete().json_bytes())))
    assert rt.limiter.flush(10)  # its lease is released in the background (concurrency limit 1)
    run = CompletionRun.begin(rt, key, body("quota"))
    with pytest.raises(RateLimited):
        run.complete()
    rows, leases, day_tokens = settled(rt, key)
    assert len(rows) == 1 and leases == 0 and day_tokens == 29


# -- the paths that end a stream early ---------------------------------------------------------------

def test_client_gone_before_the_first_byte_settles_once(rt, key):
    """The response is closed before its body was iterated (the generator never ran)."""
    run = CompletionRun.begin(rt, key, body("ok", stream=True))
    with run:
        resp = run.respond(Response(sse(run.stream())))
    resp.close()
    row = only_row(rt, key)
    assert (row["status"], row["prompt_tokens"]) == ("client_disconnected", 9)


def test_client_gone_after_the_first_byte_settles_once(rt, key):
    run = CompletionRun.begin(rt, key, body("ok", stream=True))
    with run:
        resp = run.respond(Response(sse(run.stream())))
    body_iter = iter(resp.response)
    assert next(body_iter).startswith(b"data: ")
    resp.close()
    row = only_row(rt, key)
    assert (row["status"], row["error_type"]) == ("client_disconnected", "client_disconnected")


def test_upstream_death_mid_stream_settles_once_and_reaches_the_encoder(rt, key):
    run = CompletionRun.begin(rt, key, body("die", stream=True))
    pieces, seen, failure = run.stream(), 0, None
    try:
        for _ in pieces:
            seen += 1
    except ProviderError as exc:
        failure = exc
    assert seen == 5 and failure is not None
    run.close()
    row = only_row(rt, key)
    assert (row["status"], row["error_type"]) == ("error", "unavailable")


# -- exceptions of our own code ----------------------------------------------------------------------

def test_exception_of_the_encoder_mid_stream_settles_once_as_internal(rt, key):
    def broken(pieces: Iterator[StreamPiece | None]) -> Iterator[bytes]:
        for _ in pieces:
            yield b"data: {}\n\n"
            raise RuntimeError("encoder bug")

    run = CompletionRun.begin(rt, key, body("ok", stream=True))
    with run:
        resp = run.respond(Response(broken(run.stream())))
    body_iter = iter(resp.response)
    next(body_iter)
    with pytest.raises(RuntimeError):
        next(body_iter)
    resp.close()
    row = only_row(rt, key)
    assert (row["status"], row["error_type"]) == ("error", "internal")


def test_exception_inside_the_run_mid_stream_settles_once_as_internal(rt, key):
    """A provider adapter (an `invoke`) whose translation breaks after the first piece."""
    def invoke(provider, deployment):
        upstream = provider.stream({**body("ok", stream=True), "model": deployment.model})
        yield next(upstream)
        upstream.abort()
        raise KeyError("translation bug")

    run = CompletionRun.begin(rt, key, body("ok", stream=True))
    with run:
        resp = run.respond(Response(sse(run.stream(invoke=invoke))))
    with pytest.raises(KeyError):
        read_all(resp)
    resp.close()
    row = only_row(rt, key)
    assert (row["status"], row["error_type"]) == ("error", "internal")


def test_exception_of_the_controller_before_respond_settles_once(rt, key):
    run = CompletionRun.begin(rt, key, body("ok"))
    with pytest.raises(ValueError), run:
        run.complete()
        raise ValueError("encoding bug")
    run.close()
    row = only_row(rt, key)
    assert (row["status"], row["error_type"], row["total_tokens"]) == ("error", "internal", 29)


def test_native_invoke_usage_details_reach_the_row(rt, key):
    """An `invoke` (native passthrough) bills the normalised usage it returns, details included."""
    from app.providers.base import Completion
    usage = {"prompt_tokens": 30, "completion_tokens": 4, "total_tokens": 34,
             "prompt_tokens_details": {"cached_tokens": 20}, "completion_tokens_details": {"reasoning_tokens": 3},
             "cache_creation_input_tokens": 6}
    run = CompletionRun.begin(rt, key, body("ok"), "messages")
    result = run.complete(invoke=lambda provider, deployment: Completion(raw=b"{}", usage=usage))
    read_all(run.respond(Response(result.json_bytes())))
    row = only_row(rt, key)
    assert (row["endpoint"], row["prompt_tokens"], row["completion_tokens"], row["cached_tokens"],
            row["cache_write_tokens"], row["reasoning_tokens"]) == ("messages", 30, 4, 20, 6, 3)


# -- deployments whose provider is not configured (never called, never a breaker's business) ---------

def test_unconfigured_deployment_is_skipped_and_its_breaker_stays_closed(rt, key):
    for _ in range(2):  # the breaker opens after 1 failure here: a second request would see it
        run = CompletionRun.begin(rt, key, body("half-configured"))
        read_all(run.respond(Response(run.complete().json_bytes())))
        assert rt.limiter.flush(10)  # its lease is released in the background (concurrency limit 1)
    rec = rt.health.get("unset/never-called")
    assert (rec.breaker.state, rec.requests) == ("closed", 0)
    rows, leases, _ = settled(rt, key)
    assert [(r["provider"], r["upstream_model"]) for r in rows] == [("up", "served"), ("up", "served")]

    run = CompletionRun.begin(rt, key, body("unconfigured"))
    with pytest.raises(ServiceUnavailable) as info:
        run.complete()
    assert info.value.code == "provider_not_configured" and UNSET_KEY in info.value.message
    assert rt.health.get("unset/never-called").breaker.state == "closed"
    rows, leases, _ = settled(rt, key)
    assert len(rows) == 2 and leases == 0


# -- uptime probes are completion runs too ---------------------------------------------------------

def test_uptime_probe_is_a_run_with_its_own_endpoint(capp, rt, admin_headers):
    """A probe round of a one-deployment alias: one row with endpoint "uptime" (streamed, one
    output token asked), the round's lease and reservation released."""
    client = capp.test_client()
    minted = minter(client, admin_headers)(name="probe", max_concurrent=1, daily_token_limit=1_000_000)
    with capp.test_request_context(headers={"Authorization": f"Bearer {minted['key']}"}):
        key = authenticate()
    resp = client.get("/v1/uptime/ok", headers={"Authorization": f"Bearer {minted['key']}"})
    assert resp.status_code == 200 and resp.get_json()["status"] == "up"
    row = only_row(rt, key)
    assert (row["endpoint"], row["status"], row["streamed"], row["upstream_model"]) == \
        ("uptime", "ok", True, "gpt-4o-mini")
