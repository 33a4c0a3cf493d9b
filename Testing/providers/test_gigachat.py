"""GigaChatProvider against the real HTTP fake of GigaChat (OAuth + chat completions): the token
request, token caching and refresh, functions <-> tools, usage, errors."""
from __future__ import annotations

import json
import uuid
from urllib.parse import parse_qs

import pytest

from Testing.fakes.fake_gigachat import DEFAULT_PIECES, PRECACHED, FakeGigaChat
from Testing.fakes.http_fake import count_words, echo_words
from Testing.fakes.native import provider_settings
from Testing.support import UPSTREAM_KEY
from app.errors import from_provider_error
from app.providers.base import (ProviderAuthError, ProviderBadRequest, ProviderContextTooLong, ProviderError,
                                ProviderRateLimited, ProviderUnavailable)
from app.providers.gigachat import GigaChatProvider

pytestmark = pytest.mark.timeout(30)
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there giga"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                           "parameters": {"type": "object", "properties": {}}}}]
PROMPT = count_words("be brief", "hello there giga") + 7


@pytest.fixture
def provider(fake_gigachat):
    fake_gigachat.reset()
    prov = GigaChatProvider("gigachat", provider_settings("gigachat", fake_gigachat), {})
    yield prov
    prov.close()


def req(model: str = "GigaChat-2", **extra) -> dict:
    return {"model": model, "messages": [dict(m) for m in MESSAGES], **extra}


def chat_requests(fake) -> list[dict]:
    return [r for r in fake.requests() if r["path"] == "/api/v1/chat/completions"]


def oauth_requests(fake) -> list[dict]:
    return [r for r in fake.requests() if r["path"] == "/api/v2/oauth"]


def test_oauth_request_and_bearer_token(provider, fake_gigachat):
    """The token is requested with Basic <authorization key>, a uuid4 RqUID and the scope form
    field, and the chat call carries it as a Bearer token."""
    provider.complete(req())
    [oauth] = oauth_requests(fake_gigachat)
    assert oauth["headers"]["authorization"] == f"Basic {UPSTREAM_KEY}"
    assert uuid.UUID(oauth["headers"]["rquid"]).version == 4
    assert oauth["headers"]["content-type"] == "application/x-www-form-urlencoded"
    assert parse_qs(oauth["body"]) == {"scope": ["GIGACHAT_API_PERS"]}
    [chat] = chat_requests(fake_gigachat)
    token = chat["headers"]["authorization"].removeprefix("Bearer ")
    assert token in fake_gigachat.tokens and chat["headers"]["x-extra"] == "1"


def test_token_is_cached_until_shortly_before_expiry(fake_gigachat):
    """Three calls share one token; a token within token_refresh_margin_s of its expiry is replaced."""
    prov = GigaChatProvider("gigachat", provider_settings("gigachat", fake_gigachat), {})
    try:
        fake_gigachat.reset()
        for _ in range(3):
            prov.complete(req())
        assert len(oauth_requests(fake_gigachat)) == 1
        prov.refresh_margin_s = 31 * 60  # longer than the fake's 30 min lifetime: every call refreshes
        prov.complete(req())
        prov.complete(req())
        assert len(oauth_requests(fake_gigachat)) == 3
    finally:
        prov.close()


@pytest.mark.parametrize("call", ["complete", "stream"])
def test_401_refreshes_the_token_once(provider, fake_gigachat, call):
    """A token the API no longer accepts (401) is replaced once and the call succeeds: the first
    chat request carries the revoked token, exactly one new token is fetched, the second chat
    request carries that new token, and the answer is the whole completion with its usage.
    Without the refresh the call raises ProviderAuthError and every assertion here is unreached."""
    provider.complete(req())
    [first_call] = chat_requests(fake_gigachat)
    revoked = bearer_of(first_call)
    fake_gigachat.revoke_tokens()
    fake_gigachat.reset()
    if call == "stream":
        pieces = list(provider.stream(req()))
        chunks = [json.loads(p.data()) for p in pieces if not p.usage_only]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        usage = pieces[-1].usage
    else:
        result = provider.complete(req())
        text, usage = result.body["choices"][0]["message"]["content"], result.usage
    before, after = chat_requests(fake_gigachat)  # exactly two chat requests
    assert bearer_of(before) == revoked
    assert len(oauth_requests(fake_gigachat)) == 1
    assert bearer_of(after) != revoked and bearer_of(after) in fake_gigachat.tokens  # the fresh, valid token
    assert text == "".join(echo_words("hello there giga", 9))
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (12, 9)


def bearer_of(chat_request: dict) -> str:
    return chat_request["headers"]["authorization"].removeprefix("Bearer ")


def test_refused_authorization_key_is_an_auth_error(fake_gigachat, monkeypatch):
    """An authorization key the OAuth endpoint refuses is ProviderAuthError (502, not the client's
    fault), and the key appears nowhere in the error."""
    monkeypatch.setenv("TEST_GIGACHAT_WRONG", "d3Jvbmc6a2V5")
    prov = GigaChatProvider("gigachat", {**provider_settings("gigachat", fake_gigachat),
                                         "api_key_env": "TEST_GIGACHAT_WRONG"}, {})
    try:
        with pytest.raises(ProviderAuthError) as info:
            prov.complete(req())
        assert "d3Jvbmc6a2V5" not in str(info.value)
        assert from_provider_error(info.value).status == 502
    finally:
        prov.close()


