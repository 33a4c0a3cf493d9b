"""The exact response cache end to end: real gunicorn + gevent (2 workers), Redis, PostgreSQL,
the official openai client, and the fake OpenAI upstream whose request log proves which
answers came from the cache (an answer served from the cache never reaches it)."""
from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from decimal import Decimal

import openai
import pytest
import redis
from openai import OpenAI

from Testing.conftest import app_config, key_rows
from Testing.support import (REDIS_URL, SYSTEM_SECRET, GatewayProcess, http_json, wait_until,
                             write_models_file)

ADMIN = {"X-System-Secret": SYSTEM_SECRET}


def mint(gateway, tenant: str = "cache-team", **fields) -> dict:
    """A key through the admin API; `since` (a time before it existed) finds its usage rows."""
    fields.setdefault("name", "cached")
    since = datetime.now(timezone.utc)
    status, _, body = http_json("POST", gateway.base_url + "/v1/api-keys", {"tenant": tenant, **fields}, ADMIN)
    assert status == 201, body
    return {**body, "since": since}


def prompt() -> list[dict]:
    """A prompt no other test sends (the fake upstream is shared by the whole run)."""
    return [{"role": "user", "content": f"tell me about {uuid.uuid4().hex[:12]}"}]


def chat(gateway, key: dict, messages: list[dict], model: str = "gpt-4o-mini", headers: dict | None = None,
         **extra) -> tuple[int, dict, dict]:
    return http_json("POST", gateway.base_url + "/v1/chat/completions",
                     {"model": model, "messages": messages, **extra},
                     {"Authorization": f"Bearer {key['key']}", **(headers or {})})


def upstream_calls(fake_upstream, messages: list[dict]) -> int:
    """How many chat requests with these messages reached the fake upstream."""
    return sum(1 for r in fake_upstream.chat_requests() if r["body"] and r["body"].get("messages") == messages)


def text_of(body: dict) -> str:
    return body["choices"][0]["message"]["content"]


def test_second_identical_request_is_served_from_the_cache(gateway, fake_upstream, clean_db):
    """A key with `cache: true`: the first request is a miss (the upstream answers, the
    response says X-Gateway-Cache: miss), the second identical one a hit (same answer, its own
    id, X-Gateway-Cache: hit) that never reaches the upstream. Field order does not matter."""
    key = mint(gateway, cache=True)
    messages = prompt()
    status, headers, first = chat(gateway, key, messages, max_tokens=50, temperature=0)
    assert status == 200, first
    assert headers["X-Gateway-Cache"] == "miss"
    status, headers, second = http_json(
        "POST", gateway.base_url + "/v1/chat/completions",
        {"temperature": 0, "max_tokens": 50, "messages": messages, "model": "gpt-4o-mini"},
        {"Authorization": f"Bearer {key['key']}"})
    assert status == 200, second
    assert headers["X-Gateway-Cache"] == "hit"
    assert text_of(second) == text_of(first) and second["usage"] == first["usage"]
    assert second["id"] != first["id"] and second["id"].startswith("chatcmpl-")
    assert upstream_calls(fake_upstream, messages) == 1


def test_streamed_replay_with_the_openai_client(gateway, fake_upstream, clean_db):
    """A streamed answer is stored as its final answer and replayed as chunks: the official
    client gets the same text, with usage when it asks; a non-streamed request for the same
    thing is a hit too; the upstream was called once."""
    key = mint(gateway, cache=True)
    client = OpenAI(base_url=gateway.base_url + "/v1", api_key=key["key"], max_retries=0)
    messages = prompt()

    def streamed() -> tuple[str, object, str]:
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=messages, stream=True, stream_options={"include_usage": True})
        text, usage = "", None
        for chunk in raw.parse():
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            if chunk.usage is not None:
                usage = chunk.usage
        return text, usage, raw.headers["X-Gateway-Cache"]

    first_text, first_usage, first_state = streamed()
    second_text, second_usage, second_state = streamed()
    assert (first_state, second_state) == ("miss", "hit")
    assert second_text == first_text and first_text.startswith("Echo: tell me about")
    assert second_usage.completion_tokens == first_usage.completion_tokens == 20
    assert second_usage.prompt_tokens == first_usage.prompt_tokens
    whole = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=messages)
    assert whole.headers["X-Gateway-Cache"] == "hit"
    assert whole.parse().choices[0].message.content == first_text
    assert whole.parse().choices[0].finish_reason == "stop"
    assert upstream_calls(fake_upstream, messages) == 1


