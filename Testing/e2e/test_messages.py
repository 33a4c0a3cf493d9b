"""`POST /v1/messages` through the real gunicorn + gevent gateway, driven by the official
anthropic SDK: native passthrough to an Anthropic upstream (cache_control and thinking reach it,
cache token counts come back and are billed at their prices), translation for every other
provider type (answers, streams, tool use both ways, usage rows equal to the upstream's
figures), count_tokens, the SDK's own exception classes for our errors, and usage grouped by
endpoint (raw rows and daily rollup)."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Iterator

import anthropic
import openai
import pytest
import redis

from Testing.conftest import gateway_process, wait_for_rows
from Testing.fakes import fake_anthropic as fa, fake_gemini as fg, fake_gigachat as fgc, fake_ollama as fo
from Testing.fakes.fake_openai import DEFAULT_CHUNKS
from Testing.fakes.http_fake import count_words, echo_words
from Testing.fakes.native import (fake_anthropic, fake_gemini, fake_gigachat, fake_ollama,  # noqa: F401
                                  provider_settings)
from Testing.support import REDIS_URL, SYSTEM_SECRET, GatewayProcess, http_json

pytestmark = pytest.mark.timeout(60)
SYSTEM = "be brief"
MESSAGES = [{"role": "user", "content": "hello gateway"}]
PROMPT = count_words("be brief", "hello gateway") + 7  # every fake counts words + 7 = 11
PIECES = {"anthropic": fa.DEFAULT_PIECES, "openai": DEFAULT_CHUNKS, "gemini": fg.DEFAULT_PIECES,
          "ollama": fo.DEFAULT_PIECES, "gigachat": fgc.DEFAULT_PIECES}
UPSTREAM_MODEL = {"anthropic": "claude-test", "openai": "gpt-4o-mini", "gemini": "gemini-test",
                  "ollama": "llama3.2", "gigachat": "GigaChat-2"}
TOOL_MODEL = {"anthropic": "claude-tool", "openai": "fake-tool", "gemini": "gemini-tool"}
PROVIDERS = list(UPSTREAM_MODEL)
WEATHER = {"name": "get_weather", "description": "Weather in a city",
           "input_schema": {"type": "object", "properties": {"query": {"type": "string"}}}}
PRICING = {"input_per_mtok": "1.00", "output_per_mtok": "2.00"}
CACHE_PRICING = {"input_per_mtok": "3.00", "output_per_mtok": "15.00", "cached_input_per_mtok": "0.30",
                 "cache_write_per_mtok": "3.75"}


def _model(provider: str, upstream: str, pricing: dict = PRICING) -> dict:
    return {"deployments": [{"provider": provider, "model": upstream}], "context_window": 100000,
            "max_output_tokens": 1000, "pricing": pricing}


@pytest.fixture(scope="module")
def messages_models_file(tmp_path_factory, fake_upstream, fake_anthropic, fake_gemini, fake_ollama,  # noqa: F811
                         fake_gigachat) -> Path:
    fakes = {"anthropic": fake_anthropic, "gemini": fake_gemini, "ollama": fake_ollama, "gigachat": fake_gigachat}
    providers = {name: provider_settings(name, fake) for name, fake in fakes.items()}
    providers["openai"] = {"type": "openai", "base_url": fake_upstream.base_url, "api_key_env": "TEST_UPSTREAM_KEY",
                           "timeout_s": 5}
    models = {name: _model(name, UPSTREAM_MODEL[name]) for name in PROVIDERS}
    models.update({f"{name}-tool": _model(name, upstream) for name, upstream in TOOL_MODEL.items()})
    models["claude-cache"] = _model("anthropic", "claude-cache", CACHE_PRICING)
    models["claude-stream-error"] = _model("anthropic", "claude-stream-error")
    models["claude-overloaded"] = _model("anthropic", "claude-overloaded")
    models["claude-fail-500"] = _model("anthropic", "claude-fail-500")
    models["openai-die"] = _model("openai", "fake-die-mid-stream")
    # Mixed aliases: the first deployment fails, the second (the other kind) answers.
    models["claude-then-openai"] = {**_model("anthropic", "claude-fail-500"), "deployments": [
        {"provider": "anthropic", "model": "claude-fail-500", "priority": 1},
        {"provider": "openai", "model": "gpt-4o-mini", "priority": 2}]}
    models["openai-then-claude"] = {**_model("openai", "fake-fail-500"), "deployments": [
        {"provider": "openai", "model": "fake-fail-500", "priority": 1},
        {"provider": "anthropic", "model": "claude-test", "priority": 2}]}
    path = tmp_path_factory.mktemp("messages") / "models.json"
    path.write_text(json.dumps({"providers": providers, "models": models}, indent=2))
    return path


@pytest.fixture(scope="module")
def gateway(pg_url, messages_models_file, tmp_path_factory) -> Iterator[GatewayProcess]:
    """The gateway with these fakes behind it; the limiter's Redis database starts empty (key ids
    restart in every test database, so counters of an earlier run would apply to these keys)."""
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    client.close()
    yield from gateway_process(pg_url, messages_models_file, tmp_path_factory.mktemp("messages-gateway"))


def mint(gateway: GatewayProcess, **fields) -> dict:
    fields = {"name": "messages-e2e", "tenant": "messages-tenant", **fields}
    status, _, body = http_json("POST", gateway.base_url + "/v1/api-keys", fields, {"X-System-Secret": SYSTEM_SECRET})
    assert status == 201, body
    return body


@pytest.fixture(scope="module")
def key(gateway) -> dict:
    return mint(gateway)


@pytest.fixture(scope="module")
def client(gateway, key) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key=key["key"], base_url=gateway.base_url, max_retries=0, timeout=30)


def row_for(engine, request_id: str) -> dict:
    [row] = wait_for_rows(engine, 1, "request_id = :r", {"r": request_id})
    return row


def text_of(message) -> str:
    return "".join(b.text for b in message.content if b.type == "text")


@pytest.mark.parametrize("provider", PROVIDERS)
def test_create_answers_in_anthropics_shape_and_bills_the_upstreams_usage(client, pg_engine, provider):
    """messages.create through every provider type: Anthropic's message object with the fake's
    text, usage equal to what the upstream reported, and one usage row of endpoint 'messages'
    holding the same figures."""
    raw = client.messages.with_raw_response.create(model=provider, max_tokens=100, system=SYSTEM,
                                                   messages=MESSAGES)
    message = raw.parse()
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert text_of(message) == "".join(echo_words("hello gateway", PIECES[provider]))
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert (message.usage.input_tokens, message.usage.output_tokens) == (PROMPT, PIECES[provider])
    assert (message.usage.cache_read_input_tokens or 0, message.usage.cache_creation_input_tokens or 0) == (0, 0)
    row = row_for(pg_engine, raw.headers["request-id"])
    assert (row["endpoint"], row["provider"], row["upstream_model"], row["status"], row["streamed"]) == (
        "messages", provider, UPSTREAM_MODEL[provider], "ok", False)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (PROMPT, PIECES[provider])


@pytest.mark.parametrize("provider", PROVIDERS)
def test_stream_text_and_usage(client, pg_engine, provider):
    """messages.stream through every provider type: the text arrives as text deltas, the final
    message holds the upstream's usage, message_start already carries a real input count, and
    the streamed usage row equals the upstream's figures."""
    with client.messages.stream(model=provider, max_tokens=100, system=SYSTEM, messages=MESSAGES) as stream:
        request_id = stream.request_id
        events = list(stream)
        final = stream.get_final_message()
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert events[0].message.usage.input_tokens > 0  # never 0/0
    assert "".join(e.delta.text for e in events if e.type == "content_block_delta"
                   and e.delta.type == "text_delta") == "".join(echo_words("hello gateway", PIECES[provider]))
    [delta] = [e for e in events if e.type == "message_delta"]
    assert delta.delta.stop_reason == "end_turn"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (PROMPT, PIECES[provider])
    row = row_for(pg_engine, request_id)
    assert (row["endpoint"], row["streamed"], row["prompt_tokens"], row["completion_tokens"]) == (
        "messages", True, PROMPT, PIECES[provider])


