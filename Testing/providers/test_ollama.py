"""OllamaProvider against the real HTTP fake of Ollama's /api/chat: options mapping, NDJSON
streaming, prompt_eval_count/eval_count -> usage, tools both ways, model-not-pulled 404."""
from __future__ import annotations

import json

import pytest

from Testing.fakes.fake_ollama import DEFAULT_PIECES
from Testing.fakes.http_fake import count_words, echo_words
from Testing.fakes.native import provider_settings
from app.errors import from_provider_error
from app.providers.base import (ProviderBadRequest, ProviderError, ProviderNotFound, ProviderTimeout,
                                ProviderUnavailable)
from app.providers.ollama import OllamaProvider

pytestmark = pytest.mark.timeout(30)
MESSAGES = [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hello there llama"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                           "parameters": {"type": "object", "properties": {}}}}]
PROMPT = count_words("be brief", "hello there llama") + 7


@pytest.fixture
def provider(fake_ollama):
    fake_ollama.reset()
    prov = OllamaProvider("ollama", provider_settings("ollama", fake_ollama), {})
    yield prov
    prov.close()


def req(model: str = "llama3.2", **extra) -> dict:
    return {"model": model, "messages": [dict(m) for m in MESSAGES], **extra}


def sent(fake) -> dict:
    [request] = fake.requests()
    return request


def test_request_translation_and_options(provider, fake_ollama):
    """POST /api/chat with stream false, developer -> system, sampling fields in options
    (max_tokens -> num_predict), response_format json_object -> format json; no Authorization."""
    provider.complete(req(temperature=0.1, top_p=0.8, max_tokens=40, stop="END", seed=1,
                          response_format={"type": "json_object"}))
    r = sent(fake_ollama)
    assert r["path"] == "/api/chat" and "authorization" not in r["headers"] and r["headers"]["x-extra"] == "1"
    body = r["body"]
    assert body["stream"] is False and body["model"] == "llama3.2"
    assert body["messages"] == [{"role": "system", "content": "be brief"},
                                {"role": "user", "content": "hello there llama"}]
    assert body["options"] == {"temperature": 0.1, "top_p": 0.8, "seed": 1, "num_predict": 40, "stop": ["END"]}
    assert body["format"] == "json"


def test_images_as_base64_only(provider, fake_ollama):
    """Data-URL images go as base64 `images`; a plain URL is refused (400) before any call."""
    content = [{"type": "text", "text": "what"},
               {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGk="}}]
    provider.complete({"model": "llava", "messages": [{"role": "user", "content": content}]})
    assert sent(fake_ollama)["body"]["messages"] == [{"role": "user", "content": "what", "images": ["aGk="]}]
    fake_ollama.reset()
    with pytest.raises(ProviderBadRequest):
        provider.complete({"model": "llava", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]})
    assert fake_ollama.requests() == []


def test_complete_answer_and_usage(provider):
    """The answer is a chat.completion; usage = prompt_eval_count / eval_count."""
    result = provider.complete(req())
    assert result.body["choices"][0]["message"]["content"] == "".join(echo_words("hello there llama", DEFAULT_PIECES))
    assert result.body["choices"][0]["finish_reason"] == "stop"
    assert result.usage == {"prompt_tokens": PROMPT, "completion_tokens": DEFAULT_PIECES,
                            "total_tokens": PROMPT + DEFAULT_PIECES}


def test_length_finish(provider):
    """done_reason length becomes finish_reason length."""
    result = provider.complete(req(max_completion_tokens=3))
    assert result.body["choices"][0]["finish_reason"] == "length" and result.usage["completion_tokens"] == 3


def test_stream_ndjson_to_chunks_with_usage(provider, fake_ollama):
    """The NDJSON lines become chunks; the done line gives the finish and the usage piece."""
    pieces = list(provider.stream(req()))
    assert sent(fake_ollama)["body"]["stream"] is True
    chunks = [json.loads(p.data()) for p in pieces]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "".join(echo_words("hello there llama", DEFAULT_PIECES))
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert pieces[-1].usage_only and pieces[-1].usage == {"prompt_tokens": PROMPT, "completion_tokens": DEFAULT_PIECES,
                                                          "total_tokens": PROMPT + DEFAULT_PIECES}


@pytest.mark.parametrize("call", ["complete", "stream"])
def test_prompt_from_cache_has_no_usage(provider, call):
    """Without prompt_eval_count (prompt cached by Ollama) no usage is claimed: the gateway counts."""
    if call == "complete":
        assert provider.complete(req("llama-cached-prompt")).usage is None
    else:
        assert all(p.usage is None for p in provider.stream(req("llama-cached-prompt")))


def test_tools_both_ways(provider, fake_ollama):
    """Tools pass in OpenAI format; a tool_calls answer (object arguments) becomes OpenAI tool_calls;
    the result goes back as a tool message named after its call."""
    result = provider.complete(req("llama-tool", tools=TOOLS))
    assert sent(fake_ollama)["body"]["tools"] == TOOLS
    choice = result.body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    [call] = choice["message"]["tool_calls"]
    assert json.loads(call["function"]["arguments"]) == {"query": "hello there llama", "unit": "celsius"}
    fake_ollama.reset()
    follow = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [call]},
              {"role": "tool", "tool_call_id": call["id"], "content": "sunny"}]
    answer = provider.complete({"model": "llama-tool", "messages": follow, "tools": TOOLS})
    messages = sent(fake_ollama)["body"]["messages"]
    assert messages[1]["tool_calls"] == [{"function": {"name": "get_weather",
                                                       "arguments": {"query": "hello there llama", "unit": "celsius"}}}]
    assert messages[2] == {"role": "tool", "content": "sunny", "tool_name": "get_weather"}
    assert answer.body["choices"][0]["message"]["content"].startswith("Echo: Tool said: sunny")