def test_a_tenant_never_gets_another_tenants_answer(gateway, fake_upstream, clean_db):
    """Tenant B sending tenant A's request word for word is a miss: the upstream answers it."""
    key_a, key_b = mint(gateway, "tenant-a", cache=True), mint(gateway, "tenant-b", cache=True)
    messages = prompt()
    assert chat(gateway, key_a, messages)[1]["X-Gateway-Cache"] == "miss"
    assert chat(gateway, key_a, messages)[1]["X-Gateway-Cache"] == "hit"
    assert chat(gateway, key_b, messages)[1]["X-Gateway-Cache"] == "miss"
    assert chat(gateway, key_b, messages)[1]["X-Gateway-Cache"] == "hit"
    assert upstream_calls(fake_upstream, messages) == 2


def clear(gateway, body: dict | None, headers: dict) -> tuple[int, dict]:
    status, _, answer = http_json("POST", gateway.base_url + "/api/clear-cache", body, headers)
    return status, answer


def test_clear_cache_by_the_system_secret_a_tenant_admin_and_one_model(gateway, fake_upstream, clean_db):
    """POST /api/clear-cache: the system secret empties one tenant's cache (or one model's part
    of it); a tenant admin its own tenant's only (another tenant is a 404 and stays cached); a
    member key gets 403."""
    a_admin = mint(gateway, "clear-a", role="admin", cache=True)
    b_key = mint(gateway, "clear-b", cache=True)
    member = mint(gateway, "clear-a", cache=True)
    m1, m2 = prompt(), prompt()

    def state(key: dict, messages: list[dict], model: str = "gpt-4o-mini") -> str:
        status, headers, body = chat(gateway, key, messages, model)
        assert status == 200, body
        return headers["X-Gateway-Cache"]

    for key in (a_admin, b_key):
        assert [state(key, m1), state(key, m1, "demo"), state(key, m2)] == ["miss"] * 3
    assert clear(gateway, {}, {"Authorization": f"Bearer {member['key']}"})[0] == 403
    # a tenant admin: another tenant is not found, its own tenant is cleared
    status, body = clear(gateway, {"tenant": "clear-b"}, {"Authorization": f"Bearer {a_admin['key']}"})
    assert status == 404 and body["error"]["param"] == "tenant"
    status, body = clear(gateway, None, {"Authorization": f"Bearer {a_admin['key']}"})
    assert status == 200 and body == {"object": "cache.cleared", "tenant": "clear-a", "model": None,
                                      "tenants_cleared": 1}
    assert [state(a_admin, m1), state(a_admin, m2), state(b_key, m1), state(b_key, m2)] == \
        ["miss", "miss", "hit", "hit"]
    # the system secret, one model of one tenant: the other model stays
    status, body = clear(gateway, {"tenant": "clear-b", "model": "gpt-4o-mini"}, ADMIN)
    assert status == 200 and body["model"] == "gpt-4o-mini"
    assert [state(b_key, m1), state(b_key, m1, "demo")] == ["miss", "hit"]
    # an unknown model is a 404, not a silent no-op
    status, body = clear(gateway, {"model": "no-such-model"}, ADMIN)
    assert status == 404 and body["error"]["code"] == "model_not_found"
    # the system secret without a tenant: every tenant
    status, body = clear(gateway, None, ADMIN)
    assert status == 200 and body["tenant"] is None and body["tenants_cleared"] >= 2
    assert [state(a_admin, m1), state(b_key, m2)] == ["miss", "miss"]
    assert upstream_calls(fake_upstream, m2) == 4


def test_cache_control_no_cache_and_no_store(gateway, fake_upstream, clean_db):
    """`Cache-Control: no-cache` does not read the cache but stores the answer; `no-store`
    neither reads nor stores (and the response has no X-Gateway-Cache header);
    `X-Gateway-Cache: off` is the same as no-store."""
    key = mint(gateway, cache=True)
    fresh = prompt()
    assert chat(gateway, key, fresh, headers={"Cache-Control": "no-cache"})[1]["X-Gateway-Cache"] == "miss"
    assert chat(gateway, key, fresh)[1]["X-Gateway-Cache"] == "hit"          # no-cache stored it
    assert chat(gateway, key, fresh, headers={"Cache-Control": "no-cache"})[1]["X-Gateway-Cache"] == "miss"
    assert upstream_calls(fake_upstream, fresh) == 2                         # ... without reading it
    other = prompt()
    status, headers, _ = chat(gateway, key, other, headers={"Cache-Control": "no-store"})
    assert status == 200 and "X-Gateway-Cache" not in headers
    assert "X-Gateway-Cache" not in chat(gateway, key, other, headers={"X-Gateway-Cache": "off"})[1]
    assert chat(gateway, key, other)[1]["X-Gateway-Cache"] == "miss"        # nothing was stored
    assert upstream_calls(fake_upstream, other) == 3
    status, _, body = chat(gateway, key, other, headers={"X-Gateway-Cache": "maybe"})
    assert status == 400 and body["error"]["param"] == "X-Gateway-Cache"