@pytest.mark.parametrize("alias, answered_by", [("claude-then-openai", "openai"),
                                                 ("openai-then-claude", "anthropic")])
def test_fallback_between_native_and_translated_deployments(client, pg_engine, alias, answered_by):
    """An alias whose failing first deployment is of the other kind: the answer (plain and
    streamed) is encoded the way the deployment that answered needs, and billed to it."""
    raw = client.messages.with_raw_response.create(model=alias, max_tokens=100, system=SYSTEM, messages=MESSAGES)
    message = raw.parse()
    assert text_of(message) == "".join(echo_words("hello gateway", PIECES[answered_by]))
    assert (message.usage.input_tokens, message.usage.output_tokens) == (PROMPT, PIECES[answered_by])
    with client.messages.stream(model=alias, max_tokens=100, system=SYSTEM, messages=MESSAGES) as stream:
        streamed = stream.get_final_message()
        request_id = stream.request_id
    assert text_of(streamed) == text_of(message)
    assert (streamed.usage.input_tokens, streamed.usage.output_tokens) == (PROMPT, PIECES[answered_by])
    for rid in (raw.headers["request-id"], request_id):
        row = row_for(pg_engine, rid)
        assert (row["provider"], row["prompt_tokens"], row["completion_tokens"]) == (
            answered_by, PROMPT, PIECES[answered_by])