def test_streamed_tool_call(provider):
    """A tool call in a stream becomes a tool_calls delta and finish_reason tool_calls."""
    chunks = [json.loads(p.data()) for p in provider.stream(req("llama-tool", tools=TOOLS))]
    calls = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks
             if c["choices"] and c["choices"][0]["delta"].get("tool_calls")]
    assert len(calls) == 1 and calls[0]["index"] == 0 and calls[0]["function"]["name"] == "get_weather"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "tool_calls"


@pytest.mark.parametrize("call", ["complete", "stream"])
def test_model_not_pulled_is_404(provider, call):
    """A model Ollama has not pulled is ProviderNotFound (404) naming the model and `ollama pull`."""
    with pytest.raises(ProviderNotFound) as info:
        result = getattr(provider, call)(req("mistral-not-found"))
        list(result) if call == "stream" else None
    assert "mistral-not-found" in info.value.message and "ollama pull" in info.value.message
    assert from_provider_error(info.value).status == 404


@pytest.mark.parametrize("model,cls,status", [("llama-fail-400", ProviderBadRequest, 400),
                                              ("llama-fail-500", ProviderUnavailable, 502),
                                              ("llama-malformed", ProviderUnavailable, 502),
                                              ("llama-malformed-json", ProviderUnavailable, 502)])
def test_errors_and_malformed(provider, model, cls, status):
    """Error statuses and malformed 200 answers map onto the taxonomy (never a crash)."""
    with pytest.raises(ProviderError) as info:
        provider.complete(req(model))
    assert type(info.value) is cls and from_provider_error(info.value).status == status


@pytest.mark.parametrize("model", ["llama-stream-error", "llama-die-mid-stream"])
def test_stream_failures(provider, model):
    """An error line mid-stream, or a cut connection, raises ProviderUnavailable after the pieces sent."""
    got = []
    with pytest.raises(ProviderUnavailable):
        for piece in provider.stream(req(model)):
            got.append(piece)
    assert got


def test_hang_is_a_timeout(fake_ollama):
    """An upstream that never answers raises ProviderTimeout after timeout_s."""
    prov = OllamaProvider("ollama", {**provider_settings("ollama", fake_ollama), "timeout_s": 0.5}, {})
    try:
        with pytest.raises(ProviderTimeout):
            prov.complete(req("llama-hang"))
    finally:
        prov.close()
