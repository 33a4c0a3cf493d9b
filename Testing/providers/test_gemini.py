"""GeminiProvider against the real HTTP fake of the Gemini API: URL, header key, body
translation, answers and chunks, usageMetadata -> usage, safety -> content_filter, errors."""
from __future__ import annotations

import json

import pytest

from Testing.fakes.fake_gemini import CACHED, DEFAULT_PIECES, THOUGHTS
from Testing.fakes.http_fake import count_words, echo_words
from Testing.fakes.native import provider_settings
from Testing.support import UPSTREAM_KEY
from app.errors import from_provider_error
from app.providers.base import (ProviderAuthError, ProviderBadRequest, ProviderContextTooLong, ProviderError,
                                ProviderNotFound, ProviderRateLimited, ProviderTimeout, ProviderUnavailable)
from app.providers.gemini import GeminiProvider

pytestmark = pytest.mark.timeout(30)
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there gemini"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                           "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]
PROMPT = count_words("be brief", "hello there gemini") + 7


@pytest.fixture
def provider(fake_gemini):
    fake_gemini.reset()
    prov = GeminiProvider("gemini", provider_settings("gemini", fake_gemini), {})
    yield prov
    prov.close()


def req(model: str = "gemini-test", **extra) -> dict:
    return {"model": model, "messages": [dict(m) for m in MESSAGES], **extra}


def sent(fake) -> dict:
    [request] = fake.requests()
    return request


def chunks_of(pieces) -> list[dict]:
    return [json.loads(p.data()) for p in pieces]