def test_high_temperature_and_tools_are_cached_only_when_asked(gateway, fake_upstream, clean_db):
    """With the cache on for the key, a temperature above RESPONSE_CACHE_MAX_TEMPERATURE (1.0)
    or tools bypass it; `X-Gateway-Cache: on` caches them. A key without the setting uses the
    cache when the request asks."""
    key = mint(gateway, cache=True)
    hot = prompt()
    for _ in range(2):
        assert "X-Gateway-Cache" not in chat(gateway, key, hot, temperature=1.5)[1]
    assert upstream_calls(fake_upstream, hot) == 2
    on = {"X-Gateway-Cache": "on"}
    assert chat(gateway, key, hot, headers=on, temperature=1.5)[1]["X-Gateway-Cache"] == "miss"
    assert chat(gateway, key, hot, headers=on, temperature=1.5)[1]["X-Gateway-Cache"] == "hit"
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    asked = [{"role": "user", "content": f"weather in {uuid.uuid4().hex[:8]}"}]
    assert "X-Gateway-Cache" not in chat(gateway, key, asked, "tool", tools=tools)[1]
    assert chat(gateway, key, asked, "tool", headers=on, tools=tools)[1]["X-Gateway-Cache"] == "miss"
    status, headers, body = chat(gateway, key, asked, "tool", headers=on, tools=tools)
    assert headers["X-Gateway-Cache"] == "hit"
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    assert body["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "lookup"
    assert upstream_calls(fake_upstream, asked) == 2
    plain = mint(gateway, "cache-team-2")
    other = prompt()
    assert "X-Gateway-Cache" not in chat(gateway, plain, other)[1]
    assert chat(gateway, plain, other, headers=on)[1]["X-Gateway-Cache"] == "miss"
    assert chat(gateway, plain, other, headers=on)[1]["X-Gateway-Cache"] == "hit"


def test_errors_and_streams_cut_short_are_never_stored(gateway, fake_upstream, clean_db):
    """An upstream error (502) and a stream the upstream cut in the middle are not answers:
    the same request goes to the upstream again."""
    key = mint(gateway, cache=True)
    messages = prompt()
    for _ in range(2):
        assert chat(gateway, key, messages, "fail-400")[0] == 400
    assert upstream_calls(fake_upstream, messages) == 2
    client = OpenAI(base_url=gateway.base_url + "/v1", api_key=key["key"], max_retries=0)
    cut = prompt()
    for _ in range(2):
        text = ""
        with pytest.raises(openai.APIError, match="closed the connection"):
            for chunk in client.chat.completions.create(model="die-mid-stream", messages=cut, stream=True):
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
        assert text  # some text arrived before the upstream died
    assert upstream_calls(fake_upstream, cut) == 2


def redis_value(name: str) -> bytes | None:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        return client.get(name)
    finally:
        client.close()


def test_a_hit_counts_against_rpm_but_not_tokens_or_budget(gateway, fake_upstream, clean_db):
    """A key with rpm 3, tpm, a daily token limit and a budget: the miss spends tokens and
    money; the two hits after it leave the tokens/min state, the day's tokens and the spend
    exactly as they were and hold no concurrency slot; the fourth request (a hit too) is
    refused on requests/min. (tpm 60: the miss's tokens/min state lasts tens of seconds, so
    it is still there to compare.)"""
    key = mint(gateway, cache=True, rpm_limit=3, tpm_limit=60, daily_token_limit=100000, budget_usd="5",
               max_concurrent=1)
    messages = prompt()
    status, _, first = chat(gateway, key, messages, max_tokens=40)
    assert status == 200, first
    [row] = key_rows(clean_db, key, 1)
    spent_tokens, cost = row["total_tokens"], row["cost_usd"]

    def headroom() -> dict:
        status, _, body = http_json("GET", gateway.base_url + "/v1/key", None, {"Authorization": f"Bearer {key['key']}"})
        assert status == 200, body
        return body["headroom"]

    wait_until(lambda: headroom()["concurrent_requests"]["remaining"] == 1, message="the miss's slot released")
    before = headroom()
    k = f"gw:{{t:{key['tenant_id']}}}:k:{key['id']}"
    tpm_state = redis_value(f"{k}:tpm")
    assert tpm_state is not None
    for _ in range(2):
        status, headers, body = chat(gateway, key, messages, max_tokens=40)
        assert status == 200 and headers["X-Gateway-Cache"] == "hit", body
    key_rows(clean_db, key, 3)
    after = headroom()
    assert redis_value(f"{k}:tpm") == tpm_state
    assert after["tokens_today"] == before["tokens_today"]
    assert after["tokens_today"]["used"] == spent_tokens
    assert after["budget_this_month"] == before["budget_this_month"]
    assert Decimal(after["budget_this_month"]["used_usd"]) == cost
    assert after["concurrent_requests"]["in_use"] == 0
    status, headers, body = chat(gateway, key, messages, max_tokens=40)
    assert status == 429 and body["error"]["code"] == "rate_limit_exceeded", body
    assert "requests per minute" in body["error"]["message"]
    assert upstream_calls(fake_upstream, messages) == 1


def test_usage_rows_and_v1_usage_show_hits_and_saved_cost(gateway, fake_upstream, clean_db):
    """One usage row per request: the miss with its tokens and cost; each hit with 0 tokens,
    cost 0, `cached` true and `saved_cost_usd` the miss's cost. /v1/usage (totals and
    groups) and /v1/requests show the hits and the saved cost."""
    key = mint(gateway, cache=True)
    messages = prompt()
    for _ in range(3):
        status, _, body = chat(gateway, key, messages)
        assert status == 200, body
    rows = key_rows(clean_db, key, 3)
    assert len(rows) == 3 and len({r["request_id"] for r in rows}) == 3
    miss = [r for r in rows if not r["cached"]]
    hits = [r for r in rows if r["cached"]]
    assert len(miss) == 1 and len(hits) == 2
    cost = miss[0]["cost_usd"]
    assert cost > 0 and miss[0]["saved_cost_usd"] is None
    for hit in hits:
        assert (hit["prompt_tokens"], hit["completion_tokens"], hit["cost_usd"]) == (0, 0, Decimal(0))
        assert hit["saved_cost_usd"] == cost and hit["status"] == "ok" and hit["provider"] is None
        assert hit["model"] == "gpt-4o-mini"
    auth = {"Authorization": f"Bearer {key['key']}"}
    status, _, usage = http_json("GET", gateway.base_url + "/v1/usage?group_by=model", None, auth)
    assert status == 200, usage
    assert usage["requests"] == 3 and usage["cache_hits"] == 2
    assert Decimal(usage["saved_cost_usd"]) == 2 * cost and Decimal(usage["cost_usd"]) == cost
    assert usage["data"][0]["cache_hits"] == 2 and Decimal(usage["data"][0]["saved_cost_usd"]) == 2 * cost
    status, _, listed = http_json("GET", gateway.base_url + "/v1/requests", None, auth)
    assert [r["cache_hit"] for r in listed["data"]] == [True, True, False]
    assert [r["saved_cost_usd"] for r in listed["data"]][2] is None
    assert Decimal(listed["data"][0]["saved_cost_usd"]) == cost


def test_api_chat_uses_the_cache_too(gateway, fake_upstream, clean_db):
    """POST /api/chat goes through the same run: its second identical message is a hit,
    billed 0, with the answer's usage."""
    key = mint(gateway, cache=True)
    text = f"hello {uuid.uuid4().hex[:10]}"
    auth = {"Authorization": f"Bearer {key['key']}"}
    status, headers, first = http_json("POST", gateway.base_url + "/api/chat",
                                       {"message": text, "model": "gpt-4o-mini"}, auth)
    assert status == 200 and headers["X-Gateway-Cache"] == "miss", first
    status, headers, second = http_json("POST", gateway.base_url + "/api/chat",
                                        {"message": text, "model": "gpt-4o-mini"}, auth)
    assert status == 200 and headers["X-Gateway-Cache"] == "hit", second
    assert second["reply"] == first["reply"] and second["usage"] == first["usage"]
    assert second["cost_usd"] == "0" and first["cost_usd"] != "0"
    assert upstream_calls(fake_upstream, [{"role": "user", "content": text}]) == 1


# -- the model's setting and the settings of the gateway --------------------------------------------

@pytest.fixture(scope="module")
def cache_gateway(pg_url, fake_upstream, tmp_path_factory):
    """A gateway whose models.json turns the cache on for `gpt-4o-mini` (`"cache": true`) and
    off for `demo`, with RESPONSE_CACHE_DEFAULT=1, a 0.5 temperature threshold and a 2,000
    byte cap on a cached answer."""
    path = tmp_path_factory.mktemp("cache-models") / "models.json"
    write_models_file(path, fake_upstream.base_url)
    data = json.loads(path.read_text())
    data["models"]["gpt-4o-mini"]["cache"] = True
    data["models"]["demo"]["cache"] = False
    path.write_text(json.dumps(data))
    env = {k: str(v) for k, v in app_config(pg_url, path, RESPONSE_CACHE_DEFAULT="1",
                                            RESPONSE_CACHE_MAX_TEMPERATURE="0.5",
                                            RESPONSE_CACHE_MAX_ENTRY_BYTES="2000").items()}
    proc = GatewayProcess(env, workers=2, log_path=tmp_path_factory.mktemp("cache-gw") / "log").start()
    yield proc
    proc.stop()


def test_the_model_setting_the_default_and_the_key_setting(cache_gateway, fake_upstream, clean_db):
    """`"cache": true` on a model caches it for every key; `"cache": false` on a model turns it
    off although RESPONSE_CACHE_DEFAULT=1; a key's `cache: false` wins over the model; the
    temperature threshold is the setting's (0.5: a request without temperature counts as 1.0
    and is not cached)."""
    key = mint(cache_gateway)
    messages = prompt()
    assert [chat(cache_gateway, key, messages, temperature=0.2)[1].get("X-Gateway-Cache")
            for _ in range(2)] == ["miss", "hit"]
    assert "X-Gateway-Cache" not in chat(cache_gateway, key, messages, "demo", temperature=0)[1]
    assert "X-Gateway-Cache" not in chat(cache_gateway, key, messages, temperature=0.7)[1]
    assert "X-Gateway-Cache" not in chat(cache_gateway, key, messages)[1]
    status, _, _ = http_json("PATCH", f"{cache_gateway.base_url}/v1/api-keys/{key['id']}", {"cache": False}, ADMIN)
    assert status == 200
    wait_until(lambda: "X-Gateway-Cache" not in chat(cache_gateway, key, messages, temperature=0.2)[1],
               message="the key's cache setting to reach every worker")


def test_an_answer_larger_than_the_cap_is_not_stored(cache_gateway, fake_upstream, clean_db):
    """RESPONSE_CACHE_MAX_ENTRY_BYTES=2000: an answer of about 6,000 bytes is served but not
    stored (a short one is)."""
    key = mint(cache_gateway)
    messages = prompt()
    assert [chat(cache_gateway, key, messages, temperature=0)[1]["X-Gateway-Cache"] for _ in range(2)] == \
        ["miss", "hit"]
    long_messages = [{"role": "user", "content": " ".join(uuid.uuid4().hex * 10 for _ in range(4))}]
    for _ in range(2):
        assert chat(cache_gateway, key, long_messages, temperature=0)[1]["X-Gateway-Cache"] == "miss"
    assert upstream_calls(fake_upstream, long_messages) == 2


def test_a_hit_takes_no_concurrency_slot(gateway, fake_upstream, clean_db):
    """A key with max_concurrent 1 whose one slot is held by a stream still running (a 30 s
    answer, read to its first chunk): a hit is answered (it waits on no model), a miss is
    refused with 429 on concurrency; the hit's usage row is written as usual."""
    key = mint(gateway, cache=True, max_concurrent=1)
    cached = prompt()
    status, _, body = chat(gateway, key, cached)
    assert status == 200, body
    key_rows(clean_db, key, 1)
    auth = {"Authorization": f"Bearer {key['key']}"}
    wait_until(lambda: http_json("GET", gateway.base_url + "/v1/key", None, auth)[2]["headroom"]
               ["concurrent_requests"]["remaining"] == 1, message="the miss's slot released")
    client = OpenAI(base_url=gateway.base_url + "/v1", api_key=key["key"], max_retries=0)
    stream = client.chat.completions.create(model="slow-chunks-600", messages=prompt(), stream=True)
    try:
        next(iter(stream))  # admitted: the key's one slot is held until the stream ends
        status, headers, body = chat(gateway, key, cached)
        assert status == 200 and headers["X-Gateway-Cache"] == "hit", body
        status, _, body = chat(gateway, key, prompt())
        assert status == 429 and "concurrent" in body["error"]["message"], body
    finally:
        stream.close()
    assert upstream_calls(fake_upstream, cached) == 1
