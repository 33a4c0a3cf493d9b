"""What admission reserves and when it counts (Flask test client, real PostgreSQL and Redis):
the token and money reservation counts everything the provider bills (`n` choices, tools,
functions, a response_format schema, images), a request that can never fit is refused, and a
key already over its requests/min or concurrency limit is refused before any tokenising.

The `demo` model counts with o200k_base; "Hi" from a user is 3 (priming) + 3 (message) + 1
("user") + 1 ("Hi") = 8 prompt tokens. x-ratelimit-remaining-tokens = tpm - reserved."""
from __future__ import annotations

import pytest

from app.services.rate_limit_service import KeyLimits
from app.utils import token_counter
from Testing.conftest import app_config, close_app, minter, start_app
from Testing.support import SYSTEM_SECRET

HI = [{"role": "user", "content": "Hi"}]
# Keys in sorted order, as Flask's test client sends them: its compact JSON is 21 tokens.
TOOL = [{"function": {"name": "get_weather", "parameters": {"type": "object"}}, "type": "function"}]


def _chat(client, key: str, **body):
    return client.post("/v1/chat/completions", json={"model": "demo", "messages": HI, **body},
                       headers={"Authorization": f"Bearer {key}"})


def _remaining(resp) -> int:
    assert resp.status_code == 200, resp.get_json()
    return int(resp.headers["x-ratelimit-remaining-tokens"])


@pytest.mark.parametrize("extra,reserved", [
    ({"max_tokens": 100}, 8 + 100),
    ({"max_tokens": 100, "n": 5}, 8 + 5 * 100),
    ({"max_tokens": 10, "tools": TOOL}, 8 + 21 + 10),
    ({"max_tokens": 10, "functions": [TOOL[0]["function"]]}, 8 + 14 + 10),
    ({"max_tokens": 10, "response_format": {"type": "json_schema",
                                            "json_schema": {"name": "answer", "schema": {"type": "object"}}}},
     8 + 11 + 10),
    ({"max_tokens": 10, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "Hi"},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": "low"}}]}]},
     8 + 85 + 10),
    ({"max_tokens": 10, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "Hi"}, {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]},
     8 + 1445 + 10),
])
def test_the_reservation_counts_everything_the_provider_bills(client, mint, extra, reserved):
    """Output cap x n, tool/function definitions, a JSON schema and image parts are reserved."""
    key = mint(tpm_limit=10000)["key"]
    assert _remaining(_chat(client, key, **extra)) == 10000 - reserved


def test_n_choices_that_can_never_fit_the_tpm_limit_are_400(client, mint):
    """n=20 x max_tokens=100 reserves 2008 tokens: more than a 1000 tpm limit can ever admit."""
    key = mint(tpm_limit=1000)["key"]
    resp = _chat(client, key, max_tokens=100, n=20)
    assert resp.status_code == 400
    assert resp.get_json()["error"]["code"] == "request_too_large_for_limit"
    assert _chat(client, key, max_tokens=100, n=2).status_code == 200


def test_tools_that_can_never_fit_the_tpm_limit_are_400(client, mint):
    """Tool definitions of ~2000 tokens and max_tokens=10 against a 1000 tpm limit: 400."""
    key = mint(tpm_limit=1000)["key"]
    big_tool = [{"type": "function", "function": {"name": "f", "description": "word " * 2000,
                                                  "parameters": {"type": "object"}}}]
    resp = _chat(client, key, max_tokens=10, tools=big_tool)
    assert resp.status_code == 400
    assert resp.get_json()["error"]["code"] == "request_too_large_for_limit"


def test_n_choices_are_priced_against_the_budget(client, mint):
    """n=100 x max_tokens=1000 at $0.40/Mtok output reserves $0.04: more than a $0.01 budget
    (429 insufficient_quota); n=1 reserves $0.0004 and is admitted."""
    key = mint(budget_usd="0.01")["key"]
    resp = _chat(client, key, max_tokens=1000, n=100)
    assert resp.status_code == 429
    assert resp.get_json()["error"]["type"] == "insufficient_quota"
    assert _chat(client, key, max_tokens=1000, n=1).status_code == 200


@pytest.fixture
def token_counts(monkeypatch) -> list[int]:
    """Every tokenising call of the gateway (token_counter.count_text), recorded."""
    calls: list[int] = []
    real = token_counter.count_text

    def spy(text: str, encoding: str = token_counter.DEFAULT_ENCODING) -> int:
        calls.append(len(text))
        return real(text, encoding)
    monkeypatch.setattr(token_counter, "count_text", spy)
    return calls


HUGE = [{"role": "user", "content": "lorem ipsum dolor " * 12000}]  # ~216 KB: above every context bound


def test_a_key_over_its_rpm_is_refused_before_its_prompt_is_counted(client, mint, token_counts):
    """A key at its requests/min limit sending a 216 KB prompt gets 429 with no token counted."""
    key = mint(rpm_limit=1, tpm_limit=10_000_000)["key"]
    assert _chat(client, key, max_tokens=5).status_code == 200
    token_counts.clear()
    resp = _chat(client, key, messages=HUGE, max_tokens=5)
    assert resp.status_code == 429
    assert "requests per minute" in resp.get_json()["error"]["message"]
    assert resp.headers["Retry-After"]
    assert token_counts == []


def test_without_redis_too_a_key_over_its_rpm_is_refused_before_counting(pg_url, models_file, clean_db,
                                                                          token_counts):
    """The in-process limiter (no REDIS_URL) refuses the same way before counting."""
    app = start_app(app_config(pg_url, models_file, REDIS_URL=""))
    try:
        client = app.test_client()
        key = minter(client, {"X-System-Secret": SYSTEM_SECRET})(rpm_limit=1, tpm_limit=10_000_000)["key"]
        assert _chat(client, key, max_tokens=5).status_code == 200
        token_counts.clear()
        assert _chat(client, key, messages=HUGE, max_tokens=5).status_code == 429
        assert token_counts == []
    finally:
        close_app(app)


def test_a_key_at_its_concurrency_limit_is_refused_before_its_prompt_is_counted(client, app, mint, token_counts):
    """A key whose only concurrent slot is taken gets 429 for a 216 KB prompt with no token counted."""
    minted = mint(max_concurrent=1, tpm_limit=10_000_000)
    limiter = app.extensions["gateway"].limiter
    held = limiter.admit(KeyLimits(key_id=minted["id"], tenant_id=minted["tenant_id"], max_concurrent=1,
                                   tpm=10_000_000), "req_holding_the_slot", 0, 0)
    assert held.admitted
    token_counts.clear()
    resp = _chat(client, minted["key"], messages=HUGE, max_tokens=5)
    assert resp.status_code == 429
    assert "concurrent" in resp.get_json()["error"]["message"]
    assert token_counts == []