def test_request_url_header_and_translation(provider, fake_gemini):
    """generateContent on the model's URL, key in x-goog-api-key (never in the URL), system in
    systemInstruction, sampling fields in generationConfig, response_format as JSON mime type."""
    provider.complete(req(temperature=0.2, top_p=0.9, max_tokens=50, stop=["END"], seed=3,
                          response_format={"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}))
    r = sent(fake_gemini)
    assert r["path"] == "/v1beta/models/gemini-test:generateContent" and r["query"] == {}
    assert r["headers"]["x-goog-api-key"] == UPSTREAM_KEY and r["headers"]["x-extra"] == "1"
    assert "authorization" not in r["headers"]
    body = r["body"]
    assert body["systemInstruction"] == {"parts": [{"text": "be brief"}]}
    assert body["contents"] == [{"role": "user", "parts": [{"text": "hello there gemini"}]}]
    assert body["generationConfig"] == {"temperature": 0.2, "topP": 0.9, "seed": 3, "maxOutputTokens": 50,
                                        "stopSequences": ["END"], "responseMimeType": "application/json",
                                        "responseJsonSchema": {"type": "object"}}


def test_multipart_content(provider, fake_gemini):
    """Text parts, base64 images (inlineData) and image URLs (fileData) in one user turn."""
    content = [{"type": "text", "text": "look"},
               {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQ"}},
               {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]
    provider.complete({"model": "gemini-test", "messages": [{"role": "user", "content": content}]})
    assert sent(fake_gemini)["body"]["contents"][0]["parts"] == [
        {"text": "look"}, {"inlineData": {"mimeType": "image/jpeg", "data": "/9j/4AAQ"}},
        {"fileData": {"mimeType": "image/png", "fileUri": "https://example.com/a.png"}}]


def test_complete_answer_and_usage(provider):
    """The answer is a chat.completion with the fake's text; usage is usageMetadata's figures."""
    result = provider.complete(req())
    choice = result.body["choices"][0]
    assert choice["message"]["content"] == "".join(echo_words("hello there gemini", DEFAULT_PIECES))
    assert choice["finish_reason"] == "stop"
    assert result.usage == {"prompt_tokens": PROMPT, "completion_tokens": DEFAULT_PIECES,
                            "total_tokens": PROMPT + DEFAULT_PIECES, "prompt_tokens_details": {"cached_tokens": 0}}


@pytest.mark.parametrize("call", ["complete", "stream"])
def test_cached_and_thinking_tokens(provider, call):
    """cachedContentTokenCount is cached_tokens; thoughtsTokenCount counts as completion (billed output)."""
    model = "gemini-cache-think"
    usage = provider.complete(req(model)).usage if call == "complete" else list(provider.stream(req(model)))[-1].usage
    assert usage["prompt_tokens"] == PROMPT
    assert usage["prompt_tokens_details"] == {"cached_tokens": CACHED}
    assert usage["completion_tokens"] == DEFAULT_PIECES + THOUGHTS
    assert usage["completion_tokens_details"] == {"reasoning_tokens": THOUGHTS}
    assert usage["total_tokens"] == PROMPT + DEFAULT_PIECES + THOUGHTS


def test_max_tokens_finish_is_length(provider):
    """finishReason MAX_TOKENS becomes finish_reason length."""
    result = provider.complete(req(max_completion_tokens=4))
    assert result.body["choices"][0]["finish_reason"] == "length"
    assert result.usage["completion_tokens"] == 4


def test_stream_uses_sse_and_builds_chunks(provider, fake_gemini):
    """streamGenerateContent?alt=sse; each event becomes chunks; the last usageMetadata is the usage."""
    pieces = list(provider.stream(req()))
    r = sent(fake_gemini)
    assert r["path"] == "/v1beta/models/gemini-test:streamGenerateContent" and r["query"] == {"alt": "sse"}
    chunks = chunks_of(pieces)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "".join(echo_words("hello there gemini", DEFAULT_PIECES))
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert pieces[-1].usage_only and pieces[-1].usage["completion_tokens"] == DEFAULT_PIECES
    assert pieces[-1].usage["prompt_tokens"] == PROMPT


@pytest.mark.parametrize("call", ["complete", "stream"])
def test_safety_is_content_filter(provider, call):
    """finishReason SAFETY (and a blocked prompt) become finish_reason content_filter."""
    for model in ("gemini-safety", "gemini-blocked-prompt"):
        if call == "complete":
            finish = provider.complete(req(model)).body["choices"][0]["finish_reason"]
        else:
            chunks = chunks_of(provider.stream(req(model)))
            finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1]
        assert finish == "content_filter", model


def test_tools_and_function_call_answer(provider, fake_gemini):
    """tools -> functionDeclarations, tool_choice -> functionCallingConfig; a functionCall answer
    becomes tool_calls (a generated id, JSON string arguments, finish_reason tool_calls)."""
    result = provider.complete(req("gemini-tool", tools=TOOLS,
                                   tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    body = sent(fake_gemini)["body"]
    assert body["tools"] == [{"functionDeclarations": [{"name": "get_weather", "description": "Weather",
                                                        "parameters": TOOLS[0]["function"]["parameters"]}]}]
    assert body["toolConfig"] == {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}}
    choice = result.body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert call["id"] and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"query": "hello there gemini", "unit": "celsius"}


def test_streamed_function_call(provider):
    """A streamed functionCall becomes one tool_calls delta (index 0) and finish_reason tool_calls."""
    chunks = chunks_of(provider.stream(req("gemini-tool", tools=TOOLS)))
    calls = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks
             if c["choices"] and c["choices"][0]["delta"].get("tool_calls")]
    assert len(calls) == 1 and calls[0]["index"] == 0 and calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"])["unit"] == "celsius"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "tool_calls"


def test_tool_results_become_function_responses(provider, fake_gemini):
    """Assistant tool_calls -> model functionCall parts; tool messages -> functionResponse parts
    named after their call (JSON objects as they are, text wrapped)."""
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"q":"Oslo"}'}},
                    {"id": "c2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 5}'},
                {"role": "tool", "tool_call_id": "c2", "content": "noon"}]
    result = provider.complete({"model": "gemini-tool", "messages": messages, "tools": TOOLS})
    contents = sent(fake_gemini)["body"]["contents"]
    assert contents[1] == {"role": "model", "parts": [{"functionCall": {"name": "get_weather", "args": {"q": "Oslo"}}},
                                                      {"functionCall": {"name": "get_time", "args": {}}}]}
    assert contents[2] == {"role": "user", "parts": [
        {"functionResponse": {"name": "get_weather", "response": {"temp": 5}}},
        {"functionResponse": {"name": "get_time", "response": {"content": "noon"}}}]}
    assert "Tool said" in result.body["choices"][0]["message"]["content"]


@pytest.mark.parametrize("model,cls,status,retryable", [
    ("gemini-bad-key", ProviderAuthError, 502, False),
    ("gemini-fail-403", ProviderAuthError, 502, False),
    ("gemini-fail-429", ProviderRateLimited, 429, True),
    ("gemini-fail-500", ProviderUnavailable, 502, True),
    ("gemini-fail-503", ProviderUnavailable, 502, True),
    ("gemini-context-too-long", ProviderContextTooLong, 400, False),
    ("gemini-not-found", ProviderNotFound, 404, False),
])
@pytest.mark.parametrize("call", ["complete", "stream"])
def test_upstream_errors_map_onto_the_taxonomy(provider, model, cls, status, retryable, call):
    """Gemini's error answers (a bad key is 400 API_KEY_INVALID) become the right ProviderError."""
    with pytest.raises(ProviderError) as info:
        result = getattr(provider, call)(req(model))
        list(result) if call == "stream" else None
    assert type(info.value) is cls, info.value
    assert info.value.retryable is retryable
    assert from_provider_error(info.value).status == status
    assert UPSTREAM_KEY not in str(info.value)


def test_retry_delay_from_retry_info(provider):
    """RESOURCE_EXHAUSTED's RetryInfo.retryDelay ("37s") is the retry_after."""
    with pytest.raises(ProviderRateLimited) as info:
        provider.complete(req("gemini-fail-429"))
    assert info.value.retry_after == 37


@pytest.mark.parametrize("model", ["gemini-malformed", "gemini-malformed-json"])
def test_malformed_answers_are_upstream_errors(provider, model):
    """A 200 answer that is not a GenerateContentResponse is ProviderUnavailable (502)."""
    with pytest.raises(ProviderUnavailable):
        provider.complete(req(model))


@pytest.mark.parametrize("model", ["gemini-die-mid-stream", "gemini-no-finish"])
def test_incomplete_stream(provider, model):
    """A stream cut off, or ended without a finishReason, raises ProviderUnavailable after its pieces."""
    got = []
    with pytest.raises(ProviderUnavailable):
        for piece in provider.stream(req(model)):
            got.append(piece)
    assert got


def test_hang_is_a_timeout(fake_gemini):
    """An upstream that never answers raises ProviderTimeout after timeout_s."""
    prov = GeminiProvider("gemini", {**provider_settings("gemini", fake_gemini), "timeout_s": 0.5}, {})
    try:
        with pytest.raises(ProviderTimeout):
            prov.complete(req("gemini-hang"))
    finally:
        prov.close()


def test_tool_message_without_a_known_call_is_a_bad_request(provider, fake_gemini):
    """A tool message whose tool_call_id no assistant message made cannot be named: 400, no call."""
    with pytest.raises(ProviderBadRequest):
        provider.complete({"model": "gemini-test", "messages": [
            {"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "nope", "content": "1"}]})
    assert fake_gemini.requests() == []