def test_complete_answer_and_usage_with_precached_tokens(provider):
    """The answer is a chat.completion; usage as sent, precached_prompt_tokens -> cached_tokens."""
    result = provider.complete(req("GigaChat-cache"))
    assert result.body["choices"][0]["message"]["content"] == "".join(echo_words("hello there giga", DEFAULT_PIECES))
    assert result.body["choices"][0]["finish_reason"] == "stop"
    assert result.usage == {"prompt_tokens": PROMPT, "completion_tokens": DEFAULT_PIECES,
                            "total_tokens": PROMPT + DEFAULT_PIECES,
                            "prompt_tokens_details": {"cached_tokens": PRECACHED}}


def test_stream_chunks_and_usage(provider, fake_gigachat):
    """The SSE chunks become OpenAI chunks; the usage of the last chunk is the usage piece."""
    pieces = list(provider.stream(req()))
    assert chat_requests(fake_gigachat)[0]["body"]["stream"] is True
    chunks = [json.loads(p.data()) for p in pieces]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "".join(echo_words("hello there giga", DEFAULT_PIECES))
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert pieces[-1].usage_only and pieces[-1].usage["prompt_tokens"] == PROMPT
    assert pieces[-1].usage["completion_tokens"] == DEFAULT_PIECES


def test_tools_to_functions_and_function_call_back(provider, fake_gigachat):
    """tools -> functions, forced tool_choice -> function_call {name}; the function_call answer
    (object arguments) becomes tool_calls with JSON string arguments and finish tool_calls."""
    result = provider.complete(req("GigaChat-tool", tools=TOOLS,
                                   tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    body = chat_requests(fake_gigachat)[0]["body"]
    assert body["functions"] == [TOOLS[0]["function"]] and body["function_call"] == {"name": "get_weather"}
    choice = result.body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    [call] = choice["message"]["tool_calls"]
    assert call["id"].startswith("call_") and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"query": "hello there giga", "unit": "celsius"}


def test_streamed_function_call(provider):
    """A function_call in a stream becomes one tool_calls delta and finish_reason tool_calls."""
    chunks = [json.loads(p.data()) for p in provider.stream(req("GigaChat-tool", tools=TOOLS))]
    calls = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks
             if c["choices"] and c["choices"][0]["delta"].get("tool_calls")]
    assert len(calls) == 1 and json.loads(calls[0]["function"]["arguments"])["unit"] == "celsius"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "tool_calls"


def test_parallel_calls_become_call_result_pairs(provider, fake_gigachat):
    """OpenAI's two calls in one assistant message are sent as call/result pairs, results as
    `function` messages with JSON content (plain text wrapped)."""
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": '{"q":"Oslo"}'}},
                    {"id": "b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "a", "content": '{"t": 5}'},
                {"role": "tool", "tool_call_id": "b", "content": "noon"}]
    result = provider.complete({"model": "GigaChat-tool", "messages": messages, "tools": TOOLS})
    sent = chat_requests(fake_gigachat)[0]["body"]["messages"]
    assert sent[1:] == [
        {"role": "assistant", "content": "", "function_call": {"name": "get_weather", "arguments": {"q": "Oslo"}}},
        {"role": "function", "name": "get_weather", "content": '{"t": 5}'},
        {"role": "assistant", "content": "", "function_call": {"name": "get_time", "arguments": {}}},
        {"role": "function", "name": "get_time", "content": '{"result": "noon"}'}]
    assert "Tool said" in result.body["choices"][0]["message"]["content"]


@pytest.mark.parametrize("model,cls,status", [("GigaChat-fail-400", ProviderBadRequest, 400),
                                              ("GigaChat-fail-422", ProviderBadRequest, 400),
                                              ("GigaChat-fail-429", ProviderRateLimited, 429),
                                              ("GigaChat-fail-500", ProviderUnavailable, 502),
                                              ("GigaChat-context-too-long", ProviderContextTooLong, 400),
                                              ("GigaChat-malformed", ProviderUnavailable, 502),
                                              ("GigaChat-malformed-json", ProviderUnavailable, 502)])
def test_errors_map_onto_the_taxonomy(provider, model, cls, status):
    """GigaChat's error answers and malformed bodies become the right ProviderError."""
    with pytest.raises(ProviderError) as info:
        provider.complete(req(model))
    assert type(info.value) is cls and from_provider_error(info.value).status == status
    if cls is ProviderRateLimited:
        assert info.value.retry_after == 3


def test_stream_cut_is_unavailable(provider):
    """A stream closed before [DONE] raises ProviderUnavailable after its pieces."""
    got = []
    with pytest.raises(ProviderUnavailable):
        for piece in provider.stream(req("GigaChat-die-mid-stream")):
            got.append(piece)
    assert got


def test_images_are_refused(provider, fake_gigachat):
    """Image parts are a 400 (GigaChat takes images only as uploaded files), before any call."""
    with pytest.raises(ProviderBadRequest):
        provider.complete({"model": "GigaChat-2", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGk="}}]}]})
    assert chat_requests(fake_gigachat) == []


def test_fake_rejects_tokens_it_did_not_issue():
    """The fake itself: a made-up Bearer token is 401 (so the adapter's token really is checked)."""
    import http.client
    with FakeGigaChat("k") as fake:
        conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=5)
        conn.request("POST", "/api/v1/chat/completions", json.dumps(req()), {"Authorization": "Bearer made-up"})
        assert conn.getresponse().status == 401
        conn.close()
