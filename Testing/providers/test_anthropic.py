"""AnthropicProvider against the real HTTP fake of the Messages API: the request it sends, the
OpenAI answer and chunks it makes, exact usage (cache tokens included), and error mapping."""
from __future__ import annotations

import json

import pytest

from Testing.fakes.fake_anthropic import CACHE_CREATION, CACHE_READ, DEFAULT_PIECES, prompt_tokens
from Testing.fakes.http_fake import echo_words
from Testing.fakes.native import provider_settings
from Testing.support import UPSTREAM_KEY
from app.errors import from_provider_error
from app.providers.anthropic import AnthropicProvider
from app.providers.base import (ProviderAuthError, ProviderBadRequest, ProviderContextTooLong, ProviderError,
                                ProviderNotConfigured, ProviderRateLimited, ProviderTimeout,
                                ProviderUnavailable)

pytestmark = pytest.mark.timeout(30)
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there claude"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]


@pytest.fixture
def provider(fake_anthropic):
    fake_anthropic.reset()
    prov = AnthropicProvider("anthropic", provider_settings("anthropic", fake_anthropic),
                             {"max_output_tokens": {"claude-test": 777}})
    yield prov
    prov.close()


def req(model: str = "claude-test", **extra) -> dict:
    return {"model": model, "messages": [dict(m) for m in MESSAGES], **extra}


def sent(fake) -> dict:
    [request] = [r for r in fake.requests() if r["path"] == "/v1/messages"]
    return request


def chunks_of(pieces) -> list[dict]:
    return [json.loads(p.data()) for p in pieces]


def streamed_text(chunks: list[dict]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


def upstream_prompt() -> int:
    system, user = MESSAGES[0]["content"], MESSAGES[1]["content"]
    return prompt_tokens({"system": system, "messages": [{"content": user}]})


def test_request_translation_headers_system_and_max_tokens_cap(provider, fake_anthropic):
    """System messages go to `system`, the key to x-api-key with anthropic-version, extra headers
    are sent, and max_tokens is the model's cap from models.json when the client sets none."""
    provider.complete(req(temperature=1.7, top_p=0.5, stop="END", user="u-9"))
    r = sent(fake_anthropic)
    assert r["headers"]["x-api-key"] == UPSTREAM_KEY
    assert r["headers"]["anthropic-version"] == "2023-06-01"
    assert r["headers"]["x-extra"] == "1"
    assert "authorization" not in r["headers"]
    body = r["body"]
    assert body["system"] == "be brief"
    assert body["messages"] == [{"role": "user", "content": [{"type": "text", "text": "hello there claude"}]}]
    assert body["max_tokens"] == 777
    assert body["temperature"] == 1.0  # Anthropic's range ends at 1
    assert body["top_p"] == 0.5 and body["stop_sequences"] == ["END"]
    assert body["metadata"] == {"user_id": "u-9"}
    assert "stream" not in body


def test_client_max_tokens_wins_and_length_finish(provider, fake_anthropic):
    """max_tokens of the client is sent as it is; stop_reason max_tokens becomes finish_reason length."""
    result = provider.complete(req(max_tokens=3))
    assert sent(fake_anthropic)["body"]["max_tokens"] == 3
    assert result.body["choices"][0]["finish_reason"] == "length"
    assert result.usage["completion_tokens"] == 3


def test_multipart_content_with_images(provider, fake_anthropic):
    """Text and image parts become text/image blocks: data URLs as base64 sources, URLs as url sources."""
    content = [{"type": "text", "text": "what is this"},
               {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
               {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}}]
    provider.complete({"model": "claude-test", "messages": [{"role": "user", "content": content}]})
    blocks = sent(fake_anthropic)["body"]["messages"][0]["content"]
    assert blocks == [{"type": "text", "text": "what is this"},
                      {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                   "data": "iVBORw0KGgo="}},
                      {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}}]


def test_complete_answer_and_exact_usage(provider):
    """The answer is an OpenAI chat.completion with the fake's text and exactly its usage."""
    result = provider.complete(req())
    body = result.body
    assert body["object"] == "chat.completion" and body["id"].startswith("msg_fake")
    assert body["choices"][0]["message"] == {"role": "assistant",
                                             "content": "".join(echo_words("hello there claude", DEFAULT_PIECES))}
    assert body["choices"][0]["finish_reason"] == "stop"
    prompt = upstream_prompt()
    assert result.usage == {"prompt_tokens": prompt, "completion_tokens": DEFAULT_PIECES,
                            "total_tokens": prompt + DEFAULT_PIECES,
                            "prompt_tokens_details": {"cached_tokens": 0}}