def test_images_and_sampling_fields_reach_a_translated_upstream(client, fake_upstream):
    """Base64 and url image blocks arrive as image_url parts; stop_sequences, top_p, top_k,
    metadata.user_id and tool_choice any as their chat-completions fields (top_p and top_k
    through extra_body: this SDK version has no parameters for them)."""
    content = [{"type": "text", "text": "what is this?"},
               {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
               {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}}]
    client.messages.create(model="openai", max_tokens=100, messages=[{"role": "user", "content": content}],
                           stop_sequences=["END"], metadata={"user_id": "u-7"}, extra_body={"top_p": 0.5, "top_k": 20},
                           tools=[WEATHER], tool_choice={"type": "any"})
    sent = fake_upstream.chat_requests()[-1]["body"]
    assert sent["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}}]}]
    assert (sent["stop"], sent["top_p"], sent["top_k"], sent["user"], sent["tool_choice"]) == (
        ["END"], 0.5, 20, "u-7", "required")
    assert sent["model"] == "gpt-4o-mini" and sent["max_tokens"] == 100


def test_max_tokens_above_the_models_cap_is_capped_for_a_translated_upstream(client, fake_upstream):
    """Anthropic clients ask for large caps (Claude Code: 32000); a translated upstream gets at
    most the model's max_output_tokens (1000 here) instead of refusing the request."""
    client.messages.create(model="openai", max_tokens=32000, messages=MESSAGES)
    assert fake_upstream.chat_requests()[-1]["body"]["max_tokens"] == 1000


def test_translated_stream_event_sequence(client):
    """A translated stream (OpenAI upstream) is Anthropic's exact sequence: message_start, one
    text block (start, deltas, stop), message_delta, message_stop; message_start's input count
    is ours (tiktoken, o200k_base: 3 + (3 + 'system' 1 + 'be brief' 2) + (3 + 'user' 1 +
    'hello gateway' 2) = 15) until message_delta brings the upstream's 11."""
    events = list(client.messages.create(model="openai", max_tokens=100, system=SYSTEM, messages=MESSAGES,
                                         stream=True))
    kinds = [e.type for e in events]
    assert kinds == (["message_start", "content_block_start"] + ["content_block_delta"] * DEFAULT_CHUNKS
                     + ["content_block_stop", "message_delta", "message_stop"])
    assert events[0].message.usage.input_tokens == 15
    assert events[-2].usage.input_tokens == PROMPT and events[-2].usage.output_tokens == DEFAULT_CHUNKS


@pytest.mark.parametrize("provider", list(TOOL_MODEL))
def test_tool_use_both_ways(client, fake_upstream, provider):
    """A tool_use answer (non-streaming and streamed, input parsed), then the tool_result sent
    back in the next turn reaches the upstream (as a tool message when translated) and is
    answered from (the fake OpenAI calls its tool again whatever it gets)."""
    model = f"{provider}-tool"
    first = client.messages.create(model=model, max_tokens=200, messages=MESSAGES, tools=[WEATHER],
                                   tool_choice={"type": "auto"})
    assert first.stop_reason == "tool_use"
    [call] = [b for b in first.content if b.type == "tool_use"]
    assert call.name == "get_weather" and call.input["unit"] == "celsius"
    with client.messages.stream(model=model, max_tokens=200, messages=MESSAGES, tools=[WEATHER]) as stream:
        streamed = stream.get_final_message()
    [streamed_call] = [b for b in streamed.content if b.type == "tool_use"]
    assert streamed.stop_reason == "tool_use" and streamed_call.input == call.input
    follow = MESSAGES + [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
                         {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                                       "content": "21 degrees"}]}]
    second = client.messages.create(model=model, max_tokens=200, messages=follow, tools=[WEATHER])
    if provider == "openai":
        sent = fake_upstream.chat_requests()[-1]["body"]["messages"]
        assert sent[-2]["tool_calls"][0]["id"] == call.id
        assert sent[-1] == {"role": "tool", "tool_call_id": call.id, "content": "21 degrees"}
        return
    assert second.stop_reason == "end_turn"
    assert "Tool said" in text_of(second) and "21" in text_of(second)


def test_native_passthrough_keeps_cache_control_thinking_and_bills_cache_prices(client, pg_engine, fake_anthropic):  # noqa: F811
    """To an Anthropic upstream the client's body goes as sent (cache_control marks, thinking);
    the thinking block and its signature come back; cache reads and writes are reported and
    billed at the model's cache prices."""
    system = [{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}]
    thinking = {"type": "enabled", "budget_tokens": 1024}
    raw = client.messages.with_raw_response.create(model="claude-cache", max_tokens=2000, system=system,
                                                   messages=MESSAGES, thinking=thinking)
    message = raw.parse()
    sent = [r for r in fake_anthropic.requests() if r["path"] == "/v1/messages"
            and r["body"].get("thinking") == thinking][-1]["body"]
    assert sent["system"] == system and sent["model"] == "claude-cache"
    assert message.content[0].type == "thinking" and message.content[0].signature == fa.SIGNATURE
    assert (message.usage.input_tokens, message.usage.cache_creation_input_tokens,
            message.usage.cache_read_input_tokens, message.usage.output_tokens) == (
        PROMPT, fa.CACHE_CREATION, fa.CACHE_READ, fa.DEFAULT_PIECES)
    row = row_for(pg_engine, raw.headers["request-id"])
    assert (row["prompt_tokens"], row["cached_tokens"], row["cache_write_tokens"], row["completion_tokens"]) == (
        PROMPT + fa.CACHE_CREATION + fa.CACHE_READ, fa.CACHE_READ, fa.CACHE_CREATION, fa.DEFAULT_PIECES)
    # 11 fresh input at $3, 100 cache reads at $0.30, 11 cache writes at $3.75, 12 output at $15 (per M)
    assert row["cost_usd"] == Decimal("0.00028425")


def test_native_stream_passes_thinking_and_cache_usage_on(client, pg_engine):
    with client.messages.stream(model="claude-cache", max_tokens=2000, system=SYSTEM, messages=MESSAGES,
                                thinking={"type": "enabled", "budget_tokens": 1024}) as stream:
        request_id = stream.request_id
        final = stream.get_final_message()
    assert final.content[0].type == "thinking" and final.content[0].thinking == fa.THINKING
    assert final.content[0].signature == fa.SIGNATURE
    assert (final.usage.cache_creation_input_tokens, final.usage.cache_read_input_tokens) == (
        fa.CACHE_CREATION, fa.CACHE_READ)
    row = row_for(pg_engine, request_id)
    assert (row["streamed"], row["prompt_tokens"], row["cached_tokens"], row["cache_write_tokens"]) == (
        True, PROMPT + fa.CACHE_CREATION + fa.CACHE_READ, fa.CACHE_READ, fa.CACHE_CREATION)