@pytest.mark.parametrize("call", ["complete", "stream"])
def test_cache_tokens_count_as_prompt_and_reads_as_cached(provider, call):
    """Prompt tokens = input + cache creation + cache read; cache reads are cached_tokens (both modes)."""
    if call == "complete":
        usage = provider.complete(req("claude-cache")).usage
    else:
        pieces = list(provider.stream(req("claude-cache")))
        usage = pieces[-1].usage
        assert pieces[-1].usage_only
    prompt = upstream_prompt() + CACHE_CREATION + CACHE_READ
    assert usage["prompt_tokens"] == prompt
    assert usage["prompt_tokens_details"] == {"cached_tokens": CACHE_READ}
    assert usage["total_tokens"] == prompt + DEFAULT_PIECES


def test_stream_events_become_openai_chunks(provider, fake_anthropic):
    """message_start/content_block_delta/message_delta/message_stop become role, content, finish
    and usage chunks; ping yields nothing; the request asked for stream: true."""
    pieces = list(provider.stream(req()))
    assert sent(fake_anthropic)["body"]["stream"] is True
    assert sent(fake_anthropic)["headers"]["accept"] == "text/event-stream"
    chunks = chunks_of(pieces)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert streamed_text(chunks) == "".join(echo_words("hello there claude", DEFAULT_PIECES))
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and pieces[-1].usage_only
    assert pieces[-1].usage["completion_tokens"] == DEFAULT_PIECES
    assert pieces[-1].usage["prompt_tokens"] == upstream_prompt()
    assert sum(1 for p in pieces if p.usage is not None) == 1


def test_tool_definitions_and_tool_call_answer(provider, fake_anthropic):
    """tools/tool_choice become Anthropic tools (input_schema) and tool_choice; a tool_use answer
    becomes tool_calls with JSON string arguments and finish_reason tool_calls."""
    result = provider.complete(req("claude-tool", tools=TOOLS, tool_choice="required", parallel_tool_calls=False))
    body = sent(fake_anthropic)["body"]
    assert body["tools"] == [{"name": "get_weather", "description": "Weather in a city",
                              "input_schema": TOOLS[0]["function"]["parameters"]}]
    assert body["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    choice = result.body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Let me check."
    [call] = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    assert call["id"].startswith("toolu_")
    assert json.loads(call["function"]["arguments"]) == {"query": "hello there claude", "unit": "celsius"}


def test_streamed_tool_call_arguments(provider):
    """input_json_delta events become tool_calls argument deltas on tool index 0 (although the
    tool_use is content block 1), and concatenate to the full JSON."""
    chunks = chunks_of(provider.stream(req("claude-tool", tools=TOOLS)))
    deltas = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks
              if c["choices"] and c["choices"][0]["delta"].get("tool_calls")]
    assert deltas[0]["id"].startswith("toolu_") and deltas[0]["function"]["name"] == "get_weather"
    assert all(d["index"] == 0 for d in deltas)
    arguments = "".join(d["function"].get("arguments", "") for d in deltas)
    assert json.loads(arguments) == {"query": "hello there claude", "unit": "celsius"}
    assert streamed_text(chunks) == "Let me check."
    assert [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]][0][
        "choices"][0]["finish_reason"] == "tool_calls"


def test_tool_results_go_back_as_tool_result_blocks(provider, fake_anthropic):
    """An assistant tool_calls message becomes tool_use blocks, and the tool messages one user turn
    of tool_result blocks; the fake then answers from the result."""
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "toolu_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"q":"Oslo"}'}},
                    {"id": "toolu_2", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"q":"Rome"}'}}]},
                {"role": "tool", "tool_call_id": "toolu_1", "content": "5C"},
                {"role": "tool", "tool_call_id": "toolu_2", "content": "20C"}]
    result = provider.complete({"model": "claude-tool", "messages": messages, "tools": TOOLS})
    body = sent(fake_anthropic)["body"]
    assert body["messages"][1] == {"role": "assistant", "content": [
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"q": "Oslo"}},
        {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"q": "Rome"}}]}
    assert body["messages"][2] == {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "5C"},
        {"type": "tool_result", "tool_use_id": "toolu_2", "content": "20C"}]}
    assert result.body["choices"][0]["message"]["content"].startswith("Echo: Tool said: 20C")


@pytest.mark.parametrize("model,cls,status,retryable", [
    ("claude-fail-400", ProviderBadRequest, 400, False),
    ("claude-fail-401", ProviderAuthError, 502, False),
    ("claude-fail-429", ProviderRateLimited, 429, True),
    ("claude-overloaded", ProviderRateLimited, 429, True),
    ("claude-fail-500", ProviderUnavailable, 502, True),
    ("claude-context-too-long", ProviderContextTooLong, 400, False),
])
@pytest.mark.parametrize("call", ["complete", "stream"])
def test_upstream_errors_map_onto_the_taxonomy(provider, model, cls, status, retryable, call):
    """Each Anthropic error answer becomes the right ProviderError (retryable or not, client status)."""
    with pytest.raises(ProviderError) as info:
        result = getattr(provider, call)(req(model))
        list(result) if call == "stream" else None
    assert type(info.value) is cls, info.value
    assert info.value.retryable is retryable
    assert from_provider_error(info.value).status == status
    assert UPSTREAM_KEY not in str(info.value) and UPSTREAM_KEY not in info.value.message


def test_overloaded_and_rate_limit_details(provider):
    """529 overloaded_error keeps its code and status; 429 carries Retry-After (7 s)."""
    with pytest.raises(ProviderRateLimited) as info:
        provider.complete(req("claude-overloaded"))
    assert info.value.code == "overloaded_error" and info.value.upstream_status == 529
    with pytest.raises(ProviderRateLimited) as info:
        provider.complete(req("claude-fail-429"))
    assert info.value.retry_after == 7


@pytest.mark.parametrize("model", ["claude-malformed", "claude-malformed-json"])
def test_malformed_answers_are_upstream_errors(provider, model):
    """A 200 answer that is not a Messages API body is ProviderUnavailable (502), not a crash."""
    with pytest.raises(ProviderUnavailable) as info:
        provider.complete(req(model))
    assert from_provider_error(info.value).status == 502


def test_error_event_mid_stream(provider):
    """An `error` event after message_start raises the mapped error (overloaded -> rate limited)."""
    stream = provider.stream(req("claude-stream-error"))
    first = next(stream)
    assert json.loads(first.data())["choices"][0]["delta"]["role"] == "assistant"
    with pytest.raises(ProviderRateLimited):
        next(stream)


def test_stream_cut_before_message_stop(provider):
    """A connection closed before message_stop is ProviderUnavailable after the pieces received."""
    got = []
    with pytest.raises(ProviderUnavailable):
        for piece in provider.stream(req("claude-die-mid-stream")):
            got.append(piece)
    assert 1 <= len(got) <= 4


def test_hang_is_a_timeout(fake_anthropic):
    """An upstream that never answers raises ProviderTimeout after the provider's timeout_s."""
    prov = AnthropicProvider("anthropic", {**provider_settings("anthropic", fake_anthropic), "timeout_s": 0.5}, {})
    try:
        with pytest.raises(ProviderTimeout):
            prov.complete(req("claude-hang"))
    finally:
        prov.close()


def test_not_configured_without_key(fake_anthropic, monkeypatch):
    """With its key variable unset the provider makes no call and names the variable (503)."""
    monkeypatch.delenv("TEST_ANTHROPIC_UNSET", raising=False)
    fake_anthropic.reset()
    prov = AnthropicProvider("anthropic", {**provider_settings("anthropic", fake_anthropic),
                                           "api_key_env": "TEST_ANTHROPIC_UNSET"}, {})
    assert prov.missing_configuration() == ["TEST_ANTHROPIC_UNSET"]
    with pytest.raises(ProviderNotConfigured) as info:
        prov.complete(req())
    assert "TEST_ANTHROPIC_UNSET" in info.value.message
    assert from_provider_error(info.value).status == 503
    assert fake_anthropic.requests() == []


def test_unsupported_input_is_a_bad_request(provider, fake_anthropic):
    """Arguments that are not JSON, or n > 1, are refused as 400 before any call."""
    bad_args = [{"role": "user", "content": "x"},
                {"role": "assistant", "tool_calls": [{"id": "t", "type": "function",
                                                      "function": {"name": "f", "arguments": "{not json"}}]}]
    with pytest.raises(ProviderBadRequest):
        provider.complete({"model": "claude-test", "messages": bad_args})
    with pytest.raises(ProviderBadRequest):
        provider.complete(req(n=2))
    assert fake_anthropic.requests() == []