def test_anthropic_only_content_goes_natively_and_is_a_400_elsewhere(client, fake_anthropic):  # noqa: F811
    """A document block and a server tool reach an Anthropic upstream as sent; for a model
    served only by other providers they are a 400 naming the field (BadRequestError)."""
    content = [{"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "a doc"}},
               {"type": "text", "text": "summarise it"}]
    server_tool = {"type": "web_search_20250305", "name": "web_search", "max_uses": 2}
    message = client.messages.create(model="anthropic", max_tokens=100, tools=[server_tool],
                                     messages=[{"role": "user", "content": content}])
    assert message.type == "message"
    sent = [r for r in fake_anthropic.requests() if r["path"] == "/v1/messages"][-1]["body"]
    assert sent["messages"][0]["content"] == content and sent["tools"] == [server_tool]
    with pytest.raises(anthropic.BadRequestError) as exc:
        client.messages.create(model="openai", max_tokens=100, messages=[{"role": "user", "content": content}])
    assert "messages.0.content.0" in exc.value.body["error"]["message"]
    assert "only be sent to Anthropic models" in exc.value.body["error"]["message"]


def test_count_tokens(client):
    """count_tokens: the prompt as the gateway counts it (o200k_base, OpenAI's message framing:
    3 + (3 + 'system' 1 + 'be brief' 2) + (3 + 'user' 1 + 'hello gateway' 2) = 15)."""
    counted = client.messages.count_tokens(model="openai", system=SYSTEM, messages=MESSAGES)
    assert counted.input_tokens == 15


def test_bearer_token_and_x_api_key_both_authenticate(gateway, key):
    """The SDK's x-api-key, and Authorization: Bearer (auth_token=, as Claude Code's
    ANTHROPIC_AUTH_TOKEN sends it)."""
    bearer = anthropic.Anthropic(auth_token=key["key"], base_url=gateway.base_url, max_retries=0)
    assert bearer.messages.create(model="anthropic", max_tokens=50, messages=MESSAGES).type == "message"


def test_sdk_raises_its_own_exceptions(gateway, key, client):
    """Our errors in Anthropic's envelope and status codes, so the SDK raises AuthenticationError,
    NotFoundError, BadRequestError, PermissionDeniedError and RateLimitError."""
    wrong = anthropic.Anthropic(api_key="sk-not-a-key", base_url=gateway.base_url, max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as exc:
        wrong.messages.create(model="anthropic", max_tokens=50, messages=MESSAGES)
    assert exc.value.body["type"] == "error" and exc.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.NotFoundError) as exc:
        client.messages.create(model="no-such-model", max_tokens=50, messages=MESSAGES)
    assert exc.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as exc:
        client.messages.create(model="anthropic", max_tokens=50, messages=MESSAGES, extra_body={"temperature": 1.5})
    assert exc.value.body["error"]["type"] == "invalid_request_error"
    only_openai = mint(gateway, name="only-openai", allowed_models=["openai"])
    limited = anthropic.Anthropic(api_key=only_openai["key"], base_url=gateway.base_url, max_retries=0)
    with pytest.raises(anthropic.PermissionDeniedError) as exc:
        limited.messages.create(model="anthropic", max_tokens=50, messages=MESSAGES)
    assert exc.value.body["error"]["type"] == "permission_error"
    one_rpm = mint(gateway, name="one-rpm", rpm_limit=1)
    slow = anthropic.Anthropic(api_key=one_rpm["key"], base_url=gateway.base_url, max_retries=0)
    slow.messages.create(model="anthropic", max_tokens=50, messages=MESSAGES)
    with pytest.raises(anthropic.RateLimitError) as exc:
        slow.messages.create(model="anthropic", max_tokens=50, messages=MESSAGES)
    assert exc.value.body["error"]["type"] == "rate_limit_error"


def test_upstream_failures_are_anthropic_errors(client):
    """An upstream that keeps failing is 500 api_error (the SDK's InternalServerError); an
    overloaded upstream (529) that stays overloaded is 429 rate_limit_error, as for chat."""
    with pytest.raises(anthropic.InternalServerError) as exc:
        client.messages.create(model="claude-fail-500", max_tokens=50, messages=MESSAGES)
    assert exc.value.status_code == 500 and exc.value.body["error"]["type"] == "api_error"
    with pytest.raises(anthropic.RateLimitError) as exc:
        client.messages.create(model="claude-overloaded", max_tokens=50, messages=MESSAGES)
    assert exc.value.body["error"]["type"] == "rate_limit_error"


def test_missing_max_tokens_is_anthropics_400(gateway, key):
    """max_tokens is required, as Anthropic requires it: 400 invalid_request_error in the envelope."""
    status, headers, body = http_json("POST", gateway.base_url + "/v1/messages",
                                      {"model": "anthropic", "messages": MESSAGES},
                                      {"x-api-key": key["key"], "anthropic-version": "2023-06-01"})
    assert status == 400 and body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error" and "max_tokens" in body["error"]["message"]
    assert set(body) == {"type", "error"} and set(body["error"]) == {"type", "message"}


def test_upstream_failure_mid_stream_is_an_error_event(gateway, key):
    """After the first event, an upstream failure ends the stream with Anthropic's `error`
    event: natively (the upstream's own error event) and translated (a cut connection)."""
    for model in ("claude-stream-error", "openai-die"):
        status, _, text = http_json("POST", gateway.base_url + "/v1/messages",
                                    {"model": model, "max_tokens": 100, "messages": MESSAGES, "stream": True},
                                    {"x-api-key": key["key"]})
        assert status == 200
        blocks = [b for b in text.strip().split("\n\n") if b]
        assert blocks[0].startswith("event: message_start\n")
        name, data = blocks[-1].split("\n")
        assert name == "event: error"
        assert json.loads(data[len("data: "):])["type"] == "error"


def test_usage_grouped_by_endpoint_from_raw_rows_and_rollup(gateway, pg_engine):
    """A key's messages and chat completions are told apart in /v1/usage?group_by=endpoint, both
    over a partial day (raw rows) and over whole UTC days (the daily rollup)."""
    fresh = mint(gateway, name="by-endpoint")
    anthropic.Anthropic(api_key=fresh["key"], base_url=gateway.base_url, max_retries=0).messages.create(
        model="openai", max_tokens=100, system=SYSTEM, messages=MESSAGES)
    openai.OpenAI(api_key=fresh["key"], base_url=gateway.base_url + "/v1", max_retries=0).chat.completions.create(
        model="openai", messages=[{"role": "system", "content": SYSTEM}, *MESSAGES])
    wait_for_rows(pg_engine, 2, "api_key_id = :k", {"k": fresh["id"]})
    today = datetime.now(timezone.utc).date()
    whole_day = f"&start={today}T00:00:00Z&end={today + timedelta(days=1)}T00:00:00Z"
    for period in ("", whole_day):
        status, _, body = http_json("GET", f"{gateway.base_url}/v1/usage?group_by=endpoint{period}",
                                    headers={"Authorization": f"Bearer {fresh['key']}"})
        assert status == 200, body
        rows = {d["endpoint"]: (d["requests"], d["prompt_tokens"], d["completion_tokens"]) for d in body["data"]}
        assert rows == {"chat.completions": (1, PROMPT, DEFAULT_CHUNKS), "messages": (1, PROMPT, DEFAULT_CHUNKS)}
    status, _, csv = http_json("GET", f"{gateway.base_url}/v1/usage?group_by=endpoint&format=csv{whole_day}",
                               headers={"Authorization": f"Bearer {fresh['key']}"})
    assert status == 200
    assert csv.splitlines()[0] == ("endpoint,requests,prompt_tokens,completion_tokens,total_tokens,cost_usd,"
                                   "cache_hits,saved_cost_usd")
    assert csv.splitlines()[2].startswith(f"messages,1,{PROMPT},{DEFAULT_CHUNKS},")


def test_body_too_large_is_anthropics_413(gateway, key):
    """A body over MAX_REQUEST_BYTES (256 KiB in the tests) is 413 request_too_large."""
    huge = [{"role": "user", "content": "x" * (300 * 1024)}]
    status, _, body = http_json("POST", gateway.base_url + "/v1/messages",
                                {"model": "anthropic", "max_tokens": 10, "messages": huge}, {"x-api-key": key["key"]})
    assert status == 413 and body["type"] == "error" and body["error"]["type"] == "request_too_large"


def test_count_tokens_of_anthropic_models_is_anthropics_count(client):
    """For a model served by Anthropic the count is Anthropic's own (the fake: words + 7, + 1 per
    tool); when that call fails the gateway counts (o200k_base: 15, as for the OpenAI model)."""
    assert client.messages.count_tokens(model="anthropic", system=SYSTEM, messages=MESSAGES).input_tokens == PROMPT
    assert client.messages.count_tokens(model="anthropic", system=SYSTEM, messages=MESSAGES,
                                        tools=[WEATHER]).input_tokens == PROMPT + 1
    assert client.messages.count_tokens(model="claude-fail-500", system=SYSTEM, messages=MESSAGES).input_tokens == 15


def test_count_tokens_counts_tools_and_knows_models(client):
    """Tools add to the count; an unknown model is the SDK's NotFoundError; nothing is billed."""
    plain = client.messages.count_tokens(model="openai", messages=MESSAGES).input_tokens
    with_tools = client.messages.count_tokens(model="openai", messages=MESSAGES, tools=[WEATHER]).input_tokens
    assert with_tools > plain
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="no-such-model", messages=MESSAGES)
